//! The verdict counters the program keeps (by reason, by rule, by VPN protocol), read back and
//! summed over CPUs: from a loaded program, or from the maps a running enforcer pinned.

use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray};
use enforcer_common::{Counter, MONITOR_SLOT_OFFSET, Reason, VpnProtocol, map_names};

use super::{Datapath, DatapathError, boxed, map_error};

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
    /// Reads `VERDICTS` or `EGRESS_VERDICTS` (`name`).
    pub fn read(map: &Map, name: &'static str) -> Result<Self, DatapathError> {
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

/// The hit counters of the rules with these numbers, in `RULE_HITS` or `EGRESS_RULE_HITS`
/// (`name`).
pub fn read_rule_hits(
    map: &Map,
    name: &'static str,
    indices: &[u32],
) -> Result<Vec<u64>, DatapathError> {
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
    pub fn verdicts(&self) -> Result<VerdictCounts, DatapathError> {
        VerdictCounts::read(self.map(map_names::VERDICTS)?, map_names::VERDICTS)
    }

    /// The egress program's verdicts.
    pub fn egress_verdicts(&self) -> Result<VerdictCounts, DatapathError> {
        let name = map_names::EGRESS_VERDICTS;
        VerdictCounts::read(self.map(name)?, name)
    }

    pub fn rule_hits(&self, indices: &[u32]) -> Result<Vec<u64>, DatapathError> {
        let name = map_names::RULE_HITS;
        read_rule_hits(self.map(name)?, name, indices)
    }

    /// The egress program's hits of the rules with these numbers.
    pub fn egress_rule_hits(&self, indices: &[u32]) -> Result<Vec<u64>, DatapathError> {
        let name = map_names::EGRESS_RULE_HITS;
        read_rule_hits(self.map(name)?, name, indices)
    }

    pub fn vpn_verdicts(&self) -> Result<VpnCounts, DatapathError> {
        VpnCounts::read(self.map(map_names::VPN_VERDICTS)?)
    }
}

/// Every counter of an instance whose maps are pinned in `dir`; `rules`: the rule numbers whose
/// hits to read.
pub struct InstanceCounters {
    pub verdicts: VerdictCounts,
    pub hits: Vec<u64>,
    pub vpn: VpnCounts,
    /// The egress program's verdicts and rule hits (`None`: an instance of a build without
    /// egress verdicts, which pinned no such maps).
    pub egress: Option<(VerdictCounts, Vec<u64>)>,
    /// Events the kernel suppressed (`None`: a build without events).
    pub events_suppressed: Option<u64>,
}

impl InstanceCounters {
    pub fn read_pinned(dir: &Path, rules: &[u32]) -> Result<Self, DatapathError> {
        let open = |name| open_pinned(&dir.join(name), name);
        let (verdicts, hits) = (map_names::VERDICTS, map_names::RULE_HITS);
        let (egress_verdicts, egress_hits) =
            (map_names::EGRESS_VERDICTS, map_names::EGRESS_RULE_HITS);
        let egress = if dir.join(egress_verdicts).exists() {
            Some((
                VerdictCounts::read(&open(egress_verdicts)?, egress_verdicts)?,
                read_rule_hits(&open(egress_hits)?, egress_hits, rules)?,
            ))
        } else {
            None
        };
        let suppressed = map_names::EVENT_SUPPRESSED;
        let events_suppressed = if dir.join(suppressed).exists() {
            let map = open(suppressed)?;
            let array: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(&map).map_err(map_error(suppressed))?;
            let values = array.get(&0, 0).map_err(map_error(suppressed))?;
            Some(values.iter().sum())
        } else {
            None
        };
        Ok(Self {
            verdicts: VerdictCounts::read(&open(verdicts)?, verdicts)?,
            hits: read_rule_hits(&open(hits)?, hits, rules)?,
            vpn: VpnCounts::read(&open(map_names::VPN_VERDICTS)?)?,
            egress,
            events_suppressed,
        })
    }
}
