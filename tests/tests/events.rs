//! The event log with real traffic: each kind of drop, a VPN packet, an egress denial and the
//! daemon's own events reach the JSON lines with the fields a SIEM reads (Elastic Common Schema
//! names), every line has the documented fields, a file is reopened on SIGHUP, and a flood from
//! thousands of sources gives exact drop counters but a bounded number of events, with the
//! suppressed ones counted.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_cli},
    netns::require_root,
    topology::{
        self, DENIED, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT, UDP_PORT,
    },
    vpn::TempDir,
};
use serde_json::Value;

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce", "egress": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24", "ministry": "MoITT",
                "ports": ["8080/tcp"]}],
  "deny": [{"name": "vpn-provider", "cidr": "203.0.113.0/24"}]}"#;

/// Every line of the log, parsed; panics on a line that is not JSON.
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The fields docs/events.md says every line has, with their types.
fn check_schema(line: &Value) {
    let text = |v: &Value| v.as_str().is_some();
    let ts = line["@timestamp"].as_str().unwrap_or_default();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "@timestamp RFC 3339 UTC with ms: {line}"
    );
    assert!(text(&line["event"]["kind"]), "event.kind: {line}");
    assert!(text(&line["event"]["action"]), "event.action: {line}");
    assert!(
        line["event"]["category"].is_array(),
        "event.category: {line}"
    );
    assert!(line["event"]["type"].is_array(), "event.type: {line}");
    assert_eq!(line["observer"]["product"], "enforcer", "{line}");
    assert!(text(&line["observer"]["interface"]["name"]), "{line}");
    if line["event"]["category"][0] == "network" {
        assert!(
            line["event"]["count"].as_u64().is_some_and(|c| c >= 1),
            "event.count: {line}"
        );
        assert!(
            matches!(
                line["network"]["direction"].as_str(),
                Some("ingress" | "egress")
            ),
            "network.direction: {line}"
        );
        assert!(text(&line["network"]["iana_number"]), "{line}");
        // Addresses for IP packets (a frame that is not IP has none).
        if line["network"]["type"] != "other" {
            for side in ["source", "destination"] {
                let ip = line[side]["ip"].as_str().unwrap_or_default();
                assert!(ip.parse::<IpAddr>().is_ok(), "{side}.ip: {line}");
            }
        }
        assert!(
            matches!(
                line["labels"]["would_drop"].as_str(),
                Some("true" | "false")
            ),
            "labels.would_drop: {line}"
        );
    } else {
        assert!(text(&line["message"]), "message: {line}");
        assert!(
            matches!(
                line["event"]["outcome"].as_str(),
                Some("success" | "failure")
            ),
            "{line}"
        );
    }
}

