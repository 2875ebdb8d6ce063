//! The event log (`enforcer run --events PATH`): the kernel's events (drops, would-drops, VPN
//! packets, in both directions, and the connections approved clients open: the access log) and the daemon's own (start, stop, applied and refused changes,
//! expiry) as JSON lines with Elastic Common Schema field names, so that a SIEM ingests them
//! without a parser of its own. The schema is docs/events.md. Repeated events of one source
//! (same direction, reason and rule) within `FOLD` are folded: the first is written at once,
//! the rest as one line with their count when the interval ends. A file is reopened on SIGHUP
//! (for logrotate); `-` is standard output (for journald).

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write as _,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use enforcer_common::{
    EVENT_ACCESS, EVENT_EGRESS, EVENT_MONITOR, EVENT_NO_VPN, Event, Reason, VpnProtocol,
};
use serde_json::{Value, json};

use crate::registry::Date;

/// How long repeated events of one source are folded into one line.
pub const FOLD: Duration = Duration::from_secs(10);
/// Folds open at once; beyond, events are written as they come.
const MAX_FOLDS: usize = 10_000;

/// Where the lines go.
enum Sink {
    Stdout,
    File { path: PathBuf, file: File },
}

/// What names the rule of an event.
pub struct RuleInfo {
    pub name: String,
    pub kind: &'static str,
    pub ministry: Option<String>,
}

/// Events of one source being folded.
struct Fold {
    first: Value,
    opened: Instant,
    /// Events since the first.
    count: u64,
    last_ns: u64,
}

/// (direction flags, reason, remote address, rule).
type FoldKey = (u8, u8, [u8; 16], u32);

pub struct EventLog {
    sink: Sink,
    iface: String,
    host: String,
    /// Realtime minus the kernel's monotonic clock, in ns: an event's time on the wall.
    wall_offset_ns: i128,
    folds: HashMap<FoldKey, Fold>,
    /// Lines written since the start.
    pub written: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("event log {path}: {source}")]
pub struct EventLogError {
    path: String,
    source: std::io::Error,
}

/// Opens (or creates) the log for appending. Never blocks: a FIFO with no reader, a device or a
/// directory is refused at once (the daemon must not hang on its log).
fn open(path: &PathBuf) -> Result<File, EventLogError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| EventLogError {
        path: path.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(error)?;
    let metadata = file.metadata().map_err(error)?;
    if !metadata.is_file() {
        return Err(error(std::io::Error::other(
            "not a regular file (a FIFO, a device or a directory): give a file path, or - for standard output",
        )));
    }
    Ok(file)
}

fn realtime_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0))
}

/// RFC 3339 UTC with milliseconds, from ns since the epoch.
pub fn timestamp(ns: i128) -> String {
    let ms = ns.div_euclid(1_000_000);
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let date = Date::from_days_since_epoch(i64::try_from(days).unwrap_or(0));
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!("{date}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

fn address(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        6 => Some(IpAddr::from(*bytes)),
        _ => None,
    }
}

fn transport(proto: u8) -> Option<&'static str> {
    Some(match proto {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        47 => "gre",
        50 => "esp",
        51 => "ah",
        58 => "ipv6-icmp",
        _ => return None,
    })
}

