//! The one module that talks to aya: loads the embedded XDP program, fills its maps from a
//! compiled policy, attaches it, pins its maps, and reads its counters back.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use enforcer_common::{
    Config, Counter, FLOW_ACTIVE, FlowKey, MODE_ENFORCE, MODE_MONITOR, MONITOR_SLOT_OFFSET,
    PROGRAM_NAME, Reason, VpnApproval, VpnGroup, VpnProtocol, lookup, map_names,
};
use ipnet::IpNet;

use crate::{policy::Policy, registry::Mode};

mod diff;
mod source;

/// The compiled `enforcer-ebpf` object, embedded at build time.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// Floor programs for benchmarks (`baseline_pass`: `XDP_PASS` without reading the packet). Never
/// loaded by the enforcer itself; a few hundred bytes.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP program failed: {0}{hint}", hint = permission_hint(.0))]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("map {name}: {source}{hint}", hint = permission_hint(source))]
    Map {
        name: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interface {0} not found; `ip link` lists the interfaces")]
    NoSuchInterface(String),
    #[error(
        "native XDP is not supported by the driver of {iface} ({source}); retry with --xdp-mode skb"
    )]
    NativeUnsupported {
        iface: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("attaching XDP to {iface} failed: {source}{hint}", hint = permission_hint(source))]
    Attach {
        iface: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pinning map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Appends the next step when the cause is a missing privilege.
#[expect(
    clippy::borrowed_box,
    reason = "thiserror hands the field over by reference"
)]
fn permission_hint(error: &Box<dyn std::error::Error + Send + Sync>) -> &'static str {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = cause {
        let text = e.to_string();
        if text.contains("Operation not permitted") || text.contains("Permission denied") {
            return "; the enforcer needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)";
        }
        cause = e.source();
    }
    ""
}

/// Wraps an aya error with the map it concerns.
/// What one sweep of the remembered VPN flows did (`Datapath::sweep_vpn_flows`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSweep {
    /// Flows that had a packet since the sweep before; marked idle for the next.
    pub kept: usize,
    /// Flows without a packet for a whole period: forgotten.
    pub forgotten: usize,
    /// No flow is left and the flag is cleared: the fast path runs again.
    pub flag_cleared: bool,
}

fn map_error<E: std::error::Error + Send + Sync + 'static>(
    name: &'static str,
) -> impl FnOnce(E) -> DatapathError {
    move |e| DatapathError::Map {
        name,
        source: Box::new(e),
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// How to attach: let the controller choose (native, falling back to generic), or insist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Native (driver) XDP if the driver supports it, else generic (skb) XDP.
    Auto,
    /// Native (driver) XDP only.
    Native,
    /// Generic (skb) XDP: works on every interface, slower.
    Skb,
}

/// The program's optional stages, switched at load time (read-only data, so the verifier prunes
/// a stage that is off). The enforcer runs them all; benchmarks and tests switch one off to
/// measure what it costs or to compare the verdicts without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stages {
    /// The VPN signature stage.
    pub vpn: bool,
    /// The fast path for plain IPv4 TCP/UDP from sources the registry does not list
    /// (`enforcer-ebpf/src/fast.rs`).
    pub fast_path: bool,
}

impl Stages {
    pub const ALL: Self = Self {
        vpn: true,
        fast_path: true,
    };
}

/// The loaded program and its maps.
pub struct Datapath {
    /// The program (`None` only while `verify_while` has it on the verifier's thread).
    ebpf: Option<Ebpf>,
    /// Every map, taken out of `ebpf` at load so that they can be filled while the program is
    /// verified (see `verify_while`).
    maps: std::collections::HashMap<&'static str, Map>,
    link: Option<XdpLinkId>,
    /// Approved-endpoint prefix → (its slot in `VPN_GROUPS`, the approvals written there).
    vpn_slots: std::collections::BTreeMap<IpNet, (u32, Vec<VpnApproval>)>,
    /// Set when an earlier run's program was adopted instead of this one.
    adopted_program_id: Option<u32>,
    /// The source lookup tables as last written (read from the maps on first use).
    source: Option<source::SourceState>,
    /// Where the maps are pinned (`None`: a program of its own, for tests and benchmarks).
    pin_dir: Option<std::path::PathBuf>,
    stages: Stages,
    /// Array maps mapped into this process, by name (see `mapped`).
    mapped: std::collections::HashMap<&'static str, source::Mapped>,
}

