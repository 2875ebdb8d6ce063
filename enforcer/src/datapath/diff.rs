//! Live updates: writing a `PolicyDiff` (computed by the policy compiler) into the kernel maps, in an
//! order that never drops what both policies allow — additions and widenings first, narrowings
//! and removals last — and never lets a packet see a half-written rule (a rule is written before
//! any prefix points at it, and a prefix is unlinked before its rule is cleared).

use std::collections::BTreeSet;

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, lpm_trie::Key};
use enforcer_common::{MAX_UPSTREAM_GROUPS, MAX_VPN_GROUPS, PortKey, Rule, map_names};

use super::mapped::bytes;
use ipnet::IpNet;

use super::{Datapath, DatapathError, map_error};
use crate::{
    policy::{CompiledRule, Policy, PolicyDiff, RuleChange, RuleKind, SourceChange, tables},
    registry::Mode,
};

/// Up to this many rules are written with one batch system call; more through the memory
/// mapping of `RULES` (mapping it inserts all of its 24 MiB of pages: worth it only for many).
const FEW: usize = 4096;

/// The LPM tries of approved VPN endpoints (prefix → approval group).
const VPN_TRIES: (&str, &str) = (map_names::VPN_V4, map_names::VPN_V6);
/// The LPM tries of upstreams (prefix → upstream group).
const UPSTREAM_TRIES: (&str, &str) = (map_names::UPSTREAM_V4, map_names::UPSTREAM_V6);

/// Prefix → (its slot in a group array, what was written there).
pub(super) type Slots<T> = std::collections::BTreeMap<IpNet, (u32, Vec<T>)>;

impl Datapath {
    /// Applies the difference between `old` (what the maps hold) and `new`. When this returns,
    /// `new` is in force.
    pub fn apply(&mut self, old: &Policy, new: &Policy) -> Result<(), DatapathError> {
        self.apply_diff(&PolicyDiff::between(old, new), new)
    }

    /// Applies one in-place edit of the policy in force (`Policy::edit`): `new` is the policy
    /// after it. When this returns, `new` is in force.
    pub fn apply_change(&mut self, change: &RuleChange, new: &Policy) -> Result<(), DatapathError> {
        self.apply_diff(&PolicyDiff::of_change(change, (new.mode, new.egress)), new)
    }

    /// Takes an applied `change` back: `old` is the policy before it (after `Policy::undo`).
    pub fn revert_change(
        &mut self,
        change: &RuleChange,
        old: &Policy,
    ) -> Result<(), DatapathError> {
        self.apply_diff(&PolicyDiff::of_undo(change, (old.mode, old.egress)), old)
    }

