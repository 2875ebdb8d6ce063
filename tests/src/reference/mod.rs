//! A userspace reference of the ingress verdict, for the differential fuzzer: frame bytes in,
//! (reason, rule, VPN protocol) out. Written from the documented verdict order (README, "The
//! verdict order"; docs/vpn-signatures.md; docs/design.md on fragments and flows) as plain
//! slice code, apart from the kernel program: no bounded loops, no masks, no fast path, no
//! lookup tables; the rules are scanned as the registry lists them. Only the state that changes
//! a later verdict is kept: passed first fragments and remembered `OpenVPN` flows. The server's
//! own connections are not modelled (the fuzzer runs no egress packets, so no reply passes).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use enforcer::{
    policy::{CompiledRule, Policy, RuleKind},
    registry::{PortSpec, Protocol},
};
use enforcer_common::{Reason, VpnProtocol};

mod parse;
mod vpn;

use parse::{Fragment, Ip, Parsed, Payload, TCP, Transport, parse};
use vpn::{openvpn_session, signature};

/// What the reference decides for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub reason: Reason,
    /// The registry index of the rule credited.
    pub rule: Option<u32>,
    /// The VPN protocol counted (approved or not).
    pub vpn: Option<VpnProtocol>,
}

impl Expected {
    fn new(reason: Reason, rule: Option<u32>) -> Self {
        Self {
            reason,
            rule,
            vpn: None,
        }
    }
}

/// The policy and the state the kernel keeps between packets.
pub struct Reference<'p> {
    policy: &'p Policy,
    /// (source, destination, fragment id, protocol) of first fragments that passed.
    fragments: HashSet<(IpAddr, IpAddr, [u8; 4], u8)>,
    flows: HashMap<FlowEnds, Flow>,
    /// Session ids per flow: (the lower end's, the higher end's); 0 for none.
    sessions: HashMap<FlowEnds, (u64, u64)>,
    /// Some flow was ever remembered (the kernel looks flows up only then).
    flows_seen: bool,
}

/// A flow's two ends in canonical order: (address bytes, port bytes) of the lower end first.
type End = ([u8; 16], [u8; 2]);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowEnds {
    lo: End,
    hi: End,
    proto: u8,
}

#[derive(Clone, Copy, Debug)]
struct Flow {
    protocol: VpnProtocol,
    /// The reset was not approved: later packets must carry their end's session id.
    strict: bool,
}

impl<'p> Reference<'p> {
    pub fn new(policy: &'p Policy) -> Self {
        Self {
            policy,
            fragments: HashSet::new(),
            flows: HashMap::new(),
            sessions: HashMap::new(),
            flows_seen: false,
        }
    }

