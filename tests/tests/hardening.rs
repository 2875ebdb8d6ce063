//! The running enforcer against careless input and hostile clients: a registry behind a
//! symbolic link with its own mode and owner keeps them through a live change; idle, slow and
//! huge clients of the control socket delay no other client; a FIFO put where the registry was
//! is refused by a reload instead of hanging the daemon.

use std::{
    io::{Read as _, Write as _},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::PathBuf,
    time::{Duration, Instant},
};

use enforcer::instance::InstanceId;
use enforcer_tests::{
    daemon::{Enforcer, enforcer_bin, enforcer_cli},
    netns::require_root,
    topology::{Lab, MINISTRY_LAN, SERVER_IFACE},
    vpn::TempDir,
};

fn demo_registry() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-registry.json")
}

/// A copy of the demo registry in a fresh temporary folder: (the folder, the copy).
fn demo_registry_copy() -> (TempDir, PathBuf) {
    let dir = TempDir::new("enf-hard").unwrap();
    let registry = dir.0.join("registry.json");
    std::fs::copy(demo_registry(), &registry).unwrap();
    (dir, registry)
}

/// `enforcer ARGS`: (success, standard output and error).
fn enforcer_run(args: &[&str]) -> (bool, String) {
    enforcer_cli(args, &[])
}

/// `enforcer VERB ARGS --instance I`: (success, output) and how long it took.
fn cli(enforcer: &Enforcer, args: &[&str]) -> (bool, String, Duration) {
    let started = Instant::now();
    let mut all = args.to_vec();
    all.extend(["--instance", &enforcer.instance]);
    let (ok, out) = enforcer_run(&all);
    (ok, out, started.elapsed())
}

#[test]
fn a_live_change_keeps_the_registrys_link_mode_and_owner() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN]).unwrap();
    let dir = TempDir::new("enf-hard").unwrap();
    let real = dir.0.join("real-registry.json");
    std::fs::copy(demo_registry(), &real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&real, Some(1234), Some(5678)).unwrap();
    let link = dir.0.join("registry.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &link, &[]).unwrap();
    let (ok, out, _) = cli(
        &enforcer,
        &["allow", "add", "192.0.2.64/26", "--name", "branch"],
    );
    assert!(ok, "{out}");
    let link_meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(
        link_meta.file_type().is_symlink(),
        "the registry is still a link"
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), real);
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(
        text.contains("\"branch\""),
        "the link's target has the change"
    );
    let meta = std::fs::metadata(&real).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o600, 1234, 5678),
        "mode and owner kept"
    );
}

#[test]
fn idle_slow_and_huge_clients_delay_no_one() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN]).unwrap();
    let (_dir, registry) = demo_registry_copy();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    let socket = InstanceId::parse(&enforcer.instance)
        .unwrap()
        .control_socket();

    // Ten clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let (ok, out, took) = cli(&enforcer, &["status"]);
    assert!(ok, "{out}");
    assert!(
        took < Duration::from_secs(2),
        "status took {took:?} behind ten idle clients"
    );

    // A client that sends an 8 MiB line and never reads its answer.
    let mut huge = UnixStream::connect(&socket).unwrap();
    huge.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let line = format!(
        r#"{{"request": {{"verb": "add", "section": "networks", "entry": {{"name": "x", "cidr": "{}"}}}}}}"#,
        "9".repeat(8 << 20)
    );
    // The daemon stops reading past its limit; the rest of the line may not be taken.
    let _ = huge.write_all(line.as_bytes());
    let (ok, out, took) = cli(
        &enforcer,
        &["allow", "add", "192.0.2.64/26", "--name", "branch"],
    );
    assert!(ok, "{out}");
    assert!(
        took < Duration::from_secs(2),
        "a change took {took:?} beside a huge client"
    );
    let pid = enforcer.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        peak_kib < 128 << 10,
        "the daemon's peak memory stays small: {peak_kib} KiB"
    );
    // The huge client gets a refusal once it reads.
    huge.shutdown(std::net::Shutdown::Write).ok();
    huge.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.contains("longer than"),
        "the huge request is refused: {answer}"
    );
    assert!(
        !std::fs::read_to_string(&registry)
            .unwrap()
            .contains("99999999"),
        "nothing of the huge request reached the registry"
    );

    // A FIFO where the registry was: a reload is refused at once, nothing changes.
    std::fs::remove_file(&registry).unwrap();
    let c = std::ffi::CString::new(registry.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (ok, out, took) = cli(&enforcer, &["reload"]);
    assert!(!ok && out.contains("a FIFO"), "{out}");
    assert!(took < Duration::from_secs(2), "reload took {took:?}");
    let (ok, out, _) = cli(&enforcer, &["status"]);
    assert!(ok && out.contains("enforce mode"), "{out}");
    drop(idle);
}

