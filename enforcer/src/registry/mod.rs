//! The approved-network registry: the JSON file an administrator edits, parsed and validated into
//! a typed model. Validation reports every problem at once, each with its place in the file;
//! a registry with any problem is rejected whole.

mod date;
mod feed;
mod ports;
mod raw;
pub mod read;
pub mod text;
mod top;
pub mod value;

use std::{fmt, hash::BuildHasher, net::IpAddr, path::Path};

pub use date::Date;
pub use enforcer_common::VpnProtocol;
pub use feed::{Feed, FeedEntry, parse as parse_feed};
use ipnet::IpNet;
pub use ports::{PortSpec, Protocol};

/// The registry format this build reads.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop what the policy drops.
    Enforce,
    /// Pass everything; count what would have been dropped.
    Monitor,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Monitor => "monitor",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "monitor" => Ok(Self::Monitor),
            other => Err(ValueError::Mode(other.to_string())),
        }
    }
}

/// What the egress program does with the server's outgoing traffic (`"egress"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Nothing leaving is checked (connections are still recorded for their replies).
    Off,
    /// Outgoing packets are checked and counted; nothing is dropped.
    Monitor,
    /// Outgoing packets to destinations that are neither approved nor upstreams are dropped.
    Enforce,
}

impl EgressMode {
    /// A registry without `"egress"`: monitor. Nothing the server sends is dropped until an
    /// operator says so (a registry written before egress control keeps every outgoing
    /// connection working), while `stats` already counts what enforce would drop, so that the
    /// upstreams can be listed from what the server really reaches.
    pub const DEFAULT: Self = Self::Monitor;

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Monitor => "monitor",
            Self::Enforce => "enforce",
        }
    }

    /// The `EGRESS_*` number the kernel reads.
    pub const fn kernel(self) -> u32 {
        match self {
            Self::Off => enforcer_common::EGRESS_OFF,
            Self::Monitor => enforcer_common::EGRESS_MONITOR,
            Self::Enforce => enforcer_common::EGRESS_ENFORCE,
        }
    }

    /// How much it drops: off < monitor < enforce (a change up is a narrowing, applied last).
    pub const fn strictness(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Monitor => 1,
            Self::Enforce => 2,
        }
    }
}

impl fmt::Display for EgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EgressMode {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "off" => Ok(Self::Off),
            "monitor" => Ok(Self::Monitor),
            "enforce" => Ok(Self::Enforce),
            other => Err(ValueError::EgressMode(other.to_string())),
        }
    }
}

/// Why a value in the registry (or given for one on the command line) is invalid; the message
/// says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid date \"{0}\" (expected YYYY-MM-DD, e.g. 2027-06-30)")]
    DateFormat(String),
    #[error("invalid date \"{0}\": no such day")]
    NoSuchDay(String),
    #[error("unknown protocol \"{0}\" (expected tcp, udp or icmp)")]
    Protocol(String),
    #[error("unknown mode \"{0}\" (expected \"enforce\" or \"monitor\")")]
    Mode(String),
    #[error("unknown egress mode \"{0}\" (expected \"off\", \"monitor\" or \"enforce\")")]
    EgressMode(String),
    #[error(
        "invalid port spec \"{spec}\": {why} (expected e.g. \"443/tcp\", \"8000-8080/udp\" or \"icmp\")"
    )]
    PortSpec { spec: String, why: &'static str },
}

/// An approved network: a prefix, optionally limited to some ports, optionally time-limited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub cidr: IpNet,
    pub ministry: Option<Box<str>>,
    /// `None`: every port and protocol.
    pub ports: Option<Box<[PortSpec]>>,
    pub expires: Option<Date>,
    pub note: Option<Box<str>>,
}

/// A pre-approved single device (a /32 or /128).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub address: IpAddr,
    /// The ministry whose device it is (in a fleet, the ministry that may change it).
    pub ministry: Option<Box<str>>,
    pub owner: Option<Box<str>>,
    pub ports: Option<Box<[PortSpec]>>,
    pub expires: Option<Date>,
    pub note: Option<Box<str>>,
}

/// An approved VPN endpoint (enforced by the VPN stage; validated and kept here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VpnEndpoint {
    pub name: String,
    pub address: IpNet,
    pub protocol: VpnProtocol,
    pub port: Option<u16>,
    pub approval: String,
    pub expires: Option<Date>,
}

