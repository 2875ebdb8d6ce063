//! The enforcer's XDP program: one entry, a `decide` core that returns which rule decided, and
//! one exit that counts the verdict and carries it out (or, in monitor mode, only counts it).
//! Beside it, the egress (TC) program: the verdict on the server's outgoing traffic (`egress`)
//! and the connections the server opens (`conn`).
#![no_std]
#![no_main]
// `atomic_xadd`: the bpfel target has no atomic read-modify-write in `core::sync::atomic`, but
// LLVM lowers this intrinsic to BPF's atomic add.
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add on this target"
)]

mod conn;
mod egress;
mod events;
mod fast;
mod flows;
mod parse;
mod source;
mod vpn;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use enforcer_common::{
    Action, Config, Counter, FragmentKey, MAX_PORT_RULES, MAX_RULES, MAX_TRACKED_FRAGMENTS,
    MODE_ENFORCE, MODE_MONITOR, MONITOR_SLOT_OFFSET, NO_RULE, PortKey, RULE_ANY_PORT, RULE_DENY,
    RULE_FEED, RULE_ICMP, Reason, Rule, VERDICT_SLOTS, VPN_VERDICT_SLOTS,
};
use parse::{Addrs, Fragment, Frame, IpPacket, L4, Malformed};

// Map names match `enforcer_common::map_names`.
/// Rule index → what the rule allows beyond its source prefix (and, for the controller, the
/// prefix itself). Memory-mapped by the controller, which writes whole policies at once.
#[map]
static RULES: Array<Rule> = Array::with_max_entries(MAX_RULES, source::BPF_F_MMAPABLE);
/// (rule, protocol, destination port) triples of port-restricted rules.
#[map]
static PORT_RULES: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_PORT_RULES, 0);
/// Rule index → packets it decided. Shared across CPUs (a per-CPU array of a million rules
/// would cost memory per possible CPU); bumped atomically.
#[map]
static RULE_HITS: Array<u64> = Array::with_max_entries(MAX_RULES, source::BPF_F_MMAPABLE);
#[map]
static VERDICTS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(VERDICT_SLOTS, 0);
/// The mode lives in a map, not a load-time global, so that the controller can switch between
/// monitor and enforce without reloading the program (a reload would open a gap).
#[map]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, u8> =
    LruHashMap::with_max_entries(MAX_TRACKED_FRAGMENTS, 0);
/// Per-CPU VPN verdicts by protocol: slot `protocol * 2` unapproved, `+ 1` approved.
#[map]
static VPN_VERDICTS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(VPN_VERDICT_SLOTS, 0);

/// Load-time switch (read-only data, so the verifier prunes the stage when it is 0): the
/// enforcer always runs with the VPN stage; benchmarks load it without to measure its cost.
#[unsafe(no_mangle)]
static VPN_STAGE: u8 = 1;
/// Load-time switch for the fast path (`fast.rs`), likewise: tests load the program without it
/// to check that it reaches the verdicts of the full path.
#[unsafe(no_mangle)]
static FAST_PATH: u8 = 1;

/// Which reason decided, which registry entry (or `NO_RULE`), and the VPN protocol recognised.
#[derive(Clone, Copy)]
pub(crate) struct Verdict {
    reason: Reason,
    rule: u32,
    /// `VpnProtocol as u32`, or `vpn::NO_VPN`.
    vpn: u32,
    /// 1 for an allowed packet that opens a flow (a TCP SYN): the access log's event.
    opens: u32,
}

impl Verdict {
    const fn new(reason: Reason, rule: u32) -> Self {
        Self {
            reason,
            rule,
            vpn: vpn::NO_VPN,
            opens: 0,
        }
    }
    const fn without_rule(reason: Reason) -> Self {
        Self {
            reason,
            rule: NO_RULE,
            vpn: vpn::NO_VPN,
            opens: 0,
        }
    }
    /// An allowed packet of `rule`; `opens`: it opens a flow (see `parse::opens`).
    const fn allowed(rule: u32, opens: bool) -> Self {
        Self {
            reason: Reason::Allowed,
            rule,
            vpn: vpn::NO_VPN,
            opens: opens as u32,
        }
    }
}

