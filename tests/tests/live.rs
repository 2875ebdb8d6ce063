//! Live policy control through the running enforcer's socket, with real traffic: a change is in
//! force when the command returns, updates never drop an allowed flow, concurrent clients lose
//! nothing, and the registry file, the audit log and the kernel maps agree. Needs root.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::Duration,
};

use aya::maps::{Array, Map, MapData};
use enforcer::{
    control::{self, Envelope, Request, Response},
    instance::InstanceId,
    registry,
};
use enforcer_common::{RULE_IN_USE, Rule};
use enforcer_tests::{
    daemon::{Enforcer, enforcer_bin, enforcer_cli},
    netns::require_root,
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT, UDP_PORT},
    vpn::TempDir,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_millis(700);

struct Setup {
    lab: Lab,
    services: Services,
    enforcer: Enforcer,
    dir: TempDir,
}

impl Setup {
    fn new() -> Self {
        Self::with_args(&[])
    }

    fn with_args(args: &[&str]) -> Self {
        require_root();
        let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
        let services = Services::start(&lab.server).unwrap();
        let dir = TempDir::new("enf-live").unwrap();
        let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-registry.json");
        std::fs::copy(demo, dir.0.join("registry.json")).unwrap();
        let enforcer = Enforcer::start(
            &lab.server,
            SERVER_IFACE,
            &dir.0.join("registry.json"),
            args,
        )
        .unwrap();
        Self {
            lab,
            services,
            enforcer,
            dir,
        }
    }

    fn registry(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.0.join("registry.json")).unwrap())
            .unwrap()
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.0.join("registry.json.audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn socket(&self) -> PathBuf {
        InstanceId::parse(&self.enforcer.instance)
            .unwrap()
            .control_socket()
    }

    /// The CLI, as an administrator types it.
    fn cli(&self, args: &[&str]) -> (bool, String) {
        self.cli_env(args, &[])
    }

    fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--instance", &self.enforcer.instance])
            .collect();
        enforcer_cli(&args, env)
    }
}

/// One request on the socket, as the CLI sends it (no SSH session, no --force).
fn send(socket: &Path, request: Request) -> Response {
    control::send(
        socket,
        &Envelope {
            request,
            operator: None,
            force: false,
        },
    )
    .unwrap()
}

fn names(registry: &Value, section: &str) -> Vec<String> {
    registry[section].as_array().map_or_else(Vec::new, |a| {
        a.iter()
            .filter_map(|e| e["name"].as_str().map(String::from))
            .collect()
    })
}

