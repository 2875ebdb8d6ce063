//! One live change made to the policy in force, in place: what it adds and removes, the checks
//! the whole compile would make, and how it is undone.

use enforcer_common::{MAX_PORT_RULES, MAX_RULES, PortKey, VpnApproval};
use ipnet::IpNet;

use super::{CompiledRule, Policy, PolicyError, RuleKind, port_keys, upstream_groups, vpn_groups};

/// One live change made to a policy in place (`Policy::edit`): what the kernel maps must gain and
/// lose, and what undoes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleChange {
    pub added: Vec<CompiledRule>,
    pub removed: Vec<CompiledRule>,
    pub ports_added: Vec<PortKey>,
    pub ports_removed: Vec<PortKey>,
    /// The approval groups before the change, when it changed them.
    old_vpn_groups: Option<Vec<(IpNet, Vec<VpnApproval>)>>,
    /// The upstream groups before the change, when it changed them.
    old_upstream_groups: Option<Vec<(IpNet, Vec<u32>)>>,
    /// The extras of the rules it removed.
    extras_removed: Vec<(u32, super::Extra)>,
}

impl RuleChange {
    /// Whether the source lookup tables change (an allow or deny entry).
    pub fn touches_sources(&self) -> bool {
        self.added
            .iter()
            .chain(&self.removed)
            .any(|r| r.kind.is_source())
    }

    /// The prefixes of the source rules it adds or removes: the source tables change only
    /// inside them.
    pub fn source_prefixes(&self) -> Vec<IpNet> {
        self.added
            .iter()
            .chain(&self.removed)
            .filter(|r| r.kind.is_source())
            .map(|r| r.prefix)
            .collect()
    }
}

