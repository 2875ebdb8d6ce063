//! The policy compiler: a validated registry (and today's date) → the entries of the kernel maps.
//! Pure and host-testable: no aya here.
//!
//! - `rule`: one compiled entry and what the kernel holds for it.
//! - `decide`: the verdict the kernel program gives a packet, evaluated here.
//! - `edit`: a change of a few entries made to the policy in force, in place.
//! - `diff`: what moves the kernel's maps from one policy to another.
//! - `tables`: the flat source-lookup tables built from the policy's (prefix → rule) entries.

use std::{collections::BTreeSet, hash::BuildHasher as _};

use enforcer_common::{
    MAX_APPROVALS_PER_GROUP, MAX_PORT_RULES, MAX_RULES, MAX_UPSTREAM_GROUPS,
    MAX_UPSTREAMS_PER_GROUP, MAX_VPN_GROUPS, PortKey, VpnApproval,
};
use ipnet::IpNet;

use crate::registry::{Date, EgressMode, Mode, Registry};

mod decide;
mod diff;
mod edit;
mod rule;
pub mod tables;

pub use decide::Decision;
pub use diff::{PolicyDiff, SourceChange};
pub use edit::RuleChange;
pub use rule::{CompiledRule, RuleKey, RuleKind, VpnApprovalInfo};
use rule::{Content, content};

/// An entry left out because its `expires` date has passed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Expired {
    pub section: &'static str,
    pub name: String,
    #[serde(serialize_with = "serialize_date")]
    pub expired: Date,
}

fn serialize_date<S: serde::Serializer>(date: &Date, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(date)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "the registry has {0} entries (networks, devices, deny and feed ranges, VPN endpoints); the kernel maps hold {MAX_RULES}"
    )]
    TooManyRules(usize),
    #[error(
        "the registry's port lists expand to {0} (rule, protocol, port) entries; the kernel map holds {MAX_PORT_RULES} (use fewer or narrower port ranges)"
    )]
    TooManyPorts(usize),
    #[error(
        "{0} approvals cover addresses in {1}; at most {MAX_APPROVALS_PER_GROUP} may overlap (merge vpn_endpoints entries)"
    )]
    TooManyApprovals(usize, IpNet),
    #[error("{0} distinct approved VPN endpoint prefixes; the kernel map holds {MAX_VPN_GROUPS}")]
    TooManyVpnPrefixes(usize),
    #[error(
        "{0} upstreams cover addresses in {1}; at most {MAX_UPSTREAMS_PER_GROUP} may overlap (merge upstreams entries)"
    )]
    TooManyUpstreams(usize, IpNet),
    #[error("{0} distinct upstream prefixes; the kernel map holds {MAX_UPSTREAM_GROUPS}")]
    TooManyUpstreamPrefixes(usize),
    #[error(
        "a live update needs fresh rule numbers for its {added} new or changed entries while the {in_use} entries in force keep theirs, and the kernel maps hold {MAX_RULES}: apply it in two steps (remove, then add) or restart the controller"
    )]
    NoFreeRuleNumbers { added: usize, in_use: usize },
    #[error(transparent)]
    Lookup(#[from] crate::policy::tables::TooManyEntries),
}

/// The registry compiled for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub egress: EgressMode,
    /// Indexed by rule number.
    pub rules: Vec<CompiledRule>,
    pub port_keys: Vec<PortKey>,
    pub expired: Vec<Expired>,
    /// Approved VPN endpoints in force.
    pub vpn_endpoints: usize,
    /// Each distinct approved-endpoint prefix with every approval that covers it (its own and
    /// those of wider prefixes), so that the kernel's longest-prefix match finds them all.
    pub vpn_groups: Vec<(IpNet, Vec<VpnApproval>)>,
    /// Each distinct upstream prefix with the rule numbers of every upstream that covers it
    /// (its own and wider ones), the longest prefix first.
    pub upstream_groups: Vec<(IpNet, Vec<u32>)>,
    /// Deny-feed ranges that duplicated another deny range and were left out.
    pub feed_duplicates: usize,
    /// How long the connections the server opens admit replies.
    pub conn_timeouts: enforcer_common::ConnTimeouts,
    /// What the entries in force carry beyond what the kernel holds (expiry date, ministry), by
    /// rule number, for the entries that have any (most of a million feed ranges have none).
    pub extras: Vec<(u32, Extra)>,
}