    /// Writes `diff` in the order that never drops what both policies allow: widen first, the
    /// rules before the prefixes that point at them, narrow last.
    fn apply_diff(&mut self, diff: &PolicyDiff, new: &Policy) -> Result<(), DatapathError> {
        let old_mode = diff.old_mode;
        let port_endpoints = |p: &Policy| {
            p.vpn_groups
                .iter()
                .flat_map(|(_, a)| a)
                .any(|a| a.port_be != [0; 2])
        };

        // Widen first.
        if new.mode == Mode::Monitor && old_mode != Mode::Monitor {
            self.set_mode(Mode::Monitor)?;
        }
        if new.egress.strictness() < diff.old_egress.strictness() {
            self.set_egress(new.egress)?;
        }
        if port_endpoints(new) {
            self.update_config(|c| c.port_endpoints = 1)?;
        }
        // Ports before flags before prefixes: a rule is complete before anything points at it.
        for key in &diff.ports_added {
            self.port_rules()?
                .insert(key, 1, 0)
                .map_err(map_error(map_names::PORT_RULES))?;
        }
        // A number may have served a rule removed long ago: its count starts afresh.
        self.zero_hits_many(&diff.fresh)?;
        self.set_rules(&diff.flagged)?;
        tracing::debug!(mib = ?crate::memory_mib(), "rules written");
        // The source prefixes (prefix → rule, allow and deny; see `Policy::trie_entries`).
        // Only the /16s the change touched are rebuilt (`tables::Regions`): at a million entries a
        // rebuild of the whole costs 0.3-0.5 s and a second IPv4 table's memory. A change that
        // touches too many rebuilds the whole.
        let regions = match &diff.sources {
            SourceChange::Within(prefixes) => tables::Regions::of(prefixes),
            SourceChange::Unchanged => None,
        };
        let new_trie = match (&diff.sources, &regions) {
            (SourceChange::Unchanged, _) => None,
            (SourceChange::Within(_), Some(regions)) => {
                Some(new.trie_entries_where(|p| regions.overlaps(p)))
            }
            (SourceChange::Within(_), None) => Some(new.trie_entries()),
        };
        self.update_vpn_groups(new)?;
        self.update_upstream_groups(new)?;
        self.set_conn_timeouts(new.conn_timeouts)?;
        // The flat tables switch from the old source prefixes to the new ones in one step.
        if let Some(new_trie) = new_trie {
            match &regions {
                Some(regions) => self.write_source_in(&new_trie, regions)?,
                None => self.write_source(&new_trie)?,
            }
        } else if self.source.is_none() {
            self.write_source(&new.trie_entries())?;
        }
        for key in &diff.ports_removed {
            // An absent key is already what we want.
            let _ = self.port_rules()?.remove(key);
        }
        let cleared: Vec<(u32, Rule)> = diff.gone.iter().map(|i| (*i, Rule::default())).collect();
        self.set_rules(&cleared)?;
        self.zero_hits_many(&diff.gone)?;
        if !port_endpoints(new) {
            self.update_config(|c| c.port_endpoints = 0)?;
        }
        if new.mode == Mode::Enforce && old_mode != Mode::Enforce {
            self.set_mode(Mode::Enforce)?;
        }
        if new.egress.strictness() > diff.old_egress.strictness() {
            self.set_egress(new.egress)?;
        }
        self.unmap_large();
        Ok(())
    }

    /// Approval groups (see `update_groups`).
    fn update_vpn_groups(&mut self, new: &Policy) -> Result<(), DatapathError> {
        let mut slots = std::mem::take(&mut self.vpn_slots);
        let done = self.update_groups(
            &mut slots,
            &new.vpn_groups,
            (VPN_TRIES, map_names::VPN_GROUPS, MAX_VPN_GROUPS),
            Self::write_group,
        );
        self.vpn_slots = slots;
        done
    }

    /// Upstream groups (see `update_groups`).
    fn update_upstream_groups(&mut self, new: &Policy) -> Result<(), DatapathError> {
        let mut slots = std::mem::take(&mut self.upstream_slots);
        let done = self.update_groups(
            &mut slots,
            &new.upstream_groups,
            (
                UPSTREAM_TRIES,
                map_names::UPSTREAM_GROUPS,
                MAX_UPSTREAM_GROUPS,
            ),
            Self::write_upstream_group,
        );
        self.upstream_slots = slots;
        done
    }

