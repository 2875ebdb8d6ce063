//! The `enforcer` binary as an operator meets it: exit codes and the one-line errors with the
//! next step. `run` errors need root (they get as far as the kernel).

use std::{path::PathBuf, process::Command};

use enforcer_tests::{
    daemon::enforcer_bin,
    netns::{Netns, require_root},
};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn enforcer(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(enforcer_bin())
        .args(args)
        .output()
        .expect("run enforcer");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("enforcer-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_exit_codes_and_located_errors() {
    let (code, out, _) = enforcer(&["validate", example("registry.json").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("valid (mode enforce)")
            && out.contains("3 networks, 2 devices, 2 deny ranges"),
        "{out}"
    );

    let bad = temp_file(
        "bad.json",
        "{\"schema\": 1, \"mode\": \"enforce\",\n\"networks\": [{\"name\": \"x\", \"cidr\": \"10.0.0.1/8\"}]}",
    );
    let (code, _, err) = enforcer(&["validate", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{}:2:", bad.display())) && err.contains("host bits set"),
        "{err}"
    );

    let (code, out, _) = enforcer(&["validate", "--json", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["problems"][0]["line"], 2);
    std::fs::remove_file(bad).unwrap();
}

#[test]
fn check_names_the_deciding_rule() {
    let registry = example("registry.json");
    let registry = registry.to_str().unwrap();
    let (code, out, _) = enforcer(&[
        "check",
        "10.20.3.4",
        "--port",
        "443",
        "--registry",
        registry,
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("PASS (allowed") && out.contains("\"moitt-hq-lan\""),
        "{out}"
    );
    let (_, out, _) = enforcer(&[
        "check",
        "10.20.66.6",
        "--port",
        "443",
        "--registry",
        registry,
    ]);
    assert!(
        out.contains("DROP (denied") && out.contains("compromised-host"),
        "{out}"
    );
    let (_, out, _) = enforcer(&[
        "check",
        "10.20.3.4",
        "--port",
        "80",
        "--registry",
        registry,
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["verdict"], "drop");
    assert_eq!(json["reason"], "port_not_allowed");
    assert_eq!(json["rule"]["name"], "moitt-hq-lan");
}

#[test]
fn run_refuses_a_missing_interface_and_changes_nothing() {
    require_root();
    let ns = Netns::new("enf-cli").unwrap();
    let output = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(enforcer_bin())
        .args([
            "run",
            "--iface",
            "nosuch0",
            "--registry",
            example("demo-registry.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interface nosuch0 not found; `ip link` lists the interfaces"),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(enforcer::instance::PIN_ROOT)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nosuch0@"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "a refused run must leave no pins: {leftovers:?}"
    );
}

#[test]
fn run_refuses_an_invalid_registry_before_touching_the_kernel() {
    require_root();
    let bad = temp_file(
        "run-bad.json",
        r#"{"schema": 1, "mode": "enforce", "networks": [{"name": "x", "cidr": "10.0.0.0/40"}]}"#,
    );
    let (code, _, err) = enforcer(&["run", "--iface", "lo", "--registry", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is invalid (1 problem)") && err.contains("invalid CIDR \"10.0.0.0/40\""),
        "{err}"
    );
    let lo = Command::new("ip")
        .args(["link", "show", "lo"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&lo.stdout).contains("xdp"),
        "nothing attached to lo"
    );
    std::fs::remove_file(bad).unwrap();
}

#[test]
fn stats_without_a_running_instance_says_so() {
    let (code, _, err) = enforcer(&["stats", "--instance", "nosuch0@1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no running instance nosuch0@1") || err.contains("no enforcer is running"),
        "{err}"
    );
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `enforcer validate FILE | head -0`: the reader is gone before anything is written.
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let output = Command::new(enforcer_bin())
        .args([
            "validate",
            "--json",
            example("registry.json").to_str().unwrap(),
        ])
        .stdout(writer)
        .output()
        .expect("run enforcer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && output.status.code() != Some(101),
        "a closed output pipe must end the command quietly: {:?} {stderr}",
        output.status
    );
}

/// Hardening of what `validate` reads and prints: special files are refused at once (no hang, no
/// unbounded read), a huge value is quoted short, names that would forge output are refused,
/// and IPv4-mapped prefixes are refused with their IPv4 form.
#[test]
fn validate_refuses_special_files_forging_names_and_huge_values() {
    use std::time::{Duration, Instant};
    let started = Instant::now();
    // A deny feed that is a device, and a registry that is a symlink to one.
    let zero_feed = temp_file(
        "zero-feed.json",
        r#"{"schema": 1, "mode": "enforce", "deny_files": ["/dev/zero"]}"#,
    );
    let (code, _, err) = enforcer(&["validate", zero_feed.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/dev/zero") && err.contains("a device"),
        "{err}"
    );
    let link = std::env::temp_dir().join(format!("enforcer-cli-{}-zero-link", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let (code, _, err) = enforcer(&["validate", link.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("a device"), "{err}");
    // A FIFO as the registry and as a feed: refused, not waited on.
    let fifo = std::env::temp_dir().join(format!("enforcer-cli-{}-fifo", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (code, _, err) = enforcer(&["validate", fifo.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("a FIFO"), "{err}");
    let fifo_feed = temp_file(
        "fifo-feed.json",
        &format!(
            r#"{{"schema": 1, "mode": "enforce", "deny_files": ["{}"]}}"#,
            fifo.display()
        ),
    );
    let (code, _, err) = enforcer(&["validate", fifo_feed.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("a FIFO"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "special files are refused at once"
    );

    // A 10 MB value is quoted short; a name with ESC and a line break is refused, escaped.
    let huge = "9".repeat(10 << 20);
    let text = format!(
        r#"{{"schema": 1, "mode": "enforce", "networks": [{{"name": "a", "cidr": "{huge}"}}, {{"name": "b\u001b[2J\r\nforged", "cidr": "10.0.0.0/8"}}]}}"#
    );
    let bad = temp_file("huge.json", &text);
    let (code, _, err) = enforcer(&["validate", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.len() < 2_000,
        "the error quotes a short prefix: {} bytes",
        err.len()
    );
    assert!(err.contains("(10485760 bytes)"), "{err}");
    assert!(
        err.contains("control or text-direction characters") && !err.contains('\u{1b}'),
        "{err:?}"
    );
    assert_eq!(err.lines().count(), 3, "no forged line: {err:?}");

    // IPv4-mapped prefixes match no IPv4 packet: refused with the IPv4 form.
    let mapped = temp_file(
        "mapped.json",
        r#"{"schema": 1, "mode": "enforce", "networks": [{"name": "m", "cidr": "::ffff:10.0.0.0/104"}], "deny": [{"cidr": "::ffff:192.0.2.0/120"}]}"#,
    );
    let (code, _, err) = enforcer(&["validate", mapped.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("write 10.0.0.0/8") && err.contains("write 192.0.2.0/24"),
        "{err}"
    );
    for path in [zero_feed, link, fifo, fifo_feed, bad, mapped] {
        let _ = std::fs::remove_file(path);
    }
}

/// What a package ships beside the binary: the version with its commit, man pages for the
/// command and each verb (they render), and completion scripts (bash loads its own).
#[test]
fn version_man_pages_and_completions() {
    let (code, out, _) = enforcer(&["--version"]);
    assert_eq!(code, 0);
    let version = out.trim();
    assert!(
        version.starts_with(&format!("enforcer {} (", env!("CARGO_PKG_VERSION")))
            && version.ends_with(')')
            && version.len() > "enforcer 0.1.0 ()".len(),
        "the version names the build's commit: {version}"
    );
    let dir = std::env::temp_dir().join(format!("enforcer-cli-{}-man", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (code, _, err) = enforcer(&["generate", "man", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for page in [
        "enforcer.8",
        "enforcer-run.8",
        "enforcer-allow.8",
        "enforcer-audit.8",
    ] {
        let path = dir.join(page);
        let rendered = Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man runs (man-db, installed by `cargo xtask setup`)");
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(
            rendered.status.success() && text.contains("NAME") && text.contains("enforcer"),
            "{page} renders: {text}"
        );
    }
    let run = std::fs::read_to_string(dir.join("enforcer-run.8")).unwrap();
    assert!(
        run.contains("registry") && run.contains("foreground"),
        "{run}"
    );
    let script = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <({} generate completions bash) && complete -p enforcer",
            enforcer_bin().display()
        ))
        .output()
        .unwrap();
    assert!(
        script.status.success() && String::from_utf8_lossy(&script.stdout).contains("_enforcer"),
        "bash loads the completions: {}",
        String::from_utf8_lossy(&script.stderr)
    );
    for shell in ["zsh", "fish"] {
        let (code, out, err) = enforcer(&["generate", "completions", shell]);
        assert!(code == 0 && out.contains("enforcer"), "{shell}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
