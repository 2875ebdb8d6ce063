//! The source lookup's tables, built in userspace from the policy's (prefix → rule) entries.
//!
//! # Design
//! The kernel's LPM trie walks one node per prefix bit that distinguishes entries, so its cost
//! grows with the registry: in `cargo xtask bench` one trie lookup of an IPv4 source costs about
//! 6× more at 1,000,000 prefixes than at 10. The enforcer instead looks sources up in tables
//! whose number of steps is fixed by the address, not by the registry:
//!
//! - IPv4, a direct-indexed table (DIR-16-8, as in routers' DIR-24-8 but with smaller blocks):
//!   root blocks indexed by the first two octets answer every prefix up to /16; a /16 with
//!   longer prefixes inside points to a block indexed by the third octet that answers up to /24
//!   and says which lengths /25 to /32 exist inside that /24. Those few are found in one hash
//!   (`LONG_V4`), longest length first. Two array reads for almost every packet, plus one hash
//!   probe per length present in the packet's own /24 (usually none or one).
//! - IPv6: prefixes sit in one hash keyed by (masked address, length). What to probe is known
//!   from a direct-indexed table of the first 16 bits (prefixes up to /16, the lengths /17 to
//!   /32 that exist inside, and the lengths /33 to /128 too when the /16 has at most two of
//!   them) and, in a /16 with more, from a hash of /32 nodes (the lengths /33 to /128 that exist
//!   inside that /32). Registries hold few lengths per /32, so a packet costs at most one node
//!   probe and one or two prefix probes at any size; scattered single devices (/128s) need no
//!   nodes at all, which at a million entries saves half a million kernel hash inserts at
//!   load. The lists hold at most 8 lengths each
//!   (`MAX_V6_LENGTHS`; a longer list would be a loop the verifier must walk for every path
//!   into it). A /16 or /32 whose prefixes use more lengths is rewritten by controlled prefix
//!   expansion (`expand`) to at most 8 of them, exactly; only a registry whose expansion would
//!   not fit the kernel's table is refused, naming the region and the entry that grows most.
//!
//! Rejected: one hash per distinct prefix length (cost grows with the number of lengths: 24 for
//! a /8-to-/32 registry), binary search on lengths (log2 of the lengths, so 2 probes at 10
//! entries but 5 at a million), and DIR-24-8 proper (64 MiB per table whatever the registry).
//!
//! Memory: each /16 that holds longer IPv4 prefixes costs a 1 KiB block; a million random
//! prefixes touch all 65,536 /16s (64 MiB). Every table exists in two generations, so a new
//! policy is built aside while the old one serves, and one word (`Config::generation`) switches
//! all packets to it: a packet sees the old tables or the new ones, never a mixture. Blocks whose
//! content did not change are shared by both generations. An in-place edit of one entry rebuilds
//! only the /16s its prefix overlaps (`Regions`) and copies the rest of the generation it writes
//! from the one in force: at a million entries 0.05 s and no second table, where a rebuild of
//! the whole takes 0.3-0.4 s and 60-150 MiB.

use std::collections::{HashMap, HashSet};

use enforcer_common::{
    DirV6, MAX_RULES, MAX_V6_LENGTHS, NodeV6, V6_DEEP_LENGTHS,
    lookup::{BLOCK_SLOTS, V4_LONG_SHIFT, V6_DIR_SLOTS, VALUE_MASK},
};
use ipnet::IpNet;

/// Hash maps over up to a million prefixes: a fast hasher (the keys are the registry's, not an
/// attacker's).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One 256-slot block of the IPv4 table.
pub type Block = [u32; BLOCK_SLOTS];

/// The IPv4 tables of one policy, before they are placed in the kernel's block array.
#[derive(Debug, Default)]
pub struct V4Tables {
    /// Indexed by the first 16 bits: the value (`rule + 1`) of the longest prefix up to /16,
    /// for /16s that have no block.
    pub root: Vec<u32>,
    /// The /16s with longer prefixes inside, and their block.
    pub blocks: FastMap<u16, Box<Block>>,
    /// Prefixes /25 to /32: (masked address, length) → `rule + 1`.
    pub long: FastMap<(u32, u8), u32>,
}

