//! Controlled prefix expansion (Srinivasan and Varghese, "Fast address lookups using controlled
//! prefix expansion", 1999) for the IPv6 lookup, whose lists probe at most `MAX_V6_LENGTHS`
//! lengths per /16 (for /17 to /32) and per /32 (for /33 to /128).
//!
//! A region (a /16's /17–/32 prefixes, or a /32's longer ones) that uses more lengths is
//! rewritten to at most that many *target* lengths, chosen among its own: each prefix becomes
//! the 2^(target − length) prefixes of the smallest target at or above its length, each keeping
//! the prefix's rule. Where two expansions (or an expansion and an original) meet on the same
//! key, the one from the longer original prefix wins, so longest-prefix match stays exact: the
//! lookup probes the targets longest first, and a target holds, for every address, the longest
//! original prefix whose length maps to it. The targets minimise the expanded entries (dynamic
//! programming over the region's lengths, weighted by how many prefixes use each: the
//! algorithm of the paper), and the longest length is always a target.
//!
//! Cost: a region of n lengths is solved in O(8 n²); the bound on expanded entries is
//! computed before any is made, so a registry whose expansion would not fit the kernel's table
//! (`MAX_RULES` keys) is refused with the region and the prefix that grows most, not built.

use std::collections::BTreeMap;

use enforcer_common::{MAX_RULES, MAX_V6_LENGTHS};

use super::FastMap;

/// A region: a /16 (for its /17–/32 prefixes) or a /32 (for its longer ones). Eight bytes, so
/// that a million scattered prefixes sort in a few MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Region {
    /// The region's first 32 address bits (the last 16 zero for a /16).
    pub top: u32,
    /// 16 or 32.
    pub bits: u8,
}

impl Region {
    /// The region a prefix of `len` bits at `addr` belongs to, if its length is listed per
    /// region (/17 and longer).
    pub fn of(addr: u128, len: u8) -> Option<Self> {
        let top = (addr >> 96) as u32;
        match len {
            0..=16 => None,
            17..=32 => Some(Self {
                top: top & 0xFFFF_0000,
                bits: 16,
            }),
            _ => Some(Self { top, bits: 32 }),
        }
    }

    pub fn net(self) -> ipnet::IpNet {
        let addr = u128::from(self.top) << 96;
        ipnet::IpNet::V6(ipnet::Ipv6Net::new(addr.into(), self.bits).expect("16 or 32 bits"))
    }
}

/// The lengths each over-full region is expanded to: region → (original length → target).
pub(super) type Plan = FastMap<Region, BTreeMap<u8, u8>>;

/// What expanding the regions that need it costs, computed before anything is expanded.
#[derive(Debug, Default)]
pub(super) struct Expansion {
    pub plan: Plan,
    /// Keys of the /17–/128 hash after expansion (an upper bound: merged keys count twice).
    pub entries: u128,
}

/// Plans the expansion of `prefixes` (address, length, IPv6 only): the regions with more than
/// `MAX_V6_LENGTHS` lengths and their targets. Memory: one 16-byte pair per prefix over /16,
/// sorted, rather than a map per region (a million scattered /128s are half a million regions
/// of one length each).
pub(super) fn plan(prefixes: impl Iterator<Item = (u128, u8)>) -> Expansion {
    let mut pairs: Vec<(Region, u8)> = prefixes
        .filter_map(|(addr, len)| Region::of(addr, len).map(|region| (region, len)))
        .collect();
    let mut expansion = Expansion {
        entries: pairs.len() as u128,
        ..Expansion::default()
    };
    pairs.sort_unstable();
    for group in pairs.chunk_by(|a, b| a.0 == b.0) {
        // Sorted: the group's lengths ascend; count each.
        let mut lengths: Vec<(u8, u64)> = Vec::new();
        for (_, len) in group {
            match lengths.last_mut() {
                Some((last, count)) if last == len => *count += 1,
                _ => lengths.push((*len, 1)),
            }
        }
        if lengths.len() <= MAX_V6_LENGTHS {
            continue;
        }
        let (targets, cost) = targets(&lengths);
        expansion.entries = expansion
            .entries
            .saturating_add(cost)
            .saturating_sub(group.len() as u128);
        let mut map = BTreeMap::new();
        for (len, _) in &lengths {
            let target = *targets
                .iter()
                .find(|t| *t >= len)
                .expect("the longest is a target");
            map.insert(*len, target);
        }
        expansion.plan.insert(group[0].0, map);
    }
    expansion
}

/// Expanded entries of a prefix of `len` bits expanded to `target`.
fn grow(len: u8, target: u8) -> u128 {
    1u128
        .checked_shl(u32::from(target - len))
        .unwrap_or(u128::MAX)
}