/// An entry's expiry date and ministry: for expiry counts, and to label its counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extra {
    pub expires: Option<Date>,
    pub ministry: Option<Box<str>>,
}

impl Extra {
    pub fn is_empty(&self) -> bool {
        self.expires.is_none() && self.ministry.is_none()
    }
}

impl Policy {
    /// Compiles the entries in force on `today`: networks, devices, deny ranges, deny-feed
    /// ranges, approved VPN endpoints (rule numbers in that order).
    pub fn compile(registry: &Registry, today: Date) -> Result<Self, PolicyError> {
        Self::compile_after(registry, today, None)
    }

    /// Compiles like `compile`, keeping the rule number of every entry that `previous` already
    /// had (same kind and prefix, or same VPN endpoint name), and giving new entries numbers that
    /// `previous` did not use: so a live update is a diff, and a number freed by a removal is
    /// not reused while the removal is still being applied.
    pub fn compile_after(
        registry: &Registry,
        today: Date,
        previous: Option<&Policy>,
    ) -> Result<Self, PolicyError> {
        Self::from_registry(registry.clone(), today, previous)
    }

    /// `compile_after`, taking the registry: its names and port lists move into the rules
    /// instead of being copied (at a million entries the copies are 30-40 MiB more at the
    /// peak of a reload, where the policy in force, the registry and the new policy coexist).
    pub fn from_registry(
        registry: Registry,
        today: Date,
        previous: Option<&Policy>,
    ) -> Result<Self, PolicyError> {
        let mut expired = Vec::new();
        let mut keep = |section: &'static str, name: &str, expires: Option<Date>| match expires {
            Some(date) if date.is_past(today) => {
                expired.push(Expired {
                    section,
                    name: name.to_string(),
                    expired: date,
                });
                false
            }
            _ => true,
        };
        let feed_entries: usize = registry.feeds.iter().map(|f| f.entries.len()).sum();
        let mut rules: Vec<CompiledRule> = Vec::with_capacity(
            registry.networks.len()
                + registry.devices.len()
                + registry.deny.len()
                + feed_entries
                + registry.vpn_endpoints.len()
                + registry.upstreams.len(),
        );
        // (position in `rules`, extra), numbered once the rules are.
        let mut extras: Vec<(usize, Extra)> = Vec::new();
        let mut push = |kind, name: String, prefix, ports, vpn, extra: Extra| {
            let index = u32::MAX; // assigned below
            if !extra.is_empty() {
                extras.push((rules.len(), extra));
            }
            rules.push(CompiledRule {
                index,
                kind,
                name: name.into_boxed_str(),
                prefix,
                ports,
                vpn,
            });
        };
        for n in registry.networks {
            if keep("networks", &n.name, n.expires) {
                let extra = Extra {
                    expires: n.expires,
                    ministry: n.ministry,
                };
                push(RuleKind::Network, n.name, n.cidr, n.ports, None, extra);
            }
        }
        for d in registry.devices {
            if keep("devices", &d.name, d.expires) {
                push(
                    RuleKind::Device,
                    d.name,
                    IpNet::from(d.address),
                    d.ports,
                    None,
                    Extra {
                        expires: d.expires,
                        ministry: None,
                    },
                );
            }
        }
        let mut denied = std::collections::HashSet::new();
        for d in registry.deny {
            let (cidr, expires) = (d.cidr, d.expires);
            let label = d.into_label();
            if keep("deny", &label, expires) {
                denied.insert(cidr);
                let extra = Extra {
                    expires,
                    ministry: None,
                };
                push(RuleKind::Deny, label, cidr, None, None, extra);
            }
        }
        let mut feed_duplicates = 0;
        for feed in &registry.feeds {
            for entry in &feed.entries {
                if denied.insert(entry.cidr) {
                    push(
                        RuleKind::DenyFeed,
                        format!("{}:{}", feed.path, entry.line),
                        entry.cidr,
                        None,
                        None,
                        Extra::default(),
                    );
                } else {
                    feed_duplicates += 1;
                }
            }
        }
        let mut vpn_endpoints = 0;
        for v in registry.vpn_endpoints {
            if keep("vpn_endpoints", &v.name, v.expires) {
                vpn_endpoints += 1;
                let info = VpnApprovalInfo {
                    protocol: v.protocol,
                    port: v.port,
                    approval: v.approval,
                    expires: v.expires,
                };
                push(
                    RuleKind::VpnEndpoint,
                    v.name,
                    v.address,
                    None,
                    Some(Box::new(info)),
                    Extra {
                        expires: v.expires,
                        ministry: None,
                    },
                );
            }
        }
        for u in registry.upstreams {
            if keep("upstreams", &u.name, u.expires) {
                push(
                    RuleKind::Upstream,
                    u.name,
                    u.prefix,
                    Some(u.ports),
                    None,
                    Extra {
                        expires: u.expires,
                        ministry: u.ministry,
                    },
                );
            }
        }
        if rules.len() > MAX_RULES as usize {
            return Err(PolicyError::TooManyRules(rules.len()));
        }
        crate::policy::tables::check(|| {
            rules
                .iter()
                .filter(|r| r.kind.is_source())
                .map(|r| (&r.prefix, &*r.name))
        })?;
        assign_indices(&mut rules, previous)?;
        let mut extras: Vec<(u32, Extra)> = extras
            .into_iter()
            .map(|(at, extra)| (rules[at].index, extra))
            .collect();
        extras.sort_by_key(|(rule, _)| *rule);
        rules.sort_by_key(|r| r.index);
        let port_keys = port_keys(&rules)?;
        let vpn_groups = vpn_groups(&rules)?;
        let upstream_groups = upstream_groups(&rules)?;
        Ok(Self {
            mode: registry.mode,
            egress: registry.egress,
            rules,
            port_keys,
            expired,
            vpn_endpoints,
            vpn_groups,
            upstream_groups,
            feed_duplicates,
            conn_timeouts: registry.connections.timeouts(),
            extras,
        })
    }

    /// Entries in force whose `expires` day is one of the `days` days from `today` on.
    pub fn expiring_within(&self, today: Date, days: i64) -> usize {
        let last = today.plus_days(days - 1);
        self.extras
            .iter()
            .filter_map(|(_, extra)| extra.expires)
            .filter(|date| *date >= today && *date <= last)
            .count()
    }

    /// The extra of the rule with this number, if it has one.
    pub fn extra(&self, index: u32) -> Option<&Extra> {
        self.extras
            .binary_search_by_key(&index, |(rule, _)| *rule)
            .ok()
            .map(|at| &self.extras[at].1)
    }

    /// A policy with no entries (enforce mode, egress off): what fresh, empty maps hold.
    pub fn empty() -> Self {
        Self {
            mode: Mode::Enforce,
            egress: EgressMode::Off,
            rules: Vec::new(),
            port_keys: Vec::new(),
            expired: Vec::new(),
            vpn_endpoints: 0,
            vpn_groups: Vec::new(),
            upstream_groups: Vec::new(),
            feed_duplicates: 0,
            conn_timeouts: enforcer_common::ConnTimeouts::DEFAULT,
            extras: Vec::new(),
        }
    }

    /// The rule with this number.
    pub fn rule(&self, index: u32) -> Option<&CompiledRule> {
        self.rules
            .binary_search_by_key(&index, |r| r.index)
            .ok()
            .map(|i| &self.rules[i])
    }

    /// Prefixes of every rule the source lookup holds (allow and deny).
    pub fn source_prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.rules
            .iter()
            .filter(|r| r.kind.is_source())
            .map(|r| &r.prefix)
    }

    /// Rules that go into the allow tries (networks and devices).
    pub fn allow_rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules
            .iter()
            .filter(|r| matches!(r.kind, RuleKind::Network | RuleKind::Device))
    }

    /// What the kernel's source trie holds, prefix → rule: every deny range, and every allow
    /// prefix that does not lie inside (or equal) a deny range — those can never decide, and
    /// leaving them out lets one longest-prefix lookup give the deny-beats-allow verdict.
    pub fn trie_entries(&self) -> Vec<(IpNet, u32)> {
        self.trie_entries_where(|_| true)
    }

    /// The same, for the prefixes `keep` accepts only. `keep` must accept a deny range wherever
    /// it accepts a prefix inside it (as "overlaps these /16s" does), so that what is left out
    /// of the result is the same as in `trie_entries`.
    pub fn trie_entries_where(&self, keep: impl Fn(&IpNet) -> bool) -> Vec<(IpNet, u32)> {
        let denied: std::collections::HashSet<IpNet> = self
            .deny_rules()
            .map(|r| r.prefix)
            .filter(|p| keep(p))
            .collect();
        let shadowed = |prefix: IpNet| {
            (0..=prefix.prefix_len()).rev().any(|len| {
                let wider = match prefix {
                    IpNet::V4(n) => {
                        ipnet::Ipv4Net::new(n.network(), len).map(|n| IpNet::V4(n.trunc()))
                    }
                    IpNet::V6(n) => {
                        ipnet::Ipv6Net::new(n.network(), len).map(|n| IpNet::V6(n.trunc()))
                    }
                };
                wider.is_ok_and(|w| denied.contains(&w))
            })
        };
        let mut entries: Vec<(IpNet, u32)> = self
            .deny_rules()
            .filter(|r| keep(&r.prefix))
            .map(|r| (r.prefix, r.index))
            .collect();
        entries.extend(
            self.allow_rules()
                .filter(|r| keep(&r.prefix) && (denied.is_empty() || !shadowed(r.prefix)))
                .map(|r| (r.prefix, r.index)),
        );
        entries
    }

    /// Rules that go into the deny tries (registry entries and feed ranges).
    pub fn deny_rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules
            .iter()
            .filter(|r| matches!(r.kind, RuleKind::Deny | RuleKind::DenyFeed))
    }

    pub fn count(&self, kind: RuleKind) -> usize {
        self.rules.iter().filter(|r| r.kind == kind).count()
    }
}

