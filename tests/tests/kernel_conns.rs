//! Connection state through the real programs (`BPF_PROG_TEST_RUN`): the egress program records
//! the connections the server opens, and ingress lets in exactly their replies — not a forged
//! one (another port, peer or protocol), not an expired one, and never past the deny list.

use enforcer_common::{ConnTimeouts, Reason};
use enforcer_tests::{
    kernel::{Loaded, XDP_DROP, XDP_PASS},
    packet::{self, Frame, L4},
};

const SERVER: &str = "192.0.2.1";
const SERVER6: &str = "2001:db8:bad::1";
/// An upstream the registry does not list (a DNS or directory server, say).
const UPSTREAM: &str = "192.0.2.66";
const UPSTREAM6: &str = "2001:db8:bad::66";
/// A host of the approved LAN, whose entry allows only 443/tcp.
const LAN_HOST: &str = "198.51.100.10";
/// A host in the deny list.
const DENIED_HOST: &str = "203.0.113.9";

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce",
  "networks": [{"name": "lan", "cidr": "198.51.100.0/24", "ports": ["443/tcp"]}],
  "deny": [{"cidr": "203.0.113.0/24"}]}"#;

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;

/// TC's "next program" (egress is in monitor mode here: the egress program drops nothing).
const TC_NEXT: i32 = -1;

fn tcp(src: &str, src_port: u16, dst: &str, dst_port: u16, flags: u8) -> Vec<u8> {
    packet::tcp_segment(src, src_port, dst, dst_port, flags)
}

fn udp(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Vec<u8> {
    Frame::udp_data(src, src_port, dst, dst_port, b"a query".to_vec()).build()
}

/// An ICMP (or `ICMPv6`) echo request or reply with this identifier.
fn echo(src: &str, dst: &str, reply: bool, id: u16) -> Vec<u8> {
    let v6 = src.contains(':');
    let kind = match (v6, reply) {
        (false, false) => 8,
        (false, true) => 0,
        (true, false) => 128,
        (true, true) => 129,
    };
    let mut bytes = vec![kind, 0, 0, 0];
    bytes.extend_from_slice(&id.to_be_bytes());
    bytes.extend_from_slice(&[0, 1]);
    let proto = if v6 { 58 } else { 1 };
    Frame::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::Raw { proto, bytes },
    )
    .build()
}

/// Runs an incoming frame and returns its action and the one reason whose counter moved.
fn ingress(loaded: &Loaded, frame: &[u8]) -> (u32, Reason) {
    let before = loaded.counts();
    let action = loaded.run(frame);
    let after = loaded.counts();
    let moved: Vec<Reason> = Reason::ALL
        .into_iter()
        .filter(|r| after.packets(*r) != before.packets(*r))
        .collect();
    assert_eq!(moved.len(), 1, "one counter moves per packet: {moved:?}");
    (action, moved[0])
}

fn expect(loaded: &Loaded, what: &str, frame: &[u8], reason: Reason) {
    let (action, seen) = ingress(loaded, frame);
    let want = if reason.action() == enforcer_common::Action::Pass {
        XDP_PASS
    } else {
        XDP_DROP
    };
    assert_eq!(
        (action, seen),
        (want, reason),
        "{what}: expected {} ({want}), saw {} ({action})",
        reason.label(),
        seen.label()
    );
}

fn out(loaded: &Loaded, frame: &[u8]) {
    assert_eq!(loaded.run_egress(frame), TC_NEXT, "egress never drops");
}

/// Every case, with and without the fast path.
fn each_build(check: impl Fn(&Loaded)) {
    check(&Loaded::new(REGISTRY));
    check(&Loaded::without_fast_path(REGISTRY));
}

