//! The egress verdict with real software: in egress enforce mode the e-Office server reaches an
//! upstream on its ports only (DNS through dnsmasq over UDP, a TCP download), not on other ports
//! and not a host that is neither approved nor an upstream; answers to approved clients pass;
//! `check --to` explains each verdict; upstreams and the egress mode change live; egress monitor
//! lets everything out and counts the would-be drops; and a switch to egress enforce that would
//! cut off the operator's session is refused.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_bin, enforcer_cli},
    netns::{Netns, require_root},
    topology::{self, DENIED, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT},
    vpn::{Daemon, TempDir},
};

/// The ministry LAN is approved; the "internet" namespace is an upstream for DNS and for a
/// mirror on 9000/tcp; the "denied" namespace is neither (and not in the deny list).
const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce", "egress": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24"}],
  "upstreams": [
    {"name": "dns", "address": "192.0.2.66", "ports": ["53/udp"], "note": "resolver"},
    {"name": "mirror", "cidr": "192.0.2.64/30", "ports": ["9000/tcp"], "ministry": "NITB"}
  ]}"#;

const UPSTREAM: &str = "192.0.2.66";
const OTHER_HOST: &str = "203.0.113.9";
const MIRROR_PORT: u16 = 9000;
const UNLISTED_PORT: u16 = 9001;
const OTHER_PORT: u16 = 7000;
const DOWNLOAD_BYTES: usize = 4 << 20;
const TIMEOUT: Duration = Duration::from_millis(800);

/// Serves `DOWNLOAD_BYTES` to each connection on `addr:port` in `ns`, until the test ends.
fn download_server(ns: &Netns, addr: &str, port: u16) {
    let listener = ns
        .enter(|| TcpListener::bind((addr, port)).expect("bind the download server"))
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(&vec![0x5A; DOWNLOAD_BYTES]);
        }
    });
}

/// Echoes lines on TCP `addr:port` in `ns`, until the test ends.
fn echo_server(ns: &Netns, addr: &str, port: u16) {
    let listener = ns
        .enter(|| TcpListener::bind((addr, port)).expect("bind the echo server"))
        .unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
}

/// Counts the datagrams arriving on UDP `addr:port` in `ns`.
fn udp_counter(ns: &Netns, addr: &str, port: u16) -> Arc<AtomicU32> {
    let socket = ns
        .enter(|| UdpSocket::bind((addr, port)).expect("bind the UDP counter"))
        .unwrap();
    let received = Arc::new(AtomicU32::new(0));
    let count = Arc::clone(&received);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while socket.recv_from(&mut buf).is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    received
}

