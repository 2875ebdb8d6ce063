//! Live updates: moving the kernel maps from one compiled policy to the next as a diff, in an
//! order that never drops what both policies allow — additions and widenings first, narrowings
//! and removals last — and never lets a packet see a half-written rule (a rule is written before
//! any prefix points at it, and a prefix is unlinked before its rule is cleared).

use std::collections::{BTreeSet, HashMap, HashSet};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, lpm_trie::Key};
use enforcer_common::{MAX_VPN_GROUPS, PortKey, Rule, map_names};
use ipnet::IpNet;

use super::{Datapath, DatapathError, map_error};
use crate::{
    policy::{CompiledRule, Policy, RuleKey, RuleKind},
    registry::Mode,
};

/// Which LPM tries a rule's prefix lives in.
fn tries(kind: RuleKind) -> (&'static str, &'static str) {
    match kind {
        // Deny ranges share the source trie with approved networks (see `Policy::trie_entries`).
        RuleKind::Network | RuleKind::Device | RuleKind::Deny | RuleKind::DenyFeed => {
            (map_names::ALLOW_V4, map_names::ALLOW_V6)
        }
        RuleKind::VpnEndpoint => (map_names::VPN_V4, map_names::VPN_V6),
    }
}

impl Datapath {
    /// Applies the difference between `old` (what the maps hold) and `new`. When this returns,
    /// `new` is in force.
    pub fn apply(&mut self, old: &Policy, new: &Policy) -> Result<(), DatapathError> {
        // A rule is its entry and its number: a changed entry comes with a fresh number (see
        // `Policy::compile_after`), so it is written beside the old one, not over it.
        let id = |r: &CompiledRule| (r.key(), r.index);
        let before: HashMap<(RuleKey, u32), &CompiledRule> =
            old.rules.iter().map(|r| (id(r), r)).collect();
        let after: HashMap<(RuleKey, u32), &CompiledRule> =
            new.rules.iter().map(|r| (id(r), r)).collect();
        let added: Vec<&CompiledRule> = new
            .rules
            .iter()
            .filter(|r| !before.contains_key(&id(r)))
            .collect();
        let removed: Vec<&CompiledRule> = old
            .rules
            .iter()
            .filter(|r| !after.contains_key(&id(r)))
            .collect();
        let old_ports: HashSet<PortKey> = old.port_keys.iter().copied().collect();
        let new_ports: HashSet<PortKey> = new.port_keys.iter().copied().collect();
        let port_endpoints = |p: &Policy| {
            p.vpn_groups
                .iter()
                .flat_map(|(_, a)| a)
                .any(|a| a.port_be != [0; 2])
        };

        // Widen first.
        if new.mode == Mode::Monitor && old.mode != Mode::Monitor {
            self.set_mode(Mode::Monitor)?;
        }
        if port_endpoints(new) {
            self.update_config(|c| c.port_endpoints = 1)?;
        }
        // Ports before flags before prefixes: a rule is complete before anything points at it.
        for key in new_ports.difference(&old_ports) {
            self.port_rules()?
                .insert(key, 1, 0)
                .map_err(map_error(map_names::PORT_RULES))?;
        }
        // A number may have served a rule removed long ago: its count starts afresh.
        let fresh: Vec<u32> = added.iter().map(|r| r.index).collect();
        self.zero_hits_many(&fresh)?;
        let flagged: Vec<(u32, u32)> = new
            .rules
            .iter()
            .filter(|rule| {
                before
                    .get(&id(rule))
                    .is_none_or(|old_rule| old_rule.flags() != rule.flags())
            })
            .map(|rule| (rule.index, rule.flags()))
            .collect();
        self.set_rules(&flagged)?;
        // The source trie as a diff of (prefix → rule): approved entries first; deny entries,
        // and removals (among them allow entries a new deny range now shadows), last.
        let old_trie: HashMap<IpNet, u32> = old.trie_entries().into_iter().collect();
        let new_trie: HashMap<IpNet, u32> = new.trie_entries().into_iter().collect();
        let is_deny = |index: u32| {
            new.rule(index)
                .is_some_and(|r| matches!(r.kind, RuleKind::Deny | RuleKind::DenyFeed))
        };
        let changed: Vec<(IpNet, u32)> = new_trie
            .iter()
            .filter(|(p, i)| old_trie.get(*p) != Some(*i))
            .map(|(p, i)| (*p, *i))
            .collect();
        let (source_v4, source_v6) = tries(RuleKind::Network);
        let (denies, allows): (Vec<_>, Vec<_>) = changed.iter().partition(|(_, i)| is_deny(*i));
        self.fill_tries(&allows, source_v4, source_v6)?;
        self.update_vpn_groups(new)?;
        self.fill_tries(&denies, source_v4, source_v6)?;
        let source = (source_v4, source_v6);
        for prefix in old_trie.keys().filter(|p| !new_trie.contains_key(*p)) {
            self.lpm_remove(source, *prefix)?;
        }
        // The tries above are the record of what the kernel holds; packets are looked up in the
        // flat tables, which switch from the old source prefixes to the new ones in one step.
        if changed.is_empty() && old_trie.len() == new_trie.len() && self.source.is_some() {
            // Nothing to switch.
        } else {
            let entries: Vec<(IpNet, u32)> = new_trie.into_iter().collect();
            self.write_source(&entries)?;
        }
        for key in old_ports.difference(&new_ports) {
            // An absent key is already what we want.
            let _ = self.port_rules()?.remove(key);
        }
        let cleared: Vec<(u32, u32)> = removed.iter().map(|r| (r.index, 0)).collect();
        self.set_rules(&cleared)?;
        let gone: Vec<u32> = removed.iter().map(|r| r.index).collect();
        self.zero_hits_many(&gone)?;
        if !port_endpoints(new) {
            self.update_config(|c| c.port_endpoints = 0)?;
        }
        if new.mode == Mode::Enforce && old.mode != Mode::Enforce {
            self.set_mode(Mode::Enforce)?;
        }
        Ok(())
    }

