//! `cargo xtask bench [PART...]`: per-packet cost of the enforcer's verdict through
//! `BPF_PROG_TEST_RUN` at registry sizes from 10 to 1,000,000 in two distributions, beside floor
//! programs measured in the same run (a bare `XDP_PASS`, and one kernel LPM-trie lookup of the
//! IPv4 source with the same prefixes) (`test-run`); the cost of the VPN stage (`vpn`); a veth
//! flood beside bare `XDP_DROP`, nftables and iptables+ipset (`flood`, see `flood.rs`); and the
//! control plane with a real controller (`control`); a fleet of agents of an etcd cluster
//! (`fleet`, see `bench/fleet.rs`). Prints a table and writes
//! `target/bench/bench.json` and `target/bench/cost.svg`.
//!
//! Method: for each (program, packet, size) the kernel runs the program `REPEAT` times on the
//! same frame and reports the mean ns per run; all sizes are loaded at once and measured in
//! turn, `RUNS` rounds, and we take the median per (packet, size).

#[path = "bench/fleet.rs"]
mod fleet;

use enforcer_tests::rng::Rng;
use std::{collections::HashSet, fmt::Write as _, time::Instant};

use anyhow::Context as _;

use aya::{
    Ebpf, EbpfLoader,
    maps::{LpmTrie, lpm_trie::Key},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use enforcer::datapath::BASELINE_OBJECT;
use enforcer_tests::{
    flood::{self, FloodLab},
    kernel::Loaded,
    netns::require_root,
    packet::{ETH_P_8021Q, Frame, L4},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 7;
/// Program instances per registry size (each with maps of its own), all timed every round.
const INSTANCES: usize = 3;
const SIZES: [usize; 4] = [10, 1_000, 100_000, 1_000_000];

/// Ranges the measured packets come from; generated entries stay clear of them.
fn reserved() -> [IpNet; 8] {
    [
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
        "192.0.2.0/24",
        enforcer_tests::flood::SOURCES,
        // The expanded /32's measured packets (see `EXPANDED_V6`).
        "2a0f:ffe0:1::/48",
        "2a0f:ffe0:ffff:ffff::/64",
        "2a0f:ffe0:b:2::/64",
    ]
    .map(|c| c.parse().unwrap())
}

fn clear_of_reserved(net: IpNet) -> bool {
    reserved()
        .iter()
        .all(|r| !r.contains(&net) && !net.contains(r))
}

/// Two kinds of registry, each with the two networks the allowed packets come from.
#[derive(Clone, Copy)]
enum Distribution {
    /// Shaped like a public prefix list: IPv4 /8 to /30 (80 %), single IPv4 devices (10 %),
    /// IPv6 /32 to /64 (10 %).
    Realistic,
    /// Random single addresses: /32 and /128, half and half.
    Worst,
    /// Shaped like a hosting-range feed: as realistic, but the IPv6 prefixes (/33 to /64)
    /// clustered about 24 to a /32, so most /32s hold more lengths than a lookup list probes
    /// and are expanded; one of them, `EXPANDED_V6`, is where two of the measured packets
    /// come from.
    ManyLengths,
}

/// The /32 of the many-lengths registry that the "expanded /32" packets come from: twelve
/// lengths /33 to /64 in its lower half at every size, the allowed packet's /48 among them,
/// the dropped packet's /64 in its upper half left unlisted, and the "most probes" packet
/// beside the /63, where the /45 decides.
const EXPANDED_V6: &str = "2a0f:ffe0::/32";

impl Distribution {
    const fn name(self) -> &'static str {
        match self {
            Self::Realistic => "realistic",
            Self::Worst => "worst-case",
            Self::ManyLengths => "many-lengths",
        }
    }

    fn registry(self, n: usize) -> String {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ n as u64 ^ self as u64);
        let mut seen = HashSet::new();
        let mut entries = vec![
            r#"{"name": "bench-allowed", "cidr": "198.51.100.0/24"}"#.to_string(),
            r#"{"name": "bench-allowed-v6", "cidr": "2001:db8:100::/64"}"#.to_string(),
        ];
        let expanded: Ipv6Net = EXPANDED_V6.parse().expect("a prefix");
        if matches!(self, Self::ManyLengths) {
            entries.push(
                r#"{"name": "bench-allowed-expanded", "cidr": "2a0f:ffe0:1::/48"}"#.to_string(),
            );
            for (i, len) in (36..=64u8).step_by(3).enumerate() {
                let addr = u128::from(expanded.network()) | (i as u128 + 2) << 80;
                let net = Ipv6Net::new(addr.into(), len).unwrap().trunc();
                entries.push(format!(
                    r#"{{"name": "bench-expanded-{len}", "cidr": "{net}"}}"#
                ));
                seen.insert(IpNet::V6(net));
            }
        }
        // The many-lengths registry's /32s: about 24 IPv6 prefixes each.
        let clusters = (n / 10 / 24).max(1) as u64;
        while entries.len() < n.max(2) {
            let roll = rng.next_u64() % 10;
            let v4 = |rng: &mut Rng, len: u8| {
                IpNet::V4(
                    Ipv4Net::new(
                        u32::try_from(rng.next_u64() & 0xFFFF_FFFF).unwrap().into(),
                        len,
                    )
                    .unwrap()
                    .trunc(),
                )
            };
            let v6 = |rng: &mut Rng, len: u8| {
                // Global unicast outside 2001:db8::/32: first byte 0x24..0x2A.
                let bits = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()))
                    & !(0xFF << 120)
                    | (0x24 + u128::from(rng.next_u64() % 7)) << 120;
                IpNet::V6(Ipv6Net::new(bits.into(), len).unwrap().trunc())
            };
            let net = match (self, roll) {
                (Self::Realistic | Self::ManyLengths, 0..=7) => {
                    let len = u8::try_from(8 + rng.next_u64() % 23).unwrap();
                    v4(&mut rng, len)
                }
                (Self::Realistic | Self::ManyLengths, 8) => v4(&mut rng, 32),
                (Self::Realistic, _) => {
                    let len = u8::try_from(32 + rng.next_u64() % 33).unwrap();
                    v6(&mut rng, len)
                }
                (Self::Worst, r) if r % 2 == 0 => v4(&mut rng, 32),
                (Self::Worst, _) => v6(&mut rng, 128),
                (Self::ManyLengths, _) => {
                    // One of `clusters` /32s under 2a0f::/16 (the expanded one among them).
                    let top = u128::from(expanded.network()) >> 96
                        ^ u128::from(rng.next_u64() % clusters);
                    let low = u128::from(rng.next_u64()) << 32;
                    let len = u8::try_from(33 + rng.next_u64() % 32).unwrap();
                    IpNet::V6(Ipv6Net::new((top << 96 | low).into(), len).unwrap().trunc())
                }
            };
            if clear_of_reserved(net) && seen.insert(net) {
                entries.push(format!(
                    r#"{{"name": "n{}", "cidr": "{net}"}}"#,
                    entries.len()
                ));
            }
        }
        format!(
            r#"{{"schema": 1, "mode": "enforce", "networks": [{}]}}"#,
            entries.join(",")
        )
    }
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn time_program(program: &Xdp, frame: &[u8]) -> u64 {
    median(
        (0..RUNS)
            .map(|_| time_program_once(program, frame))
            .collect(),
    )
}