#[test]
fn a_change_is_in_force_when_the_command_returns() {
    let s = Setup::new();
    let internet = s.lab.client(INTERNET.label);
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "not yet approved"
    );

    let (ok, out) = s.cli(&[
        "allow",
        "add",
        "192.0.2.64/26",
        "--name",
        "branch-office",
        "--ministry",
        "MoFA",
        "--ports",
        "8080/tcp",
    ]);
    assert!(ok, "{out}");
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "connects right after the command returned"
    );
    let (ok, out) = s.cli(&["check", "192.0.2.70", "--port", "8080"]);
    assert!(
        ok && out.contains("PASS") && out.contains("branch-office"),
        "check against the live policy: {out}"
    );
    // A deny range over the approved network shadows it in the kernel, and lifting it restores it.
    let (ok, out) = s.cli(&["deny", "add", "192.0.2.0/24", "--name", "incident-block"]);
    assert!(ok, "{out}");
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "denied while the range is blocked"
    );
    let (ok, out) = s.cli(&["deny", "remove", "incident-block"]);
    assert!(ok, "{out}");
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "approved again once the block is lifted"
    );
    let registry = s.registry();
    assert!(names(&registry, "networks").contains(&"branch-office".to_string()));
    assert_eq!(registry["serial"], 3);

    let (ok, out) = s.cli(&["allow", "remove", "branch-office"]);
    assert!(ok, "{out}");
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "dropped right after removal"
    );
    assert_eq!(s.registry()["serial"], 4);

    let audit = s.audit_lines();
    assert_eq!(audit.len(), 4, "{audit:?}");
    assert_eq!(
        (
            audit[0]["verb"].as_str(),
            audit[0]["serial_before"].as_u64(),
            audit[0]["serial_after"].as_u64()
        ),
        (Some("networks add"), Some(0), Some(1))
    );
    assert_eq!(audit[0]["uid"], 0);
    assert_eq!(audit[0]["entry"]["name"], "branch-office");
    assert_eq!(audit[1]["verb"], "deny add");
    assert_eq!(audit[2]["verb"], "deny remove");
    assert_eq!(audit[3]["verb"], "networks remove");

    // A refused change says why and changes nothing.
    let before = std::fs::read(s.dir.0.join("registry.json")).unwrap();
    let (ok, out) = s.cli(&["allow", "add", "192.0.2.65/26", "--name", "typo"]);
    assert!(!ok && out.contains("host bits set"), "{out}");
    let (ok, out) = s.cli(&["allow", "add", "198.51.100.0/24", "--name", "again"]);
    assert!(!ok && out.contains("already listed"), "{out}");
    let (ok, out) = s.cli(&[
        "vpn",
        "approve",
        "198.51.100.7",
        "--name",
        "gw",
        "--protocol",
        "ssh",
        "--approval",
        "X-1",
    ]);
    assert!(!ok && out.contains("unknown VPN protocol"), "{out}");
    assert_eq!(
        std::fs::read(s.dir.0.join("registry.json")).unwrap(),
        before,
        "a refused change leaves the file as it was"
    );
    assert_eq!(s.audit_lines().len(), 4);

    // VPN approvals and modes go through the same path.
    let (ok, out) = s.cli(&[
        "vpn",
        "approve",
        "198.51.100.7",
        "--name",
        "nitb-wg",
        "--protocol",
        "wireguard",
        "--port",
        "51820",
        "--approval",
        "NITB-2026-0042",
        "--expires",
        "2099-12-31",
    ]);
    assert!(ok, "{out}");
    assert_eq!(s.audit_lines()[4]["approval"], "NITB-2026-0042");
    let (ok, out) = s.cli(&["mode", "monitor"]);
    assert!(ok, "{out}");
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "monitor mode passes everything"
    );
    let (ok, out) = s.cli(&["status", "--json"]);
    assert!(ok, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["data"]["mode"], "monitor");
    assert_eq!(status["data"]["serial"], 6);
    assert_eq!(status["data"]["vpn_endpoints"], 1);
}

#[test]
fn an_allowed_flow_loses_nothing_during_1000_updates() {
    let s = Setup::new();
    let lan = s.lab.client(MINISTRY_LAN.label);
    let socket = s.socket();
    const DATAGRAMS: u32 = 2500;
    let received_before = s.services.udp_received.load(Ordering::Relaxed);
    let stats_before = s.enforcer.stats().unwrap();
    std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| topology::udp_send(&lan.ns, lan.server_v4, UDP_PORT, DATAGRAMS).unwrap());
        for i in 0..500u32 {
            let cidr = format!("10.{}.{}.0/24", i / 250, i % 250);
            let add = send(
                &socket,
                Request::Add {
                    section: "networks".into(),
                    entry: json!({"name": format!("churn-{i}"), "cidr": cidr, "ports": ["443/tcp"]}),
                },
            );
            assert!(add.ok, "{}", add.message);
            let remove = send(
                &socket,
                Request::Remove {
                    section: "networks".into(),
                    target: format!("churn-{i}"),
                },
            );
            assert!(remove.ok, "{}", remove.message);
        }
        sender.join().unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let received = s.services.udp_received.load(Ordering::Relaxed) - received_before;
    let stats = s.enforcer.stats().unwrap();
    assert_eq!(s.registry()["serial"], 1000, "1000 changes applied");
    assert_eq!(
        stats.rule_hits("ministry-lan") - stats_before.rule_hits("ministry-lan"),
        u64::from(DATAGRAMS),
        "every datagram was allowed by its rule"
    );
    for reason in [
        "not_allowlisted",
        "port_not_allowed",
        "denied",
        "malformed",
        "fragment_unverified",
    ] {
        assert_eq!(
            stats.packets(reason),
            stats_before.packets(reason),
            "no {reason} drop during the updates"
        );
    }
    assert_eq!(
        received,
        u64::from(DATAGRAMS),
        "the server received every datagram"
    );
}

