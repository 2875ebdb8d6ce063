//! The report as one self-contained HTML file: inline style, inline SVG charts (drops per reason
//! over time, VPN attempts by protocol), no script and nothing fetched, so that it opens from a
//! USB stick on an auditor's machine as it does on the server.

use std::fmt::Write as _;

use super::{Entry, Report};

/// Text made safe for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLOURS: [&str; 8] = [
    "#c0392b", "#2980b9", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#f39c12",
];

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222;max-width:70em}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
th{background:#f0f0f0}.in{color:#1e7d32;font-weight:bold}.mon{color:#b7791f;font-weight:bold}\
.off{color:#b71c1c;font-weight:bold}h1{font-size:1.5em}h2{border-bottom:2px solid #444;margin-top:1.5em}\
.meta{color:#555}svg text{font-size:13px;font-family:sans-serif}";

fn status_class(status: &str) -> &'static str {
    match status {
        "in force" => "in",
        "monitored only" => "mon",
        _ => "off",
    }
}

fn entries(out: &mut String, title: &str, entries: &[Entry]) {
    let _ = write!(out, "<h3>{} ({})</h3>", esc(title), entries.len());
    if entries.is_empty() {
        out.push_str("<p>none</p>");
        return;
    }
    out.push_str("<table><tr><th>name</th><th>address</th><th>ministry / owner</th><th>ports</th><th>expires</th><th>note</th></tr>");
    for e in entries {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.name),
            esc(&e.prefix),
            esc(e.ministry.as_deref().unwrap_or("")),
            esc(&e
                .ports
                .as_ref()
                .map_or_else(|| "all".to_string(), |p| p.join(", "))),
            esc(e.expires.as_deref().unwrap_or("")),
            esc(e.note.as_deref().unwrap_or(""))
        );
    }
    out.push_str("</table>");
}