/// The first line for which `want` holds, waiting up to 5 s for it.
fn wait_for(path: &Path, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = lines(path).into_iter().find(|l| want(l)) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no event for {what} in:\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn drops_vpn_packets_egress_denials_and_changes_reach_the_log() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET, DENIED]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-events").unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry, REGISTRY).unwrap();
    let log = dir.0.join("events.jsonl");
    let log_arg = log.display().to_string();
    let enforcer = Enforcer::start(
        &lab.server,
        SERVER_IFACE,
        &registry,
        &["--events", &log_arg],
    )
    .unwrap();
    let started = wait_for(&log, "the start", |l| l["event"]["action"] == "started");
    assert_eq!(started["event"]["category"][0], "configuration");

    let internet = lab.client(INTERNET.label);
    let lan = lab.client(MINISTRY_LAN.label);
    let denied = lab.client(DENIED.label);
    // The access log: an approved client opens a connection to the e-Office service.
    assert!(
        topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, Duration::from_secs(1)).unwrap()
    );
    let line = wait_for(&log, "the access", |l| l["event"]["action"] == "access");
    assert_eq!(line["source"]["ip"], MINISTRY_LAN.v4, "{line}");
    assert_eq!(line["destination"]["port"], TCP_PORT, "{line}");
    assert_eq!(line["rule"]["name"], "ministry-lan", "{line}");
    assert_eq!(line["labels"]["ministry"], "MoITT", "{line}");
    assert_eq!(line["event"]["type"][0], "connection", "{line}");
    // Not allowlisted: a TCP connection attempt.
    assert!(
        !topology::tcp_exchange(
            &internet.ns,
            internet.server_v4,
            TCP_PORT,
            Duration::from_millis(300)
        )
        .unwrap()
    );
    let line = wait_for(&log, "not_allowlisted", |l| {
        l["event"]["action"] == "not_allowlisted"
    });
    assert_eq!(line["source"]["ip"], INTERNET.v4, "{line}");
    assert_eq!(line["destination"]["port"], TCP_PORT, "{line}");
    assert_eq!(line["network"]["transport"], "tcp", "{line}");
    assert_eq!(line["network"]["direction"], "ingress", "{line}");
    assert_eq!(line["event"]["type"][0], "denied", "{line}");
    // Denied: pings from the deny range, with its rule.
    let _ = topology::ping(&denied.ns, denied.server_v4, 1);
    let line = wait_for(&log, "denied", |l| l["event"]["action"] == "denied");
    assert_eq!(line["rule"]["name"], "vpn-provider", "{line}");
    assert_eq!(line["network"]["transport"], "icmp", "{line}");
    // Port not allowed: UDP from the approved LAN, whose entry allows 8080/tcp only; its
    // ministry labels it.
    topology::udp_send(&lan.ns, lan.server_v4, UDP_PORT, 1).unwrap();
    let line = wait_for(&log, "port_not_allowed", |l| {
        l["event"]["action"] == "port_not_allowed"
    });
    assert_eq!(line["rule"]["name"], "ministry-lan", "{line}");
    assert_eq!(line["rule"]["ruleset"], "network", "{line}");
    assert_eq!(line["labels"]["ministry"], "MoITT", "{line}");
    assert_eq!(line["destination"]["port"], UDP_PORT, "{line}");
    // An unapproved VPN: a WireGuard handshake initiation from the internet client.
    enforcer_tests::vpn::send_wireguard_initiation(
        &internet.ns,
        INTERNET.v4.parse().unwrap(),
        internet.server_v4,
    )
    .unwrap();
    let line = wait_for(&log, "unapproved_vpn", |l| {
        l["event"]["action"] == "unapproved_vpn"
    });
    assert_eq!(line["labels"]["vpn_protocol"], "wireguard", "{line}");
    assert_eq!(line["source"]["port"], 51_820, "{line}");
    // Egress denied: the server connects to a host that is neither approved nor an upstream.
    assert!(
        !topology::tcp_exchange(
            &lab.server,
            INTERNET.v4.parse().unwrap(),
            9,
            Duration::from_millis(300)
        )
        .unwrap()
    );
    let line = wait_for(&log, "egress_denied", |l| {
        l["event"]["action"] == "egress_denied"
    });
    assert_eq!(line["network"]["direction"], "egress", "{line}");
    assert_eq!(line["destination"]["ip"], INTERNET.v4, "{line}");
    assert_eq!(line["destination"]["port"], 9, "{line}");
    // A change and a refused one.
    let (ok, out) = enforcer_cli(
        &[
            "allow",
            "add",
            "10.60.0.0/16",
            "--name",
            "branch",
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(ok, "{out}");
    let line = wait_for(&log, "the change", |l| {
        l["event"]["action"] == "policy-changed"
    });
    assert_eq!(line["labels"]["registry_serial"], "1", "{line}");
    let (ok, _) = enforcer_cli(
        &[
            "allow",
            "add",
            "10.60.0.1/16",
            "--name",
            "bad",
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(!ok);
    let line = wait_for(&log, "the refusal", |l| {
        l["event"]["action"] == "change-refused"
    });
    assert_eq!(line["event"]["outcome"], "failure", "{line}");
    assert!(
        line["message"]
            .as_str()
            .unwrap_or_default()
            .contains("host bits"),
        "{line}"
    );

    // Reopened on SIGHUP, as logrotate asks.
    let rotated = dir.0.join("events.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    let pid = i32::try_from(enforcer.pid().expect("running")).unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(log.exists(), "the log is opened anew on SIGHUP");
    let (ok, out) = enforcer_cli(
        &[
            "allow",
            "remove",
            "branch",
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(ok, "{out}");
    wait_for(&log, "a change after the reopen", |l| {
        l["event"]["action"] == "policy-changed"
    });

    // A flood from thousands of sources: the drop counter is exact, the events are bounded,
    // and what was suppressed is counted.
    let before = enforcer.stats().unwrap().packets("not_allowlisted");
    let lines_before = lines(&log).len();
    let frames = 6000;
    flood(&internet.ns, internet.server_v4, frames);
    std::thread::sleep(Duration::from_millis(500));
    let dropped = enforcer.stats().unwrap().packets("not_allowlisted") - before;
    assert_eq!(
        dropped,
        u64::from(frames),
        "every flood frame dropped and counted"
    );
    let flood_lines = lines(&log).len() - lines_before;
    let status = enforcer.status().unwrap();
    let suppressed = status["events_suppressed"].as_u64().unwrap_or(0);
    assert!(
        flood_lines > 0 && flood_lines < usize::try_from(frames / 2).unwrap(),
        "{flood_lines} lines for {frames} dropped frames"
    );
    assert!(
        suppressed > 0 && suppressed + flood_lines as u64 >= u64::from(frames) / 2,
        "suppressed events reported ({suppressed}) for {frames} frames, {flood_lines} lines"
    );

    for line in lines(&rotated).iter().chain(&lines(&log)) {
        check_schema(line);
    }
}

/// Sends `frames` UDP frames from 3,000 sources in 198.18.0.0/15 (benchmarking addresses no
/// registry here lists) to `server`.
fn flood(ns: &enforcer_tests::netns::Netns, server: IpAddr, frames: u32) {
    enforcer_tests::topology::send_raw(
        ns,
        (0..frames).map(|i| {
            let source = IpAddr::from([
                198,
                18,
                u8::try_from(i % 3000 / 256).unwrap(),
                u8::try_from(i % 256).unwrap(),
            ]);
            enforcer_tests::packet::Frame::udp(&source.to_string(), &server.to_string(), 9).build()
        }),
    );
}

/// The reasons the first test does not meet, each with its event: a deny feed's range,
/// malformed headers, a frame that is not IP, an unverified later fragment, an approved VPN
/// packet, and (in monitor mode) a would-drop.
#[test]
fn every_other_reason_has_its_event() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET, DENIED]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-events2").unwrap();
    std::fs::write(
        dir.0.join("providers.txt"),
        "# a provider list\n203.0.113.0/24\n",
    )
    .unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(
        &registry,
        r#"{"schema": 1, "mode": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24", "ports": ["8080/tcp", "5353/udp"]}],
  "vpn_endpoints": [{"name": "nitb-wg", "address": "192.0.2.66", "protocol": "wireguard",
                     "approval": "NITB-2026-0042"}],
  "deny_files": ["providers.txt"]}"#,
    )
    .unwrap();
    let log = dir.0.join("events.jsonl");
    let log_arg = log.display().to_string();
    let enforcer = Enforcer::start(
        &lab.server,
        SERVER_IFACE,
        &registry,
        &["--events", &log_arg],
    )
    .unwrap();
    let (lan, internet, denied) = (
        lab.client(MINISTRY_LAN.label),
        lab.client(INTERNET.label),
        lab.client(DENIED.label),
    );
    let action = |want: &'static str| move |l: &Value| l["event"]["action"] == want;

    let _ = topology::ping(&denied.ns, denied.server_v4, 1);
    let line = wait_for(&log, "denied_feed", action("denied_feed"));
    assert_eq!(line["rule"]["ruleset"], "feed", "{line}");
    assert_eq!(line["source"]["ip"], DENIED.v4, "{line}");

    let server = lan.server_v4.to_string();
    // A TCP header announcing 12 bytes (less than the 20 it has at least). Its IPv4 header
    // stays valid: a bridge that validates IPv4 (br_netfilter) would drop a bad one before the
    // server saw it, and a short frame is padded on the wire, so cutting it would not do.
    let mut malformed =
        enforcer_tests::packet::Frame::tcp(MINISTRY_LAN.v4, &server, TCP_PORT).build();
    malformed[14 + 20 + 12] = 3 << 4;
    // A local experimental EtherType, from a valid source MAC (a bridge drops a zero one).
    let mut not_ip = vec![0u8; 60];
    not_ip[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    not_ip[12..14].copy_from_slice(&0x88B5u16.to_be_bytes());
    let later_fragment = enforcer_tests::packet::Frame::new(
        MINISTRY_LAN.v4.parse().unwrap(),
        lan.server_v4,
        enforcer_tests::packet::L4::Raw {
            proto: enforcer_tests::packet::UDP,
            bytes: vec![0; 64],
        },
    )
    .fragment(185, false, 4242)
    .build();
    enforcer_tests::topology::send_raw(&lan.ns, [malformed, not_ip, later_fragment].into_iter());
    let line = wait_for(&log, "malformed", action("malformed"));
    assert_eq!(line["network"]["type"], "ipv4", "{line}");
    let line = wait_for(&log, "non_ip", action("non_ip"));
    assert_eq!(line["network"]["type"], "other", "{line}");
    let line = wait_for(&log, "fragment_unverified", action("fragment_unverified"));
    assert_eq!(line["rule"]["name"], "ministry-lan", "{line}");

    enforcer_tests::vpn::send_wireguard_initiation(
        &internet.ns,
        INTERNET.v4.parse().unwrap(),
        internet.server_v4,
    )
    .unwrap();
    let line = wait_for(&log, "approved_vpn", action("approved_vpn"));
    assert_eq!(line["event"]["type"][0], "allowed", "{line}");
    assert_eq!(line["rule"]["name"], "nitb-wg", "{line}");

    // A UDP flow's first datagram is the access log's; its next ones are not.
    topology::udp_send(&lan.ns, lan.server_v4, UDP_PORT, 3).unwrap();
    let line = wait_for(&log, "a UDP access", |l| {
        l["event"]["action"] == "access" && l["network"]["transport"] == "udp"
    });
    assert_eq!(line["destination"]["port"], UDP_PORT, "{line}");
    assert_eq!(line["event"]["count"], 1, "{line}");
    std::thread::sleep(Duration::from_millis(300));
    let udp_access = lines(&log)
        .iter()
        .filter(|l| l["event"]["action"] == "access" && l["network"]["transport"] == "udp")
        .count();
    assert_eq!(
        udp_access, 1,
        "one event for the flow, not one per datagram"
    );

    let (ok, out) = enforcer_cli(&["mode", "monitor", "--instance", &enforcer.instance], &[]);
    assert!(ok, "{out}");
    assert!(
        topology::tcp_exchange(
            &internet.ns,
            internet.server_v4,
            TCP_PORT,
            Duration::from_secs(1)
        )
        .unwrap(),
        "monitor mode lets it through"
    );
    // (The server's own packets are would-drops too: egress is in monitor mode here.)
    let line = wait_for(&log, "an ingress would-drop", |l| {
        l["labels"]["would_drop"] == "true" && l["network"]["direction"] == "ingress"
    });
    assert_eq!(line["event"]["action"], "not_allowlisted", "{line}");
    assert_eq!(line["source"]["ip"], INTERNET.v4, "{line}");
    for line in lines(&log) {
        check_schema(&line);
    }
}