/// Numbers the rules: an entry `previous` had keeps its number if what the kernel holds for it
/// is unchanged; new and changed entries get numbers `previous` did not use. So a live change
/// writes changed entries beside the old ones and switches to them with the lookup tables: a
/// packet meets the old entry or the new one, never a half-changed one. The caller sorts the
/// result by number.
fn assign_indices(
    rules: &mut [CompiledRule],
    previous: Option<&Policy>,
) -> Result<(), PolicyError> {
    // Sorted lists, not hash maps: at a million rules the maps cost about 150 MB and a cache
    // miss per insert; the sorted (hash of key, position) pairs cost 16 MB.
    let previous_rules = previous.map_or(&[][..], |p| p.rules.as_slice());
    let hasher = foldhash::fast::FixedState::with_seed(0);
    let mut by_key: Vec<(u64, u32)> = previous_rules
        .iter()
        .enumerate()
        .map(|(at, r)| (hasher.hash_one(r.key()), at as u32))
        .collect();
    by_key.sort_unstable();
    // What the kernel holds for each previous rule's ports: its port keys (a policy read back
    // from the maps has them, not the rules' port lists), sorted by rule.
    let mut old_ports: Vec<(u32, u8, u16)> = previous
        .map(|p| p.port_keys.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|k| (k.rule, k.proto, u16::from_be_bytes(k.port_be)))
        .collect();
    old_ports.sort_unstable();
    old_ports.dedup();
    let before = |rule: &CompiledRule| -> Content {
        let index = rule.index;
        let from = old_ports.partition_point(|(r, ..)| *r < index);
        let to = from + old_ports[from..].partition_point(|(r, ..)| *r <= index);
        let ports = old_ports[from..to]
            .iter()
            .map(|(_, proto, port)| (*proto, *port))
            .collect();
        let vpn = rule.vpn.as_ref().map(|v| (v.protocol, v.port));
        (rule.flags(), ports, vpn)
    };
    let kept = |rule: &CompiledRule| {
        let key = rule.key();
        let hash = hasher.hash_one(&key);
        let from = by_key.partition_point(|(h, _)| *h < hash);
        let old = by_key[from..]
            .iter()
            .take_while(|(h, _)| *h == hash)
            .map(|(_, at)| &previous_rules[*at as usize])
            .find(|old| old.key() == key)?;
        (before(old) == content(rule)).then_some(old.index)
    };
    // Numbers in use before, ascending (the previous rules are sorted by number).
    let mut taken = previous_rules.iter().map(|r| r.index).peekable();
    let in_use = previous_rules.len();
    let mut next = 0u32;
    for i in 0..rules.len() {
        if let Some(index) = kept(&rules[i]) {
            rules[i].index = index;
            continue;
        }
        while taken.next_if(|&t| t < next).is_some() {}
        while taken.next_if_eq(&next).is_some() {
            next += 1;
            while taken.next_if(|&t| t < next).is_some() {}
        }
        if next >= MAX_RULES {
            let added = rules.iter().filter(|r| kept(r).is_none()).count();
            return Err(PolicyError::NoFreeRuleNumbers { added, in_use });
        }
        rules[i].index = next;
        next += 1;
    }
    Ok(())
}

