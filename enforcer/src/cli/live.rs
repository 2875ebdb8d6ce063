//! The verbs that talk to a running enforcer through its control socket: they turn flags into
//! registry entries and print the controller's answer.

use anyhow::Context as _;
use clap::Subcommand;

use super::Command;
use crate::{
    control,
    instance::{self, InstanceId},
};

/// Which running enforcer a control command talks to, and how it answers.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// Apply a change even if it would cut off this SSH session or a protected network.
    #[arg(long, global = true)]
    force: bool,
    /// Instance name (IFACE@NETNS) when several enforcers run.
    #[arg(long, global = true)]
    instance: Option<String>,
    /// Interface of the enforcer.
    #[arg(long, global = true)]
    iface: Option<String>,
    /// Print the whole answer as JSON.
    #[arg(long, global = true)]
    pub(super) json: bool,
    /// Change the fleet's registry in etcd instead of a running enforcer: its endpoints,
    /// comma-separated (see `enforcer fleet`).
    #[arg(
        long = "etcd",
        global = true,
        value_delimiter = ',',
        value_name = "URL"
    )]
    etcd: Vec<String>,
    /// With --etcd: the CA certificate of etcd's servers.
    #[arg(long = "etcd-ca", global = true, value_name = "FILE")]
    etcd_ca: Option<std::path::PathBuf>,
    /// With --etcd: this client's certificate (its common name is the etcd user).
    #[arg(long = "etcd-cert", global = true, value_name = "FILE")]
    etcd_cert: Option<std::path::PathBuf>,
    /// With --etcd: the key of --etcd-cert.
    #[arg(long = "etcd-key", global = true, value_name = "FILE")]
    etcd_key: Option<std::path::PathBuf>,
    /// With --etcd: a password user (password in `ENFORCER_ETCD_PASSWORD`).
    #[arg(long = "etcd-user", global = true, value_name = "NAME")]
    etcd_user: Option<String>,
}