#[test]
fn replies_to_connections_the_server_opened_pass_and_nothing_else_does() {
    each_build(|loaded| {
        // Before the server opens anything, the upstream is an unlisted source.
        expect(
            loaded,
            "a SYN-ACK nobody asked for",
            &tcp(UPSTREAM, 636, SERVER, 40_001, SYN_ACK),
            Reason::NotAllowlisted,
        );
        // The server opens a TCP connection to the upstream's port 636.
        out(loaded, &tcp(SERVER, 40_001, UPSTREAM, 636, SYN));
        expect(
            loaded,
            "the SYN-ACK",
            &tcp(UPSTREAM, 636, SERVER, 40_001, SYN_ACK),
            Reason::EstablishedReply,
        );
        expect(
            loaded,
            "data on the connection",
            &tcp(UPSTREAM, 636, SERVER, 40_001, ACK),
            Reason::EstablishedReply,
        );
        // Forged replies: another remote port, local port, peer or protocol.
        expect(
            loaded,
            "another remote port",
            &tcp(UPSTREAM, 637, SERVER, 40_001, ACK),
            Reason::NotAllowlisted,
        );
        expect(
            loaded,
            "another local port",
            &tcp(UPSTREAM, 636, SERVER, 40_002, ACK),
            Reason::NotAllowlisted,
        );
        expect(
            loaded,
            "another peer",
            &tcp("192.0.2.67", 636, SERVER, 40_001, ACK),
            Reason::NotAllowlisted,
        );
        expect(
            loaded,
            "UDP on the TCP connection's ports",
            &udp(UPSTREAM, 636, SERVER, 40_001),
            Reason::NotAllowlisted,
        );
        // The upstream still cannot open a connection to the server.
        expect(
            loaded,
            "a connection from the upstream",
            &tcp(UPSTREAM, 50_000, SERVER, 8080, SYN),
            Reason::NotAllowlisted,
        );

        // UDP: the first datagram opens the exchange (a DNS query, say).
        out(loaded, &udp(SERVER, 53_001, UPSTREAM, 53));
        expect(
            loaded,
            "the DNS answer",
            &udp(UPSTREAM, 53, SERVER, 53_001),
            Reason::EstablishedReply,
        );
        expect(
            loaded,
            "an answer to another port",
            &udp(UPSTREAM, 53, SERVER, 53_002),
            Reason::NotAllowlisted,
        );

        // ICMP echo: by identifier.
        out(loaded, &echo(SERVER, UPSTREAM, false, 0x1234));
        expect(
            loaded,
            "the echo reply",
            &echo(UPSTREAM, SERVER, true, 0x1234),
            Reason::EstablishedReply,
        );
        expect(
            loaded,
            "an echo reply with another identifier",
            &echo(UPSTREAM, SERVER, true, 0x4321),
            Reason::NotAllowlisted,
        );
        expect(
            loaded,
            "an echo request from the peer",
            &echo(UPSTREAM, SERVER, false, 0x1234),
            Reason::NotAllowlisted,
        );

        // IPv6 as IPv4.
        out(loaded, &udp(SERVER6, 53_003, UPSTREAM6, 53));
        expect(
            loaded,
            "an IPv6 DNS answer",
            &udp(UPSTREAM6, 53, SERVER6, 53_003),
            Reason::EstablishedReply,
        );
        out(loaded, &echo(SERVER6, UPSTREAM6, false, 7));
        expect(
            loaded,
            "an ICMPv6 echo reply",
            &echo(UPSTREAM6, SERVER6, true, 7),
            Reason::EstablishedReply,
        );

        // An approved LAN host answering on a port its entry does not allow (LDAPS from the
        // server's own connection) is a reply, not a port violation.
        expect(
            loaded,
            "LAN host from 636 before any connection",
            &tcp(LAN_HOST, 636, SERVER, 40_010, ACK),
            Reason::PortNotAllowed,
        );
        out(loaded, &tcp(SERVER, 40_010, LAN_HOST, 636, SYN));
        expect(
            loaded,
            "LAN host answering the server's connection",
            &tcp(LAN_HOST, 636, SERVER, 40_010, ACK),
            Reason::EstablishedReply,
        );

        // The deny list beats a reply.
        out(loaded, &tcp(SERVER, 40_020, DENIED_HOST, 443, SYN));
        expect(
            loaded,
            "a denied host answering",
            &tcp(DENIED_HOST, 443, SERVER, 40_020, SYN_ACK),
            Reason::Denied,
        );
    });
}

