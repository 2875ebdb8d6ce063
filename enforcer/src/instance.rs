//! Where a running enforcer keeps its state: maps pinned under one versioned bpffs root, and a
//! state file (rule labels, mode, pid) under /run. One instance per (network namespace,
//! interface), so enforcers on same-named interfaces in different namespaces never collide.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod labels;

pub use labels::{PreparedRules, RuleLabel, rule_label, rule_labels};

/// Where bpffs is (or gets) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Root of everything this enforcer pins; the version changes if the pinned layout does.
pub const PIN_ROOT: &str = "/sys/fs/bpf/enforcer/v2";
/// Roots of earlier layouts: an enforcer of an earlier build still attached there is taken over
/// (its link switched to this build's program), never reused (v1: `RULES` held 4-byte values
/// and the source prefixes lived in LPM tries).
pub const LEGACY_PIN_ROOTS: [&str; 1] = ["/sys/fs/bpf/enforcer/v1"];
/// Root of the state files.
pub const STATE_ROOT: &str = "/run/enforcer";

const BPF_FS_MAGIC: i64 = 0xCAFE_4A11;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "{BPFFS} is not a bpf filesystem and mounting one failed ({0}); mount it with `mount -t bpf bpf {BPFFS}`"
    )]
    Bpffs(std::io::Error),
    #[error(
        "this process runs in a mount namespace of its own (a container, or a service's private mounts) and could not join the one that started it: pins made here would die with this process and leave the interface unfiltered. Start it in the host's mount namespace, or run with --foreground (the program is detached when the controller exits)"
    )]
    PrivateMounts,
    #[error("an enforcer already runs on {instance} (pid {pid}); stop it first")]
    AlreadyRunning { instance: String, pid: u32 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no enforcer is running (no state under {STATE_ROOT}); start one with `enforcer run`")]
    NoneRunning,
    #[error("{0}")]
    Ambiguous(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The network namespace of this process, by inode number.
pub fn current_netns() -> Result<u64, InstanceError> {
    let path = Path::new("/proc/self/ns/net");
    Ok(fs::metadata(path).map_err(io_error(path))?.ino())
}

/// Where this process pins, and whether the pins outlive it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bpffs {
    /// The bpffs at `BPFFS` that this process shares with the one that started it.
    Shared,
    /// A bpffs of this process's own mount namespace: pins die with it (`run --foreground`).
    Private,
}

/// A mount namespace's identity: the device and inode of its `/proc/PID/ns/mnt`.
fn mount_ns(pid: &str) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .map(|m| (m.dev(), m.ino()))
        .ok()
}

/// Whether this process runs in a mount namespace other than the one of the process that
/// started it (`ip netns exec`, `unshare -m`, a service manager's private mounts).
fn own_mount_ns() -> bool {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() }.to_string();
    matches!((mount_ns("self"), mount_ns(&parent)), (Some(own), Some(theirs)) if own != theirs)
}

/// Joins the mount namespace of the process that started this one, if it differs (`ip netns
/// exec` gives its command a mount namespace with a sysfs of its own, whose `/sys/fs/bpf` is
/// not the host's: pins made there die with the command). Only the mount namespace is joined:
/// the network namespace stays. The working directory is kept (by path). Must run before any
/// thread starts. Returns whether it joined.
pub fn join_parent_mount_ns() -> Result<bool, InstanceError> {
    if !own_mount_ns() {
        return Ok(false);
    }
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let path = format!("/proc/{parent}/ns/mnt");
    let cwd = std::env::current_dir().ok();
    let ns = fs::File::open(&path).map_err(io_error(Path::new(&path)))?;
    // SAFETY: setns with a namespace descriptor this process opened; single-threaded here.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNS) } != 0 {
        return Err(InstanceError::Io {
            path,
            source: std::io::Error::last_os_error(),
        });
    }
    // Joining a mount namespace moves the working directory to its root.
    if let Some(cwd) = cwd {
        std::env::set_current_dir(&cwd).map_err(io_error(&cwd))?;
    }
    Ok(true)
}