/// File names of the pinned link and program inside an instance's pin directory.
pub const LINK_PIN: &str = "link";
pub const PROGRAM_PIN: &str = "program";

/// Removes an instance's program from its interface and every pin: the explicit way out.
/// Returns whether a link was pinned.
pub fn detach_pinned(dir: &Path) -> Result<bool, DatapathError> {
    let link_path = dir.join(LINK_PIN);
    let had_link = link_path.exists();
    if had_link {
        let link = aya::programs::links::PinnedLink::from_pin(&link_path).map_err(|e| {
            DatapathError::Attach {
                iface: link_path.display().to_string(),
                source: boxed(e),
            }
        })?;
        // Unpinned and dropped: the last reference goes, the kernel detaches the program.
        drop(link.unpin().map_err(|e| DatapathError::Attach {
            iface: link_path.display().to_string(),
            source: boxed(e),
        })?);
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(had_link)
}

/// Blocks beyond the roots for a registry with these source prefixes: what it needs and a
/// quarter more for changes (blocks whose content does not change are shared by both
/// generations; a change that needs more grows the table), at least the default.
fn v4_blocks_for<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>) -> u32 {
    let needed = crate::policy::tables::v4_blocks_needed(prefixes);
    needed
        .saturating_add(needed / 4)
        .saturating_add(256)
        .clamp(lookup::V4_DEFAULT_BLOCKS, lookup::V4_MAX_BLOCKS)
}

impl Datapath {
    fn load_full(
        stages: Stages,
        pin_dir: Option<&Path>,
        v4_blocks: u32,
    ) -> Result<Self, DatapathError> {
        // The verifier's full log costs seconds and hundreds of MiB for this program: load
        // without it, and only if the verifier refuses, again with it for the error message.
        match Self::load_with_log(stages, pin_dir, v4_blocks, VerifierLogLevel::STATS) {
            Err(DatapathError::Load(_)) => {
                Self::load_with_log(stages, pin_dir, v4_blocks, VerifierLogLevel::default())
            }
            loaded => loaded,
        }
    }

    fn load_with_log(
        stages: Stages,
        pin_dir: Option<&Path>,
        v4_blocks: u32,
        log: VerifierLogLevel,
    ) -> Result<Self, DatapathError> {
        let mut datapath = Self::create(stages, pin_dir, v4_blocks, log)?;
        let ebpf = datapath.ebpf.as_mut().expect("created with its program");
        Self::verify(ebpf)?;
        Ok(datapath)
    }

    /// Creates the maps (reusing those pinned under `pin_dir`) and relocates the program, without
    /// loading it: `verify` (or `verify_while`) does that.
    fn create(
        stages: Stages,
        pin_dir: Option<&Path>,
        v4_blocks: u32,
        log: VerifierLogLevel,
    ) -> Result<Self, DatapathError> {
        let paths: Vec<(&'static str, std::path::PathBuf)> = pin_dir
            .map(|dir| {
                map_names::ALL
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            })
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(log);
        let (vpn_stage, fast_path) = (u8::from(stages.vpn), u8::from(stages.fast_path));
        loader.override_global("VPN_STAGE", &vpn_stage, true);
        loader.override_global("FAST_PATH", &fast_path, true);
        loader.map_max_entries(map_names::SOURCE_V4, 2 * lookup::V4_ROOT_BLOCKS + v4_blocks);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let timer = std::time::Instant::now();
        let mut ebpf = loader
            .load(PROGRAM_OBJECT)
            .map_err(|e| DatapathError::Load(boxed(e)))?;
        tracing::debug!(ms = timer.elapsed().as_millis(), "maps created");
        // The program keeps the maps' descriptors it was relocated with; the map objects live
        // here, beside it.
        let maps = map_names::ALL
            .iter()
            .filter_map(|name| ebpf.take_map(name).map(|map| (*name, map)))
            .collect();
        Ok(Self {
            ebpf: Some(ebpf),
            maps,
            link: None,
            vpn_slots: std::collections::BTreeMap::new(),
            adopted_program_id: None,
            source: None,
            pin_dir: pin_dir.map(Path::to_path_buf),
            stages,
            mapped: std::collections::HashMap::new(),
        })
    }

    /// Loads the relocated program into the kernel: the verifier runs here.
    fn verify(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
        let timer = std::time::Instant::now();
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| {
                DatapathError::Load(
                    format!("program {PROGRAM_NAME} missing from the object").into(),
                )
            })?
            .try_into()
            .map_err(|e| DatapathError::Load(boxed(e)))?;
        program.load().map_err(|e| DatapathError::Load(boxed(e)))?;
        tracing::debug!(ms = timer.elapsed().as_millis(), "program verified");
        Ok(())
    }

