//! `cargo xtask bench`: per-packet cost of the enforcer's verdict through `BPF_PROG_TEST_RUN`, at
//! several registry sizes, beside a bare `XDP_PASS` program measured in the same run.
//!
//! Method: for each (program, packet, size) the kernel runs the program `REPEAT` times on the
//! same frame and reports the mean ns per run; we take the median of `RUNS` such runs.

use std::{fmt::Write as _, time::Instant};

use aya::{
    EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use enforcer::datapath::BASELINE_OBJECT;
use enforcer_tests::{
    kernel::Loaded,
    netns::require_root,
    packet::{Frame, L4},
};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 5;
const SIZES: [usize; 2] = [10, 100_000];

/// A registry of `n` networks: `n - 1` random prefixes from /8 to /30 (a BGP-table-like mix) plus
/// the network the "allowed" packet comes from.
fn registry(n: usize) -> String {
    registry_text(n)
}

fn registry_text(n: usize) -> String {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ n as u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut seen = std::collections::HashSet::new();
    let mut networks = vec![r#"{"name": "bench-allowed", "cidr": "198.51.100.0/24"}"#.to_string()];
    while networks.len() < n {
        let len = u8::try_from(8 + next() % 23).unwrap();
        let addr = u32::try_from(next() & 0xFFFF_FFFF).unwrap();
        let net = ipnet::Ipv4Net::new(addr.into(), len).unwrap().trunc();
        // keep the dropped packet's source (203.0.113.5) and the allowed network out of the mix
        let bench_ranges =
            ["203.0.113.0/24", "198.51.100.0/24"].map(|c| c.parse::<ipnet::Ipv4Net>().unwrap());
        if bench_ranges
            .iter()
            .any(|r| r.contains(&net) || net.contains(r))
            || !seen.insert(net)
        {
            continue;
        }
        networks.push(format!(
            r#"{{"name": "n{}", "cidr": "{net}"}}"#,
            networks.len()
        ));
    }
    format!(
        r#"{{"schema": 1, "mode": "enforce", "networks": [{}]}}"#,
        networks.join(",")
    )
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn measure(time: impl Fn() -> u64) -> u64 {
    median((0..RUNS).map(|_| time()).collect())
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
    std::fs::write(
        &registry,
        r#"{"schema": 1, "mode": "enforce", "networks": [{"name": "lan", "cidr": "198.51.100.0/24"}]}"#,
    )?;
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
        "\ncontrol plane (real controller, CLI process start → return = map updated)"
    )?;
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
        std::fs::write(&registry, registry_text(10))?;
        cli(&["reload"])?;
        std::fs::write(&registry, registry_text(size))?;
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
    Ok(
        serde_json::json!({"allow_add_median_ms": median as f64 / 1000.0, "allow_add_p90_ms": p90 as f64 / 1000.0, "reloads": reloads}),
    )
}

fn main() -> anyhow::Result<()> {
    require_root();
    let allowed = Frame::tcp("198.51.100.10", "192.0.2.1", 443).build();
    let dropped = Frame::tcp("203.0.113.5", "192.0.2.1", 443).build();

    let mut baseline_ebpf = EbpfLoader::new().load(BASELINE_OBJECT)?;
    let baseline: &mut Xdp = baseline_ebpf
        .program_mut("baseline_pass")
        .expect("baseline_pass")
        .try_into()?;
    baseline.load()?;
    let bare = measure(|| {
        let opts = TestRunOptions {
            data_in: Some(&allowed),
            repeat: REPEAT,
            ..TestRunOptions::new()
        };
        u64::try_from(
            baseline
                .test_run(opts)
                .expect("test_run")
                .duration
                .as_nanos(),
        )
        .unwrap()
    });

    let mut rows = Vec::new();
    for size in SIZES {
        let text = registry(size);
        let started = Instant::now();
        let loaded = Loaded::new(&text);
        let load_ms = started.elapsed().as_millis();
        let allowed_ns = measure(|| loaded.time(&allowed, REPEAT));
        let dropped_ns = measure(|| loaded.time(&dropped, REPEAT));
        assert_eq!(loaded.run(&allowed), 2, "the allowed packet passes");
        assert_eq!(loaded.run(&dropped), 1, "the dropped packet drops");
        rows.push((size, allowed_ns, dropped_ns, load_ms));
    }

    // The VPN stage: the same packets through the program with and without it (a load-time
    // switch), at 10 prefixes.
    let udp = |src: &str, src_port, dst_port, mut data: Vec<u8>, len: usize| {
        data.resize(len, 0x5C);
        Frame::new(
            src.parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            L4::UdpData {
                src_port,
                dst_port,
                data,
            },
        )
        .build()
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
    let vpn_packets = [
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
    let with_vpn = Loaded::new(&registry(10));
    let without_vpn = Loaded::without_vpn_stage(&registry(10));
    let vpn_rows: Vec<(&str, u64, u64)> = vpn_packets
        .iter()
        .map(|(what, frame)| {
            (
                *what,
                measure(|| with_vpn.time(frame, REPEAT)),
                measure(|| without_vpn.time(frame, REPEAT)),
            )
        })
        .collect();

    let mut table = String::new();
    writeln!(
        table,
        "per-packet cost via BPF_PROG_TEST_RUN, median of {RUNS} runs x {REPEAT} repeats (ns)"
    )?;
    writeln!(
        table,
        "{:<34} {:>10} {:>10} {:>14}",
        "program / packet", "prefixes", "ns/packet", "vs bare pass"
    )?;
    writeln!(
        table,
        "{:<34} {:>10} {:>10} {:>14}",
        "bare XDP_PASS", "-", bare, "1.00"
    )?;
    let ratio = |ns: u64| format!("{:.2}", ns as f64 / bare.max(1) as f64);
    for (size, allowed_ns, dropped_ns, _) in &rows {
        writeln!(
            table,
            "{:<34} {:>10} {:>10} {:>14}",
            "enforcer, allowed IPv4 TCP",
            size,
            allowed_ns,
            ratio(*allowed_ns)
        )?;
        writeln!(
            table,
            "{:<34} {:>10} {:>10} {:>14}",
            "enforcer, dropped IPv4 TCP",
            size,
            dropped_ns,
            ratio(*dropped_ns)
        )?;
    }
    writeln!(
        table,
        "\nVPN stage (10 prefixes)                   with VPN stage   without   difference"
    )?;
    for (what, with, without) in &vpn_rows {
        writeln!(
            table,
            "{what:<40} {with:>12} {without:>10} {:>+12}",
            i128::from(*with) - i128::from(*without)
        )?;
    }
    for (size, _, _, load_ms) in &rows {
        writeln!(
            table,
            "load (parse + compile + load + fill) of {size} prefixes: {load_ms} ms"
        )?;
    }
    let control = control_plane(&mut table)?;
    print!("{table}");

    let json = serde_json::json!({
        "repeat": REPEAT, "runs": RUNS, "bare_pass_ns": bare,
        "enforcer": rows.iter().map(|(size, a, d, l)| serde_json::json!({
            "prefixes": size, "allowed_ipv4_ns": a, "dropped_ipv4_ns": d, "load_ms": l})).collect::<Vec<_>>(),
        "control_plane": control,
        "vpn_stage": vpn_rows.iter().map(|(w, a, b)| serde_json::json!({"packet": w, "with_ns": a, "without_ns": b})).collect::<Vec<_>>(),
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("bench.json"), format!("{json:#}\n"))?;
    println!("written: target/bench/bench.json");
    Ok(())
}