#[xdp]
pub fn enforcer(ctx: XdpContext) -> u32 {
    // SAFETY: a read of a load-time constant; volatile so the compiler keeps the global.
    let mut known = fast::NOT_LOOKED_UP;
    if unsafe { core::ptr::read_volatile(&raw const FAST_PATH) } != 0 {
        let fast = fast::decide(&ctx);
        if fast.action != fast::UNDECIDED {
            return fast.action;
        }
        known = fast.entry;
    }
    let verdict = decide(&ctx, known);
    let mode = CONFIG.get(0).map_or(MODE_ENFORCE, |c| c.mode);
    record(&ctx, mode, verdict)
}

/// The server's outgoing traffic: the egress verdict, then the connections it opens (`conn`),
/// so that their replies pass ingress.
#[classifier]
pub fn enforcer_egress(ctx: TcContext) -> i32 {
    egress::run(&ctx)
}

/// The policy, in order; the first step that decides wins. `known`: what the fast path's
/// lookup of this packet's source found, or `fast::NOT_LOOKED_UP`.
#[inline(always)]
fn decide(ctx: &XdpContext, known: u32) -> Verdict {
    // 1. Link-layer control the link needs (ARP, NDP, MLD) passes; 2. malformed or truncated
    //    headers drop; frames that are not IP drop.
    let packet = match parse::parse_frame(ctx) {
        Ok(Frame::Ip(packet)) => packet,
        Ok(Frame::LinkControl) => return Verdict::without_rule(Reason::LinkControl),
        Ok(Frame::NonIp) => return Verdict::without_rule(Reason::NonIp),
        Err(Malformed) => return Verdict::without_rule(Reason::Malformed),
    };
    // 3. One longest-prefix lookup of the source finds the deciding entry: deny ranges (registry
    //    and feeds) and approved networks share the lookup tables, and the compiler leaves out
    //    every approved prefix that lies inside a deny range, so the deny list beats every
    //    allow. The tables in force are the generation `CONFIG` names, read once per packet.
    let generation = CONFIG.get(0).map_or(0, |c| c.generation);
    // `rule + 1`, or 0 for no entry (a number, not an `Option`: see `source::v4`).
    let entry = match &packet.addrs {
        _ if known != fast::NOT_LOOKED_UP => known,
        Addrs::V4 { src, .. } => source::v4(*src, generation),
        Addrs::V6 { src, .. } => source::v6(src, generation),
    };
    let listed = entry != 0;
    let rule = entry.wrapping_sub(1);
    let flags = entry_flags(entry);
    if listed && flags & RULE_DENY != 0 {
        return Verdict::new(deny_reason(flags), rule);
    }
    // 4. A VPN packet passes only to or from an endpoint approved for its protocol, whatever
    //    its source: an allowlisted network may not open an unapproved VPN either.
    // SAFETY: a read of a load-time constant; volatile so the compiler keeps the global.
    let vpn_stage = unsafe { core::ptr::read_volatile(&raw const VPN_STAGE) } != 0;
    if !vpn_stage {
        // (benchmark baseline only: straight to the allowlist)
    } else if let found = vpn::classify(ctx, &packet, &CONFIG)
        && found != vpn::NO_VPN
    {
        let protocol = found & vpn::PROTOCOL;
        let approval = vpn::approved(&packet, protocol);
        // An OpenVPN reset is remembered only for a flow that could pass (an allowlisted
        // source, or an approval): the rest of any other flow drops as not allowlisted anyway,
        // and a reset from anywhere would otherwise turn the fast path off (`vpn_flows_seen`).
        if found & vpn::STATEFUL != 0 && (listed || approval.is_some()) {
            flows::remember_flow(ctx, &packet, protocol, approval.is_some(), &CONFIG);
        }
        let (reason, rule) = match approval {
            Some(rule) => (Reason::ApprovedVpn, rule),
            None => (Reason::UnapprovedVpn, NO_RULE),
        };
        return Verdict {
            reason,
            rule,
            vpn: protocol,
            opens: 0,
        };
    }
    //    The signature-less packets of a VPN over TCP (SYN-ACK, ACKs) from an approved
    //    endpoint's address and port belong to that approved VPN.
    if vpn_stage
        && let (rule, protocol) = vpn::approved_port(&packet, &CONFIG, true)
        && protocol != vpn::NO_VPN
    {
        return Verdict {
            reason: Reason::ApprovedVpn,
            rule,
            vpn: protocol,
            opens: 0,
        };
    }
    // 5. The source allowlist (networks and devices; longest prefix wins) and the matched
    //    entry's ports; 6. a reply to a connection the server opened passes whatever its
    //    source and ports (but not past the deny list or the VPN stage above); 7. otherwise
    //    drop.
    let reason = if listed {
        check_ports(&packet, rule, flags)
    } else {
        Reason::NotAllowlisted
    };
    if matches!(reason, Reason::NotAllowlisted | Reason::PortNotAllowed) && is_reply(&packet) {
        return Verdict::without_rule(Reason::EstablishedReply);
    }
    if listed {
        // The access log's first packet of a flow: a TCP SYN; a UDP datagram of a flow not
        // seen lately (`events::udp_opens`). (ICMP echoes are not logged: their extra branch
        // passed the 512-byte stack limit of this frame.)
        let opens = match packet.l4 {
            L4::Ports {
                src_port_be,
                dst_port_be,
                ..
            } if packet.proto == parse::IPPROTO_UDP && reason == Reason::Allowed => {
                let (addr, family) = match packet.addrs {
                    Addrs::V4 { src, .. } => {
                        let mut addr = [0u8; 16];
                        addr[..4].copy_from_slice(&src);
                        (addr, 4)
                    }
                    Addrs::V6 { src, .. } => (src, 6),
                };
                events::udp_opens(addr, family, packet.proto, src_port_be, dst_port_be)
            }
            L4::Ports { tcp_flags, .. } => parse::opens(packet.proto, tcp_flags),
            _ => false,
        };
        if reason == Reason::Allowed {
            return Verdict::allowed(rule, opens);
        }
        Verdict::new(reason, rule)
    } else {
        Verdict::without_rule(reason)
    }
}