    /// Loads the embedded program with only `stages` switched on (benchmarks and tests switch
    /// one off to measure or compare it), its IPv4 lookup table sized for `policy`, and fills
    /// the maps with `policy` while the kernel verifies the program, as `enforcer run` does.
    /// Nothing is pinned or attached.
    pub fn load_filled(policy: &Policy, stages: Stages) -> Result<Self, DatapathError> {
        let blocks = v4_blocks_for(policy.source_prefixes());
        let mut datapath = Self::create(stages, None, blocks, VerifierLogLevel::STATS)?;
        datapath.verify_while(|datapath| datapath.fill(policy))??;
        Ok(datapath)
    }

    /// Creates every map pinned under `dir`: maps already pinned there (by an earlier run whose
    /// program may still be attached) are reused, the others are created and pinned, so a
    /// restarted controller works on the very maps the kernel is enforcing with. `prefixes`
    /// (the registry's source prefixes) size the IPv4 lookup table when it is created; a pinned
    /// one keeps its size. The program is relocated but not yet verified: `verify_while`
    /// verifies it, while the maps are filled if they are fresh.
    pub fn create_pinned(dir: &Path, prefixes: &[IpNet]) -> Result<Self, DatapathError> {
        Self::create(
            Stages::ALL,
            Some(dir),
            v4_blocks_for(prefixes),
            VerifierLogLevel::STATS,
        )
    }

