//! The lockout guard: a live change that would cut off the operator's own SSH session, or a
//! protected management network, is refused unless forced.

use std::net::IpAddr;

use enforcer_common::{Action, Reason};

use super::Operator;
use crate::{
    policy::Policy,
    registry::{EgressMode, Mode, Protocol},
};

/// The management networks no change may cut off without `--force`.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    pub protected: Vec<ipnet::IpNet>,
}

/// What a policy lets in of what the guard protects: whether the caller's session passes, then
/// whether each protected network is allowlisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach(Vec<bool>);

impl Guard {
    pub fn new(protected: Vec<ipnet::IpNet>) -> Self {
        Self { protected }
    }

    /// What `policy` lets in of the caller's session and the protected networks: both ways,
    /// for the answers go out through the egress verdict (to the client's port, which the
    /// server does not know: an approved network passes on any port, an upstream does not).
    pub fn reach(&self, caller: Option<Operator>, policy: &Policy) -> Reach {
        let answered = |addr: IpAddr| {
            policy.egress != EgressMode::Enforce
                || policy
                    .decide_egress(addr, Protocol::Tcp, None, None)
                    .reason
                    .action()
                    == Action::Pass
        };
        let passes = |addr: IpAddr, port: u16| {
            (policy.mode == Mode::Monitor
                || policy
                    .check(addr, Protocol::Tcp, Some(port))
                    .reason
                    .action()
                    == Action::Pass)
                && answered(addr)
        };
        let listed = |addr: IpAddr| {
            (policy.mode == Mode::Monitor
                || matches!(
                    policy.check(addr, Protocol::Tcp, None).reason,
                    Reason::Allowed | Reason::PortNotAllowed
                ))
                && answered(addr)
        };
        let session = caller.is_some_and(|op| passes(op.addr, op.port.unwrap_or(22)));
        Reach(
            std::iter::once(session)
                .chain(
                    self.protected
                        .iter()
                        .map(|net| listed(protected_probe(net))),
                )
                .collect(),
        )
    }

    /// What was reachable `before` and is not `after`, worded for the refusal.
    pub fn cut_off(
        &self,
        caller: Option<Operator>,
        before: &Reach,
        after: &Reach,
    ) -> Option<String> {
        let lost = |i: usize| before.0.get(i) == Some(&true) && after.0.get(i) == Some(&false);
        if let Some(op) = caller
            && lost(0)
        {
            let port = op.port.unwrap_or(22);
            return Some(format!("your own session from {} (tcp/{port})", op.addr));
        }
        self.protected
            .iter()
            .enumerate()
            .find(|(i, _)| lost(i + 1))
            .map(|(_, net)| format!("the protected management network {net}"))
    }
}

/// The refusal of a change that would cut off the operator or a protected network.
pub fn refusal(cut: &str) -> String {
    format!(
        "refused, nothing changed: the change would cut off {cut}; repeat with --force if that is intended"
    )
}

/// The address that stands for a protected network: its first host.
fn protected_probe(net: &ipnet::IpNet) -> IpAddr {
    match net {
        ipnet::IpNet::V4(n) => IpAddr::V4(n.hosts().next().unwrap_or(n.network())),
        ipnet::IpNet::V6(n) => IpAddr::V6(n.hosts().next().unwrap_or(n.network())),
    }
}
