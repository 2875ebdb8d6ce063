//! The flows that showed a signature only their first packets carry (`OpenVPN`'s resets):
//! remembered so that the rest of the flow is classified too, their ends marked for the fast
//! path, and, for a flow whose reset was not approved, the session id each end's reset carried
//! (docs/vpn-signatures.md, "Flows").

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    maps::{Array, LruHashMap},
    programs::{TcContext, XdpContext},
};
use enforcer_common::{
    Config, FLOW_ACTIVE, FLOW_STRICT, FlowKey, FlowSessions, PEER_SLOTS, peer_slot,
};

use crate::parse::{Addrs, IPPROTO_TCP, IpPacket, L4, Packet, Payload, be16, converge, read};

/// The addresses of remembered flows, one word per slot of `peer_slot`: while flows are
/// remembered, the fast path steps aside only for packets from these (a flow changes the
/// verdict of its own peers' packets, not of everyone's).
#[aya_ebpf::macros::map]
static FLOW_PEERS: Array<u64> = Array::with_max_entries(PEER_SLOTS, crate::source::BPF_F_MMAPABLE);

/// Whether `slot` (`peer_slot` of an address) may hold an end of a remembered flow.
#[inline(always)]
pub fn flow_peer(slot: u32) -> bool {
    FLOW_PEERS.get(slot).is_some_and(|marked| *marked != 0)
}

/// Flows that showed a first-packet-only signature; value: `VpnProtocol`, with `FLOW_ACTIVE`
/// once the flow has a packet after the controller's last sweep.
#[aya_ebpf::macros::map]
pub static VPN_FLOWS: LruHashMap<FlowKey, u8> =
    LruHashMap::with_max_entries(enforcer_common::MAX_VPN_FLOWS, 0);
/// The session id each end's reset carried, for the `FLOW_STRICT` flows of `VPN_FLOWS`.
#[aya_ebpf::macros::map]
static VPN_FLOW_SESSIONS: LruHashMap<FlowKey, FlowSessions> =
    LruHashMap::with_max_entries(enforcer_common::MAX_VPN_FLOWS, 0);

/// The session id of the `OpenVPN` control packet a payload starts with (on TCP, behind its
/// 2-byte length), its 8 bytes read in the host's order; 0 if the payload does not start with
/// a control packet. `tcp`: 1 for a TCP payload.
///
/// Verifier: a global function, like `enforcer_vpn_signature`, so that its packet reads are
/// verified once and not on every path that reaches the flow lookup.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_openvpn_session(
    ctx: *mut xdp_md,
    offset: u64,
    len: u64,
    tcp: u64,
) -> u64 {
    openvpn_session(&XdpContext::new(ctx), offset, len, tcp)
}

/// `enforcer_openvpn_session` for the egress (TC) program.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_openvpn_session_tc(
    skb: *mut __sk_buff,
    offset: u64,
    len: u64,
    tcp: u64,
) -> u64 {
    openvpn_session(&TcContext::new(skb), offset, len, tcp)
}

/// No VPN protocol: a number past `VpnProtocol`'s.
pub const NO_VPN: u32 = u32::MAX;

/// A program context whose payloads the flows read a session id from, each program type
/// through its own global function.
pub trait Sessions: Packet {
    fn openvpn_session(&self, offset: u64, len: u64, tcp: u64) -> u64;
}

impl Sessions for XdpContext {
    #[inline(always)]
    fn openvpn_session(&self, offset: u64, len: u64, tcp: u64) -> u64 {
        enforcer_openvpn_session(self.ctx, offset, len, tcp)
    }
}

impl Sessions for TcContext {
    #[inline(always)]
    fn openvpn_session(&self, offset: u64, len: u64, tcp: u64) -> u64 {
        enforcer_openvpn_session_tc(self.skb.skb, offset, len, tcp)
    }
}

/// Control opcodes (the top 5 bits of the first byte), whose packets carry the sender's
/// session id right after it: the hard and soft resets, `P_CONTROL_V1`, `P_ACK_V1`,
/// `P_CONTROL_WKC_V1`. Data packets (6, 9) carry none.
#[inline(always)]
fn openvpn_control(opcode: u8) -> bool {
    matches!(opcode >> 3, 1..=5 | 7 | 8 | 10 | 11)
}

#[inline(always)]
fn openvpn_session<C: Packet>(ctx: &C, offset: u64, len: u64, tcp: u64) -> u64 {
    let p = converge(Payload {
        offset: offset as usize,
        len: len as usize,
        total: len as usize,
    });
    // Opcode and session id, behind the length on TCP (which must cover them).
    let head = if tcp != 0 {
        match read::<11>(ctx, p.offset) {
            Some(b) if p.len >= 11 && be16([b[0], b[1]]) >= 9 => {
                [b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10]]
            }
            _ => return 0,
        }
    } else {
        match read::<9>(ctx, p.offset) {
            Some(b) if p.len >= 9 => b,
            _ => return 0,
        }
    };
    if !openvpn_control(head[0]) {
        return 0;
    }
    u64::from_ne_bytes([
        head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8],
    ])
}

