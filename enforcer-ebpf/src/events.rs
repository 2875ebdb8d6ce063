//! Events for the controller's log: every drop (and, in monitor mode, every would-drop), every
//! VPN packet, in both directions, and every allowed TCP connection opened to the server (the
//! access log), through a ring buffer. Rate-limited in the kernel so
//! that a flood neither slows the datapath nor drowns the controller: a per-CPU budget, which
//! the controller refills several times a second, is read first (one per-CPU array access, all
//! a flood packet pays once the budget is spent); then each source may raise
//! `EVENTS_PER_SOURCE` a second, and tells in its next event how many it was denied. The
//! verdict counters stay exact whatever is suppressed.

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use enforcer_common::{
    ACCESS_FLOW_IDLE_NS, AccessKey, EVENT_NO_VPN, EVENT_RING_BYTES, EVENTS_PER_SOURCE, Event,
    EventBudget, EventSource, MAX_ACCESS_FLOWS, MAX_EVENT_SOURCES, SourceWindow,
};

use crate::{
    Verdict,
    parse::{self, Packet, read},
    vpn,
};

// Map names match `enforcer_common::map_names`.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);
#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);
#[map]
static EVENT_SOURCES: LruHashMap<EventSource, SourceWindow> =
    LruHashMap::with_max_entries(MAX_EVENT_SOURCES, 0);
/// Per CPU: events not raised (budget spent, the source over its rate, the ring full).
#[map]
static EVENT_SUPPRESSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// UDP flows the access log has seen → when their last datagram arrived (ns).
#[map]
static ACCESS_FLOWS: LruHashMap<AccessKey, u64> = LruHashMap::with_max_entries(MAX_ACCESS_FLOWS, 0);

/// Whether an allowed UDP datagram (or ICMP echo request: `proto`) from `addr` (family 4: the
/// first 4 bytes) starts a flow the access log has not seen for `ACCESS_FLOW_IDLE_NS`. Only
/// while events are on: otherwise one per-CPU read, and false. (A TCP connection's start is
/// its SYN: no state needed.)
#[inline(always)]
pub fn udp_opens(
    addr: [u8; 16],
    family: u8,
    proto: u8,
    src_port: [u8; 2],
    dst_port: [u8; 2],
) -> bool {
    if EVENT_BUDGET.get(0).is_none_or(|b| b.enabled == 0) {
        return false;
    }
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&addr[..8]);
    lo.copy_from_slice(&addr[8..]);
    let ports = u64::from(u16::from_ne_bytes(src_port)) << 16
        | u64::from(u16::from_ne_bytes(dst_port))
        | u64::from(family) << 32
        | u64::from(proto) << 40;
    enforcer_udp_opens(u64::from_ne_bytes(hi), u64::from_ne_bytes(lo), ports) != 0
}

/// `udp_opens`'s lookup. Verifier: a global function, verified once on its own; inlined in
/// both the fast and the full path, its branches added 13,000 instructions to the walk.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_udp_opens(hi: u64, lo: u64, ports: u64) -> u32 {
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hi.to_ne_bytes());
    addr[8..].copy_from_slice(&lo.to_ne_bytes());
    let key = AccessKey {
        addr,
        src_port: ((ports >> 16) as u16).to_ne_bytes(),
        dst_port: (ports as u16).to_ne_bytes(),
        family: (ports >> 32) as u8,
        proto: (ports >> 40) as u8,
        _pad: [0; 2],
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(last) = ACCESS_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map's value, valid while this program runs; a racing CPU
        // stores another time of the same flow.
        unsafe {
            let idle = now.saturating_sub(*last) > ACCESS_FLOW_IDLE_NS;
            *last = now;
            return u32::from(idle);
        }
    }
    let _ = ACCESS_FLOWS.insert(&key, &now, 0);
    1
}

/// A program context that raises events: each program type has its own global function.
pub trait Raise {
    fn raise(&self, packed: u64);
}

impl Raise for XdpContext {
    #[inline(always)]
    fn raise(&self, packed: u64) {
        enforcer_event(self.ctx, packed);
    }
}

impl Raise for TcContext {
    #[inline(always)]
    fn raise(&self, packed: u64) {
        enforcer_event_tc(self.skb.skb, packed);
    }
}

/// Offers a verdict for an event: a drop (`flags` says whether monitor mode let it through, and
/// the direction), or a VPN packet. Costs one per-CPU read when events are off or the budget
/// is spent.
#[inline(always)]
pub fn offer<C: Raise>(ctx: &C, verdict: Verdict, drop: bool, flags: u8) {
    if !drop && verdict.vpn == vpn::NO_VPN && verdict.opens == 0 {
        return;
    }
    let flags = if verdict.opens != 0 {
        flags | enforcer_common::EVENT_ACCESS
    } else {
        flags
    };
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own slot of a per-CPU array; the controller's refill may race with
    // this write, which costs at most one event of budget.
    unsafe {
        if (*budget).enabled == 0 {
            return;
        }
        if (*budget).tokens == 0 {
            suppressed(1);
            return;
        }
        (*budget).tokens -= 1;
    }
    let vpn = if verdict.vpn == vpn::NO_VPN {
        u64::from(EVENT_NO_VPN)
    } else {
        u64::from(verdict.vpn & 0xFF)
    };
    ctx.raise(
        verdict.reason as u64 | u64::from(flags) << 8 | vpn << 16 | u64::from(verdict.rule) << 32,
    );
}

