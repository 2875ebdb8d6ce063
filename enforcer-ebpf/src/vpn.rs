//! VPN signatures, one packet at a time, and the approved-endpoint check. The rules and their
//! reasons are in docs/vpn-signatures.md; each is checked against labelled captures by the
//! replay test. Ports are hints, never the test, except where a
//! rule needs a port gate to stay precise (NAT-T on 4500, L2TP on 1701).

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use enforcer_common::{
    Config, MAX_APPROVALS_PER_GROUP, MAX_VPN_GROUPS, NO_RULE, VpnGroup, VpnProtocol,
};

pub use crate::flows::NO_VPN;
use crate::{
    flows::Sessions,
    parse::{
        Addrs, IPPROTO_AH, IPPROTO_ESP, IPPROTO_GRE, IPPROTO_L2TPV3, IPPROTO_TCP, IPPROTO_UDP,
        IpPacket, L4, Packet, Payload, be16, converge, masked, read,
    },
};

const IPSEC_NAT_T_PORT: u16 = 4500;
const L2TP_PORT: u16 = 1701;

const WG_INIT_LEN: usize = 148;
const WG_RESPONSE_LEN: usize = 92;
const WG_COOKIE_LEN: usize = 64;
const WG_DATA_MIN_LEN: usize = 32;
/// TunnelBear's WireGuard handshake sizes (nDPI wireguard.c).
const WG_TUNNELBEAR_INIT_LEN: usize = 204;
const WG_TUNNELBEAR_RESPONSE_LEN: usize = 100;
/// Data packets are padded to 16 bytes unless MTU-capped (drivers/net/wireguard/messages.h).
const WG_PADDING: usize = 16;
const WG_MTU_CAPPED_MIN_LEN: usize = 1280;

const TAILSCALE_DISCO_MAGIC: [u8; 6] = *b"TS\xF0\x9F\x92\xAC";
const TAILSCALE_DISCO_MIN_LEN: usize = 62;

const IKE_HEADER_LEN: usize = 28;
const IKE_V1: u8 = 0x10;
const IKE_V2: u8 = 0x20;

const OPENVPN_CLIENT_RESET_V2: u8 = 0x38;
const OPENVPN_SERVER_RESET_V2: u8 = 0x40;
const OPENVPN_CLIENT_RESET_V3: u8 = 0x50;
/// OpenVPN's `net_time` top byte: Unix time between 2005 and 2044.
const OPENVPN_TIME_MIN: u8 = 0x42;
const OPENVPN_TIME_MAX: u8 = 0x8B;
/// The packet id of the first control packet.
const PACKET_ID_ONE: [u8; 4] = [0, 0, 0, 1];

const WARP_PORT: u16 = 2408;
const ULTRASURF_PREFIX: [u8; 8] = [0xCC, 0x1C, 0x30, 0x41, 0x5B, 0xA4, 0x38, 0x66];
const ZEROTIER_HELLO_MIN_LEN: usize = 111;

const PPTP_MAGIC_COOKIE: [u8; 4] = [0x1A, 0x2B, 0x3C, 0x4D];
const PPTP_CONTROL_MESSAGE: [u8; 2] = [0, 1];
const GRE_PPTP_FLAGS_MASK: u16 = 0xEF7F;
const GRE_PPTP_FLAGS: u16 = 0x2001;
const GRE_PROTO_PPP: u16 = 0x880B;

/// Approved endpoints: address prefix → group index in `VPN_GROUPS`.
#[aya_ebpf::macros::map]
pub static VPN_V4: LpmTrie<[u8; 4], u32> =
    LpmTrie::with_max_entries(enforcer_common::MAX_VPN_GROUPS, 0);
#[aya_ebpf::macros::map]
pub static VPN_V6: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(enforcer_common::MAX_VPN_GROUPS, 0);
#[aya_ebpf::macros::map]
pub static VPN_GROUPS: Array<VpnGroup> =
    Array::with_max_entries(enforcer_common::MAX_VPN_GROUPS, 0);
/// In `classify`'s answer: the rest of the flow carries no signature (see `remember_flow`).
pub const STATEFUL: u32 = 1 << 8;
/// The protocol number in `classify`'s answer.
pub const PROTOCOL: u32 = 0xFF;

