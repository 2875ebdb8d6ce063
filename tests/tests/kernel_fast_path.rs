//! The fast path (`enforcer-ebpf/src/fast.rs`) decides only where the full path would decide the
//! same: the program with it and the program without it (a load-time switch) get the same random
//! frames, and after every frame their actions, verdict counters, VPN counters and rule hits
//! must be equal. The frames are built to reach every way out of the fast path: sources with no
//! entry in their /16, allowed and denied sources (at /16 or shorter, and longer), deny feeds,
//! approved VPN endpoints, payloads that start like a VPN signature or carry one, the port gates,
//! VLAN tags, IPv4 options, fragments, DF, IPv6 (unlisted, allowed and denied sources, /48 and
//! /128), and headers cut or corrupted at random.

use enforcer::registry::Mode;
use enforcer_tests::{
    kernel::Loaded,
    packet::{Frame, L4},
    rng::Rng,
    vpn::TempDir,
};

/// Networks at /16 or shorter (decided by the root table) and longer (a block), a device, deny
/// ranges at both levels, a deny feed, and approved VPN endpoints without a port (a port would
/// switch the fast path off: see `with_a_port_endpoint`).
fn registry(feed: &std::path::Path, endpoint_port: &str) -> String {
    format!(
        r#"{{
  "schema": 1, "mode": "enforce",
  "networks": [
    {{"name": "lan", "cidr": "198.51.100.0/24", "ports": ["443/tcp", "5353/udp", "icmp"]}},
    {{"name": "wan", "cidr": "10.0.0.0/8"}},
    {{"name": "lan6", "cidr": "2001:db8:100::/64"}}
  ],
  "devices": [{{"name": "laptop", "address": "192.0.2.17"}}, {{"name": "laptop6", "address": "2001:db8:7::7"}}],
  "vpn_endpoints": [
    {{"name": "wg-gw", "address": "192.0.2.7", "protocol": "wireguard"{endpoint_port}, "approval": "NITB-1"}},
    {{"name": "ovpn-gw", "address": "192.0.2.8", "protocol": "openvpn", "approval": "NITB-2"}}
  ],
  "deny": [
    {{"name": "provider", "cidr": "203.0.113.0/24"}},
    {{"name": "private", "cidr": "172.16.0.0/12"}},
    {{"name": "provider6", "cidr": "2001:db8:dead::/48"}},
    {{"name": "host6", "cidr": "2001:db8:7::66/128"}}
  ],
  "deny_files": ["{}"]
}}"#,
        feed.display()
    )
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[usize::try_from(rng.next_u64() % items.len() as u64).unwrap()]
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// A payload: random, zero, or the head of a signature (or of a look-alike) with random bytes
/// after it. `resets` allows `OpenVPN` hard resets, which switch the flow lookup on for good.
fn payload(rng: &mut Rng, resets: bool) -> Vec<u8> {
    let len = usize::try_from(rng.next_u64() % 200).unwrap();
    let mut data = random_bytes(rng, len);
    let heads: &[&[u8]] = &[
        &[],
        &[0; 64],
        &[1, 0, 0, 0],
        &[4, 0, 0, 0, 0xAA, 0xBB, 0xCC, 0xDD, 7, 0, 0, 0, 0, 0, 0, 0],
        &[22, 1, 0],
        &[23, 0xFE, 0xFD],
        b"IP=198.51.100.9,PORT=4500",
        &[b'H', b'e', 1, 0, 0, 0, 0, 0],
        b"TS\xF0\x9F\x92\xAC",
        &[0xC1, 0, 0, 0],
        &[0xCC, 0x1C, 0x30, 0x41, 0x5B, 0xA4, 0x38, 0x66],
        &[0, 0x9C, 0, 1, 0x1A, 0x2B, 0x3C, 0x4D, 0, 1, 0, 0],
        &[0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0],
    ];
    let head = *pick(rng, heads);
    if head.first() == Some(&0x38) && !resets {
        return data;
    }
    if data.len() < head.len() {
        data.resize(head.len(), 0);
    }
    data[..head.len()].copy_from_slice(head);
    if rng.next_u64().is_multiple_of(4) && data.len() >= 28 {
        // An IKE version byte, or a ZeroTier verb, where the deeper checks look.
        data[17] = *pick(rng, &[0x10, 0x20, 0x21]);
        if data.len() >= 111 {
            data[27] = *pick(rng, &[1, 0x21, 2]);
        }
    }
    data
}

