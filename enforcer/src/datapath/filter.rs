//! `LONG_V6_FILTER`: one bit per `LONG_V6` key and generation (`enforcer_common::v6_filter_bit`),
//! which the program reads before each IPv6 hash probe; a clear bit is a certain miss. Beside
//! them, the node markers (`enforcer_common::v6_marker_bit`): a key longer than /32 whose /32
//! has a `NODE_V6` entry marks each /40 it overlaps, and the program reads a /40's marker before
//! the node. And `DEEP_V6` (`enforcer_common::v6_deep_slot`): such a key longer than /48 sets,
//! in its /48's slot, the bit of its length's place in the node's list, and the program probes
//! the node's lengths over /48 only where their bits are set. Written for the generation not in
//! force before the switch to it, and rebuilt whole at start, with `NODE_V6_TABLE` (`nodes.rs`).

use enforcer_common::{
    NodeV6, V6_DEEP_BITS, V6_DEEP_SLOTS_LOG2, V6_FILTER_WORDS, V6_MARKER_BITS, map_names,
    v6_deep_slot, v6_filter_bit, v6_marker_bit,
};

use super::{Datapath, DatapathError};
use crate::policy::tables::FastMap;

/// What a change writes into `LONG_V6_FILTER` and `DEEP_V6` for the generation it builds.
pub(super) struct Marks {
    /// Filter bits: the keys' own and their node markers.
    bits: Vec<u32>,
    /// `DEEP_V6` slots and the bits to set in them.
    deep: Vec<(u32, u8)>,
}

/// The marks of the `LONG_V6` keys a change gives a value (`long`, by address and length) under
/// the nodes it writes (`nodes`, by the /32's first 32 bits).
pub(super) fn change_marks(long: &FastMap<(u128, u8), u32>, nodes: &FastMap<u32, NodeV6>) -> Marks {
    let keys = || {
        long.iter()
            .filter(|(_, v)| **v != 0)
            .map(|((addr, len), _)| (*addr, *len))
    };
    Marks {
        bits: generation_bits(keys(), |top| nodes.contains_key(&top)).collect(),
        deep: deep_slots(keys(), |top| nodes.get(&top).copied()).collect(),
    }
}

/// The `DEEP_V6` slot and bit of each key longer than /48 under a node (`node_of`, by the /32's
/// first 32 bits): the bit of its length's place in the node's list. A length the list lacks
/// (never written so) sets every bit: a set bit only costs a probe.
pub(super) fn deep_slots(
    keys: impl Iterator<Item = (u128, u8)>,
    node_of: impl Fn(u32) -> Option<NodeV6>,
) -> impl Iterator<Item = (u32, u8)> {
    keys.filter(|(_, len)| *len > V6_DEEP_BITS)
        .filter_map(move |(addr, len)| {
            let node = node_of((addr >> 96) as u32)?;
            let place = node.lengths.iter().position(|l| *l == len);
            let bit = place.map_or(0xFF, |i| 1u8 << i);
            Some((v6_deep_slot((addr >> 64) as u64), bit))
        })
}

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
/// whose /32 has a node (`has_node`, by the /32's first 32 bits), its markers.
pub(super) fn generation_bits<'a>(
    keys: impl Iterator<Item = (u128, u8)> + 'a,
    has_node: impl Fn(u32) -> bool + 'a,
) -> impl Iterator<Item = u32> + 'a {
    keys.flat_map(move |(addr, len)| {
        let markers = (len > 32 && has_node((addr >> 96) as u32))
            .then(|| marker_bits(addr, len))
            .into_iter()
            .flatten();
        std::iter::once(key_bit(addr, len)).chain(markers)
    })
}

