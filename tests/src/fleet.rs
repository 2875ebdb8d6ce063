//! A fleet lab: a real etcd cluster (several members in one namespace, on a management bridge)
//! and many agents, each an `enforcer run --etcd` on its own server namespace. Each server has
//! two links: `mgmt0` to the management bridge (etcd's traffic, not filtered) and `eth0`, the
//! interface the agent protects, to a client interface of a shared client namespace. Addresses
//! are IPv6 documentation addresses: management `2001:db8:ec::/64`, server i `2001:db8:a:i::1`,
//! its client `2001:db8:a:i::10`.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    daemon::Enforcer,
    etcd::{Etcd, text},
    netns::{Netns, veth},
    topology::{Services, TCP_PORT, tcp_exchange},
    vpn::TempDir,
};

/// The ministry whose networks the fleet tests change.
pub const MINISTRY: &str = "enforcer-ministry-MoITT";
/// The clients' addresses, all agents' clients together.
pub const CLIENTS: &str = "2001:db8:a::/48";

/// One agent's host.
pub struct AgentHost {
    pub ns: Netns,
    pub host: String,
    pub server: IpAddr,
    pub cache: PathBuf,
    pub enforcer: Option<Enforcer>,
    _services: Services,
}

pub struct FleetLab {
    /// Stopped first (their controllers detach), then etcd and its management namespace.
    pub agents: Vec<AgentHost>,
    pub etcd: Etcd,
    pub clients: Netns,
    /// Where the agents' caches and the test's files go.
    pub dir: TempDir,
}

fn member_addr(i: usize) -> String {
    format!("2001:db8:ec::{:x}", 0x11 + i)
}