/// The flow's key, and whether the packet's sender is its `lo` end.
#[inline(always)]
fn flow_key(packet: &IpPacket, src_port: [u8; 2], dst_port: [u8; 2]) -> (FlowKey, bool) {
    let mut key = FlowKey {
        proto: packet.proto,
        ..FlowKey::default()
    };
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    match packet.addrs {
        Addrs::V4 { src, dst } => {
            key.family = 4;
            a[..4].copy_from_slice(&src);
            b[..4].copy_from_slice(&dst);
        }
        Addrs::V6 { src, dst } => {
            key.family = 6;
            a = src;
            b = dst;
        }
    }
    let from_lo = (a, src_port) <= (b, dst_port);
    if from_lo {
        (key.lo_addr, key.lo_port, key.hi_addr, key.hi_port) = (a, src_port, b, dst_port);
    } else {
        (key.lo_addr, key.lo_port, key.hi_addr, key.hi_port) = (b, dst_port, a, src_port);
    }
    (key, from_lo)
}

/// Remembers the flow of a TCP or UDP packet whose signature only the first packets of a flow
/// carry, so that the rest of it is classified too; and tells the fast path that flows exist.
/// `approved`: the reset passes as an approved VPN. An unapproved flow is `FLOW_STRICT`, and
/// the session id its reset carried is kept for the sender's end.
#[inline(always)]
pub fn remember_flow<C: Sessions>(
    ctx: &C,
    packet: &IpPacket,
    protocol: u32,
    approved: bool,
    config: &Array<Config>,
) {
    let L4::Ports {
        src_port_be,
        dst_port_be,
        payload,
        ..
    } = packet.l4
    else {
        return;
    };
    let (key, from_lo) = flow_key(packet, src_port_be, dst_port_be);
    let strict = if approved { 0 } else { FLOW_STRICT };
    let _ = VPN_FLOWS.insert(&key, protocol as u8 | FLOW_ACTIVE | strict, 0);
    if !approved {
        let session = ctx.openvpn_session(
            payload.offset as u64,
            payload.len as u64,
            u64::from(packet.proto == IPPROTO_TCP),
        );
        match VPN_FLOW_SESSIONS.get_ptr_mut(&key) {
            // SAFETY: a pointer into a live map value; one aligned word stored.
            Some(sessions) if from_lo => unsafe { (*sessions).lo = session },
            // SAFETY: as above.
            Some(sessions) => unsafe { (*sessions).hi = session },
            None => {
                let sessions = if from_lo {
                    FlowSessions { lo: session, hi: 0 }
                } else {
                    FlowSessions { lo: 0, hi: session }
                };
                let _ = VPN_FLOW_SESSIONS.insert(&key, &sessions, 0);
            }
        }
    }
    // Both ends: a packet from either may belong to the flow.
    for addr in [&key.lo_addr, &key.hi_addr] {
        if let Some(slot) = FLOW_PEERS.get_ptr_mut(peer_slot(addr, key.family)) {
            // SAFETY: a pointer into the array's value; one aligned word stored.
            unsafe { *slot = 1 };
        }
    }
    if let Some(c) = config.get_ptr_mut(0) {
        // SAFETY: points into the single-entry config array; a racing write stores the same 1.
        unsafe { (*c).vpn_flows_seen = 1 };
    }
}

/// The VPN protocol of a remembered flow this packet belongs to, or `NO_VPN`. The packets of a
/// `FLOW_STRICT` flow belong to it only if they are control packets carrying the session id of
/// their end's reset: anything else from that address and port (an allowed client's own
/// traffic, if the reset was spoofed) is ordinary traffic.
#[inline(always)]
pub fn known_flow<C: Sessions>(
    ctx: &C,
    packet: &IpPacket,
    src_port: [u8; 2],
    dst_port: [u8; 2],
    config: &Array<Config>,
) -> u32 {
    // Ordinary traffic skips the hash lookup while no flow is remembered (the flag is set with
    // the first, and cleared by the controller's sweep once it has forgotten the last).
    if !matches!(
        config.get(0),
        Some(Config {
            vpn_flows_seen: 1,
            ..
        })
    ) {
        return NO_VPN;
    }
    let (key, from_lo) = flow_key(packet, src_port, dst_port);
    let Some(value) = VPN_FLOWS.get_ptr_mut(&key) else {
        return NO_VPN;
    };
    // SAFETY: the pointer is to a live map value of one byte.
    let seen = unsafe { *value };
    if seen & FLOW_STRICT != 0 {
        let L4::Ports { payload, .. } = packet.l4 else {
            return NO_VPN;
        };
        let session = ctx.openvpn_session(
            payload.offset as u64,
            payload.len as u64,
            u64::from(packet.proto == IPPROTO_TCP),
        );
        let expected = match VPN_FLOW_SESSIONS.get_ptr(&key) {
            // SAFETY: a pointer to a live map value; one aligned word read.
            Some(sessions) if from_lo => unsafe { (*sessions).lo },
            // SAFETY: as above.
            Some(sessions) => unsafe { (*sessions).hi },
            None => 0,
        };
        if session == 0 || session != expected {
            return NO_VPN;
        }
    }
    // Marked once per flow and sweep period, not on every packet (other CPUs read the line).
    // A sweep racing this write may clear the mark again: the flow is then forgotten only
    // after a whole further period without a packet.
    if seen & FLOW_ACTIVE == 0 {
        // SAFETY: as above.
        unsafe { *value = seen | FLOW_ACTIVE };
    }
    u32::from(seen & !(FLOW_ACTIVE | FLOW_STRICT))
}
