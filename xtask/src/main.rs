//! `cargo xtask`: set up, build, demo, test and benchmark the enforcer.

mod fuzz;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Set-up, build, demo, test and bench of the enforcer"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (Debian packages, rust-src, bpf-linker, bpffs).
    Setup,
    /// Set up, then build the enforcer (the XDP program is built and embedded).
    Build,
    /// Set up, build, and show the enforcer protecting a throw-away namespace lab.
    Demo,
    /// Set up, build, and run every test: unit, kernel (`BPF_PROG_TEST_RUN`) and namespace tests,
    /// the differential fuzzer, then (without a filter) each cargo-fuzz target for 20 s.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run each cargo-fuzz target of `fuzz/` (registry, feed, control) for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build the Debian package `target/debian/enforcer_VERSION_amd64.deb` (cargo-deb): the
    /// binary, the example registry, the systemd unit, man pages, completions and the docs.
    Package {
        /// The package version, if not the crate's (e.g. to test an upgrade).
        #[arg(long)]
        deb_version: Option<String>,
    },
    /// Set up (with the peers), build, and measure: per-packet cost (`BPF_PROG_TEST_RUN`) beside
    /// floor programs and xdp-filter, a veth flood beside nftables and iptables+ipset, and the
    /// control plane, and a fleet (etcd cluster, 20 agents). Parts by name: `test-run`,
    /// `xdp-filter`, `vpn`, `conns`, `flood`, `control`, `fleet` (default: all).
    Bench {
        #[arg(trailing_var_arg = true)]
        parts: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Build => {
            setup::setup()?;
            build()
        }
        Task::Demo => {
            setup::setup()?;
            build()?;
            // The demo lives in the test harness crate: xtask itself must build on a machine
            // without bpf-linker, since installing it is what setup is for.
            cargo(&["run", "--quiet", "-p", "enforcer-tests", "--bin", "demo"])
        }
        Task::Test { args } => {
            setup::setup()?;
            build()?;
            test(&args)?;
            if args.is_empty() {
                let cargo_fuzz = setup::fuzzer()?;
                fuzz::run(&cargo_fuzz, FUZZ_SECONDS_IN_TEST)?;
            }
            Ok(())
        }
        Task::Fuzz { seconds } => {
            setup::setup()?;
            let cargo_fuzz = setup::fuzzer()?;
            fuzz::run(&cargo_fuzz, seconds)
        }
        Task::Package { deb_version } => {
            setup::setup()?;
            let cargo_deb = setup::packager()?;
            package(&cargo_deb, deb_version.as_deref())
        }
        Task::Bench { parts } => {
            setup::setup()?;
            setup::bench_peers()?;
            build()?;
            // The controller is measured as shipped: a release build.
            cargo(&["build", "--release", "-p", "enforcer"])?;
            let mut args = vec![
                "run",
                "--release",
                "-p",
                "enforcer-tests",
                "--bin",
                "bench",
                "--",
            ];
            args.extend(parts.iter().map(String::as_str));
            cargo_with(&args, &workspace_root().join("target/release/enforcer"))
        }
    }
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

fn enforcer_bin() -> PathBuf {
    workspace_root().join("target/debug/enforcer")
}

/// Runs cargo in the workspace with our bpf-linker on PATH.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    cargo_with(args, &enforcer_bin())
}

/// Runs cargo with `ENFORCER_BIN` (the controller binary tests and benches run) set to `bin`.
fn cargo_with(args: &[&str], bin: &std::path::Path) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
        .args(args)
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_linker())
        .env("ENFORCER_BIN", bin)
        .status()?;
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

/// The release binary, the man pages and completions it generates, then cargo-deb.
fn package(cargo_deb: &std::path::Path, deb_version: Option<&str>) -> anyhow::Result<()> {
    cargo(&["build", "--release", "-p", "enforcer"])?;
    let root = workspace_root();
    let out = root.join("target/package");
    let _ = std::fs::remove_dir_all(&out);
    let (man, completions) = (out.join("man"), out.join("completions"));
    std::fs::create_dir_all(&completions)?;
    let binary = root.join("target/release/enforcer");
    let run = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let output = Command::new(&binary).args(args).output()?;
        if !output.status.success() {
            bail!("`enforcer {}` failed", args.join(" "));
        }
        Ok(output.stdout)
    };
    run(&["generate", "man", &man.display().to_string()])?;
    // Man pages are installed compressed (Debian policy), reproducibly (no name, no time).
    for page in std::fs::read_dir(&man)? {
        let page = page?.path();
        if !Command::new("gzip")
            .args(["-9n"])
            .arg(&page)
            .status()?
            .success()
        {
            bail!("gzip {} failed", page.display());
        }
    }
    for (shell, file) in [
        ("bash", "enforcer.bash"),
        ("zsh", "_enforcer"),
        ("fish", "enforcer.fish"),
    ] {
        std::fs::write(
            completions.join(file),
            run(&["generate", "completions", shell])?,
        )?;
    }
    let mut args = vec!["-p", "enforcer", "--no-build"];
    if let Some(version) = deb_version {
        args.extend(["--deb-version", version]);
    }
    let status = Command::new(cargo_deb)
        .args(&args)
        .current_dir(&root)
        .env("PATH", setup::path_with_linker())
        .status()?;
    if !status.success() {
        bail!("cargo-deb failed");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    cargo(&["build", "-p", "enforcer"])
}

/// Runs the suite, echoing cargo's output, and closes with one line that totals every test
/// binary's result (cargo's own last line is often a doc-test run with no tests).
fn test(extra: &[String]) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    // The eBPF crate builds only for the BPF target (through enforcer's build.rs).
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
        .args([
            "test",
            "--workspace",
            "--exclude",
            "enforcer-ebpf",
            "--no-fail-fast",
        ])
        .args(extra)
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_linker())
        .env("ENFORCER_BIN", enforcer_bin())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                summary
                    .split(['.', ';'])
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .and_then(|n| n.trim().parse().ok())
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    println!("xtask: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