    /// Runs `work` on the maps while the kernel verifies the program on another thread (the
    /// verifier takes most of a second for this program, filling a million entries about as
    /// long). `work` must not need the program, nor grow the IPv4 table (a table created for
    /// the policy it fills never needs to). A refused program is loaded once more with the
    /// verifier's full log, for the error message.
    pub fn verify_while<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> T,
    ) -> Result<T, DatapathError> {
        let Some(mut ebpf) = self.ebpf.take() else {
            return Err(DatapathError::Load(
                "the program is being verified already".into(),
            ));
        };
        let (verified, out) = std::thread::scope(|scope| {
            let verifier = scope.spawn(move || {
                let result = Self::verify(&mut ebpf);
                (ebpf, result)
            });
            let out = work(self);
            (verifier.join(), out)
        });
        let (ebpf, result) =
            verified.map_err(|_| DatapathError::Load("the verifier's thread panicked".into()))?;
        self.ebpf = Some(ebpf);
        if let Err(refused) = result {
            let blocks = self.v4_capacity()?;
            let detailed = Self::load_with_log(
                self.stages,
                self.pin_dir.as_deref(),
                blocks,
                VerifierLogLevel::default(),
            );
            return Err(detailed.err().unwrap_or(refused));
        }
        Ok(out)
    }

    fn ebpf(&self) -> &Ebpf {
        self.ebpf
            .as_ref()
            .expect("the program is back from the verifier's thread")
    }

    /// The single place that looks maps up by name.
    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.maps.get_mut(name).ok_or_else(|| DatapathError::Map {
            name,
            source: "missing from the object".into(),
        })
    }

    pub(crate) fn map(&self, name: &'static str) -> Result<&Map, DatapathError> {
        self.maps.get(name).ok_or_else(|| DatapathError::Map {
            name,
            source: "missing from the object".into(),
        })
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf()
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("load() checked that the program exists and is XDP")
    }

    /// Fills the empty maps of a freshly loaded program with `policy`. Called before attaching,
    /// so no packet ever meets a half-filled policy.
    pub fn fill(&mut self, policy: &Policy) -> Result<(), DatapathError> {
        // The same path as every live change, from nothing: one way to write a policy.
        self.apply(&Policy::empty(), policy)?;
        self.set_mode(policy.mode)
    }

    /// The program's settings as the kernel holds them.
    pub fn config(&self) -> Result<Config, DatapathError> {
        let name = map_names::CONFIG;
        let config: Array<&MapData, Config> =
            Array::try_from(self.map(name)?).map_err(map_error(name))?;
        config.get(&0, 0).map_err(map_error(name))
    }

    /// Read-modify-write of `CONFIG`, keeping what the program itself wrote there.
    ///
    /// The program writes one field itself: `vpn_flows_seen`, after it first puts a flow in
    /// `VPN_FLOWS`. A whole-value write from a read taken before that would clear it, and the
    /// flows' later packets, which carry no signature, would skip the flow lookup (an unapproved
    /// `OpenVPN` tunnel from an allowlisted host would pass as ordinary traffic). So after the
    /// write, if flows exist, the field is set again: the program sets it only after inserting,
    /// so a flow inserted after the check sets it itself. What remains is the few microseconds
    /// between the two writes; a flag the controller never writes (a map of its own) would
    /// close that too, at one more lookup per packet.
    fn update_config(&mut self, change: impl FnOnce(&mut Config)) -> Result<(), DatapathError> {
        let name = map_names::CONFIG;
        let mut current = {
            let mut config: Array<&mut MapData, Config> =
                Array::try_from(self.map_mut(name)?).map_err(map_error(name))?;
            let mut current = config.get(&0, 0).map_err(map_error(name))?;
            change(&mut current);
            config.set(0, current, 0).map_err(map_error(name))?;
            current
        };
        if current.vpn_flows_seen == 0 && self.vpn_flows_exist()? {
            current.vpn_flows_seen = 1;
            let mut config: Array<&mut MapData, Config> =
                Array::try_from(self.map_mut(name)?).map_err(map_error(name))?;
            config.set(0, current, 0).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// Whether the program has remembered any VPN flow (one `BPF_MAP_GET_NEXT_KEY`).
    fn vpn_flows_exist(&self) -> Result<bool, DatapathError> {
        let name = map_names::VPN_FLOWS;
        let flows: aya::maps::HashMap<&MapData, FlowKey, u8> =
            aya::maps::HashMap::try_from(self.map(name)?).map_err(map_error(name))?;
        match flows.keys().next() {
            None => Ok(false),
            Some(key) => key.map(|_| true).map_err(map_error(name)),
        }
    }

    /// One sweep of the remembered VPN flows (`VPN_FLOWS`), run by the controller every period:
    /// a flow the program marked active since the last sweep is kept and its mark cleared; a
    /// flow left unmarked had no packet for a whole period, and is forgotten. Once none is
    /// left, the flag that sends every TCP/UDP packet to the flow lookup (and keeps the fast
    /// path off) is cleared, so one `OpenVPN` session no longer costs the datapath for good.
    ///
    /// A forgotten flow's later packets, which carry no signature, are ordinary traffic again
    /// (as for a flow the full LRU map evicted): its next reset is recognised and remembered
    /// anew. Races with the program are benign but for one: a packet that arrives between this
    /// sweep's read of an unmarked flow and its deletion is classified, and the flow still
    /// forgotten; that takes a flow silent for a whole period to wake within microseconds.
    pub fn sweep_vpn_flows(&mut self) -> Result<FlowSweep, DatapathError> {
        const BPF_EXIST: u64 = 2;
        let name = map_names::VPN_FLOWS;
        let mut sweep = FlowSweep::default();
        {
            let mut flows: aya::maps::HashMap<&mut MapData, FlowKey, u8> =
                aya::maps::HashMap::try_from(self.map_mut(name)?).map_err(map_error(name))?;
            // Keys first: deleting while walking would restart the kernel's walk.
            let keys = flows
                .keys()
                .collect::<Result<Vec<_>, _>>()
                .map_err(map_error(name))?;
            for key in keys {
                let value = match flows.get(&key, 0) {
                    Ok(value) => value,
                    // Evicted since (the map is an LRU): nothing to do.
                    Err(aya::maps::MapError::KeyNotFound) => continue,
                    Err(e) => return Err(map_error(name)(e)),
                };
                let outcome = if value & FLOW_ACTIVE != 0 {
                    sweep.kept += 1;
                    flows.insert(key, value & !FLOW_ACTIVE, BPF_EXIST)
                } else {
                    sweep.forgotten += 1;
                    flows.remove(&key)
                };
                match outcome {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(aya::maps::MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(map_error(name)(e)),
                }
            }
        }
        if self.config()?.vpn_flows_seen != 0 && !self.vpn_flows_exist()? {
            // `update_config` sets the flag again if the program remembers a flow meanwhile.
            self.update_config(|c| c.vpn_flows_seen = 0)?;
            sweep.flag_cleared = self.config()?.vpn_flows_seen == 0;
        }
        Ok(sweep)
    }

    /// Writes one approval group into its slot of `VPN_GROUPS`.
    fn write_group(&mut self, slot: u32, approvals: &[VpnApproval]) -> Result<(), DatapathError> {
        let name = map_names::VPN_GROUPS;
        let mut groups: Array<&mut MapData, VpnGroup> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name))?;
        let mut group = VpnGroup {
            count: u32::try_from(approvals.len()).unwrap_or(0),
            ..VpnGroup::default()
        };
        group.approvals[..approvals.len()].copy_from_slice(approvals);
        groups.set(slot, group, 0).map_err(map_error(name))
    }

    /// `BPF_MAP_UPDATE_BATCH` into the map `name` (see `update_batch_fd`).
    pub(super) fn update_batch(
        &mut self,
        name: &'static str,
        keys: &[u8],
        values: &[u8],
        key_size: usize,
        value_size: usize,
    ) -> std::io::Result<()> {
        update_batch_fd(self.raw_fd(name)?, keys, values, key_size, value_size)
    }

    /// The descriptor of the map `name`, for system calls aya has no API for.
    pub(super) fn raw_fd(&self, name: &'static str) -> std::io::Result<std::os::fd::RawFd> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let map = self
            .map(name)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        match map {
            Map::LpmTrie(data) | Map::Array(data) | Map::HashMap(data) => {
                Ok(data.fd().as_fd().as_raw_fd())
            }
            _ => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
        }
    }

    /// Switches between enforce and monitor.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), DatapathError> {
        let mode = match mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Monitor => MODE_MONITOR,
        };
        self.update_config(|c| c.mode = mode)
    }

    /// Attaches to `iface`; returns the XDP mode in use.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, DatapathError> {
        if !interface_exists(iface) {
            return Err(DatapathError::NoSuchInterface(iface.to_string()));
        }
        let program = self.program_mut();
        let attach_error = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source: boxed(source),
        };
        let (link, used) = match mode {
            AttachMode::Skb => (
                program.attach(iface, XdpMode::Skb).map_err(attach_error)?,
                "skb",
            ),
            AttachMode::Native => {
                let link = program.attach(iface, XdpMode::Driver).map_err(|source| {
                    DatapathError::NativeUnsupported {
                        iface: iface.to_string(),
                        source: boxed(source),
                    }
                })?;
                (link, "native")
            }
            AttachMode::Auto => match program.attach(iface, XdpMode::Driver) {
                Ok(link) => (link, "native"),
                Err(native) => {
                    tracing::warn!(%iface, error = %native, "native XDP unavailable, falling back to skb mode");
                    (
                        program.attach(iface, XdpMode::Skb).map_err(attach_error)?,
                        "skb",
                    )
                }
            },
        };
        self.link = Some(link);
        Ok(used)
    }

    /// Attaches the program and pins it and its link under `dir`, so that enforcement outlives
    /// this process (a killed controller leaves the program running).
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        dir: &Path,
    ) -> Result<&'static str, DatapathError> {
        let used = self.attach(iface, mode)?;
        let link_id = self.link.take().expect("attach stored the link");
        let pin_error = |name: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::Pin {
                name,
                path,
                source: e,
            }
        };
        let link_path = dir.join(LINK_PIN);
        let program = self.program_mut();
        let link = program
            .take_link(link_id)
            .map_err(|e| pin_error("link", &link_path)(boxed(e)))?;
        let fd_link = aya::programs::links::FdLink::try_from(link)
            .map_err(|e| pin_error("link", &link_path)(boxed(e)))?;
        fd_link
            .pin(&link_path)
            .map_err(|e| pin_error("link", &link_path)(boxed(e)))?;
        let program_path = dir.join(PROGRAM_PIN);
        let _ = std::fs::remove_file(&program_path);
        self.program_mut()
            .pin(&program_path)
            .map_err(|e| pin_error("program", &program_path)(boxed(e)))?;
        Ok(used)
    }

    /// Takes over an attached program pinned under `dir` by an earlier run. If it is the
    /// program this build carries (same tag), it stays; otherwise the link is switched to this
    /// build's program in one kernel call (no moment without a program). Returns what happened.
    pub fn adopt(&mut self, dir: &Path) -> Result<&'static str, DatapathError> {
        let link_path = dir.join(LINK_PIN);
        let program_path = dir.join(PROGRAM_PIN);
        let adopt_error = |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            iface: format!("pinned link {}", link_path.display()),
            source: e,
        };
        let pinned_tag = aya::programs::ProgramInfo::from_pin(&program_path)
            .map(|i| i.tag())
            .ok();
        let our_tag = self
            .program()
            .info()
            .map_err(|e| adopt_error(boxed(e)))?
            .tag();
        if pinned_tag == Some(our_tag) {
            self.adopted_program_id = aya::programs::ProgramInfo::from_pin(&program_path)
                .ok()
                .map(|i| i.id());
            return Ok("adopted the running program");
        }
        self.take_over_link(dir)?;
        Ok("replaced the running program with this build's (one link update)")
    }

    /// Takes over the link an earlier build pinned under `old_dir` (another pin layout): the
    /// link switches to this program in one kernel call and is pinned under `dir`; `old_dir`
    /// (the earlier build's program and maps) is removed.
    pub fn take_over_legacy(&mut self, old_dir: &Path, dir: &Path) -> Result<(), DatapathError> {
        self.take_over_link_from(&old_dir.join(LINK_PIN), dir)?;
        let _ = std::fs::remove_dir_all(old_dir);
        Ok(())
    }

    /// Switches the link pinned under `dir` to this program in one kernel call (no moment
    /// without a program) and pins this program in place of the one it replaced.
    fn take_over_link(&mut self, dir: &Path) -> Result<(), DatapathError> {
        self.take_over_link_from(&dir.join(LINK_PIN), dir)
    }

    /// The same, for the link pinned at `link_from`; link and program end up pinned in `dir`.
    fn take_over_link_from(&mut self, link_from: &Path, dir: &Path) -> Result<(), DatapathError> {
        let link_path = dir.join(LINK_PIN);
        let program_path = dir.join(PROGRAM_PIN);
        let adopt_error = |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            iface: format!("pinned link {}", link_path.display()),
            source: e,
        };
        let link = aya::programs::links::PinnedLink::from_pin(link_from)
            .map_err(|e| adopt_error(boxed(e)))?;
        let fd_link = link.unpin().map_err(|e| adopt_error(boxed(e)))?;
        let xdp_link =
            aya::programs::xdp::XdpLink::try_from(fd_link).map_err(|e| adopt_error(boxed(e)))?;
        let id = self
            .program_mut()
            .attach_to_link(xdp_link)
            .map_err(|e| adopt_error(boxed(e)))?;
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|e| adopt_error(boxed(e)))?;
        let fd_link =
            aya::programs::links::FdLink::try_from(link).map_err(|e| adopt_error(boxed(e)))?;
        fd_link.pin(&link_path).map_err(|e| adopt_error(boxed(e)))?;
        let _ = std::fs::remove_file(&program_path);
        self.program_mut()
            .pin(&program_path)
            .map_err(|e| adopt_error(boxed(e)))?;
        self.adopted_program_id = None;
        Ok(())
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .as_mut()
            .expect("the program is back from the verifier's thread")
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("load() checked that the program exists and is XDP")
    }

    /// The kernel's id of the program enforcing (an adopted one, or the one loaded here).
    pub fn program_id(&self) -> Option<u32> {
        self.adopted_program_id
            .or_else(|| self.program().info().ok().map(|info| info.id()))
    }

    pub fn verdicts(&self) -> Result<VerdictCounts, DatapathError> {
        VerdictCounts::read(self.map(map_names::VERDICTS)?)
    }

    pub fn rule_hits(&self, indices: &[u32]) -> Result<Vec<u64>, DatapathError> {
        read_rule_hits(self.map(map_names::RULE_HITS)?, indices)
    }
}

