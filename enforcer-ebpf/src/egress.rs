//! The server's outgoing traffic: the egress verdict (which destinations the server may reach),
//! its counters, and the connection table it feeds (`conn`). The egress mode lives in a map of
//! its own, so that the controller switches it live, apart from the ingress mode.

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use enforcer_common::{
    Action, Counter, EGRESS_MONITOR, EGRESS_OFF, EgressConfig, MAX_RULES, MAX_UPSTREAM_GROUPS,
    MAX_UPSTREAMS_PER_GROUP, MONITOR_SLOT_OFFSET, NO_RULE, RULE_DENY, RULE_ICMP, Reason,
    UpstreamGroup, VERDICT_SLOTS,
};

use crate::{
    CONFIG, FRAGMENTS, Verdict, conn, deny_reason, entry_flags, flows, fragment_key,
    parse::{self, Addrs, Fragment, Frame, IpPacket, L4, Malformed},
    port_listed, source, vpn,
};

// Map names match `enforcer_common::map_names`.
/// Upstream prefixes (destinations) → group index in `UPSTREAM_GROUPS`.
#[map]
static UPSTREAM_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_UPSTREAM_GROUPS, 0);
#[map]
static UPSTREAM_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_UPSTREAM_GROUPS, 0);
#[map]
static UPSTREAM_GROUPS: Array<UpstreamGroup> = Array::with_max_entries(MAX_UPSTREAM_GROUPS, 0);
#[map]
static EGRESS_CONFIG: Array<EgressConfig> = Array::with_max_entries(1, 0);
/// Per-CPU egress verdicts by reason (monitor slots as in `VERDICTS`).
#[map]
static EGRESS_VERDICTS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(VERDICT_SLOTS, 0);
/// Rule index → outgoing packets it decided (see `RULE_HITS`).
#[map]
static EGRESS_RULE_HITS: Array<u64> = Array::with_max_entries(MAX_RULES, source::BPF_F_MMAPABLE);

/// What egress parsing reads: Ethernet, two VLAN tags, IPv6, a full TCP header, and the first
/// 128 bytes of payload where the VPN signatures look (the socket buffer's linear part may hold
/// less; a signature that would read further, such as an `OpenVPN` tls-crypt-v2 reset's trailer,
/// is then not seen on the way out).
const EGRESS_HEADERS: u32 = 14 + 8 + 40 + 60 + 128;
/// No upstream group: a number past the last slot.
const NO_GROUP: u32 = u32::MAX;

/// One outgoing packet: its verdict (unless egress is off), counted, carried out; then, if it
/// leaves, what it does to the connection table.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    // The headers must be in the socket buffer's linear part to be read.
    if ((ctx.data_end() - ctx.data()) as u32) < EGRESS_HEADERS && ctx.len() > 14 {
        let want = if ctx.len() < EGRESS_HEADERS {
            ctx.len()
        } else {
            EGRESS_HEADERS
        };
        let _ = ctx.pull_data(want);
    }
    let mode = EGRESS_CONFIG.get(0).map_or(EGRESS_OFF, |c| c.mode);
    if mode != EGRESS_OFF && !record(ctx, mode, unpack(enforcer_egress_verdict(ctx.skb.skb))) {
        return TC_ACT_SHOT;
    }
    enforcer_egress_track(ctx.skb.skb);
    // "Next": other TC programs on the interface still run.
    TC_ACT_UNSPEC
}

// Verifier: the verdict and the connection table's update are global functions (exported, so
// the kernel verifies each once, on its own), each parsing the frame itself. Inlined into one
// program, the parsed packet, the lookup keys and the connection keys shared one stack frame of
// over 500 bytes, past the 512 the kernel allows a chain of calls (the IPv6 lookup's call adds
// 64); passing the parsed packet to a call instead makes LLVM keep copies of it in both frames.
// The second parse costs a few ns on a path that is not the flood's.

/// The egress verdict of the packet in `skb`, packed (see `pack`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_egress_verdict(skb: *mut __sk_buff) -> u64 {
    let ctx = TcContext::new(skb);
    pack(match parse::parse_frame(&ctx) {
        Ok(Frame::Ip(packet)) => decide(&ctx, &packet),
        Ok(Frame::LinkControl) => Verdict::without_rule(Reason::LinkControl),
        Ok(Frame::NonIp) => Verdict::without_rule(Reason::NonIp),
        Err(Malformed) => Verdict::without_rule(Reason::Malformed),
    })
}

/// Records what the packet in `skb`, which leaves, does to the connection table (`conn`).
/// Returns 0 (a global function returns a number).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_egress_track(skb: *mut __sk_buff) -> u32 {
    let ctx = TcContext::new(skb);
    if let Ok(Frame::Ip(packet)) = parse::parse_frame(&ctx) {
        conn::track(&packet);
    }
    0
}

/// A verdict as one number: the reason in bits 40 to 47, the VPN protocol (or `vpn::NO_VPN`) in
/// bits 32 to 39, the rule in the low half.
#[inline(always)]
fn pack(verdict: Verdict) -> u64 {
    (verdict.reason as u64) << 40 | u64::from(verdict.vpn & 0xFF) << 32 | u64::from(verdict.rule)
}

#[inline(always)]
fn unpack(packed: u64) -> Verdict {
    let reason = match Reason::try_from(((packed >> 40) & 0xFF) as u32) {
        Ok(reason) => reason,
        Err(_) => Reason::EgressDenied,
    };
    let vpn = match ((packed >> 32) & 0xFF) as u32 {
        0xFF => vpn::NO_VPN,
        protocol => protocol,
    };
    Verdict {
        reason,
        rule: packed as u32,
        vpn,
        opens: 0,
    }
}

