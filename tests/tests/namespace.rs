//! Real traffic through real namespaces: the `enforcer` binary on the server's NIC, TCP, UDP and
//! ICMP (IPv4 and IPv6) from client namespaces, and the counters read back with
//! `enforcer stats --json` must match what was sent. Needs root.

use std::{path::PathBuf, sync::atomic::Ordering, time::Duration};

use enforcer_tests::{
    daemon::{Enforcer, Stats},
    netns::require_root,
    topology::{
        self, Client, DCS_LAPTOP, DENIED, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services,
        TCP_PORT, UDP_PORT,
    },
};

const TIMEOUT: Duration = Duration::from_millis(700);
const DATAGRAMS: u32 = 25;

fn demo_registry() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-registry.json")
}

/// Sends `DATAGRAMS` UDP datagrams and returns (datagrams the server received, stats after).
fn send_udp(
    enforcer: &Enforcer,
    services: &Services,
    client: &Client,
    v6: bool,
    port: u16,
) -> (u64, Stats, Stats) {
    // Let the stragglers of earlier exchanges (a TCP teardown's last ACK) land before the
    // window opens: the counters are compared exactly.
    std::thread::sleep(Duration::from_millis(300));
    let before = enforcer.stats().unwrap();
    let received_before = services.udp_received.load(Ordering::Relaxed);
    let server = if v6 {
        client.server_v6
    } else {
        client.server_v4
    };
    topology::udp_send(&client.ns, server, port, DATAGRAMS).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let received = services.udp_received.load(Ordering::Relaxed) - received_before;
    (received, before, enforcer.stats().unwrap())
}

fn delta(before: &Stats, after: &Stats, reason: &str) -> u64 {
    after.packets(reason) - before.packets(reason)
}

fn rule_delta(before: &Stats, after: &Stats, rule: &str) -> u64 {
    after.rule_hits(rule) - before.rule_hits(rule)
}

