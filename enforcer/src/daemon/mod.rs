//! The enforcer as a running process (`enforcer run`): start-up (`startup`), the control socket
//! and the timers (`serve`), and the way out (`detach`). The control plane it serves is
//! `control`; what it enforces is `datapath`.

mod detach;
mod fleet;
pub mod history;
mod serve;
mod startup;

use std::{io::Write as _, path::PathBuf, time::Duration};

pub use detach::{Detached, detach};

use crate::{
    control::{AuditLog, Live, LiveConfig},
    datapath::{self, AttachMode, DatapathError, VerdictCounts},
    instance::{self, InstanceError, InstanceId},
    policy::PolicyError,
    registry::{Mode, RegistryError},
    source::FileSource,
};

/// The default period of the VPN flow sweep (`run --vpn-flow-idle`): an `OpenVPN` flow is
/// forgotten after 5 to 10 minutes without a packet. `OpenVPN`'s usual keepalive (a ping every
/// 10 s) keeps a quiet tunnel's flow; NAT bindings of a UDP flow silent that long are gone too.
pub const DEFAULT_FLOW_SWEEP: Duration = Duration::from_secs(300);

/// The default period of the connection sweep: expired connections admit no replies whether or
/// not they are swept (the program checks their expiry); the sweep frees their entries.
pub const DEFAULT_CONN_SWEEP: Duration = Duration::from_secs(30);

/// The daemon's periodic work.
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    /// How often expired entries are removed.
    pub expiry_check: Duration,
    /// How often the remembered VPN flows are swept: a flow is forgotten after one to two
    /// periods without a packet.
    pub flow_sweep: Duration,
    /// How often expired connections are removed from the connection table.
    pub conn_sweep: Duration,
    /// How often the counters' history takes a sample (for the compliance report).
    pub history: Duration,
}

