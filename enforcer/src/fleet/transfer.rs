//! `enforcer fleet import` and `export`: a registry file (and its deny feeds) into the fleet's
//! keys in one revision-checked transaction, and the fleet's registry out into a file.

use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde_json::Value;

use super::{
    EtcdArgs, FleetError, FleetRegistry,
    layout::{self, Item, Owner},
};
use crate::registry::{Registry, read};

/// What a write did.
#[derive(Debug, serde::Serialize)]
pub struct Written {
    /// The revision the write made (the read's, when nothing changed).
    pub revision: i64,
    pub put: usize,
    pub deleted: usize,
}

/// The audit record a write puts into its owner's audit key: who (this host and user), what,
/// when.
pub fn audit_record(verb: &str, detail: &Value) -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    serde_json::json!({
        "time": crate::events::timestamp(ns),
        "unix_ms": ns / 1_000_000,
        "host": host.trim(),
        "uid": uid,
        "verb": verb,
        "detail": detail,
    })
    .to_string()
}

/// Writes `puts` and `deletes` in one transaction that holds only if no key of the registry
/// changed after `revision`, with `audit` put into `owner`'s audit key. Refused (nothing
/// written) when someone else changed the registry since it was read.
pub async fn write_checked(
    client: &mut Client,
    revision: i64,
    puts: Vec<(String, String)>,
    deletes: Vec<String>,
    audit: (Owner, String),
) -> Result<Written, FleetError> {
    let (put, deleted) = (puts.len(), deletes.len());
    let written: Vec<String> = puts
        .iter()
        .map(|(k, _)| k.clone())
        .chain(deletes.iter().cloned())
        .take(3)
        .collect();
    let mut ops: Vec<TxnOp> = puts
        .into_iter()
        .map(|(k, v)| TxnOp::put(k, v, None))
        .chain(deletes.into_iter().map(|k| TxnOp::delete(k, None)))
        .collect();
    ops.push(TxnOp::put(
        layout::key(&Item::Audit(audit.0)),
        audit.1,
        None,
    ));
    let unchanged = Compare::mod_revision(layout::REGISTRY, CompareOp::Less, revision + 1)
        .with_range(layout::range_end(layout::REGISTRY));
    // The answer to a transaction of many keys is larger than gRPC's default limit.
    let response = client
        .kv_client()
        .max_decoding_message_size(super::connect::MAX_MESSAGE_BYTES)
        .txn(Txn::new().when([unchanged]).and_then(ops))
        .await
        .map_err(|source| match &source {
            etcd_client::Error::GRpcStatus(status) if i32::from(status.code()) == 7 => {
                FleetError::Refused(format!(
                    "refused by etcd, nothing changed: permission denied for {}: this user may not write there. A ministry writes only its own networks, devices and upstreams (give --ministry with its own name); VPN approvals, deny ranges, feeds, settings and entries of no ministry are the board's",
                    written.join(", ")
                ))
            }
            _ => FleetError::Etcd {
                what: "write the change".into(),
                source,
            },
        })?;
    if !response.succeeded() {
        return Err(FleetError::Conflict(format!(
            "the fleet's registry changed after revision {revision}, which this change was checked against; nothing was written: run it again"
        )));
    }
    Ok(Written {
        revision: response
            .header()
            .map_or(revision, etcd_client::ResponseHeader::revision),
        put,
        deleted,
    })
}

/// Reads the registry file `file` and its feeds, and makes the fleet's registry exactly that.
pub async fn import(etcd: &EtcdArgs, file: &Path) -> Result<Written, FleetError> {
    let registry = Registry::load(file).map_err(|e| FleetError::Refused(e.to_string()))?;
    let io = |what: String| move |source| FleetError::Io { what, source };
    let text = read::read_regular(file, read::REGISTRY_MAX_BYTES)
        .map_err(io(format!("cannot read {}", file.display())))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut feeds = Vec::new();
    for name in &registry.deny_files {
        let path = base.join(name);
        let feed = read::read_regular(&path, read::FEED_MAX_BYTES)
            .map_err(io(format!("cannot read deny feed {}", path.display())))?;
        feeds.push((name.clone(), feed));
    }
    let keys = layout::encode(&text, &feeds).map_err(FleetError::Refused)?;
    let mut client = etcd.connect().await?;
    let (revision, current) =
        super::connect::read_prefix(&mut client, layout::REGISTRY, None).await?;
    let now: std::collections::HashMap<&str, &[u8]> = current
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let wanted: std::collections::HashSet<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    let deletes: Vec<String> = current
        .iter()
        .filter(|(k, _)| {
            !wanted.contains(k.as_str()) && !matches!(layout::parse_key(k), Ok(Item::Audit(_)))
        })
        .map(|(k, _)| k.clone())
        .collect();
    let puts: Vec<(String, String)> = keys
        .iter()
        .filter(|(k, v)| now.get(k.as_str()) != Some(&v.as_bytes()))
        .cloned()
        .collect();
    let detail = serde_json::json!({
        "file": file.display().to_string(),
        "put": puts.len(),
        "deleted": deletes.len(),
    });
    write_checked(
        &mut client,
        revision,
        puts,
        deletes,
        (Owner::Board, audit_record("import", &detail)),
    )
    .await
}

/// Reads the fleet's registry (at its latest revision) and validates it.
pub async fn read_registry(
    client: &mut Client,
    feed_path: super::assemble::FeedPath<'_>,
) -> Result<FleetRegistry, FleetError> {
    let (revision, kvs) = super::connect::read_prefix(client, layout::REGISTRY, None).await?;
    super::validate(&kvs, revision, feed_path)
}

/// Writes the fleet's registry into `file`, its deny feeds into `FILE.feeds/`.
pub async fn export(etcd: &EtcdArgs, file: &Path) -> Result<FleetRegistry, FleetError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| FleetError::Options(format!("{} is not a file name", file.display())))?;
    let feed_dir = format!("{name}.feeds/");
    let mut client = etcd.connect().await?;
    let fleet = read_registry(&mut client, &|feed, _| format!("{feed_dir}{feed}")).await?;
    let io = |what: String| move |source| FleetError::Io { what, source };
    let base = file.parent().unwrap_or(Path::new("."));
    if !fleet.feeds.is_empty() {
        let dir = base.join(&feed_dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    }
    for (feed, text) in &fleet.feeds {
        let path = base.join(feed);
        crate::source::replace_file(&path, text)
            .map_err(io(format!("cannot write {}", path.display())))?;
    }
    crate::source::replace_file(file, &fleet.text)
        .map_err(io(format!("cannot write {}", file.display())))?;
    Ok(fleet)
}