fn random_frame(rng: &mut Rng, resets: bool) -> Vec<u8> {
    let sources = [
        format!("198.18.{}.{}", rng.next_u64() % 256, rng.next_u64() % 256),
        format!("198.51.100.{}", rng.next_u64() % 256),
        format!("198.51.{}.1", rng.next_u64() % 256),
        format!("10.{}.{}.1", rng.next_u64() % 256, rng.next_u64() % 256),
        "192.0.2.17".into(),
        format!("192.0.2.{}", rng.next_u64() % 16),
        format!("203.0.113.{}", rng.next_u64() % 256),
        format!("172.{}.0.9", 12 + rng.next_u64() % 8),
        format!("100.{}.0.1", 60 + rng.next_u64() % 8),
        format!("2001:db8:{:x}::1", rng.next_u64() % 0x200),
        format!("2001:db8:dead:{:x}::1", rng.next_u64() % 0x10000),
        format!("2001:db8:7::{:x}", 0x60 + rng.next_u64() % 0x20),
    ];
    let src = pick(rng, &sources).clone();
    let v6 = src.contains(':');
    let dst = if v6 {
        "2001:db8:100::1"
    } else {
        *pick(rng, &["198.51.100.1", "192.0.2.7", "192.0.2.8"])
    };
    let ports = [4500, 1701, 2408, 1194, 51820, 443, 5353, 53, 40_000];
    let mut port = || {
        if rng.next_u64().is_multiple_of(2) {
            *pick(rng, &ports)
        } else {
            u16::try_from(1 + rng.next_u64() % 65_535).unwrap()
        }
    };
    let (src_port, dst_port) = (port(), port());
    let data = payload(rng, resets);
    let l4 = match rng.next_u64() % 10 {
        0..=4 => L4::UdpData {
            src_port,
            dst_port,
            data,
        },
        5..=7 => L4::TcpData {
            src_port,
            dst_port,
            data,
        },
        8 => L4::Tcp { dst_port },
        _ => L4::Echo,
    };
    let mut frame = Frame::new(src.parse().unwrap(), dst.parse().unwrap(), l4);
    match rng.next_u64() % 16 {
        0 => frame = frame.vlan(0x8100, 7),
        1 if !v6 => frame = frame.ipv4_options(4 * (1 + rng.next_u64() % 10) as usize),
        2 => frame = frame.fragment(0, true, 77),
        3 => frame = frame.fragment(1 + (rng.next_u64() % 4) as u16, false, 77),
        _ => {}
    }
    let mut bytes = frame.build();
    match rng.next_u64() % 8 {
        // IPv4 flags and offset rewritten on a whole datagram: DF, MF, the reserved bit, or an
        // offset (a TCP segment at offset 8 bytes is malformed, whatever its header says).
        0 if !v6 && bytes[12..14] == [8, 0] => {
            let flags: [u8; 2] = *pick(rng, &[[0x40, 0], [0x20, 0], [0x80, 0], [0, 1], [0x40, 1]]);
            bytes[20..22].copy_from_slice(&flags);
        }
        // A header byte corrupted (lengths, IHL, version, data offset, ...).
        1 => {
            let at = 12 + usize::try_from(rng.next_u64() % 50).unwrap();
            if at < bytes.len() {
                bytes[at] = rng.next_u64() as u8;
            }
        }
        // An IPv6 header's version, payload length or next header corrupted (what the IPv6 fast
        // path checks).
        4 if v6 && bytes.len() > 20 => {
            let at = *pick(rng, &[14, 18, 19, 20]);
            bytes[at] = rng.next_u64() as u8;
        }
        // Cut short, or padded as short frames arrive.
        2 => bytes.truncate(usize::try_from(rng.next_u64() % 80).unwrap().max(14)),
        3 => bytes.resize(bytes.len().max(60) + 4, 0),
        _ => {}
    }
    bytes
}

/// Runs `frames` frames through both programs; every difference is reported with its frame.
fn compare(with: &Loaded, without: &Loaded, rng: &mut Rng, frames: usize, resets: bool) {
    let mut differences = Vec::new();
    for n in 0..frames {
        let frame = random_frame(rng, resets);
        let (a, b) = (with.run(&frame), without.run(&frame));
        let same = a == b
            && with.counts() == without.counts()
            && with.datapath.vpn_verdicts().unwrap() == without.datapath.vpn_verdicts().unwrap()
            && with.hits() == without.hits();
        if !same {
            differences.push(format!("frame {n}: action {a} vs {b}: {frame:02x?}"));
            if differences.len() == 5 {
                break;
            }
        }
    }
    assert!(
        differences.is_empty(),
        "the fast path changed verdicts or counts:\n{}",
        differences.join("\n")
    );
}