impl Datapath {
    /// Writes both generations of `LONG_V6_FILTER` and `DEEP_V6` from the keys `LONG_V6` holds,
    /// and of `NODE_V6_TABLE` from the nodes `NODE_V6` holds, at start: each may be new beside
    /// tables an earlier build filled (its map was not pinned then), and a program that reads a
    /// clear bit skips the probe. Each word gets its final value in one store, and a key in
    /// force has its bit in both the old and the new value, so a packet in flight never misses
    /// a prefix.
    pub fn rebuild_v6_filter(&mut self) -> Result<(), DatapathError> {
        let state = match self.source.take() {
            Some(state) => state,
            None => self.source_state()?,
        };
        let words = V6_FILTER_WORDS as usize;
        let mut filters = vec![0u64; 2 * words];
        let slots = 1usize << V6_DEEP_SLOTS_LOG2;
        let mut deep = vec![0u8; 2 * slots];
        for generation in 0..2 {
            let keys = || {
                state
                    .long_v6
                    .iter()
                    .filter(move |(_, values)| values[generation] != 0)
                    .map(|(key, _)| (u128::from_be_bytes(key.addr), key.len))
            };
            let node_of = |top: u32| {
                state
                    .nodes_v6
                    .get(&top.to_be_bytes())
                    .map(|node| node[generation])
                    .filter(|node| *node != NodeV6::default())
            };
            for bit in generation_bits(keys(), |top| node_of(top).is_some()) {
                let bit = bit as usize;
                filters[generation * words + (bit >> 6)] |= 1 << (bit & 63);
            }
            for (slot, bit) in deep_slots(keys(), node_of) {
                deep[generation * slots + slot as usize] |= bit;
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
        let memory = self.mapped(map_names::DEEP_V6, size_of::<u64>())?;
        for (byte, value) in memory.bytes().iter_mut().zip(deep) {
            if *byte != value {
                *byte = value;
            }
        }
        Ok(())
    }

    /// Writes generation `next` of `LONG_V6_FILTER` and `DEEP_V6` before the switch to it: the
    /// marks of a change, over a copy of the generation in force when only some regions changed
    /// (its marks cover every key kept from it; a removed key's stay set until the next rewrite of
    /// the whole, which only costs a probe), or alone when the whole generation was rewritten. A
    /// mark of a key in force is never cleared: no packet can miss a prefix the tables hold.
    pub(super) fn write_v6_filter(
        &mut self,
        next: usize,
        marks: &Marks,
        partial: bool,
    ) -> Result<(), DatapathError> {
        let memory = self.mapped(map_names::LONG_V6_FILTER, size_of::<u64>())?;
        let filter = next_half(memory.u64s(), next, partial);
        for bit in &marks.bits {
            filter[(*bit >> 6) as usize] |= 1 << (bit & 63);
        }
        let memory = self.mapped(map_names::DEEP_V6, size_of::<u64>())?;
        let deep = next_half(memory.bytes(), next, partial);
        for (slot, bit) in &marks.deep {
            deep[*slot as usize] |= bit;
        }
        Ok(())
    }
}

/// Generation `next`'s half of a table of two, started as a copy of the other (`partial`) or
/// cleared.
fn next_half<T: Copy + Default>(all: &mut [T], next: usize, partial: bool) -> &mut [T] {
    let (first, second) = all.split_at_mut(all.len() / 2);
    let (half, in_force) = if next == 0 {
        (first, &*second)
    } else {
        (second, &*first)
    };
    if partial {
        half.copy_from_slice(in_force);
    } else {
        half.fill(T::default());
    }
    half
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
        // A key longer than /48 sets, in its /48's deep slot, the bit of its length's place.
        let node = NodeV6 {
            lengths: [64, 56, 48, 0, 0, 0, 0, 0],
        };
        let keys = [
            (addr("2001:db8:1:2::"), 64),
            (addr("2001:db8:1:300::"), 56),
            (addr("2001:db8:1::"), 48),
            (addr("2001:db8:9::"), 127),
        ];
        let deep: Vec<(u32, u8)> =
            deep_slots(keys.into_iter(), |top| (top == 0x2001_0db8).then_some(node)).collect();
        let slot = v6_deep_slot((addr("2001:db8:1::9") >> 64) as u64);
        assert_eq!(deep[..2], [(slot, 1), (slot, 2)]);
        assert_eq!(
            deep[2..],
            [(v6_deep_slot((addr("2001:db8:9::") >> 64) as u64), 0xFF)],
            "a length the list lacks sets every bit"
        );
        assert!(bits.contains(&at(addr("2001:db8:1::"))));
    }
}
