//! The fast path: the verdict on the commonest packets, an untagged IPv4 or IPv6 TCP/UDP
//! datagram (from a source the registry does not list, denies or allows: a flood, or the
//! e-Office's own traffic), in a few reads, before the full parse. It decides only where
//! `decide` would decide the same, and counts the same; anything else (VLAN tags, IPv4 options,
//! IPv6 extension headers, fragments, other protocols, a payload that could carry a VPN
//! signature, or a VPN state that needs the full stage) goes the full way.

use aya_ebpf::programs::XdpContext;
use enforcer_common::{Config, RULE_ANY_PORT, RULE_DENY, Reason};

use crate::{
    CONFIG, Verdict, conn, deny_reason, entry_flags, events, flows, parse, port_listed, record,
    source, vpn,
};

/// Returned when the full path must decide (no XDP action has this number).
pub const UNDECIDED: u32 = u32::MAX;
/// In `Fast::entry`: the fast path did not look the source up.
pub const NOT_LOOKED_UP: u32 = u32::MAX;

/// The fast path's answer: the XDP action, or `UNDECIDED` with what its source lookup found
/// (`rule + 1`, 0 for no entry, or `NOT_LOOKED_UP`), so that the full path need not look again
/// (an IPv6 lookup is a call with hash probes).
pub struct Fast {
    pub action: u32,
    pub entry: u32,
}

const fn undecided(entry: u32) -> Fast {
    Fast {
        action: UNDECIDED,
        entry,
    }
}

const fn decided(action: u32) -> Fast {
    Fast {
        action,
        entry: NOT_LOOKED_UP,
    }
}

/// The verdict `decide` would reach, if the fast path can tell (see the module note): counted
/// by `record` as the full path would, and carried out; the XDP action, or `UNDECIDED` (see
/// `Fast`).
///
/// Inlined: since the VPN signatures became a function the kernel verifies once on its own,
/// the rest of the program is cheap to walk again for each way out of this one (78,800
/// instructions verified in all, against 71,200 with this as a global function), and the call
/// cost 2 ns a packet.
#[inline(always)]
pub fn decide(ctx: &XdpContext) -> Fast {
    let Some(&Config {
        mode,
        vpn_flows_seen,
        port_endpoints: 0,
        generation,
    }) = CONFIG.get(0)
    else {
        // Some approval names a port (a packet from it passes without a signature).
        return undecided(NOT_LOOKED_UP);
    };
    if let Some(p) = parse::plain_v4(ctx) {
        // A remembered stateful VPN flow changes the verdict of its own peers' packets only.
        if vpn_flows_seen != 0 && flows::flow_peer(enforcer_common::peer_slot_v4(p.src)) {
            return undecided(NOT_LOOKED_UP);
        }
        let peer = || conn::peer_may_have_conn(enforcer_common::peer_slot_v4(p.src));
        let source = || {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&p.src);
            (addr, 4)
        };
        return finish(
            ctx,
            mode,
            source::v4(p.src, generation),
            &p.transport,
            (peer, source),
        );
    }
    if let Some(p) = parse::plain_v6(ctx) {
        if vpn_flows_seen != 0 && flows::flow_peer(enforcer_common::peer_slot(&p.src, 6)) {
            return undecided(NOT_LOOKED_UP);
        }
        let peer = || conn::peer_may_have_conn(enforcer_common::peer_slot(&p.src, 6));
        let source = || (p.src, 6);
        return finish(
            ctx,
            mode,
            source::v6(&p.src, generation),
            &p.transport,
            (peer, source),
        );
    }
    undecided(NOT_LOOKED_UP)
}

/// The verdict on a plain TCP/UDP packet whose source lookup found `entry` (`rule + 1`, or 0).
/// `peer`: whether the server may have a connection with the source (then a packet that would
/// drop may be a reply, which the full path decides); `source`: the source address as the
/// access log keys it.
#[inline(always)]
fn finish(
    ctx: &XdpContext,
    mode: u32,
    entry: u32,
    transport: &parse::Transport,
    (peer, source): (impl Fn() -> bool, impl Fn() -> ([u8; 16], u8)),
) -> Fast {
    let parse::Transport {
        proto,
        src_port_be,
        dst_port_be,
        tcp_flags,
        payload,
    } = *transport;
    let rule = entry.wrapping_sub(1);
    let flags = entry_flags(entry);
    // 3. A deny range decides before the VPN stage.
    if entry != 0 && flags & RULE_DENY != 0 {
        return decided(record(ctx, mode, Verdict::new(deny_reason(flags), rule)));
    }
    // 4. The VPN stage decides if the payload could carry a signature (whatever the source).
    let (src_port, dst_port) = (
        u16::from_be_bytes(src_port_be),
        u16::from_be_bytes(dst_port_be),
    );
    let may_be_vpn = if proto == parse::IPPROTO_UDP {
        vpn::udp_may_match(ctx, src_port, dst_port, payload)
    } else {
        vpn::tcp_may_match(ctx, payload)
    };
    if may_be_vpn {
        return undecided(entry);
    }
    // 5. An allowed source's ports, as `check_ports` decides them for a whole datagram.
    if entry != 0 && (flags & RULE_ANY_PORT != 0 || port_listed(rule, proto, dst_port_be)) {
        let opens = if proto == parse::IPPROTO_UDP {
            let (addr, family) = source();
            events::udp_opens(addr, family, proto, src_port_be, dst_port_be)
        } else {
            parse::opens(proto, tcp_flags)
        };
        return decided(record(ctx, mode, Verdict::allowed(rule, opens)));
    }
    // 6. A packet that would drop may answer a connection the server opened: one array read
    //    says whether the server has any with this source.
    if peer() {
        return undecided(entry);
    }
    if entry != 0 {
        return decided(record(
            ctx,
            mode,
            Verdict::new(Reason::PortNotAllowed, rule),
        ));
    }
    // A constant verdict: the compiler folds the accounting to one counter slot.
    decided(record(
        ctx,
        mode,
        Verdict::without_rule(Reason::NotAllowlisted),
    ))
}