/// Reads the IPv4 source prefixes (allow and deny) the kernel holds, from the pinned `RULES`
/// records.
/// An added or removed entry is made in place (the policy in force edited, the file spliced),
/// but only while the file is what the daemon last wrote: after a hand edit the next change goes
/// the whole way, reading the file as it is, so the hand edit comes into force with it as it
/// always did, and nothing is written over it.
#[test]
fn changes_are_made_in_place_unless_the_file_was_edited_by_hand() {
    let s = Setup::new();
    let socket = s.socket();
    let add = |name: &str, cidr: &str| {
        send(
            &socket,
            Request::Add {
                section: "networks".into(),
                entry: json!({"name": name, "cidr": cidr}),
            },
        )
    };
    let applied = |r: &Response| r.data["applied"].as_str().unwrap_or_default().to_string();
    // What `stats` names (`rules.json` and, after in-place changes, its journal), each rule
    // number once.
    let stats_names = || -> Vec<String> {
        let stats = s.enforcer.stats().unwrap();
        let rules = stats.0["rules"].as_array().unwrap().clone();
        let mut indices: Vec<u64> = rules.iter().map(|r| r["index"].as_u64().unwrap()).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(
            indices.len(),
            rules.len(),
            "each rule number once: {rules:?}"
        );
        rules
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    let journal = InstanceId::parse(&s.enforcer.instance)
        .unwrap()
        .state_file()
        .with_file_name("rules.journal");
    // The demo file has no serial yet: the first change writes one after the mode.
    let first = add("first", "192.0.2.128/26");
    assert!(first.ok, "{}", first.message);
    assert_eq!(applied(&first), "in_place", "{first:?}");
    assert_eq!(s.registry()["serial"], 1);
    let second = add("second", "192.0.2.192/26");
    assert!(second.ok, "{}", second.message);
    assert_eq!(applied(&second), "in_place", "{second:?}");
    let removed = send(
        &socket,
        Request::Remove {
            section: "networks".into(),
            target: "first".into(),
        },
    );
    assert!(removed.ok, "{}", removed.message);
    assert_eq!(applied(&removed), "in_place");
    assert_eq!(
        names(&s.registry(), "networks"),
        ["ministry-lan", "ministry-lan-v6", "second"]
    );
    assert!(kernel_allow_v4(&s.enforcer.instance).contains(&"192.0.2.192/26".to_string()));
    assert!(!kernel_allow_v4(&s.enforcer.instance).contains(&"192.0.2.128/26".to_string()));
    let named = stats_names();
    assert!(
        named.contains(&"second".to_string()) && !named.contains(&"first".to_string()),
        "stats names the rules in force: {named:?}"
    );
    assert!(
        journal.exists(),
        "in-place changes are journalled, not written whole"
    );
    let duplicate = add("third", "192.0.2.192/26");
    assert!(!duplicate.ok, "a repeated prefix is refused");
    assert!(
        duplicate.message.contains("already listed"),
        "with the whole path's message: {}",
        duplicate.message
    );
    let invalid = add("fourth", "192.0.2.1/24");
    assert!(!invalid.ok);
    assert!(
        invalid.message.contains("networks[3]") && invalid.message.contains("cidr"),
        "named by its place in the file: {}",
        invalid.message
    );

    // A hand edit the daemon has not read: a network added in the file only.
    let path = s.dir.0.join("registry.json");
    let mut doc = s.registry();
    doc["networks"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "by-hand", "cidr": "192.0.2.64/27"}));
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let after_edit = add("fifth", "192.0.2.96/27");
    assert!(after_edit.ok, "{}", after_edit.message);
    assert_eq!(applied(&after_edit), "whole_registry");
    assert_eq!(
        names(&s.registry(), "networks"),
        [
            "ministry-lan",
            "ministry-lan-v6",
            "second",
            "by-hand",
            "fifth"
        ],
        "the hand edit is kept"
    );
    let kernel = kernel_allow_v4(&s.enforcer.instance);
    assert!(
        kernel.contains(&"192.0.2.64/27".to_string())
            && kernel.contains(&"192.0.2.96/27".to_string()),
        "both in force: {kernel:?}"
    );
    assert!(
        !journal.exists(),
        "a whole-registry change writes the labels whole"
    );
    let named = stats_names();
    for name in ["second", "by-hand", "fifth"] {
        assert!(named.contains(&name.to_string()), "{name} in {named:?}");
    }
    // The file is the daemon's again: in place.
    let next = add("sixth", "192.0.2.32/28");
    assert_eq!(applied(&next), "in_place", "{next:?}");
    let named = stats_names();
    assert!(
        named.contains(&"sixth".to_string()) && named.contains(&"fifth".to_string()),
        "{named:?}"
    );
    for mode in [registry::Mode::Monitor, registry::Mode::Enforce] {
        let switched = send(&socket, Request::Mode { mode });
        assert!(switched.ok, "{}", switched.message);
        assert_eq!(applied(&switched), "in_place", "{switched:?}");
        assert_eq!(s.registry()["mode"], mode.as_str());
        let status = send(&socket, Request::Status);
        assert_eq!(status.data["mode"], mode.as_str());
    }
    // Serial and audit trail as for any change.
    let serials: Vec<u64> = s
        .audit_lines()
        .iter()
        .map(|l| l["serial_after"].as_u64().unwrap())
        .collect();
    assert_eq!(
        serials.windows(2).filter(|w| w[1] != w[0] + 1).count(),
        0,
        "{serials:?}"
    );
    assert_eq!(s.registry()["serial"].as_u64(), serials.last().copied());
}

