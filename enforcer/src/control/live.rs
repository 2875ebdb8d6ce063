//! The live state of a running enforcer: the policy in force and the datapath that enforces it,
//! the registry source it was made from, and the instance's bookkeeping. The requests it serves
//! are in `requests`; the one way it changes is `change`.

use std::time::SystemTime;

use super::{AuditLog, Operator, guard::Guard};
use crate::{
    datapath::Datapath,
    instance::{InstanceId, State},
    policy::Policy,
    registry::{Date, Mode},
    source::{RegistrySource, Version},
};

/// What the link watch found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// The pinned link holds the interface: enforcing.
    Attached,
    /// The interface is gone: nothing is enforced until it returns.
    InterfaceGone,
    /// The interface was replaced and the programs are attached to the new one.
    Reattached,
    /// The interface was replaced and attaching to the new one failed (the message says why).
    ReattachFailed,
}

/// What the daemon hands the control plane at start: the instance and its settings.
pub struct LiveConfig {
    pub id: InstanceId,
    /// The state file `stats` reads; its mode and rule labels follow every change.
    pub state: State,
    /// `run --mode` wins over the registry's mode until a `mode` request changes it.
    pub mode_override: Option<Mode>,
    /// Management networks no change may cut off without `force`.
    pub protected: Vec<ipnet::IpNet>,
    pub audit: AuditLog,
}

/// What is in force when the daemon starts serving.
pub struct InForce {
    pub datapath: Datapath,
    pub policy: Policy,
    pub serial: u64,
    /// The earliest expiry among the registry's entries.
    pub next_expiry: Option<Date>,
    /// The source's version the policy was made from.
    pub version: Option<Version>,
}

/// Who asks for a change, and whether the lockout guard applies.
#[derive(Clone, Copy, Debug)]
pub(super) struct Caller {
    pub uid: u32,
    pub operator: Option<Operator>,
    /// Apply even if the change would cut off the operator or a protected network.
    pub force: bool,
}

impl Caller {
    /// The daemon itself (expiry): the system removes what its owner set to expire, so no
    /// lockout check applies.
    pub const SYSTEM: Self = Self {
        uid: 0,
        operator: None,
        force: true,
    };
}

/// What the daemon holds while it runs.
pub struct Live {
    pub(super) datapath: Datapath,
    pub(super) policy: Policy,
    pub(super) source: Box<dyn RegistrySource>,
    /// The source's version the policy in force was made from (last read or written): while
    /// the source still holds it, an added or removed entry is made in place (`plan`);
    /// otherwise (edited by hand since, or not known) the change goes the whole way, which
    /// reads the registry as it is.
    pub(super) version: Option<Version>,
    /// The earliest expiry among the registry's entries: the sweep reads the registry only once
    /// a date has passed. (The document itself is read when a change needs it, not kept: a
    /// million-entry document is hundreds of MiB as a JSON tree.)
    pub(super) next_expiry: Option<Date>,
    pub(super) serial: u64,
    pub(super) mode_override: Option<Mode>,
    pub(super) guard: Guard,
    pub(super) audit: AuditLog,
    pub(super) id: InstanceId,
    pub(super) state: State,
    pub(super) started: SystemTime,
    /// What the link watch found last.
    pub(super) link: LinkState,
    /// The fleet's etcd endpoints, when this enforcer follows the fleet's registry.
    pub(super) fleet: Option<String>,
    /// In a fleet, the day expired entries were last dropped from the policy in force (they
    /// stay in the fleet's registry until someone removes them).
    pub(super) fleet_expired_on: Option<Date>,
}

impl Live {
    pub fn new(config: LiveConfig, in_force: InForce, source: Box<dyn RegistrySource>) -> Self {
        Self {
            datapath: in_force.datapath,
            policy: in_force.policy,
            source,
            version: in_force.version,
            next_expiry: in_force.next_expiry,
            serial: in_force.serial,
            mode_override: config.mode_override,
            guard: Guard::new(config.protected),
            audit: config.audit,
            id: config.id,
            state: config.state,
            started: SystemTime::now(),
            link: LinkState::Attached,
            fleet: None,
            fleet_expired_on: None,
        }
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// The datapath, when the daemon stops.
    pub fn into_datapath(self) -> Datapath {
        self.datapath
    }

    /// The registry serial in force.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The instance's state file (the history and rule labels live beside it).
    pub fn state_file(&self) -> std::path::PathBuf {
        self.id.state_file()
    }

    /// What names rule `index` of the policy in force in an event.
    pub fn rule_info(&self, index: u32) -> Option<crate::events::RuleInfo> {
        let rule = self.policy.rule(index)?;
        Some(crate::events::RuleInfo {
            name: rule.name.to_string(),
            kind: rule.kind.as_str(),
            ministry: self
                .policy
                .extra(index)
                .and_then(|e| e.ministry.as_deref())
                .map(str::to_string),
        })
    }

    /// What the metrics endpoint publishes of the policy in force.
    pub fn facts(&self) -> crate::metrics::Facts {
        crate::metrics::Facts::of(
            &self.policy,
            self.serial,
            &self.state.xdp_mode,
            self.enforcing(),
        )
    }
}