#[test]
fn connections_end_after_their_timeouts_and_the_sweep_frees_them() {
    let mut loaded = Loaded::new(REGISTRY);
    let short = ConnTimeouts {
        tcp_open_ns: 3_600_000_000_000,
        tcp_closing_ns: 50_000_000,
        udp_ns: 50_000_000,
        icmp_ns: 50_000_000,
    };
    loaded
        .datapath
        .set_conn_timeouts(short)
        .expect("write the timeouts");
    out(&loaded, &udp(SERVER, 53_001, UPSTREAM, 53));
    out(&loaded, &tcp(SERVER, 40_001, UPSTREAM, 389, SYN));
    out(&loaded, &tcp(SERVER, 40_002, UPSTREAM, 389, SYN));
    // The server closes one TCP connection: its replies get the short grace.
    out(&loaded, &tcp(SERVER, 40_002, UPSTREAM, 389, FIN_ACK));
    // A segment after FIN does not reopen it.
    out(&loaded, &tcp(SERVER, 40_002, UPSTREAM, 389, ACK));
    // Closing a connection the table does not have creates nothing.
    out(&loaded, &tcp(SERVER, 40_003, UPSTREAM, 389, FIN_ACK));
    assert_eq!(loaded.datapath.conn_count().unwrap(), 3);
    expect(
        &loaded,
        "the closing connection within its grace",
        &tcp(UPSTREAM, 389, SERVER, 40_002, FIN_ACK),
        Reason::EstablishedReply,
    );
    std::thread::sleep(std::time::Duration::from_millis(120));
    expect(
        &loaded,
        "a DNS answer after the UDP timeout",
        &udp(UPSTREAM, 53, SERVER, 53_001),
        Reason::NotAllowlisted,
    );
    expect(
        &loaded,
        "the closed connection after its grace",
        &tcp(UPSTREAM, 389, SERVER, 40_002, ACK),
        Reason::NotAllowlisted,
    );
    expect(
        &loaded,
        "the open TCP connection",
        &tcp(UPSTREAM, 389, SERVER, 40_001, ACK),
        Reason::EstablishedReply,
    );
    let sweep = loaded.datapath.sweep_conns().expect("sweep");
    assert_eq!((sweep.kept, sweep.expired), (1, 2), "{sweep:?}");
    assert_eq!(loaded.datapath.conn_count().unwrap(), 1);
    // A fresh connection to a swept peer is recorded and answered again.
    out(&loaded, &udp(SERVER, 53_005, UPSTREAM, 53));
    expect(
        &loaded,
        "a new DNS answer",
        &udp(UPSTREAM, 53, SERVER, 53_005),
        Reason::EstablishedReply,
    );
}

#[test]
fn a_flood_of_unlisted_sources_does_not_open_the_table() {
    // Incoming packets never create entries, whatever they are (SYNs, datagrams, echoes).
    let loaded = Loaded::new(REGISTRY);
    for i in 0..50u16 {
        let peer = format!("192.0.2.{}", 100 + i);
        expect(
            &loaded,
            "an unlisted SYN",
            &tcp(&peer, 1000 + i, SERVER, 8080, SYN),
            Reason::NotAllowlisted,
        );
        expect(
            &loaded,
            "an unlisted datagram",
            &udp(&peer, 53, SERVER, 53_001),
            Reason::NotAllowlisted,
        );
    }
    assert_eq!(loaded.datapath.conn_count().unwrap(), 0);
}

#[test]
fn the_registry_sets_the_timeouts() {
    let registry = r#"{"schema": 1, "mode": "enforce", "connections": {"udp_idle": 1}}"#;
    let loaded = Loaded::new(registry);
    assert_eq!(
        loaded.datapath.conn_timeouts().unwrap().udp_ns,
        1_000_000_000
    );
    out(&loaded, &udp(SERVER, 53_001, UPSTREAM, 53));
    expect(
        &loaded,
        "an answer within the registry's UDP timeout",
        &udp(UPSTREAM, 53, SERVER, 53_001),
        Reason::EstablishedReply,
    );
    std::thread::sleep(std::time::Duration::from_millis(1200));
    expect(
        &loaded,
        "an answer after it",
        &udp(UPSTREAM, 53, SERVER, 53_001),
        Reason::NotAllowlisted,
    );
}
