//! The VPN stage through the real program (`BPF_PROG_TEST_RUN)`: crafted packets of every protocol
//! the program recognises, approved and unapproved endpoints, an allowlisted source that may
//! still not open an unapproved VPN, flow state for `OpenVPN`, look-alikes that must stay
//! ordinary traffic, and monitor mode. Each row checks the verdict counter, the rule credited
//! and the per-protocol VPN counter.

use enforcer::registry::Mode;
use enforcer_common::{
    Reason::{self, Allowed, ApprovedVpn, NotAllowlisted, UnapprovedVpn},
    VpnProtocol::{
        self, AnyConnect, CloudflareWarp, Ipsec, L2tp, Lightway, OpenVpn, Pptp, SoftEther,
        Tailscale, UltraSurf, WireGuard, ZeroTier,
    },
};
use enforcer_tests::{
    kernel::{Case, Loaded, case, check_table},
    packet::{Frame, GRE, L4},
};

const REGISTRY: &str = r#"{
  "schema": 1, "mode": "enforce",
  "networks": [{"name": "lan", "cidr": "198.51.100.0/24"}, {"name": "lan6", "cidr": "2001:db8:100::/64"}],
  "vpn_endpoints": [
    {"name": "wg-gw", "address": "192.0.2.7", "protocol": "wireguard", "port": 51820, "approval": "NITB-2026-0042"},
    {"name": "ipsec-gw", "address": "192.0.2.0/28", "protocol": "ipsec", "approval": "NITB-2026-0057"},
    {"name": "ovpn6", "address": "2001:db8:7::1", "protocol": "openvpn", "approval": "NITB-2026-0061"}
  ]
}"#;

const SERVER: &str = "198.51.100.1";
const LAN: &str = "198.51.100.10";

fn udp(src: &str, src_port: u16, dst: &str, dst_port: u16, data: Vec<u8>) -> Frame {
    Frame::udp_data(src, src_port, dst, dst_port, data)
}

fn tcp(src: &str, src_port: u16, dst: &str, dst_port: u16, data: Vec<u8>) -> Frame {
    Frame::new(
        src.parse().unwrap(),
        dst.parse().unwrap(),
        L4::TcpData {
            src_port,
            dst_port,
            data,
        },
    )
}

fn ip(src: &str, proto: u8, bytes: Vec<u8>) -> Frame {
    Frame::new(
        src.parse().unwrap(),
        SERVER.parse().unwrap(),
        L4::Raw { proto, bytes },
    )
}

/// `head` followed by filler bytes up to `len`.
fn bytes(head: &[u8], len: usize) -> Vec<u8> {
    let mut out = head.to_vec();
    out.resize(len, 0x5C);
    out
}

fn wg_init() -> Vec<u8> {
    bytes(&[1, 0, 0, 0, 0x11, 0x22, 0x33, 0x44], 148)
}

fn wg_data(len: usize) -> Vec<u8> {
    // type 4, reserved, receiver index, counter 7 (little-endian u64), then ciphertext
    bytes(
        &[4, 0, 0, 0, 0xAA, 0xBB, 0xCC, 0xDD, 7, 0, 0, 0, 0, 0, 0, 0],
        len,
    )
}

/// An IKE message of `len` bytes: `SPIi`, `SPIr` 0, next payload, version, exchange, flags, id, length.
fn ike(version: u8, exchange: u8, next: u8, flags: u8, len: usize) -> Vec<u8> {
    let mut h = vec![
        0x1B, 0xAD, 0xC0, 0xDE, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, next, version, exchange, flags,
        0, 0, 0, 0,
    ];
    h.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
    bytes(&h, len)
}

fn openvpn_plain_client_reset() -> Vec<u8> {
    bytes(&[0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0], 14)
}

/// The session id `openvpn_plain_client_reset` carries.
const RESET_SESSION: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// A `P_CONTROL_V1` packet (key id 0) carrying `session`, padded to `len`.
fn openvpn_control(session: [u8; 8], len: usize) -> Vec<u8> {
    let mut head = vec![0x20];
    head.extend_from_slice(&session);
    bytes(&head, len)
}