impl Policy {
    /// Adds `add` (its number: one past the highest in use) and removes the rules numbered
    /// `remove`, in place, with the checks `compile` makes of the whole: rule and port counts,
    /// the lookup tables' prefix lengths, the approval groups. A change of one entry of a
    /// million-entry policy costs milliseconds, where a recompile costs a second and a second
    /// policy's memory. On error the policy is unchanged.
    pub fn edit(
        &mut self,
        add: Option<CompiledRule>,
        extra: super::Extra,
        remove: &[u32],
    ) -> Result<RuleChange, PolicyError> {
        let removing = |index: u32| remove.contains(&index);
        let mut added = Vec::new();
        let mut ports_added = Vec::new();
        if let Some(mut rule) = add {
            // One past the highest number in use; once that reaches the maps' end, the first
            // number free below it (a removal made in place is complete when it returns, so its
            // number may serve again; `apply_change` zeroes the count).
            let next = self.rules.last().map_or(0, |r| r.index + 1);
            rule.index = if next < MAX_RULES {
                next
            } else {
                (0..MAX_RULES)
                    .zip(&self.rules)
                    .find(|(n, r)| *n != r.index)
                    .map(|(n, _)| n)
                    .ok_or(PolicyError::NoFreeRuleNumbers {
                        added: 1,
                        in_use: self.rules.len(),
                    })?
            };
            ports_added = port_keys(std::slice::from_ref(&rule))?;
            let ports = self.port_keys.len() + ports_added.len();
            if ports > MAX_PORT_RULES as usize {
                return Err(PolicyError::TooManyPorts(ports));
            }
            if rule.kind.is_source() {
                crate::policy::tables::check(|| {
                    self.rules
                        .iter()
                        .filter(|r| r.kind.is_source() && !removing(r.index))
                        .map(|r| (&r.prefix, &*r.name))
                        .chain(std::iter::once((&rule.prefix, &*rule.name)))
                })?;
            }
            added.push(rule);
        }
        let vpn = added.iter().any(|r| r.kind == RuleKind::VpnEndpoint)
            || self
                .rules
                .iter()
                .any(|r| r.kind == RuleKind::VpnEndpoint && removing(r.index));
        let new_groups = if vpn {
            let endpoints: Vec<CompiledRule> = self
                .rules
                .iter()
                .filter(|r| r.kind == RuleKind::VpnEndpoint && !removing(r.index))
                .chain(&added)
                .filter(|r| r.kind == RuleKind::VpnEndpoint)
                .cloned()
                .collect();
            Some(vpn_groups(&endpoints)?)
        } else {
            None
        };
        let upstream = added.iter().any(|r| r.kind == RuleKind::Upstream)
            || self
                .rules
                .iter()
                .any(|r| r.kind == RuleKind::Upstream && removing(r.index));
        let new_upstream_groups = if upstream {
            let upstreams: Vec<CompiledRule> = self
                .rules
                .iter()
                .filter(|r| r.kind == RuleKind::Upstream && !removing(r.index))
                .chain(added.iter().filter(|r| r.kind == RuleKind::Upstream))
                .cloned()
                .collect();
            Some(upstream_groups(&upstreams)?)
        } else {
            None
        };
        // Nothing fails past this point.
        let mut removed = Vec::new();
        if !remove.is_empty() {
            let (gone, kept) = std::mem::take(&mut self.rules)
                .into_iter()
                .partition(|r| removing(r.index));
            self.rules = kept;
            removed = gone;
        }
        let ports_removed: Vec<PortKey> = if remove.is_empty() {
            Vec::new()
        } else {
            let (gone, kept) = std::mem::take(&mut self.port_keys)
                .into_iter()
                .partition(|k| removing(k.rule));
            self.port_keys = kept;
            gone
        };
        for rule in &added {
            let at = self.rules.partition_point(|r| r.index < rule.index);
            self.rules.insert(at, rule.clone());
        }
        self.port_keys.extend(ports_added.iter().copied());
        self.port_keys
            .sort_unstable_by_key(|k| (k.rule, k.proto, u16::from_be_bytes(k.port_be)));
        let old_vpn_groups =
            new_groups.map(|groups| std::mem::replace(&mut self.vpn_groups, groups));
        let old_upstream_groups =
            new_upstream_groups.map(|groups| std::mem::replace(&mut self.upstream_groups, groups));
        let (extras_removed, kept) = std::mem::take(&mut self.extras)
            .into_iter()
            .partition(|(index, _)| removing(*index));
        self.extras = kept;
        if let Some(rule) = added.first()
            && !extra.is_empty()
        {
            // Numbered one past the highest or into the first gap: kept sorted.
            let at = self
                .extras
                .partition_point(|(index, _)| *index < rule.index);
            self.extras.insert(at, (rule.index, extra));
        }
        self.vpn_endpoints = self.count(RuleKind::VpnEndpoint);
        Ok(RuleChange {
            added,
            removed,
            ports_added,
            ports_removed,
            old_vpn_groups,
            old_upstream_groups,
            extras_removed,
        })
    }

    /// Undoes `edit`'s `change`.
    pub fn undo(&mut self, change: RuleChange) {
        let added: Vec<u32> = change.added.iter().map(|r| r.index).collect();
        self.rules.retain(|r| !added.contains(&r.index));
        self.port_keys.retain(|k| !added.contains(&k.rule));
        self.rules.extend(change.removed);
        self.rules.sort_by_key(|r| r.index);
        self.port_keys.extend(change.ports_removed);
        self.port_keys
            .sort_unstable_by_key(|k| (k.rule, k.proto, u16::from_be_bytes(k.port_be)));
        if let Some(groups) = change.old_vpn_groups {
            self.vpn_groups = groups;
        }
        if let Some(groups) = change.old_upstream_groups {
            self.upstream_groups = groups;
        }
        self.extras.retain(|(index, _)| !added.contains(index));
        self.extras.extend(change.extras_removed);
        self.extras.sort_by_key(|(index, _)| *index);
        self.vpn_endpoints = self.count(RuleKind::VpnEndpoint);
    }
}
