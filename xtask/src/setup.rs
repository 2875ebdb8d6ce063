//! `cargo xtask setup`: installs what a fresh machine lacks, idempotently. Each step checks first,
//! so a second run takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Debian packages the demo and the tests use: `ip`, `ping`, `sysctl`, `nsenter`, the real
/// VPN software of the VPN tests (userspace `WireGuard`, `OpenVPN`, openssl for its certificates,
/// strongSwan's charon and swanctl with the kernel-libipsec and curve25519 plugins), a DNS
/// server and client for the connection-state tests (dnsmasq, dig), `man` to render the
/// generated man pages, the Prometheus server that scrapes the metrics endpoint, tmux, the
/// terminal `enforcer top` is tested in, Chromium, which renders the HTML report, etcd (server
/// and `etcdctl`) for the fleet tests, and protoc with its well-known types (`libprotobuf-dev`),
/// which the etcd client's build needs. (Installing
/// a package with a service does not start it on a machine whose `policy-rc.d` denies starts,
/// as this one's does; the tests start what they need themselves.)
const APT_PACKAGES: [&str; 22] = [
    "iproute2",
    "iputils-ping",
    "procps",
    "util-linux",
    "wireguard-go",
    "wireguard-tools",
    "openvpn",
    "openssl",
    "strongswan-charon",
    "strongswan-swanctl",
    "libcharon-extra-plugins",
    "libstrongswan-extra-plugins",
    "dnsmasq-base",
    "bind9-dnsutils",
    "man-db",
    "prometheus",
    "tmux",
    "chromium",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// The peers `cargo xtask bench` measures the enforcer against (nftables set, iptables with an
/// ipset, xdp-filter); only the benchmark installs them.
const BENCH_PACKAGES: [&str; 4] = ["nftables", "iptables", "ipset", "xdp-tools"];

/// Installs the benchmark's peers.
pub fn bench_peers() -> anyhow::Result<()> {
    apt_packages(&BENCH_PACKAGES)
}

/// What `cargo xtask package` uses: cargo-deb (built once into the cache, as bpf-linker is),
/// lintian to check the package, and dpkg-dev for the shared-library dependencies.
pub fn packager() -> anyhow::Result<PathBuf> {
    apt_packages(&["lintian", "dpkg-dev"])?;
    cached_cargo_tool("cargo-deb", "3.8.0", "about a minute")
}

/// What `cargo xtask fuzz` uses: cargo-fuzz, built once into the cache as cargo-deb is (it
/// runs the `fuzz/` targets with the nightly toolchain the eBPF build already needs).
pub fn fuzzer() -> anyhow::Result<PathBuf> {
    cached_cargo_tool("cargo-fuzz", "0.13.2", "about 30 s")
}

/// The binary of crate `name` at `version`, built with `cargo install --locked` into the cache
/// the first time (`takes`: how long that is, for the message).
fn cached_cargo_tool(name: &str, version: &str, takes: &str) -> anyhow::Result<PathBuf> {
    let root = cache_dir().join(name);
    let bin = root.join("bin").join(name);
    if !bin.exists() {
        println!("setup: building {name} ({takes})");
        let root_text = root.display().to_string();
        let spec = format!("{name}@{version}");
        if !status(
            "cargo",
            &["install", "--locked", "--root", &root_text, &spec],
        )? {
            bail!("`cargo install {spec}` failed");
        }
    }
    Ok(bin)
}

/// Where slow-to-build tools are cached: `$ENFORCER_CACHE`, else `~/.cache/enforcer`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENFORCER_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("enforcer")
}

/// The directory holding the `bpf-linker` binary that setup built.
pub fn bpf_linker_bin_dir() -> PathBuf {
    cache_dir().join("bpf-linker").join("bin")
}

/// PATH with our bpf-linker first, for every cargo we spawn.
pub fn path_with_linker() -> std::ffi::OsString {
    let mut paths = vec![bpf_linker_bin_dir()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).expect("PATH entries are joinable")
}

fn status(program: &str, args: &[&str]) -> anyhow::Result<bool> {
    Ok(Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?
        .success())
}

fn quiet_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

pub fn setup() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "setup, demo and test need root (Debian packages, bpffs, XDP, network namespaces): \
             run `sudo -E cargo xtask ...`"
        );
    }
    apt_packages(&APT_PACKAGES)?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn apt_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    if !status("apt-get", &["update", "-qq"])? {
        bail!(
            "`apt-get update` failed; install {} by hand",
            missing.join(" ")
        );
    }
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    if !status("apt-get", &args)? {
        bail!("`apt-get install {}` failed", missing.join(" "));
    }
    Ok(())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let output = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    if !output.status.success() {
        bail!(
            "no nightly Rust toolchain (the XDP program builds with it): install it with \
             `rustup toolchain install nightly --profile minimal`"
        );
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain (needed for -Z build-std=core)");
    if !status(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )? {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(())
}

/// bpf-linker 0.13 built against the LLVM inside the nightly toolchain (its default wants a system
/// LLVM this machine does not have). The binary keeps an rpath to the prefix, so both stay in the
/// cache directory.
fn bpf_linker() -> anyhow::Result<()> {
    let bin = bpf_linker_bin_dir().join("bpf-linker");
    if quiet_ok(bin.to_str().unwrap_or_default(), &["--version"]) {
        link_into_cargo_bin(&bin);
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain lacks its LLVM",
                lib.display()
            )
        })?;
    // libLLVM.so.22.1-rust-... → 22
    let major: String = llvm["libLLVM.so.".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let prefix = cache_dir().join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for link in [
        prefix.join("lib/libLLVM.so"),
        prefix.join("lib").join(&llvm),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker against the nightly toolchain's LLVM {major} (about a minute, once)"
    );
    let root = cache_dir().join("bpf-linker");
    let ok = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .status()?
        .success();
    if !ok {
        bail!("building bpf-linker failed (see cargo's output above)");
    }
    link_into_cargo_bin(&bin);
    Ok(())
}

/// So that a plain `cargo build` finds bpf-linker too: a symlink in ~/.cargo/bin, unless a
/// bpf-linker is already there.
fn link_into_cargo_bin(bin: &Path) {
    let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    else {
        return;
    };
    let target = home.join("bin").join("bpf-linker");
    if home.join("bin").is_dir() && std::fs::symlink_metadata(&target).is_err() {
        let _ = std::os::unix::fs::symlink(bin, &target);
    }
}

fn bpffs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")?.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    if !status("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])? {
        bail!("mounting bpffs at /sys/fs/bpf failed");
    }
    Ok(())
}