fn openvpn_tls_auth_client_reset() -> Vec<u8> {
    // op | session id | HMAC-SHA1 (20) | packet id 1 | net_time (2026) | ack len 0 | msg id 0
    let mut p = vec![0x38, 1, 2, 3, 4, 5, 6, 7, 8];
    p.extend_from_slice(&[0x77; 20]);
    p.extend_from_slice(&[0, 0, 0, 1, 0x69, 0x2A, 0x00, 0x00, 0, 0, 0, 0, 0]);
    p
}

fn l2tp_sccrq() -> Vec<u8> {
    // T L S set, version 2 | length | tunnel 0 | session 0 | Ns 0 | Nr 0 | Message Type AVP = SCCRQ
    let mut p = vec![
        0xC8, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0x08, 0, 0, 0, 0, 0, 1,
    ];
    p.extend_from_slice(&[0x80, 0x08, 0, 0, 0, 2, 1, 0]); // protocol version AVP
    let len = u16::try_from(p.len()).unwrap();
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn pptp_sccrq() -> Vec<u8> {
    bytes(
        &[0, 156, 0, 1, 0x1A, 0x2B, 0x3C, 0x4D, 0, 1, 0, 0, 1, 0],
        156,
    )
}

/// Runs the cases and checks, besides the verdict, that the VPN counter of `protocol` moved
/// (unapproved or approved as the reason says), and no VPN counter for non-VPN rows.
fn check(loaded: &Loaded, monitor: bool, rows: Vec<(Case, Option<VpnProtocol>)>) {
    let mut failures = Vec::new();
    for (case, protocol) in rows {
        let what = case.what;
        let reason: Reason = case.reason;
        let before = loaded.datapath.vpn_verdicts().unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_table(loaded, monitor, &[case]);
        }));
        if let Err(panic) = outcome {
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(message.lines().skip(1).collect::<Vec<_>>().join(" "));
            continue;
        }
        let after = loaded.datapath.vpn_verdicts().unwrap();
        for p in VpnProtocol::ALL {
            let moved = (
                after.unapproved(p) - before.unapproved(p),
                after.approved(p) - before.approved(p),
            );
            let want = match protocol {
                Some(q) if q == p && reason == ApprovedVpn => (0, 1),
                Some(q) if q == p => (1, 0),
                _ => (0, 0),
            };
            if moved != want {
                failures.push(format!(
                    "{what}: {} counter moved (unapproved, approved) {moved:?}, expected {want:?}",
                    p.name()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn every_protocol_is_recognised_and_unapproved_endpoints_dropped() {
    let loaded = Loaded::new(REGISTRY);
    let (wg, ov, ips, l2, pp, ts) = (
        Some(WireGuard),
        Some(OpenVpn),
        Some(Ipsec),
        Some(L2tp),
        Some(Pptp),
        Some(Tailscale),
    );
    check(
        &loaded,
        false,
        vec![
            (
                case(
                    "WireGuard init from an allowlisted LAN host",
                    udp(LAN, 40000, SERVER, 51820, wg_init()).build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "WireGuard init on a non-default port",
                    udp("203.0.113.5", 5060, SERVER, 5060, wg_init()).build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "WireGuard response",
                    udp(
                        "203.0.113.5",
                        51820,
                        SERVER,
                        40000,
                        bytes(&[2, 0, 0, 0], 92),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "WireGuard cookie reply",
                    udp(
                        "203.0.113.5",
                        51820,
                        SERVER,
                        40000,
                        bytes(&[3, 0, 0, 0], 64),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "WireGuard data (keepalive, 32 bytes)",
                    udp("203.0.113.5", 51820, SERVER, 40000, wg_data(32)).build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "WireGuard data, 1452 bytes (MTU-capped)",
                    udp(LAN, 51820, SERVER, 40000, wg_data(1452)).build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "IPv6 WireGuard data",
                    udp(
                        "2001:db8:100::10",
                        51820,
                        "2001:db8:1::1",
                        40000,
                        wg_data(128),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "OpenVPN plain client reset",
                    udp(LAN, 40001, SERVER, 1194, openvpn_plain_client_reset()).build(),
                    UnapprovedVpn,
                    None,
                ),
                ov,
            ),
            (
                case(
                    "OpenVPN control packet of that flow with the reset's session id (flow map)",
                    udp(
                        LAN,
                        40001,
                        SERVER,
                        1194,
                        openvpn_control(RESET_SESSION, 100),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                ov,
            ),
            (
                // An unapproved flow's packets must prove they are its: a reset spoofed with an
                // allowed client's address and port must not turn that client's traffic into
                // drops.
                case(
                    "a control packet of that flow with another session id: ordinary traffic",
                    udp(LAN, 40001, SERVER, 1194, openvpn_control([9; 8], 100)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "a data packet of that flow (no session id): ordinary traffic",
                    udp(LAN, 40001, SERVER, 1194, bytes(&[0x48, 1], 120)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "the other end's packet, whose reset was not seen: ordinary traffic",
                    udp(SERVER, 1194, LAN, 40001, openvpn_control([7; 8], 120)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "OpenVPN client reset from an unlisted source",
                    udp(
                        "203.0.113.9",
                        40009,
                        SERVER,
                        1194,
                        openvpn_plain_client_reset(),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                ov,
            ),
            (
                // Its flow is not remembered: it could not pass anyway, and a reset from anywhere
                // must not switch the fast path off for every packet after it.
                case(
                    "the unlisted source's next packet of that flow: not allowlisted",
                    udp(
                        "203.0.113.9",
                        40009,
                        SERVER,
                        1194,
                        bytes(&[0x20, 9, 9], 100),
                    )
                    .build(),
                    NotAllowlisted,
                    None,
                ),
                None,
            ),
            (
                case(
                    "OpenVPN tls-auth (SHA1) client reset on 443",
                    udp(LAN, 40002, SERVER, 443, openvpn_tls_auth_client_reset()).build(),
                    UnapprovedVpn,
                    None,
                ),
                ov,
            ),
            (
                case(
                    "OpenVPN over TCP: length-prefixed client reset",
                    tcp(
                        LAN,
                        40003,
                        SERVER,
                        443,
                        [&[0u8, 14][..], &openvpn_plain_client_reset()].concat(),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                ov,
            ),
            (
                case(
                    "IKEv2 IKE_SA_INIT on 500",
                    udp(LAN, 500, SERVER, 500, ike(0x20, 34, 33, 0x08, 300)).build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "IKEv1 main mode on an odd port",
                    udp(LAN, 10500, SERVER, 10500, ike(0x10, 2, 1, 0, 200)).build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "IKEv2 behind the NAT-T non-ESP marker",
                    udp(
                        LAN,
                        4500,
                        SERVER,
                        4500,
                        [&[0u8; 4][..], &ike(0x20, 35, 46, 0x08, 240)].concat(),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "ESP in UDP on 4500",
                    udp(
                        LAN,
                        4500,
                        SERVER,
                        4500,
                        bytes(&[0, 0, 0x10, 0, 0, 0, 0, 1], 120),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "NAT-T keepalive",
                    udp(LAN, 4500, SERVER, 4500, vec![0xFF]).build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "ESP (IP 50)",
                    ip(LAN, 50, bytes(&[0, 0, 0x10, 1, 0, 0, 0, 1], 64)).build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "AH (IP 51)",
                    ip(LAN, 51, bytes(&[4, 4, 0, 0, 0, 0, 0x10, 1, 0, 0, 0, 1], 64)).build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "L2TPv2 SCCRQ on 1701",
                    udp(LAN, 1701, SERVER, 1701, l2tp_sccrq()).build(),
                    UnapprovedVpn,
                    None,
                ),
                l2,
            ),
            (
                case(
                    "L2TPv2 data on 1701",
                    udp(
                        LAN,
                        1701,
                        SERVER,
                        1701,
                        bytes(&[0x00, 0x02, 0, 5, 0, 7, 0xFF, 0x03], 60),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                l2,
            ),
            (
                case(
                    "L2TPv3 (IP 115)",
                    ip(LAN, 115, bytes(&[0, 0, 0, 9], 40)).build(),
                    UnapprovedVpn,
                    None,
                ),
                l2,
            ),
            (
                case(
                    "PPTP control SCCRQ on 1723",
                    tcp(LAN, 40004, SERVER, 1723, pptp_sccrq()).build(),
                    UnapprovedVpn,
                    None,
                ),
                pp,
            ),
            (
                case(
                    "PPTP enhanced GRE v1",
                    ip(
                        LAN,
                        GRE,
                        bytes(&[0x30, 0x01, 0x88, 0x0B, 0, 32, 0, 7, 0, 0, 0, 1], 44),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                pp,
            ),
            (
                case(
                    "Tailscale disco",
                    udp(LAN, 41641, SERVER, 41641, bytes(b"TS\xF0\x9F\x92\xAC", 90)).build(),
                    UnapprovedVpn,
                    None,
                ),
                ts,
            ),
        ],
    );
}

#[test]
fn approved_endpoints_pass_and_only_for_their_protocol_and_port() {
    let loaded = Loaded::new(REGISTRY);
    let (wg, ov, ips) = (Some(WireGuard), Some(OpenVpn), Some(Ipsec));
    check(
        &loaded,
        false,
        vec![
            (
                case(
                    "WireGuard from the approved gateway's port",
                    udp("192.0.2.7", 51820, SERVER, 40000, wg_data(64)).build(),
                    ApprovedVpn,
                    Some("wg-gw"),
                ),
                wg,
            ),
            (
                case(
                    "WireGuard to the approved gateway (enforcer on a gateway)",
                    udp(LAN, 40000, "192.0.2.7", 51820, wg_init()).build(),
                    ApprovedVpn,
                    Some("wg-gw"),
                ),
                wg,
            ),
            (
                case(
                    "WireGuard from the gateway's address, other port",
                    udp("192.0.2.7", 51821, SERVER, 40000, wg_data(64)).build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "IPsec ESP from inside the approved /28",
                    ip("192.0.2.5", 50, bytes(&[0, 0, 0x10, 1], 64)).build(),
                    ApprovedVpn,
                    Some("ipsec-gw"),
                ),
                ips,
            ),
            (
                case(
                    "IKE from the WireGuard gateway (inside the ipsec /28)",
                    udp("192.0.2.7", 500, SERVER, 500, ike(0x20, 34, 33, 0x08, 300)).build(),
                    ApprovedVpn,
                    Some("ipsec-gw"),
                ),
                ips,
            ),
            (
                case(
                    "WireGuard from inside the /28 (only ipsec approved there)",
                    udp("192.0.2.5", 51820, SERVER, 40000, wg_data(64)).build(),
                    UnapprovedVpn,
                    None,
                ),
                wg,
            ),
            (
                case(
                    "IPsec ESP from just outside the /28",
                    ip("192.0.2.16", 50, bytes(&[0, 0, 0x10, 1], 64)).build(),
                    UnapprovedVpn,
                    None,
                ),
                ips,
            ),
            (
                case(
                    "TCP segment without payload from the approved WireGuard port (signature-less)",
                    tcp("192.0.2.7", 51820, SERVER, 40000, vec![]).build(),
                    ApprovedVpn,
                    Some("wg-gw"),
                ),
                wg,
            ),
            (
                case(
                    "TCP segment without payload from the gateway's other port",
                    tcp("192.0.2.7", 51821, SERVER, 40000, vec![]).build(),
                    NotAllowlisted,
                    None,
                ),
                None,
            ),
            (
                case(
                    "OpenVPN to the approved IPv6 server",
                    udp(
                        "2001:db8:100::10",
                        40000,
                        "2001:db8:7::1",
                        1194,
                        openvpn_plain_client_reset(),
                    )
                    .build(),
                    ApprovedVpn,
                    Some("ovpn6"),
                ),
                ov,
            ),
        ],
    );
}

/// Traffic that looks a little like a VPN protocol, from an allowlisted source: ordinary.
#[test]
fn look_alikes_stay_ordinary_traffic() {
    let loaded = Loaded::new(REGISTRY);
    let quic_initial = bytes(&[0xC1, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8], 1200);
    let dns_query = bytes(
        &[0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x'],
        40,
    );
    let tls_client_hello = bytes(&[0x16, 3, 1, 2, 0, 1, 0, 1, 0xFC, 3, 3], 517);
    let ssh_banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec();
    check(
        &loaded,
        false,
        vec![
            (
                case(
                    "QUIC initial on 443",
                    udp(LAN, 50000, SERVER, 443, quic_initial).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "DNS query",
                    udp(LAN, 50001, SERVER, 53, dns_query).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "TLS ClientHello",
                    tcp(LAN, 50002, SERVER, 443, tls_client_hello).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "SSH banner",
                    tcp(LAN, 50003, SERVER, 22, ssh_banner).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "WireGuard-like data, 33 bytes (not padded)",
                    udp(LAN, 50004, SERVER, 9999, wg_data(33)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "type 1 with reserved bytes set",
                    udp(LAN, 50005, SERVER, 9999, bytes(&[1, 0, 0, 1], 148)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "0x38 + zeros, 20 bytes (NFS-reply-like)",
                    udp(
                        LAN,
                        2049,
                        SERVER,
                        900,
                        bytes(&[0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0], 20),
                    )
                    .build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "UDP on 4500 with a small first word",
                    udp(LAN, 4500, SERVER, 4500, bytes(&[0, 0, 0, 5], 40)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "IKE-shaped header with a wrong length",
                    udp(LAN, 500, SERVER, 500, {
                        let mut m = ike(0x20, 34, 33, 0x08, 300);
                        m[27] = 1;
                        m
                    })
                    .build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "plain GRE v0 (IPv4 payload)",
                    ip(LAN, GRE, bytes(&[0, 0, 0x08, 0x00], 44)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "L2TP-data-shaped bytes off port 1701 (the data rule is port-gated)",
                    udp(LAN, 1702, SERVER, 1702, bytes(&[0x00, 0x02, 0, 5], 60)).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "unapproved non-VPN source stays not_allowlisted",
                    udp("203.0.113.5", 50000, SERVER, 53, bytes(&[1], 30)).build(),
                    NotAllowlisted,
                    None,
                ),
                None,
            ),
        ],
    );
}

/// The controller rewrites `CONFIG` whole on every change (mode, table generation); a write from
/// a read taken just before the program first set `vpn_flows_seen` would clear it, and the
/// flow's later packets (no signature) would skip the flow lookup and pass as ordinary traffic.
/// The stale write is simulated here from outside, as another process could: the controller's
/// next change must set the flag again while flows exist.
#[test]
fn a_config_change_keeps_the_flow_flag_while_flows_exist() {
    let mut loaded = Loaded::new(REGISTRY);
    let reset = udp(LAN, 40001, SERVER, 1194, openvpn_plain_client_reset()).build();
    let next = udp(
        LAN,
        40001,
        SERVER,
        1194,
        openvpn_control(RESET_SESSION, 100),
    )
    .build();
    loaded.run(&reset);
    assert_eq!(
        loaded.datapath.config().unwrap().vpn_flows_seen,
        1,
        "a remembered flow sets the flag"
    );

    // Find CONFIG among the program's maps, by the kernel's ids, and clear the flag.
    let ids = loaded
        .datapath
        .program()
        .info()
        .unwrap()
        .map_ids()
        .unwrap()
        .expect("the kernel lists the program's maps");
    let data = ids
        .into_iter()
        .map(|id| aya::maps::MapData::from_id(id).unwrap())
        .find(|m| m.info().unwrap().name_as_str() == Some("CONFIG"))
        .expect("the program uses CONFIG");
    let mut config: aya::maps::Array<aya::maps::MapData, enforcer_common::Config> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    let stale = enforcer_common::Config {
        vpn_flows_seen: 0,
        ..config.get(&0, 0).unwrap()
    };
    config.set(0, stale, 0).unwrap();
    let before = loaded.counts();
    loaded.run(&next);
    assert_eq!(
        loaded.counts().packets(NotAllowlisted) + loaded.counts().packets(Allowed),
        before.packets(NotAllowlisted) + before.packets(Allowed) + 1,
        "with the flag cleared the flow's next packet is ordinary traffic (what the fix prevents)"
    );

    loaded.set_mode(Mode::Enforce);
    assert_eq!(
        loaded.datapath.config().unwrap().vpn_flows_seen,
        1,
        "a change of CONFIG sets the flag again while flows exist"
    );
    let before = loaded.counts();
    loaded.run(&next);
    assert_eq!(
        loaded.counts().packets(UnapprovedVpn),
        before.packets(UnapprovedVpn) + 1,
        "the flow's next packet is OpenVPN again"
    );
}

/// The controller's sweep forgets a remembered flow only after a whole period without a packet,
/// and clears the flag (so ordinary traffic skips the flow lookup and the fast path runs again)
/// once none is left; a new reset is remembered again.
#[test]
fn the_sweep_keeps_active_flows_and_forgets_silent_ones() {
    let mut loaded = Loaded::new(REGISTRY);
    let reset = udp(LAN, 40001, SERVER, 1194, openvpn_plain_client_reset()).build();
    let next = udp(
        LAN,
        40001,
        SERVER,
        1194,
        openvpn_control(RESET_SESSION, 100),
    )
    .build();
    // The reply direction is the same flow, once its own reset was seen.
    let reply = udp(SERVER, 1194, LAN, 40001, openvpn_control([5; 8], 100)).build();
    let mut server_reset = openvpn_plain_client_reset();
    server_reset[1..9].copy_from_slice(&[5; 8]);
    let server_reset = udp(SERVER, 1194, LAN, 40001, server_reset).build();
    let flag = |loaded: &Loaded| loaded.datapath.config().unwrap().vpn_flows_seen;
    let sweep = |loaded: &mut Loaded| loaded.datapath.sweep_vpn_flows().unwrap();
    let openvpn_next = |loaded: &Loaded, frame: &[u8]| {
        let before = loaded.counts();
        loaded.run(frame);
        let after = loaded.counts();
        match (
            after.packets(UnapprovedVpn) - before.packets(UnapprovedVpn),
            after.packets(Allowed) - before.packets(Allowed),
        ) {
            (1, 0) => true,
            (0, 1) => false,
            moved => panic!("unexpected verdict for the flow's packet: {moved:?}"),
        }
    };

    loaded.run(&reset);
    assert_eq!(flag(&loaded), 1, "a remembered flow sets the flag");
    assert!(
        !openvpn_next(&loaded, &reply),
        "the other end's control packet, before its own reset: ordinary traffic"
    );
    loaded.run(&server_reset);
    let first = sweep(&mut loaded);
    assert_eq!(
        (first.kept, first.forgotten, first.flag_cleared),
        (1, 0, false),
        "the reset marked the flow active: kept"
    );
    // A packet in each period keeps the flow, in either direction.
    for (round, frame) in [&next, &reply, &next].into_iter().enumerate() {
        assert!(
            openvpn_next(&loaded, frame),
            "round {round}: the flow's packet is OpenVPN"
        );
        let kept = sweep(&mut loaded);
        assert_eq!(
            (kept.kept, kept.forgotten, kept.flag_cleared),
            (1, 0, false),
            "round {round}: a flow with a packet since the last sweep is kept"
        );
        assert_eq!(flag(&loaded), 1);
    }
    // A whole period without a packet: forgotten, and the flag cleared.
    let silent = sweep(&mut loaded);
    assert_eq!(
        (silent.kept, silent.forgotten, silent.flag_cleared),
        (0, 1, true),
        "a flow silent for a whole period is forgotten and the flag cleared"
    );
    assert_eq!(flag(&loaded), 0);
    assert!(
        !openvpn_next(&loaded, &next),
        "a forgotten flow's signature-less packet is ordinary traffic again (allowlisted source)"
    );
    let empty = sweep(&mut loaded);
    assert_eq!(
        (empty.kept, empty.forgotten, empty.flag_cleared),
        (0, 0, false)
    );

    // Its next reset is remembered anew.
    loaded.run(&reset);
    assert_eq!(flag(&loaded), 1, "a new reset sets the flag again");
    assert!(
        openvpn_next(&loaded, &next),
        "and the flow is OpenVPN again"
    );
}

#[test]
fn monitor_mode_lets_unapproved_vpn_through_and_counts_it() {
    let mut loaded = Loaded::new(REGISTRY);
    loaded.set_mode(Mode::Monitor);
    check(
        &loaded,
        true,
        vec![
            (
                case(
                    "unapproved WireGuard passes in monitor mode",
                    udp(LAN, 40000, SERVER, 51820, wg_init()).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(WireGuard),
            ),
            (
                case(
                    "approved stays approved",
                    udp("192.0.2.7", 51820, SERVER, 40000, wg_data(64)).build(),
                    ApprovedVpn,
                    Some("wg-gw"),
                ),
                Some(WireGuard),
            ),
        ],
    );
}

/// The load-time switch the benchmark uses really removes the stage: the same `WireGuard` packet
/// from the allowlisted LAN is then just allowed.
#[test]
fn without_the_vpn_stage_vpn_packets_meet_the_allowlist() {
    let loaded = Loaded::without_vpn_stage(REGISTRY);
    check(
        &loaded,
        false,
        vec![(
            case(
                "WireGuard init, VPN stage off",
                udp(LAN, 40000, SERVER, 51820, wg_init()).build(),
                Allowed,
                Some("lan"),
            ),
            None,
        )],
    );
}

/// `ZeroTier` HELLO: IV(8) dest(5) source(5) flags(1: cipher NONE) MAC(8) verb HELLO, protocol
/// version, versions, timestamp, then the identity whose address equals the source address.
fn zerotier_hello() -> Vec<u8> {
    let mut p = vec![0x11; 8];
    p.extend_from_slice(&[0xAA, 0xBB, 0xCC, 0xDD, 0xEE]); // destination
    p.extend_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x05]); // source (13..18)
    p.push(0x00); // flags: hops 0, cipher 0 (POLY1305_NONE)
    p.extend_from_slice(&[0x22; 8]); // MAC (19..27)
    p.push(0x01); // verb HELLO (27)
    p.push(11); // protocol version (28)
    p.extend_from_slice(&[1, 12, 0, 4]); // major, minor, revision (29..33)
    p.extend_from_slice(&[0, 0, 1, 0x8F, 0, 0, 0, 0]); // timestamp (33..41)
    p.extend_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x05, 0x00]); // identity address, type 0
    bytes(&p, 160)
}

#[test]
fn further_vpn_families_are_recognised() {
    let loaded = Loaded::new(REGISTRY);
    let warp_init = bytes(&[0xC1, 0, 0, 0, 0x12, 0x34], 194);
    let warp_data = bytes(
        &[0xC4, 0x02, 0x78, 0x00, 1, 2, 3, 4, 9, 0, 0, 0, 0, 0, 0, 0],
        96,
    );
    let dtls_bad_ver = bytes(&[23, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 7, 0, 40], 53);
    let ultrasurf = bytes(&[0xCC, 0x1C, 0x30, 0x41, 0x5B, 0xA4, 0x38, 0x66], 60);
    let lightway = bytes(&[b'H', b'e', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 120);
    check(
        &loaded,
        false,
        vec![
            (
                case(
                    "Cloudflare WARP initiation on 2408",
                    udp(LAN, 40000, SERVER, 2408, warp_init.clone()).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(CloudflareWarp),
            ),
            (
                case(
                    "Cloudflare WARP data from 2408",
                    udp("203.0.113.5", 2408, SERVER, 40000, warp_data).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(CloudflareWarp),
            ),
            (
                case(
                    "AnyConnect DTLS 0x0100 record",
                    udp(LAN, 40001, SERVER, 443, dtls_bad_ver).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(AnyConnect),
            ),
            (
                case(
                    "SoftEther NAT-T helper",
                    udp(
                        LAN,
                        40002,
                        SERVER,
                        5004,
                        b"IP=198.51.100.10,PORT=4433".to_vec(),
                    )
                    .build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(SoftEther),
            ),
            (
                case(
                    "UltraSurf first segment",
                    tcp(LAN, 40003, SERVER, 443, ultrasurf).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(UltraSurf),
            ),
            (
                case(
                    "Lightway UDP datagram",
                    udp(LAN, 40004, SERVER, 443, lightway).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(Lightway),
            ),
            (
                case(
                    "ZeroTier HELLO",
                    udp(LAN, 9993, SERVER, 9993, zerotier_hello()).build(),
                    UnapprovedVpn,
                    None,
                ),
                Some(ZeroTier),
            ),
            // look-alikes
            (
                case(
                    "QUIC Initial (C1 00 00 00 01) off port 2408 is not WARP",
                    udp(LAN, 40005, SERVER, 443, warp_init).build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "DTLS 1.2 record on 443 (WebRTC-style) is not AnyConnect",
                    udp(
                        LAN,
                        40006,
                        SERVER,
                        443,
                        bytes(&[23, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0, 0, 7, 0, 40], 53),
                    )
                    .build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
            (
                case(
                    "ZeroTier-like packet whose identity is not its source",
                    udp(LAN, 9993, SERVER, 9993, {
                        let mut z = zerotier_hello();
                        z[41] ^= 0xFF;
                        z
                    })
                    .build(),
                    Allowed,
                    Some("lan"),
                ),
                None,
            ),
        ],
    );
}

/// A reset spoofed with an allowed client's address and port (over UDP from anywhere, over TCP
/// from any host on the link) puts an unapproved flow in the flow map. The client's own packets
/// of that flow, whatever their bytes, stay its ordinary traffic: only a control packet that
/// carries the session id of the spoofed reset (chosen by the attacker, never sent by the
/// client) counts as `OpenVPN`.
#[test]
fn a_spoofed_reset_turns_none_of_an_allowed_clients_packets_into_drops() {
    let loaded = Loaded::new(REGISTRY);
    let mut rng = enforcer_tests::rng::Rng(0x5b0f_0e7a);
    let mut random = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
    let reset = openvpn_plain_client_reset();
    let mut framed_reset = u16::try_from(reset.len()).unwrap().to_be_bytes().to_vec();
    framed_reset.extend_from_slice(&reset);

    // The client's packets: every first byte (UDP: the opcode's place) and every third byte
    // behind a plausible length (TCP), random bytes after; TLS, HTTP and an empty segment.
    let mut udp_payloads: Vec<Vec<u8>> = (0..=255u8)
        .map(|first| [vec![first], random(99)].concat())
        .collect();
    let mut tcp_payloads: Vec<Vec<u8>> = (0..=255u8)
        .map(|third| [vec![0, 98, third], random(97)].concat())
        .collect();
    for common in [
        bytes(&[0x17, 0x03, 0x03, 0x00, 0x40], 69),
        b"GET /eoffice/inbox HTTP/1.1\r\nHost: eoffice\r\n\r\n".to_vec(),
        [vec![0x20], RESET_SESSION[..7].to_vec(), vec![0], random(40)].concat(),
    ] {
        udp_payloads.push(common.clone());
        tcp_payloads.push(common);
    }
    tcp_payloads.push(Vec::new());

    /// (transport, the spoofed reset, the client's payloads, their frame on the spoofed flow)
    type Spoofed = (&'static str, Vec<u8>, Vec<Vec<u8>>, fn(Vec<u8>) -> Vec<u8>);
    let spoofed: [Spoofed; 2] = [
        ("UDP", reset.clone(), udp_payloads, |p| {
            udp(LAN, 40100, SERVER, 443, p).build()
        }),
        ("TCP", framed_reset, tcp_payloads, |p| {
            tcp(LAN, 40100, SERVER, 443, p).build()
        }),
    ];
    for (proto, spoofed_reset, payloads, frame) in spoofed {
        let before = loaded.counts();
        loaded.run(&frame(spoofed_reset));
        assert_eq!(
            loaded.counts().packets(UnapprovedVpn),
            before.packets(UnapprovedVpn) + 1,
            "{proto}: the spoofed reset itself drops as an unapproved VPN"
        );
        let mut dropped = Vec::new();
        for payload in &payloads {
            let before = loaded.counts();
            loaded.run(&frame(payload.clone()));
            if loaded.counts().packets(Allowed) != before.packets(Allowed) + 1 {
                dropped.push(hex(&payload[..payload.len().min(12)]));
            }
        }
        assert!(
            dropped.is_empty(),
            "{proto}: {} of the allowed client's {} packets after the spoofed reset did not pass \
             as allowed (first bytes): {dropped:?}",
            dropped.len(),
            payloads.len()
        );
        let mut attacker = vec![0x20];
        attacker.extend_from_slice(&RESET_SESSION);
        attacker.extend_from_slice(&random(40));
        if proto == "TCP" {
            let len = u16::try_from(attacker.len()).unwrap().to_be_bytes();
            attacker.splice(0..0, len);
        }
        let before = loaded.counts();
        loaded.run(&frame(attacker));
        assert_eq!(
            loaded.counts().packets(UnapprovedVpn),
            before.packets(UnapprovedVpn) + 1,
            "{proto}: a control packet with the reset's own session id is that flow's OpenVPN"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