/// The egress policy, in order; the first step that decides wins. (1. Link-layer control
/// passes, and malformed or non-IP frames are counted as on ingress: `run`.)
#[inline(always)]
fn decide(ctx: &TcContext, packet: &IpPacket) -> Verdict {
    // 2. A denied destination drops: the destination's longest prefix in the source tables,
    //    which hold the deny ranges, the approved networks and the devices (deny beats allow as
    //    on ingress).
    let generation = CONFIG.get(0).map_or(0, |c| c.generation);
    let entry = match &packet.addrs {
        Addrs::V4 { dst, .. } => source::v4(*dst, generation),
        Addrs::V6 { dst, .. } => source::v6(dst, generation),
    };
    let rule = entry.wrapping_sub(1);
    let flags = entry_flags(entry);
    if entry != 0 && flags & RULE_DENY != 0 {
        return Verdict::new(deny_reason(flags), rule);
    }
    // 3. A VPN packet leaves only towards an endpoint approved for its protocol, as on ingress:
    //    whatever its destination's approval or upstream ports.
    if let found = vpn::classify(ctx, packet, &CONFIG)
        && found != vpn::NO_VPN
    {
        let protocol = found & vpn::PROTOCOL;
        let rule = vpn::approved_rule(packet, protocol);
        // Remembered only for a flow that could pass (see the ingress stage).
        if found & vpn::STATEFUL != 0 && (entry != 0 || rule != NO_RULE) {
            flows::remember_flow(ctx, packet, protocol, rule != NO_RULE, &CONFIG);
        }
        let reason = if rule == NO_RULE {
            Reason::UnapprovedVpn
        } else {
            Reason::ApprovedVpn
        };
        return Verdict {
            reason,
            rule,
            vpn: protocol,
            opens: 0,
        };
    }
    //    The signature-less packets of a VPN over TCP (SYN, ACKs) to an approved endpoint's
    //    address and port belong to that approved VPN.
    if let (rule, protocol) = vpn::approved_port(packet, &CONFIG, false)
        && protocol != vpn::NO_VPN
    {
        return Verdict {
            reason: Reason::ApprovedVpn,
            rule,
            vpn: protocol,
            opens: 0,
        };
    }
    // 4. A destination in an approved network or device passes, on any port: answers to
    //    approved clients, and connections to them.
    if entry != 0 {
        return Verdict::new(Reason::Allowed, rule);
    }
    // 5. An upstream passes on its ports; 6. anything else is `egress_denied`.
    let rule = upstream(packet);
    if rule != NO_RULE {
        return Verdict::new(Reason::Upstream, rule);
    }
    if let L4::Unknown = packet.l4 {
        // A later fragment carries no ports: it leaves if its first fragment left to an
        // upstream (remembered in `FRAGMENTS`).
        return if FRAGMENTS.get_ptr(fragment_key(packet)).is_some() {
            Verdict::without_rule(Reason::Upstream)
        } else {
            Verdict::without_rule(Reason::FragmentUnverified)
        };
    }
    Verdict::without_rule(Reason::EgressDenied)
}

/// The upstream rule that lets this packet out (the longest prefix first), or `NO_RULE`.
#[inline(always)]
fn upstream(packet: &IpPacket) -> u32 {
    // Verifier: a plain number with `NO_GROUP`, not an `Option` (see `vpn::approved`).
    let group = match &packet.addrs {
        Addrs::V4 { dst, .. } => UPSTREAM_V4.get(Key::new(32, *dst)).map_or(NO_GROUP, |g| *g),
        Addrs::V6 { dst, .. } => UPSTREAM_V6
            .get(Key::new(128, *dst))
            .map_or(NO_GROUP, |g| *g),
    };
    let Some(group) = UPSTREAM_GROUPS.get(group) else {
        return NO_RULE;
    };
    for i in 0..MAX_UPSTREAMS_PER_GROUP {
        if i as u32 >= group.count {
            break;
        }
        let rule = group.rules[i];
        let listed = match packet.l4 {
            L4::Ports { dst_port_be, .. } => port_listed(rule, packet.proto, dst_port_be),
            L4::Icmp { .. } => entry_flags(rule.wrapping_add(1)) & RULE_ICMP != 0,
            L4::Other { .. } | L4::Unknown => false,
        };
        if listed {
            if let Fragment::First { .. } = packet.fragment {
                // If the LRU map cannot take it, the later fragments drop: fail closed.
                let _ = FRAGMENTS.insert(fragment_key(packet), 1, 0);
            }
            return rule;
        }
    }
    NO_RULE
}

/// Counts an egress verdict (per CPU, by reason; per rule); whether the packet leaves. In
/// monitor mode a drop is counted in its monitor slot and the packet leaves.
#[inline(always)]
fn record(ctx: &TcContext, mode: u32, verdict: Verdict) -> bool {
    let monitor = mode == EGRESS_MONITOR;
    let drop = matches!(verdict.reason.action(), Action::Drop);
    let slot = if drop && monitor {
        MONITOR_SLOT_OFFSET + verdict.reason as u32
    } else {
        verdict.reason as u32
    };
    if let Some(counter) = EGRESS_VERDICTS.get_ptr_mut(slot) {
        // SAFETY: this CPU's own slot of a per-CPU array; nothing else writes it meanwhile.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
    crate::count_vpn(verdict, u64::from(ctx.len()));
    let flags = enforcer_common::EVENT_EGRESS
        | if drop && monitor {
            enforcer_common::EVENT_MONITOR
        } else {
            0
        };
    crate::events::offer(ctx, verdict, drop, flags);
    if verdict.rule != NO_RULE
        && let Some(hits) = EGRESS_RULE_HITS.get_ptr_mut(verdict.rule)
    {
        crate::bump(hits);
    }
    !drop || monitor
}