fn kernel_allow_v4(instance: &str) -> Vec<String> {
    let path = InstanceId::parse(instance).unwrap().pin_dir().join("RULES");
    let map = Map::from_map_data(MapData::from_pin(&path).unwrap()).unwrap();
    let rules: Array<&MapData, Rule> = Array::try_from(&map).unwrap();
    let mut prefixes: Vec<String> = rules
        .iter()
        .map(Result::unwrap)
        .filter(|r| r.flags & RULE_IN_USE != 0 && r.family == 4)
        .map(|r| {
            let [a, b, c, d, ..] = r.addr;
            format!("{}/{}", std::net::Ipv4Addr::new(a, b, c, d), r.len)
        })
        .collect();
    prefixes.sort();
    prefixes
}

#[test]
fn fifty_concurrent_clients_lose_no_change() {
    let s = Setup::new();
    let results: Vec<(bool, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.cli(&[
                        "allow",
                        "add",
                        &format!("10.{i}.0.0/16"),
                        "--name",
                        &format!("concurrent-{i}"),
                    ])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (ok, out) in &results {
        assert!(ok, "every client's change is accepted: {out}");
    }
    let registry = s.registry();
    let mut added: Vec<String> = names(&registry, "networks")
        .into_iter()
        .filter(|n| n.starts_with("concurrent-"))
        .collect();
    added.sort();
    assert_eq!(added.len(), 50, "the registry file has all 50: {added:?}");
    assert_eq!(registry["serial"], 50);
    let audit = s.audit_lines();
    assert_eq!(audit.len(), 50);
    let mut serials: Vec<u64> = audit
        .iter()
        .map(|a| a["serial_after"].as_u64().unwrap())
        .collect();
    serials.sort_unstable();
    assert_eq!(
        serials,
        (1..=50).collect::<Vec<_>>(),
        "one serial per change, none lost or repeated"
    );

    let mut expected: Vec<String> = registry["networks"]
        .as_array()
        .unwrap()
        .iter()
        .chain(registry["devices"].as_array().unwrap())
        // deny ranges share the kernel's source lookup
        .chain(registry["deny"].as_array().unwrap())
        .filter_map(|e| {
            e["cidr"].as_str().or(e["address"].as_str()).map(|c| {
                if c.contains('/') {
                    c.to_string()
                } else {
                    format!("{c}/32")
                }
            })
        })
        .filter(|c| !c.contains(':'))
        .collect();
    expected.sort();
    assert_eq!(
        kernel_allow_v4(&s.enforcer.instance),
        expected,
        "the kernel's source entries equal the registry's allow and deny sets"
    );
    let stats = s.enforcer.stats().unwrap();
    for i in 0..50 {
        stats.rule_hits(&format!("concurrent-{i}")); // panics if `stats` does not name the rule
    }
}

fn raw_request(socket: &Path, line: &str) -> Value {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(stream, "{line}").unwrap();
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn non_root_and_malformed_requests_change_nothing() {
    let s = Setup::new();
    let before = std::fs::read(s.dir.0.join("registry.json")).unwrap();

    for line in [
        "this is not json",
        r#"{"verb": "add", "section": "networks", "entry": "x"}"#,
        r#"{"verb": "drop_everything"}"#,
        r#"{"verb": "add", "section": "routes", "entry": {}}"#,
    ] {
        let answer = raw_request(&s.socket(), line);
        assert_eq!(answer["ok"], false, "{line} → {answer}");
    }

    // Without privileges the socket's file mode keeps the peer out.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(enforcer_bin())
        .args([
            "allow",
            "add",
            "10.9.0.0/16",
            "--name",
            "sneaky",
            "--instance",
            &s.enforcer.instance,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a non-root client must fail");
    // With a capability that passes the file mode, the daemon still refuses by credentials.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_override",
            "--ambient-caps=+dac_override",
        ])
        .arg(enforcer_bin())
        .args([
            "allow",
            "add",
            "10.9.0.0/16",
            "--name",
            "sneaky",
            "--instance",
            &s.enforcer.instance,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("only root may control"),
        "refused by peer credentials: {err}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        s.enforcer
            .log_text()
            .contains("refused a control request from a non-root peer"),
        "the refusal is logged"
    );

    assert_eq!(
        std::fs::read(s.dir.0.join("registry.json")).unwrap(),
        before,
        "nothing changed"
    );
    assert!(s.audit_lines().is_empty());
}

/// kill -9 of the controller during traffic: enforcement goes on unchanged; a new controller
/// adopts the pinned program and maps, reconciles them with a registry edited meanwhile, and
/// serves again; `enforcer detach` then removes everything.
/// A controller that is gone, with its link gone too (its interface was deleted with its
/// namespace, say), is no longer listed as running; `detach --instance` still removes what it
/// left (state directory, pins), rather than saying nothing runs and leaving it.
#[test]
fn detach_removes_what_a_gone_instance_left() {
    let mut s = Setup::new();
    let id = InstanceId::parse(&s.enforcer.instance).unwrap();
    s.enforcer.kill_hard().unwrap();
    // What deleting the interface leaves once the link is released: no link pin.
    let link = id.pin_dir().join("link");
    let link = aya::programs::links::PinnedLink::from_pin(&link).unwrap();
    drop(link.unpin().unwrap());
    let (ok, out) = s.cli(&["status"]);
    assert!(!ok, "not running any more: {out}");
    assert!(id.state_file().exists(), "its state is still there");
    let (ok, out) = s.cli(&["detach"]);
    assert!(ok, "{out}");
    assert!(out.contains("state removed"), "{out}");
    assert!(!id.state_file().exists(), "state removed");
    assert!(!id.pin_dir().exists(), "pins removed");
}

#[test]
fn a_killed_controller_leaves_enforcement_running_and_a_restart_adopts_it() {
    let mut s = Setup::new();
    let lan = s.lab.client(MINISTRY_LAN.label);
    let internet = s.lab.client(INTERNET.label);
    let registry = s.dir.0.join("registry.json");
    let program_before = s.enforcer.stats().unwrap().0["program_id"].clone();

    s.enforcer.kill_hard().unwrap();
    assert!(
        topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "approved traffic still passes with no controller"
    );
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "unapproved traffic still dropped with no controller"
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.packets("not_allowlisted") > 0,
        "the kernel keeps counting: {}",
        stats.0
    );

    // The registry is edited while no controller runs: the internet office is approved.
    let mut doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&registry).unwrap()).unwrap();
    doc["networks"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "internet-office", "cidr": "192.0.2.64/26", "ports": ["8080/tcp"]}));
    std::fs::write(&registry, serde_json::to_string_pretty(&doc).unwrap()).unwrap();

    s.enforcer
        .restart(&s.lab.server, SERVER_IFACE, &registry, &[])
        .unwrap();
    let log = s.enforcer.log_text();
    assert!(
        log.contains("adopted the running program"),
        "the new controller adopts:\n{log}"
    );
    let stats = s.enforcer.stats().unwrap();
    assert_eq!(
        stats.0["program_id"], program_before,
        "the same program keeps running"
    );
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "reconciled with the edited registry"
    );
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, TIMEOUT).unwrap());
    let (ok, out) = s.cli(&["allow", "remove", "internet-office"]);
    assert!(ok, "the adopted instance serves the socket: {out}");
    assert!(!topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap());

    // Stopping the controller leaves the program; detach removes it.
    let out = s.enforcer.stop().unwrap();
    assert!(out.contains("program detached"), "{out}");
    let link = s
        .lab
        .server
        .exec(&["ip", "link", "show", SERVER_IFACE])
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "no program left on the interface"
    );
    assert!(
        !InstanceId::parse(&s.enforcer.instance)
            .unwrap()
            .pin_dir()
            .exists(),
        "no pins left"
    );
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "unfiltered after detach"
    );
    let _ = s.services.udp_received.load(Ordering::Relaxed);
}