/// The IPv6 tables of one policy.
#[derive(Debug, Default)]
pub struct V6Tables {
    pub dir: Vec<DirV6>,
    /// First 32 bits → lengths present inside.
    pub nodes: FastMap<u32, NodeV6>,
    /// Prefixes /17 to /128: (masked address, length) → `rule + 1`.
    pub long: FastMap<(u128, u8), u32>,
}

fn value(rule: u32) -> u32 {
    debug_assert!(rule < VALUE_MASK, "rule numbers stay below MAX_RULES");
    rule + 1
}

/// Builds both families' tables from (prefix → rule) entries (at most one entry per prefix).
pub fn build(entries: &[(IpNet, u32)]) -> Result<(V4Tables, V6Tables), TooManyEntries> {
    let mut v4: Vec<(u32, u8, u32)> = Vec::new();
    let mut v6: Vec<(u128, u8, u32)> = Vec::new();
    for (prefix, rule) in entries {
        match prefix.trunc() {
            IpNet::V4(net) => v4.push((net.network().into(), net.prefix_len(), value(*rule))),
            IpNet::V6(net) => v6.push((net.network().into(), net.prefix_len(), value(*rule))),
        }
    }
    Ok((build_v4(v4), build_v6(v6)?))
}

fn build_v4(mut entries: Vec<(u32, u8, u32)>) -> V4Tables {
    // Shorter prefixes first, so that longer ones overwrite the slots they cover.
    entries.sort_unstable_by_key(|(_, len, _)| *len);
    let mut tables = V4Tables {
        root: vec![0; 1 << 16],
        ..V4Tables::default()
    };
    for &(addr, len, value) in &entries {
        let slot = (addr >> 16) as usize;
        match len {
            0..=16 => {
                let count = 1usize << (16 - len);
                tables.root[slot..slot + count].fill(value);
            }
            17..=24 => {
                let root = tables.root[slot];
                let block = tables
                    .blocks
                    .entry(slot as u16)
                    .or_insert_with(|| Box::new([root; BLOCK_SLOTS]));
                let first = ((addr >> 8) & 0xFF) as usize;
                for s in &mut block[first..first + (1usize << (24 - len))] {
                    *s = (*s & !VALUE_MASK) | value;
                }
            }
            _ => {
                let root = tables.root[slot];
                let block = tables
                    .blocks
                    .entry(slot as u16)
                    .or_insert_with(|| Box::new([root; BLOCK_SLOTS]));
                block[((addr >> 8) & 0xFF) as usize] |= 1 << (V4_LONG_SHIFT + u32::from(len) - 25);
                tables.long.insert((addr, len), value);
            }
        }
    }
    tables
}

fn build_v6(entries: Vec<(u128, u8, u32)>) -> Result<V6Tables, TooManyEntries> {
    let expansion = expand::plan(entries.iter().map(|&(addr, len, _)| (addr, len)));
    if !expand::fits(&expansion) {
        return Err(TooManyEntries::of(
            &expansion,
            entries
                .iter()
                .map(|&(addr, len, _)| ((addr, len), String::new())),
        ));
    }
    let mut entries = expand::apply(entries, &expansion.plan);
    let lengths = V6Lengths::of(|| entries.iter().map(|&(addr, len, _)| (addr, len)));
    debug_assert!(
        lengths.over_full().is_none(),
        "the expansion leaves at most MAX_V6_LENGTHS lengths per list"
    );
    entries.sort_unstable_by_key(|(_, len, _)| *len);
    let mut tables = V6Tables {
        dir: vec![DirV6::default(); V6_DIR_SLOTS as usize],
        long: FastMap::with_capacity_and_hasher(
            entries.iter().filter(|(_, len, _)| *len > 16).count(),
            foldhash::fast::RandomState::default(),
        ),
        ..V6Tables::default()
    };
    for &(addr, len, value) in &entries {
        if len <= 16 {
            let slot = (addr >> 112) as usize;
            for d in &mut tables.dir[slot..slot + (1usize << (16 - len))] {
                d.value = value;
            }
        } else {
            tables.long.insert((addr, len), value);
        }
    }
    for (slot, bits) in &lengths.below16 {
        tables.dir[usize::from(*slot)].lengths = V6Lengths::list(u128::from(*bits));
    }
    for (slot, deep) in &lengths.deep {
        let dir = &mut tables.dir[usize::from(*slot)];
        if lengths.needs_nodes(*slot) {
            dir.nodes = 1;
        } else {
            dir.lengths = V6Lengths::list(u128::from(lengths.short(*slot)) | deep);
        }
    }
    tables.nodes.reserve(lengths.below32.len());
    for (top, bits) in &lengths.below32 {
        let lengths = V6Lengths::list(*bits);
        tables.nodes.insert(*top, NodeV6 { lengths });
    }
    Ok(tables)
}