/// The bpffs this process pins in: the one at `BPFFS` (mounted if it is not yet) when this
/// process shares its mount namespace with the one that started it; else `PrivateMounts`,
/// unless `private` allows one that dies with this process.
pub fn ensure_bpffs(private: bool) -> Result<Bpffs, InstanceError> {
    // A bpffs this process would mount itself in a mount namespace other than PID 1's would be
    // its own (a container's, say), unless one is there already. (Where PID 1's namespace
    // cannot be looked at, the one that started this process stands for the host's.)
    let init_differs =
        matches!((mount_ns("self"), mount_ns("1")), (Some(own), Some(init)) if own != init);
    let mounted = is_bpffs(Path::new(BPFFS));
    let would_be_own = init_differs && !mounted;
    if !own_mount_ns() && !would_be_own {
        mount_bpffs()?;
        return Ok(Bpffs::Shared);
    }
    // A mount namespace of its own (a service manager's private mounts: ProtectSystem= and
    // the like) whose /sys/fs/bpf is a bpffs already: a copy of a mount made before this
    // process, so pins made there are the host's and outlive it. Only a bpffs this process
    // would mount itself there would die with it.
    if mounted {
        return Ok(Bpffs::Shared);
    }
    if private {
        mount_bpffs()?;
        return Ok(Bpffs::Private);
    }
    Err(InstanceError::PrivateMounts)
}

/// Mounts bpffs at `BPFFS` unless one is already there.
fn mount_bpffs() -> Result<(), InstanceError> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    let (source, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null for bpffs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(InstanceError::Bpffs(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into `buf`, which is large enough; c_path is NUL-terminated.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &raw mut buf) == 0 && buf.f_type == BPF_FS_MAGIC
    }
}

/// One enforcer: an interface in a network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceId {
    pub iface: String,
    pub netns: u64,
}

impl InstanceId {
    /// The name used for its directories and in `--instance`: `IFACE@NETNS-INODE`.
    pub fn name(&self) -> String {
        format!("{}@{}", self.iface, self.netns)
    }

    pub fn parse(name: &str) -> Option<Self> {
        let (iface, netns) = name.rsplit_once('@')?;
        Some(Self {
            iface: iface.to_string(),
            netns: netns.parse().ok()?,
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(PIN_ROOT).join(self.name())
    }

    /// Where earlier builds pinned this instance.
    pub fn legacy_pin_dirs(&self) -> Vec<PathBuf> {
        LEGACY_PIN_ROOTS
            .iter()
            .map(|root| Path::new(root).join(self.name()))
            .collect()
    }

    pub fn state_file(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(self.name()).join("state.json")
    }

    /// The running enforcer's control socket (root only).
    pub fn control_socket(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(self.name()).join("control.sock")
    }
}

/// What `enforcer run` writes for `enforcer stats` and for the next start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub instance: String,
    pub pid: u32,
    pub iface: String,
    pub netns: u64,
    pub mode: String,
    /// The egress mode (empty in a state file of a build without egress verdicts).
    #[serde(default)]
    pub egress: String,
    pub xdp_mode: String,
    pub program_id: Option<u32>,
    pub registry: String,
    pub started_unix: u64,
    /// The event log (`run --events`), if one is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
    /// The fleet whose registry this instance follows (`run --etcd`): its etcd endpoints, and
    /// this host's name in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetOf>,
}

/// What a fleet agent's state says of its fleet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetOf {
    pub endpoints: String,
    pub host: String,
}

impl State {
    /// Writes the state file atomically (temporary file, fsync, rename).
    pub fn write(&self, id: &InstanceId) -> Result<(), InstanceError> {
        let path = id.state_file();
        let dir = path.parent().expect("state file has a parent");
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        write_file(&path, true, |out| {
            serde_json::to_writer_pretty(out, self).map_err(std::io::Error::from)
        })
    }

