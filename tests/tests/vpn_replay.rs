//! Replays the labelled public captures in ../shared/data/vpn-pcaps through the real program
//! (`BPF_PROG_TEST_RUN`), with no VPN endpoint approved: every packet recognised as VPN is counted
//! under its protocol. For each capture the manifest gives how many packets the research
//! prototype's per-packet rules recognised (`prototype_xdp_signature_hits`): we must recognise
//! at least as many for every protocol we implement, and nothing in the negative captures.
//!
//! The table (`target/vpn-replay.tsv`) is the evidence quoted in the issue's note.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use enforcer_common::VpnProtocol;
use enforcer_tests::{capture, kernel::Loaded};

const EMPTY_REGISTRY: &str = r#"{"schema": 1, "mode": "enforce"}"#;

fn corpus() -> PathBuf {
    // `ENFORCER_SHARED` overrides where shared/ is (it sits beside the checkout in CI).
    let shared = std::env::var_os("ENFORCER_SHARED").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
        PathBuf::from,
    );
    let dir = shared.join("data/vpn-pcaps");
    assert!(
        dir.join("MANIFEST.tsv").exists(),
        "the labelled captures are expected at {} (the shared/ folder beside the checkout)",
        dir.display()
    );
    dir
}

/// The prototype's rule names → our protocols; rules we do not implement map to `None`.
fn protocol_of(rule: &str) -> Option<VpnProtocol> {
    match rule {
        r if r.starts_with("wg-") => Some(VpnProtocol::WireGuard),
        r if r.starts_with("openvpn-") => Some(VpnProtocol::OpenVpn),
        "ikev1" | "ikev2" | "esp(ip50)" | "ah(ip51)" | "esp-in-udp(4500)"
        | "ike-natt-keepalive" => Some(VpnProtocol::Ipsec),
        r if r.starts_with("pptp-") => Some(VpnProtocol::Pptp),
        "tailscale-disco" => Some(VpnProtocol::Tailscale),
        r if r.starts_with("l2tp") => Some(VpnProtocol::L2tp),
        r if r.starts_with("warp-") => Some(VpnProtocol::CloudflareWarp),
        r if r.starts_with("dtls-0x0100") => Some(VpnProtocol::AnyConnect),
        "softether-ipport" => Some(VpnProtocol::SoftEther),
        "ultrasurf" => Some(VpnProtocol::UltraSurf),
        _ => None,
    }
}

struct Row {
    file: String,
    class: String,
    label: String,
    packets: usize,
    /// Wireshark's count of packets of the labelled protocol (independent ground truth).
    tshark: String,
    expected: BTreeMap<VpnProtocol, u64>,
    not_implemented: Vec<String>,
}

fn manifest(dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(dir.join("MANIFEST.tsv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("column {name}"))
    };
    let (file, class, label, packets, tshark, hits) = (
        column("file"),
        column("class"),
        column("protocol_label"),
        column("packets"),
        column("tshark_matching_packets"),
        column("prototype_xdp_signature_hits"),
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cells: Vec<&str> = line.split('\t').collect();
            let mut expected = BTreeMap::new();
            let mut not_implemented = Vec::new();
            for item in cells[hits].split(';') {
                let Some((rule, count)) = item.rsplit_once('=') else {
                    continue;
                };
                if rule == "any_vpn_sig_pkts" {
                    continue;
                }
                let count: u64 = count.parse().unwrap_or(0);
                let rule = rule.split(':').next().unwrap_or(rule);
                match protocol_of(rule) {
                    Some(protocol) => *expected.entry(protocol).or_insert(0) += count,
                    None => not_implemented.push(format!("{rule}={count}")),
                }
            }
            Row {
                file: cells[file].to_string(),
                class: cells[class].to_string(),
                label: cells[label].to_string(),
                packets: cells[packets].parse().unwrap_or(0),
                tshark: cells[tshark].to_string(),
                expected,
                not_implemented,
            }
        })
        .collect()
}

/// Replays one capture; returns packets recognised per protocol, and packets not replayable.
fn replay(loaded: &Loaded, path: &Path) -> (BTreeMap<VpnProtocol, u64>, usize) {
    let capture = capture::read(path).unwrap_or_else(|e| panic!("{e:#}"));
    let before = loaded.datapath.vpn_verdicts().unwrap();
    let mut not_run = capture.skipped;
    for frame in &capture.frames {
        if loaded.try_run(frame).is_err() {
            not_run += 1; // larger than test_run accepts (jumbo/offloaded captures)
        }
    }
    let after = loaded.datapath.vpn_verdicts().unwrap();
    let recognised = VpnProtocol::ALL
        .into_iter()
        .map(|p| (p, after.unapproved(p) - before.unapproved(p)))
        .filter(|(_, n)| *n > 0)
        .collect();
    (recognised, not_run)
}

fn describe(counts: &BTreeMap<VpnProtocol, u64>) -> String {
    if counts.is_empty() {
        return "-".to_string();
    }
    counts
        .iter()
        .map(|(p, n)| format!("{}={n}", p.name()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn labelled_captures_recognised_and_negatives_clean() {
    let dir = corpus();
    let rows = manifest(&dir);
    assert!(rows.len() > 70, "manifest has {} rows", rows.len());
    let mut table = String::from(
        "file\tclass\tlabel\tpackets\ttshark\texpected (prototype)\trecognised\tnot implemented\tnot replayable\n",
    );
    let mut failures = Vec::new();
    let mut totals: BTreeMap<VpnProtocol, (u64, u64)> = BTreeMap::new();
    let mut negative_packets = 0;
    let mut false_positives = 0;
    for row in &rows {
        // A fresh program per capture: the OpenVPN flow map must not carry flows across files.
        let loaded = Loaded::new(EMPTY_REGISTRY);
        let (recognised, not_run) = replay(&loaded, &dir.join(&row.file));
        let _ = writeln!(
            table,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            row.file,
            row.class,
            row.label,
            row.packets,
            row.tshark,
            describe(&row.expected),
            describe(&recognised),
            row.not_implemented.join(" "),
            not_run
        );
        if row.class == "negative" {
            negative_packets += row.packets;
            let hits: u64 = recognised.values().sum();
            false_positives += hits;
            if hits > 0 {
                failures.push(format!(
                    "{}: {} negative packets recognised as VPN ({})",
                    row.file,
                    hits,
                    describe(&recognised)
                ));
            }
            continue;
        }
        for (protocol, want) in &row.expected {
            let got = recognised.get(protocol).copied().unwrap_or(0);
            let total = totals.entry(*protocol).or_default();
            total.0 += *want;
            total.1 += got.min(*want);
            if got < *want {
                failures.push(format!(
                    "{}: {} recognised {got} of the {want} packets the rules cover",
                    row.file,
                    protocol.name()
                ));
            }
        }
    }
    let mut summary = String::new();
    for (protocol, (want, got)) in &totals {
        let _ = writeln!(
            summary,
            "{}: {got}/{want} signature packets recognised",
            protocol.name()
        );
    }
    let _ = writeln!(
        summary,
        "negatives: {false_positives} false positives in {negative_packets} packets"
    );
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/vpn-replay.tsv");
    std::fs::write(&out, format!("{table}\n{summary}")).unwrap();
    println!("{summary}(table: {})", out.display());
    assert!(
        failures.is_empty(),
        "{} problems:\n{}\n\n{summary}",
        failures.len(),
        failures.join("\n")
    );
}
