//! The enforcer as an agent of the fleet: `enforcer run --etcd` on the lab's server, following a
//! real etcd (TLS, client certificates, authentication on) on the server namespace's loopback,
//! with real connections from the lab's clients deciding what is in force.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_cli},
    etcd::{Etcd, text},
    netns::{Netns, require_root},
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT},
};
use serde_json::Value;

const ROOT: &str = "root";
const MINISTRY: &str = "enforcer-ministry-MoITT";
const AGENT: &str = "enforcer-agent-eoffice-1";
const PARTNER_KEY: &str = "/enforcer/v1/registry/ministries/MoITT/networks/partner";
const STATUS_KEY: &str = "/enforcer/v1/status/eoffice-1";

fn partner() -> String {
    format!(r#"{{"name": "partner", "cidr": "192.0.2.0/24", "ports": ["{TCP_PORT}/tcp"]}}"#)
}

/// Whether `client` gets an echo from the server within a short time.
fn connects(client: &Netns, server: std::net::IpAddr) -> bool {
    topology::tcp_exchange(client, server, TCP_PORT, Duration::from_millis(700)).unwrap()
}

/// Waits (at most 15 s) until `client` connects or not as `want`; returns how long it took.
fn until_connects(client: &Netns, server: std::net::IpAddr, want: bool) -> Duration {
    let start = Instant::now();
    while connects(client, server) != want {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the connection did not become {} within 15 s",
            if want { "possible" } else { "impossible" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// The agent's status in etcd, once `want` holds (at most 15 s).
fn status_where(etcd: &Etcd, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let out = etcd
            .etcdctl(ROOT, &["get", STATUS_KEY, "--print-value-only"])
            .unwrap();
        let status: Value = serde_json::from_str(text(&out).trim()).unwrap_or(Value::Null);
        if want(&status) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the status never met the condition; last: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn put(etcd: &Etcd, user: &str, key: &str, value: &str) {
    let out = etcd.etcdctl(user, &["put", key, value]).unwrap();
    assert!(out.status.success(), "put {key}: {}", text(&out));
}

/// The revision of the registry's latest change (the newest modification among its keys; the
/// store's own revision moves on with every status the agent writes).
fn revision(etcd: &Etcd) -> i64 {
    let out = etcd
        .etcdctl(
            ROOT,
            &[
                "get",
                "/enforcer/v1/registry/",
                "--prefix",
                "--sort-by=MODIFY",
                "--order=DESCEND",
                "--limit=1",
                "-w",
                "json",
                "--keys-only",
            ],
        )
        .unwrap();
    let json: Value = serde_json::from_str(text(&out).trim()).unwrap();
    json["kvs"][0]["mod_revision"].as_i64().unwrap()
}

fn agent(lab: &Lab, cache: &Path, options: &[String]) -> Enforcer {
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    Enforcer::start(&lab.server, SERVER_IFACE, cache, &options).unwrap()
}

#[test]
fn an_agent_follows_the_fleet_and_enforces_from_its_cache_while_etcd_is_away() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let mut etcd = Etcd::start_in(&lab.server).unwrap();
    let (ok, out) = etcd
        .enforcer(
            ROOT,
            &[
                "fleet",
                "init-roles",
                "--ministry",
                "MoITT",
                "--agent",
                "eoffice-1",
            ],
        )
        .unwrap();
    assert!(ok, "{out}");
    let file = etcd.dir().join("fleet.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"schema": 1, "mode": "enforce", "egress": "off",
  "networks": [{{"name": "ministry-lan", "cidr": "198.51.100.0/24", "ministry": "MoITT",
                "ports": ["{TCP_PORT}/tcp"]}}]}}"#
        ),
    )
    .unwrap();
    let (ok, out) = etcd
        .enforcer(ROOT, &["fleet", "import", &file.display().to_string()])
        .unwrap();
    assert!(ok, "{out}");

    let cache = etcd.dir().join("cache").join("registry.json");
    let mut options = etcd.options(AGENT).unwrap();
    options.extend(["--host".to_string(), "eoffice-1".to_string()]);
    let mut enforcer = agent(&lab, &cache, &options);
    let (lan, internet) = (lab.client(MINISTRY_LAN.label), lab.client(INTERNET.label));
    assert!(
        connects(&lan.ns, lan.server_v4),
        "the fleet's network gets in"
    );
    assert!(
        !connects(&internet.ns, internet.server_v4),
        "an unlisted one does not"
    );
    let first = status_where(&etcd, |s| s["applied_revision"].as_i64().is_some());
    assert_eq!(first["host"], "eoffice-1", "{first}");
    assert_eq!(first["mode"], "enforce", "{first}");
    assert_eq!(first["enforcing"], true, "{first}");
    // The compliance report names the fleet and the revision in force.
    let (ok, out) = enforcer_cli(
        &[
            "report",
            "--format",
            "json",
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(ok, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["fleet"]["host"], "eoffice-1", "{report}");
    assert_eq!(
        report["registry_serial"], first["applied_revision"],
        "{report}"
    );

    // A ministry's change through the CLI reaches the kernel.
    let port = format!("{TCP_PORT}/tcp");
    let (ok, out) = etcd
        .enforcer(
            MINISTRY,
            &[
                "allow",
                "add",
                "192.0.2.0/24",
                "--name",
                "partner",
                "--ministry",
                "MoITT",
                "--ports",
                &port,
            ],
        )
        .unwrap();
    assert!(ok, "{out}");
    let took = until_connects(&internet.ns, internet.server_v4, true);
    eprintln!("a change written through the CLI was in force after {took:?}");
    let now = revision(&etcd);
    status_where(&etcd, |s| s["applied_revision"].as_i64() >= Some(now));
    let (ok, out) = etcd.enforcer(MINISTRY, &["fleet", "status"]).unwrap();
    assert!(ok && out.contains("eoffice-1: current"), "{out}");

    // The local socket takes no change: the registry is etcd's.
    let (ok, out) = enforcer_cli(
        &[
            "allow",
            "add",
            "10.9.0.0/16",
            "--name",
            "x",
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(!ok && out.contains("follows the fleet"), "{out}");

    // One transaction (etcdctl's: its values take no spaces): the partner removed, and a
    // network with host bits (written past the CLI). The removal is in force; the bad key is left out and named in the status.
    let typo = "/enforcer/v1/registry/ministries/MoITT/networks/typo";
    let txn = format!(
        "\ndel {PARTNER_KEY}\nput {typo} {{\"name\":\"typo\",\"cidr\":\"10.99.0.1/16\"}}\n\n\n"
    );
    let out = etcd.etcdctl_input(MINISTRY, &["txn"], &txn).unwrap();
    assert!(
        out.status.success() && text(&out).contains("SUCCESS"),
        "{}",
        text(&out)
    );
    until_connects(&internet.ns, internet.server_v4, false);
    let status = status_where(&etcd, |s| s["left_out_count"] == 1);
    assert_eq!(status["left_out"][0]["key"], typo, "{status}");
    assert!(
        status["left_out"][0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("host bits")),
        "{status}"
    );
    assert!(
        connects(&lan.ns, lan.server_v4),
        "the rest of the registry stands"
    );

    // A change the agent has not applied shows it behind; the agent catches up.
    let (ok, out) = etcd.enforcer(ROOT, &["fleet", "status", "--json"]).unwrap();
    assert!(ok, "{out}");
    let fleet: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(fleet["hosts"][0]["host"], "eoffice-1", "{fleet}");

    // etcd away: the agent keeps enforcing what it has.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(1));
    assert!(connects(&lan.ns, lan.server_v4));
    assert!(!connects(&internet.ns, internet.server_v4));
    // A restart while etcd is away enforces from the cache.
    enforcer_tests::fleet::restart_from_cache(&mut enforcer, &lab.server, &cache, &options)
        .unwrap();
    assert!(connects(&lan.ns, lan.server_v4));
    assert!(!connects(&internet.ns, internet.server_v4));

    // etcd back: the agent reconnects and follows again.
    etcd.resume().unwrap();
    put(&etcd, MINISTRY, PARTNER_KEY, &partner());
    until_connects(&internet.ns, internet.server_v4, true);
    let now = revision(&etcd);
    status_where(&etcd, |s| {
        s["applied_revision"].as_i64() >= Some(now) && s["last_error"].is_null()
    });

    // Without an agent, its status goes with its lease.
    enforcer.kill_hard().unwrap();
    let gone = Instant::now();
    loop {
        let out = etcd
            .etcdctl(ROOT, &["get", STATUS_KEY, "--print-value-only"])
            .unwrap();
        if text(&out).trim().is_empty() {
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(20),
            "the status outlived its agent"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "a killed agent's status was gone after {:?}",
        gone.elapsed()
    );
    let (ok, out) = etcd.enforcer(ROOT, &["fleet", "status"]).unwrap();
    assert!(ok && out.contains("eoffice-1: GONE"), "{out}");
}

#[test]
fn an_agent_without_etcd_or_cache_refuses_to_start() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN]).unwrap();
    let dir = enforcer_tests::vpn::TempDir::new("enf-agent").unwrap();
    let cache = dir.0.join("registry.json");
    let error = Enforcer::start(
        &lab.server,
        SERVER_IFACE,
        &cache,
        &["--etcd", "http://127.0.0.1:2", "--host", "h"],
    )
    .err()
    .expect("refused");
    let message = format!("{error:#}");
    assert!(
        message.contains("no cached registry") && message.contains("not starting"),
        "{message}"
    );
}