    /// Approval groups: a changed group is written to a free slot and its prefix then switched
    /// to it in one trie update, so a packet sees the old group or the new one, never a mixture.
    fn update_vpn_groups(&mut self, new: &Policy) -> Result<(), DatapathError> {
        let wanted: HashMap<IpNet, &Vec<enforcer_common::VpnApproval>> =
            new.vpn_groups.iter().map(|(p, a)| (*p, a)).collect();
        for (prefix, approvals) in &new.vpn_groups {
            if self
                .vpn_slots
                .get(prefix)
                .is_some_and(|(_, current)| current == approvals)
            {
                continue;
            }
            let used: BTreeSet<u32> = self.vpn_slots.values().map(|(slot, _)| *slot).collect();
            let slot = (0..MAX_VPN_GROUPS)
                .find(|s| !used.contains(s))
                .ok_or_else(|| DatapathError::Map {
                    name: map_names::VPN_GROUPS,
                    source: "no free approval-group slot".into(),
                })?;
            self.write_group(slot, approvals)?;
            self.lpm_insert(tries(RuleKind::VpnEndpoint), *prefix, slot)?;
            self.vpn_slots.insert(*prefix, (slot, approvals.clone()));
        }
        let gone: Vec<IpNet> = self
            .vpn_slots
            .keys()
            .filter(|p| !wanted.contains_key(*p))
            .copied()
            .collect();
        for prefix in gone {
            self.lpm_remove(tries(RuleKind::VpnEndpoint), prefix)?;
            self.vpn_slots.remove(&prefix);
        }
        Ok(())
    }

    fn port_rules(&mut self) -> Result<BpfHashMap<&mut MapData, PortKey, u8>, DatapathError> {
        let name = map_names::PORT_RULES;
        BpfHashMap::try_from(self.map_mut(name)?).map_err(map_error(name))
    }

    /// Writes (rule number → flags) into `RULES`, batched.
    fn set_rules(&mut self, rules: &[(u32, u32)]) -> Result<(), DatapathError> {
        if rules.is_empty() {
            return Ok(());
        }
        let keys: Vec<u8> = rules.iter().flat_map(|(i, _)| i.to_ne_bytes()).collect();
        let values: Vec<u8> = rules.iter().flat_map(|(_, f)| f.to_ne_bytes()).collect();
        if self
            .update_batch(map_names::RULES, &keys, &values, 4, 4)
            .is_err()
        {
            for (index, flags) in rules {
                self.set_rule(*index, *flags)?;
            }
        }
        Ok(())
    }

    /// Zeroes the `RULE_HITS` counters of these rule numbers, batched.
    fn zero_hits_many(&mut self, indices: &[u32]) -> Result<(), DatapathError> {
        if indices.is_empty() {
            return Ok(());
        }
        let keys: Vec<u8> = indices.iter().flat_map(|i| i.to_ne_bytes()).collect();
        let values = vec![0u8; indices.len() * 8];
        if self
            .update_batch(map_names::RULE_HITS, &keys, &values, 4, 8)
            .is_err()
        {
            for index in indices {
                self.zero_hits(*index)?;
            }
        }
        Ok(())
    }