/// Whether a packet answers a connection the server opened (`conn`). A later fragment carries
/// no ports: it passes if its first fragment passed as a reply (remembered in `FRAGMENTS`).
#[inline(always)]
fn is_reply(packet: &IpPacket) -> bool {
    if !conn::peer_of(packet) {
        return false;
    }
    if let L4::Unknown = packet.l4 {
        return FRAGMENTS.get_ptr(fragment_key(packet)).is_some();
    }
    if !conn::is_reply(packet) {
        return false;
    }
    if let Fragment::First { .. } = packet.fragment {
        // If the LRU map cannot take it, the later fragments drop: fail closed.
        let _ = FRAGMENTS.insert(fragment_key(packet), 1, 0);
    }
    true
}

/// The port/protocol part of an allowlist entry. Fragments: the first fragment carries the ports
/// and is checked like a whole datagram; if it passes, its (addresses, id, protocol) are
/// remembered so that the later fragments, which carry no ports, pass too. A later fragment
/// nobody remembers is dropped: fragmenting cannot bypass the port check.
#[inline(always)]
fn check_ports(packet: &IpPacket, rule: u32, flags: u32) -> Reason {
    if flags & RULE_ANY_PORT != 0 {
        return Reason::Allowed;
    }
    let allowed = match packet.l4 {
        L4::Ports { dst_port_be, .. } => port_listed(rule, packet.proto, dst_port_be),
        L4::Icmp { .. } => flags & RULE_ICMP != 0,
        L4::Other { .. } => false,
        L4::Unknown => {
            return if FRAGMENTS.get_ptr(fragment_key(packet)).is_some() {
                Reason::Allowed
            } else {
                Reason::FragmentUnverified
            };
        }
    };
    if !allowed {
        return Reason::PortNotAllowed;
    }
    if let Fragment::First { .. } = packet.fragment {
        // If the LRU map cannot take it, the later fragments drop: fail closed.
        let _ = FRAGMENTS.insert(fragment_key(packet), 1, 0);
    }
    Reason::Allowed
}

