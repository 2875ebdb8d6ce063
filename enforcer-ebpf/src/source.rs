//! The source lookup: which registry entry (deny range, network or device) is the longest
//! prefix holding the source. Flat tables built by the controller (layout in
//! `enforcer_common::lookup`, design in `enforcer/src/lookup.rs`): a fixed number of steps per
//! address, whatever the registry's size.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use enforcer_common::{
    DirV6, LongKeyV4, LongKeyV6, LongValue, MAX_RULES, NodeBucket, NodeV6, V6_DEEP_BITS,
    V6_DEEP_WORDS, V6_FILTER_WORDS, V6_NODE_BUCKETS, V6_NODE_SLOTS,
    lookup::{
        V4_DEFAULT_BLOCKS, V4_LONG_SHIFT, V4_POINTER, V4_ROOT_BLOCKS, V6_DIR_SLOTS, VALUE_MASK,
    },
    v6_deep_slot, v6_filter_bit, v6_marker_bit, v6_node_bucket,
};

/// Arrays the controller writes through a memory mapping (a whole table in one copy).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Hashes that take memory as entries arrive, not all at load.
const BPF_F_NO_PREALLOC: u32 = 1;

// Map names match `enforcer_common::map_names`. The controller resizes SOURCE_V4 at load.
#[map]
static SOURCE_V4: Array<[u32; 256]> =
    Array::with_max_entries(2 * V4_ROOT_BLOCKS + V4_DEFAULT_BLOCKS, BPF_F_MMAPABLE);
#[map]
static LONG_V4: HashMap<LongKeyV4, LongValue> =
    HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
#[map]
static DIR_V6: Array<DirV6> = Array::with_max_entries(2 * V6_DIR_SLOTS, BPF_F_MMAPABLE);
#[map]
static NODE_V6: HashMap<[u8; 4], [NodeV6; 2]> =
    HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
#[map]
static LONG_V6: HashMap<LongKeyV6, LongValue> =
    HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
/// `NODE_V6`'s entries in buckets, read before it (`NodeBucket`).
#[map]
static NODE_V6_TABLE: Array<NodeBucket> =
    Array::with_max_entries(2 * V6_NODE_BUCKETS, BPF_F_MMAPABLE);
/// Per /48 slot and generation, which of its node's lengths over /48 it holds (`v6_deep_slot`).
#[map]
static DEEP_V6: Array<u64> = Array::with_max_entries(2 * V6_DEEP_WORDS, BPF_F_MMAPABLE);
/// One bit per `LONG_V6` key and generation (`v6_filter_bit`): a clear bit spares the probe.
#[map]
static LONG_V6_FILTER: Array<u64> = Array::with_max_entries(2 * V6_FILTER_WORDS, BPF_F_MMAPABLE);

/// `rule + 1` of the rule whose prefix is the longest holding `src`, in table generation
/// `generation`, or 0 (none). The two array reads that decide almost every address are
/// inlined; only a /24 holding prefixes of /25 to /32 calls `long_v4` for its probes.
///
/// Verifier: a plain number, not `Option<u32>`: where the lookup misses, LLVM leaves an
/// `Option`'s payload undefined and may still copy its register, which the verifier refuses
/// ("!read_ok").
#[inline(always)]
pub fn v4(src: [u8; 4], generation: u32) -> u32 {
    let generation = generation & 1;
    let Some(root) = SOURCE_V4.get(generation * V4_ROOT_BLOCKS + u32::from(src[0])) else {
        return 0;
    };
    let mut slot = root[usize::from(src[1])];
    if slot & V4_POINTER != 0 {
        let Some(block) = SOURCE_V4.get(slot & !V4_POINTER) else {
            return 0;
        };
        slot = block[usize::from(src[2])];
        if slot >> V4_LONG_SHIFT != 0 {
            return long_v4(u32::from_be_bytes(src), generation, slot);
        }
    }
    slot & VALUE_MASK
}

/// The same for IPv6.
#[inline(always)]
pub fn v6(src: &[u8; 16], generation: u32) -> u32 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&src[..8]);
    let hi = u64::from_be_bytes(bytes);
    bytes.copy_from_slice(&src[8..]);
    let lo = u64::from_be_bytes(bytes);
    enforcer_lookup_v6(hi, lo, u64::from(generation))
}

// Verifier: each probe loop is a function of its own (a BPF-to-BPF call) taking and returning
// plain numbers. Inlined, every way out of the probe loops (hit at each length, or miss) would carry
// its own state through the rest of the program, and verification passes a million
// instructions; behind a call, all of them meet again at the return with one scalar.

/// `rule + 1` of the longest prefix holding `addr` (host order), whose /24 slot in table
/// generation `generation` (0 or 1) is `slot`: the lengths /25 to /32 it marks, probed longest
/// first, then the slot's own value.
#[inline(never)]
fn long_v4(addr: u32, generation: u32, slot: u32) -> u32 {
    let lengths = slot >> V4_LONG_SHIFT;
    // Lengths /32 down to /25, each a constant shift (no loop state for the verifier).
    for bit in (0..8u32).rev() {
        if lengths & (1 << bit) == 0 {
            continue;
        }
        let len = 25 + bit;
        let key = LongKeyV4::new(addr & (u32::MAX << (32 - len)), len as u8);
        // SAFETY: a read of a map value the kernel keeps alive for this program run.
        if let Some(value) = unsafe { LONG_V4.get(&key) } {
            let value = value[(generation & 1) as usize];
            if value != 0 {
                return value;
            }
        }
    }
    slot & VALUE_MASK
}

