//! Floor programs for benchmarks (not loaded by the enforcer): what any XDP program costs (pass,
//! drop), and what one kernel LPM-trie lookup of the IPv4 source costs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, map, xdp},
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};

/// Returns XDP_PASS without reading the packet.
#[xdp]
pub fn baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Returns XDP_DROP without reading the packet: the flood benchmark's floor.
#[xdp]
pub fn baseline_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// A TC classifier that lets everything through without reading it: the egress program's floor.
#[classifier]
pub fn baseline_tc(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

/// Where `flood_gen` sends its frames (the sender's veth), set at load.
#[unsafe(no_mangle)]
static FLOOD_IFINDEX: u32 = 0;

/// 1: the template is IPv6, and the generator varies its source's fourth group (one /64 per
/// frame of 16,384); set at load.
#[unsafe(no_mangle)]
static FLOOD_V6: u8 = 0;

#[map]
static FLOOD_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

const IPV4_CSUM_OFFSET: usize = 10;
/// The source address's fourth 16-bit group in an IPv6 header: which /64 of a /48.
const IPV6_SRC_GROUP4_OFFSET: usize = 8 + 6;

/// The flood generator, run by the benchmark with `BPF_PROG_TEST_RUN` in live-frames mode:
/// each frame (an IPv4 template from 198.18.0.0) gets the next of 16,384 source addresses in
/// 198.18.0.0/18, its header checksum updated (RFC 1624), and is redirected out of the sender's
/// veth to the receiver. With `FLOOD_V6`, each IPv6 frame gets the next of 16,384 /64s of its
/// template's /48 (an IPv6 header has no checksum).
#[xdp]
pub fn flood_gen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let at = start + ETH_HDR_LEN;
    if at + 20 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(seq) = FLOOD_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's own slot of a per-CPU array.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    let new = (n & 0x3FFF) as u16;
    // SAFETY: a read of a load-time constant; volatile so the compiler keeps the global.
    if unsafe { core::ptr::read_volatile(&raw const FLOOD_V6) } != 0 {
        // SAFETY: the 16 bytes at `at` were checked against data_end above.
        unsafe { *((at + IPV6_SRC_GROUP4_OFFSET) as *mut [u8; 2]) = new.to_be_bytes() };
    } else {
        // SAFETY: the 20 header bytes at `at` were checked against data_end above.
        unsafe {
            let word = (at + IPV4_SRC_OFFSET + 2) as *mut [u8; 2];
            let csum = (at + IPV4_CSUM_OFFSET) as *mut [u8; 2];
            let old = u16::from_be_bytes(*word);
            let sum = u32::from(!u16::from_be_bytes(*csum)) + u32::from(!old) + u32::from(new);
            let sum = (sum & 0xFFFF) + (sum >> 16);
            let sum = (sum & 0xFFFF) + (sum >> 16);
            *word = new.to_be_bytes();
            *csum = (!(sum as u16)).to_be_bytes();
        }
    }
    // SAFETY: a read of a load-time constant; volatile so the compiler keeps the global.
    let ifindex = unsafe { core::ptr::read_volatile(&raw const FLOOD_IFINDEX) };
    // SAFETY: a helper call with plain arguments.
    unsafe { aya_ebpf::helpers::bpf_redirect(ifindex, 0) as u32 }
}

#[map]
static BASELINE_LPM: LpmTrie<[u8; 4], u32> =
    LpmTrie::with_max_entries(enforcer_common::MAX_RULES, 0);

const ETH_HDR_LEN: usize = 14;
const IPV4_SRC_OFFSET: usize = 12;

/// One LPM lookup of an untagged IPv4 frame's source: pass if found, drop otherwise.
#[xdp]
pub fn baseline_lpm(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let at = start + ETH_HDR_LEN + IPV4_SRC_OFFSET;
    if at + 4 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 4 bytes at `at` were checked against data_end just above.
    let src = unsafe { *(at as *const [u8; 4]) };
    if BASELINE_LPM.get(Key::new(32, src)).is_some() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[map]
static BASELINE_COUNT: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// What any enforcer must do for a flood's packet, and nothing more: read the EtherType (the
/// frame's first cache line) and the IPv4 source (its second), count the drop in packets and
/// bytes per CPU, drop. A floor for the flood: the enforcer does this plus the policy.
#[xdp]
pub fn baseline_read_count(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    let at = start + ETH_HDR_LEN + IPV4_SRC_OFFSET;
    if at + 4 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: both reads lie before `at + 4`, checked against data_end just above.
    let (ether_type, src) = unsafe { (*((start + 12) as *const [u8; 2]), *(at as *const [u8; 4])) };
    // IPv4 only; the source test keeps its read (a 0.0.0.0 source passes, which no flood has).
    if ether_type != [0x08, 0x00] || src == [0; 4] {
        return xdp_action::XDP_PASS;
    }
    if let Some(count) = BASELINE_COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe {
            (*count)[0] += 1;
            (*count)[1] += (end - start) as u64;
        }
    }
    xdp_action::XDP_DROP
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