/// The index of `iface` in this network namespace.
pub fn ifindex(iface: &str) -> Option<u32> {
    let c_iface = std::ffi::CString::new(iface).ok()?;
    // SAFETY: c_iface is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
    (index != 0).then_some(index)
}

/// The bpf(2) system call for the commands aya 0.14 has no API for: `attr` is the command's
/// part of `union bpf_attr` (the kernel zero-fills the rest, since the size passed is ours).
/// Returns what the call returns (a new descriptor for some commands).
///
/// # Safety
/// `attr` must be laid out as the start of `union bpf_attr` for `cmd`, and every address in it
/// valid for what the kernel reads or writes during the call.
pub unsafe fn bpf_call<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's promise, above; `attr` lives for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// The interface index a pinned XDP link is attached to: 0 once its interface is gone (the
/// kernel keeps the link but it no longer enforces anything). aya 0.14 does not expose it, so
/// this is `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` on `struct bpf_link_info`, whose union
/// (here `xdp.ifindex`) starts at byte 16.
pub fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::fd::FromRawFd as _;

    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;

    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut get = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET; the path outlives the call.
    let fd = unsafe { bpf_call(BPF_OBJ_GET, &mut get)? };
    // SAFETY: the kernel just returned this descriptor to us; it is closed on drop.
    let fd = unsafe {
        std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).map_err(std::io::Error::other)?)
    };
    let mut info = [0u32; 6];
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(std::io::Error::other)?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).expect("24"),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD; the kernel writes at
    // most `info_len` bytes into `info`, which outlives the call.
    unsafe { bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    if info[0] != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::other(format!(
            "{} is not an XDP link",
            path.display()
        )));
    }
    Ok(info[4])
}

