//! `LONG_V6_FILTER`: one bit per `LONG_V6` key and generation (`enforcer_common::v6_filter_bit`),
//! which the program reads before each IPv6 hash probe; a clear bit is a certain miss. Written
//! for the generation not in force before the switch to it, and rebuilt whole at start.

use enforcer_common::{V6_FILTER_WORDS, map_names, v6_filter_bit};

use super::{Datapath, DatapathError};

/// The filter bit of the `LONG_V6` key (`addr` masked to `len`).
pub(super) fn key_bit(addr: u128, len: u8) -> u32 {
    v6_filter_bit((addr >> 64) as u64, addr as u64, len)
}

impl Datapath {
    /// Writes both generations of `LONG_V6_FILTER` from the keys `LONG_V6` holds, at start:
    /// the filter may be new beside tables an earlier build filled (its map was not pinned
    /// then), and a program that reads a clear bit skips the probe. Each word gets its final
    /// value in one store, and a key in force has its bit in both the old and the new value, so
    /// a packet in flight never misses a prefix.
    pub fn rebuild_v6_filter(&mut self) -> Result<(), DatapathError> {
        let state = match self.source.take() {
            Some(state) => state,
            None => self.source_state()?,
        };
        let words = V6_FILTER_WORDS as usize;
        let mut filters = vec![0u64; 2 * words];
        for (key, values) in &state.long_v6 {
            let bit = key_bit(u128::from_be_bytes(key.addr), key.len) as usize;
            for (generation, value) in values.iter().enumerate() {
                if *value != 0 {
                    filters[generation * words + (bit >> 6)] |= 1 << (bit & 63);
                }
            }
        }
        self.source = Some(state);
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