impl Target {
    /// The fleet's etcd, when the change goes there.
    fn etcd(&self) -> Option<crate::fleet::EtcdArgs> {
        (!self.etcd.is_empty()).then(|| crate::fleet::EtcdArgs {
            endpoints: self.etcd.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum AllowAction {
    /// Approve a network (validated like the registry file; in force when this returns).
    Add {
        cidr: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        ministry: Option<String>,
        /// Comma-separated port specs (443/tcp,8000-8080/udp,icmp); none = every port.
        #[arg(long, value_delimiter = ',')]
        ports: Vec<String>,
        /// Last day in force (YYYY-MM-DD, UTC).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Remove a network by name or CIDR.
    Remove {
        target: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum DeviceAction {
    /// Approve a single device address.
    Add {
        address: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        ministry: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long, value_delimiter = ',')]
        ports: Vec<String>,
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Remove a device by name or address.
    Remove {
        target: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum DenyAction {
    /// Deny a range (beats every allow).
    Add {
        cidr: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        note: Option<String>,
        #[arg(long)]
        expires: Option<String>,
    },
    /// Remove a denied range by name or CIDR.
    Remove {
        target: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum VpnAction {
    /// Approve a VPN endpoint (address or CIDR) for one protocol.
    Approve {
        address: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        protocol: String,
        /// The national IT board's approval reference.
        #[arg(long)]
        approval: String,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        expires: Option<String>,
    },
    /// Revoke an approval by name or address.
    Revoke {
        target: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
pub enum UpstreamAction {
    /// Let the server reach a destination on some ports (an address or CIDR; it is not let in).
    Add {
        address: String,
        #[arg(long)]
        name: String,
        /// Comma-separated port specs, required (53/udp,53/tcp,123/udp,636/tcp,icmp).
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<String>,
        #[arg(long)]
        ministry: Option<String>,
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Remove an upstream by name, CIDR or address.
    Remove {
        target: String,
    },
    List,
}

/// A registry entry from command-line flags: only the fields given.
fn entry(fields: &[(&str, Option<serde_json::Value>)]) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| ((*k).to_string(), v)))
            .collect(),
    )
}

fn opt(value: Option<&String>) -> Option<serde_json::Value> {
    value.map(|v| serde_json::json!(v))
}

fn ports(ports: &[String]) -> Option<serde_json::Value> {
    (!ports.is_empty()).then(|| serde_json::json!(ports))
}

/// Sends one request to the selected enforcer and prints the answer; exit 1 if refused.
pub(super) fn send_request(
    target: &Target,
    request: &control::Request,
) -> anyhow::Result<std::process::ExitCode> {
    if let Some(etcd) = target.etcd() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let response = runtime.block_on(crate::fleet::edit::request(&etcd, request))?;
        return print_response(target, &response);
    }
    let state = instance::select(target.instance.as_deref(), target.iface.as_deref())?;
    let id = InstanceId::parse(&state.instance).context("malformed instance name in state file")?;
    // The caller's own SSH session (client address, server port), so that the enforcer can
    // refuse a change that would cut it off.
    let operator = std::env::var("SSH_CLIENT").ok().and_then(|v| {
        let mut parts = v.split_whitespace();
        let addr = parts.next()?.parse().ok()?;
        let port = parts.nth(1).and_then(|p| p.parse().ok());
        Some(control::Operator { addr, port })
    });
    let envelope = control::Envelope {
        request: request.clone(),
        operator,
        force: target.force,
    };
    let response = control::send(&id.control_socket(), &envelope)?;
    print_response(target, &response)
}

/// Prints an answer; exit 1 if it is a refusal.
fn print_response(
    target: &Target,
    response: &control::Response,
) -> anyhow::Result<std::process::ExitCode> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else if response.ok {
        println!("{}", response.message);
        if let Some(entries) = response.data.as_array() {
            for e in entries {
                println!("  {e}");
            }
        }
    } else {
        eprintln!("error: {}", response.message);
    }
    Ok(if response.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

pub(super) fn control_command(command: Command) -> anyhow::Result<std::process::ExitCode> {
    use control::Request;
    let (target, request) = match command {
        Command::Allow { action, target } => (
            target,
            match action {
                AllowAction::Add {
                    cidr,
                    name,
                    ministry,
                    ports: p,
                    expires,
                    note,
                } => Request::Add {
                    section: "networks".into(),
                    entry: entry(&[
                        ("name", Some(serde_json::json!(name))),
                        ("cidr", Some(serde_json::json!(cidr))),
                        ("ministry", opt(ministry.as_ref())),
                        ("ports", ports(&p)),
                        ("expires", opt(expires.as_ref())),
                        ("note", opt(note.as_ref())),
                    ]),
                },
                AllowAction::Remove { target } => Request::Remove {
                    section: "networks".into(),
                    target,
                },
                AllowAction::List => Request::List {
                    section: "networks".into(),
                },
            },
        ),
        Command::Device { action, target } => (
            target,
            match action {
                DeviceAction::Add {
                    address,
                    name,
                    ministry,
                    owner,
                    ports: p,
                    expires,
                    note,
                } => Request::Add {
                    section: "devices".into(),
                    entry: entry(&[
                        ("name", Some(serde_json::json!(name))),
                        ("address", Some(serde_json::json!(address))),
                        ("ministry", opt(ministry.as_ref())),
                        ("owner", opt(owner.as_ref())),
                        ("ports", ports(&p)),
                        ("expires", opt(expires.as_ref())),
                        ("note", opt(note.as_ref())),
                    ]),
                },
                DeviceAction::Remove { target } => Request::Remove {
                    section: "devices".into(),
                    target,
                },
                DeviceAction::List => Request::List {
                    section: "devices".into(),
                },
            },
        ),
        Command::Deny { action, target } => (
            target,
            match action {
                DenyAction::Add {
                    cidr,
                    name,
                    note,
                    expires,
                } => Request::Add {
                    section: "deny".into(),
                    entry: entry(&[
                        ("name", opt(name.as_ref())),
                        ("cidr", Some(serde_json::json!(cidr))),
                        ("note", opt(note.as_ref())),
                        ("expires", opt(expires.as_ref())),
                    ]),
                },
                DenyAction::Remove { target } => Request::Remove {
                    section: "deny".into(),
                    target,
                },
                DenyAction::List => Request::List {
                    section: "deny".into(),
                },
            },
        ),
        Command::Vpn { action, target } => (
            target,
            match action {
                VpnAction::Approve {
                    address,
                    name,
                    protocol,
                    approval,
                    port,
                    expires,
                } => Request::Add {
                    section: "vpn_endpoints".into(),
                    entry: entry(&[
                        ("name", Some(serde_json::json!(name))),
                        ("address", Some(serde_json::json!(address))),
                        ("protocol", Some(serde_json::json!(protocol))),
                        ("port", port.map(|p| serde_json::json!(p))),
                        ("approval", Some(serde_json::json!(approval))),
                        ("expires", opt(expires.as_ref())),
                    ]),
                },
                VpnAction::Revoke { target } => Request::Remove {
                    section: "vpn_endpoints".into(),
                    target,
                },
                VpnAction::List => Request::List {
                    section: "vpn_endpoints".into(),
                },
            },
        ),
        Command::Upstream { action, target } => (
            target,
            match action {
                UpstreamAction::Add {
                    address,
                    name,
                    ports: p,
                    ministry,
                    expires,
                    note,
                } => Request::Add {
                    section: "upstreams".into(),
                    entry: entry(&[
                        ("name", Some(serde_json::json!(name))),
                        (
                            if address.contains('/') {
                                "cidr"
                            } else {
                                "address"
                            },
                            Some(serde_json::json!(address)),
                        ),
                        ("ports", ports(&p)),
                        ("ministry", opt(ministry.as_ref())),
                        ("expires", opt(expires.as_ref())),
                        ("note", opt(note.as_ref())),
                    ]),
                },
                UpstreamAction::Remove { target } => Request::Remove {
                    section: "upstreams".into(),
                    target,
                },
                UpstreamAction::List => Request::List {
                    section: "upstreams".into(),
                },
            },
        ),
        Command::Mode {
            mode: Some(mode),
            target,
            ..
        } => (target, Request::Mode { mode }),
        Command::Mode {
            egress: Some(egress),
            target,
            ..
        } => (target, Request::Egress { egress }),
        Command::Reload { target } => (target, Request::Reload),
        Command::Status { target } => (target, Request::Status),
        _ => unreachable!("only control commands reach here"),
    };
    send_request(&target, &request)
}