/// What `enforcer run` was told.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The interface to protect.
    pub iface: String,
    /// The registry file.
    pub registry: PathBuf,
    /// Overrides the registry's mode until a `mode` request changes it.
    pub mode: Option<Mode>,
    pub xdp_mode: AttachMode,
    /// On a signal, also detach the program (otherwise it keeps enforcing).
    pub detach_on_exit: bool,
    /// Where pins cannot outlive this process (a mount namespace of its own and no bpffs on the
    /// host), run anyway as a foreground process that detaches when it exits.
    pub foreground: bool,
    /// Management networks no live change may cut off without `--force`.
    pub protect: Vec<ipnet::IpNet>,
    pub timers: Timers,
    /// Where to serve Prometheus metrics (`None`: not at all).
    pub metrics: Option<std::net::SocketAddr>,
    /// Where to write the event log (`-`: standard output; `None`: no events).
    pub events: Option<PathBuf>,
    /// Follow the fleet's registry in etcd (`registry` is then its local cache).
    pub fleet: Option<crate::fleet::agent::AgentConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("the thread {0} panicked")]
    Thread(&'static str),
    #[error("control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("accepting a control connection: {0}")]
    Accept(std::io::Error),
    #[error("waiting for signals: {0}")]
    Signal(std::io::Error),
    #[error("starting the event loop: {0}")]
    Runtime(std::io::Error),
    #[error(
        "metrics address {addr}: {source} (another process may listen there; choose another with --metrics ADDR:PORT)"
    )]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Events(#[from] crate::events::EventLogError),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

/// How the daemon stopped.
pub struct Stopped {
    pub signal: &'static str,
    /// The counters by reason when it stopped.
    pub counts: VerdictCounts,
}

/// Runs the enforcer on `config.iface` until SIGINT or SIGTERM.
pub fn run(config: &DaemonConfig) -> Result<Stopped, DaemonError> {
    // A client that closes its end early must not end the daemon: writes fail instead.
    // SAFETY: setting a signal's disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let bpffs = instance::ensure_bpffs(config.foreground)?;
    // Pins in a bpffs of this process's own die with it: the program must not be left to
    // them, so it is detached when the controller stops, whatever was asked.
    let detach_on_exit = config.detach_on_exit || bpffs == instance::Bpffs::Private;
    if bpffs == instance::Bpffs::Private {
        tracing::warn!(
            "--foreground in a mount namespace of its own: the program is detached when this controller exits (it cannot outlive it)"
        );
    }
    let id = InstanceId {
        iface: config.iface.clone(),
        netns: instance::current_netns()?,
    };
    // Bound before anything is attached, so that a taken address refuses the start cleanly.
    let metrics_listener = config
        .metrics
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| DaemonError::Metrics { addr, source })
        })
        .transpose()?;
    // Opened before anything is attached, like the metrics address.
    let mut event_log = config
        .events
        .as_ref()
        .map(|path| crate::events::EventLog::open(path, &config.iface))
        .transpose()?;
    // A fleet agent's registry file is its cache of the fleet's: brought up to date first.
    let agent = match &config.fleet {
        Some(fleet) => {
            let cache = crate::fleet::agent::Cache {
                file: config.registry.clone(),
            };
            let start = crate::fleet::agent::prepare(fleet, &cache)?;
            for r in &start.refused {
                tracing::warn!(key = %r.key, "left out of the fleet's registry: {}", r.problem);
            }
            Some((fleet, cache, start))
        }
        None => None,
    };
    let source = FileSource::new(&config.registry);
    for done in crate::source::RegistrySource::recover(&source) {
        tracing::warn!("{done}");
    }
    let started = startup::start(config, &id, &source)?;
    let policy = &started.in_force.policy;
    let (policy_mode, policy_egress) = (policy.mode, policy.egress);
    let xdp_mode = started.state.xdp_mode.clone();
    tracing::info!(
        instance = %id.name(),
        mode = %policy.mode,
        xdp_mode,
        networks = policy.count(crate::policy::RuleKind::Network),
        devices = policy.count(crate::policy::RuleKind::Device),
        deny = policy.count(crate::policy::RuleKind::Deny),
        deny_feed = policy.count(crate::policy::RuleKind::DenyFeed),
        vpn_endpoints = policy.vpn_endpoints,
        expired_skipped = policy.expired.len(),
        "enforcer attached to {}", config.iface
    );
    for e in &policy.expired {
        tracing::warn!(section = e.section, name = %e.name, expired = %e.expired, "expired entry not loaded");
    }
    // Not `println!`: a closed standard output must not stop the daemon.
    let _ = writeln!(
        std::io::stdout(),
        "enforcer running on {} (instance {}, {} mode, {xdp_mode} XDP); Ctrl-C to stop",
        config.iface,
        id.name(),
        policy.mode
    );

    let socket = id.control_socket();
    let _ = std::fs::remove_file(&socket);
    let live_config = LiveConfig {
        id: id.clone(),
        state: started.state,
        mode_override: config.mode,
        protected: config.protect.clone(),
        audit: {
            let mut audit = AuditLog::new(AuditLog::beside(&config.registry), id.name());
            if let Some(gap) = audit.reconcile(started.in_force.serial) {
                tracing::warn!("{gap}");
            }
            audit
        },
    };
    let mut live = Live::new(live_config, started.in_force, Box::new(source));
    if let Some((fleet, ..)) = &agent {
        live.follow_fleet(fleet.etcd.endpoints.join(","));
    }
    let metrics = metrics_listener
        .as_ref()
        .map(|_| crate::metrics::Shared::new(live.facts(), id.pin_dir(), id.state_file()));
    let events = match event_log.take() {
        Some(mut log) => {
            let ring = live.datapath_mut().take_events()?;
            // Before the socket serves and the log says "started": a packet the moment a
            // client sees the enforcer ready has its event (the ring keeps it for the reader).
            live.datapath_mut()
                .set_event_budget(Some(serve::event_budget_per_cpu()))?;
            log.daemon(
                "started",
                &format!(
                    "enforcer attached to {} ({policy_mode} mode, egress {policy_egress}, {xdp_mode} XDP)",
                    config.iface
                ),
                true,
                serde_json::json!({"labels": {"registry_serial": live.serial().to_string()}}),
            );
            Some((log, ring))
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let socket_error = |source| DaemonError::Socket {
        path: socket.display().to_string(),
        source,
    };
    // On an error the program stays attached and pinned: enforcement continues without us.
    let signal = runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(&socket).map_err(socket_error)?;
        // Root only: the file mode keeps others from connecting, peer credentials are checked too.
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(socket_error)?;
        tracing::info!(socket = %socket.display(), "control socket ready");
        // Under systemd (Type=notify): the policy is in force and the socket serves.
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            tracing::warn!("cannot tell the service manager that the enforcer is ready: {e}");
        }
        if let (Some(listener), Some(shared)) = (metrics_listener, &metrics) {
            let addr = listener.local_addr().ok();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
                DaemonError::Metrics {
                    addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
                    source,
                }
            })?;
            tokio::spawn(crate::metrics::serve(
                listener,
                std::sync::Arc::clone(shared),
            ));
            tracing::info!(?addr, "metrics served at http://ADDR/metrics");
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT"),
                _ = term.recv() => Ok("SIGTERM"),
            }
        };
        let events = match events {
            Some((log, ring)) => Some(serve::Events::new(log, ring).map_err(DaemonError::Runtime)?),
            None => None,
        };
        // On the event loop: the follower and the status publisher are its tasks.
        let link =
            agent.map(|(fleet, cache, start)| fleet::FleetLink::start(fleet, cache, start, &live));
        serve::serve(
            listener,
            &mut live,
            config.timers,
            config.xdp_mode,
            serve::Watchers {
                metrics: metrics.as_deref(),
                events,
                fleet: link,
            },
            shutdown,
        )
        .await
    })?;
    let datapath = live.into_datapath();
    let counts = datapath.verdicts()?;
    drop(datapath);
    if detach_on_exit {
        datapath::detach_pinned(&id.pin_dir())?;
        instance::release(&id);
        tracing::info!(signal, "detached from {}", config.iface);
    } else {
        tracing::info!(
            signal,
            "controller stopping; the program stays attached to {} and keeps enforcing (`enforcer detach --instance {}` removes it)",
            config.iface,
            id.name()
        );
    }
    Ok(Stopped { signal, counts })
}