/// One test run of `REPEAT` repeats: the kernel's mean ns per run.
fn time_program_once(program: &Xdp, frame: &[u8]) -> u64 {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat: REPEAT,
        ..TestRunOptions::new()
    };
    u64::try_from(
        program
            .test_run(opts)
            .expect("test_run")
            .duration
            .as_nanos(),
    )
    .unwrap()
}

fn packets() -> Vec<(&'static str, Vec<u8>)> {
    let udp = |src: &str, dst: &str, src_port, dst_port, mut data: Vec<u8>, len: usize| {
        data.resize(len, 0x5C);
        Frame::udp_data(src, src_port, dst, dst_port, data).build()
    };
    vec![
        (
            "allowed IPv4",
            Frame::tcp("198.51.100.10", "192.0.2.1", 443).build(),
        ),
        (
            "dropped IPv4",
            Frame::tcp("203.0.113.5", "192.0.2.1", 443).build(),
        ),
        (
            "allowed IPv6",
            Frame::tcp("2001:db8:100::10", "2001:db8:1::1", 443).build(),
        ),
        (
            "dropped IPv6",
            Frame::tcp("2001:db8:dead::5", "2001:db8:1::1", 443).build(),
        ),
        (
            "allowed IPv6, expanded /32",
            Frame::tcp("2a0f:ffe0:1::10", "2001:db8:1::1", 443).build(),
        ),
        (
            "dropped IPv6, expanded /32",
            Frame::tcp("2a0f:ffe0:ffff:ffff::5", "2001:db8:1::1", 443).build(),
        ),
        (
            // Beside the /63, in its /40 and /48 (both marked): every longer target is probed
            // before the /45 that decides.
            "allowed IPv6, expanded, most probes",
            Frame::tcp("2a0f:ffe0:b:2::5", "2001:db8:1::1", 443).build(),
        ),
        (
            "allowed IPv4 in 802.1Q",
            Frame::tcp("198.51.100.10", "192.0.2.1", 443)
                .vlan(ETH_P_8021Q, 10)
                .build(),
        ),
        (
            "WireGuard data (VPN)",
            udp(
                "203.0.113.5",
                "192.0.2.1",
                51820,
                40000,
                vec![4, 0, 0, 0, 1, 2, 3, 4, 9, 0, 0, 0, 0, 0, 0, 0],
                128,
            ),
        ),
        (
            "malformed (cut IPv4)",
            Frame::tcp("198.51.100.10", "192.0.2.1", 443).build()[..24].to_vec(),
        ),
    ]
}

/// The LPM floor: one lookup of the IPv4 source in a kernel LPM trie holding `prefixes`.
fn lpm_floor(prefixes: &[IpNet]) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new().load(BASELINE_OBJECT)?;
    {
        let mut trie: LpmTrie<_, [u8; 4], u32> =
            LpmTrie::try_from(ebpf.map_mut("BASELINE_LPM").expect("BASELINE_LPM"))?;
        for net in prefixes {
            if let IpNet::V4(net) = net {
                trie.insert(
                    &Key::new(u32::from(net.prefix_len()), net.network().octets()),
                    1,
                    0,
                )?;
            }
        }
    }
    let program: &mut Xdp = ebpf
        .program_mut("baseline_lpm")
        .expect("baseline_lpm")
        .try_into()?;
    program.load()?;
    Ok(ebpf)
}

