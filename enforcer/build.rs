//! Compiles the XDP program (`enforcer-ebpf`, nightly, bpfel-unknown-none) into `OUT_DIR` so that
//! the controller can embed it. Needs `bpf-linker` on PATH; `cargo xtask setup` installs it.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../enforcer-common/src");
    // `enforcer --version` names the commit it was built from.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown commit".to_string(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        );
    println!("cargo:rustc-env=ENFORCER_COMMIT={commit}");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    let package = aya_build::Package {
        name: "enforcer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../enforcer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