impl FleetLab {
    /// An etcd cluster of `members` and `agents` agent hosts (not started), with the roles set
    /// up and `registry` imported. `etcd_options` go to every member.
    pub fn new(
        members: usize,
        agents: usize,
        registry: &str,
        etcd_options: &[&str],
    ) -> anyhow::Result<Self> {
        let mgmt = Netns::new("enf-mgmt")?;
        mgmt.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        mgmt.exec(&["ip", "link", "set", "br0", "up"])?;
        let addrs: Vec<String> = (0..members).map(member_addr).collect();
        for addr in &addrs {
            mgmt.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "br0",
                "nodad",
            ])?;
        }
        let clients = Netns::new("enf-fcl")?;
        let dir = TempDir::new("enf-fleet")?;
        let mut hosts = Vec::new();
        for i in 0..agents {
            let ns = Netns::new("enf-ag")?;
            veth(&ns, "mgmt0", &mgmt, &format!("m{i}"))?;
            mgmt.exec(&["ip", "link", "set", &format!("m{i}"), "master", "br0"])?;
            // A test cuts an agent off by setting mgmt0 down: its address must come back up.
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.mgmt0.keep_addr_on_down=1"])?;
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("2001:db8:ec::1:{i:x}/64"),
                "dev",
                "mgmt0",
                "nodad",
            ])?;
            veth(&ns, "eth0", &clients, &format!("c{i}"))?;
            let server = format!("2001:db8:a:{i:x}::1");
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{server}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            clients.exec(&[
                "ip",
                "addr",
                "add",
                &format!("2001:db8:a:{i:x}::10/64"),
                "dev",
                &format!("c{i}"),
                "nodad",
            ])?;
            let services = Services::start(&ns)?;
            hosts.push(AgentHost {
                host: format!("eoffice-{i}"),
                cache: dir.0.join(format!("agent-{i}/registry.json")),
                server: server.parse::<Ipv6Addr>()?.into(),
                ns,
                enforcer: None,
                _services: services,
            });
        }
        let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let etcd = Etcd::cluster(mgmt.name.clone(), Some(mgmt), &addr_refs, etcd_options)?;
        let mut args = vec!["fleet", "init-roles", "--ministry", "MoITT"];
        for host in &hosts {
            args.extend(["--agent", host.host.as_str()]);
        }
        let (ok, out) = etcd.enforcer("root", &args)?;
        anyhow::ensure!(ok, "init-roles: {out}");
        let file = dir.0.join("fleet.json");
        std::fs::write(&file, registry)?;
        let (ok, out) = etcd.enforcer("root", &["fleet", "import", &file.display().to_string()])?;
        anyhow::ensure!(ok, "import: {out}");
        Ok(Self {
            etcd,
            agents: hosts,
            clients,
            dir,
        })
    }

    /// Starts agent `i` (its controller in its namespace); returns how long until it enforced.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<Duration> {
        let agent = &mut self.agents[i];
        let mut options = self
            .etcd
            .options(&format!("enforcer-agent-{}", agent.host))?;
        options.extend(["--host".to_string(), agent.host.clone()]);
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let start = Instant::now();
        agent.enforcer = Some(Enforcer::start(&agent.ns, "eth0", &agent.cache, &options)?);
        Ok(start.elapsed())
    }

    /// Whether agent `i`'s client gets an echo from its server.
    pub fn connects(&self, i: usize) -> bool {
        tcp_exchange(
            &self.clients,
            self.agents[i].server,
            TCP_PORT,
            Duration::from_millis(700),
        )
        .unwrap_or(false)
    }

    /// Every agent's published status (host → status), as `root` reads it.
    pub fn statuses(&self) -> anyhow::Result<Vec<(String, Value)>> {
        let out = self.etcd.etcdctl(
            "root",
            &["get", "--prefix", "/enforcer/v1/status/", "-w", "json"],
        )?;
        let json: Value = serde_json::from_str(text(&out).trim())
            .with_context(|| format!("etcdctl get: {}", text(&out)))?;
        let mut out = Vec::new();
        for kv in json["kvs"].as_array().into_iter().flatten() {
            let decode = |field: &str| kv[field].as_str().and_then(base64).unwrap_or_default();
            let key = String::from_utf8_lossy(&decode("key")).into_owned();
            let value: Value = serde_json::from_slice(&decode("value")).unwrap_or(Value::Null);
            let host = key.trim_start_matches("/enforcer/v1/status/").to_string();
            out.push((host, value));
        }
        Ok(out)
    }

    /// Waits (at most `limit`) until every started agent reports `revision` (or later) in
    /// force; returns each agent's time of applying it (ms since the epoch).
    pub fn all_applied(&self, revision: i64, limit: Duration) -> anyhow::Result<Vec<u64>> {
        let start = Instant::now();
        let running = self.agents.iter().filter(|a| a.enforcer.is_some()).count();
        loop {
            let statuses = self.statuses()?;
            let applied: Vec<u64> = statuses
                .iter()
                .filter(|(_, s)| s["applied_revision"].as_i64() >= Some(revision))
                .filter_map(|(_, s)| s["applied_at_ms"].as_u64())
                .collect();
            if applied.len() >= running {
                return Ok(applied);
            }
            if start.elapsed() > limit {
                bail!(
                    "{} of {running} agents applied revision {revision} within {limit:?}: {statuses:?}",
                    applied.len()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `changes` networks added through the CLI one after the other, each timed from its audit
    /// record to each running agent's kernel (ms).
    pub fn propagation(&self, changes: usize) -> anyhow::Result<Vec<u64>> {
        let mut latencies = Vec::new();
        for k in 0..changes {
            let (revision, written) = self.change(&[
                "allow",
                "add",
                &format!("2001:db8:f:{k:x}::/64"),
                "--name",
                &format!("round-{k}"),
                "--ministry",
                "MoITT",
            ])?;
            let applied = self.all_applied(revision, Duration::from_secs(10))?;
            latencies.extend(applied.iter().map(|&t| t.saturating_sub(written)));
        }
        Ok(latencies)
    }

    /// Runs the CLI as the ministry: `args` with `--etcd`; the revision it wrote and the time
    /// its audit record gives (ms since the epoch).
    pub fn change(&self, args: &[&str]) -> anyhow::Result<(i64, u64)> {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let (ok, out) = self.etcd.enforcer(MINISTRY, &with_json)?;
        anyhow::ensure!(ok, "{args:?}: {out}");
        let answer: Value = serde_json::from_str(out.trim()).context("the CLI's answer")?;
        let revision = answer["data"]["revision"]
            .as_i64()
            .context("revision in the answer")?;
        let audit = self.etcd.etcdctl(
            "root",
            &[
                "get",
                "/enforcer/v1/registry/ministries/MoITT/audit",
                "--rev",
                &revision.to_string(),
                "--print-value-only",
            ],
        )?;
        let record: Value = serde_json::from_str(text(&audit).trim())
            .with_context(|| format!("audit record: {}", text(&audit)))?;
        Ok((revision, record["unix_ms"].as_u64().context("unix_ms")?))
    }
}

/// A registry of `entries` networks of the ministry (none of them the clients'), then the
/// clients' network, as a registry file.
pub fn large_registry(entries: usize) -> String {
    let mut networks: Vec<String> = (0..entries)
        .map(|i| {
            format!(
                r#"{{"name": "net-{i}", "cidr": "2001:db8:{:x}:{:x}::/64", "ministry": "MoITT"}}"#,
                0x8000 + i / 0x10000,
                i % 0x10000
            )
        })
        .collect();
    networks.push(format!(
        r#"{{"name": "clients", "cidr": "{CLIENTS}", "ministry": "MoITT", "ports": ["8080/tcp"]}}"#
    ));
    format!(
        "{{\"schema\": 1, \"mode\": \"enforce\", \"egress\": \"off\",\n\"networks\": [\n{}\n]}}\n",
        networks.join(",\n")
    )
}

/// Kills an agent's controller (as a crash would) and starts it again with `options` while
/// etcd is away: it must start from its cache, and say so.
pub fn restart_from_cache(
    enforcer: &mut Enforcer,
    ns: &Netns,
    cache: &std::path::Path,
    options: &[String],
) -> anyhow::Result<()> {
    enforcer.kill_hard()?;
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    enforcer.restart(ns, "eth0", cache, &options)?;
    anyhow::ensure!(
        enforcer
            .log_text()
            .contains("enforcing the cached registry"),
        "the agent did not start from its cache:\n{}",
        enforcer.log_text()
    );
    Ok(())
}

/// Peak resident memory of a process (`VmHWM`), MiB.
pub fn peak_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// What a large registry costs an agent.
#[derive(Debug)]
pub struct Large {
    pub entries: usize,
    /// etcd started and the registry imported (one transaction), s.
    pub import_s: f64,
    /// A fresh agent's start until it enforces, s.
    pub sync_s: f64,
    pub sync_peak_mib: u64,
    /// One change then, from its write to the agent's kernel, ms.
    pub change_ms: u64,
    pub change_peak_mib: u64,
}

impl Large {
    pub fn json(&self) -> Value {
        serde_json::json!({
            "entries": self.entries, "import_s": self.import_s, "sync_s": self.sync_s,
            "sync_peak_mib": self.sync_peak_mib, "change_ms": self.change_ms,
            "change_peak_mib": self.change_peak_mib,
        })
    }
}

/// `entries` networks (and the clients') imported into a one-member etcd, then a fresh agent
/// started on them and one change made; checked with a real connection and the agent's count.
pub fn large(entries: usize) -> anyhow::Result<Large> {
    // One transaction of every key: etcd's limits raised as the README says for large imports.
    let limits = [
        "--max-txn-ops",
        "1000000",
        "--max-request-bytes",
        "134217728",
    ];
    let started = Instant::now();
    let mut lab = FleetLab::new(1, 1, &large_registry(entries), &limits)?;
    let import_s = started.elapsed().as_secs_f64();
    let sync = lab.start_agent(0)?;
    let pid = lab.agents[0]
        .enforcer
        .as_ref()
        .and_then(Enforcer::pid)
        .context("the agent runs")?;
    let sync_peak_mib = peak_mib(pid);
    anyhow::ensure!(lab.connects(0), "the clients' network is in force");
    let (revision, written) = lab.change(&[
        "allow",
        "add",
        "2001:db8:d::/64",
        "--name",
        "one-more",
        "--ministry",
        "MoITT",
    ])?;
    let applied = lab.all_applied(revision, Duration::from_secs(60))?;
    for (host, status) in lab.statuses()? {
        anyhow::ensure!(
            status["networks"] == entries + 2,
            "{host} has {} networks, not {}",
            status["networks"],
            entries + 2
        );
    }
    Ok(Large {
        entries,
        import_s,
        sync_s: sync.as_secs_f64(),
        sync_peak_mib,
        change_ms: applied[0].saturating_sub(written),
        change_peak_mib: peak_mib(pid),
    })
}

/// Decodes standard base64 (etcdctl's JSON output).
fn base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..=n]);
    }
    Some(out)
}

/// The p-th percentile (0–100) of `values` (nearest rank).
pub fn percentile(values: &[u64], p: u32) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return 0;
    }
    let rank = (usize::try_from(p).unwrap_or(100) * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_what_etcdctl_prints() {
        assert_eq!(super::base64("L2Vu").unwrap(), b"/en");
        assert_eq!(super::base64("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64("YQ==").unwrap(), b"a");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(super::percentile(&v, 50), 50);
        assert_eq!(super::percentile(&v, 99), 99);
        assert_eq!(super::percentile(&[7], 99), 7);
    }
}
