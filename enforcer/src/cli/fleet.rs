//! `enforcer fleet …`: the registry shared by every host, in etcd.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use crate::fleet::{self, EtcdArgs, FleetError};

#[derive(Subcommand, Debug)]
pub enum FleetAction {
    /// Create etcd's users and roles for the board, the ministries and the agents, and turn
    /// authentication on (as etcd's root user; repeat to add ministries or hosts).
    InitRoles {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// A ministry that gets its own role (repeatable).
        #[arg(long = "ministry", value_name = "NAME")]
        ministries: Vec<String>,
        /// A host whose agent gets its own role (repeatable).
        #[arg(long = "agent", value_name = "HOST")]
        agents: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make the fleet's registry exactly FILE (and its deny feeds), validated as `enforcer
    /// validate` does, in one transaction (as etcd's root user: it writes every prefix).
    Import {
        file: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long)]
        json: bool,
    },
    /// Every agent's status: current or behind (by how many changes), gone, refusing what.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write the fleet's registry into FILE (its deny feeds into FILE.feeds/), as the agents
    /// apply it; keys that fail validation are left out and listed.
    Export {
        file: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(action: FleetAction) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match action {
            FleetAction::InitRoles {
                etcd,
                ministries,
                agents,
                json,
            } => {
                let mut client = etcd.connect().await?;
                let done = fleet::roles::init(&mut client, &ministries, &agents).await?;
                if json {
                    println!("{}", serde_json::json!({"created": done}));
                } else if done.is_empty() {
                    println!("roles and users were in place; authentication is on");
                } else {
                    println!("created {}; authentication is on", done.join(", "));
                }
            }
            FleetAction::Import { file, etcd, json } => {
                let written = fleet::transfer::import(&etcd, &file).await?;
                if json {
                    println!("{}", serde_json::json!(written));
                } else {
                    println!(
                        "imported {}: {} keys written, {} removed, revision {}",
                        file.display(),
                        written.put,
                        written.deleted,
                        written.revision
                    );
                }
            }
            FleetAction::Status { etcd, json } => {
                let mut client = etcd.connect().await?;
                let status = fleet::status::read(&mut client).await?;
                if json {
                    println!("{}", serde_json::json!(status));
                } else {
                    print!("{}", status.render());
                }
            }
            FleetAction::Export { file, etcd, json } => {
                let fleet = fleet::transfer::export(&etcd, &file).await?;
                report_refused(&fleet.refused);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"revision": fleet.revision, "refused": fleet.refused})
                    );
                } else {
                    println!(
                        "exported revision {} into {} ({} keys left out)",
                        fleet.revision,
                        file.display(),
                        fleet.refused.len()
                    );
                }
            }
        }
        Ok::<_, FleetError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Each key left out, on standard error.
fn report_refused(refused: &[fleet::assemble::Refused]) {
    for r in refused {
        eprintln!(
            "warning: key {} left out: {}",
            crate::registry::value::quoted(&r.key),
            r.problem
        );
    }
}