#[test]
fn changes_that_would_lock_the_operator_out_need_force() {
    let s = Setup::with_args(&["--protect", "198.51.100.0/24"]);
    let ssh_from_laptop = [("SSH_CLIENT", "192.0.2.17 50022 22")];

    // Refused before any change and after one.
    let refusals = |serial: u64| {
        let (ok, out) = s.cli(&["allow", "remove", "ministry-lan"]);
        assert!(
            !ok && out.contains("protected management network 198.51.100.0/24"),
            "{out}"
        );
        let (ok, out) = s.cli_env(&["device", "remove", "dcs-laptop"], &ssh_from_laptop);
        assert!(
            !ok && out.contains("your own session from 192.0.2.17 (tcp/22)"),
            "{out}"
        );
        let (ok, out) = s.cli_env(
            &["deny", "add", "192.0.2.16/28", "--name", "oops"],
            &ssh_from_laptop,
        );
        assert!(
            !ok && out.contains("your own session"),
            "a deny covering the operator is refused too: {out}"
        );
        assert_eq!(s.registry()["serial"].as_u64().unwrap_or(0), serial);
    };
    refusals(0);
    let (ok, out) = s.cli_env(
        &["allow", "add", "10.50.0.0/16", "--name", "harmless"],
        &ssh_from_laptop,
    );
    assert!(ok, "changes that keep the session are fine: {out}");
    assert_eq!(
        s.registry()["serial"],
        1,
        "only the harmless change was made"
    );
    refusals(1);

    let (ok, out) = s.cli_env(
        &["device", "remove", "dcs-laptop", "--force"],
        &ssh_from_laptop,
    );
    assert!(ok, "--force applies it: {out}");
    assert!(!names(&s.registry(), "devices").contains(&"dcs-laptop".to_string()));
}