/// The `RULE_*` flags of the entry the source lookup found (`rule + 1`), or 0 for none.
#[inline(always)]
pub(crate) fn entry_flags(entry: u32) -> u32 {
    if entry == 0 {
        return 0;
    }
    RULES.get(entry - 1).map_or(0, |r| r.flags)
}

/// Why a deny range with these flags drops: a registry entry or a deny feed.
#[inline(always)]
pub(crate) const fn deny_reason(flags: u32) -> Reason {
    if flags & RULE_FEED != 0 {
        Reason::DeniedFeed
    } else {
        Reason::Denied
    }
}

/// Whether a port-restricted rule lists (protocol, destination port).
#[inline(always)]
pub(crate) fn port_listed(rule: u32, proto: u8, port_be: [u8; 2]) -> bool {
    let key = PortKey {
        rule,
        port_be,
        proto,
        _pad: 0,
    };
    PORT_RULES.get_ptr(key).is_some()
}

#[inline(always)]
pub(crate) fn fragment_key(packet: &IpPacket) -> FragmentKey {
    let id = match packet.fragment {
        Fragment::First { id } | Fragment::Later { id } => id,
        Fragment::Whole => [0; 4],
    };
    let mut key = FragmentKey {
        id,
        proto: packet.proto,
        ..FragmentKey::default()
    };
    match packet.addrs {
        Addrs::V4 { src, dst } => {
            key.family = 4;
            key.src[..4].copy_from_slice(&src);
            key.dst[..4].copy_from_slice(&dst);
        }
        Addrs::V6 { src, dst } => {
            key.family = 6;
            key.src = src;
            key.dst = dst;
        }
    }
    key
}

/// The one exit (of the fast path too): count the verdict (per CPU, by reason; per rule), then carry it out. In monitor
/// mode a drop is counted in its monitor slot and the packet passes.
#[inline(always)]
fn record(ctx: &XdpContext, mode: u32, verdict: Verdict) -> u32 {
    let monitor = mode == MODE_MONITOR;
    let drop = matches!(verdict.reason.action(), Action::Drop);
    let slot = if drop && monitor {
        MONITOR_SLOT_OFFSET + verdict.reason as u32
    } else {
        verdict.reason as u32
    };
    if let Some(counter) = VERDICTS.get_ptr_mut(slot) {
        // SAFETY: the pointer is this CPU's own slot of a per-CPU array; nothing else writes it
        // while this program runs on this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += parse::frame_len(ctx);
        }
    }
    count_vpn(verdict, parse::frame_len(ctx));
    let flags = if drop && monitor {
        enforcer_common::EVENT_MONITOR
    } else {
        0
    };
    events::offer(ctx, verdict, drop, flags);
    if verdict.rule != NO_RULE
        && let Some(hits) = RULE_HITS.get_ptr_mut(verdict.rule)
    {
        bump(hits);
    }
    if drop && !monitor {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Counts a VPN packet (of either direction) by protocol and approval.
#[inline(always)]
pub(crate) fn count_vpn(verdict: Verdict, bytes: u64) {
    if verdict.vpn == vpn::NO_VPN {
        return;
    }
    let slot = verdict.vpn * 2 + u32::from(verdict.reason == Reason::ApprovedVpn);
    if let Some(counter) = VPN_VERDICTS.get_ptr_mut(slot) {
        // SAFETY: this CPU's own slot of a per-CPU array; nothing else writes it meanwhile.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

/// Adds one to a rule's hit counter, which other CPUs may bump at the same time.
#[inline(always)]
pub(crate) fn bump(hits: *mut u64) {
    // SAFETY: `hits` points into a map value that lives as long as the map; the add is atomic.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hits, 1) };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