/// The VPN protocol number (`VpnProtocol as u32`) of this packet, if it carries a signature or
/// belongs to a flow that did, with `STATEFUL` if the signature is one that only the first
/// packets of a flow carry; `NO_VPN` if none.
#[inline(always)]
pub fn classify<C: Signature>(ctx: &C, packet: &IpPacket, config: &Array<Config>) -> u32 {
    // Verifier: every packet goes through the one call, whose answer is a number the verifier
    // does not know; a constant answer here (say `NO_VPN` for ICMP) let LLVM leave the register
    // undefined on paths that ignore it, and the verifier refuses to copy such a register.
    let (ports, payload) = match packet.l4 {
        L4::Ports {
            src_port_be,
            dst_port_be,
            payload,
            ..
        } => (
            u64::from(be16(src_port_be)) << 16 | u64::from(be16(dst_port_be)),
            payload,
        ),
        L4::Other { payload } => (0, payload),
        L4::Icmp { .. } | L4::Unknown => (
            0,
            Payload {
                offset: 0,
                len: 0,
                total: 0,
            },
        ),
    };
    let found = ctx.signature(
        u64::from(packet.proto) << 32 | ports,
        payload.offset as u64,
        payload.len as u64,
        payload.total as u64,
    );
    let L4::Ports {
        src_port_be,
        dst_port_be,
        ..
    } = packet.l4
    else {
        return found;
    };
    if found == NO_VPN {
        return crate::flows::known_flow(ctx, packet, src_port_be, dst_port_be, config);
    }
    found
}

/// The VPN a packet shows by its IP protocol or carries in its payload: `VpnProtocol as u32`,
/// with `STATEFUL` if the rest of its flow carries no signature; or `NO_VPN`. `proto_ports`:
/// the IP protocol in bits 32 to 39, the TCP or UDP source and destination ports in bits 16 to
/// 31 and 0 to 15. A packet without a payload to read (ICMP, a later fragment) has length 0.
///
/// Verifier: a global function (exported, so the kernel verifies it once, on its own, for any
/// arguments), whose answer the caller gets as a number it does not know. Inlined, each
/// signature's answer would be a constant the verifier carries through the rest of the
/// program, which it would then walk once per protocol: some 455,000 instructions verified
/// inlined, about 66,000 as a global function (a start verifies in about 0.1 s rather than
/// 0.8 s). The call costs 3 to 5 ns a packet.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_vpn_signature(
    ctx: *mut xdp_md,
    proto_ports: u64,
    offset: u64,
    len: u64,
    total: u64,
) -> u32 {
    signature(&XdpContext::new(ctx), proto_ports, offset, len, total)
}

/// `enforcer_vpn_signature` for the egress (TC) program.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_vpn_signature_tc(
    skb: *mut __sk_buff,
    proto_ports: u64,
    offset: u64,
    len: u64,
    total: u64,
) -> u32 {
    signature(&TcContext::new(skb), proto_ports, offset, len, total)
}

/// A program context whose packets the signature functions read: each program type has its
/// own global function (the kernel verifies a global function for one context type), and its
/// own for the remembered flows' session ids (`Sessions`).
pub trait Signature: Sessions {
    fn signature(&self, proto_ports: u64, offset: u64, len: u64, total: u64) -> u32;
}

impl Signature for XdpContext {
    #[inline(always)]
    fn signature(&self, proto_ports: u64, offset: u64, len: u64, total: u64) -> u32 {
        enforcer_vpn_signature(self.ctx, proto_ports, offset, len, total)
    }
}

impl Signature for TcContext {
    #[inline(always)]
    fn signature(&self, proto_ports: u64, offset: u64, len: u64, total: u64) -> u32 {
        enforcer_vpn_signature_tc(self.skb.skb, proto_ports, offset, len, total)
    }
}

#[inline(always)]
fn signature<C: Packet>(ctx: &C, proto_ports: u64, offset: u64, len: u64, total: u64) -> u32 {
    let p = converge(Payload {
        offset: offset as usize,
        len: len as usize,
        total: total as usize,
    });
    let found = match (proto_ports >> 32) as u8 {
        // By protocol number, fragments included.
        IPPROTO_ESP | IPPROTO_AH => Some((VpnProtocol::Ipsec, false)),
        IPPROTO_L2TPV3 => Some((VpnProtocol::L2tp, false)),
        IPPROTO_UDP => udp(ctx, (proto_ports >> 16) as u16, proto_ports as u16, p),
        IPPROTO_TCP => tcp(ctx, p),
        IPPROTO_GRE => pptp_gre(ctx, p).map(|protocol| (protocol, false)),
        _ => None,
    };
    match found {
        Some((protocol, true)) => protocol as u32 | STATEFUL,
        Some((protocol, false)) => protocol as u32,
        None => NO_VPN,
    }
}

