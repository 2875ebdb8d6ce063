//! The audit log: one JSON line per change in force (who, what, the approval reference, the
//! serial before and after), appended and synced before the change is reported. Each record
//! carries `prev`, the SHA-256 of the line before it, so that an edited, removed or reordered
//! record breaks the chain at the next one (`enforcer audit verify`).

use std::{
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::registry::Date;

/// The `prev` of the first record of a log.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How much of the log's end is read at start for its last record.
const TAIL_BYTES: u64 = 1 << 20;

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
    /// The hash of the last record written (or found at start).
    last: String,
}

fn hash(line: &str) -> String {
    let digest = Sha256::digest(line.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl AuditLog {
    /// The log at `path`; the chain goes on from its last record.
    pub fn new(path: PathBuf, instance: String) -> Self {
        let last = last_line(&path).map_or_else(|| GENESIS.to_string(), |line| hash(&line));
        Self {
            path,
            instance,
            last,
        }
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

    /// At start: a registry whose serial is past the last audited change had a change put in
    /// force whose record was lost (the controller stopped between the two). The gap is recorded
    /// as such, so the chain stays whole and the log says what is not known.
    pub fn reconcile(&mut self, serial: u64) -> Option<String> {
        let last = last_line(&self.path)?;
        let audited = serde_json::from_str::<Value>(&last)
            .ok()?
            .get("serial_after")
            .and_then(Value::as_u64)?;
        if serial <= audited {
            return None;
        }
        let entry = AuditEntry {
            uid: 0,
            verb: "recovered".into(),
            entry: json!({"note": "a change was put in force but its record was lost: the controller stopped between the two; the registry holds the change"}),
            approval: Value::Null,
        };
        self.record(&entry, audited, serial);
        Some(format!(
            "the audit log ended at serial {audited} but the registry is at {serial}: recorded the gap"
        ))
    }

    /// Appends one record; a failure is logged, not returned (the change is in force already).
    pub fn record(&mut self, entry: &AuditEntry, before: u64, after: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let line = json!({
            "time": timestamp(now), "uid": entry.uid, "verb": entry.verb, "entry": entry.entry,
            "approval": entry.approval, "serial_before": before, "serial_after": after,
            "instance": self.instance, "prev": self.last,
        })
        .to_string();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
        match written {
            Ok(()) => self.last = hash(&line),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot append to the audit log");
            }
        }
    }
}

/// The last complete line of a file, from its last `TAIL_BYTES`.
fn last_line(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
        .ok()?;
    let mut tail = String::new();
    file.read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_string)
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// Records read.
    pub records: usize,
    /// Records at the start written before the log was chained (no `prev`).
    pub unchained: usize,
    /// The last record's `serial_after`.
    pub last_serial: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("cannot read the audit log {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}:{line}: not a JSON record: the log was edited")]
    NotJson { path: String, line: usize },
    #[error(
        "{path}:{line}: the record does not follow the one before it (its prev is not that record's hash): a record before it was edited or removed, or this one was moved"
    )]
    Broken { path: String, line: usize },
    #[error("{path}:{line}: a record without a hash chain after chained ones: inserted by hand")]
    Unchained { path: String, line: usize },
}

/// Checks the chain of the audit log at `path`.
pub fn verify(path: &Path) -> Result<Verified, VerifyError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| VerifyError::Read {
        path: display.clone(),
        message: e.to_string(),
    })?;
    let mut expected: Option<String> = None;
    let mut verified = Verified {
        records: 0,
        unchained: 0,
        last_serial: None,
    };
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let record: Value = serde_json::from_str(line).map_err(|_| VerifyError::NotJson {
            path: display.clone(),
            line: number,
        })?;
        match record.get("prev").and_then(Value::as_str) {
            None if expected.is_none() || verified.unchained == verified.records => {
                verified.unchained += 1;
            }
            None => {
                return Err(VerifyError::Unchained {
                    path: display,
                    line: number,
                });
            }
            Some(prev) => {
                let want = match &expected {
                    Some(hash) => hash.as_str(),
                    None => GENESIS,
                };
                if prev != want {
                    return Err(VerifyError::Broken {
                        path: display,
                        line: number,
                    });
                }
            }
        }
        expected = Some(hash(line));
        verified.records += 1;
        verified.last_serial = record.get("serial_after").and_then(Value::as_u64);
    }
    Ok(verified)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{AuditEntry, AuditLog, VerifyError, verify};

    #[test]
    fn an_edited_removed_or_inserted_record_breaks_the_chain() {
        let dir = std::env::temp_dir().join(format!("enforcer-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.json.audit.jsonl");
        // A record written before the log was chained stays readable.
        std::fs::write(&path, "{\"verb\":\"mode\",\"serial_after\":1}\n").unwrap();
        for serial in 2..=5 {
            // A new log object each time, as each start of the daemon makes: the chain goes on.
            let mut log = AuditLog::new(path.clone(), "eth0@1".into());
            let entry = AuditEntry {
                uid: 0,
                verb: "networks add".into(),
                entry: json!({"name": format!("n{serial}")}),
                approval: json!(null),
            };
            log.record(&entry, serial - 1, serial);
        }
        let ok = verify(&path).unwrap();
        assert_eq!((ok.records, ok.unchained, ok.last_serial), (5, 1, Some(5)));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let check = |lines: &[String]| {
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            verify(&path)
        };
        let owned: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
        // Edited: the uid of the third record.
        let mut edited = owned.clone();
        edited[2] = edited[2].replace("\"uid\":0", "\"uid\":1000");
        assert!(matches!(
            check(&edited),
            Err(VerifyError::Broken { line: 4, .. })
        ));
        // Removed: the third record.
        let mut removed = owned.clone();
        removed.remove(2);
        assert!(matches!(
            check(&removed),
            Err(VerifyError::Broken { line: 3, .. })
        ));
        // Inserted without a chain.
        let mut inserted = owned.clone();
        inserted.insert(3, "{\"verb\":\"forged\"}".into());
        assert!(matches!(
            check(&inserted),
            Err(VerifyError::Unchained { line: 4, .. })
        ));
        assert!(check(&owned).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