#[test]
fn enforce_mode_with_real_traffic() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET, DCS_LAPTOP, DENIED]).unwrap();
    let services = Services::start(&lab.server).unwrap();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &demo_registry(), &[]).unwrap();
    let lan = lab.client(MINISTRY_LAN.label);
    let internet = lab.client(INTERNET.label);
    let laptop = lab.client(DCS_LAPTOP.label);
    let denied = lab.client(DENIED.label);

    // TCP, v4 and v6
    assert!(
        topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "approved LAN TCP v4 must be delivered"
    );
    assert!(
        topology::tcp_exchange(&lan.ns, lan.server_v6, TCP_PORT, TIMEOUT).unwrap(),
        "approved LAN TCP v6 must be delivered"
    );
    assert!(
        topology::tcp_exchange(&laptop.ns, laptop.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "approved device TCP must be delivered"
    );
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "internet TCP v4 must be dropped"
    );
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v6, TCP_PORT, TIMEOUT).unwrap(),
        "internet TCP v6 must be dropped"
    );
    assert!(
        !topology::tcp_exchange(&laptop.ns, laptop.server_v6, TCP_PORT, TIMEOUT).unwrap(),
        "the device's other (v6) address is not approved"
    );
    assert!(
        !topology::tcp_exchange(&denied.ns, denied.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "denied TCP must be dropped"
    );

    // UDP: exact counts
    let (received, before, after) = send_udp(&enforcer, &services, lan, false, UDP_PORT);
    assert_eq!(received, u64::from(DATAGRAMS), "approved UDP v4 delivered");
    assert_eq!(
        delta(&before, &after, "allowed"),
        u64::from(DATAGRAMS),
        "allowed counter = datagrams sent"
    );
    assert_eq!(
        rule_delta(&before, &after, "ministry-lan"),
        u64::from(DATAGRAMS)
    );

    let (received, before, after) = send_udp(&enforcer, &services, lan, true, UDP_PORT);
    assert_eq!(received, u64::from(DATAGRAMS), "approved UDP v6 delivered");
    assert_eq!(
        rule_delta(&before, &after, "ministry-lan-v6"),
        u64::from(DATAGRAMS)
    );

    let (received, before, after) = send_udp(&enforcer, &services, lan, false, 9999);
    assert_eq!(received, 0);
    assert_eq!(
        delta(&before, &after, "port_not_allowed"),
        u64::from(DATAGRAMS),
        "UDP to a port the LAN may not use"
    );

    let (received, before, after) = send_udp(&enforcer, &services, internet, false, UDP_PORT);
    assert_eq!(received, 0, "internet UDP v4 must be dropped");
    assert_eq!(
        delta(&before, &after, "not_allowlisted"),
        u64::from(DATAGRAMS)
    );
    assert_eq!(delta(&before, &after, "allowed"), 0);

    let (received, before, after) = send_udp(&enforcer, &services, internet, true, UDP_PORT);
    assert_eq!(received, 0, "internet UDP v6 must be dropped");
    assert_eq!(
        delta(&before, &after, "not_allowlisted"),
        u64::from(DATAGRAMS)
    );

    let (received, before, after) = send_udp(&enforcer, &services, denied, false, UDP_PORT);
    assert_eq!(received, 0, "denied UDP must be dropped");
    assert_eq!(delta(&before, &after, "denied"), u64::from(DATAGRAMS));
    assert_eq!(
        rule_delta(&before, &after, "vpn-provider-range"),
        u64::from(DATAGRAMS)
    );

    let (received, before, after) = send_udp(&enforcer, &services, laptop, false, UDP_PORT);
    assert_eq!(received, u64::from(DATAGRAMS), "device UDP delivered");
    assert_eq!(
        rule_delta(&before, &after, "dcs-laptop"),
        u64::from(DATAGRAMS)
    );

    // ICMP echo, v4 and v6: requests counted, replies only where approved
    let before = enforcer.stats().unwrap();
    assert_eq!(
        topology::ping(&lan.ns, lan.server_v4, 3).unwrap(),
        3,
        "approved ping v4"
    );
    assert_eq!(
        topology::ping(&lan.ns, lan.server_v6, 3).unwrap(),
        3,
        "approved ping v6"
    );
    let after = enforcer.stats().unwrap();
    assert_eq!(rule_delta(&before, &after, "ministry-lan"), 3);
    assert_eq!(rule_delta(&before, &after, "ministry-lan-v6"), 3);
    let before = enforcer.stats().unwrap();
    assert_eq!(
        topology::ping(&internet.ns, internet.server_v4, 3).unwrap(),
        0,
        "internet ping v4 dropped"
    );
    assert_eq!(
        topology::ping(&internet.ns, internet.server_v6, 3).unwrap(),
        0,
        "internet ping v6 dropped"
    );
    let after = enforcer.stats().unwrap();
    assert_eq!(
        delta(&before, &after, "not_allowlisted"),
        6,
        "6 echo requests counted as not allowlisted"
    );
}