/// Whether `iface` names an interface in this network namespace.
pub fn interface_exists(iface: &str) -> bool {
    let Ok(c_iface) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: c_iface is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c_iface.as_ptr()) != 0 }
}

/// Opens a map pinned at `path` (by another process, e.g. a running `enforcer run`).
pub fn open_pinned(path: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(path).map_err(|e| DatapathError::Map {
        name,
        source: boxed(e),
    })?;
    Map::from_map_data(data).map_err(|e| DatapathError::Map {
        name,
        source: boxed(e),
    })
}

/// Verdict counters summed over CPUs: carried out, and (monitor mode) drops let through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounts {
    pub enforced: Vec<(Reason, Counter)>,
    pub monitored: Vec<(Reason, Counter)>,
}

impl VerdictCounts {
    pub fn read(map: &Map) -> Result<Self, DatapathError> {
        let name = map_names::VERDICTS;
        let array: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(map).map_err(|e| DatapathError::Map {
                name,
                source: boxed(e),
            })?;
        let sum = |slot: u32| -> Result<Counter, DatapathError> {
            let values = array.get(&slot, 0).map_err(|e| DatapathError::Map {
                name,
                source: boxed(e),
            })?;
            Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }))
        };
        let mut counts = Self::default();
        for reason in Reason::ALL {
            counts.enforced.push((reason, sum(reason as u32)?));
            counts
                .monitored
                .push((reason, sum(MONITOR_SLOT_OFFSET + reason as u32)?));
        }
        Ok(counts)
    }

    /// Packets carried out with `reason`.
    pub fn packets(&self, reason: Reason) -> u64 {
        self.enforced
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets)
    }

    /// Packets monitor mode let through that enforce mode would have dropped with `reason`.
    pub fn would_drop(&self, reason: Reason) -> u64 {
        self.monitored
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets)
    }
}

