//! The policy compiler: a validated registry (and today's date) → the entries of the kernel maps.
//! Pure and host-testable: no aya here. It also evaluates the compiled policy the way the kernel
//! program does, for `enforcer check` and as the reference the kernel tests compare against.

use std::{collections::BTreeSet, fmt, hash::BuildHasher as _, net::IpAddr};

use enforcer_common::{
    MAX_APPROVALS_PER_GROUP, MAX_PORT_RULES, MAX_RULES, MAX_VPN_GROUPS, PortKey, RULE_ANY_PORT,
    RULE_DENY, RULE_FEED, RULE_ICMP, Reason, VpnApproval, VpnProtocol,
};
use ipnet::IpNet;

use crate::registry::{Date, Mode, PortSpec, Protocol, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Network,
    Device,
    Deny,
    /// A range from a deny feed file.
    DenyFeed,
    /// An approved VPN endpoint.
    VpnEndpoint,
}

impl RuleKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Device => "device",
            Self::Deny => "deny",
            Self::DenyFeed => "feed",
            Self::VpnEndpoint => "vpn",
        }
    }
}

/// One registry entry as loaded into the kernel; `index` is its slot in `RULES`/`RULE_HITS`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CompiledRule {
    pub index: u32,
    pub kind: RuleKind,
    pub name: Box<str>,
    pub prefix: IpNet,
    /// `None`: every port and protocol.
    #[serde(serialize_with = "serialize_ports")]
    pub ports: Option<Box<[PortSpec]>>,
    /// For an approved VPN endpoint: what is approved.
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Boxed: one rule in a million is a VPN endpoint, and the others should not carry room
    /// for it.
    pub vpn: Option<Box<VpnApprovalInfo>>,
}

/// What a `vpn_endpoints` entry approves.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VpnApprovalInfo {
    #[serde(serialize_with = "serialize_protocol")]
    pub protocol: VpnProtocol,
    pub port: Option<u16>,
    pub approval: String,
    #[serde(serialize_with = "serialize_opt_date")]
    pub expires: Option<Date>,
}

fn serialize_protocol<S: serde::Serializer>(p: &VpnProtocol, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes a reference to the field"
)]
fn serialize_opt_date<S: serde::Serializer>(d: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(d),
        None => s.serialize_none(),
    }
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes a reference to the field"
)]
fn serialize_ports<S: serde::Serializer>(
    ports: &Option<Box<[PortSpec]>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match ports {
        None => s.serialize_none(),
        Some(ports) => s.collect_seq(ports.iter().map(ToString::to_string)),
    }
}

impl CompiledRule {
    /// The `RULE_*` flags the kernel reads.
    pub fn flags(&self) -> u32 {
        match self.kind {
            RuleKind::DenyFeed => return RULE_DENY | RULE_FEED,
            RuleKind::Deny => return RULE_DENY,
            RuleKind::VpnEndpoint => return 0,
            RuleKind::Network | RuleKind::Device => {}
        }
        match &self.ports {
            None => RULE_ANY_PORT,
            Some(ports) if ports.contains(&PortSpec::Icmp) => RULE_ICMP,
            Some(_) => 0,
        }
    }

    /// The (IP protocol, destination port) pairs the rule's port list expands to.
    fn port_pairs(&self) -> impl Iterator<Item = (u8, u16)> + '_ {
        self.ports
            .iter()
            .flatten()
            .filter_map(|spec| match *spec {
                PortSpec::Range {
                    protocol,
                    first,
                    last,
                } => Some((protocol.number(), first..=last)),
                // ICMP is a flag, not port entries.
                PortSpec::Icmp => None,
            })
            .flat_map(|(protocol, ports)| ports.map(move |port| (protocol, port)))
    }

    /// What `RULES` holds for this rule: its flags and, for a source entry, its prefix.
    pub fn record(&self) -> enforcer_common::Rule {
        if self.kind == RuleKind::VpnEndpoint {
            return enforcer_common::Rule::default();
        }
        let mut rule = enforcer_common::Rule {
            flags: self.flags() | enforcer_common::RULE_IN_USE,
            len: self.prefix.prefix_len(),
            ..enforcer_common::Rule::default()
        };
        match self.prefix {
            IpNet::V4(net) => {
                rule.family = 4;
                rule.addr[..4].copy_from_slice(&net.network().octets());
            }
            IpNet::V6(net) => {
                rule.family = 6;
                rule.addr = net.network().octets();
            }
        }
        rule
    }

    fn allows(&self, protocol: Protocol, port: Option<u16>) -> bool {
        let Some(ports) = &self.ports else {
            return true;
        };
        ports.iter().any(|spec| match (*spec, protocol, port) {
            (PortSpec::Icmp, Protocol::Icmp, _) => true,
            (
                PortSpec::Range {
                    protocol: p,
                    first,
                    last,
                },
                _,
                Some(port),
            ) => p == protocol && (first..=last).contains(&port),
            _ => false,
        })
    }
}

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
        "a live update needs fresh rule numbers for its {added} new or changed entries while the {in_use} entries in force keep theirs, and the kernel maps hold {MAX_RULES}: apply it in two steps (remove, then add) or restart the controller"
    )]
    NoFreeRuleNumbers { added: usize, in_use: usize },
    #[error(transparent)]
    Lookup(#[from] crate::lookup::TooManyLengths),
}