    /// The verdict for one incoming frame, updating the state as the kernel would.
    pub fn decide(&mut self, frame: &[u8]) -> Expected {
        let ip = match parse(frame) {
            Parsed::LinkControl => return Expected::new(Reason::LinkControl, None),
            Parsed::NonIp => return Expected::new(Reason::NonIp, None),
            Parsed::Malformed => return Expected::new(Reason::Malformed, None),
            Parsed::Ip(ip) => ip,
        };
        // The deny list beats everything.
        if let Some(rule) = longest(self.policy.rules.iter().filter(|r| is_deny(r)), ip.src) {
            let reason = if rule.kind == RuleKind::DenyFeed {
                Reason::DeniedFeed
            } else {
                Reason::Denied
            };
            return Expected::new(reason, Some(rule.index));
        }
        let allow = longest(self.policy.rules.iter().filter(|r| is_allow(r)), ip.src);
        // The VPN stage: a signature, or a remembered flow.
        let (src_port, dst_port, payload) = match ip.transport {
            Transport::Ports {
                src_port,
                dst_port,
                payload,
            } => (src_port, dst_port, payload),
            Transport::Other(payload) => (0, 0, payload),
            Transport::Icmp | Transport::None => (0, 0, Payload::default()),
        };
        let found = match signature(frame, ip.proto, src_port, dst_port, payload) {
            Some(found) => Some(found),
            None if matches!(ip.transport, Transport::Ports { .. }) => self
                .known_flow(frame, &ip, src_port, dst_port, payload)
                .map(|p| (p, false)),
            None => None,
        };
        if let Some((protocol, stateful)) = found {
            let approval = self.approval(&ip, protocol, src_port, dst_port);
            if stateful && (allow.is_some() || approval.is_some()) {
                self.remember(frame, &ip, protocol, approval.is_some(), payload);
            }
            let reason = if approval.is_some() {
                Reason::ApprovedVpn
            } else {
                Reason::UnapprovedVpn
            };
            return Expected {
                reason,
                rule: approval,
                vpn: Some(protocol),
            };
        }
        // A TCP/UDP packet from an approved endpoint's address and named port is that VPN's.
        if let Transport::Ports { src_port, .. } = ip.transport
            && let Some((rule, protocol)) = self.endpoint_port(ip.src, src_port)
        {
            return Expected {
                reason: Reason::ApprovedVpn,
                rule: Some(rule),
                vpn: Some(protocol),
            };
        }
        // The allowlist and the matched entry's ports.
        let Some(rule) = allow else {
            return Expected::new(Reason::NotAllowlisted, None);
        };
        let reason = match (&rule.ports, &ip.transport) {
            (None, _) => Reason::Allowed,
            (Some(_), Transport::None) => {
                let key = (ip.src, ip.dst, fragment_id(ip.fragment), ip.proto);
                if self.fragments.contains(&key) {
                    Reason::Allowed
                } else {
                    Reason::FragmentUnverified
                }
            }
            (Some(ports), transport) => {
                let listed = match transport {
                    Transport::Ports { dst_port, .. } => {
                        let protocol = if ip.proto == TCP {
                            Protocol::Tcp
                        } else {
                            Protocol::Udp
                        };
                        ports.iter().any(|spec| {
                            matches!(spec, PortSpec::Range { protocol: p, first, last }
                                if *p == protocol && (*first..=*last).contains(dst_port))
                        })
                    }
                    Transport::Icmp => ports.iter().any(|spec| matches!(spec, PortSpec::Icmp)),
                    Transport::Other(_) | Transport::None => false,
                };
                if listed {
                    if let Fragment::First(id) = ip.fragment {
                        self.fragments.insert((ip.src, ip.dst, id, ip.proto));
                    }
                    Reason::Allowed
                } else {
                    Reason::PortNotAllowed
                }
            }
        };
        Expected::new(reason, Some(rule.index))
    }

    /// The first approval (in registry order) of the longest approved-endpoint prefix around
    /// the source (on its port), else around the destination (on its port).
    fn approval(
        &self,
        ip: &Ip,
        protocol: VpnProtocol,
        src_port: u16,
        dst_port: u16,
    ) -> Option<u32> {
        [(ip.src, src_port), (ip.dst, dst_port)]
            .into_iter()
            .find_map(|(addr, port)| {
                self.endpoints_around(addr).into_iter().find_map(|r| {
                    let vpn = r.vpn.as_ref()?;
                    let port_ok = vpn.port.is_none_or(|p| p == port) || port == 0;
                    (vpn.protocol == protocol && port_ok).then_some(r.index)
                })
            })
    }

