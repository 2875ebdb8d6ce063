//! `LONG_V6_FILTER`: one bit per `LONG_V6` key and generation (`enforcer_common::v6_filter_bit`),
//! which the program reads before each IPv6 hash probe; a clear bit is a certain miss. Beside
//! them, the node markers (`enforcer_common::v6_marker_bit`): a key longer than /32 whose /32
//! has a `NODE_V6` entry marks each /40 it overlaps, and the program reads a /40's marker before
//! the node; one longer than /48 also marks its /48 (the deep marker), read before the node's
//! lengths over /48. Written for the generation not in force before the switch to it, and
//! rebuilt whole at start, with `NODE_V6_TABLE` (`nodes.rs`).

use enforcer_common::{
    NodeV6, V6_DEEP_MARKER_BITS, V6_FILTER_WORDS, V6_MARKER_BITS, map_names, v6_deep_marker_bit,
    v6_filter_bit, v6_marker_bit,
};

use super::{Datapath, DatapathError};

/// The filter bit of the `LONG_V6` key (`addr` masked to `len`).
fn key_bit(addr: u128, len: u8) -> u32 {
    v6_filter_bit((addr >> 64) as u64, addr as u64, len)
}

/// The marker bits of a `LONG_V6` key longer than /32 (`addr` masked to `len`): one per /40 it
/// overlaps, so at most 128 (a /33).
fn marker_bits(addr: u128, len: u8) -> impl Iterator<Item = u32> {
    let hi = (addr >> 64) as u64;
    let count = 1u64 << V6_MARKER_BITS.saturating_sub(len);
    (0..count).map(move |i| v6_marker_bit(hi + (i << (64 - u32::from(V6_MARKER_BITS)))))
}

/// The filter bits of one generation's keys: each key's own bit and, for a key longer than /32
/// whose /32 has a node (`has_node`, by the /32's first 32 bits), its markers, and its /48's
/// deep marker when it is longer than /48.
pub(super) fn generation_bits<'a>(
    keys: impl Iterator<Item = (u128, u8)> + 'a,
    has_node: impl Fn(u32) -> bool + 'a,
) -> impl Iterator<Item = u32> + 'a {
    keys.flat_map(move |(addr, len)| {
        let under_node = len > 32 && has_node((addr >> 96) as u32);
        let markers = under_node
            .then(|| marker_bits(addr, len))
            .into_iter()
            .flatten();
        let deep = (under_node && len > V6_DEEP_MARKER_BITS)
            .then(|| v6_deep_marker_bit((addr >> 64) as u64));
        std::iter::once(key_bit(addr, len))
            .chain(markers)
            .chain(deep)
    })
}

impl Datapath {
    /// Writes both generations of `LONG_V6_FILTER` from the keys `LONG_V6` holds, and of
    /// `NODE_V6_TABLE` from the nodes `NODE_V6` holds, at start: either may be new beside tables
    /// an earlier build filled (its map was not pinned then), and a program that reads a clear
    /// bit skips the probe. Each word gets its final value in one store, and a key in force has
    /// its bit in both the old and the new value, so a packet in flight never misses a prefix.
    pub fn rebuild_v6_filter(&mut self) -> Result<(), DatapathError> {
        let state = match self.source.take() {
            Some(state) => state,
            None => self.source_state()?,
        };
        let words = V6_FILTER_WORDS as usize;
        let mut filters = vec![0u64; 2 * words];
        for generation in 0..2 {
            let keys = state
                .long_v6
                .iter()
                .filter(|(_, values)| values[generation] != 0)
                .map(|(key, _)| (u128::from_be_bytes(key.addr), key.len));
            let has_node = |top: u32| {
                state
                    .nodes_v6
                    .get(&top.to_be_bytes())
                    .is_some_and(|node| node[generation] != NodeV6::default())
            };
            for bit in generation_bits(keys, has_node) {
                let bit = bit as usize;
                filters[generation * words + (bit >> 6)] |= 1 << (bit & 63);
            }
        }
        let nodes = self.rebuild_node_table(&state.nodes_v6);
        self.source = Some(state);
        nodes?;
        let memory = self.mapped(map_names::LONG_V6_FILTER, size_of::<u64>())?;
        for (word, value) in memory.u64s().iter_mut().zip(filters) {
            if *word != value {
                *word = value;
            }
        }
        Ok(())
    }

    /// Writes generation `next` of `LONG_V6_FILTER` before the switch to it: the bits of
    /// `bits`, over a copy of the generation in force when only some regions changed (its bits
    /// cover every key kept from it; a removed key's bit stays set until the next rewrite of the
    /// whole, which only costs a probe), or alone when the whole generation was rewritten. A
    /// bit of a key in force is never cleared: no packet can miss a prefix the tables hold.
    pub(super) fn write_v6_filter(
        &mut self,
        next: usize,
        bits: &[u32],
        partial: bool,
    ) -> Result<(), DatapathError> {
        let words = V6_FILTER_WORDS as usize;
        let memory = self.mapped(map_names::LONG_V6_FILTER, size_of::<u64>())?;
        let all = memory.u64s();
        let (first, second) = all.split_at_mut(words);
        let (filter, in_force) = if next == 0 {
            (first, &*second)
        } else {
            (second, &*first)
        };
        if partial {
            filter.copy_from_slice(in_force);
        } else {
            filter.fill(0);
        }
        for bit in bits {
            filter[(*bit >> 6) as usize] |= 1 << (bit & 63);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_marks_each_slash_40_it_overlaps_and_no_other() {
        let addr = |s: &str| u128::from(s.parse::<std::net::Ipv6Addr>().unwrap());
        let at = |a: u128| v6_marker_bit((a >> 64) as u64);
        // A /33 covers 128 /40s: its first and last are marked, the next one past it is not.
        let wide: Vec<u32> = marker_bits(addr("2001:db8:8000::"), 33).collect();
        assert_eq!(wide.len(), 128);
        assert_eq!(wide[0], at(addr("2001:db8:8000::1")));
        assert_eq!(wide[127], at(addr("2001:db8:ffff:ffff::1")));
        // A /48 marks its own /40 only.
        let narrow: Vec<u32> = marker_bits(addr("2001:db8:1234:5600::"), 56).collect();
        assert_eq!(narrow, [at(addr("2001:db8:1200::9"))]);
        // Keys longer than /32 mark only where their /32 has a node.
        let keys = [(addr("2001:db8:1::"), 48), (addr("2001:db9:1::"), 48)];
        let bits: Vec<u32> = generation_bits(keys.into_iter(), |top| top == 0x2001_0db8).collect();
        assert_eq!(bits.len(), 3, "two key bits and one marker");
        // A key longer than /48 marks its /48 too.
        let deep: Vec<u32> =
            generation_bits([(addr("2001:db8:1:2::"), 64)].into_iter(), |_| true).collect();
        assert_eq!(deep.len(), 3, "its bit, its /40's marker and its /48's");
        assert!(deep.contains(&v6_deep_marker_bit((addr("2001:db8:1::9") >> 64) as u64)));
        assert!(bits.contains(&at(addr("2001:db8:1::"))));
    }
}
