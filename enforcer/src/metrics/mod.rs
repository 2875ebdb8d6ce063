//! The Prometheus endpoint (`enforcer run --metrics ADDR:PORT`): what the controller knows of the
//! policy in force (`Facts`, which the daemon publishes after every change) and what the kernel
//! counted (read from the pinned maps at each scrape), in the exposition format of the
//! Prometheus project's own Rust client. The HTTP side is `http`.
//!
//! Per-rule series stay bounded: the named entries (networks, devices, deny entries, VPN
//! endpoints, upstreams) each have their series up to `RULE_SERIES` of them, in rule-number
//! order; those beyond are summed per kind (`rule="(more)"`), and the ranges of a deny feed are
//! summed per feed file. A registry of a million feed ranges and a few thousand named entries
//! gives a few thousand series.

mod http;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use enforcer_common::{
    Counter as KernelCounter, MAX_CONNS, MAX_PORT_RULES, MAX_RULES, MAX_UPSTREAM_GROUPS,
    MAX_VPN_GROUPS, Reason,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

pub use http::serve;

use crate::{
    datapath::{DatapathError, InstanceCounters, VerdictCounts},
    instance::{RuleLabel, State},
    policy::{Policy, RuleKind},
    registry::{Date, EgressMode, Mode},
};

/// Named entries with series of their own; the rest are summed per kind.
pub const RULE_SERIES: usize = 10_000;

/// What the controller knows of the policy in force, as the daemon last published it.
#[derive(Clone, Debug)]
pub struct Facts {
    pub mode: Mode,
    pub egress: EgressMode,
    pub xdp_mode: String,
    /// The program holds the interface.
    pub enforcing: bool,
    pub serial: u64,
    /// When the last change was applied (or the policy put in force at start), Unix seconds.
    pub last_change_unix: f64,
    /// Entries in force by kind.
    pub entries: Vec<(RuleKind, usize)>,
    /// (map, entries, capacity) of the maps that fill with the registry.
    pub maps: Vec<(&'static str, usize, usize)>,
    pub expiring_30_days: usize,
}

impl Facts {
    /// The facts of `policy` in force with registry serial `serial`.
    pub fn of(policy: &Policy, serial: u64, xdp_mode: &str, enforcing: bool) -> Self {
        let kinds = [
            RuleKind::Network,
            RuleKind::Device,
            RuleKind::Deny,
            RuleKind::DenyFeed,
            RuleKind::VpnEndpoint,
            RuleKind::Upstream,
        ];
        Self {
            mode: policy.mode,
            egress: policy.egress,
            xdp_mode: xdp_mode.to_string(),
            enforcing,
            serial,
            last_change_unix: now_unix(),
            entries: kinds.map(|k| (k, policy.count(k))).to_vec(),
            maps: vec![
                ("RULES", policy.rules.len(), MAX_RULES as usize),
                (
                    "PORT_RULES",
                    policy.port_keys.len(),
                    MAX_PORT_RULES as usize,
                ),
                (
                    "VPN_GROUPS",
                    policy.vpn_groups.len(),
                    MAX_VPN_GROUPS as usize,
                ),
                (
                    "UPSTREAM_GROUPS",
                    policy.upstream_groups.len(),
                    MAX_UPSTREAM_GROUPS as usize,
                ),
            ],
            expiring_30_days: policy.expiring_within(Date::today(), 30),
        }
    }
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What the scrapes read: the published facts, the connections last counted, and where the
/// kernel's counters and the rule labels are.
pub struct Shared {
    pub facts: Mutex<Facts>,
    /// Connections in the table at the last sweep.
    pub connections: Mutex<Option<usize>>,
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
}

impl Shared {
    pub fn new(facts: Facts, pin_dir: PathBuf, state_file: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            facts: Mutex::new(facts),
            connections: Mutex::new(None),
            pin_dir,
            state_file,
        })
    }

    /// Publishes the facts after a change; keeps the time of the last change unless `changed`.
    pub fn publish(&self, mut facts: Facts, changed: bool) {
        let mut current = self
            .facts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !changed {
            facts.last_change_unix = current.last_change_unix;
        }
        *current = facts;
    }

    pub fn set_connections(&self, count: usize) {
        *self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(count);
    }

