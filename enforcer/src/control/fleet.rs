//! A live enforcer that follows the fleet's registry: each registry the agent hands over is
//! made the policy in force through the one write path (a whole change, applied to the kernel
//! as a diff), its revision becoming the serial; changes asked of the local socket are refused,
//! since the registry is etcd's.

use serde_json::{Value, json};

use super::{
    AuditEntry, Response,
    change::Change,
    live::{Caller, Live},
};
use crate::{datapath::VerdictCounts, registry::Registry};

impl Live {
    /// From now on, the registry is the fleet's at `endpoints`: local changes are refused.
    pub fn follow_fleet(&mut self, endpoints: String) {
        self.fleet = Some(endpoints);
    }

    /// The refusal of a change asked of the local socket, when following a fleet.
    pub(super) fn fleet_refusal(&self) -> Option<Response> {
        self.fleet.as_ref().map(|endpoints| {
            Response::error(format!(
                "refused, nothing changed: this enforcer follows the fleet's registry in etcd ({endpoints}); change it there: the same verb with --etcd"
            ))
        })
    }

    /// Puts the fleet's registry at `revision` (its `text` and the registry parsed from it,
    /// without the keys `left_out`) in force. The lockout guard applies to the protected networks (`run --protect`): a revision
    /// that would cut one off is refused here and reported in the status.
    pub fn apply_fleet(
        &mut self,
        revision: i64,
        (text, registry): (String, Box<Registry>),
        left_out: &[&str],
    ) -> Response {
        let serial = u64::try_from(revision).unwrap_or(0);
        if serial == self.serial {
            return Response::ok(format!("fleet revision {revision} is in force"), json!({}));
        }
        let audit = AuditEntry {
            uid: 0,
            verb: "fleet".into(),
            entry: json!({"revision": revision, "left_out": left_out}),
            approval: Value::Null,
        };
        let caller = Caller {
            uid: 0,
            operator: None,
            force: false,
        };
        let what = format!("fleet revision {revision} in force");
        let response = self.make(
            caller,
            Change::whole_parsed(text, registry, serial, what, audit),
        );
        crate::release_freed_memory();
        response
    }

    /// What the agent publishes as its status: the local status, the verdicts so far, and the
    /// fleet's view (`extra`: host, applied revision, last error, keys left out).
    pub fn fleet_status(&self, extra: Value) -> Value {
        let mut status = self.status_data();
        let totals = |counts: Result<VerdictCounts, _>| {
            let counts = counts.unwrap_or_default();
            let (mut allowed, mut dropped) = (0u64, 0u64);
            for (reason, counter) in &counts.enforced {
                if reason.action() == enforcer_common::Action::Drop {
                    dropped += counter.packets;
                } else {
                    allowed += counter.packets;
                }
            }
            json!({"allowed": allowed, "dropped": dropped})
        };
        if let (Value::Object(status), Value::Object(extra)) = (&mut status, extra) {
            status.insert("incoming".into(), totals(self.datapath.verdicts()));
            status.insert("outgoing".into(), totals(self.datapath.egress_verdicts()));
            status.extend(extra);
        }
        status
    }
}