/// The IPv6 prefix lengths present below each /16 (17 to 32 in `below16`, 33 to 128 in
/// `deep`) and, in a /16 whose longer lengths are too many for its slot, below each /32 (33 to
/// 128), as bit sets (bit `n - 1` = length `n`): what the lookup probes there.
#[derive(Default)]
struct V6Lengths {
    below16: FastMap<u16, u32>,
    deep: FastMap<u16, u128>,
    below32: FastMap<u32, u128>,
}

impl V6Lengths {
    /// From two passes over the (address, length) prefixes: the second, for the /32s, only if
    /// some /16 needs nodes.
    fn of<I: Iterator<Item = (u128, u8)>>(prefixes: impl Fn() -> I) -> Self {
        let mut lengths = Self::default();
        for (addr, len) in prefixes() {
            let slot = (addr >> 112) as u16;
            match len {
                0..=16 => {}
                17..=32 => *lengths.below16.entry(slot).or_default() |= 1 << (len - 1),
                _ => *lengths.deep.entry(slot).or_default() |= 1 << (len - 1),
            }
        }
        let mut below32: FastMap<u32, u128> = FastMap::default();
        if lengths.deep.keys().any(|slot| lengths.needs_nodes(*slot)) {
            for (addr, len) in prefixes() {
                if len > 32 && lengths.needs_nodes((addr >> 112) as u16) {
                    *below32.entry((addr >> 96) as u32).or_default() |= 1 << (len - 1);
                }
            }
        }
        lengths.below32 = below32;
        lengths
    }

    /// The lengths /17 to /32 inside the /16 `slot`.
    fn short(&self, slot: u16) -> u32 {
        self.below16.get(&slot).copied().unwrap_or_default()
    }

    /// Whether the /16 `slot` sends its lengths /33 to /128 to nodes: it has more than
    /// `V6_DEEP_LENGTHS` of them, or no room for them in its own list.
    fn needs_nodes(&self, slot: u16) -> bool {
        self.deep.get(&slot).is_some_and(|deep| {
            let deep = deep.count_ones() as usize;
            deep > V6_DEEP_LENGTHS || self.short(slot).count_ones() as usize + deep > MAX_V6_LENGTHS
        })
    }

    /// A /16 or /32 with more lengths than the lookup probes (none once expanded).
    fn over_full(&self) -> Option<u128> {
        let over = |bits: u128| bits.count_ones() as usize > MAX_V6_LENGTHS;
        self.below16
            .values()
            .map(|bits| u128::from(*bits))
            .chain(self.below32.values().copied())
            .find(|bits| over(*bits))
    }

    /// The lengths of `bits`, longest first, in the kernel's fixed-size list (`check` or
    /// `needs_nodes` first).
    fn list(bits: u128) -> [u8; MAX_V6_LENGTHS] {
        let mut out = [0u8; MAX_V6_LENGTHS];
        let longest_first = (1..=128u8).rev().filter(|l| bits & (1 << (l - 1)) != 0);
        for (o, len) in out.iter_mut().zip(longest_first) {
            *o = len;
        }
        out
    }
}