#[test]
fn expired_entries_leave_the_registry_without_a_restart() {
    let s = Setup::with_args(&["--expiry-check-secs", "1"]);
    let internet = s.lab.client(INTERNET.label);
    let (ok, out) = s.cli(&[
        "allow",
        "add",
        "192.0.2.64/26",
        "--name",
        "old-contract",
        "--ports",
        "8080/tcp",
        "--expires",
        "2020-01-31",
    ]);
    assert!(ok, "{out}");
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "an expired entry is never in force"
    );
    // The sweep rewrites the registry, then appends its audit line: wait for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while names(&s.registry(), "networks").contains(&"old-contract".to_string())
        || !s.audit_lines().iter().any(|a| a["verb"] == "expire")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the expiry sweep removes it from the registry and audits it: {:?}",
            s.audit_lines()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let audit = s.audit_lines();
    let expire = audit
        .iter()
        .find(|a| a["verb"] == "expire")
        .unwrap_or_else(|| panic!("an expire line in the audit log: {audit:?}"));
    assert_eq!(expire["entry"][0]["entry"]["name"], "old-contract");
    assert_eq!(expire["uid"], 0);
    assert!(s.enforcer.log_text().contains("removed 1 expired entries"));
}

/// A controller restarted after its interface was replaced (same name, new device) must not
/// adopt the dead link: it attaches anew, so the new interface is protected.
#[test]
fn a_restart_after_the_interface_was_replaced_attaches_anew() {
    let mut s = Setup::new();
    let internet = s.lab.client(INTERNET.label);
    let lan = s.lab.client(MINISTRY_LAN.label);
    s.enforcer.kill_hard().unwrap();
    s.lab.replace_server_nic().unwrap();
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "the new interface starts unprotected (the old link died with the old device)"
    );
    let registry = s.dir.0.join("registry.json");
    s.enforcer
        .restart(&s.lab.server, SERVER_IFACE, &registry, &[])
        .unwrap();
    let log = s.enforcer.log_text();
    assert!(
        log.contains("attaching anew") && !log.contains("adopted the running program"),
        "{log}"
    );
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "protected again"
    );
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, TIMEOUT).unwrap());
}