    fn set_rule(&mut self, index: u32, flags: u32) -> Result<(), DatapathError> {
        let name = map_names::RULES;
        let mut rules: Array<&mut MapData, Rule> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name))?;
        rules.set(index, Rule { flags }, 0).map_err(map_error(name))
    }

    fn zero_hits(&mut self, index: u32) -> Result<(), DatapathError> {
        let name = map_names::RULE_HITS;
        let mut hits: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name))?;
        hits.set(index, 0, 0).map_err(map_error(name))
    }

    fn lpm_insert(
        &mut self,
        (v4, v6): (&'static str, &'static str),
        prefix: IpNet,
        value: u32,
    ) -> Result<(), DatapathError> {
        match prefix {
            IpNet::V4(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u32> =
                    LpmTrie::try_from(self.map_mut(v4)?).map_err(map_error(v4))?;
                let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                trie.insert(&key, value, 0).map_err(map_error(v4))
            }
            IpNet::V6(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> =
                    LpmTrie::try_from(self.map_mut(v6)?).map_err(map_error(v6))?;
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
                let mut trie: LpmTrie<&mut MapData, [u8; 4], u32> =
                    LpmTrie::try_from(self.map_mut(v4)?).map_err(map_error(v4))?;
                let _ = trie.remove(&Key::new(
                    u32::from(net.prefix_len()),
                    net.network().octets(),
                ));
            }
            IpNet::V6(net) => {
                let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> =
                    LpmTrie::try_from(self.map_mut(v6)?).map_err(map_error(v6))?;
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
        use enforcer_common::{RULE_ANY_PORT, RULE_DENY, RULE_FEED, RULE_ICMP, VpnGroup};

        let mut rules = Vec::new();
        for (prefix, index) in self.lpm_entries(tries(RuleKind::Network))? {
            let flags = self.rule_flags(index)?;
            let kind = match (flags & RULE_DENY != 0, flags & RULE_FEED != 0) {
                (true, true) => RuleKind::DenyFeed,
                (true, false) => RuleKind::Deny,
                _ => RuleKind::Network,
            };
            let ports = if kind != RuleKind::Network || flags & RULE_ANY_PORT != 0 {
                None
            } else if flags & RULE_ICMP != 0 {
                Some(vec![crate::registry::PortSpec::Icmp])
            } else {
                Some(Vec::new())
            };
            rules.push(CompiledRule {
                index,
                kind,
                name: String::new(),
                prefix,
                ports,
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
        for (prefix, slot) in self.lpm_entries(tries(RuleKind::VpnEndpoint))? {
            let name = map_names::VPN_GROUPS;
            let groups: Array<&MapData, VpnGroup> =
                Array::try_from(self.map(name)?).map_err(map_error(name))?;
            let group = groups.get(&slot, 0).map_err(map_error(name))?;
            let count = (group.count as usize).min(group.approvals.len());
            let approvals = group.approvals[..count].to_vec();
            self.vpn_slots.insert(prefix, (slot, approvals.clone()));
            vpn_groups.push((prefix, approvals));
        }
        let mode = if self.config()?.mode == enforcer_common::MODE_MONITOR {
            Mode::Monitor
        } else {
            Mode::Enforce
        };
        Ok(Policy {
            mode,
            rules,
            port_keys,
            expired: Vec::new(),
            vpn_endpoints: 0,
            vpn_groups,
            feed_duplicates: 0,
        })
    }

    fn rule_flags(&self, index: u32) -> Result<u32, DatapathError> {
        let name = map_names::RULES;
        let rules: Array<&MapData, Rule> =
            Array::try_from(self.map(name)?).map_err(map_error(name))?;
        Ok(rules.get(&index, 0).map_err(map_error(name))?.flags)
    }

    /// Every (prefix, value) of an IPv4/IPv6 trie pair.
    fn lpm_entries(
        &self,
        (v4, v6): (&'static str, &'static str),
    ) -> Result<Vec<(IpNet, u32)>, DatapathError> {
        let mut out = Vec::new();
        let trie: LpmTrie<&MapData, [u8; 4], u32> =
            LpmTrie::try_from(self.map(v4)?).map_err(map_error(v4))?;
        for entry in &trie {
            let (key, value) = entry.map_err(map_error(v4))?;
            let len = u8::try_from(key.prefix_len()).unwrap_or(32);
            if let Ok(net) = ipnet::Ipv4Net::new(key.data().into(), len) {
                out.push((IpNet::V4(net), value));
            }
        }
        let trie: LpmTrie<&MapData, [u8; 16], u32> =
            LpmTrie::try_from(self.map(v6)?).map_err(map_error(v6))?;
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