/// Whether a UDP payload could carry any signature `udp` recognises: the port gates, then the
/// first byte of every signature that has a fixed one, then the two that look deeper (IKE's
/// version at byte 17, ZeroTier's verb at byte 27). Every signature implies this test, and `udp`
/// starts with it, so a signature it missed would be missed by the classifier too (and its
/// tests would fail): the fast path in `fast.rs` may rely on a `false` meaning "no signature".
#[inline(always)]
pub fn udp_may_match<C: Packet>(ctx: &C, src_port: u16, dst_port: u16, p: Payload) -> bool {
    for port in [IPSEC_NAT_T_PORT, L2TP_PORT, WARP_PORT] {
        if src_port == port || dst_port == port {
            return true;
        }
    }
    // Verifier: two bytes, not one (see the NAT-T keepalive in `udp`).
    if p.len < 4 {
        return false;
    }
    let Some([first, _]) = read::<2>(ctx, p.offset) else {
        return false;
    };
    match first {
        // WireGuard types, DTLS records (AnyConnect), OpenVPN hard resets, Lightway ('H'),
        // SoftEther ('I' of "IP="), Tailscale disco ('T' of "TS").
        1..=4
        | 20..=23
        | OPENVPN_CLIENT_RESET_V2
        | OPENVPN_SERVER_RESET_V2
        | OPENVPN_CLIENT_RESET_V3
        | b'H'
        | b'I'
        | b'T' => return true,
        _ => {}
    }
    if p.total >= IKE_HEADER_LEN
        && let Some([_, version]) = read::<2>(ctx, p.offset + 16)
        && (version == IKE_V1 || version == IKE_V2)
    {
        return true;
    }
    p.len >= ZEROTIER_HELLO_MIN_LEN
        && matches!(read::<2>(ctx, p.offset + 26), Some([_, verb]) if verb & 0x1F == 1)
}

/// The same for a TCP payload and `tcp`: UltraSurf's first byte, PPTP's message type, or an
/// OpenVPN hard reset's opcode behind the 2-byte length.
#[inline(always)]
pub fn tcp_may_match<C: Packet>(ctx: &C, p: Payload) -> bool {
    if p.len < ULTRASURF_PREFIX.len() {
        return false;
    }
    let Some(head) = read::<4>(ctx, p.offset) else {
        return false;
    };
    head[0] == ULTRASURF_PREFIX[0]
        || (p.len >= 14
            && (head[2..4] == PPTP_CONTROL_MESSAGE
                || matches!(
                    head[2],
                    OPENVPN_CLIENT_RESET_V2 | OPENVPN_SERVER_RESET_V2 | OPENVPN_CLIENT_RESET_V3
                )))
}

/// `(protocol, the rest of the flow carries no signature)`.
type Found = Option<(VpnProtocol, bool)>;

