//! The remembered VPN flows (`VPN_FLOWS`): the controller's periodic sweep forgets the idle
//! ones, keeps `FLOW_PEERS` to the ends of those left, and turns the flow lookup off once none
//! is.

use aya::maps::MapData;
use enforcer_common::{FLOW_ACTIVE, FlowKey, FlowSessions, map_names};

use super::{Datapath, DatapathError, map_error};

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

impl Datapath {
    /// Whether the program has remembered any VPN flow (one `BPF_MAP_GET_NEXT_KEY`).
    pub(super) fn vpn_flows_exist(&self) -> Result<bool, DatapathError> {
        let name = map_names::VPN_FLOWS;
        let flows: aya::maps::HashMap<&MapData, FlowKey, u8> = self.typed(name)?;
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
            let mut flows: aya::maps::HashMap<&mut MapData, FlowKey, u8> = self.typed_mut(name)?;
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
        self.forget_orphan_sessions()?;
        self.unmark_flow_peers()?;
        if self.config()?.vpn_flows_seen != 0 && !self.vpn_flows_exist()? {
            // `update_config` sets the flag again if the program remembers a flow meanwhile.
            self.update_config(|c| c.vpn_flows_seen = 0)?;
            sweep.flag_cleared = self.config()?.vpn_flows_seen == 0;
        }
        Ok(sweep)
    }

    /// Removes the session ids (`VPN_FLOW_SESSIONS`) of flows no longer remembered: forgotten
    /// by this sweep or evicted from the LRU map. A session the program stores for a flow it
    /// remembers meanwhile is one the program writes again with the flow's next reset.
    fn forget_orphan_sessions(&mut self) -> Result<(), DatapathError> {
        let flows: std::collections::HashSet<FlowKey> = {
            let flows: aya::maps::HashMap<&MapData, FlowKey, u8> =
                self.typed(map_names::VPN_FLOWS)?;
            flows.keys().filter_map(Result::ok).collect()
        };
        let name = map_names::VPN_FLOW_SESSIONS;
        let mut sessions: aya::maps::HashMap<&mut MapData, FlowKey, FlowSessions> =
            self.typed_mut(name)?;
        let orphans: Vec<FlowKey> = sessions
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !flows.contains(key))
            .collect();
        for key in orphans {
            match sessions.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error(name)(e)),
            }
        }
        Ok(())
    }

    /// Clears the `FLOW_PEERS` slots no remembered flow holds any more, then marks again those of
    /// flows the program remembered meanwhile.
    fn unmark_flow_peers(&mut self) -> Result<(), DatapathError> {
        let ends = |datapath: &Self| -> Result<std::collections::HashSet<u32>, DatapathError> {
            let flows: aya::maps::HashMap<&MapData, FlowKey, u8> =
                datapath.typed(map_names::VPN_FLOWS)?;
            Ok(flows
                .keys()
                .filter_map(Result::ok)
                .flat_map(|k| {
                    [
                        enforcer_common::peer_slot(&k.lo_addr, k.family),
                        enforcer_common::peer_slot(&k.hi_addr, k.family),
                    ]
                })
                .collect())
        };
        let live = ends(self)?;
        self.write_slots(map_names::FLOW_PEERS, |slot| live.contains(&slot))?;
        let late = ends(self)?;
        self.write_slots(map_names::FLOW_PEERS, |slot| {
            live.contains(&slot) || late.contains(&slot)
        })
    }
}
