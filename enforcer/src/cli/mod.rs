//! The command line: arguments (clap) → one function per verb. Human output by default,
//! `--json` where scripts need it. The verbs of the running enforcer are in `live`.

mod live;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use enforcer_common::{Action, Reason, VpnProtocol, map_names};

use live::{
    AllowAction, DenyAction, DeviceAction, Target, VpnAction, control_command, send_request,
};

use crate::{
    control,
    datapath::{self, AttachMode, Datapath, VerdictCounts, VpnCounts},
    instance::{self, InstanceId, State},
    policy::{Policy, RuleKind},
    registry::{Date, Mode, Protocol, Registry},
};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer",
    version,
    about = "XDP access-control enforcer for the approved-network registry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load the registry, attach to an interface and enforce until SIGINT/SIGTERM.
    Run {
        /// Interface to protect (the e-Office server's NIC, or the gateway's inside interface).
        #[arg(long)]
        iface: String,
        /// The approved-network registry (JSON).
        #[arg(long)]
        registry: PathBuf,
        /// Override the registry's mode: `monitor` passes everything and counts would-be drops.
        #[arg(long)]
        mode: Option<Mode>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: AttachMode,
        /// On SIGINT/SIGTERM also detach the program (default: it keeps enforcing without the
        /// controller until `enforcer detach`).
        #[arg(long)]
        detach_on_exit: bool,
        /// A management network (repeatable) that no live change may cut off without --force.
        #[arg(long = "protect", value_name = "CIDR")]
        protect: Vec<ipnet::IpNet>,
        /// How often expired entries are removed (seconds).
        #[arg(long, default_value_t = 60, hide = true)]
        expiry_check_secs: u64,
        /// Seconds between sweeps of the remembered VPN flows (`OpenVPN`, whose later packets
        /// carry no signature): a flow is forgotten after one to two sweeps without a packet.
        /// While any is remembered, every TCP/UDP packet also meets the flow lookup.
        #[arg(long, value_name = "SECONDS", default_value_t = control::DEFAULT_FLOW_SWEEP.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
        vpn_flow_idle: u64,
    },
    /// Remove an enforcer's program from its interface, and its pins and state (its controller
    /// must be stopped first). Traffic is unfiltered afterwards.
    Detach {
        /// Instance name (IFACE@NETNS).
        #[arg(long)]
        instance: Option<String>,
        /// Interface of the enforcer.
        #[arg(long)]
        iface: Option<String>,
    },
    /// Check a registry file; exit 0 if valid, 1 with every problem if not.
    Validate {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Say what the registry does with a packet from ADDR, and which rule decides.
    Check {
        /// Source address of the packet.
        addr: IpAddr,
        /// Destination port (TCP/UDP).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "tcp")]
        proto: Protocol,
        /// Treat ADDR as the remote endpoint of a VPN packet of this protocol (wireguard,
        /// openvpn, ipsec, l2tp, pptp, tailscale) and say whether it is approved.
        #[arg(long, value_parser = parse_vpn_protocol)]
        vpn: Option<VpnProtocol>,
        /// A registry file to check against; without it, the running enforcer's live policy.
        #[arg(long)]
        registry: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Approved networks of the running enforcer.
    Allow {
        #[command(subcommand)]
        action: AllowAction,
        #[command(flatten)]
        target: Target,
    },
    /// Pre-approved single devices of the running enforcer.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
        #[command(flatten)]
        target: Target,
    },
    /// Denied ranges of the running enforcer.
    Deny {
        #[command(subcommand)]
        action: DenyAction,
        #[command(flatten)]
        target: Target,
    },
    /// Approved VPN endpoints of the running enforcer.
    Vpn {
        #[command(subcommand)]
        action: VpnAction,
        #[command(flatten)]
        target: Target,
    },
    /// Switch the running enforcer between enforce and monitor (written to the registry).
    Mode {
        mode: Mode,
        #[command(flatten)]
        target: Target,
    },
    /// Re-read the registry file and apply the difference, or reject the file whole.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Interface, mode, program, entries, registry serial and uptime of the running enforcer.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Counters of a running enforcer, by reason and by rule.
    Stats {
        /// Instance name (IFACE@NETNS) when several enforcers run.
        #[arg(long)]
        instance: Option<String>,
        /// Interface of the enforcer to read.
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            iface,
            registry,
            mode,
            xdp_mode,
            detach_on_exit,
            protect,
            expiry_check_secs,
            vpn_flow_idle,
        } => run(
            &iface,
            &registry,
            mode,
            xdp_mode,
            detach_on_exit,
            protect,
            Timers {
                expiry_check: std::time::Duration::from_secs(expiry_check_secs.max(1)),
                flow_sweep: std::time::Duration::from_secs(vpn_flow_idle),
            },
        ),
        Command::Detach { instance, iface } => detach(instance.as_deref(), iface.as_deref()),
        Command::Validate { file, json } => validate(&file, json),
        Command::Check {
            addr,
            port,
            proto,
            vpn,
            registry: Some(registry),
            target,
        } => check(addr, port, proto, vpn, &registry, target.json),
        Command::Check {
            addr,
            port,
            proto,
            vpn,
            registry: None,
            target,
        } => send_request(
            &target,
            &control::Request::Check {
                addr,
                port,
                proto,
                vpn: vpn.map(|v| v.name().to_string()),
            },
        ),
        Command::Stats {
            instance,
            iface,
            json,
        } => stats(instance.as_deref(), iface.as_deref(), json),
        command => control_command(command),
    }
}

