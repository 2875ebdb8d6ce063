//! The egress verdict through the real program (`BPF_PROG_TEST_RUN` of the TC program): a table
//! of crafted outgoing frames with the action, the counter and the rule each must get, the three
//! egress modes, and the kernel against the controller's reference (`Policy::decide_egress`) on
//! random registries of nested networks, deny ranges and upstreams.

use enforcer::registry::{EgressMode, Protocol};
use enforcer_common::{Action, Reason};
use enforcer_tests::{
    kernel::Loaded,
    packet::{self, Frame},
    rng::Rng,
};

const SERVER: &str = "192.0.2.1";
const SERVER6: &str = "2001:db8:1::1";

/// TC's "next program": the packet leaves.
const TC_NEXT: i32 = -1;
/// TC's "drop".
const TC_SHOT: i32 = 2;

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce", "egress": "enforce",
  "networks": [{"name": "lan", "cidr": "198.51.100.0/24", "ports": ["443/tcp"]},
               {"name": "lan6", "cidr": "2001:db8:100::/64"}],
  "devices": [{"name": "laptop", "address": "192.0.2.17"}],
  "deny": [{"name": "bad", "cidr": "198.51.100.128/25"}],
  "vpn_endpoints": [{"name": "nitb-wg", "address": "192.0.2.7", "protocol": "wireguard",
                     "approval": "NITB-2026-0042"}],
  "upstreams": [
    {"name": "ntp-pool", "cidr": "10.1.0.0/16", "ports": ["123/udp"]},
    {"name": "dns", "address": "10.1.2.3", "ports": ["53/udp", "53/tcp", "icmp"]},
    {"name": "ldap", "address": "10.1.2.3", "ports": ["636/tcp"]},
    {"name": "mirror6", "cidr": "2001:db8:50::/48", "ports": ["443/tcp"]},
    {"name": "inside-deny", "address": "198.51.100.200", "ports": ["53/udp"]}
  ]}"#;

fn from_server(dst: &str) -> &'static str {
    if dst.contains(':') { SERVER6 } else { SERVER }
}

fn tcp(dst: &str, port: u16) -> Frame {
    Frame::tcp(from_server(dst), dst, port)
}

fn udp(dst: &str, port: u16) -> Frame {
    Frame::udp(from_server(dst), dst, port)
}

fn echo(dst: &str) -> Frame {
    Frame::echo(from_server(dst), dst)
}

/// A `WireGuard` handshake initiation from the server to `dst:port`.
fn wireguard_init(dst: &str, port: u16) -> Vec<u8> {
    let mut init = vec![1, 0, 0, 0, 0x11, 0x22, 0x33, 0x44];
    init.resize(148, 0x5C);
    Frame::udp_data(from_server(dst), 51_820, dst, port, init).build()
}

/// Runs each (what, frame, reason, rule) through the egress program in `mode`; returns every
/// row whose action, counter or credited rule is not what the mode makes of its reason.
fn failures(
    loaded: &Loaded,
    mode: EgressMode,
    cases: &[(&str, Vec<u8>, Reason, Option<&str>)],
) -> Vec<String> {
    let mut failures = Vec::new();
    for (what, frame, reason, rule) in cases {
        let (before, hits_before) = (loaded.egress_counts(), loaded.egress_hits());
        let action = loaded.run_egress(frame);
        let (after, hits_after) = (loaded.egress_counts(), loaded.egress_hits());
        let drop = reason.action() == Action::Drop;
        let expected = if drop && mode == EgressMode::Enforce {
            TC_SHOT
        } else {
            TC_NEXT
        };
        let mut problems = Vec::new();
        if action != expected {
            problems.push(format!("action {action}, expected {expected}"));
        }
        for r in Reason::ALL {
            let enforced = after.packets(r) - before.packets(r);
            let monitored = after.would_drop(r) - before.would_drop(r);
            let counted = mode != EgressMode::Off && r == *reason;
            let want_monitored = u64::from(counted && drop && mode == EgressMode::Monitor);
            let want_enforced = u64::from(counted) - want_monitored;
            if (enforced, monitored) != (want_enforced, want_monitored) {
                problems.push(format!(
                    "counter {}: +{enforced}/+{monitored} would-drop, expected +{want_enforced}/+{want_monitored}",
                    r.label()
                ));
            }
        }
        let credited: Vec<&str> = (0..hits_after.len())
            .filter(|&i| hits_after[i] != hits_before[i])
            .map(|i| &*loaded.policy.rules[i].name)
            .collect();
        let want: Vec<&str> = rule
            .filter(|_| mode != EgressMode::Off)
            .into_iter()
            .collect();
        if credited != want {
            problems.push(format!("rules credited {credited:?}, expected {want:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{what} ({}, egress {mode}): {}",
                reason.label(),
                problems.join("; ")
            ));
        }
    }
    failures
}