/// Datagrams larger than the MTU arrive as IP fragments; the LAN's port restriction applies to
/// the first fragment and the rest follow it. An unapproved source's fragments never pass.
#[test]
fn fragmented_datagrams_follow_their_first_fragment() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let services = Services::start(&lab.server).unwrap();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &demo_registry(), &[]).unwrap();
    let big = |client: &Client, server: std::net::IpAddr, count: u32| {
        client
            .ns
            .enter(|| {
                let socket = std::net::UdpSocket::bind(if server.is_ipv6() {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                })
                .unwrap();
                for _ in 0..count {
                    socket.send_to(&[0x5A; 4000], (server, UDP_PORT)).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    };
    let lan = lab.client(MINISTRY_LAN.label);
    let internet = lab.client(INTERNET.label);
    for server in [lan.server_v4, lan.server_v6] {
        let before_stats = enforcer.stats().unwrap();
        let before = services.udp_received.load(Ordering::Relaxed);
        big(lan, server, 10);
        assert_eq!(
            services.udp_received.load(Ordering::Relaxed) - before,
            10,
            "10 fragmented datagrams to {server} reassembled"
        );
        let after_stats = enforcer.stats().unwrap();
        assert_eq!(
            delta(&before_stats, &after_stats, "allowed"),
            30,
            "3 fragments each, all allowed"
        );
        assert_eq!(delta(&before_stats, &after_stats, "fragment_unverified"), 0);
    }
    let before_stats = enforcer.stats().unwrap();
    let before = services.udp_received.load(Ordering::Relaxed);
    big(internet, internet.server_v4, 10);
    assert_eq!(services.udp_received.load(Ordering::Relaxed) - before, 0);
    let after_stats = enforcer.stats().unwrap();
    assert_eq!(delta(&before_stats, &after_stats, "not_allowlisted"), 30);
}

#[test]
fn monitor_mode_passes_everything_and_counts_would_drops() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET, DENIED]).unwrap();
    let services = Services::start(&lab.server).unwrap();
    let enforcer = Enforcer::start(
        &lab.server,
        SERVER_IFACE,
        &demo_registry(),
        &["--mode", "monitor"],
    )
    .unwrap();
    let internet = lab.client(INTERNET.label);
    let denied = lab.client(DENIED.label);
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, TIMEOUT).unwrap(),
        "monitor mode delivers unapproved TCP"
    );
    assert!(
        topology::tcp_exchange(&internet.ns, internet.server_v6, TCP_PORT, TIMEOUT).unwrap(),
        "monitor mode delivers unapproved TCP v6"
    );
    assert_eq!(
        topology::ping(&denied.ns, denied.server_v4, 2).unwrap(),
        2,
        "monitor mode delivers denied ping"
    );

    let (received, before, after) = send_udp(&enforcer, &services, internet, false, UDP_PORT);
    assert_eq!(
        received,
        u64::from(DATAGRAMS),
        "monitor mode delivers unapproved UDP"
    );
    assert_eq!(
        after.would_drop("not_allowlisted") - before.would_drop("not_allowlisted"),
        u64::from(DATAGRAMS)
    );
    assert_eq!(
        delta(&before, &after, "not_allowlisted"),
        0,
        "nothing actually dropped"
    );

    let (received, before, after) = send_udp(&enforcer, &services, denied, false, UDP_PORT);
    assert_eq!(received, u64::from(DATAGRAMS));
    assert_eq!(
        after.would_drop("denied") - before.would_drop("denied"),
        u64::from(DATAGRAMS)
    );
    assert_eq!(after.0["mode"], "monitor");
}

/// Two labs whose servers both call their NIC eth0: two enforcers side by side, each with its own
/// pinned maps and counters; stopping one leaves the other enforcing.
#[test]
fn enforcers_on_same_named_interfaces_in_different_namespaces() {
    require_root();
    let lab_a = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let lab_b = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let services_a = Services::start(&lab_a.server).unwrap();
    let services_b = Services::start(&lab_b.server).unwrap();
    let mut enforcer_a =
        Enforcer::start(&lab_a.server, SERVER_IFACE, &demo_registry(), &[]).unwrap();
    let enforcer_b = Enforcer::start(&lab_b.server, SERVER_IFACE, &demo_registry(), &[]).unwrap();
    assert_ne!(enforcer_a.instance, enforcer_b.instance);

    let (received, before_b, after_b) = send_udp(
        &enforcer_b,
        &services_b,
        lab_b.client(INTERNET.label),
        false,
        UDP_PORT,
    );
    assert_eq!(received, 0);
    assert_eq!(
        delta(&before_b, &after_b, "not_allowlisted"),
        u64::from(DATAGRAMS)
    );
    let a = enforcer_a.stats().unwrap();
    assert_eq!(
        a.packets("not_allowlisted"),
        0,
        "lab B's drops must not show in lab A's counters"
    );

    let log = enforcer_a.stop().unwrap();
    assert!(
        log.contains("detached"),
        "enforcer A logs its detach:\n{log}"
    );
    let pins = std::path::Path::new(enforcer::instance::PIN_ROOT).join(&enforcer_a.instance);
    assert!(
        !pins.exists(),
        "enforcer A removed its pins at {}",
        pins.display()
    );
    let link = lab_a
        .server
        .exec(&["ip", "link", "show", SERVER_IFACE])
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP detached from lab A's eth0"
    );
    let before = services_a.udp_received.load(Ordering::Relaxed);
    topology::udp_send(
        &lab_a.client(INTERNET.label).ns,
        lab_a.client(INTERNET.label).server_v4,
        UDP_PORT,
        5,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        services_a.udp_received.load(Ordering::Relaxed) - before,
        5,
        "lab A is unprotected once its enforcer stopped"
    );

    let (received, _, _) = send_udp(
        &enforcer_b,
        &services_b,
        lab_b.client(INTERNET.label),
        false,
        UDP_PORT,
    );
    assert_eq!(received, 0, "lab B still enforcing");
}
