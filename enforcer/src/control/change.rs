//! The one write path of a live change. Every change — an entry added or removed in place, the
//! mode switched, a whole registry (edited, reloaded, or with expired entries removed) — goes
//! through `Live::make`, in this order, all or nothing:
//!
//! 1. a whole registry is parsed and validated (a refusal names every problem);
//! 2. the new text is written aside (a reloaded one is the source's already);
//! 3. the policy in force takes the change (edited in place, or compiled anew against it);
//! 4. the lockout guard compares what the policy let in before and after;
//! 5. the kernel takes it as a diff, then the new text is put in force in the source;
//! 6. on any failure in 3-5 `roll_back` puts the policy and the kernel back: nothing changed;
//! 7. the state file (mode, rule labels) follows, and the audit log records the change.

use serde_json::json;

use super::{
    AuditEntry, Response, guard,
    live::{Caller, Live},
    plan::Edit,
};
use crate::{
    datapath::DatapathError,
    instance::{InstanceError, PreparedRules, State, rule_label, rule_labels},
    policy::{CompiledRule, Extra, Policy, RuleChange},
    registry::{Date, EgressMode, Mode, Registry, refusal},
    source::{Snapshot, SourceError},
};

/// What a change does to the policy in force.
pub(super) enum Effect {
    /// Entries added or removed in place (see `plan`).
    Edit {
        add: Option<CompiledRule>,
        remove: Vec<u32>,
        /// The added entry's expiry date and ministry.
        extra: Extra,
    },
    /// The mode only.
    Mode(Mode),
    /// The egress mode only.
    Egress(EgressMode),
    /// The whole registry, parsed anew and compiled against the policy in force.
    Whole,
}

/// The registry's new text: to be written, or already the source's (a reload).
enum NewText {
    Write(String),
    Reloaded(Snapshot),
}

/// A change ready to be made.
pub(super) struct Change {
    text: NewText,
    /// The registry's serial after the change.
    serial: u64,
    effect: Effect,
    /// What the answer says was done.
    what: String,
    audit: AuditEntry,
    /// A whole registry's text, parsed and validated already (a fleet's revision).
    parsed: Option<Box<Registry>>,
}

impl Change {
    pub fn new(text: String, serial: u64, effect: Effect, what: String, audit: AuditEntry) -> Self {
        Self {
            text: NewText::Write(text),
            serial,
            effect,
            what,
            audit,
            parsed: None,
        }
    }

    /// A whole registry's new text and the registry parsed from it.
    pub fn whole_parsed(
        text: String,
        registry: Box<Registry>,
        serial: u64,
        what: String,
        audit: AuditEntry,
    ) -> Self {
        Self {
            parsed: Some(registry),
            ..Self::whole(text, serial, what, audit)
        }
    }

    /// A whole registry's new text.
    pub fn whole(text: String, serial: u64, what: String, audit: AuditEntry) -> Self {
        Self::new(text, serial, Effect::Whole, what, audit)
    }

    /// An entry added or removed in place.
    pub fn in_place(edit: Edit, serial: u64, audit: AuditEntry) -> Self {
        let effect = Effect::Edit {
            add: edit.add,
            remove: edit.remove,
            extra: edit.extra,
        };
        Self::new(edit.text, serial, effect, edit.what, audit)
    }

    /// The registry as the source holds it now, made the policy in force.
    pub fn reloaded(snapshot: Snapshot, serial: u64, what: String, audit: AuditEntry) -> Self {
        Self {
            text: NewText::Reloaded(snapshot),
            serial,
            effect: Effect::Whole,
            what,
            audit,
            parsed: None,
        }
    }
}

/// What was done to the policy in force, so that it can be taken back.
enum Applied {
    Edit(RuleChange),
    /// The mode before.
    Mode(Mode),
    /// The egress mode before.
    Egress(EgressMode),
    /// The policy before.
    Whole(Box<Policy>),
}

/// The rule labels of a whole new policy, prepared beside the kernel's update.
type Labels = std::thread::Result<Result<PreparedRules, InstanceError>>;

fn refused(error: impl std::fmt::Display) -> String {
    format!("refused, nothing changed: {error}")
}

impl Live {
    /// Makes `change` (see the module's order); the answer says what was done or why nothing was.
    pub(super) fn make(&mut self, caller: Caller, change: Change) -> Response {
        self.try_make(caller, change)
            .unwrap_or_else(Response::error)
    }

