//! What the verbs that need no running controller print (`validate`, `check --registry`,
//! `stats`, `detach`), and what `run` prints when it starts and stops.

use std::{io::Write as _, net::IpAddr, path::Path, process::ExitCode};

use anyhow::Context as _;
use enforcer_common::{Action, Reason, VpnProtocol};

use crate::{
    control,
    daemon::{self, DaemonConfig},
    datapath::{InstanceCounters, VerdictCounts},
    instance::{self, InstanceId, State},
    policy::{Policy, RuleKind},
    registry::{Date, EgressMode, Mode, Protocol, Registry},
};

pub fn run(config: &DaemonConfig) -> anyhow::Result<ExitCode> {
    let stopped = daemon::run(config)?;
    // Not `println!`: the daemon ignores SIGPIPE, and a closed output is no error of the run.
    let _ = writeln!(std::io::stdout(), "{}", render_verdicts(&stopped.counts));
    Ok(ExitCode::SUCCESS)
}

pub fn audit_verify(registry: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let log = control::AuditLog::beside(registry);
    let verified = control::verify_audit(&log);
    // The registry's serial: the last audited change must be it (a removed last record is not
    // in the chain to tell).
    let serial = Registry::load(registry).ok().map(|r| r.serial);
    let outcome = match &verified {
        Ok(v) if serial.is_some_and(|s| s > v.last_serial.unwrap_or(0)) => Err(format!(
            "{}: the registry's serial is {} but the last audited change is serial {}: records are missing at the end",
            log.display(),
            serial.unwrap_or(0),
            v.last_serial.unwrap_or(0)
        )),
        Ok(v) => Ok(format!(
            "{}: {} records, the chain is whole{}",
            log.display(),
            v.records,
            if v.unchained > 0 {
                format!(" ({} records at the start predate the chain)", v.unchained)
            } else {
                String::new()
            }
        )),
        Err(e) => Err(e.to_string()),
    };
    if json {
        let out = match &outcome {
            Ok(message) => serde_json::json!({"valid": true, "message": message}),
            Err(message) => serde_json::json!({"valid": false, "message": message}),
        };
        println!("{out:#}");
    } else {
        match &outcome {
            Ok(message) => println!("{message}"),
            Err(message) => eprintln!("{message}"),
        }
    }
    Ok(if outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn detach(instance: Option<&str>, iface: Option<&str>) -> anyhow::Result<ExitCode> {
    let detached = daemon::detach(instance, iface)?;
    println!(
        "{}: {}",
        detached.instance,
        if detached.had_link {
            "program detached, pins and state removed; traffic is unfiltered"
        } else {
            "no program was attached; pins and state removed"
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn validate(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    match Registry::load(file) {
        Ok(registry) => {
            let policy = Policy::from_registry(registry, Date::today(), None)?;
            if json {
                let out = serde_json::json!({
                    "valid": true,
                    "mode": policy.mode,
                    "networks": policy.count(RuleKind::Network),
                    "devices": policy.count(RuleKind::Device),
                    "deny": policy.count(RuleKind::Deny),
                    "vpn_endpoints": policy.vpn_endpoints,
                    "expired": policy.expired,
                });
                println!("{out:#}");
            } else {
                println!("{}: valid (mode {})", file.display(), policy.mode);
                println!("{}", summary(&policy));
                for e in &policy.expired {
                    println!(
                        "  expired, not loaded: {} \"{}\" (expired {})",
                        e.section, e.name, e.expired
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            if json {
                let problems: Vec<_> = error
                    .problems()
                    .iter()
                    .map(|p| serde_json::json!({"line": p.line, "column": p.column, "place": p.place, "message": p.message}))
                    .collect();
                println!(
                    "{:#}",
                    serde_json::json!({"valid": false, "error": error.to_string(), "problems": problems})
                );
            } else {
                eprintln!("{error}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn summary(policy: &Policy) -> String {
    format!(
        "  {} networks, {} devices, {} deny ranges, {} deny-feed ranges, {} approved VPN endpoints, {} upstreams in force (egress {}); {} expired entries skipped",
        policy.count(RuleKind::Network),
        policy.count(RuleKind::Device),
        policy.count(RuleKind::Deny),
        policy.count(RuleKind::DenyFeed),
        policy.vpn_endpoints,
        policy.count(RuleKind::Upstream),
        policy.egress,
        policy.expired.len()
    )
}

/// The packet `check` asks about.
pub struct Packet {
    /// Its source, or (`outgoing`) its destination.
    pub addr: IpAddr,
    /// Sent by the server (the egress verdict).
    pub outgoing: bool,
    pub port: Option<u16>,
    pub proto: Protocol,
    pub vpn: Option<VpnProtocol>,
}

pub fn check(packet: &Packet, registry: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let &Packet {
        addr,
        outgoing,
        port,
        proto,
        vpn,
    } = packet;
    let policy = Policy::from_registry(Registry::load(registry)?, Date::today(), None)?;
    let decision = if outgoing {
        policy.decide_egress(addr, proto, port, vpn)
    } else {
        policy.decide(addr, proto, port, vpn)
    };
    let monitored = if outgoing {
        policy.egress != EgressMode::Enforce
    } else {
        policy.mode == Mode::Monitor
    };
    if json {
        let out = serde_json::json!({
            "address": addr,
            "direction": if outgoing { "egress" } else { "ingress" },
            "vpn": vpn.map(VpnProtocol::name),
            "protocol": proto,
            "port": port,
            "verdict": if decision.reason.action() == Action::Pass { "pass" } else { "drop" },
            "reason": decision.reason.label(),
            "rule": decision.rule,
            "mode": if outgoing { policy.egress.as_str() } else { policy.mode.as_str() },
        });
        println!("{out:#}");
    } else {
        let what = match vpn {
            Some(vpn) => format!("{} VPN packet to/from {addr}", vpn.name()),
            None if outgoing => format!("to {addr} {proto}"),
            None => format!("{addr} {proto}"),
        };
        println!(
            "{what}{}: {decision}",
            port.map(|p| format!("/{p}")).unwrap_or_default()
        );
        if let Some(info) = decision.rule.and_then(|r| r.vpn.as_ref()) {
            let expires = info
                .expires
                .map_or_else(|| "no expiry".to_string(), |d| format!("expires {d}"));
            println!("  approval {} ({expires})", info.approval);
        }
        if monitored && decision.reason.action() == Action::Drop {
            let mode = if outgoing {
                format!("egress mode is {}", policy.egress)
            } else {
                "registry mode is monitor".to_string()
            };
            println!(
                "  ({mode}: the packet would pass{})",
                if policy.egress == EgressMode::Off && outgoing {
                    ", uncounted"
                } else {
                    " and be counted as a would-be drop"
                }
            );
        }
        if port.is_none()
            && matches!(proto, Protocol::Tcp | Protocol::Udp)
            && decision.reason == Reason::PortNotAllowed
        {
            println!("  (no --port given; the rule allows only the ports listed)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stats(
    instance_name: Option<&str>,
    iface: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let state = instance::select(instance_name, iface)?;
    let id = InstanceId::parse(&state.instance).context("malformed instance name in state file")?;
    let rules = State::read_rules(&id.state_file());
    let indices: Vec<u32> = rules.iter().map(|r| r.index).collect();
    let InstanceCounters {
        verdicts: counts,
        hits,
        vpn,
        egress,
        events_suppressed,
    } = InstanceCounters::read_pinned(&id.pin_dir(), &indices)?;
    let (egress_counts, egress_hits) = egress.unwrap_or_default();
    let egress_hit = |at: usize| egress_hits.get(at).copied().unwrap_or(0);
    if json {
        let by_vpn: Vec<_> = vpn
            .0
            .iter()
            .map(|(p, u, a)| {
                serde_json::json!({"protocol": p.name(), "unapproved_packets": u.packets, "unapproved_bytes": u.bytes,
                    "approved_packets": a.packets, "approved_bytes": a.bytes})
            })
            .collect();
        let by_reason = |counts: &VerdictCounts| -> Vec<serde_json::Value> {
            counts
                .enforced
                .iter()
                .zip(&counts.monitored)
                .map(|((reason, c), (_, m))| {
                    serde_json::json!({
                        "reason": reason.label(), "code": *reason as u32,
                        "action": if reason.action() == Action::Pass { "pass" } else { "drop" },
                        "packets": c.packets, "bytes": c.bytes,
                        "would_drop_packets": m.packets, "would_drop_bytes": m.bytes,
                    })
                })
                .collect()
        };
        let by_rule: Vec<_> = rules
            .iter()
            .zip(&hits)
            .enumerate()
            .map(|(at, (r, h))| serde_json::json!({"index": r.index, "kind": r.kind, "name": r.name, "prefix": r.prefix, "ministry": r.ministry,
                "packets": h, "egress_packets": egress_hit(at)}))
            .collect();
        // `reasons` and `packets`: incoming (as before egress verdicts); `egress`: outgoing.
        let out = serde_json::json!({
            "instance": state.instance, "iface": state.iface, "mode": state.mode, "xdp_mode": state.xdp_mode,
            "program_id": state.program_id, "pid": state.pid, "registry": state.registry,
            "reasons": by_reason(&counts), "rules": by_rule, "vpn": by_vpn,
            "egress": {"mode": state.egress, "reasons": by_reason(&egress_counts)},
            "events_suppressed": events_suppressed,
        });
        println!("{out:#}");
    } else {
        println!(
            "instance {} on {} ({} mode, {} XDP, pid {})",
            state.instance, state.iface, state.mode, state.xdp_mode, state.pid
        );
        println!("incoming\n{}", render_verdicts(&counts));
        println!(
            "outgoing (egress {})\n{}",
            if state.egress.is_empty() {
                "unknown"
            } else {
                &state.egress
            },
            render_verdicts(&egress_counts)
        );
        println!(
            "{:<20} {:>12} {:>12}",
            "vpn protocol", "unapproved", "approved"
        );
        for (p, u, a) in &vpn.0 {
            println!("{:<20} {:>12} {:>12}", p.name(), u.packets, a.packets);
        }
        println!(
            "{:>8}  {:<8} {:<28} {:<22} {:>12} {:>12}",
            "rule", "kind", "name", "prefix", "in", "out"
        );
        let mut quiet_feed_ranges = 0;
        for (at, (r, h)) in rules.iter().zip(&hits).enumerate() {
            // A feed may hold a million ranges: list only those that matched something.
            if r.kind == RuleKind::DenyFeed.as_str() && *h == 0 {
                quiet_feed_ranges += 1;
                continue;
            }
            println!(
                "{:>8}  {:<8} {:<28} {:<22} {:>12} {:>12}",
                format!("#{}", r.index),
                r.kind,
                r.name,
                r.prefix,
                h,
                egress_hit(at)
            );
        }
        if quiet_feed_ranges > 0 {
            println!(
                "  ({quiet_feed_ranges} deny-feed ranges without hits not listed; --json lists all)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The counters by reason as a table.
pub fn render_verdicts(counts: &VerdictCounts) -> String {
    let mut out = format!(
        "{:<20} {:<6} {:>12} {:>14} {:>18}\n",
        "reason", "action", "packets", "bytes", "would-drop (mon)"
    );
    for ((reason, c), (_, m)) in counts.enforced.iter().zip(&counts.monitored) {
        let action = if reason.action() == Action::Pass {
            "pass"
        } else {
            "drop"
        };
        out.push_str(&format!(
            "{:<20} {:<6} {:>12} {:>14} {:>18}\n",
            reason.label(),
            action,
            c.packets,
            c.bytes,
            m.packets
        ));
    }
    out.pop();
    out
}
