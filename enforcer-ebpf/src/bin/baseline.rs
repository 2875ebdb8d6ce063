//! Floor programs for benchmarks (not loaded by the enforcer): what any XDP program costs (pass,
//! drop), and what one kernel LPM-trie lookup of the IPv4 source costs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