    /// The approvals the longest endpoint prefix around `addr` holds: every endpoint whose
    /// prefix contains that prefix, in registry order.
    fn endpoints_around(&self, addr: IpAddr) -> Vec<&'p CompiledRule> {
        let endpoints = || {
            self.policy
                .rules
                .iter()
                .filter(|r| r.kind == RuleKind::VpnEndpoint)
        };
        let Some(longest) = longest(endpoints(), addr) else {
            return Vec::new();
        };
        endpoints()
            .filter(|r| r.prefix.contains(&longest.prefix))
            .collect()
    }

    /// An approval naming `port` among those around `addr`, when any approval names a port.
    fn endpoint_port(&self, addr: IpAddr, port: u16) -> Option<(u32, VpnProtocol)> {
        self.endpoints_around(addr).into_iter().find_map(|r| {
            let vpn = r.vpn.as_ref()?;
            (vpn.port == Some(port) && port != 0).then_some((r.index, vpn.protocol))
        })
    }

    fn remember(
        &mut self,
        frame: &[u8],
        ip: &Ip,
        protocol: VpnProtocol,
        approved: bool,
        p: Payload,
    ) {
        let Transport::Ports {
            src_port, dst_port, ..
        } = ip.transport
        else {
            return;
        };
        let (ends, from_lo) = flow_ends(ip, src_port, dst_port);
        self.flows.insert(
            ends,
            Flow {
                protocol,
                strict: !approved,
            },
        );
        self.flows_seen = true;
        if !approved {
            let session = openvpn_session(frame, p, ip.proto == TCP);
            let sessions = self.sessions.entry(ends).or_insert((0, 0));
            if from_lo {
                sessions.0 = session;
            } else {
                sessions.1 = session;
            }
        }
    }

    fn known_flow(
        &self,
        frame: &[u8],
        ip: &Ip,
        src_port: u16,
        dst_port: u16,
        p: Payload,
    ) -> Option<VpnProtocol> {
        if !self.flows_seen {
            return None;
        }
        let (ends, from_lo) = flow_ends(ip, src_port, dst_port);
        let flow = self.flows.get(&ends)?;
        if flow.strict {
            let session = openvpn_session(frame, p, ip.proto == TCP);
            let (lo, hi) = self.sessions.get(&ends).copied().unwrap_or((0, 0));
            let expected = if from_lo { lo } else { hi };
            if session == 0 || session != expected {
                return None;
            }
        }
        Some(flow.protocol)
    }
}

fn is_deny(rule: &CompiledRule) -> bool {
    matches!(rule.kind, RuleKind::Deny | RuleKind::DenyFeed)
}

fn is_allow(rule: &CompiledRule) -> bool {
    matches!(rule.kind, RuleKind::Network | RuleKind::Device)
}

/// The rule of the longest prefix containing `addr` (the first listed on a tie).
fn longest<'r>(
    rules: impl Iterator<Item = &'r CompiledRule>,
    addr: IpAddr,
) -> Option<&'r CompiledRule> {
    let mut best: Option<&CompiledRule> = None;
    for rule in rules.filter(|r| r.prefix.contains(&addr)) {
        if best.is_none_or(|b| rule.prefix.prefix_len() > b.prefix.prefix_len()) {
            best = Some(rule);
        }
    }
    best
}

fn fragment_id(fragment: Fragment) -> [u8; 4] {
    match fragment {
        Fragment::First(id) | Fragment::Later(id) => id,
        Fragment::Whole => [0; 4],
    }
}

fn flow_ends(ip: &Ip, src_port: u16, dst_port: u16) -> (FlowEnds, bool) {
    let bytes = |addr: IpAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match addr {
            IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => out = a.octets(),
        }
        out
    };
    let src = (bytes(ip.src), src_port.to_be_bytes());
    let dst = (bytes(ip.dst), dst_port.to_be_bytes());
    let from_lo = src <= dst;
    let (lo, hi) = if from_lo { (src, dst) } else { (dst, src) };
    (
        FlowEnds {
            lo,
            hi,
            proto: ip.proto,
        },
        from_lo,
    )
}

/// `n` frame bytes at `at`, if the frame holds them (reads may pass the payload's end, never
/// the frame's, as the kernel's bounds checks do).
pub(super) fn get(frame: &[u8], at: usize, n: usize) -> Option<&[u8]> {
    frame.get(at..at.checked_add(n)?)
}

pub(super) fn be16(frame: &[u8], at: usize) -> Option<u16> {
    get(frame, at, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}
