//! `enforcer fleet status`: every agent's status as it published it, against the registry's
//! latest change: which hosts are current, which are behind and by how much, which refused
//! what, and which are gone (seen once, with no live status: their lease expired).

use etcd_client::{Client, GetOptions, SortOrder, SortTarget};
use serde_json::{Value, json};

use super::{FleetError, connect::read_prefix, layout};

/// One host of the fleet.
#[derive(Debug, serde::Serialize)]
pub struct HostStatus {
    pub host: String,
    /// Its published status (`None`: gone).
    pub status: Option<Value>,
    /// Registry changes it has not applied (0: current).
    pub behind: usize,
}

/// The fleet as its agents report it.
#[derive(Debug, serde::Serialize)]
pub struct FleetStatus {
    /// The revision of the registry's latest change.
    pub registry_revision: i64,
    pub hosts: Vec<HostStatus>,
}

fn etcd(what: &'static str) -> impl FnOnce(etcd_client::Error) -> FleetError {
    move |source| FleetError::Etcd {
        what: what.into(),
        source,
    }
}

/// Reads the registry's change revisions, the status and the seen keys.
pub async fn read(client: &mut Client) -> Result<FleetStatus, FleetError> {
    // The revisions at which registry keys were last written (one per key): how many of them
    // lie past an agent's revision says how many changes it misses (deletions count through
    // the writer's audit key, written in the same transaction).
    let options = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_sort(SortTarget::Mod, SortOrder::Descend);
    let response = client
        .get(layout::REGISTRY, Some(options))
        .await
        .map_err(etcd("read the registry's revisions"))?;
    let mut changes: Vec<i64> = response
        .kvs()
        .iter()
        .map(etcd_client::KeyValue::mod_revision)
        .collect();
    changes.dedup();
    let registry_revision = changes.first().copied().unwrap_or(0);
    let (_, statuses) = read_prefix(client, layout::STATUS, None).await?;
    let (_, seen) = read_prefix(client, layout::SEEN, None).await?;
    let mut hosts: Vec<HostStatus> = Vec::new();
    for (key, value) in &statuses {
        let host = layout::decode_segment(key.trim_start_matches(layout::STATUS))
            .unwrap_or_else(|| key.clone());
        let status: Value = serde_json::from_slice(value).unwrap_or(Value::Null);
        let behind = behind(&changes, status["applied_revision"].as_i64().unwrap_or(0));
        hosts.push(HostStatus {
            host,
            status: Some(status),
            behind,
        });
    }
    for (key, _) in &seen {
        let host = layout::decode_segment(key.trim_start_matches(layout::SEEN))
            .unwrap_or_else(|| key.clone());
        if !hosts.iter().any(|h| h.host == host) {
            hosts.push(HostStatus {
                host,
                status: None,
                behind: 0,
            });
        }
    }
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(FleetStatus {
        registry_revision,
        hosts,
    })
}

/// How many of the registry's change revisions (newest first, without repeats) lie past
/// `applied`.
fn behind(changes: &[i64], applied: i64) -> usize {
    changes.iter().take_while(|&&r| r > applied).count()
}

impl FleetStatus {
    /// One line per host.
    pub fn render(&self) -> String {
        let mut out = format!(
            "registry revision {}; {} hosts\n",
            self.registry_revision,
            self.hosts.len()
        );
        for h in &self.hosts {
            let line = match &h.status {
                None => format!(
                    "{}: GONE (no status: its agent stopped or lost etcd)",
                    h.host
                ),
                Some(s) => {
                    let state = if h.behind == 0 {
                        "current".to_string()
                    } else {
                        format!("BEHIND by {} changes", h.behind)
                    };
                    let mut line = format!(
                        "{}: {state}, revision {}, {} mode{}, {} networks, updated {}",
                        h.host,
                        s["applied_revision"],
                        s["mode"].as_str().unwrap_or("?"),
                        if s["enforcing"] == json!(true) {
                            ""
                        } else {
                            " NOT ENFORCING"
                        },
                        s["networks"],
                        s["updated"].as_str().unwrap_or("?"),
                    );
                    if let Some(error) = s["last_error"].as_str() {
                        line.push_str(&format!(
                            "; error: {}",
                            crate::registry::value::quoted(error)
                        ));
                    }
                    if let Some(n) = s["left_out_count"].as_u64().filter(|n| *n > 0) {
                        line.push_str(&format!("; {n} keys left out"));
                    }
                    line
                }
            };
            out.push_str("  ");
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_behind_by_the_changes_past_its_revision() {
        let changes = [40, 31, 30, 12];
        assert_eq!(behind(&changes, 40), 0);
        assert_eq!(behind(&changes, 45), 0);
        assert_eq!(behind(&changes, 31), 1);
        assert_eq!(behind(&changes, 30), 2);
        assert_eq!(behind(&changes, 29), 3);
        assert_eq!(behind(&changes, 0), 4);
        let status = FleetStatus {
            registry_revision: 40,
            hosts: vec![
                HostStatus {
                    host: "a".into(),
                    status: Some(json!({"applied_revision": 30, "mode": "enforce",
                        "enforcing": true, "networks": 3, "updated": "t",
                        "last_error": "etcd: no member answers", "left_out_count": 2})),
                    behind: 1,
                },
                HostStatus {
                    host: "b".into(),
                    status: None,
                    behind: 0,
                },
            ],
        };
        let text = status.render();
        assert!(
            text.contains("a: BEHIND by 1 changes, revision 30"),
            "{text}"
        );
        assert!(
            text.contains("error: \"etcd: no member answers\"; 2 keys left out"),
            "{text}"
        );
        assert!(text.contains("b: GONE"), "{text}");
    }
}
