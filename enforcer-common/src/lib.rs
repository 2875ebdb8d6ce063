//! What the XDP program and the controller must agree on: map names and sizes, keys and values,
//! verdict reasons. Everything here is `#[repr(C)]`, padded explicitly and size-checked, because
//! the kernel hashes and copies these bytes as they are.
#![no_std]

pub mod reason;

pub use reason::{Action, Reason};

/// Map names, defined once. The kernel program names its statics after these, and the
/// controller reaches the maps only through these constants.
pub mod map_names {
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const DENY_V4: &str = "DENY_V4";
    pub const DENY_V6: &str = "DENY_V6";
    pub const RULES: &str = "RULES";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const CONFIG: &str = "CONFIG";
    pub const FRAGMENTS: &str = "FRAGMENTS";

    /// Every map the controller pins, in a stable order.
    pub const ALL: [&str; 10] = [
        ALLOW_V4, ALLOW_V6, DENY_V4, DENY_V6, RULES, PORT_RULES, RULE_HITS, VERDICTS, CONFIG,
        FRAGMENTS,
    ];
}

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "enforcer";

/// Registry entries (networks, devices, deny ranges) the maps can hold. Rule indices run from 0
/// to `MAX_RULES - 1`; each LPM trie holds at most this many prefixes.
pub const MAX_RULES: u32 = 1 << 20;
/// (rule, protocol, port) triples allowed across all port-restricted networks.
pub const MAX_PORT_RULES: u32 = 1 << 16;
/// First fragments remembered so that their later fragments can be matched (LRU).
pub const MAX_TRACKED_FRAGMENTS: u32 = 16_384;
/// Slots in the per-CPU verdict counter array: `Reason as u32` for verdicts carried out, and
/// `MONITOR_SLOT_OFFSET + Reason as u32` for drops that monitor mode let through.
pub const VERDICT_SLOTS: u32 = 64;
pub const MONITOR_SLOT_OFFSET: u32 = 32;
/// Marks "no registry entry decided" (e.g. a malformed packet).
pub const NO_RULE: u32 = u32::MAX;

/// Key data of the IPv4 LPM tries (the prefix length sits in aya's `Key` wrapper).
pub type Ipv4Addr = [u8; 4];
/// Key data of the IPv6 LPM tries.
pub type Ipv6Addr = [u8; 16];

/// One registry entry as the kernel needs it, indexed by rule number in `RULES`.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | flags (`RULE_*`, host order) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Rule>() == 4);

/// The entry allows every port and protocol (no `ports` in the registry).
pub const RULE_ANY_PORT: u32 = 1 << 0;
/// A port-restricted entry that also allows ICMP / `ICMPv6` (`"icmp"` in its ports).
pub const RULE_ICMP: u32 = 1 << 1;

/// Key of `PORT_RULES`: this rule allows this destination port for this protocol.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | rule index (host order) |
/// | 4 | 2 | destination port (network order, as on the wire) |
/// | 6 | 1 | IP protocol number (6 TCP, 17 UDP) |
/// | 7 | 1 | padding, always 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub rule: u32,
    pub port_be: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);

/// Packets and bytes for one verdict slot (per CPU in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Settings the controller may change while the program runs (index 0 of `CONFIG`).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | mode (`MODE_*`) |
/// | 4 | 4 | reserved, 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub mode: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

/// Drop what the policy drops.
pub const MODE_ENFORCE: u32 = 0;
/// Pass everything; count what would have been dropped in the monitor slots.
pub const MODE_MONITOR: u32 = 1;

/// Key of `FRAGMENTS`: a first fragment that passed the port check, so that the later fragments
/// of the same datagram (which carry no ports) may pass too. IPv4 addresses use the first 4 bytes.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | source address (network order) |
/// | 16 | 16 | destination address (network order) |
/// | 32 | 4 | fragment identification (as on the wire; IPv4's 16 bits in the first 2 bytes) |
/// | 36 | 1 | IP protocol of the payload |
/// | 37 | 1 | address family (4 or 6) |
/// | 38 | 2 | padding, always 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), has no padding the compiler adds (checked by the size
    // asserts above) and is valid for any bit pattern.
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FragmentKey {}
}