/// Bytes the server downloads from `addr:port` (0 if it cannot connect).
fn download(lab: &Lab, addr: &str, port: u16) -> usize {
    lab.server
        .enter(|| {
            let target = SocketAddr::new(addr.parse().unwrap(), port);
            let Ok(mut stream) = TcpStream::connect_timeout(&target, TIMEOUT) else {
                return 0;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut data = Vec::new();
            let _ = stream.read_to_end(&mut data);
            data.len()
        })
        .unwrap()
}

/// `dig @UPSTREAM NAME +short` from the server's namespace.
fn dig(lab: &Lab, name: &str) -> String {
    let output = lab
        .server
        .exec_status(&[
            "dig",
            &format!("@{UPSTREAM}"),
            name,
            "+short",
            "+time=1",
            "+tries=1",
        ])
        .expect("dig runs (installed by `cargo xtask setup`)");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The CLI against the running enforcer, with `env` (an SSH session, say).
fn cli(enforcer: &Enforcer, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--instance", &enforcer.instance])
        .collect();
    enforcer_cli(&args, env)
}

/// `enforcer check --to ... --registry FILE --json`, parsed.
fn check_file(registry: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(enforcer_bin())
        .args(["check", "--json", "--registry"])
        .arg(registry)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn registry_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn in_egress_enforce_the_server_reaches_its_upstreams_on_their_ports_and_nothing_else() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET, DENIED]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-egress").unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry, REGISTRY).unwrap();
    let upstream = &lab.client(INTERNET.label).ns;
    let other = &lab.client(DENIED.label).ns;
    let _dns = Daemon::dnsmasq(
        upstream,
        UPSTREAM,
        ("eoffice.example", "192.0.2.10"),
        dir.0.join("dnsmasq.log"),
    )
    .unwrap();
    download_server(upstream, UPSTREAM, MIRROR_PORT);
    echo_server(upstream, UPSTREAM, UNLISTED_PORT);
    echo_server(other, OTHER_HOST, OTHER_PORT);
    let other_udp = udp_counter(other, OTHER_HOST, 5300);
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = enforcer.stats().unwrap();

    // Answers to an approved client leave (its address is an approved network).
    let lan = lab.client(MINISTRY_LAN.label);
    assert!(
        topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "the approved client's exchange works in egress enforce"
    );
    // The upstream's services, on their ports.
    assert_eq!(
        dig(&lab, "eoffice.example"),
        "192.0.2.10",
        "DNS over UDP to the upstream"
    );
    assert_eq!(
        download(&lab, UPSTREAM, MIRROR_PORT),
        DOWNLOAD_BYTES,
        "the download from the mirror upstream (a /30 holding it) completes"
    );
    let after = enforcer.stats().unwrap();
    let out = |label: &str| after.egress_packets(label) - before.egress_packets(label);
    assert!(
        out("allowed") > 0,
        "answers to the LAN client counted: {}",
        after.0
    );
    assert!(after.egress_rule_hits("ministry-lan") > 0, "{}", after.0);
    assert!(after.egress_rule_hits("dns") > 0, "{}", after.0);
    assert!(after.egress_rule_hits("mirror") > 0, "{}", after.0);
    assert!(
        out("upstream") > 10,
        "the query and the download's acknowledgements leave as upstream: {}",
        out("upstream")
    );
    assert_eq!(out("egress_denied"), 0, "nothing denied yet: {}", after.0);

    // Not on another port of the upstream, nor to a host that is neither approved nor an
    // upstream (TCP and UDP); each attempt is counted as egress_denied.
    let denied_before = enforcer.stats().unwrap().egress_packets("egress_denied");
    let upstream_addr: IpAddr = UPSTREAM.parse().unwrap();
    let other_addr: IpAddr = OTHER_HOST.parse().unwrap();
    assert!(
        !topology::tcp_exchange(&lab.server, upstream_addr, UNLISTED_PORT, TIMEOUT).unwrap(),
        "a port the upstream does not list is closed to the server"
    );
    assert!(
        !topology::tcp_exchange(&lab.server, other_addr, OTHER_PORT, TIMEOUT).unwrap(),
        "a host that is neither approved nor an upstream is closed to the server"
    );
    topology::udp_send(&lab.server, other_addr, 5300, 5).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        other_udp.load(Ordering::Relaxed),
        0,
        "no datagram reaches the unlisted host"
    );
    let denied = enforcer.stats().unwrap().egress_packets("egress_denied") - denied_before;
    assert!(
        denied >= 2 + 5,
        "the SYNs and the datagrams drop as egress_denied: {denied}"
    );

    // `check --to` explains each verdict, live and against the file.
    let (ok, text) = cli(
        &enforcer,
        &["check", "--to", UPSTREAM, "--port", "53", "--proto", "udp"],
        &[],
    );
    assert!(
        ok && text.contains("PASS (upstream") && text.contains("\"dns\""),
        "{text}"
    );
    let (ok, text) = cli(
        &enforcer,
        &["check", "--to", UPSTREAM, "--port", "9001"],
        &[],
    );
    assert!(ok && text.contains("DROP (egress_denied"), "{text}");
    let verdict = check_file(&registry, &["--to", "198.51.100.10", "--port", "50000"]);
    assert_eq!(verdict["reason"], "allowed", "{verdict}");
    assert_eq!(verdict["direction"], "egress", "{verdict}");
    let verdict = check_file(&registry, &["--to", UPSTREAM, "--port", "9000"]);
    assert_eq!(verdict["reason"], "upstream", "{verdict}");
    assert_eq!(verdict["rule"]["name"], "mirror", "{verdict}");

    // An upstream added live opens its port, and removed closes it again.
    let (ok, text) = cli(
        &enforcer,
        &[
            "upstream", "add", OTHER_HOST, "--name", "ldap", "--ports", "7000/tcp",
        ],
        &[],
    );
    assert!(ok, "{text}");
    assert!(
        topology::tcp_exchange(&lab.server, other_addr, OTHER_PORT, TIMEOUT).unwrap(),
        "the added upstream is reached"
    );
    let (ok, text) = cli(&enforcer, &["upstream", "list"], &[]);
    assert!(
        ok && text.contains("ldap") && text.contains("mirror"),
        "{text}"
    );
    let (ok, text) = cli(
        &enforcer,
        &["upstream", "add", OTHER_HOST, "--name", "x"],
        &[],
    );
    assert!(
        !ok && text.contains("--ports"),
        "ports are required: {text}"
    );
    let (ok, text) = cli(&enforcer, &["upstream", "remove", "ldap"], &[]);
    assert!(ok, "{text}");
    assert!(
        !topology::tcp_exchange(&lab.server, other_addr, OTHER_PORT, TIMEOUT).unwrap(),
        "the removed upstream is closed again"
    );

    // Egress monitor lets it out and counts what enforce would drop.
    let (ok, text) = cli(&enforcer, &["mode", "--egress", "monitor"], &[]);
    assert!(ok, "{text}");
    assert_eq!(registry_json(&registry)["egress"], "monitor");
    let would_before = enforcer.stats().unwrap().egress_would_drop("egress_denied");
    assert!(
        topology::tcp_exchange(&lab.server, other_addr, OTHER_PORT, TIMEOUT).unwrap(),
        "egress monitor drops nothing"
    );
    let stats = enforcer.stats().unwrap();
    assert!(
        stats.egress_would_drop("egress_denied") > would_before,
        "the would-be drops are counted: {}",
        stats.0
    );
    assert_eq!(stats.0["egress"]["mode"], "monitor", "{}", stats.0);

    // With ingress in monitor, an operator on an unlisted address keeps the session; a switch
    // to egress enforce would cut its answers off, and is refused without --force.
    let (ok, text) = cli(&enforcer, &["mode", "monitor"], &[]);
    assert!(ok, "{text}");
    let ssh = [("SSH_CLIENT", "192.0.2.66 50022 22")];
    let (ok, text) = cli(&enforcer, &["mode", "--egress", "enforce"], &ssh);
    assert!(!ok && text.contains("your own session"), "{text}");
    assert_eq!(
        registry_json(&registry)["egress"],
        "monitor",
        "nothing changed"
    );
    let (ok, text) = cli(&enforcer, &["mode", "--egress", "enforce", "--force"], &ssh);
    assert!(ok, "{text}");
    let status = enforcer.status().unwrap();
    assert_eq!(status["egress"], "enforce", "{status}");
    assert_eq!(status["upstreams"], 2, "{status}");
}