/// One distribution's rows: packet → ns at each size, plus the LPM floor; the medians of all
/// runs, and (`fastest`, `lpm_fastest`) their minimums.
struct Series {
    distribution: &'static str,
    rows: Vec<(&'static str, Vec<u64>)>,
    lpm: Vec<u64>,
    fastest: Vec<(&'static str, Vec<u64>)>,
    lpm_fastest: Vec<u64>,
    load_ms: Vec<u128>,
}

/// Every distribution at every size, timed in the same rounds: a registry's rows are compared
/// with another's (a many-lengths registry against the realistic one), and measured one after
/// the other, a shared machine's drift between them showed as a difference of 10-20 %.
fn measure_distributions(
    distributions: &[Distribution],
    frames: &[(&'static str, Vec<u8>)],
) -> anyhow::Result<Vec<Series>> {
    // Every size is loaded first, `INSTANCES` times; then each round times every (registry,
    // size, instance, packet) once, so that the drifts of a shared machine fall on all alike.
    // Medians over rounds and instances: on this machine one program instance can sit 30-50 %
    // above another of the same program and maps, and a single instance per size made one row
    // or another look like a trend.
    let mut loaded: Vec<Vec<Vec<Loaded>>> = Vec::new();
    let mut floors: Vec<Vec<Ebpf>> = Vec::new();
    let mut load_ms: Vec<Vec<u128>> = Vec::new();
    for d in distributions {
        let (mut per_size, mut d_floors, mut d_load_ms) = (Vec::new(), Vec::new(), Vec::new());
        for size in SIZES {
            let text = d.registry(size);
            let mut instances = Vec::new();
            for i in 0..INSTANCES {
                let started = Instant::now();
                let l = Loaded::new(&text);
                if i == 0 {
                    d_load_ms.push(started.elapsed().as_millis());
                    let prefixes: Vec<IpNet> = l.policy.allow_rules().map(|r| r.prefix).collect();
                    d_floors.push(lpm_floor(&prefixes)?);
                }
                assert_eq!(l.run(&frames[0].1), 2, "the allowed packet passes");
                assert_eq!(l.run(&frames[1].1), 1, "the dropped packet drops");
                instances.push(l);
            }
            per_size.push(instances);
            eprintln!("bench: {} {size} loaded ({INSTANCES} instances)", d.name());
        }
        loaded.push(per_size);
        floors.push(d_floors);
        load_ms.push(d_load_ms);
    }
    let empty = || vec![vec![Vec::new(); SIZES.len()]; frames.len()];
    let mut samples: Vec<Vec<Vec<Vec<u64>>>> = distributions.iter().map(|_| empty()).collect();
    let mut lpm_samples: Vec<Vec<Vec<u64>>> = distributions
        .iter()
        .map(|_| vec![Vec::new(); SIZES.len()])
        .collect();
    // Each round in its own order (a disturbance that recurs at one point of every round
    // would otherwise fall on the same size each time).
    let mut rng = Rng(0x005E_ED0F_0DE5);
    for _ in 0..RUNS {
        let mut order: Vec<(usize, usize, usize)> = (0..distributions.len())
            .flat_map(|d| {
                (0..SIZES.len()).flat_map(move |s| (0..INSTANCES).map(move |i| (d, s, i)))
            })
            .collect();
        for i in (1..order.len()).rev() {
            order.swap(i, usize::try_from(rng.next_u64() % (i as u64 + 1)).unwrap());
        }
        for (d, s, i) in order {
            for (f, (_, frame)) in frames.iter().enumerate() {
                samples[d][f][s].push(loaded[d][s][i].time(frame, REPEAT));
            }
        }
        for (d, d_floors) in floors.iter().enumerate() {
            for (s, floor) in d_floors.iter().enumerate() {
                let program: &Xdp = floor
                    .program("baseline_lpm")
                    .expect("baseline_lpm")
                    .try_into()?;
                lpm_samples[d][s].push(time_program_once(program, &frames[1].1));
            }
        }
    }
    eprintln!("bench: timed");
    let fastest_of = |per_size: &[Vec<u64>]| -> Vec<u64> {
        per_size
            .iter()
            .map(|v| v.iter().copied().min().unwrap_or(0))
            .collect()
    };
    Ok(distributions
        .iter()
        .zip(samples.into_iter().zip(lpm_samples).zip(load_ms))
        .map(|(d, ((samples, lpm_samples), load_ms))| {
            let fastest = frames
                .iter()
                .zip(&samples)
                .map(|((what, _), per_size)| (*what, fastest_of(per_size)))
                .collect();
            let lpm_fastest = fastest_of(&lpm_samples);
            let rows = frames
                .iter()
                .zip(samples)
                .map(|((what, _), per_size)| (*what, per_size.into_iter().map(median).collect()))
                .collect();
            Series {
                distribution: d.name(),
                rows,
                lpm: lpm_samples.into_iter().map(median).collect(),
                fastest,
                lpm_fastest,
                load_ms,
            }
        })
        .collect())
}

/// A line chart of ns per packet against registry size (log scale), as SVG.
fn chart(series: &[Series], bare: u64) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 420.0, 60.0, 50.0, 30.0, 220.0);
    let max = series
        .iter()
        .flat_map(|s| s.rows.iter().take(2).flat_map(|r| r.1.iter()).chain(&s.lpm))
        .copied()
        .max()
        .unwrap_or(1) as f64
        * 1.1;
    let x = |i: usize| left + (w - left - right) * i as f64 / (SIZES.len() - 1) as f64;
    let y = |ns: f64| top + (h - top - bottom) * (1.0 - ns / max);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r#"<text x="{left}" y="18" font-size="14">ns per packet (BPF_PROG_TEST_RUN) against registry size</text>"#
    );
    let _ = write!(
        svg,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for (i, size) in SIZES.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{size}</text>"#,
            x(i),
            h - bottom + 18.0
        );
    }
    for step in 0..=4 {
        let ns = max * f64::from(step) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{ns:.0}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            left - 6.0,
            y(ns) + 4.0,
            y(ns),
            w - right,
            y(ns)
        );
    }
    let colours = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let mut lines: Vec<(String, Vec<u64>)> = Vec::new();
    for s in series {
        for row in s.rows.iter().take(2) {
            lines.push((
                format!("enforcer {} ({})", row.0, s.distribution),
                row.1.clone(),
            ));
        }
        lines.push((
            format!("one LPM lookup ({})", s.distribution),
            s.lpm.clone(),
        ));
    }
    lines.push(("bare XDP_PASS".to_string(), vec![bare; SIZES.len()]));
    for (k, (label, values)) in lines.iter().enumerate() {
        let colour = colours[k % colours.len()];
        let dash = if label.contains("worst") {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v as f64)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}">{label}</text>"#,
            w - right + 8.0,
            top + 16.0 * k as f64 + 10.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The peak resident memory of a process (`VmHWM`), in MiB.
fn peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Control plane: a real controller on a namespace's interface; the latency of one
/// `enforcer allow add` (process start → return, when the map is updated), and the time and
/// peak controller memory of `enforcer reload` to registries of 100,000 and 1,000,000 networks.
fn control_plane(out: &mut String) -> anyhow::Result<serde_json::Value> {
    use enforcer_tests::{
        daemon::{Enforcer, enforcer_bin},
        topology::{Lab, SERVER_IFACE},
        vpn::TempDir,
    };
    let lab = Lab::new(&[])?;
    let dir = TempDir::new("enf-bench")?;
    let registry = dir.0.join("registry.json");
    // A fresh start on a million entries: process start until attached and serving (the
    // harness polls the control socket every 50 ms), and the controller's peak memory.
    writeln!(
        out,
        "\ncontrol plane (real release controller; CLI process start → return = map updated)"
    )?;
    let mut starts = Vec::new();
    for d in [
        Distribution::Realistic,
        Distribution::Worst,
        Distribution::ManyLengths,
    ] {
        std::fs::write(&registry, d.registry(1_000_000))?;
        let started = Instant::now();
        let mut enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[])?;
        let took = started.elapsed();
        let peak = enforcer.pid().map_or(0.0, peak_mib);
        enforcer.stop()?;
        enforcer.detach()?;
        writeln!(
            out,
            "start on 1000000 networks ({}): {:.2} s to attached and serving, controller peak memory {peak:.0} MiB (VmHWM)",
            d.name(),
            took.as_secs_f64()
        )?;
        starts.push(serde_json::json!({"distribution": d.name(), "seconds": took.as_secs_f64(), "peak_mib": peak}));
    }
    std::fs::write(&registry, Distribution::Realistic.registry(10))?;
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[])?;
    let cli = |args: &[&str]| -> anyhow::Result<std::time::Duration> {
        let started = Instant::now();
        let status = std::process::Command::new(enforcer_bin())
            .args(args)
            .args(["--instance", &enforcer.instance])
            .output()?;
        anyhow::ensure!(
            status.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        Ok(started.elapsed())
    };
    let mut adds: Vec<u64> = (0..100)
        .map(|i| {
            cli(&[
                "allow",
                "add",
                &format!("10.{}.{}.0/24", i / 250, i % 250),
                "--name",
                &format!("lat-{i}"),
            ])
            .map(|d| d.as_micros() as u64)
        })
        .collect::<anyhow::Result<_>>()?;
    adds.sort_unstable();
    let (median, p90) = (adds[50], adds[90]);
    writeln!(
        out,
        "allow add: median {:.2} ms, p90 {:.2} ms over 100",
        median as f64 / 1000.0,
        p90 as f64 / 1000.0
    )?;
    let mut reloads = Vec::new();
    for size in [100_000usize, 1_000_000] {
        // Back to a small registry first: a reload keeps the old entries' rule numbers in
        // force until the new ones are in, so 100,000 + 1,000,000 would not fit the maps.
        std::fs::write(&registry, Distribution::Realistic.registry(10))?;
        cli(&["reload"])?;
        std::fs::write(&registry, Distribution::Realistic.registry(size))?;
        let took = cli(&["reload"])?;
        let peak = enforcer.pid().map_or(0.0, peak_mib);
        writeln!(
            out,
            "reload to {size} networks: {:.2} s, controller peak memory {peak:.0} MiB (VmHWM)",
            took.as_secs_f64()
        )?;
        reloads.push(
            serde_json::json!({"networks": size, "seconds": took.as_secs_f64(), "peak_mib": peak}),
        );
    }
    let live = live_changes_at_a_million(out, &enforcer, &registry)?;
    Ok(
        serde_json::json!({"starts": starts, "allow_add_median_ms": median as f64 / 1000.0, "allow_add_p90_ms": p90 as f64 / 1000.0, "reloads": reloads, "live_at_1m": live}),
    )
}

