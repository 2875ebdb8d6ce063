//! The report as Markdown (for a ticket or an e-mail).

use std::fmt::Write as _;

use super::{Entry, Report};

fn entries(out: &mut String, title: &str, entries: &[Entry]) {
    let _ = writeln!(out, "\n### {title} ({})\n", entries.len());
    if entries.is_empty() {
        out.push_str("none\n");
        return;
    }
    out.push_str(
        "| name | address | ministry / owner | ports | expires |\n|---|---|---|---|---|\n",
    );
    for e in entries {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            e.name,
            e.prefix,
            e.ministry.as_deref().unwrap_or(""),
            e.ports
                .as_ref()
                .map_or_else(|| "all".to_string(), |p| p.join(", ")),
            e.expires.as_deref().unwrap_or("")
        );
    }
}

pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# e-Office access control: compliance report\n\nHost {} · instance {} · registry {} (serial {}) · generated {}\n",
        r.host, r.instance, r.registry, r.registry_serial, r.generated
    );
    if let Some(fleet) = &r.fleet {
        let _ = writeln!(
            out,
            "Agent **{}** of the fleet's registry in etcd ({}): the registry above is its cache, the serial the fleet's revision in force.\n",
            fleet.host, fleet.endpoints
        );
    }
    out.push_str("## Controls\n\n| control | status | evidence |\n|---|---|---|\n");
    for c in &r.controls {
        let _ = writeln!(out, "| {} | **{}** | {} |", c.control, c.status, c.evidence);
    }
    out.push_str("\n## Registry in force\n");
    for (ministry, networks) in &r.networks_by_ministry {
        entries(
            &mut out,
            &format!("Approved networks: {ministry}"),
            networks,
        );
    }
    entries(&mut out, "Pre-approved devices", &r.devices);
    entries(&mut out, "Denied ranges", &r.deny);
    entries(&mut out, "Upstreams the server may reach", &r.upstreams);
    let _ = writeln!(out, "\n### Deny feeds ({})\n", r.deny_feeds.len());
    for (path, ranges) in &r.deny_feeds {
        let _ = writeln!(out, "- {path}: {ranges} ranges");
    }
    let _ = writeln!(
        out,
        "\n### Approved VPN endpoints ({})\n",
        r.vpn_endpoints.len()
    );
    out.push_str("| name | endpoint | protocol | approval | expires |\n|---|---|---|---|---|\n");
    for v in &r.vpn_endpoints {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            v.name,
            v.endpoint,
            v.protocol,
            v.approval,
            v.expires.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "\n## Expiring within 30 days ({})\n",
        r.expiring_within_30_days.len()
    );
    for e in &r.expiring_within_30_days {
        let _ = writeln!(out, "- {e}");
    }
    let _ = writeln!(
        out,
        "\n## Expired entries removed ({})\n",
        r.expired_removed.len()
    );
    for e in &r.expired_removed {
        let _ = writeln!(out, "- {} {}", e["time"].as_str().unwrap_or(""), e["entry"]);
    }
    out.push_str("\n## Drops by reason (since the maps were made)\n\n| reason | direction | packets |\n|---|---|---|\n");
    for (reason, direction, packets) in &r.drops {
        let _ = writeln!(out, "| {reason} | {direction} | {packets} |");
    }
    out.push_str("\n## Unapproved VPN attempts\n\n| protocol | packets |\n|---|---|\n");
    for (protocol, packets) in &r.vpn_unapproved_by_protocol {
        let _ = writeln!(out, "| {protocol} | {packets} |");
    }
    if !r.vpn_unapproved_by_source.is_empty() {
        out.push_str("\n| protocol | source | events |\n|---|---|---|\n");
        for (protocol, source, n) in &r.vpn_unapproved_by_source {
            let _ = writeln!(out, "| {protocol} | {source} | {n} |");
        }
    }
    let _ = writeln!(
        out,
        "\n## Changes\n\nLast change: {}{} · audit log: {}",
        r.last_change.as_deref().unwrap_or("none recorded"),
        r.seconds_since_last_change
            .map(|s| format!(" ({s} s ago)"))
            .unwrap_or_default(),
        r.audit
    );
    out
}
