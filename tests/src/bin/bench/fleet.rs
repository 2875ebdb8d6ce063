//! The fleet: a three-member etcd cluster and 20 agents (the proof's size); the time from a
//! change written through the CLI (its audit record) to every agent's kernel, p50 and p99 over
//! 50 changes; then a 100,000-entry registry synchronised to a fresh agent (one member), the
//! time until it enforces, its memory, and the time of one change at that size.

use std::{fmt::Write as _, time::Duration};

use enforcer_tests::fleet::{FleetLab, large_registry, percentile};

const AGENTS: usize = 20;
const CHANGES: usize = 50;
const ENTRIES: usize = 100_000;

const SMALL: &str = r#"{"schema": 1, "mode": "enforce", "egress": "off",
  "networks": [{"name": "base", "cidr": "2001:db8:ffff::/48", "ministry": "MoITT"}]}"#;

/// Peak resident memory of a process (`VmHWM`), MiB.
fn peak_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

pub fn fleet(out: &mut String) -> anyhow::Result<serde_json::Value> {
    let mut lab = FleetLab::new(3, AGENTS, SMALL, &[])?;
    for i in 0..AGENTS {
        lab.start_agent(i)?;
    }
    let mut latencies = Vec::new();
    for k in 0..CHANGES {
        let (revision, written) = lab.change(&[
            "allow",
            "add",
            &format!("2001:db8:f:{k:x}::/64"),
            "--name",
            &format!("round-{k}"),
            "--ministry",
            "MoITT",
        ])?;
        let applied = lab.all_applied(revision, Duration::from_secs(10))?;
        latencies.extend(applied.iter().map(|&t| t.saturating_sub(written)));
    }
    let agent_mib: Vec<u64> = lab
        .agents
        .iter()
        .filter_map(|a| a.enforcer.as_ref()?.pid())
        .map(peak_mib)
        .collect();
    drop(lab);
    let (p50, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    let max = latencies.iter().max().copied().unwrap_or(0);
    writeln!(
        out,
        "\nFleet: 3 etcd members, {AGENTS} agents, {CHANGES} changes through the CLI\n  write → every agent's kernel: p50 {p50} ms, p99 {p99} ms, max {max} ms (target p99 < 1000)\n  agent peak memory: {} MiB (largest)",
        agent_mib.iter().max().copied().unwrap_or(0)
    )?;

    let limits = [
        "--max-txn-ops",
        "1000000",
        "--max-request-bytes",
        "134217728",
    ];
    let started = std::time::Instant::now();
    let mut lab = FleetLab::new(1, 1, &large_registry(ENTRIES), &limits)?;
    let import_s = started.elapsed().as_secs_f64();
    let sync = lab.start_agent(0)?;
    let pid = lab.agents[0]
        .enforcer
        .as_ref()
        .and_then(enforcer_tests::daemon::Enforcer::pid)
        .unwrap_or(0);
    let sync_mib = peak_mib(pid);
    anyhow::ensure!(lab.connects(0), "the clients' network is in force");
    let (revision, written) = lab.change(&[
        "allow",
        "add",
        "2001:db8:d::/64",
        "--name",
        "one-more",
        "--ministry",
        "MoITT",
    ])?;
    let applied = lab.all_applied(revision, Duration::from_secs(60))?;
    let change_ms = applied[0].saturating_sub(written);
    let change_mib = peak_mib(pid);
    writeln!(
        out,
        "  {ENTRIES} entries: etcd start + import {import_s:.1} s; a fresh agent enforces them {:.2} s after its start (target < 5 s), peak {sync_mib} MiB; one change then {change_ms} ms, peak {change_mib} MiB",
        sync.as_secs_f64()
    )?;
    Ok(serde_json::json!({
        "agents": AGENTS, "members": 3, "changes": CHANGES,
        "propagation_ms": {"p50": p50, "p99": p99, "max": max},
        "agent_peak_mib": agent_mib.iter().max(),
        "large": {"entries": ENTRIES, "import_s": import_s, "sync_s": sync.as_secs_f64(),
                  "sync_peak_mib": sync_mib, "change_ms": change_ms, "change_peak_mib": change_mib},
    }))
}
