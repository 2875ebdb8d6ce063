//! The fleet's registry in a real etcd (Debian's `etcd-server`, TLS, client certificates,
//! authentication on): the roles `enforcer fleet init-roles` makes are enforced by etcd itself,
//! and a registry goes in and out of its keys unchanged.

use enforcer::registry::Registry;
use enforcer_tests::{
    etcd::{Etcd, text},
    netns::require_root,
};

const MINISTRY: &str = "enforcer-ministry-MoITT";
const OTHER_MINISTRY: &str = "enforcer-ministry-MoFA";
const BOARD: &str = "enforcer-board";
const AGENT: &str = "enforcer-agent-eoffice-1";

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Whether `user` may put `key` (and what etcd said).
fn may_put(etcd: &Etcd, user: &str, key: &str, value: &str) -> (bool, String) {
    let out = etcd.etcdctl(user, &["put", key, value]).unwrap();
    (out.status.success(), text(&out))
}

fn init_roles(etcd: &Etcd) {
    let (ok, out) = etcd
        .enforcer(
            "root",
            &[
                "fleet",
                "init-roles",
                "--ministry",
                "MoITT",
                "--ministry",
                "MoFA",
                "--agent",
                "eoffice-1",
            ],
        )
        .unwrap();
    assert!(ok, "init-roles: {out}");
}

