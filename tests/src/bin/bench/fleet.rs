//! The fleet: a three-member etcd cluster and 20 agents (the proof's size); the time from a
//! change written through the CLI (its audit record) to every agent's kernel, p50 and p99 over
//! 50 changes; then a 100,000-entry registry synchronised to a fresh agent (one member), the
//! time until it enforces, its memory, and the time of one change at that size.

use std::fmt::Write as _;

use enforcer_tests::fleet::{FleetLab, peak_mib, percentile};

const AGENTS: usize = 20;
const CHANGES: usize = 50;
const ENTRIES: usize = 100_000;

const SMALL: &str = r#"{"schema": 1, "mode": "enforce", "egress": "off",
  "networks": [{"name": "base", "cidr": "2001:db8:ffff::/48", "ministry": "MoITT"}]}"#;

pub fn fleet(out: &mut String) -> anyhow::Result<serde_json::Value> {
    let mut lab = FleetLab::new(3, AGENTS, SMALL, &[])?;
    for i in 0..AGENTS {
        lab.start_agent(i)?;
    }
    let latencies = lab.propagation(CHANGES)?;
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

    let large = enforcer_tests::fleet::large(ENTRIES)?;
    writeln!(
        out,
        "  {ENTRIES} entries: etcd start + import {:.1} s; a fresh agent enforces them {:.2} s after its start (target < 5 s), peak {} MiB; one change then {} ms, peak {} MiB",
        large.import_s, large.sync_s, large.sync_peak_mib, large.change_ms, large.change_peak_mib
    )?;
    Ok(serde_json::json!({
        "agents": AGENTS, "members": 3, "changes": CHANGES,
        "propagation_ms": {"p50": p50, "p99": p99, "max": max},
        "agent_peak_mib": agent_mib.iter().max(),
        "large": large.json(),
    }))
}