#[test]
fn audit_verify_finds_an_edited_or_removed_record() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN]).unwrap();
    let (dir, registry) = demo_registry_copy();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    for (cidr, name) in [("192.0.2.64/26", "a"), ("192.0.2.128/26", "b")] {
        let (ok, out, _) = cli(&enforcer, &["allow", "add", cidr, "--name", name]);
        assert!(ok, "{out}");
    }
    let (ok, out, _) = cli(&enforcer, &["mode", "monitor"]);
    assert!(ok, "{out}");
    let verify = || enforcer_run(&["audit", "verify", registry.to_str().unwrap()]);
    let (ok, out) = verify();
    assert!(ok && out.contains("3 records, the chain is whole"), "{out}");
    let log = dir.0.join("registry.json.audit.jsonl");
    let original = std::fs::read_to_string(&log).unwrap();
    // An edited record: the uid of the first change.
    let edited = original.replacen("\"uid\":0", "\"uid\":1000", 1);
    assert_ne!(edited, original);
    std::fs::write(&log, &edited).unwrap();
    let (ok, out) = verify();
    assert!(
        !ok && out.contains(":2: the record does not follow"),
        "{out}"
    );
    // The last record removed: the chain is whole, but the registry's serial says more.
    let without_last: String = original.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, without_last).unwrap();
    let (ok, out) = verify();
    assert!(
        !ok && out.contains("records are missing at the end"),
        "{out}"
    );
    std::fs::write(&log, original).unwrap();
    let (ok, out) = verify();
    assert!(ok, "{out}");
}

/// `ip netns exec NS enforcer run …` gives the controller a mount namespace of its own (with a
/// sysfs of its own, so a `/sys/fs/bpf` that is not the host's). Its pins must still outlive
/// it: killed, the program keeps enforcing.
#[test]
fn a_controller_started_through_ip_netns_exec_keeps_enforcing_after_it_dies() {
    use enforcer_tests::{
        topology::{self, INTERNET, Services, TCP_PORT},
        vpn::Daemon,
    };
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let (dir, registry) = demo_registry_copy();
    let bin = enforcer_bin();
    let daemon = Daemon::spawn(
        &lab.server,
        &[
            bin.to_str().unwrap(),
            "run",
            "--iface",
            SERVER_IFACE,
            "--registry",
            registry.to_str().unwrap(),
        ],
        dir.0.join("enforcer.log"),
        &[],
    )
    .unwrap();
    let id = InstanceId {
        iface: SERVER_IFACE.to_string(),
        netns: lab.server.inode().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !id.control_socket().exists() {
        assert!(
            Instant::now() < deadline,
            "the controller did not start: {}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let internet = lab.client(INTERNET.label);
    let lan = lab.client(MINISTRY_LAN.label);
    let timeout = Duration::from_millis(700);
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, timeout).unwrap());
    assert!(!topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap());
    // The controller dies (SIGKILL, as `Daemon` drops it), and with it its mount namespace.
    let log = daemon.log_text();
    drop(daemon);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap(),
        "the program must outlive the controller's mount namespace:\n{log}"
    );
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, timeout).unwrap());
    assert!(
        id.pin_dir().exists(),
        "pinned on the host's bpf filesystem at {}",
        id.pin_dir().display()
    );
    // The way out, from the host.
    let (ok, out) = enforcer_run(&["detach", "--instance", &id.name()]);
    assert!(ok, "{out}");
    assert!(topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap());
}

/// The interface removed and recreated under a running controller: it notices within seconds,
/// says so, and attaches to the new one; `status` never claims enforcement it does not do.
#[test]
fn a_replaced_interface_is_noticed_and_protected_again() {
    use enforcer_tests::topology::{self, INTERNET, Services, TCP_PORT};
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let (_dir, registry) = demo_registry_copy();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    let internet = lab.client(INTERNET.label);
    let lan = lab.client(MINISTRY_LAN.label);
    let timeout = Duration::from_millis(700);
    assert!(!topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap());

    // Removed: status says it is not enforcing.
    lab.server
        .exec(&["ip", "link", "del", SERVER_IFACE])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let status = enforcer.status().unwrap();
    assert_eq!(status["enforcing"], false, "{status}");
    let (_, out, _) = cli(&enforcer, &["status"]);
    assert!(out.contains("NOT ENFORCING"), "{out}");
    assert!(
        enforcer.log_text().contains("the interface is gone"),
        "{}",
        enforcer.log_text()
    );

    // Back (a new device of the same name): protected again within seconds, without a restart.
    lab.recreate_server_nic().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while enforcer.status().unwrap()["enforcing"] != true {
        assert!(Instant::now() < deadline, "{}", enforcer.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !topology::tcp_exchange(&internet.ns, internet.server_v4, TCP_PORT, timeout).unwrap(),
        "the new interface is protected:\n{}",
        enforcer.log_text()
    );
    assert!(topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, timeout).unwrap());
    assert!(enforcer.log_text().contains("attached to the new one"));
}

