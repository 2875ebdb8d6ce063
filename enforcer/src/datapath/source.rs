//! Writes the source lookup tables (`crate::policy::tables`) into the kernel: the generation not in
//! force is rebuilt aside, then one word of `CONFIG` switches every packet to it.

use std::collections::HashSet;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use enforcer_common::{
    DirV6, LongKeyV4, LongKeyV6, LongValue, NodeV6,
    lookup::{
        BLOCK_SLOTS, V4_DEFAULT_BLOCKS, V4_MAX_BLOCKS, V4_POINTER, V4_ROOT_BLOCKS, V6_DIR_SLOTS,
    },
    map_names,
};
use ipnet::IpNet;

use super::{
    Datapath, DatapathError, map_error,
    mapped::{Mapped, bytes},
    pairs::{apply_shadow, batch_pairs, pair_updates, read_hash},
};
use crate::policy::tables::{self, Block, FastMap, Regions};

/// What the controller knows of the tables in the kernel (read from the maps once, then kept).
#[derive(Debug, Default)]
pub(super) struct SourceState {
    /// The generation in force.
    generation: u32,
    /// Per generation: the block of each /16 that has one.
    blocks: [FastMap<u16, u32>; 2],
    long_v4: FastMap<LongKeyV4, LongValue>,
    pub(super) nodes_v6: FastMap<[u8; 4], [NodeV6; 2]>,
    pub(super) long_v6: FastMap<LongKeyV6, LongValue>,
}

/// The hashes of one policy's tables: `LONG_V4`'s, `NODE_V6`'s and `LONG_V6`'s entries.
type LongTables = (
    FastMap<(u32, u8), u32>,
    FastMap<u32, NodeV6>,
    FastMap<(u128, u8), u32>,
);

/// Mappings up to this size stay mapped between changes.
const KEEP_MAPPED: usize = 8 << 20;

/// The error when `SOURCE_V4` (`capacity` blocks, roots included) has no free block left.
fn table_full(needed: usize, in_use: usize, capacity: u32) -> DatapathError {
    DatapathError::Map {
        name: map_names::SOURCE_V4,
        source: format!(
            "the IPv4 lookup table is full: this policy needs {needed} blocks beside the {in_use} in force, the table holds {}; restart the controller after `enforcer detach` to size it anew",
            capacity - 2 * V4_ROOT_BLOCKS
        )
        .into(),
    }
}

fn block_range(block: u32) -> std::ops::Range<usize> {
    let start = block as usize * BLOCK_SLOTS;
    start..start + BLOCK_SLOTS
}

impl Datapath {
    /// A memory-mapped array map, mapped once and kept: mapping inserts every page of the map,
    /// too slow to repeat for every use. Mappings larger than `KEEP_MAPPED` are dropped at the
    /// end of each change (`unmap_large`): they would count in the controller's resident memory.
    pub(super) fn mapped(
        &mut self,
        name: &'static str,
        value_size: usize,
    ) -> Result<&mut Mapped, DatapathError> {
        if !self.mapped.contains_key(name) {
            let memory = Mapped::new(self.map(name)?, name, value_size)?;
            self.mapped.insert(name, memory);
        }
        Ok(self.mapped.get_mut(name).expect("just inserted"))
    }

    /// Drops the mappings larger than `KEEP_MAPPED`.
    pub(super) fn unmap_large(&mut self) {
        self.mapped.retain(|_, m| m.len <= KEEP_MAPPED);
    }

    /// Reads what the tables hold (after a restart, or on first use of a fresh program).
    pub(super) fn source_state(&mut self) -> Result<SourceState, DatapathError> {
        let generation = self.config()?.generation & 1;
        let mut state = SourceState {
            generation,
            ..SourceState::default()
        };
        let blocks = self.mapped(map_names::SOURCE_V4, 1024)?;
        let slots = blocks.u32s();
        for g in 0..2 {
            for first in 0..V4_ROOT_BLOCKS {
                let root = &slots[block_range(g * V4_ROOT_BLOCKS + first)];
                for (second, slot) in root.iter().enumerate() {
                    if slot & V4_POINTER != 0 {
                        let at = u16::try_from(first as usize * BLOCK_SLOTS + second).unwrap_or(0);
                        state.blocks[g as usize].insert(at, slot & !V4_POINTER);
                    }
                }
            }
        }
        state.long_v4 = read_hash(self.map(map_names::LONG_V4)?, map_names::LONG_V4)?;
        state.nodes_v6 = read_hash(self.map(map_names::NODE_V6)?, map_names::NODE_V6)?;
        state.long_v6 = read_hash(self.map(map_names::LONG_V6)?, map_names::LONG_V6)?;
        Ok(state)
    }