    /// Groups behind a trie pair: a changed group is written to a free slot of the group array
    /// and its prefix then switched to it in one trie update, so a packet sees the old group or
    /// the new one, never a mixture; prefixes no longer wanted are unlinked last.
    fn update_groups<T: Clone + PartialEq>(
        &mut self,
        slots: &mut Slots<T>,
        wanted: &[(IpNet, Vec<T>)],
        (tries, array, max): ((&'static str, &'static str), &'static str, u32),
        write: fn(&mut Self, u32, &[T]) -> Result<(), DatapathError>,
    ) -> Result<(), DatapathError> {
        for (prefix, members) in wanted {
            if slots
                .get(prefix)
                .is_some_and(|(_, current)| current == members)
            {
                continue;
            }
            let used: BTreeSet<u32> = slots.values().map(|(slot, _)| *slot).collect();
            let slot = (0..max)
                .find(|s| !used.contains(s))
                .ok_or_else(|| DatapathError::Map {
                    name: array,
                    source: "no free group slot".into(),
                })?;
            write(self, slot, members)?;
            self.lpm_insert(tries, *prefix, slot)?;
            slots.insert(*prefix, (slot, members.clone()));
        }
        let wanted: std::collections::HashSet<IpNet> = wanted.iter().map(|(p, _)| *p).collect();
        let gone: Vec<IpNet> = slots
            .keys()
            .filter(|p| !wanted.contains(*p))
            .copied()
            .collect();
        for prefix in gone {
            self.lpm_remove(tries, prefix)?;
            slots.remove(&prefix);
        }
        Ok(())
    }

    fn port_rules(&mut self) -> Result<BpfHashMap<&mut MapData, PortKey, u8>, DatapathError> {
        let name = map_names::PORT_RULES;
        self.typed_mut(name)
    }

    /// Writes rules into `RULES` (through its memory mapping).
    fn set_rules(&mut self, rules: &[(u32, Rule)]) -> Result<(), DatapathError> {
        if rules.is_empty() {
            return Ok(());
        }
        let name = map_names::RULES;
        let size = size_of::<Rule>();
        if rules.len() <= FEW {
            let keys: Vec<u8> = rules.iter().flat_map(|(i, _)| i.to_ne_bytes()).collect();
            let values: Vec<u8> = rules.iter().flat_map(|(_, r)| bytes(r).to_vec()).collect();
            if self.update_batch(name, &keys, &values, 4, size).is_ok() {
                return Ok(());
            }
        }
        let memory = self.mapped(name, size)?;
        let slots = memory.bytes();
        for (index, rule) in rules {
            let at = *index as usize * size;
            slots[at..at + size].copy_from_slice(bytes(rule));
        }
        Ok(())
    }

    /// Zeroes the `RULE_HITS` counters of these rule numbers (through its memory mapping).
    fn zero_hits_many(&mut self, indices: &[u32]) -> Result<(), DatapathError> {
        if indices.is_empty() {
            return Ok(());
        }
        let name = map_names::RULE_HITS;
        if indices.len() <= FEW {
            let keys: Vec<u8> = indices.iter().flat_map(|i| i.to_ne_bytes()).collect();
            let values = vec![0u8; indices.len() * 8];
            if self.update_batch(name, &keys, &values, 4, 8).is_ok() {
                return Ok(());
            }
        }
        let memory = self.mapped(name, 8)?;
        let slots = memory.bytes();
        for index in indices {
            let at = *index as usize * 8;
            slots[at..at + 8].fill(0);
        }
        Ok(())
    }

    fn lpm_insert(
        &mut self,
        (v4, v6): (&'static str, &'static str),
        prefix: IpNet,
        value: u32,
    ) -> Result<(), DatapathError> {
        match prefix {
            IpNet::V4(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u32> = self.typed_mut(v4)?;
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                trie.insert(&key, value, 0).map_err(map_error(v4))
            }
            IpNet::V6(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> = self.typed_mut(v6)?;
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                trie.insert(&key, value, 0).map_err(map_error(v6))
            }
        }
    }

    fn lpm_remove(
        &mut self,
        (v4, v6): (&'static str, &'static str),
        prefix: IpNet,
    ) -> Result<(), DatapathError> {
        // An absent key is already what we want.
        match prefix {
            IpNet::V4(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u32> = self.typed_mut(v4)?;
                let _ = trie.remove(&Key::new(
                    u32::from(net.prefix_len()),
                    net.network().octets(),
                ));
            }
            IpNet::V6(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> = self.typed_mut(v6)?;
                let _ = trie.remove(&Key::new(
                    u32::from(net.prefix_len()),
                    net.network().octets(),
                ));
            }
        }
        Ok(())
    }
}

impl Datapath {
    /// What the maps hold, as a policy to diff from: after a restart the maps are the truth
    /// (the process that filled them is gone). Rule names are not in the maps and stay empty;
    /// the diff goes by prefixes, flags, port keys and approval groups.
    pub fn read_back(&mut self) -> Result<Policy, DatapathError> {
        use enforcer_common::{
            RULE_ANY_PORT, RULE_DENY, RULE_FEED, RULE_ICMP, RULE_IN_USE, RULE_UPSTREAM,
            UpstreamGroup, VpnGroup,
        };

        let mut rules = Vec::new();
        let name = map_names::RULES;
        let size = size_of::<Rule>();
        let memory = self.mapped(name, size)?;
        for (index, record) in memory.bytes().chunks_exact(size).enumerate() {
            let flags = u32::from_ne_bytes(record[..4].try_into().expect("4 bytes"));
            if flags & (RULE_IN_USE | RULE_UPSTREAM) == 0 {
                continue;
            }
            let (family, len) = (record[4], record[5]);
            let addr: [u8; 16] = record[8..24].try_into().expect("16 bytes");
            let prefix = match family {
                4 => ipnet::Ipv4Net::new([addr[0], addr[1], addr[2], addr[3]].into(), len)
                    .map(IpNet::V4),
                _ => ipnet::Ipv6Net::new(addr.into(), len).map(IpNet::V6),
            };
            let Ok(prefix) = prefix else { continue };
            let index = u32::try_from(index).expect("RULES holds fewer than 2^32 rules");
            let kind = match (flags & RULE_DENY != 0, flags & RULE_FEED != 0) {
                _ if flags & RULE_UPSTREAM != 0 => RuleKind::Upstream,
                (true, true) => RuleKind::DenyFeed,
                (true, false) => RuleKind::Deny,
                _ => RuleKind::Network,
            };
            let ports = if !matches!(kind, RuleKind::Network | RuleKind::Upstream)
                || flags & RULE_ANY_PORT != 0
            {
                None
            } else if flags & RULE_ICMP != 0 {
                Some(vec![crate::registry::PortSpec::Icmp])
            } else {
                Some(Vec::new())
            };
            rules.push(CompiledRule {
                index,
                kind,
                name: Box::default(),
                prefix,
                ports: ports.map(Vec::into_boxed_slice),
                vpn: None,
            });
        }
        rules.sort_by_key(|r| r.index);
        let port_keys: Vec<PortKey> = {
            let ports = self.port_rules()?;
            ports.keys().filter_map(Result::ok).collect()
        };
        self.vpn_slots.clear();
        let mut vpn_groups = Vec::new();
        for (prefix, slot) in self.lpm_entries(VPN_TRIES)? {
            let name = map_names::VPN_GROUPS;
            let groups: Array<&MapData, VpnGroup> = self.typed(name)?;
            let group = groups.get(&slot, 0).map_err(map_error(name))?;
            let count = (group.count as usize).min(group.approvals.len());
            let approvals = group.approvals[..count].to_vec();
            self.vpn_slots.insert(prefix, (slot, approvals.clone()));
            vpn_groups.push((prefix, approvals));
        }
        self.upstream_slots.clear();
        let mut upstream_groups = Vec::new();
        for (prefix, slot) in self.lpm_entries(UPSTREAM_TRIES)? {
            let name = map_names::UPSTREAM_GROUPS;
            let groups: Array<&MapData, UpstreamGroup> = self.typed(name)?;
            let group = groups.get(&slot, 0).map_err(map_error(name))?;
            let count = (group.count as usize).min(group.rules.len());
            let rules = group.rules[..count].to_vec();
            self.upstream_slots.insert(prefix, (slot, rules.clone()));
            upstream_groups.push((prefix, rules));
        }
        self.unmap_large();
        let mode = if self.config()?.mode == enforcer_common::MODE_MONITOR {
            Mode::Monitor
        } else {
            Mode::Enforce
        };
        Ok(Policy {
            mode,
            egress: self.egress()?,
            rules,
            port_keys,
            expired: Vec::new(),
            vpn_endpoints: 0,
            vpn_groups,
            upstream_groups,
            feed_duplicates: 0,
            conn_timeouts: self.conn_timeouts()?,
            // Not in the maps: the registry has them, and the diff needs none.
            extras: Vec::new(),
        })
    }

    /// Every (prefix, value) of an IPv4/IPv6 trie pair.
    fn lpm_entries(
        &self,
        (v4, v6): (&'static str, &'static str),
    ) -> Result<Vec<(IpNet, u32)>, DatapathError> {
        let mut out = Vec::new();
        let trie: LpmTrie<&MapData, [u8; 4], u32> = self.typed(v4)?;
        for entry in &trie {
            let (key, value) = entry.map_err(map_error(v4))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(32);
            if let Ok(net) = ipnet::Ipv4Net::new(key.data().into(), len) {
                out.push((IpNet::V4(net), value));
            }
        }
        let trie: LpmTrie<&MapData, [u8; 16], u32> = self.typed(v6)?;
        for entry in &trie {
            let (key, value) = entry.map_err(map_error(v6))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(128);
            if let Ok(net) = ipnet::Ipv6Net::new(key.data().into(), len) {
                out.push((IpNet::V6(net), value));
            }
        }
        Ok(out)
    }
}