/// An upstream: a destination the server may reach on the listed ports (DNS, NTP, directory,
/// update mirrors), without being let in by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// Its `cidr`, or its `address` as a /32 or /128.
    pub prefix: IpNet,
    /// Required: an upstream is reached on named ports only.
    pub ports: Box<[PortSpec]>,
    pub ministry: Option<Box<str>>,
    pub expires: Option<Date>,
    pub note: Option<Box<str>>,
}

/// A denied range: beats every allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyEntry {
    pub name: Option<String>,
    pub cidr: IpNet,
    pub note: Option<Box<str>>,
    pub expires: Option<Date>,
}

impl DenyEntry {
    /// How the entry is named in output: its name, or its CIDR.
    pub fn into_label(self) -> String {
        self.name.unwrap_or_else(|| self.cidr.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    pub mode: Mode,
    /// The egress mode (`"egress"`, `EgressMode::DEFAULT` when absent).
    pub egress: EgressMode,
    pub networks: Vec<Network>,
    pub devices: Vec<Device>,
    pub vpn_endpoints: Vec<VpnEndpoint>,
    pub deny: Vec<DenyEntry>,
    /// Destinations the server may reach on their ports (`upstreams`).
    pub upstreams: Vec<Upstream>,
    /// Deny feed files as written in the registry (relative to the registry's directory).
    pub deny_files: Vec<String>,
    /// Their contents, read when the registry was loaded.
    pub feeds: Vec<Feed>,
    /// The change counter (`serial`, 0 when absent): +1 per change made through the daemon.
    pub serial: u64,
    /// How long the connections the server opens admit replies (`connections`).
    pub connections: Connections,
}

/// The registry's `connections` section: how long a connection the server opened admits
/// replies after the server's last packet on it, in seconds; `None` keeps the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connections {
    /// An open TCP connection (default 3600).
    pub tcp_idle: Option<u64>,
    /// A TCP connection after the server's FIN or RST (default 10).
    pub tcp_closing: Option<u64>,
    /// A UDP exchange (default 60).
    pub udp_idle: Option<u64>,
    /// An ICMP echo (default 30).
    pub icmp_idle: Option<u64>,
}

impl Connections {
    /// The longest timeout a registry may set: a week.
    pub const MAX_SECONDS: u64 = 7 * 24 * 3600;

