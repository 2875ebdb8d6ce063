//! `NODE_V6_TABLE`: the nodes of `NODE_V6` (each /32's lengths /33 to /128) again, in the
//! buckets of an array the program reads without hashing (`enforcer_common::NodeBucket`). A
//! bucket holds four /32s; the nodes of a fuller bucket stay in `NODE_V6` alone, which holds
//! every node, and the bucket says so. Written whole for the generation not in force before the
//! switch to it, and rebuilt at start.

use enforcer_common::{NodeBucket, NodeV6, V6_NODE_BUCKETS, map_names, v6_node_bucket};

use super::{Datapath, DatapathError, pairs::Updates};
use crate::policy::tables::FastMap;

/// One generation's buckets for `nodes` (by the /32's first 32 bits). The /32s are placed in
/// their order, so the buckets depend only on the set: rewriting a generation with the nodes it
/// holds changes no byte.
pub(super) fn buckets(mut nodes: Vec<(u32, NodeV6)>) -> Vec<NodeBucket> {
    nodes.sort_unstable_by_key(|(top, _)| *top);
    let mut buckets = vec![NodeBucket::default(); V6_NODE_BUCKETS as usize];
    for (top, node) in nodes {
        if node == NodeV6::default() {
            continue;
        }
        let bucket = &mut buckets[v6_node_bucket(top) as usize];
        match bucket.lengths.iter().position(|l| *l == [0; 8]) {
            Some(slot) => {
                bucket.tops[slot] = top;
                bucket.lengths[slot] = node.lengths;
            }
            None => bucket.overflow = 1,
        }
    }
    buckets
}

/// The nodes generation `next` has once a change's writes and deletes (of `NODE_V6`'s
/// per-generation values, as `pair_updates` makes them) are applied to `shadow`.
pub(super) fn next_nodes(
    shadow: &FastMap<[u8; 4], [NodeV6; 2]>,
    (writes, deletes): &Updates<[u8; 4], NodeV6>,
    next: usize,
) -> Vec<(u32, NodeV6)> {
    let mut nodes: FastMap<[u8; 4], NodeV6> = shadow.iter().map(|(k, v)| (*k, v[next])).collect();
    nodes.extend(writes.iter().map(|(k, v)| (*k, v[next])));
    for key in deletes {
        nodes.remove(key);
    }
    nodes
        .into_iter()
        .filter(|(_, node)| *node != NodeV6::default())
        .map(|(key, node)| (u32::from_be_bytes(key), node))
        .collect()
}

impl Datapath {
    /// Writes generation `generation` of `NODE_V6_TABLE` for `nodes`, word by word and only
    /// where a word changes.
    pub(super) fn write_node_table(
        &mut self,
        generation: usize,
        nodes: Vec<(u32, NodeV6)>,
    ) -> Result<(), DatapathError> {
        let buckets = buckets(nodes);
        let overflowed = buckets.iter().filter(|b| b.overflow != 0).count();
        if overflowed != 0 {
            tracing::debug!(
                overflowed,
                "IPv6 node buckets overflowed (their other nodes are read from the hash)"
            );
        }
        let memory = self.mapped(map_names::NODE_V6_TABLE, size_of::<NodeBucket>())?;
        let words = memory.u64s();
        let half = &mut words[generation * V6_NODE_BUCKETS as usize * BUCKET_WORDS..]
            [..V6_NODE_BUCKETS as usize * BUCKET_WORDS];
        for (slots, bucket) in half.chunks_exact_mut(BUCKET_WORDS).zip(&buckets) {
            for (word, value) in slots.iter_mut().zip(bucket_words(bucket)) {
                if *word != value {
                    *word = value;
                }
            }
        }
        Ok(())
    }

    /// Writes both generations of `NODE_V6_TABLE` from what `NODE_V6` holds, at start: the table
    /// may be new beside hashes an earlier build filled. The generation in force is rewritten
    /// with the nodes it already has, which changes nothing where it was written before.
    pub(super) fn rebuild_node_table(
        &mut self,
        in_hash: &FastMap<[u8; 4], [NodeV6; 2]>,
    ) -> Result<(), DatapathError> {
        for generation in 0..2 {
            let nodes = in_hash
                .iter()
                .map(|(key, node)| (u32::from_be_bytes(*key), node[generation]))
                .collect();
            self.write_node_table(generation, nodes)?;
        }
        Ok(())
    }
}

/// Words of a bucket in the mapped table.
const BUCKET_WORDS: usize = size_of::<NodeBucket>() / 8;

/// A bucket as the words the mapped table holds.
fn bucket_words(bucket: &NodeBucket) -> [u64; BUCKET_WORDS] {
    let mut words = [0u64; BUCKET_WORDS];
    let bytes = super::mapped::bytes(bucket);
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(len: u8) -> NodeV6 {
        NodeV6 {
            lengths: [len, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    #[test]
    fn a_full_bucket_overflows_and_placement_depends_only_on_the_set() {
        // Six /32s of one bucket: four are placed, the bucket says the rest are elsewhere.
        let bucket = v6_node_bucket(0x2001_0db8);
        let same: Vec<u32> = (0x2000_0000u32..)
            .filter(|top| v6_node_bucket(*top) == bucket)
            .take(6)
            .collect();
        let nodes: Vec<(u32, NodeV6)> = same.iter().map(|top| (*top, node(48))).collect();
        let built = buckets(nodes.clone());
        let b = &built[bucket as usize];
        assert_eq!(b.overflow, 1);
        assert_eq!(b.tops, [same[0], same[1], same[2], same[3]]);
        assert!(b.lengths.iter().all(|l| l[0] == 48));
        assert_eq!(
            built
                .iter()
                .filter(|b| **b != NodeBucket::default())
                .count(),
            1
        );
        let mut reversed = nodes;
        reversed.reverse();
        assert_eq!(buckets(reversed), built, "the same set, the same bytes");
        // Four fit without overflow.
        let four = same[..4].iter().map(|top| (*top, node(56))).collect();
        assert_eq!(buckets(four)[bucket as usize].overflow, 0);
    }

    #[test]
    fn a_change_gives_the_next_generation_its_own_nodes() {
        let mut shadow = FastMap::default();
        shadow.insert(1u32.to_be_bytes(), [node(40), node(40)]);
        shadow.insert(2u32.to_be_bytes(), [node(48), node(48)]);
        shadow.insert(3u32.to_be_bytes(), [node(56), NodeV6::default()]);
        let updates = (
            vec![(4u32.to_be_bytes(), [NodeV6::default(), node(64)])],
            vec![2u32.to_be_bytes()],
        );
        let mut next = next_nodes(&shadow, &updates, 1);
        next.sort_unstable_by_key(|(top, _)| *top);
        assert_eq!(next, [(1, node(40)), (4, node(64))]);
    }
}