#[inline(always)]
fn suppressed(count: u64) {
    if let Some(n) = EVENT_SUPPRESSED.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *n += count };
    }
}

/// Raises the event of the XDP packet `ctx` (see `raise`). Verifier: a global function, verified
/// once on its own; the datapath reaches it only while the budget lasts.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_event(ctx: *mut xdp_md, packed: u64) -> u32 {
    let context = XdpContext::new(ctx);
    // SAFETY: `ctx` is the program's context, whose fields the kernel lets it read.
    let ifindex = unsafe { (*ctx).ingress_ifindex };
    raise(&context, ifindex, packed)
}

/// The same for the egress (TC) program.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_event_tc(skb: *mut __sk_buff, packed: u64) -> u32 {
    let context = TcContext::new(skb);
    // SAFETY: as above.
    let ifindex = unsafe { (*skb).ifindex };
    raise(&context, ifindex, packed)
}

/// Builds the event in the ring from the frame's headers (read at their places, not parsed
/// whole: this function's stack adds to the program's), applies the source's rate, and submits
/// it. Returns 1 if raised.
///
/// Verifier: the event is written in place in the ring (`reserve`), not built on the stack and
/// copied: with a parse and a 64-byte event on its stack, this function and the XDP program's
/// frame passed the 512 bytes the kernel allows a chain of calls.
#[inline(always)]
fn raise(ctx: &impl Packet, ifindex: u32, packed: u64) -> u32 {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        // The ring is full: the controller is behind.
        suppressed(1);
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `event` points to the reserved entry, `size_of::<Event>()` bytes this program
    // owns until it submits or discards them.
    unsafe {
        core::ptr::write_bytes(event, 0, 1);
        (*event).time_ns = now;
        (*event).rule = (packed >> 32) as u32;
        (*event).ifindex = ifindex;
        (*event).reason = packed as u8;
        (*event).flags = (packed >> 8) as u8;
        (*event).vpn = (packed >> 16) as u8;
        headers(ctx, &mut *event);
    }
    // The source's rate: the remote end (the destination of an outgoing packet).
    // SAFETY: as above.
    let (outgoing, family) = unsafe {
        (
            (*event).flags & enforcer_common::EVENT_EGRESS != 0,
            (*event).family,
        )
    };
    let mut key = EventSource {
        addr: [0; 16],
        family,
        _pad: [0; 3],
    };
    // SAFETY: as above.
    key.addr = unsafe { if outgoing { (*event).dst } else { (*event).src } };
    let second = now / 1_000_000_000;
    let mut carried = 0;
    match EVENT_SOURCES.get_ptr_mut(&key) {
        Some(window) => {
            // SAFETY: a pointer into the map's value, valid while this program runs; a racing
            // CPU may lose one count, which only shifts the limit by one.
            unsafe {
                if (*window).second != second {
                    (*window).second = second;
                    (*window).raised = 0;
                }
                if (*window).raised >= EVENTS_PER_SOURCE {
                    (*window).suppressed += 1;
                    suppressed(1);
                    entry.discard(0);
                    return 0;
                }
                (*window).raised += 1;
                carried = (*window).suppressed;
                (*window).suppressed = 0;
            }
        }
        None => {
            let window = SourceWindow {
                second,
                raised: 1,
                suppressed: 0,
            };
            let _ = EVENT_SOURCES.insert(&key, &window, 0);
        }
    }
    // SAFETY: as above.
    unsafe { (*event).suppressed = carried };
    entry.submit(0);
    1
}

const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];
const ETH_P_8021AD: [u8; 2] = [0x88, 0xA8];
const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xDD];

/// The VLAN id, addresses, protocol and ports of the frame, read at their places: up to two
/// VLAN tags, IPv4 (ports unless a later fragment), IPv6 (ports when no extension header
/// comes first). What is not there stays 0.
#[inline(always)]
fn headers(ctx: &impl Packet, event: &mut Event) {
    let mut l3 = 14;
    let Some(mut ether_type) = read::<2>(ctx, 12) else {
        return;
    };
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some([hi, lo, t0, t1]) = read::<4>(ctx, l3) else {
            return;
        };
        if event.vlan == 0 {
            event.vlan = u16::from_be_bytes([hi & 0x0F, lo]);
        }
        ether_type = [t0, t1];
        l3 += 4;
    }
    let l4 = if ether_type == ETH_P_IPV4 {
        let Some(h) = read::<20>(ctx, l3) else {
            return;
        };
        event.family = 4;
        event.proto = h[9];
        event.src[..4].copy_from_slice(&h[12..16]);
        event.dst[..4].copy_from_slice(&h[16..20]);
        let later_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1FFF != 0;
        if later_fragment {
            return;
        }
        l3 + usize::from(h[0] & 0x0F) * 4
    } else if ether_type == ETH_P_IPV6 {
        let Some(h) = read::<40>(ctx, l3) else {
            return;
        };
        event.family = 6;
        event.proto = h[6];
        event.src.copy_from_slice(&h[8..24]);
        event.dst.copy_from_slice(&h[24..40]);
        l3 + 40
    } else {
        return;
    };
    if matches!(event.proto, parse::IPPROTO_TCP | parse::IPPROTO_UDP)
        && let Some([a, b, c, d]) = read::<4>(ctx, parse::masked(l4, 0x7F))
    {
        event.src_port = [a, b];
        event.dst_port = [c, d];
    }
}