fn feed_file(dir: &TempDir) -> std::path::PathBuf {
    let feed = dir.0.join("feed.txt");
    std::fs::write(&feed, "# test feed\n100.64.0.0/13\n").unwrap();
    feed
}

#[test]
fn the_fast_path_reaches_the_verdicts_of_the_full_path() {
    let dir = TempDir::new("enf-fast").unwrap();
    let text = registry(&feed_file(&dir), "");
    let mut with = Loaded::new(&text);
    let mut without = Loaded::without_fast_path(&text);
    let mut rng = Rng(0xFA57_0001_2026_1127);
    // No stateful VPN flow yet: the fast path decides where it can.
    compare(&with, &without, &mut rng, 3000, false);
    // The same in monitor mode: what would drop is counted apart and passes.
    with.set_mode(Mode::Monitor);
    without.set_mode(Mode::Monitor);
    compare(&with, &without, &mut rng, 500, false);
    with.set_mode(Mode::Enforce);
    without.set_mode(Mode::Enforce);
    // OpenVPN resets: once a flow is remembered, every TCP/UDP packet takes the full path. The
    // flow's later packets carry no signature and must still count as OpenVPN.
    let reset = vec![0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0];
    let data = vec![0x99; 40];
    for (payload, n) in [(reset, 1), (data, 3)] {
        for _ in 0..n {
            let frame = Frame::udp_data("198.18.5.5", 40_000, "192.0.2.9", 1194, payload.clone());
            let frame = frame.build();
            assert_eq!(with.run(&frame), without.run(&frame));
        }
    }
    assert_eq!(
        with.datapath.vpn_verdicts().unwrap(),
        without.datapath.vpn_verdicts().unwrap()
    );
    assert_eq!(with.counts(), without.counts());
    compare(&with, &without, &mut rng, 1500, true);
}

#[test]
fn with_a_port_endpoint() {
    // An approval that names a port lets its endpoint's port-only packets pass: the fast path
    // then steps aside for every TCP/UDP packet.
    let dir = TempDir::new("enf-fast").unwrap();
    let text = registry(&feed_file(&dir), r#", "port": 51820"#);
    let with = Loaded::new(&text);
    let without = Loaded::without_fast_path(&text);
    compare(
        &with,
        &without,
        &mut Rng(0xFA57_0002_2026_1127),
        1000,
        false,
    );
}

/// Connections the server opened (recorded by the egress program) to addresses and ports the
/// random frames use, so that some frames are replies and many come from peers with a
/// connection on other ports: the fast path must step aside for exactly those that could be
/// replies.
#[test]
fn with_connections_the_server_opened() {
    let dir = TempDir::new("enf-fast").unwrap();
    let text = registry(&feed_file(&dir), "");
    let with = Loaded::new(&text);
    let without = Loaded::without_fast_path(&text);
    let ports = [53, 443, 5353, 40_000];
    let mut peers: Vec<(String, &str)> = (0..16)
        .flat_map(|i| {
            [
                (format!("192.0.2.{i}"), "198.51.100.1"),
                (format!("192.0.2.{i}"), "192.0.2.7"),
            ]
        })
        .collect();
    peers.extend((0x60..0x80).map(|i| (format!("2001:db8:7::{i:x}"), "2001:db8:100::1")));
    peers.push(("198.51.100.20".into(), "198.51.100.1"));
    for (peer, local) in &peers {
        for remote_port in ports {
            for local_port in ports {
                let frames = [
                    Frame::udp_data(local, local_port, peer, remote_port, vec![1; 8]).build(),
                    {
                        let mut syn = Frame::new(
                            local.parse().unwrap(),
                            peer.parse().unwrap(),
                            L4::TcpData {
                                src_port: local_port,
                                dst_port: remote_port,
                                data: Vec::new(),
                            },
                        )
                        .build();
                        // ACK|PSH made a SYN (offset 13 of the TCP header).
                        let tcp = syn.len() - 20;
                        syn[tcp + 13] = 0x02;
                        syn
                    },
                ];
                for frame in &frames {
                    assert_eq!(with.run_egress(frame), -1);
                    assert_eq!(without.run_egress(frame), -1);
                }
            }
        }
    }
    assert!(with.datapath.conn_count().unwrap() > 1000);
    compare(
        &with,
        &without,
        &mut Rng(0xFA57_0003_2026_1205),
        3000,
        false,
    );
    let replies = with
        .counts()
        .packets(enforcer_common::Reason::EstablishedReply);
    assert!(
        replies > 10,
        "the random frames should include replies: {replies}"
    );
}
