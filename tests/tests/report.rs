//! The compliance report of a running enforcer: its JSON holds the controls and their evidence
//! (the registry by ministry, approvals, expiries, drops, VPN attempts by source, the audit
//! chain), its Markdown reads, and its HTML is rendered by headless Chromium (Debian's
//! `chromium`), which loads it and takes a screenshot.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_cli},
    netns::require_root,
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT},
    vpn::TempDir,
};
use serde_json::Value;

/// A date `days` from today (UTC), as the registry writes it.
fn in_days(days: u64) -> String {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    enforcer::registry::Date::from_days_since_epoch(i64::try_from(today + days).unwrap())
        .to_string()
}

fn registry() -> String {
    format!(
        r#"{{"schema": 1, "mode": "enforce", "egress": "monitor",
  "networks": [{{"name": "ministry-lan", "cidr": "198.51.100.0/24", "ministry": "MoITT"}},
               {{"name": "mofa-branch", "cidr": "10.40.8.0/24", "ministry": "MoFA", "expires": "{}"}}],
  "devices": [{{"name": "dcs-laptop", "address": "192.0.2.17", "owner": "Director of Cyber Security"}}],
  "vpn_endpoints": [{{"name": "nitb-wg-gw", "address": "192.0.2.7", "protocol": "wireguard",
                      "approval": "NITB-2026-0042", "expires": "2099-01-31"}}],
  "deny": [{{"name": "vpn-provider", "cidr": "203.0.113.0/24"}}],
  "upstreams": [{{"name": "dns", "address": "192.0.2.53", "ports": ["53/udp"]}}]}}"#,
        in_days(10)
    )
}

fn report(instance: &str, format: &str) -> String {
    let (ok, out) = enforcer_cli(&["report", "--instance", instance, "--format", format], &[]);
    assert!(ok, "enforcer report --format {format}: {out}");
    out
}

#[test]
fn the_report_shows_the_controls_and_their_evidence() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-report").unwrap();
    let registry_path: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry_path, registry()).unwrap();
    let events = dir.0.join("events.jsonl");
    let enforcer = Enforcer::start(
        &lab.server,
        SERVER_IFACE,
        &registry_path,
        &[
            "--events",
            &events.display().to_string(),
            "--history-secs",
            "1",
        ],
    )
    .unwrap();

    // Traffic and a change: drops, an unapproved WireGuard packet, an audited change.
    let internet = lab.client(INTERNET.label);
    let _ = topology::tcp_exchange(
        &internet.ns,
        internet.server_v4,
        TCP_PORT,
        Duration::from_millis(300),
    );
    enforcer_tests::vpn::send_wireguard_initiation(
        &internet.ns,
        INTERNET.v4.parse().unwrap(),
        internet.server_v4,
    )
    .unwrap();
    let (ok, out) = enforcer_cli(
        &[
            "allow",
            "add",
            "10.60.0.0/16",
            "--name",
            "branch",
            "--ministry",
            "MoFA",
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(ok, "{out}");
    // Samples of the history on both sides of the traffic.
    let _ = topology::tcp_exchange(
        &internet.ns,
        internet.server_v4,
        TCP_PORT,
        Duration::from_millis(300),
    );

    let deadline = Instant::now() + Duration::from_secs(15);
    let json: Value = loop {
        let json: Value = serde_json::from_str(&report(&enforcer.instance, "json")).unwrap();
        let ready = json["over_time"]["times"].as_array().unwrap().len() >= 2
            && !json["vpn_unapproved_by_source"]
                .as_array()
                .unwrap()
                .is_empty();
        if ready || Instant::now() > deadline {
            break json;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let controls = json["controls"].as_array().unwrap();
    let status = |name: &str| {
        controls
            .iter()
            .find(|c| c["control"].as_str().unwrap().contains(name))
            .map(|c| c["status"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no control {name}: {json:#}"))
    };
    assert_eq!(status("Incoming traffic"), "in force");
    assert_eq!(status("Outgoing traffic"), "monitored only");
    assert_eq!(status("Changes audited"), "in force");
    let ministries = json["networks_by_ministry"].as_object().unwrap();
    assert_eq!(ministries["MoITT"][0]["name"], "ministry-lan");
    assert_eq!(ministries["MoFA"].as_array().unwrap().len(), 2, "{json:#}");
    assert_eq!(json["vpn_endpoints"][0]["approval"], "NITB-2026-0042");
    assert_eq!(json["devices"][0]["name"], "dcs-laptop");
    assert_eq!(json["upstreams"][0]["name"], "dns");
    let expiring = json["expiring_within_30_days"].as_array().unwrap();
    assert!(
        expiring
            .iter()
            .any(|e| e.as_str().unwrap().contains("mofa-branch")),
        "{json:#}"
    );
    let drops = json["drops"].as_array().unwrap();
    assert!(
        drops
            .iter()
            .any(|d| d[0] == "not_allowlisted" && d[2].as_u64().unwrap() >= 2),
        "{json:#}"
    );
    assert_eq!(
        json["vpn_unapproved_by_protocol"][0][0], "wireguard",
        "{json:#}"
    );
    assert_eq!(
        json["vpn_unapproved_by_source"][0][1], INTERNET.v4,
        "{json:#}"
    );
    assert!(
        !json["over_time"]["times"].as_array().unwrap().is_empty(),
        "history: {json:#}"
    );
    assert!(
        json["audit"].as_str().unwrap().starts_with("chain intact"),
        "{json:#}"
    );
    assert!(
        json["seconds_since_last_change"].as_u64().is_some(),
        "{json:#}"
    );

    let md = report(&enforcer.instance, "md");
    assert!(
        md.starts_with("# e-Office access control: compliance report"),
        "{md}"
    );
    assert!(
        md.contains("| NITB-2026-0042 |") || md.contains("NITB-2026-0042"),
        "{md}"
    );

    // The HTML: loaded by headless Chromium (its DOM holds the report), and a screenshot.
    let page = dir.0.join("report.html");
    std::fs::write(&page, report(&enforcer.instance, "html")).unwrap();
    let url = format!("file://{}", page.display());
    let chromium = |args: &[&str]| {
        Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu"])
            .args(args)
            .arg(&url)
            .output()
            .expect("chromium runs (installed by `cargo xtask setup`)")
    };
    let dom = chromium(&["--dump-dom"]);
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for want in [
        "compliance report",
        "Controls of the advisory",
        "<svg",
        "NITB-2026-0042",
        "ministry-lan",
    ] {
        assert!(dom_text.contains(want), "`{want}` not in the rendered page");
    }
    let shot = dir.0.join("report.png");
    let out = chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1280,2000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot of {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("REPORT_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
