//! Prometheus metrics with the real Prometheus server: the enforcer serves `/metrics` on the
//! server namespace's loopback, Debian's `prometheus` (started by the test in that namespace)
//! scrapes it, and a query on Prometheus's HTTP API returns the value the kernel's counter
//! holds. The exposition itself names rules with their ministry, the modes, the maps' fill.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_cli},
    netns::{Netns, require_root},
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT},
    vpn::{Daemon, TempDir},
};

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce", "egress": "monitor",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24", "ministry": "MoITT",
                "expires": "2099-01-01"}],
  "upstreams": [{"name": "dns", "address": "192.0.2.66", "ports": ["53/udp"]}]}"#;

const METRICS_PORT: u16 = 9750;
const PROMETHEUS_PORT: u16 = 9790;

/// `GET path` on `127.0.0.1:port` inside `ns`: (status line, body).
fn http_get(ns: &Netns, port: u16, path: &str) -> std::io::Result<(String, String)> {
    ns.enter(|| {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        ))
    })
    .expect("enter the namespace")
}

/// The value Prometheus's query API returns for `query` (one series), if any yet.
fn prometheus_value(ns: &Netns, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (status, body) = http_get(
        ns,
        PROMETHEUS_PORT,
        &format!("/api/v1/query?query={encoded}"),
    )
    .ok()?;
    if !status.contains("200") {
        return None;
    }
    // A chunked body holds the JSON between its chunk sizes: take the object.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let answer: serde_json::Value = serde_json::from_str(json).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

#[test]
fn prometheus_scrapes_the_counters_the_kernel_holds() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-metrics").unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry, REGISTRY).unwrap();
    let enforcer = Enforcer::start(
        &lab.server,
        SERVER_IFACE,
        &registry,
        &["--metrics", &METRICS_PORT.to_string()],
    )
    .unwrap();

    // Traffic: the LAN client's exchanges pass, the internet client's attempts drop.
    let lan = lab.client(MINISTRY_LAN.label);
    let internet = lab.client(INTERNET.label);
    for _ in 0..3 {
        assert!(
            topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, Duration::from_secs(2))
                .unwrap()
        );
    }
    assert!(
        !topology::tcp_exchange(
            &internet.ns,
            internet.server_v4,
            TCP_PORT,
            Duration::from_millis(500)
        )
        .unwrap()
    );
    assert_eq!(
        topology::ping(&internet.ns, internet.server_v4, 2).unwrap(),
        0
    );

    // The exposition, read directly.
    let (status, text) = http_get(&lab.server, METRICS_PORT, "/metrics").unwrap();
    assert!(status.contains("200"), "{status}");
    let stats = enforcer.stats().unwrap();
    let dropped = stats.packets("not_allowlisted");
    assert!(dropped >= 3, "{}", stats.0);
    for line in [
        format!(
            "enforcer_packets_total{{direction=\"ingress\",reason=\"not_allowlisted\",action=\"drop\"}} {dropped}"
        ),
        format!(
            "enforcer_rule_hits_total{{direction=\"ingress\",rule=\"ministry-lan\",kind=\"network\",ministry=\"MoITT\"}} {}",
            stats.rule_hits("ministry-lan")
        ),
        "enforcer_registry_serial 0".to_string(),
        "enforcer_egress_mode{mode=\"monitor\"} 1".to_string(),
        "enforcer_mode{direction=\"ingress\",mode=\"enforce\"} 1".to_string(),
        "enforcer_entries{kind=\"upstream\"} 1".to_string(),
        "enforcer_map_capacity{map=\"RULES\"} 1048576".to_string(),
        "enforcer_enforcing 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    let (status, _) = http_get(&lab.server, METRICS_PORT, "/other").unwrap();
    assert!(status.contains("404"), "{status}");

    // A change is published: the serial and the expiry count follow.
    let (ok, out) = enforcer_cli(
        &[
            "allow",
            "add",
            "10.50.0.0/16",
            "--name",
            "branch",
            "--ministry",
            "MoFA",
            "--expires",
            &soon(),
            "--instance",
            &enforcer.instance,
        ],
        &[],
    );
    assert!(ok, "{out}");
    let (_, text) = http_get(&lab.server, METRICS_PORT, "/metrics").unwrap();
    for line in [
        "enforcer_registry_serial 1",
        "enforcer_entries_expiring_30_days 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }

    // The real Prometheus scrapes it; its query API returns the kernel's value.
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: enforcer\n    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n"
        ),
    )
    .unwrap();
    let _prometheus = Daemon::spawn(
        &lab.server,
        &[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.0.join("tsdb").display()),
            &format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"),
        ],
        dir.0.join("prometheus.log"),
        &[],
    )
    .unwrap();
    let query = "enforcer_packets_total{direction=\"ingress\",reason=\"not_allowlisted\"}";
    let dropped = enforcer.stats().unwrap().packets("not_allowlisted");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = prometheus_value(&lab.server, query);
        if seen == Some(dropped as f64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        seen,
        Some(dropped as f64),
        "Prometheus's value of {query} (the kernel holds {dropped}); its log:\n{}",
        std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap_or_default()
    );
}

/// A date ten days from today (UTC), as the registry writes it.
fn soon() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400
        + 10;
    enforcer::registry::Date::from_days_since_epoch(i64::try_from(days).unwrap()).to_string()
}
