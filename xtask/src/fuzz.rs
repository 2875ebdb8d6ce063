//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` (the registry parser, the deny-feed
//! parser, the control protocol and its registry edits), each for a bounded time, from the
//! seeds in `fuzz/seeds/` and a fresh corpus. A crash fails the run and names the input
//! cargo-fuzz kept under `fuzz/artifacts/`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{setup, workspace_root};

/// The targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 3] = ["registry", "feed", "control"];

/// Runs each target for `seconds` with cargo-fuzz (at `cargo_fuzz`) on the nightly toolchain.
pub fn run(cargo_fuzz: &Path, seconds: u64) -> anyhow::Result<()> {
    let root = workspace_root();
    for target in TARGETS {
        let corpus = std::env::temp_dir().join(format!("enforcer-fuzz-{target}"));
        let _ = std::fs::remove_dir_all(&corpus);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(target);
        println!("xtask: fuzzing {target} for {seconds} s");
        // No sanitizer: the targets are safe Rust, where libFuzzer's coverage and Rust's own
        // panics find what there is to find, and an instrumented build of the enforcer's
        // dependencies would add minutes.
        let output = Command::new("rustup")
            .args(["run", "nightly"])
            .arg(cargo_fuzz)
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .arg(&seeds)
            .args(["--", &format!("-max_total_time={seconds}"), "-timeout=10"])
            .current_dir(&root)
            // The nightly cargo of `rustup run`, not the one that runs xtask.
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("PATH", setup::path_with_linker())
            .output()
            .context("cannot run cargo-fuzz")?;
        let log = String::from_utf8_lossy(&output.stderr);
        let _ = std::fs::remove_dir_all(&corpus);
        if !output.status.success() {
            eprintln!("{log}");
            bail!(
                "fuzz target {target} failed: the input is under {}",
                root.join("fuzz/artifacts").join(target).display()
            );
        }
        let done = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("(no summary)");
        println!("xtask: fuzz target {target}: no failure; {done}");
    }
    Ok(())
}