    /// Builds the tables for `entries` in the generation not in force, then switches to it.
    /// If anything fails before the switch, the tables in force are untouched.
    pub(super) fn write_source(&mut self, entries: &[(IpNet, u32)]) -> Result<(), DatapathError> {
        let mut state = match self.source.take() {
            Some(state) => state,
            None => self.source_state()?,
        };
        // Grow first, while the new policy's tables do not exist yet: growing copies the table
        // in force, and at a million entries the copies and the tables together are hundreds
        // of MiB.
        let needed = tables::v4_blocks_needed(entries.iter().map(|(prefix, _)| prefix));
        self.make_v4_room(&state, needed as usize)?;
        // Reading the state maps the IPv4 table (all of its pages): not kept while the new
        // tables are built.
        self.unmap_large();
        let (v4, v6) = tables::build(entries).map_err(|e| DatapathError::Map {
            name: map_names::LONG_V6,
            source: e.into(),
        })?;
        tracing::debug!(mib = ?crate::memory_mib(), "lookup tables built");
        self.make_v4_room(&state, v4.blocks.len())?;
        let result = self.write_source_with(&mut state, v4, v6);
        tracing::debug!(mib = ?crate::memory_mib(), "lookup tables written");
        // On failure the state may no longer match the maps: read it afresh next time.
        if result.is_ok() {
            self.source = Some(state);
        }
        result
    }

    /// Grows `SOURCE_V4` if `blocks` new blocks do not fit beside the generation in force.
    fn make_v4_room(&mut self, state: &SourceState, blocks: usize) -> Result<(), DatapathError> {
        let in_use = state.blocks[state.generation as usize].len();
        let capacity = self.v4_capacity()?;
        if blocks + in_use <= capacity as usize {
            return Ok(());
        }
        // Room for both generations side by side, and a quarter more for later changes (as a
        // table sized at start has).
        let both = blocks + in_use;
        let size = u32::try_from(both + both / 4 + 256)
            .unwrap_or(u32::MAX)
            .clamp(V4_DEFAULT_BLOCKS, V4_MAX_BLOCKS);
        self.grow_v4(size).map_err(|e| DatapathError::Map {
            name: map_names::SOURCE_V4,
            source: format!(
                "the IPv4 lookup table holds {capacity} blocks; this policy needs {blocks} beside the {in_use} in force, and growing the table failed: {e}"
            )
            .into(),
        })
    }

    /// Blocks `SOURCE_V4` has beyond the roots of both generations.
    pub(super) fn v4_capacity(&self) -> Result<u32, DatapathError> {
        let name = map_names::SOURCE_V4;
        let Map::Array(data) = self.map(name)? else {
            return Err(DatapathError::Map {
                name,
                source: "not an array".into(),
            });
        };
        let entries = data.info().map_err(map_error(name))?.max_entries();
        Ok(entries.saturating_sub(2 * V4_ROOT_BLOCKS))
    }

    /// Replaces `SOURCE_V4` by a larger copy: a map's size is fixed when it is created, so a new
    /// map is created (and pinned in place of the old one), filled with the old one's blocks, and
    /// a program instance using it is loaded with every other map shared; the link then switches
    /// to that program in one kernel call. Only for pinned maps (what the controller runs with).
    fn grow_v4(&mut self, blocks: u32) -> Result<(), DatapathError> {
        let name = map_names::SOURCE_V4;
        if self.ebpf.is_none() {
            return Err(DatapathError::Map {
                name,
                source: "the table cannot grow while the program is verified".into(),
            });
        }
        let Some(dir) = self.pin_dir.clone() else {
            return Err(DatapathError::Map {
                name,
                source: "only a pinned table can grow (load the program for the largest policy)"
                    .into(),
            });
        };
        let old: Vec<u8> = self.mapped(name, 1024)?.bytes().to_vec();
        // Unmapped at once: the copy above is what is kept.
        self.mapped.remove(name);
        let pin = dir.join(name);
        let _ = std::fs::remove_file(&pin);
        let mut grown = match Self::load_full(self.stages, Some(&dir), blocks) {
            Ok(grown) => grown,
            Err(e) => {
                // Put the old table's pin back: the running program still uses it.
                if let Map::Array(data) = self.map(name)? {
                    let _ = data.pin(&pin);
                }
                return Err(e);
            }
        };
        {
            let memory = grown.mapped(name, 1024)?;
            memory.bytes()[..old.len()].copy_from_slice(&old);
        }
        drop(old);
        grown.unmap_large();
        if dir.join(super::LINK_PIN).exists() {
            grown.take_over_link(&dir)?;
        }
        grown.vpn_slots = std::mem::take(&mut self.vpn_slots);
        grown.upstream_slots = std::mem::take(&mut self.upstream_slots);
        tracing::info!(blocks, "IPv4 lookup table grown");
        *self = grown;
        Ok(())
    }

