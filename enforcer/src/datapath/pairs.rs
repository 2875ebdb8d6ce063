//! The hashes of the lookup tables hold a value per generation: what a change writes and
//! deletes in them, and the controller's copy of what they hold.

use aya::maps::{HashMap as BpfHashMap, Map, MapData};

use super::{DatapathError, map_error, mapped::bytes};
use crate::policy::tables::FastMap;

/// What a change does to a hash of per-generation values: the keys written (with both
/// values) and the keys deleted.
pub(super) type Updates<K, V> = (Vec<(K, [V; 2])>, Vec<K>);

/// New per-generation values for one hash: keep the generation in force, set `next` to
/// `wanted`, except for the keys `kept` names (outside the part of the tables being rewritten),
/// whose `next` value becomes the one in force.
pub(super) fn pair_updates<K: Copy + Eq + std::hash::Hash, V: Copy + Default + PartialEq>(
    shadow: &FastMap<K, [V; 2]>,
    wanted: impl Iterator<Item = (K, V)>,
    next: usize,
    kept: impl Fn(&K) -> bool,
) -> Updates<K, V> {
    let pair = |value: V| {
        let mut new = [V::default(); 2];
        new[next] = value;
        new
    };
    if shadow.is_empty() {
        // A first fill: every entry is new, and no map of them is needed. Both generations get
        // the value: the one in force cannot reach these keys (its tables list no lengths for
        // a hash that holds nothing), and a later change need not copy them across.
        return (wanted.map(|(k, v)| (k, [v, v])).collect(), Vec::new());
    }
    let wanted: FastMap<K, V> = wanted.collect();
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    for (key, pair) in shadow {
        let mut new = *pair;
        new[next] = if kept(key) {
            pair[1 - next]
        } else {
            wanted.get(key).copied().unwrap_or_default()
        };
        if new == [V::default(); 2] {
            deletes.push(*key);
        } else if new != *pair {
            writes.push((*key, new));
        }
    }
    for (key, value) in &wanted {
        if !shadow.contains_key(key) {
            writes.push((*key, pair(*value)));
        }
    }
    (writes, deletes)
}

/// (key → value) pairs into the hash behind `fd` in batches.
pub(super) fn batch_pairs<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::RawFd,
    pairs: &[(K, V)],
) -> std::io::Result<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<u8> = Vec::with_capacity(pairs.len() * size_of::<K>());
    let mut values: Vec<u8> = Vec::with_capacity(pairs.len() * size_of::<V>());
    for (key, value) in pairs {
        keys.extend_from_slice(bytes(key));
        values.extend_from_slice(bytes(value));
    }
    super::update_batch_fd(fd, &keys, &values, size_of::<K>(), size_of::<V>())
}

pub(super) fn apply_shadow<K: Copy + Eq + std::hash::Hash, V>(
    shadow: &mut FastMap<K, V>,
    (writes, deletes): (Vec<(K, V)>, Vec<K>),
) {
    for key in deletes {
        shadow.remove(&key);
    }
    shadow.extend(writes);
}

pub(super) fn read_hash<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &Map,
    name: &'static str,
) -> Result<FastMap<K, V>, DatapathError> {
    let hash: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(map).map_err(map_error(name))?;
    hash.iter()
        .map(|entry| entry.map_err(map_error(name)))
        .collect()
}