    pub fn read(path: &Path) -> Result<Self, InstanceError> {
        let text = fs::read_to_string(path).map_err(io_error(path))?;
        serde_json::from_str(&text).map_err(|e| InstanceError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// Replaces `path` with what `fill` writes: a temporary file beside it (fsync'ed if `sync`),
/// rename.
fn write_file(
    path: &Path,
    sync: bool,
    fill: impl FnOnce(&mut std::io::BufWriter<&fs::File>) -> std::io::Result<()>,
) -> Result<(), InstanceError> {
    let tmp = path.with_extension("json.tmp");
    write_temporary(&tmp, sync, fill)?;
    fs::rename(&tmp, path).map_err(io_error(path))
}

/// Writes `tmp` with what `fill` writes (fsync'ed if `sync`).
fn write_temporary(
    tmp: &Path,
    sync: bool,
    fill: impl FnOnce(&mut std::io::BufWriter<&fs::File>) -> std::io::Result<()>,
) -> Result<(), InstanceError> {
    let file = fs::File::create(tmp).map_err(io_error(tmp))?;
    let mut out = std::io::BufWriter::new(&file);
    fill(&mut out)
        .and_then(|()| out.flush())
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
        .map_err(io_error(tmp))
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Claims `id` for this process: refuses if a live enforcer holds it, and makes sure the pin
/// directory exists. What a dead enforcer left pinned (program, link, maps) stays: the new
/// process adopts it.
pub fn claim(id: &InstanceId) -> Result<(), InstanceError> {
    if let Ok(state) = State::read(&id.state_file())
        && state.pid != std::process::id()
        && pid_alive(state.pid)
    {
        return Err(InstanceError::AlreadyRunning {
            instance: id.name(),
            pid: state.pid,
        });
    }
    let dir = id.pin_dir();
    fs::create_dir_all(&dir).map_err(io_error(&dir))
}

/// Whether the process of a state file is alive.
pub fn daemon_alive(state: &State) -> bool {
    pid_alive(state.pid)
}

/// Removes the pins and state of `id` (unpinning does not detach: the link belongs to the
/// process that attached).
pub fn release(id: &InstanceId) {
    let _ = fs::remove_dir_all(id.pin_dir());
    for dir in id.legacy_pin_dirs() {
        let _ = fs::remove_dir_all(dir);
    }
    if let Some(dir) = id.state_file().parent() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Instances with a live controller, or whose program is still attached (pinned link) after
/// their controller died.
pub fn running() -> Vec<State> {
    let Ok(dirs) = fs::read_dir(STATE_ROOT) else {
        return Vec::new();
    };
    let mut states: Vec<State> = dirs
        .filter_map(Result::ok)
        .filter_map(|entry| State::read(&entry.path().join("state.json")).ok())
        .filter(|state| {
            pid_alive(state.pid)
                || InstanceId::parse(&state.instance)
                    .is_some_and(|id| id.pin_dir().join("link").exists())
        })
        .collect();
    states.sort_by(|a, b| a.instance.cmp(&b.instance));
    states
}

/// Picks the instance `stats` should read: by name, by interface (in this network namespace
/// first), or the only one running.
pub fn select(instance: Option<&str>, iface: Option<&str>) -> Result<State, InstanceError> {
    let states = running();
    if states.is_empty() {
        return Err(InstanceError::NoneRunning);
    }
    let names = || {
        states
            .iter()
            .map(|s| s.instance.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(name) = instance {
        return states
            .iter()
            .find(|s| s.instance == name)
            .cloned()
            .ok_or_else(|| {
                InstanceError::Ambiguous(format!(
                    "no running instance {name}; running: {}",
                    names()
                ))
            });
    }
    let mut candidates: Vec<&State> = states
        .iter()
        .filter(|s| iface.is_none_or(|i| s.iface == i))
        .collect();
    if candidates.len() > 1
        && let Ok(here) = current_netns()
    {
        let local: Vec<&State> = candidates
            .iter()
            .copied()
            .filter(|s| s.netns == here)
            .collect();
        if local.len() == 1 {
            candidates = local;
        }
    }
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(InstanceError::Ambiguous(format!(
            "no running instance on interface {}; running: {}",
            iface.unwrap_or("?"),
            names()
        ))),
        _ => Err(InstanceError::Ambiguous(format!(
            "several enforcers are running; choose one with --instance: {}",
            names()
        ))),
    }
}