/// The hit counters of the rules with these numbers.
pub fn read_rule_hits(map: &Map, indices: &[u32]) -> Result<Vec<u64>, DatapathError> {
    let name = map_names::RULE_HITS;
    let array: Array<&MapData, u64> = Array::try_from(map).map_err(map_error(name))?;
    indices
        .iter()
        .map(|i| array.get(i, 0).map_err(map_error(name)))
        .collect()
}

/// VPN verdicts by protocol, summed over CPUs: (protocol, unapproved, approved).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VpnCounts(pub Vec<(VpnProtocol, Counter, Counter)>);

impl VpnCounts {
    pub fn read(map: &Map) -> Result<Self, DatapathError> {
        let name = map_names::VPN_VERDICTS;
        let array: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(map).map_err(map_error(name))?;
        let sum = |slot: u32| -> Result<Counter, DatapathError> {
            let values = array.get(&slot, 0).map_err(map_error(name))?;
            Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }))
        };
        let mut counts = Vec::new();
        for protocol in VpnProtocol::ALL {
            let slot = u32::from(protocol as u8) * 2;
            counts.push((protocol, sum(slot)?, sum(slot + 1)?));
        }
        Ok(Self(counts))
    }

    /// Packets of `protocol` whose endpoints were not approved.
    pub fn unapproved(&self, protocol: VpnProtocol) -> u64 {
        self.0
            .iter()
            .find(|(p, ..)| *p == protocol)
            .map_or(0, |(_, u, _)| u.packets)
    }

    /// Packets of `protocol` to or from an approved endpoint.
    pub fn approved(&self, protocol: VpnProtocol) -> u64 {
        self.0
            .iter()
            .find(|(p, ..)| *p == protocol)
            .map_or(0, |(_, _, a)| a.packets)
    }
}

impl Datapath {
    pub fn vpn_verdicts(&self) -> Result<VpnCounts, DatapathError> {
        VpnCounts::read(self.map(map_names::VPN_VERDICTS)?)
    }
}

/// `BPF_MAP_UPDATE_BATCH` (Linux 5.6+) into the map behind `fd`: aya 0.14 has no batch API, so
/// the one raw system call of the controller lives here. `keys`/`values` are packed arrays of
/// the map's key and value layout. Takes a descriptor, not the map, so that several maps can be
/// written from several threads.
pub(super) fn update_batch_fd(
    fd: std::os::fd::RawFd,
    keys: &[u8],
    values: &[u8],
    key_size: usize,
    value_size: usize,
) -> std::io::Result<()> {
    /// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const CHUNK: usize = 65_536;

    for (keys, values) in keys
        .chunks(CHUNK * key_size)
        .zip(values.chunks(CHUNK * value_size))
    {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(keys.len() / key_size).expect("chunk fits u32"),
            map_fd: u32::try_from(fd)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` prefix; the kernel reads `count` keys and
        // values from the two slices, which outlive the call.
        unsafe { bpf_call(BPF_MAP_UPDATE_BATCH, &mut attr)? };
    }
    Ok(())
}