/// What a controller killed in the middle of a change leaves: a new registry text written aside
/// and never put in force, or a change put in force whose audit record was not written yet.
/// The next start removes the first and records the gap of the second, so the audit chain stays
/// whole and says what is not known.
#[test]
fn a_start_after_a_crash_cleans_up_and_records_the_lost_audit_record() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN]).unwrap();
    let (dir, registry) = demo_registry_copy();
    let mut enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    let (ok, out, _) = cli(&enforcer, &["allow", "add", "192.0.2.64/26", "--name", "a"]);
    assert!(ok, "{out}");
    enforcer.kill_hard().unwrap();
    // As a crash between the steps of the next change would leave it: its text written aside by
    // a process now gone, and (another change) the registry at serial 2 with no record for it.
    let stale = dir.0.join(".registry.json.tmp-999999");
    std::fs::write(&stale, "{\"half\": ").unwrap();
    let text = std::fs::read_to_string(&registry).unwrap();
    let bumped = text.replacen("\"serial\": 1", "\"serial\": 2", 1);
    assert_ne!(bumped, text, "the registry holds serial 1 after one change");
    std::fs::write(&registry, bumped).unwrap();
    enforcer
        .restart(&lab.server, SERVER_IFACE, &registry, &[])
        .unwrap();
    assert!(
        !stale.exists(),
        "the stale text is removed:\n{}",
        enforcer.log_text()
    );
    let log = std::fs::read_to_string(dir.0.join("registry.json.audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["verb"].as_str(), last["serial_after"].as_u64()),
        (Some("recovered"), Some(2)),
        "{log}"
    );
    let (ok, out) = enforcer_run(&["audit", "verify", registry.to_str().unwrap()]);
    assert!(ok && out.contains("2 records"), "{out}");
}

/// `OpenVPN` hard resets spoofed by another host on the link with an allowed client's address
/// and ports (any host on the link can send one over TCP, anyone over UDP) cut nothing: the
/// client's connections and datagrams from those ports get through at once, while the resets
/// themselves drop as an unapproved VPN.
#[test]
fn spoofed_openvpn_resets_cut_no_allowed_client() {
    use enforcer_tests::{
        packet::{Frame, L4},
        topology::{self, INTERNET, Services, TCP_PORT, UDP_PORT},
    };
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let services = Services::start(&lab.server).unwrap();
    let (_dir, registry) = demo_registry_copy();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, &[]).unwrap();
    let (lan, attacker) = (lab.client(MINISTRY_LAN.label), lab.client(INTERNET.label));
    // A plain client reset: opcode, session id, no acks, message packet id 0.
    let reset = [
        0x38, 0x5E, 0x55, 0x5E, 0x55, 0x5E, 0x55, 0x5E, 0x55, 0, 0, 0, 0, 0,
    ];
    let framed = [
        &u16::try_from(reset.len()).unwrap().to_be_bytes()[..],
        &reset,
    ]
    .concat();
    let ports: Vec<u16> = (41_000..41_008).collect();
    let frames: Vec<Vec<u8>> = ports
        .iter()
        .flat_map(|&port| {
            [
                Frame::new(
                    lan.v4,
                    lan.server_v4,
                    L4::TcpData {
                        src_port: port,
                        dst_port: TCP_PORT,
                        data: framed.clone(),
                    },
                )
                .build(),
                Frame::new(
                    lan.v4,
                    lan.server_v4,
                    L4::UdpData {
                        src_port: port,
                        dst_port: UDP_PORT,
                        data: reset.to_vec(),
                    },
                )
                .build(),
            ]
        })
        .collect();
    let sent = frames.len() as u64;
    topology::send_raw(&attacker.ns, frames.into_iter());
    let deadline = Instant::now() + Duration::from_secs(3);
    while enforcer.stats().unwrap().vpn_unapproved("openvpn") < sent {
        assert!(
            Instant::now() < deadline,
            "the {sent} spoofed resets drop as unapproved OpenVPN: {}",
            enforcer.stats().unwrap().0["vpn"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let timeout = Duration::from_millis(1500);
    let cut: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|&port| {
            !topology::tcp_exchange_from(&lan.ns, port, lan.server_v4, TCP_PORT, timeout).unwrap()
        })
        .collect();
    assert!(
        cut.is_empty(),
        "the allowed client's connections from the spoofed ports {cut:?} failed:\n{:#}",
        enforcer.stats().unwrap().0
    );
    let server = lan.server_v4;
    lan.ns
        .enter(|| {
            for &port in &ports {
                let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
                socket
                    .send_to(b"e-office datagram", (server, UDP_PORT))
                    .unwrap();
            }
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while services
        .udp_received
        .load(std::sync::atomic::Ordering::Relaxed)
        < ports.len() as u64
    {
        assert!(
            Instant::now() < deadline,
            "the allowed client's datagrams from the spoofed ports: {} of {} arrived",
            services
                .udp_received
                .load(std::sync::atomic::Ordering::Relaxed),
            ports.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