/// Resets the peak resident memory `VmHWM` of a process (`clear_refs` 5), so that the next
/// reading is the peak of what comes after.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    Ok(())
}

/// Live changes on the million-entry registry (`path`) the controller now holds (after the
/// reload): the first change (the generated file has no serial yet, and the change writes it),
/// then entries added and removed and the mode switched in place, then the whole-registry
/// path: a change after a hand edit of the file, and a reload of a file with one entry added by
/// hand. Time from CLI start to return and the controller's peak memory over each kind.
fn live_changes_at_a_million(
    out: &mut String,
    enforcer: &enforcer_tests::daemon::Enforcer,
    path: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let pid = enforcer.pid().context("the controller runs")?;
    let cli = |args: &[&str]| -> anyhow::Result<(f64, String)> {
        let started = Instant::now();
        let output = std::process::Command::new(enforcer_tests::daemon::enforcer_bin())
            .args(args)
            .args(["--instance", &enforcer.instance, "--json"])
            .output()?;
        let took = started.elapsed().as_secs_f64();
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("{args:?}: {}", String::from_utf8_lossy(&output.stderr)))?;
        anyhow::ensure!(answer["ok"] == true, "{args:?}: {answer}");
        Ok((
            took,
            answer["data"]["applied"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
        ))
    };
    let mut rows = Vec::new();
    // An entry added to the file by hand (as an administrator's editor would), before a run.
    let edits = std::cell::Cell::new(0);
    let hand_edit = || -> anyhow::Result<()> {
        let i = edits.replace(edits.get() + 1);
        let text = std::fs::read_to_string(path)?;
        let entry = format!(r#"{{"name": "hand-{i}", "cidr": "10.253.{i}.0/24"}}, "#);
        let at = text
            .find(r#""networks": ["#)
            .context("no networks section")?
            + 13;
        std::fs::write(path, format!("{}{entry}{}", &text[..at], &text[at..]))?;
        Ok(())
    };
    let mut measure = |label: &str, runs: Vec<Vec<String>>, by_hand: bool| -> anyhow::Result<()> {
        reset_peak(pid)?;
        let mut times = Vec::new();
        let mut ways = std::collections::BTreeSet::new();
        for args in &runs {
            if by_hand {
                hand_edit()?;
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (took, way) = cli(&args)?;
            times.push(took);
            ways.insert(way);
        }
        let peak = peak_mib(pid);
        let median = median_f64(times.clone());
        let max = times.iter().copied().fold(0.0, f64::max);
        let ways: Vec<String> = ways.into_iter().collect();
        writeln!(
            out,
            "{label} at 1000000 networks: median {median:.2} s, max {max:.2} s over {} ({}), controller peak {peak:.0} MiB",
            runs.len(),
            ways.join(", ")
        )?;
        rows.push(serde_json::json!({"change": label, "runs": runs.len(), "median_s": median, "max_s": max, "applied": ways, "peak_mib": peak}));
        Ok(())
    };
    let add = |i: usize| {
        vec![
            "allow".to_string(),
            "add".into(),
            format!("10.254.{i}.0/24"),
            "--name".into(),
            format!("live-{i}"),
        ]
    };
    measure("first change (allow add)", vec![add(0)], false)?;
    measure("allow add", (1..=5).map(add).collect(), false)?;
    measure(
        "allow remove",
        (1..=5)
            .map(|i| vec!["allow".into(), "remove".into(), format!("live-{i}")])
            .collect(),
        false,
    )?;
    measure(
        "mode switch",
        ["monitor", "enforce"]
            .iter()
            .map(|m| vec!["mode".into(), (*m).to_string()])
            .collect(),
        false,
    )?;
    measure(
        "allow add after a hand edit of the file",
        (6..=8).map(add).collect(),
        true,
    )?;
    measure(
        "reload with one entry added by hand",
        vec![vec!["reload".to_string()]; 3],
        true,
    )?;
    Ok(serde_json::json!(rows))
}

/// The VPN stage: the same packets with and without it (a load-time switch), at 10 prefixes.
fn vpn_stage(out: &mut String) -> anyhow::Result<serde_json::Value> {
    let udp = |src: &str, src_port, dst_port, mut data: Vec<u8>, len: usize| {
        data.resize(len, 0x5C);
        Frame::udp_data(src, src_port, "192.0.2.1", dst_port, data).build()
    };
    let https = {
        let mut hello = vec![0x16, 3, 1, 2, 0, 1, 0, 1, 0xFC, 3, 3];
        hello.resize(517, 0x5C);
        Frame::new(
            "198.51.100.10".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            L4::TcpData {
                src_port: 40002,
                dst_port: 443,
                data: hello,
            },
        )
        .build()
    };
    // In this order: the OpenVPN reset switches on the flow lookup for every later TCP/UDP
    // packet, so HTTPS is measured before and after it.
    let packets = [
        ("HTTPS from an allowed source", https.clone()),
        (
            "WireGuard data packet (128 B)",
            udp(
                "203.0.113.5",
                51820,
                40000,
                vec![4, 0, 0, 0, 1, 2, 3, 4, 9, 0, 0, 0, 0, 0, 0, 0],
                128,
            ),
        ),
        (
            "OpenVPN client hard reset",
            udp(
                "203.0.113.5",
                40001,
                1194,
                vec![0x38, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0],
                14,
            ),
        ),
        ("HTTPS, after a stateful VPN flow was seen", https),
    ];
    let registry = Distribution::Realistic.registry(10);
    let with = Loaded::new(&registry);
    let without = Loaded::without_vpn_stage(&registry);
    writeln!(
        out,
        "\nVPN stage (10 prefixes)                   with VPN stage   without   difference"
    )?;
    let mut rows = Vec::new();
    for (what, frame) in &packets {
        let a = median((0..RUNS).map(|_| with.time(frame, REPEAT)).collect());
        let b = median((0..RUNS).map(|_| without.time(frame, REPEAT)).collect());
        writeln!(
            out,
            "{what:<40} {a:>12} {b:>10} {:>+12}",
            i128::from(a) - i128::from(b)
        )?;
        rows.push(serde_json::json!({"packet": what, "with_ns": a, "without_ns": b}));
    }
    Ok(serde_json::json!(rows))
}

/// Connection state and the egress verdict: the egress program's cost per outgoing packet, in
/// egress enforce and with egress off (the connection table only), beside a bare TC program; and
/// the ingress reply check's cost for the packets it may meet: an allowed one (no check), a reply
/// to a connection the server opened, a packet from an unlisted peer the server has no
/// connection with (one array read), and one from a peer with a connection but on another port
/// (the lookup, then a drop).
fn conn_state(out: &mut String) -> anyhow::Result<serde_json::Value> {
    let mut baseline = EbpfLoader::new().load(BASELINE_OBJECT)?;
    let bare: &mut aya::programs::SchedClassifier = baseline
        .program_mut("baseline_tc")
        .expect("baseline_tc")
        .try_into()?;
    bare.load()?;
    let tcp = enforcer_tests::packet::tcp_segment;
    let udp = |src: &str, src_port, dst: &str, dst_port| {
        Frame::udp_data(src, src_port, dst, dst_port, vec![0x5C; 40]).build()
    };
    let (server, upstream, lan) = ("192.0.2.1", "192.0.2.66", "198.51.100.10");
    let registry = r#"{"schema": 1, "mode": "enforce", "egress": "enforce",
      "networks": [{"name": "lan", "cidr": "198.51.100.0/24"}],
      "upstreams": [{"name": "ldap", "address": "192.0.2.66", "ports": ["636/tcp", "53/udp"]},
                    {"name": "pool", "cidr": "192.0.2.0/24", "ports": ["123/udp"]}]}"#;
    let mut loaded = Loaded::new(registry);
    let time_tc = |program: &aya::programs::SchedClassifier, frame: &[u8]| {
        median(
            (0..RUNS)
                .map(|_| enforcer_tests::kernel::time_of(program, frame, REPEAT))
                .collect(),
        )
    };
    let outgoing = [
        (
            "TCP SYN (records a connection)",
            tcp(server, 40_001, upstream, 636, 0x02),
        ),
        (
            "TCP ACK on it (moves its expiry)",
            tcp(server, 40_001, upstream, 636, 0x10),
        ),
        (
            "UDP datagram (records an exchange)",
            udp(server, 53_001, upstream, 53),
        ),
        (
            "answer to an approved client",
            tcp(server, 443, lan, 50_000, 0x10),
        ),
        (
            "to the internet (egress_denied)",
            tcp(server, 40_002, "203.0.113.80", 443, 0x02),
        ),
    ];
    writeln!(
        out,
        "
connection state and egress verdict (ns)    enforce  egress off   bare TC   verdict cost"
    )?;
    let mut rows = Vec::new();
    let time_egress = |loaded: &Loaded, frame: &[u8]| {
        median(
            (0..RUNS)
                .map(|_| loaded.time_egress(frame, REPEAT))
                .collect(),
        )
    };
    let enforced: Vec<u64> = outgoing
        .iter()
        .map(|(_, frame)| time_egress(&loaded, frame))
        .collect();
    loaded.set_egress(enforcer::registry::EgressMode::Off);
    for ((what, frame), a) in outgoing.iter().zip(enforced) {
        let off = time_egress(&loaded, frame);
        let b = time_tc(bare, frame);
        writeln!(
            out,
            "{what:<44} {a:>7} {off:>11} {b:>9} {:>+14}",
            i128::from(a) - i128::from(off)
        )?;
        rows.push(
            serde_json::json!({"packet": what, "egress_ns": a, "egress_off_ns": off, "bare_tc_ns": b}),
        );
    }
    let incoming = [
        (
            "allowed source (no check)",
            tcp(lan, 50_000, server, 443, 0x10),
        ),
        (
            "reply to a connection the server opened",
            tcp(upstream, 636, server, 40_001, 0x10),
        ),
        (
            "unlisted source, no connection (one array read)",
            udp("203.0.113.9", 53, server, 53_001),
        ),
        (
            "unlisted peer with a connection, another port",
            udp(upstream, 53, server, 53_999),
        ),
    ];
    writeln!(out, "connection state, ingress (ns)")?;
    for (what, frame) in &incoming {
        let a = median((0..RUNS).map(|_| loaded.time(frame, REPEAT)).collect());
        writeln!(out, "{what:<52} {a:>10}")?;
        rows.push(serde_json::json!({"packet": what, "ingress_ns": a}));
    }
    Ok(serde_json::json!(rows))
}

/// The IPv4 prefixes of a benchmark registry (for the peers, which get the same list).
fn v4_prefixes(registry: &str) -> Vec<Ipv4Net> {
    let registry = enforcer::registry::Registry::parse(registry).expect("bench registry parses");
    registry
        .networks
        .iter()
        .filter_map(|n| match n.cidr {
            IpNet::V4(net) => Some(net),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// Frames per flood (about a second at the rates seen here).
const FLOOD_FRAMES: u32 = 4_000_000;
const FLOOD_ROUNDS: usize = 15;
const FLOOD_CPU: usize = 1;

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Loads a floor program from the baseline object and attaches it (native mode) to the
/// receiver's interface; it stays attached until the returned object is dropped.
fn attach_floor(lab: &FloodLab, name: &str, prefixes: &[Ipv4Net]) -> anyhow::Result<Ebpf> {
    lab.rx.enter(|| -> anyhow::Result<Ebpf> {
        let mut ebpf = EbpfLoader::new().load(BASELINE_OBJECT)?;
        if !prefixes.is_empty() {
            let mut trie: LpmTrie<_, [u8; 4], u32> =
                LpmTrie::try_from(ebpf.map_mut("BASELINE_LPM").expect("BASELINE_LPM"))?;
            for net in prefixes {
                trie.insert(
                    &Key::new(u32::from(net.prefix_len()), net.network().octets()),
                    1,
                    0,
                )?;
            }
        }
        let program: &mut Xdp = ebpf.program_mut(name).expect("floor program").try_into()?;
        program.load()?;
        program.attach(flood::IFACE, aya::programs::XdpMode::Driver)?;
        Ok(ebpf)
    })?
}

/// nftables: a netdev ingress chain dropping sources outside an interval set of the prefixes.
fn nft_allowlist(
    lab: &FloodLab,
    prefixes: &[Ipv4Net],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let elements: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
    let rules = format!(
        "table netdev enforcer_bench {{\n  set allow {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}\n  chain ingress {{ type filter hook ingress device \"{}\" priority 0; policy accept; ip saddr != @allow drop; }}\n}}\n",
        elements.join(", "),
        flood::IFACE
    );
    let file = dir.join("allow.nft");
    std::fs::write(&file, rules)?;
    lab.rx.exec(&["nft", "-f", &file.display().to_string()])?;
    Ok(())
}

/// iptables + ipset: a hash:net set of the prefixes, and a raw-table rule dropping the rest.
fn ipset_allowlist(
    lab: &FloodLab,
    prefixes: &[Ipv4Net],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let mut restore =
        String::from("create enforcer_bench hash:net family inet hashsize 65536 maxelem 2000000\n");
    for net in prefixes {
        writeln!(restore, "add enforcer_bench {net}")?;
    }
    let file = dir.join("allow.ipset");
    std::fs::write(&file, restore)?;
    lab.rx
        .exec(&["ipset", "restore", "-file", &file.display().to_string()])?;
    lab.rx.exec(&[
        "iptables",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-i",
        flood::IFACE,
        "-m",
        "set",
        "!",
        "--match-set",
        "enforcer_bench",
        "src",
        "-j",
        "DROP",
    ])?;
    Ok(())
}

/// What keeps a receiver's filter installed while it is measured.
#[expect(
    dead_code,
    reason = "held for its drop: the filter stays installed while it lives"
)]
enum Filter {
    Program(Ebpf),
    Enforcer(enforcer_tests::daemon::Enforcer),
    /// nftables or iptables rules, behind a pass-through XDP program.
    Rules(Ebpf),
}

/// One receiver under test.
struct Receiver {
    label: String,
    lab: FloodLab,
    filter: Filter,
    setup: Setup,
    rates: Vec<f64>,
    softirq: Vec<f64>,
    program_ns: Option<f64>,
}

/// How a receiver is set up. The XDP receivers are set up anew on a fresh lab (namespaces and
/// veth pair) every round: two labs running the same program differ by 2–5 % in rate, a lab's
/// bias that would otherwise follow its receiver through the whole run (within one lab, two
/// loads of one program differ by 1–2 %; scratch harness, 2026-11-28).
enum Setup {
    Floor {
        program: &'static str,
        prefixes: Vec<Ipv4Net>,
        /// The lab floods IPv6 (`FloodLab::new_v6`).
        v6: bool,
    },
    Enforcer {
        registry: std::path::PathBuf,
        v6: bool,
    },
    /// nftables and iptables receivers keep their lab: loading a 100,000-entry set takes
    /// seconds, and they are far from the XDP receivers' rates anyway.
    Kept,
}

impl Setup {
    fn lab(&self) -> anyhow::Result<(FloodLab, Filter)> {
        let lab = match self {
            Setup::Floor { v6: true, .. } | Setup::Enforcer { v6: true, .. } => FloodLab::new_v6()?,
            _ => FloodLab::new()?,
        };
        let filter = match self {
            Setup::Floor {
                program, prefixes, ..
            } => Filter::Program(attach_floor(&lab, program, prefixes)?),
            Setup::Enforcer { registry, .. } => Filter::Enforcer(
                enforcer_tests::daemon::Enforcer::start(&lab.rx, flood::IFACE, registry, &[])?,
            ),
            Setup::Kept => anyhow::bail!("a kept receiver is not set up again"),
        };
        Ok((lab, filter))
    }
}

impl Receiver {
    fn new(label: String, lab: FloodLab, filter: Filter, setup: Setup) -> Self {
        Self {
            label,
            lab,
            filter,
            setup,
            rates: Vec::new(),
            softirq: Vec::new(),
            program_ns: None,
        }
    }

    /// A receiver set up on a lab of its own, as `setup` says.
    fn set_up(label: String, setup: Setup) -> anyhow::Result<Self> {
        let (lab, filter) = setup.lab()?;
        Ok(Self::new(label, lab, filter, setup))
    }
}

/// Stops what a receiver runs (an enforcer daemon, and its attachment) before its lab goes.
fn retire(filter: Filter) -> anyhow::Result<()> {
    if let Filter::Enforcer(mut enforcer) = filter {
        enforcer.stop()?;
        enforcer.detach()?;
    }
    Ok(())
}

/// The flood: drop rate and receiver CPU per packet of every filter, at 10 and 100,000 entries,
/// all in one run. Every receiver is set up first, then the rounds go through all of them in
/// turn (one flood each, in an order shuffled per round), so drifts of this shared machine
/// spread over all receivers alike; the XDP receivers get a fresh lab each round (`Setup`). The
/// figures are medians over the rounds.
fn flood(out: &mut String) -> anyhow::Result<serde_json::Value> {
    use enforcer_tests::vpn::TempDir;

    let dir = TempDir::new("enf-flood")?;
    let mut receivers: Vec<Receiver> = Vec::new();
    let floor = |program: &'static str, prefixes: &[Ipv4Net]| Setup::Floor {
        program,
        prefixes: prefixes.to_vec(),
        v6: false,
    };
    // The stack's receivers sit behind a pass-through XDP program: a veth takes XDP frames only
    // when its peer runs XDP (about 10 ns of the figures below, the bare XDP_PASS cost).
    receivers.push(Receiver::set_up(
        "XDP_PASS, then the stack drops it".into(),
        floor("baseline_pass", &[]),
    )?);
    receivers.push(Receiver::set_up(
        "bare XDP_DROP".into(),
        floor("baseline_drop", &[]),
    )?);
    receivers.push(Receiver::set_up(
        "read EtherType + source, count (floor)".into(),
        floor("baseline_read_count", &[]),
    )?);
    // The IPv6 flood (from 16,384 /64s of `flood::SOURCES_V6`) against its own bare XDP_DROP:
    // its frames are 12 bytes longer.
    receivers.push(Receiver::set_up(
        "IPv6: bare XDP_DROP".into(),
        Setup::Floor {
            program: "baseline_drop",
            prefixes: Vec::new(),
            v6: true,
        },
    )?);
    for size in [10usize, 100_000] {
        let text = Distribution::Realistic.registry(size);
        let prefixes = v4_prefixes(&text);
        receivers.push(Receiver::set_up(
            format!("one LPM-trie lookup (floor), {size}"),
            floor("baseline_lpm", &prefixes),
        )?);
        let registry = dir.0.join(format!("registry-{size}.json"));
        std::fs::write(&registry, &text)?;
        receivers.push(Receiver::set_up(
            format!("enforcer, {size}"),
            Setup::Enforcer {
                registry: registry.clone(),
                v6: false,
            },
        )?);
        receivers.push(Receiver::set_up(
            format!("IPv6: enforcer, {size}"),
            Setup::Enforcer { registry, v6: true },
        )?);
        let lab = FloodLab::new()?;
        nft_allowlist(&lab, &prefixes, &dir.0)?;
        let pass = attach_floor(&lab, "baseline_pass", &[])?;
        receivers.push(Receiver::new(
            format!("nftables set (netdev ingress), {size}"),
            lab,
            Filter::Rules(pass),
            Setup::Kept,
        ));
        let lab = FloodLab::new()?;
        ipset_allowlist(&lab, &prefixes, &dir.0)?;
        let pass = attach_floor(&lab, "baseline_pass", &[])?;
        receivers.push(Receiver::new(
            format!("iptables + ipset hash:net, {size}"),
            lab,
            Filter::Rules(pass),
            Setup::Kept,
        ));
    }
    for r in &receivers {
        r.lab.flood(FLOOD_FRAMES / 4, FLOOD_CPU)?;
    }
    // Each round in its own order: floods run back to back, and a receiver's place in the
    // round moves its rate by a few percent (the one right after bare XDP_DROP gained 1–3 % in
    // a scratch harness), so no receiver keeps the same place.
    let mut rng = Rng(0x00F1_00D5);
    for round in 0..FLOOD_ROUNDS {
        if round > 0 {
            for r in &mut receivers {
                if matches!(r.setup, Setup::Kept) {
                    continue;
                }
                let (lab, filter) = r.setup.lab()?;
                retire(std::mem::replace(&mut r.filter, filter))?;
                r.lab = lab;
                r.lab.flood(FLOOD_FRAMES / 4, FLOOD_CPU)?;
            }
        }
        let mut order: Vec<usize> = (0..receivers.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, usize::try_from(rng.next_u64() % (i as u64 + 1))?);
        }
        for i in order {
            let r = &mut receivers[i];
            let sample = r.lab.flood(FLOOD_FRAMES, FLOOD_CPU)?;
            r.rates.push(sample.mpps());
            r.softirq.push(sample.softirq_ns);
        }
        eprintln!("bench: flood round {} of {FLOOD_ROUNDS} done", round + 1);
    }
    // The XDP programs' own run time per packet, from the kernel's program statistics (on only
    // for this extra round: keeping time costs a little per run).
    {
        let _stats = flood::enable_program_stats()?;
        for r in &mut receivers {
            if matches!(r.filter, Filter::Program(_) | Filter::Enforcer(_)) {
                r.program_ns = r.lab.program_ns(FLOOD_FRAMES, FLOOD_CPU)?;
            }
        }
    }
    for r in &receivers {
        if let Filter::Enforcer(enforcer) = &r.filter {
            let stats = enforcer.stats()?;
            anyhow::ensure!(
                stats.packets("not_allowlisted") > 0,
                "{}: the enforcer counted the flood as not_allowlisted",
                r.label
            );
        }
    }
    // Each receiver against bare XDP_DROP in the same round (floods a few seconds apart), then
    // the median over rounds: this machine's speed drifts by tens of percent within a run, and
    // a ratio of two medians taken at different moments carries that drift.
    let bare = |label: &str| {
        receivers
            .iter()
            .find(|r| r.label == label)
            .map(|r| r.rates.clone())
            .ok_or_else(|| anyhow::anyhow!("no {label} receiver"))
    };
    let (bare_rounds, bare_rounds_v6) = (bare("bare XDP_DROP")?, bare("IPv6: bare XDP_DROP")?);
    let vs_bare = |r: &Receiver| {
        let bare = if r.lab.v6 {
            &bare_rounds_v6
        } else {
            &bare_rounds
        };
        median_f64(
            r.rates
                .iter()
                .zip(bare)
                .map(|(rate, bare)| rate / bare)
                .collect(),
        )
    };
    writeln!(
        out,
        "\nveth flood: 60-byte UDP from 16,384 sources in {} (none listed), and for the IPv6 rows 72-byte UDP from 16,384 /64s of {} (none listed, in the /16 of the registry's approved IPv6 /64), made in the kernel (live-frames test run of an XDP generator redirecting out of a veth) on CPU {FLOOD_CPU}, where the receiver's work runs too (softirq). Median of {FLOOD_ROUNDS} rounds x {FLOOD_FRAMES} frames, receivers interleaved in an order shuffled per round, the XDP receivers on a fresh veth lab each round; 'vs bare drop' is the median of each round's rate over bare XDP_DROP's (of its family) in that round",
        flood::SOURCES,
        flood::SOURCES_V6
    )?;
    writeln!(
        out,
        "{:<40}{:>8}{:>14}{:>20}{:>18}",
        "receiver", "Mpps", "vs bare drop", "softirq ns/packet", "XDP prog ns/pkt"
    )?;
    let mut rows = Vec::new();
    for r in &mut receivers {
        let mpps = median_f64(r.rates.clone());
        let softirq = median_f64(r.softirq.clone());
        let program = r
            .program_ns
            .map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}"));
        writeln!(
            out,
            "{:<40}{mpps:>8.2}{:>13.2}x{softirq:>20.0}{program:>18}",
            r.label,
            vs_bare(r)
        )?;
        rows.push(serde_json::json!({
            "receiver": r.label, "mpps": mpps, "vs_bare_drop": vs_bare(r),
            "softirq_ns_per_packet": softirq, "xdp_program_ns_per_packet": r.program_ns,
            "rounds_mpps": r.rates, "rounds_softirq_ns": r.softirq,
        }));
    }
    for r in receivers {
        retire(r.filter)?;
    }
    Ok(serde_json::json!(rows))
}