/// Whether the IPv6 lookup can hold these prefixes once expanded (see `TooManyEntries`):
/// `prefixes` gives each source prefix with the name of its entry, and is walked twice.
pub fn check<'a, I: Iterator<Item = (&'a IpNet, &'a str)>>(
    prefixes: impl Fn() -> I,
) -> Result<(), TooManyEntries> {
    let v6 = || {
        prefixes().filter_map(|(prefix, name)| match prefix.trunc() {
            IpNet::V6(net) => Some(((net.network().into(), net.prefix_len()), name)),
            IpNet::V4(_) => None,
        })
    };
    let expansion = expand::plan(v6().map(|(prefix, _)| prefix));
    if expand::fits(&expansion) {
        return Ok(());
    }
    Err(TooManyEntries::of(
        &expansion,
        v6().map(|(prefix, name)| (prefix, name.to_string())),
    ))
}

/// IPv6 prefixes whose expansion (see `expand`) needs more keys than the kernel's table holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the IPv6 prefixes need {entries} lookup entries once the lengths inside each /16 and /32 are expanded to at most {MAX_V6_LENGTHS}; the kernel's table holds {MAX_RULES}. The most: inside {region}, {who}{prefix} expands to {grows} entries: list fewer lengths there, or longer prefixes",
    who = if name.is_empty() { String::new() } else { format!("{name} ") }
)]
pub struct TooManyEntries {
    pub entries: u128,
    pub region: IpNet,
    /// The prefix that grows most, and the name of its entry (a deny feed's `FILE:LINE`).
    pub prefix: IpNet,
    pub name: String,
    pub grows: u128,
}

impl TooManyEntries {
    /// The error for `expansion`, naming the prefix of `prefixes` that grows most in the region
    /// that grows most.
    fn of(
        expansion: &expand::Expansion,
        prefixes: impl Iterator<Item = ((u128, u8), String)>,
    ) -> Self {
        let mut worst: Option<((u128, u8), String, u128)> = None;
        for ((addr, len), name) in prefixes {
            let Some(region) = expand::Region::of(addr, len) else {
                continue;
            };
            let Some(targets) = expansion.plan.get(&region) else {
                continue;
            };
            let grows = 1u128
                .checked_shl(u32::from(targets[&len] - len))
                .unwrap_or(u128::MAX);
            if worst.as_ref().is_none_or(|(_, _, g)| grows > *g) {
                worst = Some(((addr, len), name, grows));
            }
        }
        let ((addr, len), name, grows) = worst.unwrap_or_default();
        let net = |addr: u128, len: u8| {
            IpNet::V6(ipnet::Ipv6Net::new(addr.into(), len).expect("a valid length"))
        };
        Self {
            entries: expansion.entries,
            region: expand::Region::of(addr, len).map_or_else(|| net(0, 0), expand::Region::net),
            prefix: net(addr, len),
            name,
            grows,
        }
    }
}

/// An IPv6 address masked to `len` bits.
pub fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// Lengths whose bits are set in `bits` (bit i = length `base + i`), longest first.
fn lengths_desc(bits: u64, base: u8) -> impl Iterator<Item = u8> {
    (0..64u8)
        .rev()
        .filter(move |i| bits >> i & 1 == 1)
        .map(move |i| base + i)
}

impl V4Tables {
    /// The rule for `addr`, walking the tables exactly as the kernel program does.
    pub fn lookup(&self, addr: u32) -> Option<u32> {
        let slot = (addr >> 16) as u16;
        let Some(block) = self.blocks.get(&slot) else {
            return self.root[slot as usize].checked_sub(1);
        };
        let entry = block[((addr >> 8) & 0xFF) as usize];
        for len in lengths_desc(u64::from(entry >> V4_LONG_SHIFT), 25) {
            let masked = addr & (u32::MAX << (32 - u32::from(len)));
            if let Some(v) = self.long.get(&(masked, len)) {
                return Some(v - 1);
            }
        }
        (entry & VALUE_MASK).checked_sub(1)
    }

    /// The /16s that need a block.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }
}

