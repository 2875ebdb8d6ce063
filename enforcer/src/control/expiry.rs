//! Expiry: entries whose `expires` date has passed are removed from the registry by the daemon
//! itself, written and audited like any change; the kernel stops applying them in the same step.

use serde_json::{Value, json};

use super::{
    AuditEntry, Response,
    change::Change,
    live::{Caller, Live},
};
use crate::registry::{Date, text};

impl Live {
    /// Removes the entries whose expiry date has passed, once a date has passed; `None` when
    /// there was nothing to do.
    pub fn expire(&mut self) -> Option<Response> {
        let today = Date::today();
        if self.next_expiry.is_none_or(|d| !d.is_past(today)) {
            return None;
        }
        if self.fleet.is_some() {
            return self.expire_in_fleet(today);
        }
        let text = match self.source.read() {
            Ok(snapshot) => snapshot.text,
            Err(e) => return Some(Response::error(e.to_string())),
        };
        let serial = self.serial + 1;
        let expiry = text::without_expired(&text, today, serial);
        drop(text);
        let expiry = match expiry {
            Ok(expiry) => expiry,
            Err(e) => {
                return Some(Response::error(format!("{}: {e}", self.source.location())));
            }
        };
        if expiry.gone.is_empty() {
            // Nothing past after all (the entry was removed meanwhile): the sweep reads the
            // registry again at the next date, not every minute.
            self.next_expiry = expiry.next;
            return None;
        }
        let what = format!("removed {} expired entries", expiry.gone.len());
        let audit = AuditEntry {
            uid: 0,
            verb: "expire".into(),
            entry: json!(expiry.gone),
            approval: Value::Null,
        };
        let response = self.make(
            Caller::SYSTEM,
            Change::whole(expiry.text, serial, what, audit),
        );
        crate::release_freed_memory();
        Some(response)
    }

    /// In a fleet the registry is etcd's: the entries past their date stay there, and the
    /// policy in force is made again from the same registry (which leaves them out), once a day.
    fn expire_in_fleet(&mut self, today: Date) -> Option<Response> {
        if self.fleet_expired_on == Some(today) {
            return None;
        }
        self.fleet_expired_on = Some(today);
        let text = match self.source.read() {
            Ok(snapshot) => snapshot.text,
            Err(e) => return Some(Response::error(e.to_string())),
        };
        let audit = AuditEntry {
            uid: 0,
            verb: "expire".into(),
            entry: json!({"date": today.to_string()}),
            approval: Value::Null,
        };
        let what = "entries past their date are no longer applied".to_string();
        let response = self.make(
            Caller::SYSTEM,
            Change::whole(text, self.serial, what, audit),
        );
        crate::release_freed_memory();
        Some(response)
    }
}