fn main() -> anyhow::Result<()> {
    require_root();
    let parts: Vec<String> = std::env::args().skip(1).collect();
    for part in &parts {
        anyhow::ensure!(
            PARTS.contains(&part.as_str()),
            "unknown bench part {part:?}; parts: {}",
            PARTS.join(", ")
        );
    }
    let want = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    let mut table = String::new();
    let mut json = serde_json::Map::new();
    if want("test-run") {
        json.insert("per_packet".into(), test_run(&mut table, &out)?);
    }
    if want("xdp-filter") {
        json.insert(
            "xdp_filter".into(),
            xdp_filter_peer(&mut table, &packets())?,
        );
    }
    if want("vpn") {
        json.insert("vpn_stage".into(), vpn_stage(&mut table)?);
    }
    if want("conns") {
        json.insert("connection_state".into(), conn_state(&mut table)?);
    }
    if want("flood") {
        json.insert("flood".into(), flood(&mut table)?);
    }
    if want("control") {
        json.insert("control_plane".into(), control_plane(&mut table)?);
    }
    if want("fleet") {
        json.insert("fleet".into(), fleet::fleet(&mut table)?);
    }
    print!("{table}");
    let name = if parts.is_empty() {
        "bench.json".to_string()
    } else {
        format!("bench-{}.json", parts.join("-"))
    };
    std::fs::write(
        out.join(&name),
        format!("{:#}\n", serde_json::Value::Object(json)),
    )?;
    println!("written: target/bench/{name}");
    Ok(())
}

