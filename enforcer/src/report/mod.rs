//! The compliance report (`enforcer report`): for one host, which of the advisory's controls are
//! in force, with the evidence — the registry in force (approved networks by ministry, devices,
//! deny lists and feeds, approved VPN endpoints with their approval and expiry, upstreams), the
//! entries expiring within 30 days, the expired ones removed (audit log), the outgoing control,
//! the drops by reason (counters, and over time from the daemon's history), the unapproved VPN
//! attempts by protocol (and by source, from the event log), the time since the last change,
//! and whether the audit log's chain holds. Gathered here as one serialisable value; `html` and
//! `md` render it.

mod html;
mod md;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use enforcer_common::{Action, Reason};
use serde::Serialize;
use serde_json::Value;

use crate::{
    control::{AuditLog, verify_audit},
    datapath::InstanceCounters,
    events::timestamp,
    instance::{InstanceId, State},
    registry::{Date, EgressMode, Mode, Registry},
};

pub use html::html;
pub use md::markdown;

/// One control of the advisory and whether it is in force.
#[derive(Clone, Debug, Serialize)]
pub struct Control {
    pub control: &'static str,
    /// `in force`, `monitored only` or `not in force`.
    pub status: &'static str,
    pub evidence: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub name: String,
    pub prefix: String,
    pub ministry: Option<String>,
    pub ports: Option<Vec<String>>,
    pub expires: Option<String>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VpnApproval {
    pub name: String,
    pub endpoint: String,
    pub protocol: &'static str,
    pub approval: String,
    pub expires: Option<String>,
}

/// Drops (and would-drops) over time: one point per history sample in the window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    /// Unix seconds of each point.
    pub times: Vec<u64>,
    /// reason → packets in each interval ending at the point.
    pub drops: BTreeMap<String, Vec<u64>>,
    /// protocol → unapproved VPN packets in each interval.
    pub vpn_unapproved: BTreeMap<String, Vec<u64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub generated: String,
    pub host: String,
    pub instance: String,
    pub iface: String,
    pub registry: String,
    pub registry_serial: u64,
    /// For a fleet agent: the fleet (its etcd endpoints and this host's name); the registry is
    /// then its cache of the fleet's, and the serial the fleet's revision in force.
    pub fleet: Option<crate::instance::FleetOf>,
    pub mode: String,
    pub egress: String,
    pub controls: Vec<Control>,
    pub networks_by_ministry: BTreeMap<String, Vec<Entry>>,
    pub devices: Vec<Entry>,
    pub deny: Vec<Entry>,
    pub deny_feeds: Vec<(String, usize)>,
    pub vpn_endpoints: Vec<VpnApproval>,
    pub upstreams: Vec<Entry>,
    pub expiring_within_30_days: Vec<String>,
    pub expired_removed: Vec<Value>,
    /// (reason, direction, packets) of the drops (and would-drops) since the maps were made.
    pub drops: Vec<(String, &'static str, u64)>,
    pub vpn_unapproved_by_protocol: Vec<(String, u64)>,
    /// (protocol, source, packets) from the event log within the window, if there is one.
    pub vpn_unapproved_by_source: Vec<(String, String, u64)>,
    pub over_time: Series,
    pub last_change: Option<String>,
    pub seconds_since_last_change: Option<u64>,
    pub audit: String,
    /// The window the report covers for what changes over time (seconds).
    pub since_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn entry(
    name: &str,
    prefix: String,
    ministry: Option<&str>,
    ports: Option<&[crate::registry::PortSpec]>,
    expires: Option<Date>,
    note: Option<&str>,
) -> Entry {
    Entry {
        name: name.to_string(),
        prefix,
        ministry: ministry.map(str::to_string),
        ports: ports.map(|p| p.iter().map(ToString::to_string).collect()),
        expires: expires.map(|d| d.to_string()),
        note: note.map(str::to_string),
    }
}

impl Report {
    /// The report of the running instance `state`, covering the last `since_seconds`.
    pub fn gather(state: &State, since_seconds: u64) -> Result<Self, ReportError> {
        let id = InstanceId::parse(&state.instance).unwrap_or(InstanceId {
            iface: state.iface.clone(),
            netns: state.netns,
        });
        let registry_path = PathBuf::from(&state.registry);
        let registry = Registry::load(&registry_path)?;
        let labels = State::read_rules(&id.state_file());
        let indices: Vec<u32> = labels.iter().map(|r| r.index).collect();
        let counters = InstanceCounters::read_pinned(&id.pin_dir(), &indices)?;
        let today = Date::today();
        let soon = today.plus_days(29);

        let mut networks_by_ministry: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        let mut expiring = Vec::new();
        let mut note_expiry = |what: &str, name: &str, expires: Option<Date>| {
            if let Some(date) = expires
                && date >= today
                && date <= soon
            {
                expiring.push(format!("{what} \"{name}\" expires {date}"));
            }
        };
        for n in &registry.networks {
            note_expiry("network", &n.name, n.expires);
            networks_by_ministry
                .entry(n.ministry.as_deref().unwrap_or("(no ministry)").to_string())
                .or_default()
                .push(entry(
                    &n.name,
                    n.cidr.to_string(),
                    n.ministry.as_deref(),
                    n.ports.as_deref(),
                    n.expires,
                    n.note.as_deref(),
                ));
        }
        let devices = registry
            .devices
            .iter()
            .map(|d| {
                note_expiry("device", &d.name, d.expires);
                entry(
                    &d.name,
                    d.address.to_string(),
                    d.owner.as_deref(),
                    d.ports.as_deref(),
                    d.expires,
                    d.note.as_deref(),
                )
            })
            .collect();
        let deny = registry
            .deny
            .iter()
            .map(|d| {
                let name = d.name.clone().unwrap_or_else(|| d.cidr.to_string());
                note_expiry("deny range", &name, d.expires);
                entry(
                    &name,
                    d.cidr.to_string(),
                    None,
                    None,
                    d.expires,
                    d.note.as_deref(),
                )
            })
            .collect();
        let vpn_endpoints = registry
            .vpn_endpoints
            .iter()
            .map(|v| {
                note_expiry("VPN approval", &v.name, v.expires);
                VpnApproval {
                    name: v.name.clone(),
                    endpoint: v.address.to_string(),
                    protocol: v.protocol.name(),
                    approval: v.approval.clone(),
                    expires: v.expires.map(|d| d.to_string()),
                }
            })
            .collect();
        let upstreams = registry
            .upstreams
            .iter()
            .map(|u| {
                note_expiry("upstream", &u.name, u.expires);
                entry(
                    &u.name,
                    u.prefix.to_string(),
                    u.ministry.as_deref(),
                    Some(&u.ports),
                    u.expires,
                    u.note.as_deref(),
                )
            })
            .collect();
        let deny_feeds = registry
            .feeds
            .iter()
            .map(|f| (f.path.clone(), f.entries.len()))
            .collect();

        // The audit log: expiries, the last change, and whether its chain holds.
        let audit_path = AuditLog::beside(&registry_path);
        let records: Vec<Value> = std::fs::read_to_string(&audit_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let expired_removed = records
            .iter()
            .filter(|r| r["verb"] == "expire")
            .cloned()
            .collect();
        let last_change = records
            .last()
            .and_then(|r| r["time"].as_str())
            .map(str::to_string);
        let seconds_since_last_change = last_change
            .as_deref()
            .and_then(unix_seconds)
            .map(|t| now().saturating_sub(t));
        let audit = match verify_audit(&audit_path) {
            Ok(v) => format!(
                "chain intact: {} records, the last at registry serial {}",
                v.records,
                v.last_serial.map_or_else(|| "?".into(), |s| s.to_string())
            ),
            Err(e) if records.is_empty() => format!("no changes recorded yet ({e})"),
            Err(e) => format!("BROKEN: {e}"),
        };

        let mut drops = Vec::new();
        let mut directions = vec![("ingress", &counters.verdicts)];
        if let Some((egress, _)) = &counters.egress {
            directions.push(("egress", egress));
        }
        for (direction, counts) in directions {
            for ((reason, done), (_, would)) in counts.enforced.iter().zip(&counts.monitored) {
                if reason.action() == Action::Drop {
                    if done.packets > 0 {
                        drops.push((reason.label().to_string(), direction, done.packets));
                    }
                    if would.packets > 0 {
                        drops.push((
                            format!("{} (would drop)", reason.label()),
                            direction,
                            would.packets,
                        ));
                    }
                }
            }
        }
        let vpn_unapproved_by_protocol = counters
            .vpn
            .0
            .iter()
            .filter(|(_, u, _)| u.packets > 0)
            .map(|(p, u, _)| (p.name().to_string(), u.packets))
            .collect();
        let cutoff = now().saturating_sub(since_seconds);
        let vpn_unapproved_by_source = state
            .events
            .as_deref()
            .map(|path| vpn_sources(Path::new(path), cutoff))
            .unwrap_or_default();
        let over_time = series(&id.state_file(), cutoff);

        let mode = registry.mode;
        let enforce = |on: bool| if on { "in force" } else { "monitored only" };
        let ingress_on = mode == Mode::Enforce;
        let egress_on = registry.egress == EgressMode::Enforce;
        let networks: usize = registry.networks.len();
        let controls = vec![
            Control {
                control: "Incoming traffic controlled by a firewall (IP allowlisting)",
                status: enforce(ingress_on),
                evidence: format!(
                    "ingress mode {mode}: only {networks} approved networks and {} pre-approved devices are let in",
                    registry.devices.len()
                ),
            },
            Control {
                control: "Outgoing traffic controlled",
                status: match registry.egress {
                    EgressMode::Enforce => "in force",
                    EgressMode::Monitor => "monitored only",
                    EgressMode::Off => "not in force",
                },
                evidence: format!(
                    "egress mode {}: the server reaches approved networks and {} upstreams on their ports",
                    registry.egress,
                    registry.upstreams.len()
                ),
            },
            Control {
                control: "Separated from the public internet",
                status: if ingress_on && egress_on {
                    "in force"
                } else if ingress_on || egress_on {
                    "monitored only"
                } else {
                    "not in force"
                },
                evidence: format!(
                    "an unlisted address connecting in: {}; the server reaching one: {}",
                    if ingress_on {
                        "dropped"
                    } else {
                        "counted, not dropped"
                    },
                    match registry.egress {
                        EgressMode::Enforce => "dropped",
                        EgressMode::Monitor => "counted, not dropped",
                        EgressMode::Off => "not checked",
                    }
                ),
            },
            Control {
                control: "No VPN unless approved by the national IT board",
                status: enforce(ingress_on),
                evidence: format!(
                    "{} approved VPN endpoints, each with its approval reference; VPN packets to or from any other endpoint drop in both directions",
                    registry.vpn_endpoints.len()
                ),
            },
            Control {
                control: "Known-bad ranges denied",
                status: if registry.deny.is_empty() && registry.feeds.is_empty() {
                    "not in force"
                } else {
                    enforce(ingress_on)
                },
                evidence: format!(
                    "{} deny entries and {} deny feeds",
                    registry.deny.len(),
                    registry.feeds.len()
                ),
            },
            Control {
                control: "Changes audited",
                status: if audit.starts_with("BROKEN") {
                    "not in force"
                } else {
                    "in force"
                },
                evidence: audit.clone(),
            },
        ];
        Ok(Self {
            generated: timestamp(i128::from(now()) * 1_000_000_000),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or_else(|_| String::new(), |h| h.trim().to_string()),
            instance: state.instance.clone(),
            iface: state.iface.clone(),
            registry: state.registry.clone(),
            registry_serial: registry.serial,
            fleet: state.fleet.clone(),
            mode: mode.to_string(),
            egress: registry.egress.to_string(),
            controls,
            networks_by_ministry,
            devices,
            deny,
            deny_feeds,
            vpn_endpoints,
            upstreams,
            expiring_within_30_days: expiring,
            expired_removed,
            drops,
            vpn_unapproved_by_protocol,
            vpn_unapproved_by_source,
            over_time,
            last_change,
            seconds_since_last_change,
            audit,
            since_seconds,
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (the audit log's times) as Unix seconds.
fn unix_seconds(time: &str) -> Option<u64> {
    let date = Date::parse(time.get(..10)?).ok()?;
    let clock: Vec<u64> = time
        .get(11..19)?
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let days = u64::try_from(date.days_since_epoch()).ok()?;
    Some(days * 86_400 + clock.first()? * 3600 + clock.get(1)? * 60 + clock.get(2)?)
}

/// Unapproved VPN attempts by protocol and source in the event log since `cutoff`.
fn vpn_sources(path: &Path, cutoff: u64) -> Vec<(String, String, u64)> {
    let cutoff = timestamp(i128::from(cutoff) * 1_000_000_000);
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event["event"]["action"] != "unapproved_vpn"
            || event["@timestamp"]
                .as_str()
                .is_none_or(|t| t < cutoff.as_str())
        {
            continue;
        }
        let protocol = event["labels"]["vpn_protocol"].as_str().unwrap_or("?");
        let remote = if event["network"]["direction"] == "egress" {
            &event["destination"]["ip"]
        } else {
            &event["source"]["ip"]
        };
        *counts
            .entry((
                protocol.to_string(),
                remote.as_str().unwrap_or("?").to_string(),
            ))
            .or_default() += event["event"]["count"].as_u64().unwrap_or(1);
    }
    let mut out: Vec<_> = counts.into_iter().map(|((p, s), n)| (p, s, n)).collect();
    out.sort_by_key(|(_, _, n)| std::cmp::Reverse(*n));
    out.truncate(50);
    out
}

/// Drops per reason and unapproved VPN packets per protocol in each interval of the history
/// since `cutoff` (differences of the cumulative samples).
fn series(state_file: &Path, cutoff: u64) -> Series {
    let path = state_file.with_file_name(crate::daemon::history::HISTORY_FILE);
    let samples: Vec<Value> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|s: &Value| s["time"].as_u64().is_some_and(|t| t >= cutoff))
        .collect();
    let mut series = Series::default();
    let drop_labels: Vec<&str> = Reason::ALL
        .iter()
        .filter(|r| r.action() == Action::Drop)
        .map(|r| r.label())
        .collect();
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        series.times.push(b["time"].as_u64().unwrap_or(0));
        let at = series.times.len() - 1;
        let delta = |v: &Value, w: &Value| {
            w.as_u64()
                .unwrap_or(0)
                .saturating_sub(v.as_u64().unwrap_or(0))
        };
        for direction in ["ingress", "egress"] {
            for label in &drop_labels {
                let n = delta(&a[direction][*label], &b[direction][*label]);
                let key = format!("{label} ({direction})");
                if n > 0 || series.drops.contains_key(&key) {
                    let row = series.drops.entry(key).or_insert_with(|| vec![0; at]);
                    row.resize(at, 0);
                    row.push(n);
                }
            }
        }
        if let Some(protocols) = b["vpn_unapproved"].as_object() {
            for (protocol, _) in protocols {
                let n = delta(
                    &a["vpn_unapproved"][protocol],
                    &b["vpn_unapproved"][protocol],
                );
                let row = series
                    .vpn_unapproved
                    .entry(protocol.clone())
                    .or_insert_with(|| vec![0; at]);
                row.resize(at, 0);
                row.push(n);
            }
        }
    }
    let points = series.times.len();
    for row in series
        .drops
        .values_mut()
        .chain(series.vpn_unapproved.values_mut())
    {
        row.resize(points, 0);
    }
    series
}
