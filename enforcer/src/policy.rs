//! The policy compiler: a validated registry (and today's date) → the entries of the kernel maps.
//! Pure and host-testable: no aya here. It also evaluates the compiled policy the way the kernel
//! program does, for `enforcer check` and as the reference the kernel tests compare against.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use enforcer_common::{MAX_PORT_RULES, MAX_RULES, PortKey, RULE_ANY_PORT, RULE_ICMP, Reason};
use ipnet::IpNet;

use crate::registry::{Date, Mode, PortSpec, Protocol, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Network,
    Device,
    Deny,
}

impl RuleKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Device => "device",
            Self::Deny => "deny",
        }
    }
}

/// One registry entry as loaded into the kernel; `index` is its slot in `RULES`/`RULE_HITS`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CompiledRule {
    pub index: u32,
    pub kind: RuleKind,
    pub name: String,
    pub prefix: IpNet,
    /// `None`: every port and protocol.
    #[serde(serialize_with = "serialize_ports")]
    pub ports: Option<Vec<PortSpec>>,
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes a reference to the field"
)]
fn serialize_ports<S: serde::Serializer>(
    ports: &Option<Vec<PortSpec>>,
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
        match &self.ports {
            None => RULE_ANY_PORT,
            Some(ports) if ports.contains(&PortSpec::Icmp) => RULE_ICMP,
            Some(_) => 0,
        }
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
        "the registry has {0} networks, devices and deny ranges; the kernel maps hold {MAX_RULES}"
    )]
    TooManyRules(usize),
    #[error(
        "the registry's port lists expand to {0} (rule, protocol, port) entries; the kernel map holds {MAX_PORT_RULES} (use fewer or narrower port ranges)"
    )]
    TooManyPorts(usize),
}

/// The registry compiled for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Indexed by rule number.
    pub rules: Vec<CompiledRule>,
    pub port_keys: Vec<PortKey>,
    pub expired: Vec<Expired>,
    /// Approved VPN endpoints that are in force (used by the VPN stage).
    pub vpn_endpoints: usize,
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
    /// Compiles the entries in force on `today`: networks, then devices, then deny ranges.
    pub fn compile(registry: &Registry, today: Date) -> Result<Self, PolicyError> {
        let mut rules = Vec::new();
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
        let mut candidates: Vec<(RuleKind, String, IpNet, Option<Vec<PortSpec>>)> = Vec::new();
        for n in &registry.networks {
            if keep("networks", &n.name, n.expires) {
                candidates.push((RuleKind::Network, n.name.clone(), n.cidr, n.ports.clone()));
            }
        }
        for d in &registry.devices {
            if keep("devices", &d.name, d.expires) {
                candidates.push((
                    RuleKind::Device,
                    d.name.clone(),
                    IpNet::from(d.address),
                    d.ports.clone(),
                ));
            }
        }
        for d in &registry.deny {
            if keep("deny", &d.label(), d.expires) {
                candidates.push((RuleKind::Deny, d.label(), d.cidr, None));
            }
        }
        let vpn_endpoints = registry
            .vpn_endpoints
            .iter()
            .filter(|v| keep("vpn_endpoints", &v.name, v.expires))
            .count();
        if candidates.len() > MAX_RULES as usize {
            return Err(PolicyError::TooManyRules(candidates.len()));
        }
        for (index, (kind, name, prefix, ports)) in candidates.into_iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| PolicyError::TooManyRules(usize::MAX))?;
            rules.push(CompiledRule {
                index,
                kind,
                name,
                prefix,
                ports,
            });
        }

        let mut port_keys = BTreeSet::new();
        for rule in &rules {
            for spec in rule.ports.iter().flatten() {
                if let PortSpec::Range {
                    protocol,
                    first,
                    last,
                } = *spec
                {
                    for port in first..=last {
                        port_keys.insert((rule.index, protocol.number(), port));
                    }
                }
            }
            if port_keys.len() > MAX_PORT_RULES as usize {
                return Err(PolicyError::TooManyPorts(port_keys.len()));
            }
        }
        let port_keys = port_keys
            .into_iter()
            .map(|(rule, proto, port)| PortKey {
                rule,
                port_be: port.to_be_bytes(),
                proto,
                _pad: 0,
            })
            .collect();
        Ok(Self {
            mode: registry.mode,
            rules,
            port_keys,
            expired,
            vpn_endpoints,
        })
    }

    /// Rules that go into the allow tries (networks and devices).
    pub fn allow_rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules.iter().filter(|r| r.kind != RuleKind::Deny)
    }

    /// Rules that go into the deny tries.
    pub fn deny_rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules.iter().filter(|r| r.kind == RuleKind::Deny)
    }

    pub fn count(&self, kind: RuleKind) -> usize {
        self.rules.iter().filter(|r| r.kind == kind).count()
    }

    /// The verdict for a packet from `source`, the way the kernel program decides it for a whole
    /// (unfragmented) IP packet: deny list, then the longest allowlist prefix and its ports.
    pub fn check(&self, source: IpAddr, protocol: Protocol, port: Option<u16>) -> Decision<'_> {
        let longest = |rules: &mut dyn Iterator<Item = &'_ CompiledRule>| -> Option<usize> {
            rules
                .filter(|r| r.prefix.contains(&source))
                .max_by_key(|r| r.prefix.prefix_len())
                .map(|r| r.index as usize)
        };
        if let Some(index) = longest(&mut self.deny_rules()) {
            return Decision {
                reason: Reason::Denied,
                rule: Some(&self.rules[index]),
            };
        }
        let Some(index) = longest(&mut self.allow_rules()) else {
            return Decision {
                reason: Reason::NotAllowlisted,
                rule: None,
            };
        };
        let rule = &self.rules[index];
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

#[cfg(test)]
mod tests;