#[test]
fn etcd_refuses_what_a_role_may_not_write() {
    require_root();
    let etcd = Etcd::start().unwrap();
    init_roles(&etcd);
    // Again: nothing to create, still fine.
    let (ok, out) = etcd
        .enforcer("root", &["fleet", "init-roles", "--ministry", "MoITT"])
        .unwrap();
    assert!(ok && out.contains("in place"), "{out}");

    let network = r#"{"name": "hq", "cidr": "10.20.0.0/16"}"#;
    let vpn = r#"{"name": "gw", "address": "192.0.2.7", "protocol": "wireguard", "approval": "X"}"#;
    let ours = "/enforcer/v1/registry/ministries/MoITT/networks/hq";
    let theirs = "/enforcer/v1/registry/ministries/MoFA/networks/hq";
    let approval = "/enforcer/v1/registry/board/vpn_endpoints/gw";
    let setting = "/enforcer/v1/registry/board/settings/mode";
    let status = "/enforcer/v1/status/eoffice-1";
    let other_status = "/enforcer/v1/status/eoffice-2";
    let cases: [(&str, &str, &str, bool); 13] = [
        (MINISTRY, ours, network, true),
        (MINISTRY, theirs, network, false),
        (MINISTRY, approval, vpn, false),
        (MINISTRY, setting, r#""monitor""#, false),
        (MINISTRY, status, "{}", false),
        (OTHER_MINISTRY, theirs, network, true),
        (OTHER_MINISTRY, ours, network, false),
        (BOARD, approval, vpn, true),
        (BOARD, setting, r#""enforce""#, true),
        (BOARD, ours, network, false),
        (AGENT, status, "{}", true),
        (AGENT, other_status, "{}", false),
        (AGENT, ours, network, false),
    ];
    for (user, key, value, allowed) in cases {
        let (ok, out) = may_put(&etcd, user, key, value);
        assert_eq!(ok, allowed, "{user} put {key}: {out}");
        if !allowed {
            assert!(out.contains("permission denied"), "{user} put {key}: {out}");
        }
    }
    // A user etcd does not know (a certificate of the same CA with another name) reads nothing.
    let out = etcd
        .etcdctl("intruder", &["get", "--prefix", "/enforcer/"])
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    // Everyone of the fleet reads the registry.
    for user in [MINISTRY, BOARD, AGENT] {
        let out = etcd
            .etcdctl(user, &["get", "--prefix", "/enforcer/v1/registry/"])
            .unwrap();
        assert!(
            out.status.success() && text(&out).contains(ours),
            "{user}: {}",
            text(&out)
        );
    }
}

#[test]
fn a_registry_goes_in_and_out_unchanged_and_bad_keys_are_left_out() {
    require_root();
    let etcd = Etcd::start().unwrap();
    init_roles(&etcd);
    let original = examples().join("registry.json");
    let file = original.display().to_string();
    let (ok, out) = etcd.enforcer("root", &["fleet", "import", &file]).unwrap();
    assert!(ok, "import: {out}");
    let (ok, out) = etcd
        .enforcer("root", &["fleet", "import", &file, "--json"])
        .unwrap();
    assert!(ok, "import again: {out}");
    let again: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (again["put"].as_u64(), again["deleted"].as_u64()),
        (Some(0), Some(0))
    );
    // The board's audit key holds the import; etcd's history holds both.
    let out = etcd
        .etcdctl(
            "root",
            &[
                "get",
                "/enforcer/v1/registry/board/audit",
                "--print-value-only",
            ],
        )
        .unwrap();
    assert!(text(&out).contains("\"verb\":\"import\""), "{}", text(&out));

    // A ministry may import nothing (it writes only its own prefix): etcd refuses, nothing
    // changes.
    let (ok, out) = etcd
        .enforcer(MINISTRY, &["fleet", "import", &file])
        .unwrap();
    assert!(!ok && out.contains("permission denied"), "{out}");

    let exported = etcd.dir().join("fleet.json");
    let target = exported.display().to_string();
    let (ok, out) = etcd.enforcer(AGENT, &["fleet", "export", &target]).unwrap();
    assert!(ok, "export: {out}");
    let sorted = |mut r: Registry| {
        r.networks.sort_by(|a, b| a.name.cmp(&b.name));
        r.devices.sort_by(|a, b| a.name.cmp(&b.name));
        r.upstreams.sort_by(|a, b| a.name.cmp(&b.name));
        r.vpn_endpoints.sort_by(|a, b| a.name.cmp(&b.name));
        r.deny.sort_by_key(|d| d.cidr.to_string());
        for feed in &mut r.feeds {
            feed.path = feed.path.rsplit('/').next().unwrap_or_default().to_string();
        }
        r.deny_files.clear();
        r.serial = 0;
        r
    };
    let back = Registry::load(&exported).unwrap();
    assert!(!back.feeds.is_empty() && !back.feeds[0].entries.is_empty());
    assert_eq!(
        sorted(back),
        sorted(Registry::load(&original).unwrap()),
        "the exported registry is the imported one"
    );

    // Keys written past the CLI: a network with host bits, one whose ministry contradicts its
    // key, a VPN approval without its reference. Each is left out and named; the rest stands.
    let bad = [
        (
            MINISTRY,
            "/enforcer/v1/registry/ministries/MoITT/networks/typo",
            r#"{"name": "typo", "cidr": "10.99.0.1/16"}"#,
        ),
        (
            MINISTRY,
            "/enforcer/v1/registry/ministries/MoITT/networks/claims-mofa",
            r#"{"name": "claims-mofa", "ministry": "MoFA", "cidr": "10.98.0.0/16"}"#,
        ),
        (
            BOARD,
            "/enforcer/v1/registry/board/vpn_endpoints/no-ref",
            r#"{"name": "no-ref", "address": "192.0.2.9", "protocol": "wireguard"}"#,
        ),
    ];
    for (user, key, value) in bad {
        let (ok, out) = may_put(&etcd, user, key, value);
        assert!(ok, "{out}");
    }
    let (ok, out) = etcd
        .enforcer(AGENT, &["fleet", "export", &target, "--json"])
        .unwrap();
    assert!(ok, "export: {out}");
    for (_, key, _) in bad {
        assert!(
            out.contains(&format!("warning: key \"{key}\" left out")),
            "{key}: {out}"
        );
    }
    let back = Registry::load(&exported).unwrap();
    let names: Vec<&str> = back.networks.iter().map(|n| n.name.as_str()).collect();
    assert!(
        !names.contains(&"typo") && !names.contains(&"claims-mofa"),
        "{names:?}"
    );
    assert!(names.contains(&"moitt-hq-lan"), "{names:?}");

    // An import makes the registry exactly the file again: the three keys go.
    let (ok, out) = etcd
        .enforcer("root", &["fleet", "import", &file, "--json"])
        .unwrap();
    assert!(ok, "{out}");
    let again: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(again["deleted"].as_u64(), Some(3), "{out}");
}

#[test]
fn bad_options_are_refused_before_etcd_is_asked() {
    let (ok, out) = enforcer_tests::daemon::enforcer_cli(
        &[
            "fleet",
            "export",
            "/tmp/x.json",
            "--etcd",
            "http://192.0.2.10:2379",
        ],
        &[],
    );
    assert!(
        !ok && out.contains("plain http:// only to loopback"),
        "{out}"
    );
    let (ok, out) = enforcer_tests::daemon::enforcer_cli(
        &[
            "fleet",
            "export",
            "/tmp/x.json",
            "--etcd",
            "https://127.0.0.1:1",
        ],
        &[],
    );
    assert!(!ok && out.contains("--etcd-ca"), "{out}");
    let (ok, out) = enforcer_tests::daemon::enforcer_cli(
        &[
            "fleet",
            "export",
            "/tmp/x.json",
            "--etcd",
            "http://127.0.0.1:1",
        ],
        &[],
    );
    assert!(!ok && out.contains("connect"), "{out}");
}

#[test]
fn the_cli_writes_the_fleet_validated_and_loses_no_concurrent_change() {
    require_root();
    let etcd = Etcd::start().unwrap();
    init_roles(&etcd);
    let file = examples().join("registry.json").display().to_string();
    let (ok, out) = etcd.enforcer("root", &["fleet", "import", &file]).unwrap();
    assert!(ok, "import: {out}");

    // A ministry approves no VPN: etcd itself refuses.
    let vpn = [
        "vpn",
        "approve",
        "192.0.2.9",
        "--name",
        "own-vpn",
        "--protocol",
        "wireguard",
        "--approval",
        "SELF-1",
    ];
    let (ok, out) = etcd.enforcer(MINISTRY, &vpn).unwrap();
    assert!(!ok && out.contains("permission denied"), "{out}");
    let (ok, out) = etcd.enforcer(BOARD, &vpn).unwrap();
    assert!(ok && out.contains("revision"), "{out}");
    // Nor another ministry's network.
    let (ok, out) = etcd
        .enforcer(
            MINISTRY,
            &[
                "allow",
                "add",
                "10.60.0.0/16",
                "--name",
                "x",
                "--ministry",
                "MoFA",
            ],
        )
        .unwrap();
    assert!(!ok && out.contains("permission denied"), "{out}");
    // A bad change is refused as the file would refuse it, and nothing is written.
    let newest = || {
        let out = etcd
            .etcdctl(
                "root",
                &[
                    "get",
                    "--prefix",
                    "/enforcer/v1/registry/",
                    "-w",
                    "json",
                    "--keys-only",
                ],
            )
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(text(&out).trim()).unwrap();
        json["kvs"].as_array().and_then(|kvs| {
            kvs.iter()
                .filter_map(|kv| kv["mod_revision"].as_i64())
                .max()
        })
    };
    let before = newest();
    for (args, why) in [
        (
            vec![
                "allow",
                "add",
                "10.60.0.1/16",
                "--name",
                "y",
                "--ministry",
                "MoITT",
            ],
            "host bits",
        ),
        // A name the example registry gives another entry.
        (
            vec![
                "allow",
                "add",
                "10.61.0.0/16",
                "--name",
                "nitb-noc-v6",
                "--ministry",
                "MoITT",
            ],
            "nitb-noc-v6",
        ),
        (
            vec!["allow", "remove", "no-such-network"],
            "no-such-network",
        ),
    ] {
        let (ok, out) = etcd.enforcer(MINISTRY, &args).unwrap();
        assert!(!ok && out.contains(why), "{args:?}: {out}");
    }
    assert_eq!(before, newest(), "a refused change wrote nothing");

    // Two ministries, ten administrators each, at once: every change lands.
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (user, ministry) = if i % 2 == 0 {
                (MINISTRY, "MoITT")
            } else {
                (OTHER_MINISTRY, "MoFA")
            };
            let mut command = vec![
                enforcer_tests::daemon::enforcer_bin().display().to_string(),
                "allow".into(),
                "add".into(),
                format!("10.{}.0.0/16", 100 + i),
                "--name".into(),
                format!("site-{i}"),
                "--ministry".into(),
                ministry.into(),
            ];
            command.extend(etcd.options(user).unwrap());
            let ns = etcd.namespace().to_string();
            std::thread::spawn(move || {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .args(&command)
                    .output()
                    .unwrap();
                (out.status.success(), text(&out))
            })
        })
        .collect();
    for handle in handles {
        let (ok, out) = handle.join().unwrap();
        assert!(ok, "{out}");
    }
    let (ok, out) = etcd.enforcer(BOARD, &["allow", "list", "--json"]).unwrap();
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for i in 0..20 {
        let name = format!("site-{i}");
        assert!(names.contains(&name.as_str()), "{name} lost: {names:?}");
    }
}