#[inline(always)]
fn udp<C: Packet>(ctx: &C, src_port: u16, dst_port: u16, p: Payload) -> Found {
    // Verifier: each check gets freshly laundered lengths and ports (`converge`, `on_port`).
    // A comparison such as `len >= 62` that fails leaves `len < 62` known for the rest of a
    // chain, and every such split doubles the states explored after it; fresh values keep the
    // checks independent.
    let fresh = |port: u16| masked(usize::from(port), 0xFFFF) as u16;
    if !udp_may_match(ctx, fresh(src_port), fresh(dst_port), converge(p)) {
        return None;
    }
    let on_port = |port: u16| {
        masked(usize::from(src_port), 0xFFFF) == usize::from(port)
            || masked(usize::from(dst_port), 0xFFFF) == usize::from(port)
    };
    if on_port(IPSEC_NAT_T_PORT) && converge(p).len == 1 {
        // NAT-T keepalive (RFC 3948): a single byte (0xFF) on 4500. The length and the port
        // decide. Verifier: a one-byte bound check compiles to `p >= end`, from which the verifier
        // learns no range when the pointer has no constant offset, so the byte is not read.
        return Some((VpnProtocol::Ipsec, false));
    }
    if p.len < 4 {
        return None;
    }
    let head = read::<4>(ctx, p.offset)?;
    if on_port(IPSEC_NAT_T_PORT) && converge(p).len >= 8 {
        // On 4500 a zero non-ESP marker introduces IKE; anything else is ESP (SPI > 255).
        if head == [0; 4] {
            let p = converge(p);
            return ike(ctx, p.offset + 4, p.total - 4).then_some((VpnProtocol::Ipsec, false));
        }
        if u32::from_be_bytes(head) > 255 {
            return Some((VpnProtocol::Ipsec, false));
        }
    }
    if wireguard(ctx, converge(p), head) {
        return Some((VpnProtocol::WireGuard, false));
    }
    let q = converge(p);
    if q.len >= TAILSCALE_DISCO_MIN_LEN && read::<6>(ctx, q.offset)? == TAILSCALE_DISCO_MAGIC {
        return Some((VpnProtocol::Tailscale, false));
    }
    if on_port(L2TP_PORT) && l2tp(converge(p), head) {
        return Some((VpnProtocol::L2tp, false));
    }
    let q = converge(p);
    if ike(ctx, q.offset, q.total) {
        return Some((VpnProtocol::Ipsec, false));
    }
    let q = converge(p);
    if openvpn_reset(ctx, q.offset, q.len, head[0]) {
        return Some((VpnProtocol::OpenVpn, true));
    }
    if on_port(WARP_PORT) && warp(ctx, converge(p), head) {
        return Some((VpnProtocol::CloudflareWarp, false));
    }
    // DTLS record with Cisco's legacy version 0x0100 (DTLS1_BAD_VER) and a length that fits.
    let q = converge(p);
    if (20..=23).contains(&head[0]) && head[1..3] == [0x01, 0x00] && q.len >= 13 {
        let length = read::<2>(ctx, q.offset + 11)?;
        if usize::from(be16(length)) + 13 <= q.len {
            return Some((VpnProtocol::AnyConnect, false));
        }
    }
    if head[0..3] == *b"IP=" && softether_ip_port(ctx, converge(p)) {
        return Some((VpnProtocol::SoftEther, false));
    }
    // Lightway: 'H' 'e', major version 1, reserved zero.
    let q = converge(p);
    if head[0..3] == [b'H', b'e', 1] && q.len > 16 && read::<3>(ctx, q.offset + 5) == Some([0; 3]) {
        return Some((VpnProtocol::Lightway, false));
    }
    let q = converge(p);
    if q.len >= ZEROTIER_HELLO_MIN_LEN && zerotier_hello(ctx, q) {
        return Some((VpnProtocol::ZeroTier, false));
    }
    None
}

#[inline(always)]
fn tcp<C: Packet>(ctx: &C, p: Payload) -> Found {
    if !tcp_may_match(ctx, p) {
        return None;
    }
    // Signatures sit in the first data segment of a stream.
    if p.len >= 8 && read::<8>(ctx, p.offset)? == ULTRASURF_PREFIX {
        return Some((VpnProtocol::UltraSurf, false));
    }
    if p.len < 14 {
        return None;
    }
    let head = read::<12>(ctx, p.offset)?;
    // PPTP control (RFC 2637): length, message type 1, magic cookie, control type 1..15, 0.
    if head[2..4] == PPTP_CONTROL_MESSAGE
        && head[4..8] == PPTP_MAGIC_COOKIE
        && (1..=15).contains(&be16([head[8], head[9]]))
        && head[10..12] == [0, 0]
    {
        return Some((VpnProtocol::Pptp, false));
    }
    // OpenVPN over TCP: a 2-byte length, then a hard reset as over UDP.
    let packet_len = usize::from(be16([head[0], head[1]]));
    let plausible = (14..=255).contains(&packet_len) || (336..=1278).contains(&packet_len);
    if plausible && packet_len == p.len - 2 && openvpn_reset(ctx, p.offset + 2, packet_len, head[2])
    {
        return Some((VpnProtocol::OpenVpn, true));
    }
    None
}