/// At most `MAX_V6_LENGTHS` targets among `lengths` (ascending, each with its prefix count),
/// the longest among them, minimising the expanded entries; and that number.
pub(super) fn targets(lengths: &[(u8, u64)]) -> (Vec<u8>, u128) {
    let n = lengths.len();
    let k = n.min(MAX_V6_LENGTHS);
    // cost(p, i): lengths p+1..=i all expanded to length i's.
    let cost = |p: Option<usize>, i: usize| -> u128 {
        let start = p.map_or(0, |p| p + 1);
        lengths[start..=i].iter().fold(0u128, |sum, (len, count)| {
            sum.saturating_add(u128::from(*count).saturating_mul(grow(*len, lengths[i].0)))
        })
    };
    // best[j][i]: the least cost of lengths 0..=i with j + 1 targets, the last at length i;
    // from[j][i]: the target before it.
    let mut best = vec![vec![u128::MAX; n]; k];
    let mut from = vec![vec![None; n]; k];
    for (i, first) in best[0].iter_mut().enumerate() {
        *first = cost(None, i);
    }
    for j in 1..k {
        for i in j..n {
            for p in (j - 1)..i {
                if best[j - 1][p] == u128::MAX {
                    continue;
                }
                let c = best[j - 1][p].saturating_add(cost(Some(p), i));
                if c < best[j][i] {
                    best[j][i] = c;
                    from[j][i] = Some(p);
                }
            }
        }
    }
    let (mut j, total) = (0..k)
        .map(|j| (j, best[j][n - 1]))
        .min_by_key(|(_, c)| *c)
        .expect("at least one length");
    let mut at = Some(n - 1);
    let mut chosen = Vec::new();
    while let Some(i) = at {
        chosen.push(lengths[i].0);
        at = from[j][i];
        j = j.saturating_sub(1);
    }
    chosen.reverse();
    (chosen, total)
}

/// The entries with the planned regions expanded: `entries` are (address, length, value); the
/// rest pass unchanged. Call only with a plan whose `entries` fit (see `fits`).
pub(super) fn apply(entries: Vec<(u128, u8, u32)>, plan: &Plan) -> Vec<(u128, u8, u32)> {
    if plan.is_empty() {
        return entries;
    }
    let (mut regional, mut out): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|(a, l, _)| Region::of(*a, *l).is_some_and(|r| plan.contains_key(&r)));
    // Shorter originals first: a longer one's expansion overwrites theirs where they meet.
    regional.sort_unstable_by_key(|(_, len, _)| *len);
    let mut expanded: FastMap<(u128, u8), u32> = FastMap::default();
    for (addr, len, value) in regional {
        let region = Region::of(addr, len).expect("partitioned on it");
        let target = plan[&region][&len];
        let count = 1u128 << (target - len);
        let step = 1u128 << (128 - u32::from(target));
        for i in 0..count {
            expanded.insert((addr | (i * step), target), value);
        }
    }
    out.extend(expanded.into_iter().map(|((addr, len), v)| (addr, len, v)));
    out
}

/// Whether `expansion` fits the kernel's /17–/128 hash.
pub(super) fn fits(expansion: &Expansion) -> bool {
    expansion.entries <= u128::from(MAX_RULES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_the_longest_and_minimise_the_entries() {
        // Nine lengths, one prefix each: the cheapest merge folds /33 into /34 (2 entries).
        let lengths: Vec<(u8, u64)> = (33..=41).map(|l| (l, 1)).collect();
        let (chosen, cost) = targets(&lengths);
        assert_eq!(chosen.len(), MAX_V6_LENGTHS);
        assert_eq!(*chosen.last().unwrap(), 41);
        assert_eq!(cost, 10, "{chosen:?}");
        // Many prefixes at /40, one at each other length: the /40s stay as they are.
        let lengths = [
            (33, 1),
            (34, 1),
            (35, 1),
            (36, 1),
            (37, 1),
            (38, 1),
            (39, 1),
            (40, 1000),
            (48, 1),
        ];
        let (chosen, cost) = targets(&lengths);
        assert!(chosen.contains(&40) && chosen.contains(&48), "{chosen:?}");
        // One single prefix doubled: the /40s are never expanded.
        assert_eq!(cost, 1000 + 8 + 1, "{chosen:?}");
    }

    #[test]
    fn a_region_within_the_limit_is_left_alone() {
        let prefixes = (33..=40u8).map(|l| (0x2001_0db8_u128 << 96, l));
        let expansion = plan(prefixes);
        assert!(expansion.plan.is_empty());
        assert_eq!(expansion.entries, 8);
    }
}