    fn try_make(&mut self, caller: Caller, change: Change) -> Result<Response, String> {
        let Change {
            text,
            serial,
            effect,
            what,
            audit,
            parsed,
        } = change;
        let (text, reloaded) = match text {
            NewText::Write(text) => (text, None),
            NewText::Reloaded(snapshot) => (snapshot.text, Some(snapshot.version)),
        };
        let registry = match (&effect, parsed) {
            (Effect::Whole, Some(parsed)) => Some(*parsed),
            (Effect::Whole, None) => {
                Some(Registry::parse_at(&text, &self.source.base_dir()).map_err(|p| refusal(&p))?)
            }
            (Effect::Edit { .. } | Effect::Mode(_) | Effect::Egress(_), _) => None,
        };
        tracing::debug!(mib = ?crate::memory_mib(), "change: parsed");
        // Written aside now, so that the new text (50 MB at a million entries) is not held while
        // the policy is compiled and the kernel changed; put in force once they are.
        let staged = match reloaded {
            None => Some(self.source.stage(&text).map_err(refused)?),
            Some(_) => None,
        };
        drop(text);
        let before = self.guard.reach(caller.operator, &self.policy);
        let mut next_expiry = self.next_expiry;
        let applied = match effect {
            Effect::Edit { add, remove, extra } => {
                next_expiry = match (next_expiry, extra.expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Applied::Edit(self.policy.edit(add, extra, &remove).map_err(refused)?)
            }
            Effect::Mode(mode) => Applied::Mode(std::mem::replace(&mut self.policy.mode, mode)),
            Effect::Egress(egress) => {
                Applied::Egress(std::mem::replace(&mut self.policy.egress, egress))
            }
            Effect::Whole => {
                let registry = registry.expect("a whole change is parsed first");
                next_expiry = registry.next_expiry();
                // The registry goes into the policy (its names move, not copied); at a million
                // entries it is the largest thing held while the policy is compiled.
                let mut policy = Policy::from_registry(registry, Date::today(), Some(&self.policy))
                    .map_err(refused)?;
                if let Some(mode) = self.mode_override {
                    policy.mode = mode;
                }
                Applied::Whole(Box::new(std::mem::replace(&mut self.policy, policy)))
            }
        };
        tracing::debug!(mib = ?crate::memory_mib(), "change: policy made");
        if !caller.force {
            let after = self.guard.reach(caller.operator, &self.policy);
            if let Some(cut) = self.guard.cut_off(caller.operator, &before, &after) {
                self.roll_back(applied, false);
                return Err(guard::refusal(&cut));
            }
        }
        let written = self
            .write_kernel(&applied)
            .map_err(|e| format!("applying to the kernel failed: {e}"))
            .and_then(|labels| match staged {
                Some(staged) => staged
                    .commit()
                    .map(|version| (labels, version))
                    .map_err(|e: SourceError| e.to_string()),
                None => Ok((labels, reloaded.flatten())),
            });
        tracing::debug!(mib = ?crate::memory_mib(), "change: applied");
        let (labels, version) = match written {
            Ok(done) => done,
            Err(e) => {
                self.roll_back(applied, true);
                return Err(refused(e));
            }
        };
        let before_serial = self.serial;
        self.version = version;
        self.serial = serial;
        self.next_expiry = next_expiry;
        let how = if matches!(applied, Applied::Whole(_)) {
            "whole_registry"
        } else {
            "in_place"
        };
        self.commit_state(&applied, labels);
        self.audit.record(&audit, before_serial, serial);
        Ok(Response::ok(
            what,
            json!({"serial": serial, "applied": how}),
        ))
    }

    /// Moves the kernel to the policy in force; for a whole policy, its rule labels are
    /// prepared meanwhile (a million take most of a second).
    fn write_kernel(&mut self, applied: &Applied) -> Result<Option<Labels>, DatapathError> {
        match applied {
            Applied::Edit(change) => self
                .datapath
                .apply_change(change, &self.policy)
                .map(|()| None),
            Applied::Mode(_) => self.datapath.set_mode(self.policy.mode).map(|()| None),
            Applied::Egress(_) => self.datapath.set_egress(self.policy.egress).map(|()| None),
            Applied::Whole(old) => {
                let (policy, id, datapath) = (&self.policy, &self.id, &mut self.datapath);
                let (written, labels) = std::thread::scope(|scope| {
                    let labels = scope.spawn(|| State::prepare_rules(id, &rule_labels(policy)));
                    (datapath.apply(old, policy), labels.join())
                });
                written.map(|()| Some(labels))
            }
        }
    }

    /// Puts back the policy in force before `applied` and, if the kernel was written (even in
    /// part), the kernel too.
    fn roll_back(&mut self, applied: Applied, kernel: bool) {
        match applied {
            Applied::Edit(change) => {
                self.policy.undo(change.clone());
                if kernel {
                    let _ = self.datapath.revert_change(&change, &self.policy);
                }
            }
            Applied::Mode(old) => {
                self.policy.mode = old;
                if kernel {
                    let _ = self.datapath.set_mode(old);
                }
            }
            Applied::Egress(old) => {
                self.policy.egress = old;
                if kernel {
                    let _ = self.datapath.set_egress(old);
                }
            }
            Applied::Whole(old) => {
                if kernel {
                    let _ = self.datapath.apply(&self.policy, &old);
                }
                self.policy = *old;
            }
        }
    }

    /// The state file's mode, and the rule labels `stats` shows: a whole policy's prepared
    /// labels put in place, or an in-place change's recorded in the journal beside them.
    fn commit_state(&mut self, applied: &Applied, labels: Option<Labels>) {
        self.state.mode = self.policy.mode.to_string();
        self.state.egress = self.policy.egress.to_string();
        let written = self
            .state
            .write(&self.id)
            .and_then(|()| match (applied, labels) {
                (Applied::Edit(change), _) => {
                    let gone: Vec<u32> = change.removed.iter().map(|r| r.index).collect();
                    let added: Vec<_> = change
                        .added
                        .iter()
                        .map(|rule| rule_label(&self.policy, rule))
                        .collect();
                    if State::journal_rules(&self.id.state_file(), &gone, &added)? {
                        Ok(())
                    } else {
                        State::write_rules(&self.id, &rule_labels(&self.policy))
                    }
                }
                (_, Some(labels)) => labels
                    .unwrap_or_else(|_| {
                        Err(InstanceError::Io {
                            path: "rules.json".into(),
                            source: std::io::Error::other(
                                "the thread writing the rule labels panicked",
                            ),
                        })
                    })
                    .and_then(PreparedRules::commit),
                (_, None) => Ok(()),
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot update the state file (stats may show old rule names)");
        }
    }
}