/// The (rule, protocol, port) triples of every port-restricted rule.
fn port_keys(rules: &[CompiledRule]) -> Result<Vec<PortKey>, PolicyError> {
    let mut keys = BTreeSet::new();
    for rule in rules {
        keys.extend(
            rule.port_pairs()
                .map(|(protocol, port)| (rule.index, protocol, port)),
        );
        if keys.len() > MAX_PORT_RULES as usize {
            return Err(PolicyError::TooManyPorts(keys.len()));
        }
    }
    Ok(keys
        .into_iter()
        .map(|(rule, proto, port)| PortKey {
            rule,
            port_be: port.to_be_bytes(),
            proto,
            _pad: 0,
        })
        .collect())
}

/// Each distinct prefix among the rules of `kind`, with every rule of that kind whose prefix
/// contains it (in rule order); `Err` with the number of prefixes if there are more than `max`.
fn covering(
    rules: &[CompiledRule],
    kind: RuleKind,
    max: u32,
) -> Result<Vec<(IpNet, Vec<&CompiledRule>)>, usize> {
    let members: Vec<&CompiledRule> = rules.iter().filter(|r| r.kind == kind).collect();
    let prefixes: BTreeSet<IpNet> = members.iter().map(|r| r.prefix).collect();
    if prefixes.len() > max as usize {
        return Err(prefixes.len());
    }
    Ok(prefixes
        .into_iter()
        .map(|prefix| {
            let covering = members
                .iter()
                .copied()
                .filter(|r| r.prefix.contains(&prefix))
                .collect();
            (prefix, covering)
        })
        .collect())
}