/// The registry compiled for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Indexed by rule number.
    pub rules: Vec<CompiledRule>,
    pub port_keys: Vec<PortKey>,
    pub expired: Vec<Expired>,
    /// Approved VPN endpoints in force.
    pub vpn_endpoints: usize,
    /// Each distinct approved-endpoint prefix with every approval that covers it (its own and
    /// those of wider prefixes), so that the kernel's longest-prefix match finds them all.
    pub vpn_groups: Vec<(IpNet, Vec<VpnApproval>)>,
    /// Deny-feed ranges that duplicated another deny range and were left out.
    pub feed_duplicates: usize,
}

/// What the policy does with a packet, and which rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    pub reason: Reason,
    pub rule: Option<&'a CompiledRule>,
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.reason.action() {
            enforcer_common::Action::Pass => "PASS",
            enforcer_common::Action::Drop => "DROP",
        };
        write!(
            f,
            "{verdict} ({}: {})",
            self.reason.label(),
            self.reason.help()
        )?;
        if let Some(rule) = self.rule {
            write!(
                f,
                "; rule #{} {} \"{}\" {}",
                rule.index,
                rule.kind.as_str(),
                rule.name,
                rule.prefix
            )?;
            if let Some(ports) = &rule.ports {
                let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
                write!(f, " ports {}", ports.join(","))?;
            }
        }
        Ok(())
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
                + registry.vpn_endpoints.len(),
        );
        let mut push = |kind, name: String, prefix, ports, vpn| {
            let index = u32::MAX; // assigned below
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
                push(RuleKind::Network, n.name, n.cidr, n.ports, None);
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
                );
            }
        }
        let mut denied = std::collections::HashSet::new();
        for d in registry.deny {
            let (cidr, expires) = (d.cidr, d.expires);
            let label = d.into_label();
            if keep("deny", &label, expires) {
                denied.insert(cidr);
                push(RuleKind::Deny, label, cidr, None, None);
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
                );
            }
        }
        if rules.len() > MAX_RULES as usize {
            return Err(PolicyError::TooManyRules(rules.len()));
        }
        crate::lookup::check(|| {
            rules
                .iter()
                .filter(|r| r.kind != RuleKind::VpnEndpoint)
                .map(|r| &r.prefix)
        })?;
        assign_indices(&mut rules, previous)?;
        let port_keys = port_keys(&rules)?;
        let vpn_groups = vpn_groups(&rules)?;
        Ok(Self {
            mode: registry.mode,
            rules,
            port_keys,
            expired,
            vpn_endpoints,
            vpn_groups,
            feed_duplicates,
        })
    }

    /// A policy with no entries (enforce mode): what fresh, empty maps hold.
    pub fn empty() -> Self {
        Self {
            mode: Mode::Enforce,
            rules: Vec::new(),
            port_keys: Vec::new(),
            expired: Vec::new(),
            vpn_endpoints: 0,
            vpn_groups: Vec::new(),
            feed_duplicates: 0,
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
            .filter(|r| r.kind != RuleKind::VpnEndpoint)
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

    /// What the kernel does with a packet of VPN `protocol` between `remote` and this host:
    /// it passes only if `remote` (on `port`, when both name one) is approved for `protocol`.
    pub fn check_vpn(
        &self,
        remote: IpAddr,
        protocol: VpnProtocol,
        port: Option<u16>,
    ) -> Decision<'_> {
        let group = self
            .vpn_groups
            .iter()
            .filter(|(prefix, _)| prefix.contains(&remote))
            .max_by_key(|(prefix, _)| prefix.prefix_len());
        let approval = group.and_then(|(_, approvals)| {
            approvals.iter().find(|a| {
                let approved_port = u16::from_be_bytes(a.port_be);
                a.protocol == protocol as u8
                    && (approved_port == 0 || port.is_none_or(|p| p == approved_port))
            })
        });
        match approval {
            Some(a) => Decision {
                reason: Reason::ApprovedVpn,
                rule: self.rule(a.rule),
            },
            None => Decision {
                reason: Reason::UnapprovedVpn,
                rule: None,
            },
        }
    }

    pub fn count(&self, kind: RuleKind) -> usize {
        self.rules.iter().filter(|r| r.kind == kind).count()
    }

    /// The verdict for a packet from `source`, the way the kernel program decides it for a whole
    /// (unfragmented) IP packet: deny list, then the longest allowlist prefix and its ports.
    pub fn check(&self, source: IpAddr, protocol: Protocol, port: Option<u16>) -> Decision<'_> {
        let longest = |rules: &mut dyn Iterator<Item = &'_ CompiledRule>| -> Option<u32> {
            rules
                .filter(|r| r.prefix.contains(&source))
                .max_by_key(|r| r.prefix.prefix_len())
                .map(|r| r.index)
        };
        if let Some(index) = longest(&mut self.deny_rules()) {
            let rule = self.rule(index).expect("index from this policy");
            let reason = if rule.kind == RuleKind::DenyFeed {
                Reason::DeniedFeed
            } else {
                Reason::Denied
            };
            return Decision {
                reason,
                rule: Some(rule),
            };
        }
        let Some(index) = longest(&mut self.allow_rules()) else {
            return Decision {
                reason: Reason::NotAllowlisted,
                rule: None,
            };
        };
        let rule = self.rule(index).expect("index from this policy");
        let reason = if rule.allows(protocol, port) {
            Reason::Allowed
        } else {
            Reason::PortNotAllowed
        };
        Decision {
            reason,
            rule: Some(rule),
        }
    }
}

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
}

