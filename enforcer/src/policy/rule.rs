//! A compiled rule: one registry entry as the kernel holds it (kind, prefix, ports, flags),
//! and the key that identifies it across updates.

use enforcer_common::{RULE_ANY_PORT, RULE_DENY, RULE_FEED, RULE_ICMP, RULE_UPSTREAM, VpnProtocol};
use ipnet::IpNet;

use crate::registry::{Date, PortSpec, Protocol};

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
    /// A destination the server may reach on its ports.
    Upstream,
}

impl RuleKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Device => "device",
            Self::Deny => "deny",
            Self::DenyFeed => "feed",
            Self::VpnEndpoint => "vpn",
            Self::Upstream => "upstream",
        }
    }

    /// Whether the source lookup tables hold rules of this kind (allow and deny entries).
    pub const fn is_source(self) -> bool {
        matches!(
            self,
            Self::Network | Self::Device | Self::Deny | Self::DenyFeed
        )
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
            RuleKind::Upstream => {
                let icmp = self.ports.iter().flatten().any(|p| *p == PortSpec::Icmp);
                return RULE_UPSTREAM | if icmp { RULE_ICMP } else { 0 };
            }
        }
        match &self.ports {
            None => RULE_ANY_PORT,
            Some(ports) if ports.contains(&PortSpec::Icmp) => RULE_ICMP,
            Some(_) => 0,
        }
    }

    /// The (IP protocol, destination port) pairs the rule's port list expands to.
    pub(super) fn port_pairs(&self) -> impl Iterator<Item = (u8, u16)> + '_ {
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

    /// What `RULES` holds for this rule: its flags and, for a source entry or an upstream, its
    /// prefix (`RULE_IN_USE` marks the source entries).
    pub fn record(&self) -> enforcer_common::Rule {
        if self.kind == RuleKind::VpnEndpoint {
            return enforcer_common::Rule::default();
        }
        let in_use = if self.kind.is_source() {
            enforcer_common::RULE_IN_USE
        } else {
            0
        };
        let mut rule = enforcer_common::Rule {
            flags: self.flags() | in_use,
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

    pub(super) fn allows(&self, protocol: Protocol, port: Option<u16>) -> bool {
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

/// What identifies a rule across updates: its deny or allow prefix, or its VPN endpoint's or
/// upstream's name and prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleKey {
    Allow(IpNet),
    Deny(IpNet),
    Vpn(String),
    Upstream(IpNet, String),
}

impl CompiledRule {
    pub fn key(&self) -> RuleKey {
        match self.kind {
            RuleKind::Network | RuleKind::Device => RuleKey::Allow(self.prefix),
            RuleKind::Deny | RuleKind::DenyFeed => RuleKey::Deny(self.prefix),
            RuleKind::VpnEndpoint => RuleKey::Vpn(self.name.to_string()),
            RuleKind::Upstream => RuleKey::Upstream(self.prefix, self.name.to_string()),
        }
    }
}

/// What the kernel holds for a rule beyond its prefix: its flags, the (protocol, port) pairs it
/// allows, and for a VPN endpoint what is approved.
pub(super) type Content = (u32, Vec<(u8, u16)>, Option<(VpnProtocol, Option<u16>)>);

pub(super) fn content(rule: &CompiledRule) -> Content {
    let mut ports: Vec<(u8, u16)> = rule.port_pairs().collect();
    ports.sort_unstable();
    ports.dedup();
    let vpn = rule.vpn.as_ref().map(|v| (v.protocol, v.port));
    (rule.flags(), ports, vpn)
}
