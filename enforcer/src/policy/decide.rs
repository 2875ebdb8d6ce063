//! The policy evaluated the way the kernel program decides a packet, for `enforcer check`, the
//! live `check`, the lockout guard and as the reference the kernel tests compare against.

use std::{fmt, net::IpAddr};

use enforcer_common::{Reason, VpnProtocol};

use super::{CompiledRule, Policy, RuleKind};
use crate::registry::Protocol;

/// What the policy does with a packet, and which rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'a> {
    pub reason: Reason,
    pub rule: Option<&'a CompiledRule>,
    /// A verdict on a packet the server sends (`decide_egress`).
    pub outgoing: bool,
}

impl fmt::Display for Decision<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.reason.action() {
            enforcer_common::Action::Pass => "PASS",
            enforcer_common::Action::Drop => "DROP",
        };
        let help = match (self.outgoing, self.reason) {
            (true, Reason::Allowed) => "destination in an approved network or device, any port",
            (true, Reason::Denied) => "destination in the deny list",
            (true, Reason::DeniedFeed) => "destination in a deny feed file",
            (_, reason) => reason.help(),
        };
        write!(f, "{verdict} ({}: {help})", self.reason.label())?;
        if let Some(rule) = self.rule {
            write!(
                f,
                "; rule #{} {} \"{}\" {}",
                rule.index,
                rule.kind.as_str(),
                rule.name,
                rule.prefix
            )?;
            // On the way out an approved network's ports do not apply.
            if let Some(ports) = rule
                .ports
                .as_ref()
                .filter(|_| !(self.outgoing && rule.kind != RuleKind::Upstream))
            {
                let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
                write!(f, " ports {}", ports.join(","))?;
            }
        }
        Ok(())
    }
}

impl Policy {
    /// What the kernel program does with a whole (unfragmented) IP packet from `addr`, and which
    /// rule decides. `vpn`: the packet carries that VPN protocol's signature, with `addr` its
    /// remote endpoint. The kernel's order: the deny list first, then the VPN stage, then the
    /// allowlist and its ports.
    pub fn decide(
        &self,
        addr: IpAddr,
        protocol: Protocol,
        port: Option<u16>,
        vpn: Option<VpnProtocol>,
    ) -> Decision<'_> {
        let plain = self.check(addr, protocol, port);
        match vpn {
            Some(vpn) if !matches!(plain.reason, Reason::Denied | Reason::DeniedFeed) => {
                self.check_vpn(addr, vpn, port)
            }
            _ => plain,
        }
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
                outgoing: false,
            },
            None => Decision {
                reason: Reason::UnapprovedVpn,
                rule: None,
                outgoing: false,
            },
        }
    }

    /// What the egress program does with a whole (unfragmented) IP packet the server sends to
    /// `destination`, and which rule decides: the deny list, then (for a packet carrying `vpn`'s
    /// signature, with `destination` its remote endpoint) the VPN approvals, then the approved
    /// networks and devices (any port), then the upstreams that list the port (the longest
    /// prefix first), else `egress_denied`. The egress mode is not applied here.
    pub fn decide_egress(
        &self,
        destination: IpAddr,
        protocol: Protocol,
        port: Option<u16>,
        vpn: Option<VpnProtocol>,
    ) -> Decision<'_> {
        let listed = self.check(destination, protocol, port);
        if let Some(vpn) = vpn
            && !matches!(listed.reason, Reason::Denied | Reason::DeniedFeed)
        {
            return Decision {
                outgoing: true,
                ..self.check_vpn(destination, vpn, port)
            };
        }
        match listed.reason {
            Reason::Denied | Reason::DeniedFeed => {
                return Decision {
                    outgoing: true,
                    ..listed
                };
            }
            Reason::Allowed | Reason::PortNotAllowed => {
                return Decision {
                    reason: Reason::Allowed,
                    rule: listed.rule,
                    outgoing: true,
                };
            }
            _ => {}
        }
        let group = self
            .upstream_groups
            .iter()
            .filter(|(prefix, _)| prefix.contains(&destination))
            .max_by_key(|(prefix, _)| prefix.prefix_len());
        let rule = group.and_then(|(_, rules)| {
            rules
                .iter()
                .filter_map(|index| self.rule(*index))
                .find(|rule| rule.allows(protocol, port))
        });
        match rule {
            Some(rule) => Decision {
                reason: Reason::Upstream,
                rule: Some(rule),
                outgoing: true,
            },
            None => Decision {
                reason: Reason::EgressDenied,
                rule: None,
                outgoing: true,
            },
        }
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
                outgoing: false,
            };
        }
        let Some(index) = longest(&mut self.allow_rules()) else {
            return Decision {
                reason: Reason::NotAllowlisted,
                rule: None,
                outgoing: false,
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
            outgoing: false,
        }
    }
}
