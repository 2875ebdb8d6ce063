//! The approved-network registry: the JSON file an administrator edits, parsed and validated into
//! a typed model. Validation reports every problem at once, each with its place in the file;
//! a registry with any problem is rejected whole.

mod date;
mod feed;
mod ports;
mod raw;

use std::{collections::HashMap, fmt, net::IpAddr, path::Path};

pub use date::Date;
pub use enforcer_common::VpnProtocol;
pub use feed::{Feed, FeedEntry};
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
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "enforce" => Ok(Self::Enforce),
            "monitor" => Ok(Self::Monitor),
            other => Err(format!(
                "unknown mode \"{other}\" (expected \"enforce\" or \"monitor\")"
            )),
        }
    }
}

/// An approved network: a prefix, optionally limited to some ports, optionally time-limited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub cidr: IpNet,
    pub ministry: Option<String>,
    /// `None`: every port and protocol.
    pub ports: Option<Vec<PortSpec>>,
    pub expires: Option<Date>,
    pub note: Option<String>,
}

/// A pre-approved single device (a /32 or /128).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub address: IpAddr,
    pub owner: Option<String>,
    pub ports: Option<Vec<PortSpec>>,
    pub expires: Option<Date>,
    pub note: Option<String>,
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

/// A denied range: beats every allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyEntry {
    pub name: Option<String>,
    pub cidr: IpNet,
    pub note: Option<String>,
    pub expires: Option<Date>,
}

impl DenyEntry {
    /// How the entry is named in output: its name, or its CIDR.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.cidr.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    pub mode: Mode,
    pub networks: Vec<Network>,
    pub devices: Vec<Device>,
    pub vpn_endpoints: Vec<VpnEndpoint>,
    pub deny: Vec<DenyEntry>,
    /// Deny feed files as written in the registry (relative to the registry's directory).
    pub deny_files: Vec<String>,
    /// Their contents, read when the registry was loaded.
    pub feeds: Vec<Feed>,
    /// The change counter (`serial`, 0 when absent): +1 per change made through the daemon.
    pub serial: u64,
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

impl RegistryError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

impl Registry {
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
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: display.clone(),
            source,
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
        let mut located = raw::parse(text)?;
        let mut problems = std::mem::take(&mut located.problems);
        problems.extend(located.cross_check(text));
        let (feeds, feed_problems) = feed::load_all(&located.registry.deny_files, base, text);
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
    fn cross_check(&self, text: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let r = &self.registry;
        // First users are kept as (section, position): the text is built only for a problem.
        let count = r.networks.len() + r.devices.len() + r.vpn_endpoints.len() + r.deny.len();
        let hasher = foldhash::fast::RandomState::default();
        let mut names: HashMap<&str, (&'static str, usize), _> =
            HashMap::with_capacity_and_hasher(count, hasher.clone());
        let mut allow: HashMap<IpNet, (&'static str, usize), _> =
            HashMap::with_capacity_and_hasher(r.networks.len() + r.devices.len(), hasher.clone());
        let mut deny: HashMap<IpNet, (&'static str, usize), _> =
            HashMap::with_capacity_and_hasher(r.deny.len(), hasher);

        // The sections in file order, one entry at a time (a million entries: no list of them).
        let networks = r
            .networks
            .iter()
            .enumerate()
            .map(|(i, n)| ("networks", i, Some(n.name.as_str()), Some((n.cidr, true))));
        let devices = r.devices.iter().enumerate().map(|(i, d)| {
            (
                "devices",
                i,
                Some(d.name.as_str()),
                Some((IpNet::from(d.address), true)),
            )
        });
        let vpn_endpoints = r
            .vpn_endpoints
            .iter()
            .enumerate()
            .map(|(i, v)| ("vpn_endpoints", i, Some(v.name.as_str()), None));
        let deny_entries = r
            .deny
            .iter()
            .enumerate()
            .map(|(i, d)| ("deny", i, d.name.as_deref(), Some((d.cidr, false))));
        let entries = networks
            .chain(devices)
            .chain(vpn_endpoints)
            .chain(deny_entries);

        for (section, position, name, prefix) in entries {
            let index_of = |s: &'static str, p: usize| {
                self.places
                    .get(s)
                    .and_then(|places| places.get(p))
                    .map_or(p, |(index, _)| *index)
            };
            let index = index_of(section, position);
            let here = || format!("{section}[{index}]");
            let mut problem = |place: String, message: String| {
                let (_, line, column) = self.place_of(text, section, position);
                problems.push(Problem {
                    file: None,
                    line,
                    column,
                    place,
                    message,
                });
            };
            if let Some(name) = name {
                match names.get(name) {
                    Some(&(s, p)) => problem(
                        format!("{} \"{name}\" field \"name\"", here()),
                        format!(
                            "duplicate name \"{name}\", already used by {s}[{}]",
                            index_of(s, p)
                        ),
                    ),
                    None => {
                        names.insert(name, (section, position));
                    }
                }
            }
            if let Some((prefix, is_allow)) = prefix {
                let seen = if is_allow { &mut allow } else { &mut deny };
                match seen.get(&prefix) {
                    Some(&(s, p)) => problem(
                        format!(
                            "{}{}",
                            here(),
                            name.map(|n| format!(" \"{n}\"")).unwrap_or_default()
                        ),
                        format!(
                            "prefix {prefix} is already listed by {s}[{}]",
                            index_of(s, p)
                        ),
                    ),
                    None => {
                        seen.insert(prefix, (section, position));
                    }
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests;
