//! The fleet: one registry in etcd for every host, each enforcer an agent of it. etcd does the
//! replication, the transactions, the watches and the access control; this module lays the
//! registry out in keys that etcd's roles can tell apart (`layout`), reaches etcd (`connect`),
//! sets up the roles (`roles`), moves registry files in and out (`transfer`), and follows the
//! registry as the agent of `enforcer run --etcd` (`agent`).

pub mod agent;
pub mod assemble;
pub mod connect;
pub mod edit;
pub mod layout;
pub mod roles;
pub mod status;
pub mod transfer;

use assemble::Refused;
pub use connect::EtcdArgs;

use crate::registry::{Problem, Registry};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Options(String),
    #[error("etcd: cannot {what}: {source}")]
    Etcd {
        what: String,
        source: etcd_client::Error,
    },
    #[error("the fleet's registry at revision {revision} is invalid:\n{}", .problems.join("\n"))]
    Invalid {
        revision: i64,
        problems: Vec<String>,
    },
    #[error("{0}")]
    Refused(String),
    /// No member of etcd answers.
    #[error("etcd: {0}")]
    Unreachable(String),
    /// Another change came between the read and the write: nothing was written.
    #[error("{0}")]
    Conflict(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The registry the fleet's keys make at one revision, validated exactly as a file is.
pub struct FleetRegistry {
    pub revision: i64,
    /// The registry as a file would hold it (feeds named as in `feeds`).
    pub text: String,
    /// The deny feeds: (name as `deny_files` gives it, text).
    pub feeds: Vec<(String, String)>,
    pub registry: Registry,
    /// Keys left out, each with its problem: the rest is in force without them.
    pub refused: Vec<Refused>,
}

/// Builds and validates the registry of `kvs` at `revision`. A key whose entry fails validation
/// is left out and reported with its key, and the rest validated again, so that one bad key
/// (written past the CLI) blocks nothing else. Fails only when what is wrong belongs to no key
/// (no mode, say).
pub fn validate(
    kvs: &[(String, Vec<u8>)],
    revision: i64,
    feed_path: assemble::FeedPath<'_>,
) -> Result<FleetRegistry, FleetError> {
    if kvs.is_empty() {
        return Err(FleetError::Refused(format!(
            "the fleet has no registry yet (revision {revision}): `enforcer fleet import FILE` puts one in"
        )));
    }
    let mut kept: Vec<(String, Vec<u8>)> = kvs.to_vec();
    let mut refused: Vec<Refused> = Vec::new();
    // Bounded: each pass that does not succeed removes at least one key.
    for _ in 0..=kvs.len() {
        let assembled = assemble::assemble(&kept, revision, feed_path);
        let text = assembled.text();
        let feeds = assembled.feed_texts();
        if !assembled.refused.is_empty() {
            kept.retain(|(k, _)| !assembled.refused.iter().any(|r| r.key == *k));
            refused.extend(assembled.refused);
            continue;
        }
        let problems = match Registry::parse_with_feeds(&text, &feeds) {
            Ok(registry) => {
                return Ok(FleetRegistry {
                    revision,
                    text,
                    feeds,
                    registry,
                    refused,
                });
            }
            Err(problems) => problems,
        };
        let before = refused.len();
        for problem in &problems {
            let keys = match &problem.file {
                Some(feed) => assembled.keys_of_feed(feed),
                None => assembled.keys_of_line(problem.line),
            };
            for key in keys {
                if !refused.iter().any(|r| r.key == *key) {
                    refused.push(Refused {
                        key: key.clone(),
                        problem: describe(problem),
                    });
                }
            }
        }
        if refused.len() == before {
            return Err(FleetError::Invalid {
                revision,
                problems: problems.iter().map(describe).collect(),
            });
        }
        kept.retain(|(k, _)| !refused.iter().any(|r| r.key == *k));
    }
    Err(FleetError::Invalid {
        revision,
        problems: vec!["validation did not settle".into()],
    })
}

/// A problem without the line of a document no one sees.
fn describe(problem: &Problem) -> String {
    let mut text = String::new();
    if let Some(file) = &problem.file {
        text.push_str(&format!("deny feed {file} line {}: ", problem.line));
    }
    if !problem.place.is_empty() && problem.file.is_none() {
        text.push_str(&problem.place);
        text.push_str(": ");
    }
    text.push_str(&problem.message);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(name: &str, _: &str) -> String {
        name.to_string()
    }

    fn kv(key: &str, value: &str) -> (String, Vec<u8>) {
        (key.to_string(), value.as_bytes().to_vec())
    }

    #[test]
    fn a_bad_key_is_left_out_and_the_rest_is_in_force() {
        let kvs = vec![
            kv(
                "/enforcer/v1/registry/board/deny/203.0.113.0%2F24",
                r#"{"cidr": "203.0.113.0/24"}"#,
            ),
            kv(
                "/enforcer/v1/registry/board/feeds/p.txt/000000",
                "192.0.2.0/28\n",
            ),
            kv(
                "/enforcer/v1/registry/board/feeds/bad.txt/000000",
                "192.0.2.0/28\nnot a cidr\n",
            ),
            kv("/enforcer/v1/registry/board/settings/mode", r#""enforce""#),
            kv(
                "/enforcer/v1/registry/board/vpn_endpoints/gw",
                r#"{"name": "gw", "address": "192.0.2.7", "protocol": "wireguard"}"#,
            ),
            kv(
                "/enforcer/v1/registry/ministries/MoFA/networks/hq",
                r#"{"name": "hq", "cidr": "10.1.0.0/16"}"#,
            ),
            kv(
                "/enforcer/v1/registry/ministries/MoITT/networks/hq",
                r#"{"name": "hq", "cidr": "10.2.0.0/16"}"#,
            ),
            kv(
                "/enforcer/v1/registry/ministries/MoITT/networks/lan",
                r#"{"name": "lan", "cidr": "10.3.0.1/16"}"#,
            ),
            kv(
                "/enforcer/v1/registry/ministries/MoITT/vpn_endpoints/x",
                "{}",
            ),
        ];
        let fleet = validate(&kvs, 42, &plain).unwrap();
        let problem = |key: &str| {
            fleet
                .refused
                .iter()
                .find(|r| r.key.ends_with(key))
                .map(|r| r.problem.clone())
                .unwrap_or_else(|| panic!("{key} not refused: {:#?}", fleet.refused))
        };
        assert_eq!(fleet.refused.len(), 5, "{:#?}", fleet.refused);
        assert!(problem("MoITT/vpn_endpoints/x").contains("no section"));
        assert!(problem("bad.txt/000000").contains("bad.txt line 2"));
        assert!(problem("board/vpn_endpoints/gw").contains("approval"));
        assert!(problem("MoITT/networks/hq").contains("hq"));
        assert!(problem("MoITT/networks/lan").contains("host bits"));
        let registry = &fleet.registry;
        assert_eq!(registry.serial, 42);
        assert_eq!(registry.networks.len(), 1);
        assert_eq!(registry.networks[0].ministry.as_deref(), Some("MoFA"));
        assert_eq!(registry.deny.len(), 1);
        assert_eq!(registry.feeds.len(), 1);
        assert!(registry.vpn_endpoints.is_empty());
    }

    #[test]
    fn a_registry_without_a_mode_is_refused_whole() {
        let kvs = vec![kv(
            "/enforcer/v1/registry/board/deny/203.0.113.0%2F24",
            r#"{"cidr": "203.0.113.0/24"}"#,
        )];
        let error = validate(&kvs, 3, &plain).err().expect("refused");
        assert!(error.to_string().contains("mode"), "{error}");
    }

    #[test]
    fn the_example_registry_goes_through_its_keys_unchanged() {
        let path = crate::registry::tests::examples().join("registry.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let original = Registry::load(&path).unwrap();
        let feeds: Vec<(String, String)> = original
            .deny_files
            .iter()
            .map(|f| {
                let feed = std::fs::read_to_string(path.with_file_name(f)).unwrap();
                (f.clone(), feed)
            })
            .collect();
        assert!(!feeds.is_empty(), "the example names a deny feed");
        let keys = layout::encode(&text, &feeds).unwrap();
        let kvs: Vec<(String, Vec<u8>)> =
            keys.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        let fleet = validate(&kvs, i64::try_from(original.serial).unwrap(), &|name, _| {
            format!("feeds/{name}")
        })
        .unwrap();
        assert!(fleet.refused.is_empty(), "{:?}", fleet.refused);
        let sorted = |mut r: Registry| {
            r.networks.sort_by(|a, b| a.name.cmp(&b.name));
            r.devices.sort_by(|a, b| a.name.cmp(&b.name));
            r.upstreams.sort_by(|a, b| a.name.cmp(&b.name));
            r.vpn_endpoints.sort_by(|a, b| a.name.cmp(&b.name));
            r.deny.sort_by_key(|d| d.cidr.to_string());
            r
        };
        assert_eq!(sorted(fleet.registry), sorted(original));
    }
}