    /// The timeouts the kernel applies: the registry's, else the defaults.
    pub fn timeouts(&self) -> enforcer_common::ConnTimeouts {
        let d = enforcer_common::ConnTimeouts::DEFAULT;
        let ns = |s: Option<u64>, default: u64| s.map_or(default, |s| s * 1_000_000_000);
        enforcer_common::ConnTimeouts {
            tcp_open_ns: ns(self.tcp_idle, d.tcp_open_ns),
            tcp_closing_ns: ns(self.tcp_closing, d.tcp_closing_ns),
            udp_ns: ns(self.udp_idle, d.udp_ns),
            icmp_ns: ns(self.icmp_idle, d.icmp_ns),
        }
    }
}

/// One validation problem and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in, when it is not the registry itself (a deny feed).
    pub file: Option<String>,
    /// 1-based line and column in the file, when known.
    pub line: usize,
    pub column: usize,
    /// The entry and field, e.g. `networks[0] "moitt-hq-lan" field "cidr"`.
    pub place: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.place.is_empty() {
            write!(f, "{}: ", self.place)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a registry was rejected: every problem found, in file order.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read registry {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("registry {path} is invalid ({} problem{}):\n{}", .problems.len(),
        if .problems.len() == 1 { "" } else { "s" },
        .problems.iter().map(|p| format!("  {}:{p}", p.file.as_deref().unwrap_or(path))).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

/// The message of a refused registry: every problem, with its place.
pub fn refusal(problems: &[Problem]) -> String {
    let list: Vec<String> = problems
        .iter()
        .map(|p| match &p.file {
            Some(file) => format!("{file}:{}: {}", p.line, p.message),
            None if p.place.is_empty() => p.message.clone(),
            None => format!("{}: {}", p.place, p.message),
        })
        .collect();
    format!("refused, nothing changed: {}", list.join("; "))
}

impl RegistryError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

impl Registry {
    /// The earliest expiry date among the entries.
    pub fn next_expiry(&self) -> Option<Date> {
        self.networks
            .iter()
            .map(|n| n.expires)
            .chain(self.devices.iter().map(|d| d.expires))
            .chain(self.vpn_endpoints.iter().map(|v| v.expires))
            .chain(self.deny.iter().map(|d| d.expires))
            .chain(self.upstreams.iter().map(|u| u.expires))
            .flatten()
            .min()
    }

    /// Every source prefix the registry names (networks, devices, deny entries and feeds),
    /// expired or not: what sizes the lookup tables before the policy is compiled.
    pub fn source_prefixes(&self) -> Vec<IpNet> {
        let mut prefixes: Vec<IpNet> = self.networks.iter().map(|n| n.cidr).collect();
        prefixes.extend(self.devices.iter().map(|d| IpNet::from(d.address)));
        prefixes.extend(self.deny.iter().map(|d| d.cidr));
        prefixes.extend(
            self.feeds
                .iter()
                .flat_map(|f| f.entries.iter().map(|e| e.cidr)),
        );
        prefixes
    }

    /// Reads and validates a registry file, and the deny feeds it names.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let display = path.display().to_string();
        let text = read::read_regular(path, read::REGISTRY_MAX_BYTES).map_err(|source| {
            RegistryError::Read {
                path: display.clone(),
                source,
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_at(&text, base).map_err(|problems| RegistryError::Invalid {
            path: display,
            problems,
        })
    }

    /// Parses and validates registry text (deny feeds relative to the current directory).
    pub fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        Self::parse_at(text, Path::new("."))
    }

    /// Parses and validates registry text whose deny feeds are relative to `base`; all problems
    /// at once, or the registry.
    pub fn parse_at(text: &str, base: &Path) -> Result<Self, Vec<Problem>> {
        Self::parse_with(text, |names| feed::load_all(names, base, text))
    }

    /// Parses and validates registry text whose deny feeds are given as (name, text), as a
    /// fleet's registry holds them: the checks of `parse_at`, without files.
    pub fn parse_with_feeds(text: &str, given: &[(String, String)]) -> Result<Self, Vec<Problem>> {
        Self::parse_with(text, |names| feed::from_texts(names, given, text))
    }

    fn parse_with(
        text: &str,
        load_feeds: impl FnOnce(&[String]) -> (Vec<Feed>, Vec<Problem>),
    ) -> Result<Self, Vec<Problem>> {
        let mut located = raw::parse(text)?;
        let mut problems = std::mem::take(&mut located.problems);
        problems.extend(located.cross_check(text));
        let (feeds, feed_problems) = load_feeds(&located.registry.deny_files);
        problems.sort_by_key(|p| (p.line, p.column));
        problems.extend(feed_problems);
        if problems.is_empty() {
            located.registry.feeds = feeds;
            Ok(located.registry)
        } else {
            Err(problems)
        }
    }
}

/// A registry with the place of each entry, for checks across entries.
pub(crate) struct Located {
    pub registry: Registry,
    /// Per section, for each entry of `registry`: its index in the file's list and offset.
    places: raw::Places,
    /// Problems of single entries (those entries are left out of `registry`).
    pub problems: Vec<Problem>,
    /// Line starts, built on the first problem.
    lines: std::sync::OnceLock<raw::Lines>,
}

impl Located {
    /// (index in the file's list, line, column) of an entry of `registry`.
    fn place_of(
        &self,
        text: &str,
        section: &'static str,
        position: usize,
    ) -> (usize, usize, usize) {
        match self.places.get(section).and_then(|p| p.get(position)) {
            Some(&(index, offset)) => {
                let (line, column) = self
                    .lines
                    .get_or_init(|| raw::Lines::new(text))
                    .position(offset);
                (index, line, column)
            }
            None => (position, 1, 1),
        }
    }

    /// Names unique across the whole registry; no prefix listed twice in the allowlist (networks
    /// and devices) or twice in the deny list.
    ///
    /// By sorting, not by hash maps: at a million entries, a map's inserts are cache misses
    /// (about a second), while a sort of (hash, entry) pairs is a few sequential passes. Names
    /// and prefixes are checked on two threads.
    fn cross_check(&self, text: &str) -> Vec<Problem> {
        let r = &self.registry;
        // Entries are numbered in file order across the sections.
        let bounds = [
            ("networks", r.networks.len()),
            ("devices", r.devices.len()),
            ("vpn_endpoints", r.vpn_endpoints.len()),
            ("deny", r.deny.len()),
            ("upstreams", r.upstreams.len()),
        ];
        let entry_at = |mut n: usize| -> (&'static str, usize) {
            for (section, len) in bounds {
                if n < len {
                    return (section, n);
                }
                n -= len;
            }
            unreachable!("entry number past the registry")
        };
        let name_of = |n: usize| -> Option<&str> {
            match entry_at(n) {
                ("networks", i) => Some(r.networks[i].name.as_str()),
                ("devices", i) => Some(r.devices[i].name.as_str()),
                ("vpn_endpoints", i) => Some(r.vpn_endpoints[i].name.as_str()),
                ("upstreams", i) => Some(r.upstreams[i].name.as_str()),
                (_, i) => r.deny[i].name.as_deref(),
            }
        };
        // The allowlist and the deny list are separate spaces: a prefix may be in both. Upstreams
        // may share a prefix (one name per service of a host).
        let prefix_of = |n: usize| -> Option<(bool, IpNet)> {
            match entry_at(n) {
                ("networks", i) => Some((true, r.networks[i].cidr)),
                ("devices", i) => Some((true, IpNet::from(r.devices[i].address))),
                ("vpn_endpoints" | "upstreams", _) => None,
                (_, i) => Some((false, r.deny[i].cidr)),
            }
        };
        let count = bounds.iter().map(|(_, len)| len).sum();
        let (names, prefixes) = std::thread::scope(|scope| {
            let names = scope.spawn(|| repeats(count, name_of));
            let prefixes = repeats(count, prefix_of);
            (names.join().expect("the name check panicked"), prefixes)
        });

        // (entry, 0 for its name or 1 for its prefix, first user): one entry's problems in that
        // order, as they are reported.
        let mut found: Vec<(usize, u8, usize)> = names
            .into_iter()
            .map(|(n, first)| (n, 0, first))
            .chain(prefixes.into_iter().map(|(n, first)| (n, 1, first)))
            .collect();
        found.sort_unstable();
        let index_of = |(section, position): (&'static str, usize)| {
            self.places
                .get(section)
                .and_then(|places| places.get(position))
                .map_or(position, |(index, _)| *index)
        };
        found
            .into_iter()
            .map(|(n, kind, first)| {
                let (section, position) = entry_at(n);
                let here = format!("{section}[{}]", index_of((section, position)));
                let (first_section, first_position) = entry_at(first);
                let there = format!(
                    "{first_section}[{}]",
                    index_of((first_section, first_position))
                );
                let (_, line, column) = self.place_of(text, section, position);
                let name = name_of(n);
                let (place, message) = if kind == 0 {
                    let name = name.unwrap_or_default();
                    (
                        format!("{here} \"{name}\" field \"name\""),
                        format!("duplicate name \"{name}\", already used by {there}"),
                    )
                } else {
                    let prefix = prefix_of(n).map(|(_, p)| p.to_string()).unwrap_or_default();
                    (
                        format!(
                            "{here}{}",
                            name.map(|n| format!(" \"{n}\"")).unwrap_or_default()
                        ),
                        format!("prefix {prefix} is already listed by {there}"),
                    )
                };
                Problem {
                    file: None,
                    line,
                    column,
                    place,
                    message,
                }
            })
            .collect()
    }
}

/// The entries among `0..count` whose value repeats an earlier entry's, each with the first
/// entry that has it: entries sorted by the value's hash, equal hashes compared by value.
fn repeats<T: PartialEq + std::hash::Hash>(
    count: usize,
    value: impl Fn(usize) -> Option<T>,
) -> Vec<(usize, usize)> {
    let hasher = foldhash::fast::RandomState::default();
    let mut keys: Vec<(u64, u32)> = (0..count)
        .filter_map(|n| Some((hasher.hash_one(value(n)?), u32::try_from(n).ok()?)))
        .collect();
    // Each pair is distinct (the entry numbers are), so the unstable sort orders a run of
    // equal hashes by entry: the first user comes first.
    keys.sort_unstable();
    let mut found = Vec::new();
    for run in keys.chunk_by(|a, b| a.0 == b.0).filter(|run| run.len() > 1) {
        for (i, &(_, later)) in run.iter().enumerate().skip(1) {
            let later = later as usize;
            let here = value(later);
            if let Some(&(_, first)) = run[..i]
                .iter()
                .find(|(_, earlier)| value(*earlier as usize) == here)
            {
                found.push((later, first as usize));
            }
        }
    }
    found
}

#[cfg(test)]
pub(crate) mod tests;
