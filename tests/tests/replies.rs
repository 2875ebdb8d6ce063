//! Connection state with real software: the e-Office server, in ingress enforce mode, resolves
//! a name through a DNS server (dnsmasq, queried with dig) and downloads from a TCP server, both
//! in a namespace the registry does not list; their replies pass as `established_reply`. The
//! same peer still cannot open a connection to the server, a spoofed "reply" to a port the
//! server never used is dropped, and an open connection survives a restart of the controller.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::atomic::Ordering,
    time::Duration,
};

use enforcer_tests::{
    daemon::Enforcer,
    netns::require_root,
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT, UDP_PORT},
    vpn::{Daemon, TempDir},
};

/// Only the ministry LAN is approved: the upstream (the "internet" client's namespace) is not.
/// Egress off: the replies pass by the connection table alone.
const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce", "egress": "off",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24"}]}"#;

const UPSTREAM: &str = "192.0.2.66";
const SERVER_IN_UPSTREAM_NET: &str = "192.0.2.1";
const DOWNLOAD_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
const DOWNLOAD_BYTES: usize = 1 << 20;

/// `dig @UPSTREAM NAME +short` from the server's namespace; the answer, or what went wrong.
fn dig(lab: &Lab, name: &str) -> String {
    let server = format!("@{UPSTREAM}");
    let output = lab
        .server
        .exec_status(&["dig", &server, name, "+short", "+time=2", "+tries=1"])
        .expect("dig runs (installed by `cargo xtask setup`)");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Serves `DOWNLOAD_BYTES` to every connection on `DOWNLOAD_PORT`, and echoes lines on
/// `ECHO_PORT`, in the upstream's namespace.
fn upstream_servers(lab: &Lab) -> Vec<std::thread::JoinHandle<()>> {
    let upstream = &lab.client(INTERNET.label).ns;
    let (download, echo) = upstream
        .enter(|| {
            (
                TcpListener::bind((UPSTREAM, DOWNLOAD_PORT)).expect("bind download server"),
                TcpListener::bind((UPSTREAM, ECHO_PORT)).expect("bind echo server"),
            )
        })
        .unwrap();
    let serve_download = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = download.accept() {
            let _ = stream.write_all(&vec![0x5A; DOWNLOAD_BYTES]);
        }
    });
    let serve_echo = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = echo.accept() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    vec![serve_download, serve_echo]
}

/// One line through an open connection: whether it came back.
fn echo_line(stream: &mut TcpStream) -> bool {
    let line = b"still there?\n";
    if stream.write_all(line).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if &buf[..n] == line)
}

#[test]
fn the_servers_own_connections_work_in_enforce_mode_without_opening_the_allowlist() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-replies").unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry, REGISTRY).unwrap();
    let upstream = &lab.client(INTERNET.label).ns;
    let dns = Daemon::dnsmasq(
        upstream,
        UPSTREAM,
        ("eoffice.example", "192.0.2.10"),
        dir.0.join("dnsmasq.log"),
    )
    .unwrap();
    let servers = upstream_servers(&lab);
    let mut enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = enforcer.stats().unwrap();

    // The server's DNS query is answered by the unlisted DNS server.
    let answer = dig(&lab, "eoffice.example");
    assert_eq!(
        answer,
        "192.0.2.10",
        "dig through the unlisted DNS server (dnsmasq log: {})",
        dns.log_text()
    );

    // A TCP download from the unlisted peer completes.
    let received = lab
        .server
        .enter(|| {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddr::new(UPSTREAM.parse().unwrap(), DOWNLOAD_PORT),
                Duration::from_secs(3),
            )
            .expect("the server connects to the upstream");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut data = Vec::new();
            let _ = stream.read_to_end(&mut data);
            data.len()
        })
        .unwrap();
    assert_eq!(received, DOWNLOAD_BYTES, "the whole download arrives");
    let after = enforcer.stats().unwrap();
    let replies = after.packets("established_reply") - before.packets("established_reply");
    assert!(
        replies > DOWNLOAD_BYTES as u64 / 1500,
        "the answers and the download's segments pass as replies: {replies}"
    );

    // The unlisted peer still cannot connect to the server, nor ping it.
    let blocked_before = enforcer.stats().unwrap().packets("not_allowlisted");
    assert!(
        !topology::tcp_exchange(
            upstream,
            SERVER_IN_UPSTREAM_NET.parse().unwrap(),
            TCP_PORT,
            Duration::from_millis(700)
        )
        .unwrap(),
        "the upstream must not open a connection to the server"
    );
    assert_eq!(
        topology::ping(upstream, SERVER_IN_UPSTREAM_NET.parse().unwrap(), 2).unwrap(),
        0
    );
    // A spoofed "DNS answer" from the DNS server's address and port 53 (the server has a
    // connection with that peer and port) to a port the server never used.
    drop(dns);
    let received_before = services.udp_received.load(Ordering::Relaxed);
    upstream
        .enter(|| {
            let socket = std::net::UdpSocket::bind((UPSTREAM, 53))?;
            for _ in 0..5 {
                socket.send_to(b"forged answer", (SERVER_IN_UPSTREAM_NET, UDP_PORT))?;
            }
            std::io::Result::Ok(())
        })
        .unwrap()
        .expect("send the forged answers from port 53");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        services.udp_received.load(Ordering::Relaxed),
        received_before,
        "a datagram to a port the server never used must not arrive"
    );
    let blocked = enforcer.stats().unwrap().packets("not_allowlisted") - blocked_before;
    assert!(
        blocked > 5 + 2,
        "the upstream's own connection attempts, pings and forged answers drop: {blocked}"
    );

    // An open connection survives a restart of the controller (the egress program and the
    // connection table are pinned and adopted).
    let mut stream = lab
        .server
        .enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(UPSTREAM.parse().unwrap(), ECHO_PORT),
                Duration::from_secs(3),
            )
        })
        .unwrap()
        .expect("the server connects to the echo server");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    assert!(echo_line(&mut stream), "the echo before the restart");
    enforcer.kill_hard().unwrap();
    enforcer
        .restart(&lab.server, SERVER_IFACE, &registry, &[])
        .unwrap();
    assert!(echo_line(&mut stream), "the echo after the restart");
    let status = enforcer.status().unwrap();
    assert!(
        status["connections"].as_u64().unwrap_or(0) >= 1,
        "status counts the connections: {status}"
    );
    drop(stream);
    drop(servers);
}
