//! The command line: arguments (clap) → the library call of each verb → what it prints. Human
//! output by default, `--json` where scripts need it. The verbs that talk to a running enforcer
//! are in `live`; what the offline verbs print is in `render`.

mod fleet;
mod live;
mod render;
mod top;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use enforcer_common::VpnProtocol;

use live::{
    AllowAction, DenyAction, DeviceAction, Target, UpstreamAction, VpnAction, control_command,
    send_request,
};

use crate::{
    control, daemon,
    datapath::AttachMode,
    registry::{EgressMode, Mode, Protocol},
};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ENFORCER_COMMIT"), ")"),
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
        /// The approved-network registry (JSON). With --etcd: the local cache of the fleet's
        /// registry, written by the agent (default /var/lib/enforcer/fleet/IFACE.json).
        #[arg(long, required_unless_present = "endpoints")]
        registry: Option<PathBuf>,
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
        /// Where the program's pins cannot outlive the controller (it runs in a mount namespace
        /// of its own and the host has no bpf filesystem), run anyway, and detach the program
        /// when the controller exits. Without it, such a start is refused.
        #[arg(long)]
        foreground: bool,
        /// A management network (repeatable) that no live change may cut off without --force.
        #[arg(long = "protect", value_name = "CIDR")]
        protect: Vec<ipnet::IpNet>,
        /// How often expired entries are removed (seconds).
        #[arg(long, default_value_t = 60, hide = true)]
        expiry_check_secs: u64,
        /// Seconds between sweeps of the remembered VPN flows (`OpenVPN`, whose later packets
        /// carry no signature): a flow is forgotten after one to two sweeps without a packet.
        /// While one is remembered, packets from its two ends meet the flow lookup.
        #[arg(long, value_name = "SECONDS", default_value_t = daemon::DEFAULT_FLOW_SWEEP.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
        vpn_flow_idle: u64,
        /// How often expired connections are removed from the connection table (seconds).
        #[arg(long, default_value_t = daemon::DEFAULT_CONN_SWEEP.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400), hide = true)]
        conn_sweep_secs: u64,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT listens on
        /// 127.0.0.1 only). Off by default.
        #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_addr)]
        metrics: Option<std::net::SocketAddr>,
        /// How often the counters' history (read by `enforcer report`) takes a sample (seconds).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600), hide = true)]
        history_secs: u64,
        /// Write events (drops, would-drops, VPN packets, policy changes) as JSON lines with
        /// Elastic Common Schema names to PATH (`-`: standard output); reopened on SIGHUP.
        #[arg(long, value_name = "PATH")]
        events: Option<PathBuf>,
        /// Follow the fleet's registry in etcd, as the agent of this host.
        #[command(flatten)]
        etcd: Option<crate::fleet::EtcdArgs>,
        /// This host's name in the fleet (its status key and role); default: the hostname.
        #[arg(long, requires = "endpoints")]
        host: Option<String>,
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
    /// Say what the registry does with a packet from ADDR (or, with --to, with one the server
    /// sends to ADDR), and which rule decides.
    Check {
        /// Source address of an incoming packet.
        #[arg(required_unless_present = "to", conflicts_with = "to")]
        addr: Option<IpAddr>,
        /// Destination address of an outgoing packet (the egress verdict).
        #[arg(long, value_name = "ADDR")]
        to: Option<IpAddr>,
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
    /// Destinations the running enforcer's server may reach (DNS, NTP, directory, mirrors).
    Upstream {
        #[command(subcommand)]
        action: UpstreamAction,
        #[command(flatten)]
        target: Target,
    },
    /// Switch the running enforcer between enforce and monitor, or with --egress the egress
    /// mode between off, monitor and enforce (written to the registry).
    Mode {
        #[arg(required_unless_present = "egress", conflicts_with = "egress")]
        mode: Option<Mode>,
        /// The egress mode: off, monitor or enforce.
        #[arg(long, value_name = "MODE")]
        egress: Option<EgressMode>,
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
    /// The audit log of a registry's changes.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Man pages and shell completions, generated from this command line's definition (for
    /// packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// A live view of a running enforcer, refreshed each second: rates by reason in each
    /// direction, the busiest rules, VPN packets, the maps' fill (q quits).
    Top {
        /// Instance name (IFACE@NETNS) when several enforcers run.
        #[arg(long)]
        instance: Option<String>,
        /// Interface of the enforcer to watch.
        #[arg(long)]
        iface: Option<String>,
    },
    /// A compliance report for this host: which of the advisory's controls are in force, with
    /// the evidence (registry, expiries, drops, VPN attempts, changes).
    Report {
        /// Instance name (IFACE@NETNS) when several enforcers run.
        #[arg(long)]
        instance: Option<String>,
        /// Interface of the enforcer.
        #[arg(long)]
        iface: Option<String>,
        #[arg(long, value_enum, default_value = "html")]
        format: ReportFormat,
        /// The window for what changes over time, e.g. 24h, 7d, 90m.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        since: u64,
    },
    /// The registry shared by every host of the fleet, in etcd.
    Fleet {
        #[command(subcommand)]
        action: fleet::FleetAction,
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

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ReportFormat {
    Html,
    Md,
    Json,
}

/// `90m`, `24h`, `7d` (or plain seconds) as seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\" (expected e.g. 90m, 24h or 7d)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration \"{text}\" (expected e.g. 90m, 24h or 7d)"
            ));
        }
    };
    Ok(value * scale)
}

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// Writes enforcer.8 and a page per verb (enforcer-run.8, ...) into DIR.
    Man { dir: PathBuf },
    /// Prints the completion script of SHELL.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub enum AuditAction {
    /// Check that no record of REGISTRY.audit.jsonl was edited, removed or inserted (each
    /// record holds the hash of the one before it), and that the last one is the registry's
    /// serial; exit 1 with the first record that breaks the chain.
    Verify {
        /// The registry file (its audit log is beside it).
        registry: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    // Pins live in the bpffs of the mount namespace that started this process: `ip netns exec`
    // gives its command one of its own, whose /sys/fs/bpf is not the host's.
    match crate::instance::join_parent_mount_ns() {
        Ok(true) => {
            tracing::debug!("joined the mount namespace of the process that started this one");
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(
                "cannot join the mount namespace of the process that started this one: {e}"
            );
        }
    }
    match cli.command {
        Command::Run {
            iface,
            registry,
            mode,
            xdp_mode,
            detach_on_exit,
            foreground,
            protect,
            expiry_check_secs,
            vpn_flow_idle,
            conn_sweep_secs,
            history_secs,
            metrics,
            events,
            etcd,
            host,
        } => render::run(&daemon::DaemonConfig {
            registry: registry
                .unwrap_or_else(|| PathBuf::from(format!("/var/lib/enforcer/fleet/{iface}.json"))),
            fleet: etcd.map(|etcd| crate::fleet::agent::AgentConfig {
                etcd,
                host: host.unwrap_or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_default()
                }),
            }),
            iface,
            mode,
            xdp_mode,
            detach_on_exit,
            foreground,
            protect,
            timers: daemon::Timers {
                expiry_check: Duration::from_secs(expiry_check_secs.max(1)),
                flow_sweep: Duration::from_secs(vpn_flow_idle),
                conn_sweep: Duration::from_secs(conn_sweep_secs),
                history: Duration::from_secs(history_secs),
            },
            metrics,
            events,
        }),
        Command::Detach { instance, iface } => {
            render::detach(instance.as_deref(), iface.as_deref())
        }
        Command::Validate { file, json } => render::validate(&file, json),
        Command::Audit {
            action: AuditAction::Verify { registry, json },
        } => render::audit_verify(&registry, json),
        Command::Generate { what } => generate(what),
        Command::Check {
            addr,
            to,
            port,
            proto,
            vpn,
            registry,
            target,
        } => {
            let (addr, outgoing) = match (addr, to) {
                (_, Some(to)) => (to, true),
                (Some(addr), None) => (addr, false),
                (None, None) => anyhow::bail!("give the packet's source address, or --to ADDR"),
            };
            match registry {
                Some(registry) => {
                    let packet = render::Packet {
                        addr,
                        outgoing,
                        port,
                        proto,
                        vpn,
                    };
                    render::check(&packet, &registry, target.json)
                }
                None => send_request(
                    &target,
                    &control::Request::Check {
                        addr,
                        port,
                        proto,
                        vpn: vpn.map(|v| v.name().to_string()),
                        to: outgoing,
                    },
                ),
            }
        }
        Command::Stats {
            instance,
            iface,
            json,
        } => render::stats(instance.as_deref(), iface.as_deref(), json),
        Command::Fleet { action } => fleet::run(action),
        Command::Top { instance, iface } => top::top(instance.as_deref(), iface.as_deref()),
        Command::Report {
            instance,
            iface,
            format,
            since,
        } => {
            let state = crate::instance::select(instance.as_deref(), iface.as_deref())?;
            let report = crate::report::Report::gather(&state, since)?;
            let text = match format {
                ReportFormat::Html => crate::report::html(&report),
                ReportFormat::Md => crate::report::markdown(&report),
                ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
            };
            std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        command => control_command(command),
    }
}