#[test]
fn a_reload_that_outgrows_the_lookup_table_grows_it_without_a_gap() {
    // The IPv4 table was sized for the small demo registry (2,048 blocks). The new registry
    // adds 3,000 /24s in 3,000 different /16s (a block each) and the internet client's /32:
    // the controller must grow the table (a new map, a program instance using it, one link
    // update) while the ministry LAN keeps sending.
    let s = Setup::new();
    let lan = s.lab.client(MINISTRY_LAN.label);
    let internet = s.lab.client(INTERNET.label);
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "the internet client is not allowlisted before the reload"
    );
    let mut registry = s.registry();
    let networks = registry["networks"].as_array_mut().unwrap();
    for i in 0..3000u32 {
        networks.push(json!({
            "name": format!("big-{i}"),
            "cidr": format!("{}.{}.7.0/24", 11 + i / 256, i % 256),
        }));
    }
    networks.push(json!({"name": "internet-now", "cidr": format!("{}/32", INTERNET.v4)}));
    std::fs::write(
        s.dir.0.join("registry.json"),
        serde_json::to_string_pretty(&registry).unwrap(),
    )
    .unwrap();
    let program_before = s.cli(&["status", "--json"]).1;
    const DATAGRAMS: u32 = 3000;
    let received_before = s.services.udp_received.load(Ordering::Relaxed);
    let stats_before = s.enforcer.stats().unwrap();
    std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| topology::udp_send(&lan.ns, lan.server_v4, UDP_PORT, DATAGRAMS).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        let (ok, out) = s.cli(&["reload"]);
        assert!(ok, "the reload succeeds: {out}");
        sender.join().unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let received = s.services.udp_received.load(Ordering::Relaxed) - received_before;
    let stats = s.enforcer.stats().unwrap();
    assert_eq!(
        stats.packets("not_allowlisted"),
        stats_before.packets("not_allowlisted"),
        "no drop while the table grew"
    );
    assert_eq!(
        received,
        u64::from(DATAGRAMS),
        "the server received every datagram"
    );
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "the new registry is in force in the grown table"
    );
    let status: Value = serde_json::from_str(&s.cli(&["status", "--json"]).1).unwrap();
    let before: Value = serde_json::from_str(&program_before).unwrap();
    assert!(before["data"]["program_id"].is_u64(), "{before}");
    assert_ne!(
        status["data"]["program_id"], before["data"]["program_id"],
        "a new program instance (using the grown table) took over the link"
    );
    assert!(
        s.enforcer.log_text().contains("IPv4 lookup table grown"),
        "{}",
        s.enforcer.log_text()
    );
}

#[test]
fn an_enforcer_pinned_by_an_earlier_build_is_taken_over_with_one_link_update() {
    // An earlier build pinned under another layout root. Simulated by moving a running
    // instance's pins (program, link, maps) to the v1 root after its controller died: the new
    // controller must not reuse those maps, but fill its own and switch the attached link to its
    // program in one kernel call, with no moment unfiltered.
    let mut s = Setup::new();
    let lan = s.lab.client(MINISTRY_LAN.label);
    let internet = s.lab.client(INTERNET.label);
    let registry = s.dir.0.join("registry.json");
    let id = InstanceId::parse(&s.enforcer.instance).unwrap();
    let program_before = s.enforcer.stats().unwrap().0["program_id"].clone();
    s.enforcer.kill_hard().unwrap();
    let legacy = id.legacy_pin_dirs().remove(0);
    std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
    std::fs::rename(id.pin_dir(), &legacy).unwrap();
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "the earlier build's program still enforces"
    );

    const DATAGRAMS: u32 = 2000;
    let received_before = s.services.udp_received.load(Ordering::Relaxed);
    std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| topology::udp_send(&lan.ns, lan.server_v4, UDP_PORT, DATAGRAMS).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        s.enforcer
            .restart(&s.lab.server, SERVER_IFACE, &registry, &[])
            .unwrap();
        sender.join().unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let log = s.enforcer.log_text();
    assert!(
        log.contains("took over an earlier build's enforcer"),
        "the new controller takes over:\n{log}"
    );
    assert_eq!(
        s.services.udp_received.load(Ordering::Relaxed) - received_before,
        u64::from(DATAGRAMS),
        "no datagram lost while the link switched programs"
    );
    assert!(!legacy.exists(), "the earlier build's pins are removed");
    assert!(
        id.pin_dir().join("link").exists(),
        "the link is pinned anew"
    );
    let stats = s.enforcer.stats().unwrap();
    assert_ne!(
        stats.0["program_id"], program_before,
        "this build's program runs"
    );
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "still enforcing after the take-over"
    );
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, TIMEOUT).unwrap());
    let out = s.enforcer.stop().unwrap();
    assert!(out.contains("program detached"), "{out}");
}
