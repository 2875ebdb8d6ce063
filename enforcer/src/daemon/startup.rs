//! Start-up: claim the instance, then either adopt the program an earlier run left attached (its
//! maps are reconciled with the registry), take over an earlier build's program (another pin
//! layout), or load, fill and attach a new one. The kernel verifies the program while the
//! policy is compiled and the maps are filled.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{DaemonConfig, DaemonError};
use crate::{
    control::InForce,
    datapath::{self, Datapath},
    instance::{self, InstanceId, State, rule_labels},
    policy::Policy,
    registry::Date,
    source::RegistrySource,
};

/// What start-up leaves in force.
pub struct Started {
    pub in_force: InForce,
    pub state: State,
}

/// Loads the registry from `source` and puts it in force on the configured interface.
pub fn start(
    config: &DaemonConfig,
    id: &InstanceId,
    source: &dyn RegistrySource,
) -> Result<Started, DaemonError> {
    let timer = Instant::now();
    let iface = config.iface.as_str();
    let (registry, version) = source.load()?;
    tracing::debug!(ms = timer.elapsed().as_millis(), mib = ?crate::memory_mib(), "registry parsed");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!(
            "not running as root: loading the XDP program needs root or CAP_BPF + CAP_NET_ADMIN"
        );
    }
    if !datapath::interface_exists(iface) {
        return Err(datapath::DatapathError::NoSuchInterface(iface.to_string()).into());
    }
    instance::claim(id)?;
    let pin_dir = id.pin_dir();
    let previous = State::read(&id.state_file()).ok();
    let link_pin = pin_dir.join(datapath::LINK_PIN);
    let adopting = link_pin.exists()
        && {
            // A link whose interface was removed (or replaced by a new one of the same name)
            // enforces nothing: adopting it would leave the interface unprotected.
            let live = datapath::pinned_link_ifindex(&link_pin).ok() == datapath::ifindex(iface);
            if !live {
                tracing::warn!(link = %link_pin.display(), "the pinned link no longer holds {iface} (interface removed or replaced); attaching anew");
                let _ = std::fs::remove_file(&link_pin);
            }
            live
        };
    // An enforcer of an earlier build (another pin layout) still attached to this interface:
    // its link is taken over once the new maps are filled, never its maps.
    let legacy = if adopting {
        None
    } else {
        id.legacy_pin_dirs().into_iter().find(|dir| {
            let link = dir.join(datapath::LINK_PIN);
            link.exists() && datapath::pinned_link_ifindex(&link).ok() == datapath::ifindex(iface)
        })
    };
    tracing::debug!(ms = timer.elapsed().as_millis(), "instance claimed");
    // Fresh maps (nothing pinned yet) are sized for this registry and can be filled while the
    // kernel verifies the program; pinned ones may have to grow, which needs the program.
    let fresh = !pin_dir.join(enforcer_common::map_names::SOURCE_V4).exists();
    let mut datapath = {
        let prefixes = registry.source_prefixes();
        Datapath::create_pinned(&pin_dir, &prefixes)?
    };
    // What the daemon keeps of the registry; the rest is dropped once the maps are filled
    // (a million entries are hundreds of MiB).
    let serial = registry.serial;
    let next_expiry = registry.next_expiry();
    let mut registry = Some(registry);
    let started = (|| -> Result<(State, Policy), DaemonError> {
        // The maps under the pin directory are the ones the kernel enforces with (an earlier
        // run's, when its program is still attached): what they hold is diffed to the registry.
        let mut fill = |datapath: &mut Datapath| -> Result<Policy, DaemonError> {
            let current = datapath.read_back()?;
            tracing::debug!(ms = timer.elapsed().as_millis(), "maps read back");
            let registry = registry.take().expect("taken once");
            // Entries the maps hold (an earlier run's) keep their rule numbers.
            let previous =
                (!current.rules.is_empty() || !current.vpn_groups.is_empty()).then_some(&current);
            let mut policy = Policy::from_registry(registry, Date::today(), previous)?;
            if let Some(mode) = config.mode {
                policy.mode = mode;
            }
            tracing::debug!(ms = timer.elapsed().as_millis(), mib = ?crate::memory_mib(), "policy compiled");
            // The rule labels (`rules.json`, for `stats`) are written beside the fill: a
            // million take most of a second.
            std::thread::scope(|scope| -> Result<(), DaemonError> {
                let labels = scope.spawn(|| State::write_rules(id, &rule_labels(&policy)));
                datapath.apply(&current, &policy)?;
                // The maps may be an earlier build's, beside a filter map new to this one.
                datapath.rebuild_v6_filter()?;
                tracing::debug!(ms = timer.elapsed().as_millis(), mib = ?crate::memory_mib(), "maps filled");
                labels
                    .join()
                    .map_err(|_| DaemonError::Thread("writing rules.json"))??;
                Ok(())
            })?;
            Ok(policy)
        };
        let policy = if fresh {
            datapath.verify_while(fill)??
        } else {
            datapath.verify_while(|_| ())?;
            fill(&mut datapath)?
        };
        tracing::debug!(ms = timer.elapsed().as_millis(), mib = ?crate::memory_mib(), "program verified, maps filled");
        let adopted_mode = || {
            previous
                .as_ref()
                .map_or_else(|| "adopted".to_string(), |p| p.xdp_mode.clone())
        };
        // The egress program goes first: connections the server opens from now on are
        // recorded before ingress enforces, so their replies are never dropped as unlisted.
        let xdp_mode = if adopting {
            let how = datapath.adopt_egress(iface, &pin_dir)?;
            tracing::info!(instance = %id.name(), "{how}");
            let how = datapath.adopt(&pin_dir)?;
            tracing::info!(instance = %id.name(), "{how}; maps reconciled with {}", source.location());
            adopted_mode()
        } else if let Some(old) = &legacy {
            datapath.attach_egress_pinned(iface, &pin_dir)?;
            datapath.take_over_legacy(old, &pin_dir)?;
            tracing::info!(instance = %id.name(), from = %old.display(), "took over an earlier build's enforcer (one link update; its counters start afresh)");
            adopted_mode()
        } else {
            datapath.attach_egress_pinned(iface, &pin_dir)?;
            datapath
                .attach_pinned(iface, config.xdp_mode, &pin_dir)?
                .to_string()
        };
        let state = State {
            instance: id.name(),
            pid: std::process::id(),
            iface: iface.to_string(),
            netns: id.netns,
            mode: policy.mode.to_string(),
            egress: policy.egress.to_string(),
            xdp_mode,
            program_id: datapath.program_id(),
            registry: source.location(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            events: config
                .events
                .as_ref()
                .filter(|p| p.as_os_str() != "-")
                .map(|p| {
                    std::fs::canonicalize(p)
                        .unwrap_or_else(|_| p.clone())
                        .display()
                        .to_string()
                }),
            fleet: config.fleet.as_ref().map(|f| crate::instance::FleetOf {
                endpoints: f.etcd.endpoints.join(","),
                host: f.host.clone(),
            }),
        };
        state.write(id)?;
        Ok((state, policy))
    })();
    match started {
        Ok((state, policy)) => Ok(Started {
            in_force: InForce {
                datapath,
                policy,
                serial,
                next_expiry,
                version,
            },
            state,
        }),
        Err(error) => {
            // Only what this run created is removed; an adopted program keeps enforcing.
            if !adopting {
                let _ = datapath::detach_pinned(&pin_dir);
                instance::release(id);
            }
            Err(error)
        }
    }
}
