//! The audit log: one JSON line per change in force (who, what, the approval reference, the
//! serial before and after), appended and synced before the change is reported.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::registry::Date;

/// What a change's audit record says of it.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    /// The peer's uid (0 for the daemon's own changes, such as expiry).
    pub uid: u32,
    pub verb: String,
    pub entry: Value,
    /// The national IT board's approval reference, for a VPN approval.
    pub approval: Value,
}

/// The audit log of one instance.
pub struct AuditLog {
    path: PathBuf,
    instance: String,
}

impl AuditLog {
    pub fn new(path: PathBuf, instance: String) -> Self {
        Self { path, instance }
    }

    /// The audit log beside a registry file: `REGISTRY.audit.jsonl`.
    pub fn beside(registry: &Path) -> PathBuf {
        let mut name = registry
            .file_name()
            .map(std::ffi::OsStr::to_os_string)
            .unwrap_or_default();
        name.push(".audit.jsonl");
        registry.with_file_name(name)
    }

    /// Appends one record; a failure is logged, not returned (the change is in force already).
    pub fn record(&self, entry: &AuditEntry, before: u64, after: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let line = json!({
            "time": timestamp(now), "uid": entry.uid, "verb": entry.verb, "entry": entry.entry,
            "approval": entry.approval, "serial_before": before, "serial_after": after,
            "instance": self.instance,
        });
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "cannot append to the audit log");
        }
    }
}

/// `YYYY-MM-DDThh:mm:ssZ` for Unix seconds.
fn timestamp(secs: u64) -> String {
    let day = Date::from_days_since_epoch(i64::try_from(secs / 86_400).unwrap_or(0));
    let rem = secs % 86_400;
    format!(
        "{day}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