#[test]
fn a_password_user_writes_with_its_role() {
    require_root();
    let etcd = Etcd::start().unwrap();
    init_roles(&etcd);
    // A board operator who signs in with a password (over TLS, with a client certificate that
    // names no user of etcd).
    for args in [
        vec!["user", "add", "nitb-operator:s3cret-pass"],
        vec!["user", "grant-role", "nitb-operator", BOARD],
    ] {
        let out = etcd.etcdctl("root", &args).unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let mut args: Vec<String> = [
        "deny",
        "add",
        "198.18.0.0/15",
        "--name",
        "provider",
        "--etcd-user",
        "nitb-operator",
    ]
    .map(String::from)
    .to_vec();
    args.extend(etcd.options("no-such-user").unwrap());
    let run = |password: Option<&str>| {
        let mut command = std::process::Command::new("ip");
        command
            .args(["netns", "exec", etcd.namespace()])
            .arg(enforcer_tests::daemon::enforcer_bin())
            .args(&args);
        if let Some(password) = password {
            command.env("ENFORCER_ETCD_PASSWORD", password);
        }
        let out = command.output().unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, out) = run(None);
    assert!(!ok && out.contains("ENFORCER_ETCD_PASSWORD"), "{out}");
    let (ok, out) = run(Some("wrong"));
    assert!(!ok && out.contains("authentication failed"), "{out}");
    let (ok, out) = run(Some("s3cret-pass"));
    assert!(
        !ok && out.contains("fleet import"),
        "no registry yet: {out}"
    );
    let file = examples().join("registry.json").display().to_string();
    let (ok, out) = etcd.enforcer("root", &["fleet", "import", &file]).unwrap();
    assert!(ok, "import: {out}");
    let (ok, out) = run(Some("s3cret-pass"));
    assert!(ok && out.contains("added deny entry"), "{out}");
}