/// Cloudflare WARP on UDP 2408 (nDPI `cloudflare_warp.c`): message types 0xC1-0xC4; the
/// initiation keeps its reserved bytes zero; data packets have the counter's high half zero.
/// Never without the port gate: `C1 00 00 00` also starts a QUIC v1 Initial.
#[inline(always)]
fn warp<C: Packet>(ctx: &C, p: Payload, head: [u8; 4]) -> bool {
    match head[0] {
        0xC1 => head[1..4] == [0, 0, 0] && p.len >= WG_COOKIE_LEN,
        0xC2 | 0xC3 => p.len >= WG_COOKIE_LEN,
        0xC4 => p.len >= WG_DATA_MIN_LEN && read::<4>(ctx, p.offset + 12) == Some([0; 4]),
        _ => false,
    }
}

/// SoftEther's NAT-traversal helper (nDPI `softether.c`): `IP=<address>,PORT=<n>`, 10-29 bytes.
#[inline(always)]
fn softether_ip_port<C: Packet>(ctx: &C, p: Payload) -> bool {
    if !(10..30).contains(&p.len) {
        return false;
    }
    // Verifier: a fixed number of bounded reads.
    for start in 3..24 {
        if start + 6 > p.len {
            break;
        }
        if read::<6>(ctx, p.offset + start) == Some(*b",PORT=") {
            return true;
        }
    }
    false
}

/// ZeroTier HELLO (`node/Packet.hpp`): cipher NONE, verb HELLO, protocol version 4-30, and the
/// identity's address (41..46) equal to the packet's source address (13..18), identity type 0.
#[inline(always)]
fn zerotier_hello<C: Packet>(ctx: &C, p: Payload) -> bool {
    let Some(h) = read::<47>(ctx, p.offset) else {
        return false;
    };
    h[18] & 0x38 == 0
        && h[27] & 0x1F == 1
        && (4..=30).contains(&h[28])
        && h[41..46] == h[13..18]
        && h[46] == 0
}

/// All four message types; data packets by their seven fixed bytes and padded length.
#[inline(always)]
fn wireguard<C: Packet>(ctx: &C, p: Payload, head: [u8; 4]) -> bool {
    if head[1..4] != [0, 0, 0] || p.len != p.total {
        return false;
    }
    match head[0] {
        1 => p.len == WG_INIT_LEN || p.len == WG_TUNNELBEAR_INIT_LEN,
        2 => p.len == WG_RESPONSE_LEN || p.len == WG_TUNNELBEAR_RESPONSE_LEN,
        3 => p.len == WG_COOKIE_LEN,
        4 => {
            // The counter is a little-endian u64 that restarts with every key: its high half is 0.
            p.len >= WG_DATA_MIN_LEN
                && (p.len % WG_PADDING == 0 || p.len >= WG_MTU_CAPPED_MIN_LEN)
                && read::<4>(ctx, p.offset + 12) == Some([0; 4])
        }
        _ => false,
    }
}

/// IKEv1/IKEv2 header at `offset`, whose length field must equal the message length (`total`).
#[inline(always)]
fn ike<C: Packet>(ctx: &C, offset: usize, total: usize) -> bool {
    if total < IKE_HEADER_LEN {
        return false;
    }
    let Some(h) = read::<IKE_HEADER_LEN>(ctx, offset) else {
        return false;
    };
    let length = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
    if h[0..8] == [0; 8] || length != total {
        return false;
    }
    let (next_payload, version, exchange, flags) = (h[16], h[17], h[18], h[19]);
    match version {
        IKE_V1 => matches!(exchange, 1..=6 | 32 | 33) && flags < 8 && next_payload <= 13,
        IKE_V2 => {
            matches!(exchange, 34..=37 | 43 | 44)
                && flags & 0xC7 == 0
                && (next_payload == 0 || (33..=54).contains(&next_payload))
        }
        _ => false,
    }
}

/// L2TPv2 on port 1701: control (T, L, S set; version 2; length = payload) or data (T clear,
/// reserved bits clear, version 2).
#[inline(always)]
fn l2tp(p: Payload, head: [u8; 4]) -> bool {
    let flags = be16([head[0], head[1]]);
    if flags == 0xC802 {
        return usize::from(be16([head[2], head[3]])) == p.len;
    }
    flags & 0x8000 == 0 && flags & 0x34F0 == 0 && flags & 0x000F == 2
}