impl V6Tables {
    /// The rule for `addr`, walking the tables as the kernel program does (which also reads
    /// the filter's bits, exact by construction: a clear one skips only what would miss).
    pub fn lookup(&self, addr: u128) -> Option<u32> {
        let dir = self.dir[(addr >> 112) as usize];
        let node = if dir.nodes != 0 {
            self.nodes
                .get(&((addr >> 96) as u32))
                .copied()
                .unwrap_or_default()
        } else {
            NodeV6::default()
        };
        for len in node
            .lengths
            .into_iter()
            .chain(dir.lengths)
            .filter(|l| *l != 0)
        {
            if let Some(v) = self.long.get(&(mask_v6(addr, len), len)) {
                return Some(v - 1);
            }
        }
        dir.value.checked_sub(1)
    }
}

/// The parts of the tables a change of some prefixes can alter: the /16s (IPv4 and IPv6) they
/// overlap. Everything the lookup reads for an address lies in its /16 (its root slot and
/// block, its `/25`-`/32` keys; its `DIR_V6` slot, its /32 nodes and longer keys), and a prefix
/// decides only addresses inside it, so tables built from the entries that overlap these /16s
/// are, inside them, the tables of the whole policy; outside, nothing changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Regions {
    /// Sorted, without repeats.
    v4: Vec<u16>,
    v6: Vec<u16>,
}

impl Regions {
    /// More /16s than this: a rebuild of the whole is as cheap (a /8 is 256).
    pub const MAX_SLOTS: usize = 4096;

    /// The /16s `prefixes` overlap, or `None` when they are more than `MAX_SLOTS`.
    pub fn of<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>) -> Option<Self> {
        let mut regions = Self::default();
        for prefix in prefixes {
            let (slots, first, len) = match prefix.trunc() {
                IpNet::V4(n) => (
                    &mut regions.v4,
                    u32::from(n.network()) >> 16,
                    n.prefix_len(),
                ),
                IpNet::V6(n) => (
                    &mut regions.v6,
                    (u128::from(n.network()) >> 112) as u32,
                    n.prefix_len(),
                ),
            };
            let count = 1u32 << 16u8.saturating_sub(len);
            if slots.len() + count as usize > Self::MAX_SLOTS {
                return None;
            }
            slots.extend((first..first + count).map(|s| s as u16));
        }
        for slots in [&mut regions.v4, &mut regions.v6] {
            slots.sort_unstable();
            slots.dedup();
        }
        Some(regions)
    }

    pub fn v4_slots(&self) -> &[u16] {
        &self.v4
    }

    pub fn v6_slots(&self) -> &[u16] {
        &self.v6
    }

    /// Whether `prefix` overlaps one of the /16s (so that it shapes their tables).
    pub fn overlaps(&self, prefix: &IpNet) -> bool {
        let (slots, first, len) = match prefix.trunc() {
            IpNet::V4(n) => (&self.v4, u32::from(n.network()) >> 16, n.prefix_len()),
            IpNet::V6(n) => (
                &self.v6,
                (u128::from(n.network()) >> 112) as u32,
                n.prefix_len(),
            ),
        };
        let end = first + (1u32 << 16u8.saturating_sub(len));
        let at = slots.partition_point(|s| u32::from(*s) < first);
        slots.get(at).is_some_and(|s| u32::from(*s) < end)
    }

    /// Whether the IPv4 /16 `slot` is one of them.
    pub fn has_v4(&self, slot: u16) -> bool {
        self.v4.binary_search(&slot).is_ok()
    }

    /// Whether the IPv6 /16 `slot` is one of them.
    pub fn has_v6(&self, slot: u16) -> bool {
        self.v6.binary_search(&slot).is_ok()
    }
}

/// Blocks the IPv4 table needs for these prefixes (one per /16 holding a prefix longer than
/// /16): what the controller sizes `SOURCE_V4` by before it loads the program.
pub fn v4_blocks_needed<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>) -> u32 {
    let slots: HashSet<u32> = prefixes
        .into_iter()
        .filter_map(|p| match p {
            IpNet::V4(net) if net.prefix_len() > 16 => Some(u32::from(net.network()) >> 16),
            _ => None,
        })
        .collect();
    u32::try_from(slots.len()).unwrap_or(u32::MAX)
}

mod expand;

#[cfg(test)]
mod tests;
