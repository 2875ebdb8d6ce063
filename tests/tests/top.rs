//! `enforcer top` in a real terminal (tmux, on a server socket of the test's own): while an
//! unlisted client's pings drop and an approved client talks to the server, the screen shows
//! the rates by reason in both directions, the busiest rule and (from the event log) the
//! busiest dropped source; `q` quits.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_bin},
    netns::require_root,
    topology::{self, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT},
    vpn::TempDir,
};

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24", "ministry": "MoITT"}]}"#;

/// A tmux server of the test's own (its socket named after the process), killed on drop.
struct Tmux(String);

impl Tmux {
    fn new() -> Self {
        Self(format!("enf-top-{}", std::process::id()))
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .expect("tmux runs (installed by `cargo xtask setup`)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn top_shows_the_rates_and_quits_on_q() {
    require_root();
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET]).unwrap();
    let _services = Services::start(&lab.server).unwrap();
    let dir = TempDir::new("enf-top").unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry, REGISTRY).unwrap();
    let events = dir.0.join("events.jsonl").display().to_string();
    let enforcer =
        Enforcer::start(&lab.server, SERVER_IFACE, &registry, &["--events", &events]).unwrap();

    let tmux = Tmux::new();
    let command = format!(
        "{} top --instance {}",
        enforcer_bin().display(),
        enforcer.instance
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "45",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");

    // Traffic while the view refreshes: pings from the unlisted client (dropped), exchanges
    // with the approved one.
    let internet = lab.client(INTERNET.label);
    let lan = lab.client(MINISTRY_LAN.label);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut screen = String::new();
    while Instant::now() < deadline {
        let _ = topology::ping(&internet.ns, internet.server_v4, 3);
        let _ = topology::tcp_exchange(&lan.ns, lan.server_v4, TCP_PORT, Duration::from_secs(1));
        screen = tmux.screen();
        let rate_of = |reason: &str| {
            screen
                .lines()
                .find(|l| l.contains(reason))
                .and_then(|l| l.split(reason).nth(1))
                .and_then(|rest| rest.split_whitespace().find(|w| *w != "(drop)"))
                .and_then(|w| w.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if rate_of("not_allowlisted") > 0.0
            && screen.contains("ministry-lan")
            && screen.contains("outgoing")
            && screen.contains(INTERNET.v4)
        {
            break;
        }
    }
    for want in [
        "enforcer top",
        "enforce mode",
        "incoming",
        "outgoing",
        "not_allowlisted (drop)",
        "allowed",
        "busiest rules",
        "ministry-lan",
        "VPN packets",
        "rules 1 of 1048576",
        "busiest dropped sources",
        INTERNET.v4,
        "registry serial 0",
    ] {
        assert!(
            screen.contains(want),
            "`{want}` not on the screen:\n{screen}"
        );
    }

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let quit_by = Instant::now() + Duration::from_secs(5);
    while Instant::now() < quit_by && tmux.run(&["has-session", "-t", "top"]).status.success() {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !tmux.run(&["has-session", "-t", "top"]).status.success(),
        "q ends enforcer top (and its tmux session):\n{}",
        tmux.screen()
    );
}