impl EventLog {
    /// A log written to `path` (`-`: standard output) for the enforcer on `iface`.
    pub fn open(path: &PathBuf, iface: &str) -> Result<Self, EventLogError> {
        let sink = if path.as_os_str() == "-" {
            Sink::Stdout
        } else {
            Sink::File {
                path: path.clone(),
                file: open(path)?,
            }
        };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| String::new(), |h| h.trim().to_string());
        Ok(Self {
            sink,
            iface: iface.to_string(),
            host,
            wall_offset_ns: realtime_ns() - i128::from(crate::datapath::monotonic_ns()),
            folds: HashMap::new(),
            written: 0,
        })
    }

    /// Reopens the file (after logrotate moved it); standard output stays.
    pub fn reopen(&mut self) -> Result<(), EventLogError> {
        if let Sink::File { path, file } = &mut self.sink {
            *file = open(path)?;
        }
        Ok(())
    }

    fn write(&mut self, line: &Value) {
        let mut text = line.to_string();
        text.push('\n');
        let written = match &mut self.sink {
            Sink::Stdout => std::io::stdout().write_all(text.as_bytes()),
            Sink::File { file, .. } => file.write_all(text.as_bytes()),
        };
        match written {
            Ok(()) => self.written += 1,
            Err(e) => tracing::warn!("cannot write the event log: {e}"),
        }
    }

    fn observer(&self) -> Value {
        json!({"type": "firewall", "vendor": "enforcer", "product": "enforcer",
               "hostname": self.host, "interface": {"name": self.iface}})
    }

    /// A line of the daemon's own: `action` (`started`, `stopped`, `policy-changed`,
    /// `change-refused`, `expired`), what happened, and whether it succeeded.
    pub fn daemon(&mut self, action: &str, message: &str, success: bool, fields: Value) {
        let mut line = json!({
            "@timestamp": timestamp(realtime_ns()),
            "event": {"kind": "event", "category": ["configuration"],
                      "type": [if action == "started" { "start" } else if action == "stopped" { "end" } else { "change" }],
                      "action": action,
                      "outcome": if success { "success" } else { "failure" }},
            "message": message,
            "observer": self.observer(),
        });
        if let (Value::Object(line), Value::Object(fields)) = (&mut line, fields) {
            line.extend(fields);
        }
        self.write(&line);
    }

    /// The line of a kernel event.
    fn line(&self, event: &Event, rule: Option<&RuleInfo>, count: u64) -> Value {
        let reason = Reason::try_from(u32::from(event.reason)).ok();
        let egress = event.flags & EVENT_EGRESS != 0;
        let would_drop = event.flags & EVENT_MONITOR != 0;
        let passed = reason.is_some_and(|r| r.action() == enforcer_common::Action::Pass);
        let access = event.flags & EVENT_ACCESS != 0;
        let wall = i128::from(event.time_ns) + self.wall_offset_ns;
        let mut line = json!({
            "@timestamp": timestamp(wall),
            "event": {
                "kind": "event",
                "category": ["network"],
                "type": if access { json!(["connection", "start", "allowed"]) }
                        else if passed { json!(["allowed"]) } else { json!(["denied"]) },
                "action": if access { "access" } else { reason.map_or("unknown", Reason::label) },
                "reason": reason.map_or("", Reason::help),
                "count": count,
            },
            "network": {
                "direction": if egress { "egress" } else { "ingress" },
                "type": match event.family { 4 => "ipv4", 6 => "ipv6", _ => "other" },
                "iana_number": event.proto.to_string(),
            },
            "observer": self.observer(),
            "labels": {"would_drop": would_drop.to_string()},
        });
        if let Some(transport) = transport(event.proto) {
            line["network"]["transport"] = json!(transport);
        }
        if event.vlan != 0 {
            line["network"]["vlan"] = json!({"id": event.vlan.to_string()});
        }
        let port = |p: [u8; 2]| u16::from_be_bytes(p);
        // (A later fragment carries none: both 0.)
        let has_ports =
            matches!(event.proto, 6 | 17) && (event.src_port != [0; 2] || event.dst_port != [0; 2]);
        for (side, addr, p) in [
            ("source", &event.src, event.src_port),
            ("destination", &event.dst, event.dst_port),
        ] {
            if let Some(ip) = address(event.family, addr) {
                line[side] = json!({"ip": ip.to_string()});
                if has_ports {
                    line[side]["port"] = json!(port(p));
                }
            }
        }
        if event.vpn != EVENT_NO_VPN
            && let Ok(protocol) = VpnProtocol::try_from(event.vpn)
        {
            line["labels"]["vpn_protocol"] = json!(protocol.name());
        }
        if let Some(rule) = rule {
            line["rule"] =
                json!({"id": event.rule.to_string(), "name": rule.name, "ruleset": rule.kind});
            if let Some(ministry) = &rule.ministry {
                line["labels"]["ministry"] = json!(ministry);
            }
        }
        line
    }

    /// A kernel event: written at once if its source has no open fold, else counted in it.
    pub fn kernel(&mut self, event: &Event, rule: Option<&RuleInfo>) {
        let egress = event.flags & EVENT_EGRESS != 0;
        let remote = if egress { event.dst } else { event.src };
        let key: FoldKey = (event.flags, event.reason, remote, event.rule);
        let events = 1 + u64::from(event.suppressed);
        if let Some(fold) = self.folds.get_mut(&key) {
            fold.count += events;
            fold.last_ns = event.time_ns;
            return;
        }
        let line = self.line(event, rule, events);
        self.write(&line);
        if self.folds.len() < MAX_FOLDS {
            self.folds.insert(
                key,
                Fold {
                    first: line,
                    opened: Instant::now(),
                    count: 0,
                    last_ns: event.time_ns,
                },
            );
        }
    }

    /// Closes the folds older than `FOLD`: one line each with the count of the events folded
    /// (none if there were none).
    pub fn close_folds(&mut self, all: bool) {
        let due: Vec<FoldKey> = self
            .folds
            .iter()
            .filter(|(_, f)| all || f.opened.elapsed() >= FOLD)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let Some(fold) = self.folds.remove(&key) else {
                continue;
            };
            if fold.count == 0 {
                continue;
            }
            let mut line = fold.first;
            let start = line["@timestamp"].clone();
            line["@timestamp"] = json!(timestamp(i128::from(fold.last_ns) + self.wall_offset_ns));
            line["event"]["count"] = json!(fold.count);
            line["event"]["start"] = start;
            line["event"]["end"] = line["@timestamp"].clone();
            self.write(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_a_directory_is_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("enf-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        for path in [fifo.clone(), dir.clone()] {
            let error = EventLog::open(&path, "eth0").err().expect("refused");
            assert!(
                error.to_string().contains(&path.display().to_string()),
                "{error}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "it never blocks"
        );
        let file = dir.join("events.jsonl");
        assert!(EventLog::open(&file, "eth0").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            timestamp(1_796_515_574_648_551_300),
            "2026-12-06T00:06:14.648Z"
        );
    }
}