/// The parts `cargo xtask bench PART...` can run alone.
const PARTS: [&str; 7] = [
    "test-run",
    "xdp-filter",
    "vpn",
    "conns",
    "flood",
    "control",
    "fleet",
];

/// xdp-filter (exact /32 allowlist in a per-CPU hash) with random single addresses plus the
/// allowed packet's source, one size at a time (it allows one instance per host): median of
/// `RUNS` runs of the allowed and the dropped IPv4 packet.
fn xdp_filter_peer(
    table: &mut String,
    frames: &[(&'static str, Vec<u8>)],
) -> anyhow::Result<serde_json::Value> {
    use enforcer_tests::xdp_filter::XdpFilter;
    if !XdpFilter::available() {
        writeln!(
            table,
            "\nxdp-filter: not installed (xdp-tools), not measured"
        )?;
        return Ok(serde_json::Value::Null);
    }
    let mut rows = Vec::new();
    let mut cells = (String::new(), String::new());
    let mut limits = Vec::new();
    for size in SIZES {
        let mut rng = Rng(0x00F1_17E4 ^ size as u64);
        let allowed: [u8; 4] = [198, 51, 100, 10];
        let mut sources = vec![allowed];
        while sources.len() < size {
            let addr = u32::try_from(rng.next_u64() >> 32).unwrap();
            let net = IpNet::V4(Ipv4Net::new(addr.into(), 32).unwrap());
            if clear_of_reserved(net) {
                sources.push(addr.to_be_bytes());
            }
        }
        let measured = XdpFilter::load(&sources).and_then(|filter| {
            let time = |frame: &[u8], expect: u32| -> anyhow::Result<u64> {
                let mut runs = Vec::new();
                for _ in 0..RUNS {
                    let (action, ns) = filter.time(frame, REPEAT)?;
                    anyhow::ensure!(
                        action == expect,
                        "xdp-filter returned {action}, expected {expect}"
                    );
                    runs.push(ns);
                }
                Ok(median(runs))
            };
            Ok((time(&frames[0].1, 2)?, time(&frames[1].1, 1)?))
        });
        match measured {
            Ok((allowed_ns, dropped_ns)) => {
                write!(cells.0, "{allowed_ns:>10}")?;
                write!(cells.1, "{dropped_ns:>10}")?;
                rows.push(serde_json::json!({"size": size, "allowed_ipv4_ns": allowed_ns, "dropped_ipv4_ns": dropped_ns}));
            }
            Err(e) => {
                write!(cells.0, "{:>10}", "-")?;
                write!(cells.1, "{:>10}", "-")?;
                eprintln!("bench: xdp-filter at {size}: {e:#}");
                limits.push(format!("{size}: {e:#}"));
                rows.push(serde_json::json!({"size": size, "error": format!("{e:#}")}));
            }
        }
        eprintln!("bench: xdp-filter {size} done");
    }
    let header: String = SIZES.iter().map(|s| format!("{s:>10}")).collect();
    writeln!(
        table,
        "\nxdp-filter, exact /32 allowlist (random addresses){:<5}{header}",
        ""
    )?;
    writeln!(table, "{:<38}{}", "allowed IPv4", cells.0)?;
    writeln!(table, "{:<38}{}", "dropped IPv4", cells.1)?;
    if !limits.is_empty() {
        writeln!(table, "(not measured at {})", limits.join("; "))?;
    }
    Ok(serde_json::json!(rows))
}

/// Per-packet cost through `BPF_PROG_TEST_RUN`, both distributions, all sizes; writes the chart.
fn test_run(table: &mut String, out: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let frames = packets();
    let mut baseline = EbpfLoader::new().load(BASELINE_OBJECT)?;
    let pass: &mut Xdp = baseline
        .program_mut("baseline_pass")
        .expect("baseline_pass")
        .try_into()?;
    pass.load()?;
    let bare = time_program(pass, &frames[0].1);

    let series = measure_distributions(
        &[
            Distribution::Realistic,
            Distribution::Worst,
            Distribution::ManyLengths,
        ],
        &frames,
    )?;

    writeln!(
        table,
        "per-packet cost via BPF_PROG_TEST_RUN (ns): {RUNS} runs x {REPEAT} repeats on each of {INSTANCES} program instances per size, their median and their fastest; bare XDP_PASS = {bare} ns"
    )?;
    let header: String = SIZES.iter().map(|s| format!("{s:>10}")).collect();
    for s in &series {
        writeln!(
            table,
            "\n{} registry{:<19}{header}   1M / 10",
            s.distribution, ""
        )?;
        let mut rows = |title: &str, rows: &[(&str, Vec<u64>)], lpm: &Vec<u64>| {
            writeln!(table, "{title}")?;
            for (what, values) in rows
                .iter()
                .map(|(w, v)| (*w, v))
                .chain(std::iter::once(("one kernel LPM lookup (floor)", lpm)))
            {
                let cells: String = values.iter().map(|v| format!("{v:>10}")).collect();
                let ratio =
                    *values.last().unwrap() as f64 / (*values.first().unwrap()).max(1) as f64;
                writeln!(table, "{what:<38}{cells}   {ratio:>5.2}x")?;
            }
            anyhow::Ok(())
        };
        rows("median of all runs", &s.rows, &s.lpm)?;
        rows(
            "fastest run (a run is only ever slowed by what else the machine does)",
            &s.fastest,
            &s.lpm_fastest,
        )?;
        let loads: String = s.load_ms.iter().map(|v| format!("{v:>10}")).collect();
        writeln!(table, "{:<38}{loads}", "load: parse+compile+load+fill (ms)")?;
    }
    // The issue of flat cost: a packet's cost in one registry against another's, row by row,
    // from the same rounds.
    let row = |series: &Series, what: &str| -> Vec<u64> {
        series
            .fastest
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (realistic, many) = (&series[0], &series[2]);
    writeln!(table, "\nratios of the fastest runs{:<12}{header}", "")?;
    for (what, a, b) in [
        (
            "expanded allowed / realistic allowed6",
            row(many, "allowed IPv6, expanded /32"),
            row(realistic, "allowed IPv6"),
        ),
        (
            "most probes / realistic allowed6",
            row(many, "allowed IPv6, expanded, most probes"),
            row(realistic, "allowed IPv6"),
        ),
        (
            "expanded dropped / realistic dropped6",
            row(many, "dropped IPv6, expanded /32"),
            row(realistic, "dropped IPv6"),
        ),
        (
            "realistic dropped6 / dropped4",
            row(realistic, "dropped IPv6"),
            row(realistic, "dropped IPv4"),
        ),
    ] {
        let cells: String = a
            .iter()
            .zip(&b)
            .map(|(a, b)| format!("{:>10.2}", *a as f64 / (*b).max(1) as f64))
            .collect();
        writeln!(table, "{what:<38}{cells}")?;
    }
    std::fs::write(out.join("cost.svg"), chart(&series, bare))?;
    writeln!(table, "chart: target/bench/cost.svg")?;
    Ok(serde_json::json!({
        "repeat": REPEAT, "runs": RUNS, "sizes": SIZES, "bare_pass_ns": bare,
        "series": series.iter().map(|s| serde_json::json!({
            "distribution": s.distribution,
            "rows": s.rows.iter().zip(&s.fastest).map(|((w, v), (_, f))| serde_json::json!({"packet": w, "ns": v, "fastest_ns": f})).collect::<Vec<_>>(),
            "lpm_floor_ns": s.lpm, "lpm_floor_fastest_ns": s.lpm_fastest, "load_ms": s.load_ms,
        })).collect::<Vec<_>>(),
    }))
}