/// For each distinct endpoint prefix, the approvals of every endpoint whose prefix contains it.
fn vpn_groups(rules: &[CompiledRule]) -> Result<Vec<(IpNet, Vec<VpnApproval>)>, PolicyError> {
    let groups = covering(rules, RuleKind::VpnEndpoint, MAX_VPN_GROUPS)
        .map_err(PolicyError::TooManyVpnPrefixes)?;
    groups
        .into_iter()
        .map(|(prefix, endpoints)| {
            let approvals: Vec<VpnApproval> = endpoints
                .iter()
                .filter_map(|r| {
                    let vpn = r.vpn.as_ref()?;
                    Some(VpnApproval {
                        rule: r.index,
                        protocol: vpn.protocol as u8,
                        _pad: 0,
                        port_be: vpn.port.unwrap_or(0).to_be_bytes(),
                    })
                })
                .collect();
            if approvals.len() > MAX_APPROVALS_PER_GROUP {
                return Err(PolicyError::TooManyApprovals(approvals.len(), prefix));
            }
            Ok((prefix, approvals))
        })
        .collect()
}

/// For each distinct upstream prefix, the rule numbers of every upstream whose prefix contains
/// it, the longest prefix first (then in rule order): the kernel takes the first that lists the
/// packet's port, so a destination passes if any upstream covering it lists the port.
fn upstream_groups(rules: &[CompiledRule]) -> Result<Vec<(IpNet, Vec<u32>)>, PolicyError> {
    let groups = covering(rules, RuleKind::Upstream, MAX_UPSTREAM_GROUPS)
        .map_err(PolicyError::TooManyUpstreamPrefixes)?;
    groups
        .into_iter()
        .map(|(prefix, mut upstreams)| {
            if upstreams.len() > MAX_UPSTREAMS_PER_GROUP {
                return Err(PolicyError::TooManyUpstreams(upstreams.len(), prefix));
            }
            upstreams.sort_by_key(|r| (std::cmp::Reverse(r.prefix.prefix_len()), r.index));
            Ok((prefix, upstreams.iter().map(|r| r.index).collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests;