fn table() -> Vec<(&'static str, Vec<u8>, Reason, Option<&'static str>)> {
    use Reason::{
        Allowed, ApprovedVpn, Denied, EgressDenied, FragmentUnverified, LinkControl, Malformed,
        NonIp, UnapprovedVpn, Upstream,
    };
    vec![
        (
            "a WireGuard handshake to the approved endpoint",
            wireguard_init("192.0.2.7", 51_820),
            ApprovedVpn,
            Some("nitb-wg"),
        ),
        (
            "a WireGuard handshake to an upstream, on a port the upstream lists",
            wireguard_init("10.1.2.3", 53),
            UnapprovedVpn,
            None,
        ),
        (
            "a WireGuard handshake to an approved network",
            wireguard_init("198.51.100.10", 51_820),
            UnapprovedVpn,
            None,
        ),
        (
            "a WireGuard handshake to a denied range: the deny list first",
            wireguard_init("198.51.100.130", 51_820),
            Denied,
            Some("bad"),
        ),
        (
            "to an approved network, a port it does not list (answers go to client ports)",
            tcp("198.51.100.10", 51_000).build(),
            Allowed,
            Some("lan"),
        ),
        (
            "to an approved device",
            udp("192.0.2.17", 9).build(),
            Allowed,
            Some("laptop"),
        ),
        (
            "to an approved IPv6 network",
            tcp("2001:db8:100::5", 51_000).build(),
            Allowed,
            Some("lan6"),
        ),
        (
            "to a denied range inside the approved network",
            tcp("198.51.100.130", 443).build(),
            Denied,
            Some("bad"),
        ),
        (
            "to an upstream inside a denied range: the deny list wins",
            udp("198.51.100.200", 53).build(),
            Denied,
            Some("bad"),
        ),
        (
            "DNS over UDP to the upstream",
            udp("10.1.2.3", 53).build(),
            Upstream,
            Some("dns"),
        ),
        (
            "LDAPS to the same address, another upstream entry",
            tcp("10.1.2.3", 636).build(),
            Upstream,
            Some("ldap"),
        ),
        (
            "NTP to the /32: the wider upstream lists it",
            udp("10.1.2.3", 123).build(),
            Upstream,
            Some("ntp-pool"),
        ),
        (
            "NTP elsewhere in the /16",
            udp("10.1.77.1", 123).build(),
            Upstream,
            Some("ntp-pool"),
        ),
        (
            "DNS elsewhere in the /16: only the /32 lists it",
            udp("10.1.77.1", 53).build(),
            EgressDenied,
            None,
        ),
        (
            "a port no upstream lists",
            tcp("10.1.2.3", 22).build(),
            EgressDenied,
            None,
        ),
        (
            "ICMP echo to the upstream that lists icmp",
            echo("10.1.2.3").build(),
            Upstream,
            Some("dns"),
        ),
        (
            "ICMP echo to an upstream that does not",
            echo("10.1.77.1").build(),
            EgressDenied,
            None,
        ),
        (
            "IPv6 upstream on its port",
            tcp("2001:db8:50::443", 443).build(),
            Upstream,
            Some("mirror6"),
        ),
        (
            "IPv6 upstream on another port",
            tcp("2001:db8:50::443", 80).build(),
            EgressDenied,
            None,
        ),
        (
            "the public internet",
            tcp("203.0.113.80", 443).build(),
            EgressDenied,
            None,
        ),
        (
            "the public internet over IPv6",
            udp("2001:db8:999::1", 443).build(),
            EgressDenied,
            None,
        ),
        (
            "first fragment of a DNS answer-sized query to the upstream",
            udp("10.1.2.3", 53)
                .payload(1400)
                .fragment(0, true, 77)
                .build(),
            Upstream,
            Some("dns"),
        ),
        (
            "its later fragment",
            Frame::new(
                SERVER.parse().unwrap(),
                "10.1.2.3".parse().unwrap(),
                packet::L4::Raw {
                    proto: packet::UDP,
                    bytes: vec![0; 64],
                },
            )
            .fragment(185, false, 77)
            .build(),
            Upstream,
            None,
        ),
        (
            "a later fragment whose first never left",
            Frame::new(
                SERVER.parse().unwrap(),
                "10.1.2.3".parse().unwrap(),
                packet::L4::Raw {
                    proto: packet::UDP,
                    bytes: vec![0; 64],
                },
            )
            .fragment(185, false, 78)
            .build(),
            FragmentUnverified,
            None,
        ),
        (
            "a VLAN-tagged frame to the internet",
            tcp("203.0.113.80", 443)
                .vlan(packet::ETH_P_8021Q, 7)
                .build(),
            EgressDenied,
            None,
        ),
        ("ARP", packet::arp_request(), LinkControl, None),
        ("another EtherType", packet::non_ip_frame(), NonIp, None),
        (
            // (A frame cut inside the IP header never reaches TC: the kernel needs that header.)
            "a TCP header cut short",
            tcp("203.0.113.80", 443).build()[..44].to_vec(),
            Malformed,
            None,
        ),
    ]
}