/// `ADDR:PORT`, or a bare `PORT` on loopback.
fn parse_metrics_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(([127, 0, 0, 1], port).into());
    }
    text.parse().map_err(|_| {
        format!("invalid metrics address \"{text}\" (expected PORT, 127.0.0.1:9750 or [::1]:9750)")
    })
}

fn parse_vpn_protocol(name: &str) -> Result<VpnProtocol, String> {
    VpnProtocol::from_name(name).ok_or_else(|| {
        format!(
            "unknown VPN protocol \"{name}\" (expected one of: {})",
            VpnProtocol::ALL.map(VpnProtocol::name).join(", ")
        )
    })
}

/// Man pages (section 8: the enforcer is run by root) and completion scripts.
fn generate(what: Generate) -> anyhow::Result<std::process::ExitCode> {
    use clap::CommandFactory as _;
    let command = Cli::command();
    match what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir)?;
            let write = |name: String, cmd: clap::Command| -> anyhow::Result<()> {
                let mut page = Vec::new();
                clap_mangen::Man::new(cmd).section("8").render(&mut page)?;
                std::fs::write(dir.join(format!("{name}.8")), page)?;
                Ok(())
            };
            for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
                let name = format!("enforcer-{}", sub.get_name());
                // The page's title: a name clap keeps for the life of the process (this one).
                let title: &'static str = Box::leak(name.clone().into_boxed_str());
                write(name, sub.clone().name(title))?;
            }
            write("enforcer".into(), command)?;
        }
        Generate::Completions { shell } => {
            let mut command = command;
            clap_complete::generate(shell, &mut command, "enforcer", &mut std::io::stdout());
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