    /// Memory: at a million entries each table below is tens of MiB, so each is dropped (and
    /// a large mapping unmapped) as soon as it is written, not at the end.
    fn write_source_with(
        &mut self,
        state: &mut SourceState,
        v4: tables::V4Tables,
        v6: tables::V6Tables,
    ) -> Result<(), DatapathError> {
        let tables::V4Tables {
            root: v4_root,
            blocks: v4_blocks,
            long: v4_long,
        } = v4;
        let tables::V6Tables {
            dir: v6_dir,
            nodes: v6_nodes,
            long: v6_long,
        } = v6;
        let active = state.generation as usize;
        let next = 1 - active;

        // IPv4 blocks: a /16 whose block is unchanged keeps it (shared by both generations);
        // changed ones get a block the generation in force does not use.
        let name = map_names::SOURCE_V4;
        let memory = self.mapped(name, 1024)?;
        let slots = memory.u32s();
        let capacity = u32::try_from(slots.len() / BLOCK_SLOTS).unwrap_or(u32::MAX);
        let in_use: HashSet<u32, foldhash::fast::RandomState> =
            state.blocks[active].values().copied().collect();
        let mut free = (2 * V4_ROOT_BLOCKS..capacity).filter(|b| !in_use.contains(b));
        let mut root = v4_root;
        let mut placed: FastMap<u16, u32> =
            FastMap::with_capacity_and_hasher(v4_blocks.len(), Default::default());
        for (slot, block) in &v4_blocks {
            let unchanged = state.blocks[active]
                .get(slot)
                .filter(|b| slots[block_range(**b)] == block[..]);
            let index = match unchanged {
                Some(index) => *index,
                None => {
                    let index = free
                        .next()
                        .ok_or_else(|| table_full(v4_blocks.len(), in_use.len(), capacity))?;
                    slots[block_range(index)].copy_from_slice(&block[..]);
                    index
                }
            };
            placed.insert(*slot, index);
            root[usize::from(*slot)] = V4_POINTER | index;
        }
        for first in 0..V4_ROOT_BLOCKS {
            let from = first as usize * BLOCK_SLOTS;
            let block: &Block = root[from..from + BLOCK_SLOTS]
                .try_into()
                .expect("256 slots");
            slots[block_range(next as u32 * V4_ROOT_BLOCKS + first)].copy_from_slice(block);
        }
        drop((v4_blocks, root));
        // Mapping an array puts all its pages in this process: tens of MiB at this size.
        self.unmap_large();

        // IPv6 direct table: the whole generation.
        let name = map_names::DIR_V6;
        let memory = self.mapped(name, size_of::<DirV6>())?;
        let dir = memory.bytes();
        let size = size_of::<DirV6>();
        let from = next * V6_DIR_SLOTS as usize * size;
        for (i, d) in v6_dir.iter().enumerate() {
            dir[from + i * size..from + (i + 1) * size].copy_from_slice(bytes(d));
        }
        drop(v6_dir);

        self.write_hashes_and_switch(state, placed, (v4_long, v6_nodes, v6_long), None)
    }