/// Enhanced GRE v1 carrying PPP (RFC 2637): plain GRE v0 never matches.
#[inline(always)]
fn pptp_gre<C: Packet>(ctx: &C, p: Payload) -> Option<VpnProtocol> {
    if p.len < 8 {
        return None;
    }
    let h = read::<4>(ctx, p.offset)?;
    (be16([h[0], h[1]]) & GRE_PPTP_FLAGS_MASK == GRE_PPTP_FLAGS
        && be16([h[2], h[3]]) == GRE_PROTO_PPP)
        .then_some(VpnProtocol::Pptp)
}

#[inline(always)]
fn plausible_time(byte: u8) -> bool {
    (OPENVPN_TIME_MIN..=OPENVPN_TIME_MAX).contains(&byte)
}

/// OpenVPN hard resets (client v2/v3, server v2), with each authentication variant's exact
/// layout: plain, tls-auth with an HMAC of 16/20/32/48/64 bytes, tls-crypt, tls-crypt-v2.
#[inline(always)]
fn openvpn_reset<C: Packet>(ctx: &C, o: usize, len: usize, opcode: u8) -> bool {
    match opcode {
        OPENVPN_CLIENT_RESET_V2 => {
            // plain: op | session id (8) | ack len 0 | message packet id 0
            if len == 14 {
                return read::<5>(ctx, o + 9) == Some([0; 5]);
            }
            // tls-crypt: op | sid | packet id 1 | net_time | tag (32) | ...
            if len == 54
                && let Some(b) = read::<5>(ctx, o + 9)
                && b[0..4] == PACKET_ID_ONE
                && plausible_time(b[4])
            {
                return true;
            }
            // tls-auth: op | sid | HMAC (H) | packet id 1 | net_time | ack len 0 | msg id 0
            let h = match len {
                38 => 16,
                42 => 20,
                54 => 32,
                70 => 48,
                86 => 64,
                _ => return false,
            };
            let Some(b) = read::<13>(ctx, o + 9 + h) else {
                return false;
            };
            b[0..4] == PACKET_ID_ONE && plausible_time(b[4]) && b[8..13] == [0; 5]
        }
        OPENVPN_SERVER_RESET_V2 => {
            // plain: op | sid | ack len 1 | ack id 0 | remote sid | msg id 0 (+6 with early-neg TLV)
            if len == 26 || len == 32 {
                let Some(b) = read::<17>(ctx, o + 9) else {
                    return false;
                };
                return b[0] == 1 && b[1..5] == [0; 4] && b[13..17] == [0; 4];
            }
            // tls-crypt: op | sid | packet id 1 | net_time | tag | encrypted
            if (54..=120).contains(&len)
                && let Some(b) = read::<5>(ctx, o + 9)
                && b[0..4] == PACKET_ID_ONE
                && plausible_time(b[4])
            {
                return true;
            }
            // tls-auth: op | sid | HMAC | pid 1 | time | ack len 1 | ack id 0 | remote sid | msg id 0
            let h = match len {
                50 | 56 => 16,
                54 | 60 => 20,
                66 | 72 => 32,
                82 | 88 => 48,
                98 | 104 => 64,
                _ => return false,
            };
            let Some(b) = read::<25>(ctx, o + 9 + h) else {
                return false;
            };
            b[0..4] == PACKET_ID_ONE
                && plausible_time(b[4])
                && b[8] == 1
                && b[9..13] == [0; 4]
                && b[21..25] == [0; 4]
        }
        OPENVPN_CLIENT_RESET_V3 => {
            // tls-crypt-v2: ... | WKc | u16 length of WKc, at the very end.
            if !(344..1500).contains(&len) {
                return false;
            }
            // Verifier: bound the variable offset of the trailer read.
            let end = masked(len - 2, 0x7FF);
            let Some(wkc) = read::<2>(ctx, o + end) else {
                return false;
            };
            let wkc = usize::from(be16(wkc));
            // Two bytes, not one: see the NAT-T keepalive (a reset this long has them).
            let Some([time, _]) = read::<2>(ctx, o + 13) else {
                return false;
            };
            (290..=len - 54).contains(&wkc) && len - wkc <= 118 && plausible_time(time)
        }
        _ => false,
    }
}

