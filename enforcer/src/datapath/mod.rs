//! The one module that talks to aya: loads the embedded XDP program, fills its maps from a
//! compiled policy, attaches it, pins its maps, and reads its counters back. It writes what it
//! is told (a policy, or a `PolicyDiff` between two); the policy compiler decides what that is.
//!
//! - `diff`: a diff written in the order that never drops what both policies allow.
//! - `source`: the source lookup tables, rebuilt aside and switched in one word.
//! - `attach`: attach, pin, adopt, take over, detach.
//! - `egress`: the egress program that records the server's connections, and their sweep.
//! - `counters`: the verdict counters read back.
//! - `syscall`: the raw kernel calls aya has no API for.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Array, Map, MapData},
    programs::{Xdp, xdp::XdpLinkId},
};
use enforcer_common::{
    Config, EGRESS_PROGRAM_NAME, EgressConfig, MODE_ENFORCE, MODE_MONITOR, PROGRAM_NAME,
    UpstreamGroup, VpnApproval, VpnGroup, lookup, map_names,
};
use ipnet::IpNet;

use crate::{
    policy::Policy,
    registry::{EgressMode, Mode},
};

mod attach;
mod counters;
mod diff;
mod egress;
mod events;
mod filter;
mod flows;
mod mapped;
mod nodes;
mod pairs;
mod source;
mod syscall;

pub use attach::{LINK_PIN, PROGRAM_PIN, detach_pinned};
pub use counters::{InstanceCounters, VerdictCounts, VpnCounts, open_pinned, read_rule_hits};
pub use egress::{ConnSweep, EGRESS_LINK_PIN, EGRESS_PROGRAM_PIN, monotonic_ns};
pub use flows::FlowSweep;
use syscall::update_batch_fd;
pub use syscall::{bpf_call, ifindex, interface_exists, pinned_link_ifindex};

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
    vpn_slots: diff::Slots<VpnApproval>,
    /// Upstream prefix → (its slot in `UPSTREAM_GROUPS`, the rule numbers written there).
    upstream_slots: diff::Slots<u32>,
    /// Set when an earlier run's program was adopted instead of this one.
    adopted_program_id: Option<u32>,
    /// The source lookup tables as last written (read from the maps on first use).
    source: Option<source::SourceState>,
    /// Where the maps are pinned (`None`: a program of its own, for tests and benchmarks).
    pin_dir: Option<std::path::PathBuf>,
    stages: Stages,
    /// Array maps mapped into this process, by name (see `mapped`).
    mapped: std::collections::HashMap<&'static str, mapped::Mapped>,
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
            upstream_slots: std::collections::BTreeMap::new(),
            adopted_program_id: None,
            source: None,
            pin_dir: pin_dir.map(Path::to_path_buf),
            stages,
            mapped: std::collections::HashMap::new(),
        })
    }

    /// Loads the relocated programs into the kernel (XDP, then egress): the verifier runs here.
    fn verify(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
        let timer = std::time::Instant::now();
        let missing = |name: &str| {
            DatapathError::Load(format!("program {name} missing from the object").into())
        };
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|e| DatapathError::Load(boxed(e)))?;
        program.load().map_err(|e| DatapathError::Load(boxed(e)))?;
        let egress: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(EGRESS_PROGRAM_NAME)
            .ok_or_else(|| missing(EGRESS_PROGRAM_NAME))?
            .try_into()
            .map_err(|e| DatapathError::Load(boxed(e)))?;
        egress.load().map_err(|e| DatapathError::Load(boxed(e)))?;
        tracing::debug!(ms = timer.elapsed().as_millis(), "programs verified");
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
    /// The map `name` through aya's typed view of it (`Array`, `HashMap`, `LpmTrie`, ...).
    fn typed<'a, T>(&'a self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a Map, Error = aya::maps::MapError>,
    {
        T::try_from(self.map(name)?).map_err(map_error(name))
    }

    /// The same, writable.
    fn typed_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut Map, Error = aya::maps::MapError>,
    {
        T::try_from(self.map_mut(name)?).map_err(map_error(name))
    }

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
        let config: Array<&MapData, Config> = self.typed(name)?;
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
            let mut config: Array<&mut MapData, Config> = self.typed_mut(name)?;
            let mut current = config.get(&0, 0).map_err(map_error(name))?;
            change(&mut current);
            config.set(0, current, 0).map_err(map_error(name))?;
            current
        };
        if current.vpn_flows_seen == 0 && self.vpn_flows_exist()? {
            current.vpn_flows_seen = 1;
            let mut config: Array<&mut MapData, Config> = self.typed_mut(name)?;
            config.set(0, current, 0).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// Writes a slot table (`PEERS`, `FLOW_PEERS`: one word per `peer_slot`): 1 where `marked`.
    pub(super) fn write_slots(
        &mut self,
        name: &'static str,
        marked: impl Fn(u32) -> bool,
    ) -> Result<(), DatapathError> {
        let memory = self.mapped(name, 8)?;
        let slots = memory.bytes();
        for slot in 0..enforcer_common::PEER_SLOTS {
            let at = slot as usize * 8;
            let word = u64::from(marked(slot));
            if slots[at..at + 8] != word.to_ne_bytes() {
                slots[at..at + 8].copy_from_slice(&word.to_ne_bytes());
            }
        }
        Ok(())
    }

    /// Writes one approval group into its slot of `VPN_GROUPS`.
    fn write_group(&mut self, slot: u32, approvals: &[VpnApproval]) -> Result<(), DatapathError> {
        let name = map_names::VPN_GROUPS;
        let mut groups: Array<&mut MapData, VpnGroup> = self.typed_mut(name)?;
        let mut group = VpnGroup {
            count: u32::try_from(approvals.len()).unwrap_or(0),
            ..VpnGroup::default()
        };
        group.approvals[..approvals.len()].copy_from_slice(approvals);
        groups.set(slot, group, 0).map_err(map_error(name))
    }

    /// Writes one upstream group into its slot of `UPSTREAM_GROUPS`.
    fn write_upstream_group(&mut self, slot: u32, rules: &[u32]) -> Result<(), DatapathError> {
        let name = map_names::UPSTREAM_GROUPS;
        let mut groups: Array<&mut MapData, UpstreamGroup> = self.typed_mut(name)?;
        let mut group = UpstreamGroup {
            count: u32::try_from(rules.len()).unwrap_or(0),
            ..UpstreamGroup::default()
        };
        group.rules[..rules.len()].copy_from_slice(rules);
        groups.set(slot, group, 0).map_err(map_error(name))
    }

    /// The egress mode the maps hold.
    pub fn egress(&self) -> Result<EgressMode, DatapathError> {
        let name = map_names::EGRESS_CONFIG;
        let config: Array<&MapData, EgressConfig> = self.typed(name)?;
        let mode = config.get(&0, 0).map_err(map_error(name))?.mode;
        Ok(match mode {
            enforcer_common::EGRESS_MONITOR => EgressMode::Monitor,
            enforcer_common::EGRESS_ENFORCE => EgressMode::Enforce,
            _ => EgressMode::Off,
        })
    }

    /// Switches the egress mode.
    pub fn set_egress(&mut self, egress: EgressMode) -> Result<(), DatapathError> {
        let name = map_names::EGRESS_CONFIG;
        let mut config: Array<&mut MapData, EgressConfig> = self.typed_mut(name)?;
        let value = EgressConfig {
            mode: egress.kernel(),
            _pad: 0,
        };
        config.set(0, value, 0).map_err(map_error(name))
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
}