    /// Rewrites only `regions` of the tables (see `tables::Regions`), for the policy whose
    /// trie entries overlapping them are `entries`; the rest of the generation not in force is
    /// copied from the one in force (the IPv4 blocks outside are shared); then switches to it.
    /// The IPv4 table is read and written a block at a time through system calls, not mapped:
    /// mapping it puts all of its pages in this process (64 MiB at a million entries).
    pub(super) fn write_source_in(
        &mut self,
        entries: &[(IpNet, u32)],
        regions: &Regions,
    ) -> Result<(), DatapathError> {
        let mut state = match self.source.take() {
            Some(state) => state,
            None => self.source_state()?,
        };
        self.unmap_large();
        let (v4, v6) = tables::build(entries).map_err(|e| DatapathError::Map {
            name: map_names::LONG_V6,
            source: e.into(),
        })?;
        self.make_v4_room(&state, v4.blocks.len())?;
        let result = self.write_regions(&mut state, regions, v4, v6);
        if result.is_ok() {
            self.source = Some(state);
        }
        result
    }

    fn write_regions(
        &mut self,
        state: &mut SourceState,
        regions: &Regions,
        v4: tables::V4Tables,
        v6: tables::V6Tables,
    ) -> Result<(), DatapathError> {
        let active = state.generation as usize;
        let next = 1 - active;

        // IPv4: the root in force, with the regions' slots rewritten; a region's block is the
        // one in force if unchanged, else a block the generation in force does not use.
        let name = map_names::SOURCE_V4;
        let capacity = self.v4_capacity()? + 2 * V4_ROOT_BLOCKS;
        let mut table: Array<&mut MapData, Block> = self.typed_mut(name)?;
        let mut root = vec![0u32; V4_ROOT_BLOCKS as usize * BLOCK_SLOTS];
        for (first, slots) in (0..V4_ROOT_BLOCKS).zip(root.chunks_exact_mut(BLOCK_SLOTS)) {
            let block = table
                .get(&(active as u32 * V4_ROOT_BLOCKS + first), 0)
                .map_err(map_error(name))?;
            slots.copy_from_slice(&block);
        }
        let in_use: HashSet<u32, foldhash::fast::RandomState> =
            state.blocks[active].values().copied().collect();
        let mut free = (2 * V4_ROOT_BLOCKS..capacity).filter(|b| !in_use.contains(b));
        let mut placed = state.blocks[active].clone();
        for &slot in regions.v4_slots() {
            placed.remove(&slot);
            let Some(block) = v4.blocks.get(&slot) else {
                root[usize::from(slot)] = v4.root[usize::from(slot)];
                continue;
            };
            let unchanged = match state.blocks[active].get(&slot) {
                Some(index) => {
                    (table.get(index, 0).map_err(map_error(name))? == **block).then_some(*index)
                }
                None => None,
            };
            let index = match unchanged {
                Some(index) => index,
                None => {
                    let index = free
                        .next()
                        .ok_or_else(|| table_full(v4.blocks.len(), in_use.len(), capacity))?;
                    table.set(index, **block, 0).map_err(map_error(name))?;
                    index
                }
            };
            placed.insert(slot, index);
            root[usize::from(slot)] = V4_POINTER | index;
        }
        for (first, slots) in (0..V4_ROOT_BLOCKS).zip(root.chunks_exact(BLOCK_SLOTS)) {
            let block: Block = slots.try_into().expect("256 slots");
            table
                .set(next as u32 * V4_ROOT_BLOCKS + first, block, 0)
                .map_err(map_error(name))?;
        }

        // IPv6 direct table: the one in force, with the regions' slots rewritten.
        let size = size_of::<DirV6>();
        let memory = self.mapped(map_names::DIR_V6, size)?;
        let dir = memory.bytes();
        let half = V6_DIR_SLOTS as usize * size;
        dir.copy_within(active * half..(active + 1) * half, next * half);
        for &slot in regions.v6_slots() {
            let at = next * half + usize::from(slot) * size;
            dir[at..at + size].copy_from_slice(bytes(&v6.dir[usize::from(slot)]));
        }

        self.write_hashes_and_switch(state, placed, (v4.long, v6.nodes, v6.long), Some(regions))
    }