/// The rule of an approval that covers the packet's source or destination for `protocol` (and
/// the endpoint's port, when the approval names one and the packet has ports).
#[inline(always)]
pub fn approved(packet: &IpPacket, protocol: u32) -> Option<u32> {
    let rule = approved_rule(packet, protocol);
    (rule != NO_RULE).then_some(rule)
}

/// `approved` as a plain number, `NO_RULE` for none. Verifier: the egress program's verdict
/// needs it so (LLVM spilled the undefined payload of a `None` there).
#[inline(always)]
pub fn approved_rule(packet: &IpPacket, protocol: u32) -> u32 {
    let (src_port, dst_port) = match packet.l4 {
        L4::Ports {
            src_port_be,
            dst_port_be,
            ..
        } => (src_port_be, dst_port_be),
        _ => ([0; 2], [0; 2]),
    };
    // Verifier: plain numbers, with `NO_GROUP` for no approval, not `Option<u32>`: LLVM may
    // spill the undefined payload of a `None`, and the verifier refuses to read that register.
    let (src_group, dst_group) = match packet.addrs {
        Addrs::V4 { src, dst } => (
            VPN_V4.get(Key::new(32, src)).map_or(NO_GROUP, |g| *g),
            VPN_V4.get(Key::new(32, dst)).map_or(NO_GROUP, |g| *g),
        ),
        Addrs::V6 { src, dst } => (
            VPN_V6.get(Key::new(128, src)).map_or(NO_GROUP, |g| *g),
            VPN_V6.get(Key::new(128, dst)).map_or(NO_GROUP, |g| *g),
        ),
    };
    let rule = match_group(src_group, protocol, src_port);
    if rule != NO_RULE {
        return rule;
    }
    match_group(dst_group, protocol, dst_port)
}

/// For a TCP/UDP packet without a signature: the approval (rule, protocol) whose endpoint is the
/// packet's source address and port (`remote_is_source`) or destination address and port, when
/// the controller said some approval names a port; `(0, NO_VPN)` if none. (Verifier: a
/// sentinel, not `Option`, as for `NO_GROUP`.)
#[inline(always)]
pub fn approved_port(
    packet: &IpPacket,
    config: &Array<Config>,
    remote_is_source: bool,
) -> (u32, u32) {
    let L4::Ports {
        src_port_be,
        dst_port_be,
        ..
    } = packet.l4
    else {
        return (0, NO_VPN);
    };
    if !matches!(
        config.get(0),
        Some(Config {
            port_endpoints: 1,
            ..
        })
    ) {
        return (0, NO_VPN);
    }
    let port_be = if remote_is_source {
        src_port_be
    } else {
        dst_port_be
    };
    let group = match packet.addrs {
        Addrs::V4 { src, dst } => {
            let remote = if remote_is_source { src } else { dst };
            VPN_V4.get(Key::new(32, remote)).map_or(NO_GROUP, |g| *g)
        }
        Addrs::V6 { src, dst } => {
            let remote = if remote_is_source { src } else { dst };
            VPN_V6.get(Key::new(128, remote)).map_or(NO_GROUP, |g| *g)
        }
    };
    let Some(group) = VPN_GROUPS.get(group) else {
        return (0, NO_VPN);
    };
    for i in 0..MAX_APPROVALS_PER_GROUP {
        if i as u32 >= group.count {
            break;
        }
        let a = &group.approvals[i];
        if a.port_be != [0; 2] && a.port_be == port_be {
            return (a.rule, u32::from(a.protocol));
        }
    }
    (0, NO_VPN)
}

/// No approved endpoint covers the address: the first index past `VPN_GROUPS`, which holds
/// nothing.
const NO_GROUP: u32 = MAX_VPN_GROUPS;

/// The rule of the first approval of `group` for `protocol` on `port`, or `NO_RULE`.
#[inline(always)]
fn match_group(group: u32, protocol: u32, port: [u8; 2]) -> u32 {
    let Some(group) = VPN_GROUPS.get(group) else {
        return NO_RULE;
    };
    for i in 0..MAX_APPROVALS_PER_GROUP {
        if i as u32 >= group.count {
            break;
        }
        let a = &group.approvals[i];
        if u32::from(a.protocol) == protocol
            && (a.port_be == [0; 2] || port == [0; 2] || a.port_be == port)
        {
            return a.rule;
        }
    }
    NO_RULE
}