#[test]
fn outgoing_frames_get_the_verdict_counter_and_rule_of_the_egress_policy() {
    let mut loaded = Loaded::new(REGISTRY);
    let mut all = Vec::new();
    for mode in [EgressMode::Enforce, EgressMode::Monitor, EgressMode::Off] {
        loaded.set_egress(mode);
        // Fragments are remembered per datagram: each mode gets its own identifiers.
        let cases = table();
        let cases: Vec<_> = if mode == EgressMode::Enforce {
            cases
        } else {
            // The remembered first fragment would let the later one pass in every mode; drop
            // the fragment rows after the first mode.
            cases
                .into_iter()
                .filter(|(what, ..)| !what.contains("fragment"))
                .collect()
        };
        all.extend(failures(&loaded, mode, &cases));
    }
    assert!(
        all.is_empty(),
        "{} rows failed:\n{}",
        all.len(),
        all.join("\n")
    );
}

/// A random registry: networks and deny ranges (nested in `10.0.0.0/8` and `2001:db8::/32`)
/// and upstreams among them, each listing one or two of four ports and sometimes ICMP.
fn random_registry(rng: &mut Rng) -> (String, Vec<ipnet::IpNet>) {
    let mut seen = std::collections::HashSet::new();
    let (mut networks, mut deny, mut upstreams) = (Vec::new(), Vec::new(), Vec::new());
    let mut prefixes = Vec::new();
    let mut per_upstream_prefix = std::collections::HashMap::new();
    for i in 0..120 {
        let net = random_prefix(rng);
        prefixes.push(net);
        match rng.next_u64() % 5 {
            0 if seen.insert((0, net)) => {
                deny.push(format!(r#"{{"name": "d{i}", "cidr": "{net}"}}"#));
            }
            1 | 2 if seen.insert((1, net)) => {
                networks.push(format!(r#"{{"name": "n{i}", "cidr": "{net}"}}"#));
            }
            _ => {
                // At most 8 upstreams may cover one address: keep the nesting shallow.
                let covering = per_upstream_prefix
                    .keys()
                    .filter(|p: &&ipnet::IpNet| p.contains(&net) || net.contains(*p))
                    .count();
                if covering >= 3 {
                    continue;
                }
                *per_upstream_prefix.entry(net).or_insert(0) += 1;
                let port = 1 + rng.next_u64() % 4;
                let other = 1 + rng.next_u64() % 4;
                let icmp = if rng.next_u64().is_multiple_of(3) {
                    r#", "icmp""#
                } else {
                    ""
                };
                upstreams.push(format!(
                    r#"{{"name": "u{i}", "cidr": "{net}", "ports": ["{port}/tcp", "{other}/udp"{icmp}]}}"#
                ));
            }
        }
    }
    let text = format!(
        r#"{{"schema": 1, "mode": "enforce", "egress": "enforce", "networks": [{}], "deny": [{}], "upstreams": [{}]}}"#,
        networks.join(","),
        deny.join(","),
        upstreams.join(",")
    );
    (text, prefixes)
}

fn random_prefix(rng: &mut Rng) -> ipnet::IpNet {
    if rng.next_u64().is_multiple_of(3) {
        let len = [16, 24, 32, 40, 48, 56, 64, 128][usize::try_from(rng.next_u64() % 8).unwrap()];
        let addr = (0x2001_0db8_u128 << 96)
            | u128::from(rng.next_u64() % 4) << 80
            | u128::from(rng.next_u64() % 4) << 64
            | u128::from(rng.next_u64() % 4);
        ipnet::Ipv6Net::new(addr.into(), len)
            .unwrap()
            .trunc()
            .into()
    } else {
        let len = 8 + rng.next_u64() % 25;
        let addr = u32::try_from(rng.next_u64() & 0x0F0F_FFFF | 0x0A00_0000).unwrap();
        ipnet::Ipv4Net::new(addr.into(), u8::try_from(len).unwrap())
            .unwrap()
            .trunc()
            .into()
    }
}

#[test]
fn the_egress_verdict_agrees_with_the_reference_on_random_registries() {
    // Each round after the first replaces the whole registry live (a reload's diff, upstream
    // groups rewritten in place).
    let mut rng = Rng(0x0E6E_5500_D1FF_0003);
    let mut loaded: Option<Loaded> = None;
    for round in 0..4 {
        let (text, prefixes) = random_registry(&mut rng);
        let loaded = match &mut loaded {
            None => loaded.insert(Loaded::new(&text)),
            Some(current) => {
                current.replace(&text);
                current
            }
        };
        let mut mismatches = Vec::new();
        for _ in 0..600 {
            let near = prefixes[usize::try_from(rng.next_u64()).unwrap() % prefixes.len()];
            let addr = rng.address_near(&near);
            let port = u16::try_from(1 + rng.next_u64() % 4).unwrap();
            let (protocol, frame) = match rng.next_u64() % 3 {
                0 => (Protocol::Tcp, tcp(&addr.to_string(), port)),
                1 => (Protocol::Udp, udp(&addr.to_string(), port)),
                _ => (Protocol::Icmp, echo(&addr.to_string())),
            };
            let port = (protocol != Protocol::Icmp).then_some(port);
            let expected = loaded.policy.decide_egress(addr, protocol, port, None);
            let (before, hits_before) = (loaded.egress_counts(), loaded.egress_hits());
            let action = loaded.run_egress(&frame.build());
            let (after, hits_after) = (loaded.egress_counts(), loaded.egress_hits());
            let moved: Vec<Reason> = Reason::ALL
                .into_iter()
                .filter(|r| after.packets(*r) != before.packets(*r))
                .collect();
            let credited: Vec<u32> = (0..hits_after.len())
                .filter(|&i| hits_after[i] != hits_before[i])
                .map(|i| loaded.policy.rules[i].index)
                .collect();
            let want_rule: Vec<u32> = expected.rule.map(|r| r.index).into_iter().collect();
            let want_action = if expected.reason.action() == Action::Drop {
                TC_SHOT
            } else {
                TC_NEXT
            };
            if moved != [expected.reason] || credited != want_rule || action != want_action {
                mismatches.push(format!(
                    "{addr} {protocol:?}/{port:?}: kernel {moved:?} rules {credited:?} action {action}, reference {expected}"
                ));
            }
        }
        assert!(
            mismatches.is_empty(),
            "round {round}: {} mismatches:\n{}",
            mismatches.len(),
            mismatches.join("\n")
        );
    }
}

/// The one reason whose ingress counter an incoming frame moves.
fn ingress_reason(loaded: &Loaded, frame: &[u8]) -> Reason {
    let before = loaded.counts();
    loaded.run(frame);
    let after = loaded.counts();
    let moved: Vec<Reason> = Reason::ALL
        .into_iter()
        .filter(|r| after.packets(*r) != before.packets(*r))
        .collect();
    assert_eq!(moved.len(), 1, "one counter per packet: {moved:?}");
    moved[0]
}

#[test]
fn only_connections_the_egress_verdict_lets_out_admit_replies() {
    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    let mut loaded = Loaded::new(REGISTRY);
    // Enforce: a SYN to the internet drops, and records nothing; its "reply" is not let in.
    let syn = packet::tcp_segment(SERVER, 40_001, "203.0.113.80", 443, SYN);
    assert_eq!(loaded.run_egress(&syn), TC_SHOT);
    let reply = packet::tcp_segment("203.0.113.80", 443, SERVER, 40_001, SYN_ACK);
    assert_eq!(ingress_reason(&loaded, &reply), Reason::NotAllowlisted);
    // A SYN to an upstream on its port leaves and its reply passes.
    let syn = packet::tcp_segment(SERVER, 40_002, "10.1.2.3", 636, SYN);
    assert_eq!(loaded.run_egress(&syn), TC_NEXT);
    let reply = packet::tcp_segment("10.1.2.3", 636, SERVER, 40_002, SYN_ACK);
    assert_eq!(ingress_reason(&loaded, &reply), Reason::EstablishedReply);
    // Monitor: the denied SYN leaves, and so its connection admits replies.
    loaded.set_egress(EgressMode::Monitor);
    let syn = packet::tcp_segment(SERVER, 40_003, "203.0.113.80", 443, SYN);
    assert_eq!(loaded.run_egress(&syn), TC_NEXT);
    let reply = packet::tcp_segment("203.0.113.80", 443, SERVER, 40_003, SYN_ACK);
    assert_eq!(ingress_reason(&loaded, &reply), Reason::EstablishedReply);
}