impl RuleChange {
    /// Whether the source lookup tables change (anything but a VPN endpoint).
    pub fn touches_sources(&self) -> bool {
        self.added
            .iter()
            .chain(&self.removed)
            .any(|r| r.kind != RuleKind::VpnEndpoint)
    }

    /// The prefixes of the source rules it adds or removes: the source tables change only
    /// inside them.
    pub fn source_prefixes(&self) -> Vec<IpNet> {
        self.added
            .iter()
            .chain(&self.removed)
            .filter(|r| r.kind != RuleKind::VpnEndpoint)
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
            if rule.kind != RuleKind::VpnEndpoint {
                crate::lookup::check(|| {
                    self.rules
                        .iter()
                        .filter(|r| r.kind != RuleKind::VpnEndpoint && !removing(r.index))
                        .map(|r| &r.prefix)
                        .chain(std::iter::once(&rule.prefix))
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
        self.vpn_endpoints = self.count(RuleKind::VpnEndpoint);
        Ok(RuleChange {
            added,
            removed,
            ports_added,
            ports_removed,
            old_vpn_groups,
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
        self.vpn_endpoints = self.count(RuleKind::VpnEndpoint);
    }
}

/// What identifies a rule across updates: its deny or allow prefix, or its VPN endpoint name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleKey {
    Allow(IpNet),
    Deny(IpNet),
    Vpn(String),
}

impl CompiledRule {
    pub fn key(&self) -> RuleKey {
        match self.kind {
            RuleKind::Network | RuleKind::Device => RuleKey::Allow(self.prefix),
            RuleKind::Deny | RuleKind::DenyFeed => RuleKey::Deny(self.prefix),
            RuleKind::VpnEndpoint => RuleKey::Vpn(self.name.to_string()),
        }
    }
}

/// What the kernel holds for a rule beyond its prefix: its flags, the (protocol, port) pairs it
/// allows, and for a VPN endpoint what is approved.
type Content = (u32, Vec<(u8, u16)>, Option<(VpnProtocol, Option<u16>)>);

fn content(rule: &CompiledRule) -> Content {
    let mut ports: Vec<(u8, u16)> = rule.port_pairs().collect();
    ports.sort_unstable();
    ports.dedup();
    let vpn = rule.vpn.as_ref().map(|v| (v.protocol, v.port));
    (rule.flags(), ports, vpn)
}

/// Numbers the rules: an entry `previous` had keeps its number if what the kernel holds for it
/// is unchanged; new and changed entries get numbers `previous` did not use. So a live change
/// writes changed entries beside the old ones and switches to them with the lookup tables: a
/// packet meets the old entry or the new one, never a half-changed one. The result is sorted by
/// number.
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
    rules.sort_by_key(|r| r.index);
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

/// For each distinct endpoint prefix, the approvals of every endpoint whose prefix contains it.
fn vpn_groups(rules: &[CompiledRule]) -> Result<Vec<(IpNet, Vec<VpnApproval>)>, PolicyError> {
    let endpoints: Vec<&CompiledRule> = rules
        .iter()
        .filter(|r| r.kind == RuleKind::VpnEndpoint)
        .collect();
    let prefixes: BTreeSet<IpNet> = endpoints.iter().map(|r| r.prefix).collect();
    if prefixes.len() > MAX_VPN_GROUPS as usize {
        return Err(PolicyError::TooManyVpnPrefixes(prefixes.len()));
    }
    prefixes
        .into_iter()
        .map(|prefix| {
            let approvals: Vec<VpnApproval> = endpoints
                .iter()
                .filter(|r| r.prefix.contains(&prefix))
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

#[cfg(test)]
mod tests;