/// A horizontal bar chart of (label, value).
fn bars(title: &str, rows: &[(String, u64)]) -> String {
    if rows.is_empty() {
        return format!("<p>{}: none</p>", esc(title));
    }
    let max = rows.iter().map(|(_, v)| *v).max().unwrap_or(1).max(1) as f64;
    let height = 24 * rows.len() + 30;
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg role=\"img\" width=\"640\" height=\"{height}\" viewBox=\"0 0 640 {height}\">",
        esc(title)
    );
    for (i, (label, value)) in rows.iter().enumerate() {
        let y = 10 + 24 * i;
        let width = (*value as f64 / max * 380.0).max(1.0);
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{}\">{}</text><rect x=\"200\" y=\"{y}\" width=\"{width:.0}\" height=\"18\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{}\">{value}</text>",
            y + 13,
            esc(label),
            COLOURS[i % COLOURS.len()],
            205.0 + width,
            y + 13
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// A line chart: one line per series over `times`.
fn lines(title: &str, times: &[u64], series: &[(String, Vec<u64>)]) -> String {
    if times.len() < 2 || series.is_empty() {
        return format!(
            "<p>{}: not enough history yet (the daemon samples its counters every minute)</p>",
            esc(title)
        );
    }
    let (w, h, left, bottom) = (640.0, 220.0, 50.0, 30.0);
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (t0, t1) = (times[0] as f64, times[times.len() - 1] as f64);
    let span = (t1 - t0).max(1.0);
    let x = |t: u64| left + (t as f64 - t0) / span * (w - left - 10.0);
    let y = |v: u64| (h - bottom) - v as f64 / max * (h - bottom - 10.0);
    let legend = 18 * series.len();
    let total = h as usize + legend;
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg role=\"img\" width=\"{w}\" height=\"{total}\" viewBox=\"0 0 {w} {total}\">\
<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{left}\" y1=\"10\" x2=\"{left}\" y2=\"{}\" stroke=\"#888\"/>\
<text x=\"0\" y=\"18\">{max}</text><text x=\"0\" y=\"{}\">0</text>",
        esc(title),
        h - bottom,
        w - 10.0,
        h - bottom,
        h - bottom,
        h - bottom
    );
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        h - 10.0,
        esc(&crate::events::timestamp(i128::from(times[0]) * 1_000_000_000)[11..16]),
        w - 10.0,
        h - 10.0,
        esc(&crate::events::timestamp(i128::from(times[times.len() - 1]) * 1_000_000_000)[11..16])
    );
    for (i, (label, values)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = times
            .iter()
            .zip(values)
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/><rect x=\"{left}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            points.join(" "),
            h + 4.0 + 18.0 * i as f64,
            left + 18.0,
            h + 14.0 + 18.0 * i as f64,
            esc(label)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

pub fn html(r: &Report) -> String {
    let mut out = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Compliance report: {}</title><style>{STYLE}</style></head><body>",
        esc(&r.host)
    );
    let _ = write!(
        out,
        "<h1>e-Office access control: compliance report</h1><p class=\"meta\">Host <b>{}</b> · instance {} on {} · registry {} (serial {}) · generated {}</p>",
        esc(&r.host),
        esc(&r.instance),
        esc(&r.iface),
        esc(&r.registry),
        r.registry_serial,
        esc(&r.generated)
    );
    if let Some(fleet) = &r.fleet {
        let _ = write!(
            out,
            "<p class=\"meta\">Agent <b>{}</b> of the fleet's registry in etcd ({}): the registry above is its cache, the serial the fleet's revision in force</p>",
            esc(&fleet.host),
            esc(&fleet.endpoints)
        );
    }
    out.push_str("<h2>Controls of the advisory</h2><table><tr><th>control</th><th>status</th><th>evidence</th></tr>");
    for c in &r.controls {
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(c.control),
            status_class(c.status),
            esc(c.status),
            esc(&c.evidence)
        );
    }
    out.push_str("</table>");

    out.push_str("<h2>Traffic</h2>");
    let drops: Vec<(String, u64)> = r
        .drops
        .iter()
        .map(|(reason, direction, n)| (format!("{reason} ({direction})"), *n))
        .collect();
    out.push_str(&bars("Drops by reason, since the maps were made", &drops));
    let over_time: Vec<(String, Vec<u64>)> = r
        .over_time
        .drops
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.push_str(&lines(
        &format!(
            "Drops per reason over the last {} h",
            r.since_seconds / 3600
        ),
        &r.over_time.times,
        &over_time,
    ));
    out.push_str(&bars(
        "Unapproved VPN attempts by protocol (packets)",
        &r.vpn_unapproved_by_protocol,
    ));
    if !r.vpn_unapproved_by_source.is_empty() {
        out.push_str("<table><tr><th>protocol</th><th>source</th><th>events</th></tr>");
        for (protocol, source, n) in &r.vpn_unapproved_by_source {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>",
                esc(protocol),
                esc(source)
            );
        }
        out.push_str("</table>");
    }

    out.push_str("<h2>Registry in force</h2>");
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
    let _ = write!(out, "<h3>Deny feeds ({})</h3><ul>", r.deny_feeds.len());
    for (path, ranges) in &r.deny_feeds {
        let _ = write!(out, "<li>{}: {ranges} ranges</li>", esc(path));
    }
    let _ = write!(
        out,
        "</ul><h3>Approved VPN endpoints ({})</h3><table><tr><th>name</th><th>endpoint</th><th>protocol</th><th>approval</th><th>expires</th></tr>",
        r.vpn_endpoints.len()
    );
    for v in &r.vpn_endpoints {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&v.name),
            esc(&v.endpoint),
            v.protocol,
            esc(&v.approval),
            esc(v.expires.as_deref().unwrap_or(""))
        );
    }
    out.push_str("</table>");

    let _ = write!(
        out,
        "<h2>Expiry</h2><h3>Expiring within 30 days ({})</h3><ul>",
        r.expiring_within_30_days.len()
    );
    for e in &r.expiring_within_30_days {
        let _ = write!(out, "<li>{}</li>", esc(e));
    }
    let _ = write!(
        out,
        "</ul><h3>Expired entries removed ({})</h3><ul>",
        r.expired_removed.len()
    );
    for e in &r.expired_removed {
        let _ = write!(
            out,
            "<li>{} {}</li>",
            esc(e["time"].as_str().unwrap_or("")),
            esc(&e["entry"].to_string())
        );
    }
    let _ = writeln!(
        out,
        "</ul><h2>Changes</h2><p>Last change: {}{}. Audit log: {}.</p></body></html>",
        esc(r.last_change.as_deref().unwrap_or("none recorded")),
        r.seconds_since_last_change
            .map(|s| format!(" ({s} s ago)"))
            .unwrap_or_default(),
        esc(&r.audit)
    );
    out
}