    /// The exposition text of one scrape.
    pub fn render(&self) -> Result<String, DatapathError> {
        let facts = self
            .facts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let connections = *self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let labels = State::read_rules(&self.state_file);
        let indices: Vec<u32> = labels.iter().map(|r| r.index).collect();
        let counters = InstanceCounters::read_pinned(&self.pin_dir, &indices)?;
        Ok(exposition(&facts, connections, &labels, &counters))
    }
}

type Labels = Vec<(&'static str, String)>;

/// The Prometheus text of the facts and the kernel's counters.
fn exposition(
    facts: &Facts,
    connections: Option<usize>,
    rules: &[RuleLabel],
    counters: &InstanceCounters,
) -> String {
    let mut registry = Registry::with_prefix("enforcer");
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let monitored = Family::<Labels, Counter>::default();
    let mut directions = vec![("ingress", &counters.verdicts)];
    if let Some((egress, _)) = &counters.egress {
        directions.push(("egress", egress));
    }
    for (direction, counts) in directions {
        add_verdicts(direction, counts, [&packets, &bytes, &monitored]);
    }
    registry.register(
        "packets",
        "Packets by direction and the reason of their verdict, as carried out",
        packets,
    );
    registry.register_with_unit(
        "traffic",
        "Bytes by direction and the reason of their verdict, as carried out",
        Unit::Bytes,
        bytes,
    );
    registry.register(
        "monitored_packets",
        "Packets monitor mode let through that enforce mode would have dropped, by reason",
        monitored,
    );

    let hits = Family::<Labels, Counter>::default();
    add_rule_hits(rules, &counters.hits, "ingress", &hits);
    if let Some((_, egress_hits)) = &counters.egress {
        add_rule_hits(rules, egress_hits, "egress", &hits);
    }
    registry.register(
        "rule_hits",
        "Packets each registry entry decided, by direction (feed ranges summed per feed file)",
        hits,
    );

    let vpn = Family::<Labels, Counter>::default();
    for (protocol, unapproved, approved) in &counters.vpn.0 {
        for (verdict, counter) in [("unapproved", unapproved), ("approved", approved)] {
            vpn.get_or_create(&vec![
                ("protocol", protocol.name().to_string()),
                ("verdict", verdict.to_string()),
            ])
            .inc_by(counter.packets);
        }
    }
    registry.register(
        "vpn_packets",
        "VPN packets by protocol and whether their endpoint was approved",
        vpn,
    );
    if let Some(suppressed) = counters.events_suppressed {
        let counter = Counter::<u64>::default();
        counter.inc_by(suppressed);
        registry.register(
            "events_suppressed",
            "Events the kernel did not raise (rate limits, a full ring); the verdict counters count every packet",
            counter,
        );
    }

    let entries = Family::<Labels, Gauge>::default();
    for (kind, count) in &facts.entries {
        entries
            .get_or_create(&vec![("kind", kind.as_str().to_string())])
            .set(gauge(*count));
    }
    registry.register("entries", "Registry entries in force, by kind", entries);

    let map_entries = Family::<Labels, Gauge>::default();
    let map_capacity = Family::<Labels, Gauge>::default();
    let mut maps = facts.maps.clone();
    if let Some(count) = connections {
        maps.push(("CONNS", count, MAX_CONNS as usize));
    }
    for (map, count, capacity) in maps {
        let labels = vec![("map", map.to_string())];
        map_entries.get_or_create(&labels).set(gauge(count));
        map_capacity.get_or_create(&labels).set(gauge(capacity));
    }
    registry.register(
        "map_entries",
        "Entries in each kernel map that fills with the registry (CONNS: connections tracked at the last sweep)",
        map_entries,
    );
    registry.register(
        "map_capacity",
        "Entries each kernel map holds at most",
        map_capacity,
    );

    let info = |name: &str, help: &str, labels: Labels, registry: &mut Registry| {
        let family = Family::<Labels, Gauge>::default();
        family.get_or_create(&labels).set(1);
        registry.register(name, help, family);
    };
    info(
        "xdp_attach_mode",
        "How the XDP program is attached (1 for the mode in force)",
        vec![("mode", facts.xdp_mode.clone())],
        &mut registry,
    );
    info(
        "mode",
        "The mode in force, by direction (1 for the mode in force)",
        vec![
            ("direction", "ingress".into()),
            ("mode", facts.mode.to_string()),
        ],
        &mut registry,
    );
    info(
        "egress_mode",
        "The egress mode in force (1 for the mode in force)",
        vec![("mode", facts.egress.to_string())],
        &mut registry,
    );
    let scalar = |name: &str, help: &str, value: i64, registry: &mut Registry| {
        let g = Gauge::<i64>::default();
        g.set(value);
        registry.register(name, help, g);
    };
    scalar(
        "enforcing",
        "1 while the program holds the interface, 0 while the interface is gone",
        i64::from(facts.enforcing),
        &mut registry,
    );
    scalar(
        "registry_serial",
        "The registry's change counter (serial) in force",
        i64::try_from(facts.serial).unwrap_or(i64::MAX),
        &mut registry,
    );
    scalar(
        "entries_expiring_30_days",
        "Entries in force whose expiry date falls within the next 30 days (today included)",
        gauge(facts.expiring_30_days),
        &mut registry,
    );
    let last_change = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    last_change.set(facts.last_change_unix);
    registry.register_with_unit(
        "last_change_timestamp",
        "When the last change was applied (or the policy put in force at start), Unix time",
        Unit::Seconds,
        last_change,
    );

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Packets and bytes by reason (and would-drops) of one direction.
fn add_verdicts(
    direction: &str,
    counts: &VerdictCounts,
    [packets, bytes, monitored]: [&Family<Labels, Counter>; 3],
) {
    let labels = |reason: Reason| -> Labels {
        let action = match reason.action() {
            enforcer_common::Action::Pass => "pass",
            enforcer_common::Action::Drop => "drop",
        };
        vec![
            ("direction", direction.to_string()),
            ("reason", reason.label().to_string()),
            ("action", action.to_string()),
        ]
    };
    let add = |family: &Family<Labels, Counter>, labels: &Labels, value: u64| {
        family.get_or_create(labels).inc_by(value);
    };
    for ((reason, done), (_, would)) in counts.enforced.iter().zip(&counts.monitored) {
        let KernelCounter {
            packets: p,
            bytes: b,
        } = *done;
        add(packets, &labels(*reason), p);
        add(bytes, &labels(*reason), b);
        if reason.action() == enforcer_common::Action::Drop {
            let labels = vec![
                ("direction", direction.to_string()),
                ("reason", reason.label().to_string()),
            ];
            add(monitored, &labels, would.packets);
        }
    }
}

/// Hits per rule of one direction, bounded as the module says.
fn add_rule_hits(
    rules: &[RuleLabel],
    hits: &[u64],
    direction: &str,
    family: &Family<Labels, Counter>,
) {
    let mut named = 0usize;
    for (rule, hits) in rules.iter().zip(hits) {
        let feed = rule.kind == RuleKind::DenyFeed.as_str();
        let name = if feed {
            // `FILE:LINE`: summed per file.
            rule.name
                .rsplit_once(':')
                .map_or(rule.name.as_str(), |(file, _)| file)
                .to_string()
        } else if named < RULE_SERIES {
            named += 1;
            rule.name.clone()
        } else {
            "(more)".to_string()
        };
        let labels = vec![
            ("direction", direction.to_string()),
            ("rule", name),
            ("kind", rule.kind.clone()),
            ("ministry", rule.ministry.clone().unwrap_or_default()),
        ];
        family.get_or_create(&labels).inc_by(*hits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_follow_prometheus_conventions() {
        let policy = Policy::empty();
        let facts = Facts::of(&policy, 7, "native", true);
        let counts = VerdictCounts {
            enforced: Reason::ALL
                .iter()
                .map(|r| {
                    (
                        *r,
                        KernelCounter {
                            packets: *r as u64,
                            bytes: 100,
                        },
                    )
                })
                .collect(),
            monitored: Reason::ALL
                .iter()
                .map(|r| (*r, KernelCounter::default()))
                .collect(),
        };
        let counters = InstanceCounters {
            verdicts: counts.clone(),
            hits: vec![3, 4, 5],
            vpn: crate::datapath::VpnCounts::default(),
            egress: Some((counts, vec![0, 1, 2])),
            events_suppressed: Some(42),
        };
        let rules = [
            ("n1", "network", Some("MoITT")),
            ("feeds/a.txt:3", "feed", None),
            ("feeds/a.txt:9", "feed", None),
        ]
        .map(|(name, kind, ministry)| RuleLabel {
            index: 0,
            kind: kind.into(),
            name: name.into(),
            prefix: "192.0.2.0/24".into(),
            ministry: ministry.map(Into::into),
        });
        let text = exposition(&facts, Some(12), &rules, &counters);
        for line in [
            "enforcer_packets_total{direction=\"ingress\",reason=\"not_allowlisted\",action=\"drop\"} 4",
            "enforcer_packets_total{direction=\"egress\",reason=\"egress_denied\",action=\"drop\"} 12",
            "enforcer_traffic_bytes_total{direction=\"ingress\",reason=\"allowed\",action=\"pass\"} 100",
            "enforcer_rule_hits_total{direction=\"ingress\",rule=\"n1\",kind=\"network\",ministry=\"MoITT\"} 3",
            "enforcer_rule_hits_total{direction=\"ingress\",rule=\"feeds/a.txt\",kind=\"feed\",ministry=\"\"} 9",
            "enforcer_map_entries{map=\"CONNS\"} 12",
            "enforcer_registry_serial 7",
            "enforcer_events_suppressed_total 42",
            "enforcer_xdp_attach_mode{mode=\"native\"} 1",
            "enforcer_egress_mode{mode=\"off\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line} in:\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE enforcer_last_change_timestamp_seconds gauge"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
