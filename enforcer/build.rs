//! Compiles the XDP program (`enforcer-ebpf`, nightly, bpfel-unknown-none) into `OUT_DIR` so that
//! the controller can embed it. Needs `bpf-linker` on PATH; `cargo xtask setup` installs it.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../enforcer-common/src");
    let package = aya_build::Package {
        name: "enforcer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../enforcer-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