fn validate(file: &Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    match Registry::load(file) {
        Ok(registry) => {
            let policy = Policy::from_registry(registry, Date::today(), None)?;
            if json {
                let out = serde_json::json!({
                    "valid": true,
                    "mode": policy.mode,
                    "networks": policy.count(RuleKind::Network),
                    "devices": policy.count(RuleKind::Device),
                    "deny": policy.count(RuleKind::Deny),
                    "vpn_endpoints": policy.vpn_endpoints,
                    "expired": policy.expired,
                });
                println!("{out:#}");
            } else {
                println!("{}: valid (mode {})", file.display(), policy.mode);
                println!("{}", summary(&policy));
                for e in &policy.expired {
                    println!(
                        "  expired, not loaded: {} \"{}\" (expired {})",
                        e.section, e.name, e.expired
                    );
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(error) => {
            if json {
                let problems: Vec<_> = error
                    .problems()
                    .iter()
                    .map(|p| serde_json::json!({"line": p.line, "column": p.column, "place": p.place, "message": p.message}))
                    .collect();
                println!(
                    "{:#}",
                    serde_json::json!({"valid": false, "error": error.to_string(), "problems": problems})
                );
            } else {
                eprintln!("{error}");
            }
            Ok(std::process::ExitCode::FAILURE)
        }
    }
}

fn summary(policy: &Policy) -> String {
    format!(
        "  {} networks, {} devices, {} deny ranges, {} deny-feed ranges, {} approved VPN endpoints in force; {} expired entries skipped",
        policy.count(RuleKind::Network),
        policy.count(RuleKind::Device),
        policy.count(RuleKind::Deny),
        policy.count(RuleKind::DenyFeed),
        policy.vpn_endpoints,
        policy.expired.len()
    )
}

fn parse_vpn_protocol(name: &str) -> Result<VpnProtocol, String> {
    VpnProtocol::from_name(name).ok_or_else(|| {
        format!(
            "unknown VPN protocol \"{name}\" (expected one of: {})",
            VpnProtocol::ALL.map(VpnProtocol::name).join(", ")
        )
    })
}

fn check(
    addr: IpAddr,
    port: Option<u16>,
    proto: Protocol,
    vpn: Option<VpnProtocol>,
    registry: &Path,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let policy = Policy::from_registry(Registry::load(registry)?, Date::today(), None)?;
    // The kernel's order: the deny list first, then the VPN stage, then the allowlist.
    let deny = policy.check(addr, proto, port);
    let decision = match vpn {
        Some(vpn) if !matches!(deny.reason, Reason::Denied | Reason::DeniedFeed) => {
            policy.check_vpn(addr, vpn, port)
        }
        _ => deny,
    };
    if json {
        let out = serde_json::json!({
            "address": addr,
            "vpn": vpn.map(VpnProtocol::name),
            "protocol": proto,
            "port": port,
            "verdict": if decision.reason.action() == Action::Pass { "pass" } else { "drop" },
            "reason": decision.reason.label(),
            "rule": decision.rule,
            "mode": policy.mode,
        });
        println!("{out:#}");
    } else {
        let what = match vpn {
            Some(vpn) => format!("{} VPN packet to/from {addr}", vpn.name()),
            None => format!("{addr} {proto}"),
        };
        println!(
            "{what}{}: {decision}",
            port.map(|p| format!("/{p}")).unwrap_or_default()
        );
        if let Some(info) = decision.rule.and_then(|r| r.vpn.as_ref()) {
            let expires = info
                .expires
                .map_or_else(|| "no expiry".to_string(), |d| format!("expires {d}"));
            println!("  approval {} ({expires})", info.approval);
        }
        if policy.mode == Mode::Monitor && decision.reason.action() == Action::Drop {
            println!(
                "  (registry mode is monitor: the packet would pass and be counted as a would-be drop)"
            );
        }
        if port.is_none()
            && matches!(proto, Protocol::Tcp | Protocol::Udp)
            && decision.reason == Reason::PortNotAllowed
        {
            println!("  (no --port given; the rule allows only the ports listed)");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The daemon's periodic work.
#[derive(Clone, Copy)]
struct Timers {
    expiry_check: std::time::Duration,
    flow_sweep: std::time::Duration,
}

fn run(
    iface: &str,
    registry_path: &Path,
    mode: Option<Mode>,
    xdp_mode: AttachMode,
    detach_on_exit: bool,
    protect: Vec<ipnet::IpNet>,
    timers: Timers,
) -> anyhow::Result<std::process::ExitCode> {
    let timer = std::time::Instant::now();
    // Before the read: a write in between moves the stamp, and live changes then read anew.
    let stamp = control::FileStamp::of(registry_path);
    let registry = Registry::load(registry_path)?;
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
    instance::ensure_bpffs()?;
    let id = InstanceId {
        iface: iface.to_string(),
        netns: instance::current_netns()?,
    };

    instance::claim(&id)?;
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
    // The maps under the pin directory are the ones the kernel enforces with (an earlier run's,
    // when its program is still attached): what they hold is diffed to the registry.
    tracing::debug!(ms = timer.elapsed().as_millis(), "instance claimed");
    let prefixes = registry.source_prefixes();
    tracing::debug!(ms = timer.elapsed().as_millis(), "prefixes listed");
    // Fresh maps (nothing pinned yet) are sized for this registry and can be filled while the
    // kernel verifies the program; pinned ones may have to grow, which needs the program.
    let fresh = !pin_dir.join(map_names::SOURCE_V4).exists();
    let mut datapath = Datapath::create_pinned(&pin_dir, &prefixes)?;
    drop(prefixes);
    // What the daemon keeps of the registry; the rest is dropped before the maps are filled
    // (a million entries are hundreds of MiB).
    let serial = registry.serial;
    let next_expiry = control::next_expiry(&registry);
    let mut registry = Some(registry);
    // The kernel verifies the program (about a second) while the policy is compiled and the
    // maps are filled.
    let started = (|| -> anyhow::Result<(String, State, Policy)> {
        let mut fill = |datapath: &mut Datapath| -> anyhow::Result<Policy> {
            let current = datapath.read_back()?;
            tracing::debug!(ms = timer.elapsed().as_millis(), "maps read back");
            let registry = registry.take().expect("taken once");
            // Entries the maps hold (an earlier run's) keep their rule numbers.
            let previous =
                (!current.rules.is_empty() || !current.vpn_groups.is_empty()).then_some(&current);
            let mut policy = Policy::from_registry(registry, Date::today(), previous)?;
            if let Some(mode) = mode {
                policy.mode = mode;
            }
            tracing::debug!(ms = timer.elapsed().as_millis(), mib = ?crate::memory_mib(), "policy compiled");
            // The rule labels (`rules.json`, for `stats`) are written beside the fill: a million
            // take most of a second.
            std::thread::scope(|scope| -> anyhow::Result<()> {
                let labels = scope.spawn(|| State::write_rules(&id, &rule_labels(&policy)));
                datapath.apply(&current, &policy)?;
                tracing::debug!(ms = timer.elapsed().as_millis(), mib = ?crate::memory_mib(), "maps filled");
                labels
                    .join()
                    .map_err(|_| anyhow::anyhow!("the thread writing rules.json panicked"))??;
                tracing::debug!(ms = timer.elapsed().as_millis(), "rule labels written");
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
        let xdp = if adopting {
            let how = datapath.adopt(&pin_dir)?;
            tracing::info!(instance = %id.name(), "{how}; maps reconciled with {}", registry_path.display());
            previous
                .as_ref()
                .map_or_else(|| "adopted".to_string(), |p| p.xdp_mode.clone())
        } else if let Some(old) = &legacy {
            datapath.take_over_legacy(old, &pin_dir)?;
            tracing::info!(instance = %id.name(), from = %old.display(), "took over an earlier build's enforcer (one link update; its counters start afresh)");
            previous
                .as_ref()
                .map_or_else(|| "adopted".to_string(), |p| p.xdp_mode.clone())
        } else {
            datapath
                .attach_pinned(iface, xdp_mode, &pin_dir)?
                .to_string()
        };
        let state = State {
            instance: id.name(),
            pid: std::process::id(),
            iface: iface.to_string(),
            netns: id.netns,
            mode: policy.mode.to_string(),
            xdp_mode: xdp.clone(),
            program_id: datapath.program_id(),
            registry: registry_path.display().to_string(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        state.write(&id)?;
        Ok((xdp, state, policy))
    })();
    let (xdp, state, policy) = match started {
        Ok(started) => started,
        Err(error) => {
            // Only what this run created is removed; an adopted program keeps enforcing.
            if !adopting {
                let _ = datapath::detach_pinned(&pin_dir);
                instance::release(&id);
            }
            return Err(error);
        }
    };
    let xdp = xdp.as_str();

    tracing::info!(
        instance = %id.name(),
        mode = %policy.mode,
        xdp_mode = xdp,
        networks = policy.count(RuleKind::Network),
        devices = policy.count(RuleKind::Device),
        deny = policy.count(RuleKind::Deny),
        deny_feed = policy.count(RuleKind::DenyFeed),
        vpn_endpoints = policy.vpn_endpoints,
        expired_skipped = policy.expired.len(),
        "enforcer attached to {iface}"
    );
    for e in &policy.expired {
        tracing::warn!(section = e.section, name = %e.name, expired = %e.expired, "expired entry not loaded");
    }
    println!(
        "enforcer running on {iface} (instance {}, {} mode, {xdp} XDP); Ctrl-C to stop",
        id.name(),
        policy.mode
    );

    let socket = id.control_socket();
    let _ = std::fs::remove_file(&socket);
    let mut live = control::Live::new(
        datapath,
        policy,
        serial,
        next_expiry,
        registry_path,
        mode,
        id.clone(),
        state,
        xdp.to_string(),
    )?;
    live.protected = protect;
    live.file_stamp = stamp;
    live.expiry_check = timers.expiry_check;
    live.flow_sweep = timers.flow_sweep;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let listener = tokio::net::UnixListener::bind(&socket)?;
        // Root only: the file mode keeps others from connecting, peer credentials are checked too.
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        tracing::info!(socket = %socket.display(), "control socket ready");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").map_err(anyhow::Error::from),
                _ = term.recv() => Ok("SIGTERM"),
            }
        };
        control::serve(listener, &mut live, shutdown).await
    });
    let signal = match served {
        Ok(signal) => signal,
        Err(error) => {
            // The program stays attached and pinned: enforcement continues without us.
            drop(live);
            return Err(error);
        }
    };
    let datapath = live.datapath;
    let counts = datapath.verdicts()?;
    drop(datapath);
    if detach_on_exit {
        datapath::detach_pinned(&id.pin_dir())?;
        instance::release(&id);
        tracing::info!(signal, "detached from {iface}");
    } else {
        tracing::info!(
            signal,
            "controller stopping; the program stays attached to {iface} and keeps enforcing (`enforcer detach --instance {}` removes it)",
            id.name()
        );
    }
    println!("{}", render_verdicts(&counts));
    Ok(std::process::ExitCode::SUCCESS)
}

fn detach(
    instance_name: Option<&str>,
    iface: Option<&str>,
) -> anyhow::Result<std::process::ExitCode> {
    // A named instance whose controller is gone and whose link no longer exists (its interface
    // was removed) is not running, but its pins and state are still there to remove.
    let state = match instance::select(instance_name, iface) {
        Ok(state) => state,
        Err(e) => match instance_name
            .and_then(InstanceId::parse)
            .and_then(|id| instance::State::read(&id.state_file()).ok())
        {
            Some(state) => state,
            None => return Err(e.into()),
        },
    };
    if instance::daemon_alive(&state) && state.pid != std::process::id() {
        bail!(
            "the controller of {} is running (pid {}): stop it first",
            state.instance,
            state.pid
        );
    }
    let id = InstanceId::parse(&state.instance).context("malformed instance name in state file")?;
    let mut had_link = datapath::detach_pinned(&id.pin_dir())?;
    for dir in id.legacy_pin_dirs() {
        had_link |= datapath::detach_pinned(&dir)?;
    }
    instance::release(&id);
    println!(
        "{}: {}",
        state.instance,
        if had_link {
            "program detached, pins and state removed; traffic is unfiltered"
        } else {
            "no program was attached; pins and state removed"
        }
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn stats(
    instance_name: Option<&str>,
    iface: Option<&str>,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let state = instance::select(instance_name, iface)?;
    let id = InstanceId::parse(&state.instance).context("malformed instance name in state file")?;
    let dir = id.pin_dir();
    let verdicts = datapath::open_pinned(&dir.join(map_names::VERDICTS), map_names::VERDICTS)?;
    let hits_map = datapath::open_pinned(&dir.join(map_names::RULE_HITS), map_names::RULE_HITS)?;
    let counts = VerdictCounts::read(&verdicts)?;
    let rules = State::read_rules(&id.state_file());
    let indices: Vec<u32> = rules.iter().map(|r| r.index).collect();
    let hits = datapath::read_rule_hits(&hits_map, &indices)?;
    let vpn_map =
        datapath::open_pinned(&dir.join(map_names::VPN_VERDICTS), map_names::VPN_VERDICTS)?;
    let vpn = VpnCounts::read(&vpn_map)?;
    if json {
        let by_vpn: Vec<_> = vpn
            .0
            .iter()
            .map(|(p, u, a)| {
                serde_json::json!({"protocol": p.name(), "unapproved_packets": u.packets, "unapproved_bytes": u.bytes,
                    "approved_packets": a.packets, "approved_bytes": a.bytes})
            })
            .collect();
        let by_reason: Vec<_> = counts
            .enforced
            .iter()
            .zip(&counts.monitored)
            .map(|((reason, c), (_, m))| {
                serde_json::json!({
                    "reason": reason.label(), "code": *reason as u32,
                    "action": if reason.action() == Action::Pass { "pass" } else { "drop" },
                    "packets": c.packets, "bytes": c.bytes,
                    "would_drop_packets": m.packets, "would_drop_bytes": m.bytes,
                })
            })
            .collect();
        let by_rule: Vec<_> = rules
            .iter()
            .zip(&hits)
            .map(|(r, h)| serde_json::json!({"index": r.index, "kind": r.kind, "name": r.name, "prefix": r.prefix, "packets": h}))
            .collect();
        let out = serde_json::json!({
            "instance": state.instance, "iface": state.iface, "mode": state.mode, "xdp_mode": state.xdp_mode,
            "program_id": state.program_id, "pid": state.pid, "registry": state.registry,
            "reasons": by_reason, "rules": by_rule, "vpn": by_vpn,
        });
        println!("{out:#}");
    } else {
        println!(
            "instance {} on {} ({} mode, {} XDP, pid {})",
            state.instance, state.iface, state.mode, state.xdp_mode, state.pid
        );
        println!("{}", render_verdicts(&counts));
        println!(
            "{:<20} {:>12} {:>12}",
            "vpn protocol", "unapproved", "approved"
        );
        for (p, u, a) in &vpn.0 {
            println!("{:<20} {:>12} {:>12}", p.name(), u.packets, a.packets);
        }
        println!(
            "{:>8}  {:<8} {:<28} {:<22} {:>12}",
            "rule", "kind", "name", "prefix", "packets"
        );
        let mut quiet_feed_ranges = 0;
        for (r, h) in rules.iter().zip(&hits) {
            // A feed may hold a million ranges: list only those that matched something.
            if r.kind == RuleKind::DenyFeed.as_str() && *h == 0 {
                quiet_feed_ranges += 1;
                continue;
            }
            println!(
                "{:>8}  {:<8} {:<28} {:<22} {:>12}",
                format!("#{}", r.index),
                r.kind,
                r.name,
                r.prefix,
                h
            );
        }
        if quiet_feed_ranges > 0 {
            println!(
                "  ({quiet_feed_ranges} deny-feed ranges without hits not listed; --json lists all)"
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One rule's label, as `rule_labels` writes it.
pub fn rule_label(rule: &crate::policy::CompiledRule) -> crate::instance::RuleLabel {
    crate::instance::RuleLabel {
        index: rule.index,
        kind: rule.kind.as_str().to_string(),
        name: rule.name.to_string(),
        prefix: rule.prefix.to_string(),
    }
}

/// Rule labels for `stats`, from a compiled policy.
pub fn rule_labels(policy: &Policy) -> impl serde::Serialize + '_ {
    /// `RuleLabel`'s fields, borrowed from the rule.
    #[derive(serde::Serialize)]
    struct Label<'a> {
        index: u32,
        kind: &'a str,
        name: &'a str,
        #[serde(serialize_with = "serialize_display")]
        prefix: &'a ipnet::IpNet,
    }
    /// Written straight into the output, without a `String` per label.
    fn serialize_display<S: serde::Serializer>(
        value: &&ipnet::IpNet,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }
    /// The labels as a JSON array, made one at a time while it is written.
    struct Labels<'a>(&'a Policy);
    impl serde::Serialize for Labels<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.rules.iter().map(|r| Label {
                index: r.index,
                kind: r.kind.as_str(),
                name: &r.name,
                prefix: &r.prefix,
            }))
        }
    }
    Labels(policy)
}

/// The counters by reason as a table.
pub fn render_verdicts(counts: &VerdictCounts) -> String {
    let mut out = format!(
        "{:<20} {:<6} {:>12} {:>14} {:>18}\n",
        "reason", "action", "packets", "bytes", "would-drop (mon)"
    );
    for ((reason, c), (_, m)) in counts.enforced.iter().zip(&counts.monitored) {
        let action = if reason.action() == Action::Pass {
            "pass"
        } else {
            "drop"
        };
        out.push_str(&format!(
            "{:<20} {:<6} {:>12} {:>14} {:>18}\n",
            reason.label(),
            action,
            c.packets,
            c.bytes,
            m.packets
        ));
    }
    out.pop();
    out
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (run it with sudo)");
    }
    Ok(())
}