    /// The hashes, then the switch to the generation not in force. In each hash a key holds a
    /// value per generation; only `next`'s values are written now (the packets in flight read
    /// the other): `long`'s, or, with `regions`, `long`'s inside them and the values in force
    /// outside.
    fn write_hashes_and_switch(
        &mut self,
        state: &mut SourceState,
        placed: FastMap<u16, u32>,
        long: LongTables,
        regions: Option<&Regions>,
    ) -> Result<(), DatapathError> {
        let (v4_long, v6_nodes, v6_long) = long;
        let next = 1 - state.generation as usize;
        // The filter's bits, node markers and deep slots of the keys given a value in `next`.
        let v6_marks = super::filter::change_marks(&v6_long, &v6_nodes);
        let outside_v4 = |slot: u16| regions.is_some_and(|r| !r.has_v4(slot));
        let outside_v6 = |slot: u16| regions.is_some_and(|r| !r.has_v6(slot));
        let long_v4 = pair_updates(
            &state.long_v4,
            v4_long
                .into_iter()
                .map(|((addr, len), v)| (LongKeyV4::new(addr, len), v)),
            next,
            |k| outside_v4(u16::from_be_bytes([k.addr[0], k.addr[1]])),
        );
        let nodes_v6 = pair_updates(
            &state.nodes_v6,
            v6_nodes.into_iter().map(|(k, n)| (k.to_be_bytes(), n)),
            next,
            |k| outside_v6(u16::from_be_bytes([k[0], k[1]])),
        );
        let long_v6 = pair_updates(
            &state.long_v6,
            v6_long
                .into_iter()
                .map(|((addr, len), v)| (LongKeyV6::new(addr, len), v)),
            next,
            |k| outside_v6(u16::from_be_bytes([k.addr[0], k.addr[1]])),
        );
        // The kernel inserts into a hash at about a microsecond an entry: the IPv4 hash is
        // written on a second thread beside the IPv6 ones. Where batches are refused (before
        // Linux 5.6), entry by entry, one thread.
        let fds = (
            self.raw_fd(map_names::LONG_V4),
            self.raw_fd(map_names::NODE_V6),
            self.raw_fd(map_names::LONG_V6),
        );
        let batched = match fds {
            (Ok(v4_fd), Ok(node_fd), Ok(v6_fd)) => std::thread::scope(|scope| {
                let v4 = scope.spawn(|| batch_pairs(v4_fd, &long_v4.0));
                let v6 =
                    batch_pairs(node_fd, &nodes_v6.0).and_then(|()| batch_pairs(v6_fd, &long_v6.0));
                v4.join().is_ok_and(|r| r.is_ok()) && v6.is_ok()
            }),
            _ => false,
        };
        if !batched {
            self.write_pairs(map_names::LONG_V4, &long_v4.0)?;
            self.write_pairs(map_names::NODE_V6, &nodes_v6.0)?;
            self.write_pairs(map_names::LONG_V6, &long_v6.0)?;
        }
        self.write_v6_filter(next, &v6_marks, regions.is_some())?;
        self.write_node_table(
            next,
            super::nodes::next_nodes(&state.nodes_v6, &nodes_v6, next),
        )?;

        // The switch.
        self.update_config(|c| c.generation = next as u32)?;
        state.generation = next as u32;
        state.blocks[next] = placed;

        // Keys neither generation uses any more.
        self.delete_keys::<_, LongValue>(map_names::LONG_V4, &long_v4.1)?;
        self.delete_keys::<_, [NodeV6; 2]>(map_names::NODE_V6, &nodes_v6.1)?;
        self.delete_keys::<_, LongValue>(map_names::LONG_V6, &long_v6.1)?;
        apply_shadow(&mut state.long_v4, long_v4);
        apply_shadow(&mut state.nodes_v6, nodes_v6);
        apply_shadow(&mut state.long_v6, long_v6);
        Ok(())
    }

    /// Writes (key → value) pairs into a hash, batched where the kernel supports it.
    fn write_pairs<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        pairs: &[(K, V)],
    ) -> Result<(), DatapathError> {
        if pairs.is_empty() {
            return Ok(());
        }
        if let Ok(fd) = self.raw_fd(name)
            && batch_pairs(fd, pairs).is_ok()
        {
            return Ok(());
        }
        let mut map: BpfHashMap<&mut MapData, K, V> = self.typed_mut(name)?;
        for (key, value) in pairs {
            map.insert(key, value, 0).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// Removes keys from a hash; an absent key is already what we want.
    fn delete_keys<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        keys: &[K],
    ) -> Result<(), DatapathError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut map: BpfHashMap<&mut MapData, K, V> = self.typed_mut(name)?;
        for key in keys {
            let _ = map.remove(key);
        }
        Ok(())
    }
}