/// `LONG_V6`'s value for the source masked to `len` (1 to 128): `rule + 1`, or 0.
#[inline(always)]
fn probe_v6(hi: u64, lo: u64, len: u32, generation: usize) -> u32 {
    let (hi, lo) = if len > 64 {
        (hi, lo & (u64::MAX << (128 - len)))
    } else {
        (hi & (u64::MAX << ((64 - len) & 63)), 0)
    };
    if !filter_has(v6_filter_bit(hi, lo, len as u8), generation) {
        return 0;
    }
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hi.to_be_bytes());
    addr[8..].copy_from_slice(&lo.to_be_bytes());
    let key = LongKeyV6 {
        addr,
        len: len as u8,
        _pad: [0; 3],
    };
    // SAFETY: as above.
    unsafe { LONG_V6.get(&key) }.map_or(0, |v| v[generation])
}

/// Whether generation `generation` of `LONG_V6_FILTER` has `bit` set.
#[inline(always)]
fn filter_has(bit: u32, generation: usize) -> bool {
    LONG_V6_FILTER
        .get(generation as u32 * V6_FILTER_WORDS + (bit >> 6))
        .is_some_and(|w| (*w >> (bit & 63)) & 1 != 0)
}

/// `rule + 1` of the longest prefix holding the address `hi:lo`, or 0. Verifier: a global
/// function, verified once on its own; as a static one it was walked in each caller's state,
/// and the node marker's branch alone added 36,000 instructions to the walk.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn enforcer_lookup_v6(hi: u64, lo: u64, generation: u64) -> u32 {
    let generation = (generation & 1) as usize;
    let Some(dir) = DIR_V6.get(generation as u32 * V6_DIR_SLOTS + (hi >> 48) as u32) else {
        return 0;
    };
    // Lengths /33 to /128 from the /32's node, where the /16 does not list them itself and
    // some key longer than /32 overlaps the packet's /40 (its marker).
    if dir.nodes != 0 && filter_has(v6_marker_bit(hi), generation) {
        let lengths = node_lengths((hi >> 32) as u32, generation);
        if lengths != 0 {
            // Of its lengths over /48, only those of keys in the packet's /48 (its deep slot);
            // the slot is read only if the list has any (its first is its longest).
            let deep = if lengths & 0xFF > u64::from(V6_DEEP_BITS) {
                deep_lengths(hi, generation)
            } else {
                0
            };
            let value = probe_lengths(hi, lo, lengths, generation, deep);
            if value != 0 {
                return value;
            }
        }
    }
    let value = probe_lengths(hi, lo, u64::from_le_bytes(dir.lengths), generation, 0xFF);
    if value != 0 {
        return value;
    }
    dir.value
}

/// The lengths /33 to /128 of the /32 whose first 32 bits are `top` (as `NodeV6`'s, one
/// number), or 0: from its bucket of `NODE_V6_TABLE`, or from `NODE_V6` when the bucket
/// overflowed and does not hold it.
#[inline(always)]
fn node_lengths(top: u32, generation: usize) -> u64 {
    let Some(bucket) = NODE_V6_TABLE.get(generation as u32 * V6_NODE_BUCKETS + v6_node_bucket(top))
    else {
        return 0;
    };
    for i in 0..V6_NODE_SLOTS {
        let lengths = u64::from_le_bytes(bucket.lengths[i]);
        if bucket.tops[i] == top && lengths != 0 {
            return lengths;
        }
    }
    if bucket.overflow == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { NODE_V6.get(&top.to_be_bytes()) }
        .map_or(0, |node| u64::from_le_bytes(node[generation].lengths))
}

/// The `DEEP_V6` slot of the /48 holding `hi`: bit `i` set where the node's `i`th length, if
/// over /48, may have a key in it.
#[inline(always)]
fn deep_lengths(hi: u64, generation: usize) -> u64 {
    let slot = v6_deep_slot(hi);
    DEEP_V6
        .get(generation as u32 * V6_DEEP_WORDS + (slot >> 3))
        .map_or(0, |word| (*word >> ((slot & 7) * 8)) & 0xFF)
}

/// The value of the first of up to 8 lengths (one a byte of `lengths`, longest first,
/// 0-terminated), skipping those over /48 whose bit (by place) `deep` lacks, whose key `LONG_V6`
/// holds, or 0. Verifier: the lengths arrive as one number, not an array, so they take no stack
/// slot across the probes (the filter's key took the deepest call chain past 512 bytes when they
/// did).
#[inline(always)]
fn probe_lengths(hi: u64, lo: u64, lengths: u64, generation: usize, deep: u64) -> u32 {
    for i in 0..8u32 {
        let len = (lengths >> (8 * i)) & 0xFF;
        if len == 0 {
            break;
        }
        if len > u64::from(V6_DEEP_BITS) && deep & (1 << i) == 0 {
            continue;
        }
        let value = probe_v6(hi, lo, len as u32, generation);
        if value != 0 {
            return value;
        }
    }
    0
}
