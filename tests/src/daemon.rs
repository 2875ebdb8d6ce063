//! Runs the real `enforcer` binary inside a test namespace, and reads its counters through
//! `enforcer stats --json`, as an operator would.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use enforcer::instance::InstanceId;
use serde_json::Value;

use crate::netns::Netns;

/// `enforcer ARGS` as an administrator types it, with `env` (the caller's SSH session is only
/// the one `env` gives): (success, standard output and error).
pub fn enforcer_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(enforcer_bin())
        .args(args)
        .env_remove("SSH_CLIENT")
        .envs(env.iter().copied())
        .output()
        .expect("the enforcer binary runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `enforcer` binary: `$ENFORCER_BIN`, else next to the running test binary's target dir.
pub fn enforcer_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("ENFORCER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("enforcer");
    assert!(
        bin.exists(),
        "enforcer binary not found at {}; build it first (`cargo xtask test` does) or set ENFORCER_BIN",
        bin.display()
    );
    bin
}

/// A running `enforcer run`, stopped with SIGTERM on drop.
pub struct Enforcer {
    child: Option<Child>,
    pub instance: String,
    log: PathBuf,
}

impl Enforcer {
    /// Starts `enforcer run --iface IFACE --registry REGISTRY [extra args]` inside `ns` (network
    /// namespace only: the mount namespace, and so bpffs, stays the host's) and waits until it
    /// has attached.
    pub fn start(ns: &Netns, iface: &str, registry: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let ns_file = File::open(ns.path())?;
        let log = std::env::temp_dir().join(format!("{}-{iface}.log", ns.name));
        let log_file = File::create(&log)?;
        let mut command = Command::new(enforcer_bin());
        command
            .args(["run", "--iface", iface, "--registry"])
            .arg(registry)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let fd = ns_file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `fd` stays open (ns_file lives until spawn returns).
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("spawn enforcer")?;
        let instance = InstanceId {
            iface: iface.to_string(),
            netns: ns.inode()?,
        }
        .name();
        let mut enforcer = Self {
            child: Some(child),
            instance,
            log,
        };
        enforcer.wait_attached()?;
        Ok(enforcer)
    }

    fn wait_attached(&mut self) -> anyhow::Result<()> {
        let state = InstanceId::parse(&self.instance)
            .expect("instance name")
            .state_file();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                bail!(
                    "enforcer exited with {status} before attaching:\n{}",
                    self.log_text()
                );
            }
            // Ready once it has written its own state and opened its control socket.
            let pid = self.child.as_ref().expect("child").id();
            let own_state = enforcer::instance::State::read(&state).is_ok_and(|s| s.pid == pid);
            if own_state
                && std::os::unix::net::UnixStream::connect(state.with_file_name("control.sock"))
                    .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("enforcer did not attach within 20 s:\n{}", self.log_text())
    }

    /// The controller's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `enforcer stats --instance I --json`.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        Ok(Stats(self.json_verb("stats")?))
    }

    /// The data of `enforcer status --instance I --json`.
    pub fn status(&self) -> anyhow::Result<Value> {
        Ok(self.json_verb("status")?["data"].clone())
    }

    /// `enforcer VERB --json --instance I`, parsed.
    fn json_verb(&self, verb: &str) -> anyhow::Result<Value> {
        let output = Command::new(enforcer_bin())
            .args([verb, "--json", "--instance", &self.instance])
            .output()?;
        if !output.status.success() {
            bail!(
                "enforcer {verb} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Stops the enforcer (SIGTERM), waits for it, then `enforcer detach`es its program (which
    /// outlives the controller by design); returns the log and the detach output.
    pub fn stop(&mut self) -> anyhow::Result<String> {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id())?;
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("enforcer did not stop on SIGTERM within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(self.log_text() + &self.detach()?)
    }

    /// `enforcer detach --instance I` (a no-op message when nothing is attached).
    pub fn detach(&self) -> anyhow::Result<String> {
        let out = Command::new(enforcer_bin())
            .args(["detach", "--instance", &self.instance])
            .output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Kills the controller with SIGKILL, as a crash would; the program stays attached.
    pub fn kill_hard(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts a new controller for the same instance (after `kill_hard`), which adopts what
    /// the old one left pinned.
    pub fn restart(
        &mut self,
        ns: &Netns,
        iface: &str,
        registry: &Path,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let fresh = Self::start(ns, iface, registry, extra)?;
        let mut fresh = std::mem::ManuallyDrop::new(fresh);
        self.child = fresh.child.take();
        self.log = fresh.log.clone();
        Ok(())
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The JSON of `enforcer stats`.
pub struct Stats(pub Value);

impl Stats {
    fn reason(&self, label: &str) -> &Value {
        self.0["reasons"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["reason"] == label))
            .unwrap_or_else(|| panic!("reason {label} missing from stats: {}", self.0))
    }

    /// Packets carried out with this reason.
    pub fn packets(&self, label: &str) -> u64 {
        self.reason(label)["packets"].as_u64().unwrap_or(0)
    }

    /// Packets monitor mode let through that would have been dropped with this reason.
    pub fn would_drop(&self, label: &str) -> u64 {
        self.reason(label)["would_drop_packets"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Packets a named rule decided.
    pub fn rule_hits(&self, name: &str) -> u64 {
        self.0["rules"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == name))
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or_else(|| panic!("rule {name} missing from stats: {}", self.0))
    }

    fn egress_reason(&self, label: &str) -> &Value {
        self.0["egress"]["reasons"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["reason"] == label))
            .unwrap_or_else(|| panic!("egress reason {label} missing from stats: {}", self.0))
    }

    /// Outgoing packets carried out with this reason.
    pub fn egress_packets(&self, label: &str) -> u64 {
        self.egress_reason(label)["packets"].as_u64().unwrap_or(0)
    }

    /// Outgoing packets egress monitor mode let out that enforce would have dropped.
    pub fn egress_would_drop(&self, label: &str) -> u64 {
        self.egress_reason(label)["would_drop_packets"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Outgoing packets a named rule decided.
    pub fn egress_rule_hits(&self, name: &str) -> u64 {
        self.0["rules"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == name))
            .and_then(|r| r["egress_packets"].as_u64())
            .unwrap_or_else(|| panic!("rule {name} missing from stats: {}", self.0))
    }

    fn vpn(&self, protocol: &str) -> &Value {
        self.0["vpn"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["protocol"] == protocol))
            .unwrap_or_else(|| panic!("vpn protocol {protocol} missing from stats: {}", self.0))
    }

    /// VPN packets of `protocol` whose endpoints were not approved.
    pub fn vpn_unapproved(&self, protocol: &str) -> u64 {
        self.vpn(protocol)["unapproved_packets"]
            .as_u64()
            .unwrap_or(0)
    }

    /// VPN packets of `protocol` to or from an approved endpoint.
    pub fn vpn_approved(&self, protocol: &str) -> u64 {
        self.vpn(protocol)["approved_packets"].as_u64().unwrap_or(0)
    }
}
