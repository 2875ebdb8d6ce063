//! The Debian package, installed the way an administrator installs it: `cargo xtask package`
//! builds it, lintian finds no error in it, `dpkg -i` installs it; the installed binary names its
//! version and commit, validates the shipped registry, its man pages render and its bash
//! completion loads; the unit passes `systemd-analyze verify` and scores as recorded in the
//! README; the daemon runs, takes live changes and answers `stats` with exactly the unit's
//! capabilities (setpriv); a newer package installed over a running enforcer leaves the traffic
//! enforced; removal keeps the registry and its audit log, and purge (at the end) removes them.
//!
//! This test installs a package on the machine it runs on, as CI's throw-away machine allows;
//! it purges it when done.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use enforcer_tests::{
    netns::require_root,
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT},
};

/// Exactly the unit's capabilities.
const CAPS: &str = "-all,+bpf,+net_admin,+perfmon";
const REGISTRY: &str = "/etc/enforcer/registry.json";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo xtask package [--deb-version V]`: the .deb's path.
fn package(version: Option<&str>) -> PathBuf {
    let mut args = vec!["xtask", "package"];
    if let Some(v) = version {
        args.extend(["--deb-version", v]);
    }
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .current_dir(workspace())
        .output()
        .expect("cargo runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cargo xtask package: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        text.lines()
            .last()
            .expect("cargo-deb names the package")
            .trim(),
    )
}

/// The installed enforcer with only the unit's capabilities, in `ns`'s network namespace and,
/// as under the unit's `ProtectSystem=`, a mount namespace of its own whose mounts are copies
/// of the host's (so its /sys/fs/bpf is the host's bpffs: the pins must outlive it).
fn limited(ns: &str, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .args([&format!("--net=/run/netns/{ns}"), "unshare", "--mount"])
        .args(["--propagation", "slave", "setpriv", "--reuid=0"])
        .args([
            &format!("--inh-caps={CAPS}"),
            &format!("--ambient-caps={CAPS}"),
        ])
        .args([&format!("--bounding-set={CAPS}"), "/usr/sbin/enforcer"])
        .args(args)
        .env_remove("SSH_CLIENT");
    command
}

/// Kills the daemon and removes what it left (in its network namespace, which must still
/// exist: declared after the lab, this drops first), and the package, whatever happens.
struct Installed {
    daemon: Option<Child>,
    ns: String,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The workspace's binary: the package's may be removed already.
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(enforcer_tests::daemon::enforcer_bin())
            .args(["detach", "--iface", SERVER_IFACE])
            .output();
        let _ = Command::new("dpkg").args(["--purge", "enforcer"]).output();
    }
}

#[test]
fn the_debian_package_installs_runs_with_least_privilege_and_upgrades_in_place() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let deb = package(None);
    let lint = run(
        "lintian",
        &["--tag-display-limit", "0", &deb.display().to_string()],
    );
    let lint_text = String::from_utf8_lossy(&lint.stdout);
    assert!(
        !lint_text.lines().any(|l| l.starts_with("E:")),
        "lintian errors:\n{lint_text}"
    );

    let _ = run("dpkg", &["--purge", "enforcer"]);
    ok("dpkg", &["-i", &deb.display().to_string()]);
    let mut installed = Installed {
        daemon: None,
        ns: lab.server.name.clone(),
    };
    let version = ok("/usr/sbin/enforcer", &["--version"]);
    assert!(version.starts_with("enforcer 0.1.0 ("), "{version}");
    ok("/usr/sbin/enforcer", &["validate", REGISTRY]);
    let page = ok("man", &["-P", "cat", "enforcer"]);
    assert!(page.contains("enforcer") && page.contains("run"), "{page}");
    let page = ok("man", &["-P", "cat", "enforcer-run"]);
    assert!(page.contains("--iface"), "{page}");
    let complete = ok(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/enforcer && complete -p enforcer",
        ],
    );
    assert!(complete.contains("enforcer"), "{complete}");
    assert!(Path::new("/usr/share/zsh/vendor-completions/_enforcer").exists());
    assert!(Path::new("/usr/share/doc/enforcer/README.md").exists());
    for unit in ["enforcer@.service", "enforcer-agent@.service"] {
        let path = format!("/lib/systemd/system/{unit}");
        let verify = run("systemd-analyze", &["verify", &path]);
        assert!(
            verify.status.success(),
            "systemd-analyze verify {unit}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let security = run("systemd-analyze", &["security", "--offline=true", &path]);
        let text = String::from_utf8_lossy(&security.stdout);
        let score: f64 = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .and_then(|l| l.rsplit(": ").next())
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no score for {unit} in:\n{text}"));
        assert!(
            score <= 2.5,
            "systemd-analyze security {unit}: exposure {score} (README records 2.5)"
        );
    }

    // The daemon with exactly the unit's capabilities, on a lab's server interface, with the
    // installed registry in enforce mode.
    std::fs::write(
        REGISTRY,
        r#"{"schema": 1, "mode": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24"}]}"#,
    )
    .unwrap();
    let child = limited(
        &lab.server.name,
        &["run", "--iface", SERVER_IFACE, "--registry", REGISTRY],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("nsenter and setpriv run (util-linux)");
    installed.daemon = Some(child);
    let (lan, internet) = (lab.client(MINISTRY_LAN.label), lab.client(INTERNET.label));
    let timeout = Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let enforced = || {
        topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, timeout).unwrap()
            && !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap()
    };
    while !enforced() {
        assert!(
            Instant::now() < deadline,
            "the limited daemon never enforced"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // A live change and stats, with the same capabilities.
    let out = limited(
        &lab.server.name,
        &["allow", "add", "192.0.2.0/24", "--name", "internet"],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "allow add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap());
    let out = limited(&lab.server.name, &["allow", "remove", "internet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "allow remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = limited(&lab.server.name, &["stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        stats["reasons"].as_array().is_some_and(|r| !r.is_empty()),
        "{stats}"
    );

    // A newer package over the running enforcer: the traffic stays enforced.
    let newer = package(Some("0.1.1-1"));
    ok("dpkg", &["-i", &newer.display().to_string()]);
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap(),
        "an unlisted client is still dropped after the upgrade"
    );
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, timeout).unwrap());
    assert!(ok("dpkg-query", &["-W", "enforcer"]).contains("0.1.1-1"));

    // The controller gone, its program keeps enforcing: its pins were the host's.
    if let Some(mut child) = installed.daemon.take() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
        let _ = child.wait();
    }
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap(),
        "still enforced after the controller, in a mount namespace of its own, stopped"
    );

    // Removal keeps the registry and its audit log; purge (on drop) removes them.
    ok("dpkg", &["--remove", "enforcer"]);
    assert!(Path::new(REGISTRY).exists(), "removal keeps the registry");
    assert!(
        Path::new("/etc/enforcer/registry.json.audit.jsonl").exists(),
        "removal keeps the audit log"
    );
}
