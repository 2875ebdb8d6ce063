//! The egress program: attached to the interface's egress (a tcx link, Linux 6.6 or later;
//! clsact through netlink before), pinned beside the XDP program so that it outlives the
//! controller, adopted or replaced by a restarted one, and removed by `detach_pinned`. It
//! records the connections the server opens (`CONNS`); the controller sweeps the expired ones.

use std::{collections::HashSet, path::Path};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use enforcer_common::{Conn, ConnKey, ConnTimeouts, EGRESS_PROGRAM_NAME, map_names, peer_slot};

use super::{Datapath, DatapathError, boxed};

/// File names of the pinned egress link and program inside an instance's pin directory.
pub const EGRESS_LINK_PIN: &str = "egress_link";
pub const EGRESS_PROGRAM_PIN: &str = "egress_program";

/// What one sweep of the connection table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSweep {
    /// Connections that still admit replies.
    pub kept: usize,
    /// Connections past their expiry: removed.
    pub expired: usize,
}

/// Now on the clock `bpf_ktime_get_ns` reads (`CLOCK_MONOTONIC`), in ns.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

fn attach_error(iface: &str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> DatapathError {
    let iface = iface.to_string();
    move |source| DatapathError::Attach {
        iface: format!("{iface} (egress)"),
        source,
    }
}

/// Removes a pinned egress link: the kernel detaches the program when the last reference goes.
pub(super) fn unpin_egress(dir: &Path) {
    let path = dir.join(EGRESS_LINK_PIN);
    if let Ok(link) = PinnedLink::from_pin(&path) {
        let _ = link.unpin();
    }
}

impl Datapath {
    /// The egress program (for test runs and benchmarks).
    pub fn egress_program(&self) -> &SchedClassifier {
        self.ebpf
            .as_ref()
            .expect("the program is back from the verifier's thread")
            .program(EGRESS_PROGRAM_NAME)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .expect("load() checked that the egress program exists")
    }

    fn egress_mut(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .as_mut()
            .expect("the program is back from the verifier's thread")
            .program_mut(EGRESS_PROGRAM_NAME)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("load() checked that the egress program exists")
    }

    /// Attaches the egress program to `iface` and pins it and its link under `dir`. On a
    /// kernel without tcx links the program is attached through a clsact qdisc, which keeps it
    /// without a pin.
    pub fn attach_egress_pinned(&mut self, iface: &str, dir: &Path) -> Result<(), DatapathError> {
        let error = attach_error(iface);
        let program = self.egress_mut();
        let link_id = match program.attach(iface, TcAttachType::Egress) {
            Ok(id) => id,
            Err(first) => {
                // Before Linux 6.6: a netlink filter needs the clsact qdisc.
                let _ = aya::programs::tc::qdisc_add_clsact(iface);
                program
                    .attach(iface, TcAttachType::Egress)
                    .map_err(|_| error(boxed(first)))?
            }
        };
        let link = program.take_link(link_id).map_err(|e| error(boxed(e)))?;
        let link_path = dir.join(EGRESS_LINK_PIN);
        let _ = std::fs::remove_file(&link_path);
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(&link_path).map_err(|e| error(boxed(e)))?;
            }
            Err(_) => tracing::warn!(
                %iface,
                "egress program attached through a clsact qdisc (no tcx links before Linux 6.6); it stays attached after the controller stops"
            ),
        };
        let program_path = dir.join(EGRESS_PROGRAM_PIN);
        let _ = std::fs::remove_file(&program_path);
        self.egress_mut()
            .pin(&program_path)
            .map_err(|e| error(boxed(e)))?;
        Ok(())
    }

    /// Keeps the egress program an earlier run pinned under `dir` if it is this build's (same
    /// tag); otherwise attaches this build's and then removes the earlier one, so that no
    /// outgoing packet goes unrecorded. Returns what happened.
    pub fn adopt_egress(&mut self, iface: &str, dir: &Path) -> Result<&'static str, DatapathError> {
        let link_path = dir.join(EGRESS_LINK_PIN);
        let program_path = dir.join(EGRESS_PROGRAM_PIN);
        let pinned_tag = aya::programs::ProgramInfo::from_pin(&program_path)
            .map(|i| i.tag())
            .ok();
        let our_tag = self
            .egress_mut()
            .info()
            .map_err(|e| attach_error(iface)(boxed(e)))?
            .tag();
        if link_path.exists() && pinned_tag == Some(our_tag) {
            return Ok("adopted the running egress program");
        }
        // The earlier link (if any) is held open while the new program attaches beside it.
        let earlier = PinnedLink::from_pin(&link_path).ok();
        let _ = std::fs::remove_file(&link_path);
        self.attach_egress_pinned(iface, dir)?;
        if let Some(earlier) = earlier {
            drop(earlier.unpin());
        }
        Ok("attached this build's egress program")
    }

    /// Writes the connection timeouts the egress program applies.
    pub fn set_conn_timeouts(&mut self, timeouts: ConnTimeouts) -> Result<(), DatapathError> {
        let name = map_names::CONN_TIMEOUTS;
        let mut array: aya::maps::Array<&mut MapData, ConnTimeouts> = self.typed_mut(name)?;
        array.set(0, timeouts, 0).map_err(super::map_error(name))
    }

    /// The connection timeouts the egress program applies.
    pub fn conn_timeouts(&self) -> Result<ConnTimeouts, DatapathError> {
        let name = map_names::CONN_TIMEOUTS;
        let array: aya::maps::Array<&MapData, ConnTimeouts> = self.typed(name)?;
        let timeouts = array.get(&0, 0).map_err(super::map_error(name))?;
        Ok(if timeouts.tcp_open_ns == 0 {
            ConnTimeouts::DEFAULT
        } else {
            timeouts
        })
    }

    /// The connections the table holds.
    pub fn conn_count(&self) -> Result<usize, DatapathError> {
        let conns: BpfHashMap<&MapData, ConnKey, Conn> = self.typed(map_names::CONNS)?;
        Ok(conns.keys().filter(Result::is_ok).count())
    }

    /// Removes the connections past their expiry, and unmarks the `PEERS` slots no connection
    /// holds any more (a packet from those peers then costs ingress one array read again).
    pub fn sweep_conns(&mut self) -> Result<ConnSweep, DatapathError> {
        let now = monotonic_ns();
        let name = map_names::CONNS;
        let mut sweep = ConnSweep::default();
        let mut expired = Vec::new();
        let mut live_slots = HashSet::new();
        {
            let conns: BpfHashMap<&MapData, ConnKey, Conn> = self.typed(name)?;
            for key in conns.keys().filter_map(Result::ok) {
                match conns.get(&key, 0) {
                    Ok(conn) if conn.expires_ns > now => {
                        sweep.kept += 1;
                        live_slots.insert(peer_slot(&key.remote, key.family));
                    }
                    Ok(_) => expired.push(key),
                    Err(_) => {}
                }
            }
        }
        {
            let mut conns: BpfHashMap<&mut MapData, ConnKey, Conn> = self.typed_mut(name)?;
            for key in &expired {
                // A connection refreshed since it was read keeps its entry.
                if conns.get(key, 0).is_ok_and(|c| c.expires_ns <= now) {
                    let _ = conns.remove(key);
                    sweep.expired += 1;
                }
            }
        }
        self.unmark_peers(&live_slots)?;
        Ok(sweep)
    }

    /// Clears the `PEERS` slots not in `live`, then marks again the slot of any connection the
    /// egress program added meanwhile.
    fn unmark_peers(&mut self, live: &HashSet<u32>) -> Result<(), DatapathError> {
        self.write_slots(map_names::PEERS, |slot| live.contains(&slot))?;
        let late: HashSet<u32> = {
            let conns: BpfHashMap<&MapData, ConnKey, Conn> = self.typed(map_names::CONNS)?;
            conns
                .keys()
                .filter_map(Result::ok)
                .map(|key| peer_slot(&key.remote, key.family))
                .collect()
        };
        self.write_slots(map_names::PEERS, |slot| {
            live.contains(&slot) || late.contains(&slot)
        })
    }
}
