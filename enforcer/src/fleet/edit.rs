//! The live verbs (`allow`, `device`, `deny`, `vpn`, `upstream`, `mode`) with `--etcd`: the
//! change is made to the fleet's registry. It is validated as the file would be (the whole
//! registry with the change, and no other key made invalid by it), then written in one
//! transaction checked against the revision it was validated at, with its audit record in the
//! owner's audit key. When another administrator's change came between, the change is read,
//! validated and written again (a few times), so that neither change is lost.

use serde_json::{Value, json};

use super::{
    EtcdArgs, FleetError,
    connect::read_prefix,
    layout::{self, Item, Owner},
    transfer::{audit_record, write_checked},
};
use crate::{
    control::{Request, Response},
    registry::text,
};

/// How long a change keeps trying while other changes keep coming between its read and its
/// write (each attempt waits a little longer, with jitter, so that concurrent writers spread).
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// Feeds keep the names etcd gives them: a change's validation needs no files.
fn plain(name: &str, _: &str) -> String {
    name.to_string()
}

/// A change planned against the registry at one revision.
struct Planned {
    puts: Vec<(String, String)>,
    deletes: Vec<String>,
    owner: Owner,
    what: String,
    detail: Value,
}

/// Serves `request` against the fleet's registry.
pub async fn request(etcd: &EtcdArgs, request: &Request) -> Result<Response, FleetError> {
    let mut client = etcd.connect().await?;
    if let Request::List { section } = request {
        let section =
            text::section_name(section).map_err(|e| FleetError::Refused(e.to_string()))?;
        let (revision, kvs) = read_prefix(&mut client, layout::REGISTRY, None).await?;
        let fleet = super::validate(&kvs, revision, &plain)?;
        let entries: Vec<Value> = entries(&kvs, section).into_iter().map(|(_, v)| v).collect();
        return Ok(Response::ok(
            format!(
                "{} {section} entries in the fleet's registry at revision {revision}{}",
                entries.len(),
                left_out_note(fleet.refused.len())
            ),
            Value::Array(entries),
        ));
    }
    let start = std::time::Instant::now();
    let mut attempt: u64 = 0;
    while start.elapsed() < PATIENCE {
        if attempt > 0 {
            tokio::time::sleep(jitter(attempt)).await;
        }
        attempt += 1;
        let (revision, kvs) = read_prefix(&mut client, layout::REGISTRY, None).await?;
        let planned = plan(&kvs, revision, request)?;
        let record = audit_record(&planned.what, &planned.detail);
        match write_checked(
            &mut client,
            revision,
            planned.puts,
            planned.deletes,
            (planned.owner, record),
        )
        .await
        {
            Ok(written) => {
                return Ok(Response::ok(
                    format!(
                        "{} in the fleet's registry at revision {}",
                        planned.what, written.revision
                    ),
                    json!({"revision": written.revision, "detail": planned.detail}),
                ));
            }
            // Someone else's change came between: read, validate and write again.
            Err(FleetError::Conflict(_)) => {}
            Err(other) => return Err(other),
        }
    }
    Err(FleetError::Refused(format!(
        "the fleet's registry kept changing for {} s ({attempt} attempts); nothing was written: run it again",
        PATIENCE.as_secs()
    )))
}

/// A wait before attempt `attempt`: up to 25 ms times the attempt (at most 500 ms), drawn from
/// the clock and the process id.
fn jitter(attempt: u64) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mixed =
        (nanos ^ u64::from(std::process::id()).rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let ceiling = (25 * attempt).min(500);
    std::time::Duration::from_millis(mixed % ceiling.max(1))
}

fn left_out_note(count: usize) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(" ({count} keys left out as invalid: `enforcer fleet export` lists them)")
    }
}

/// The entries of `section`: (key, value).
fn entries(kvs: &[(String, Vec<u8>)], section: &str) -> Vec<(String, Value)> {
    kvs.iter()
        .filter(|(k, _)| matches!(layout::parse_key(k), Ok(Item::Entry { section: s, .. }) if s == section))
        .filter_map(|(k, v)| Some((k.clone(), serde_json::from_slice(v).ok()?)))
        .collect()
}

/// What `request` writes, validated against `kvs` at `revision`.
fn plan(
    kvs: &[(String, Vec<u8>)],
    revision: i64,
    request: &Request,
) -> Result<Planned, FleetError> {
    let refused = |m: String| FleetError::Refused(format!("refused, nothing changed: {m}"));
    match request {
        Request::Add { section, entry } => {
            let section = text::section_name(section).map_err(|e| refused(e.to_string()))?;
            let field = if section == "deny" { "cidr" } else { "name" };
            let id = entry
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| refused(format!("a {section} entry needs its {field}")))?;
            let owner = match entry.get("ministry").and_then(Value::as_str) {
                Some(m) if ["networks", "devices", "upstreams"].contains(&section) => {
                    Owner::Ministry(m.to_string())
                }
                _ => Owner::Board,
            };
            let key = layout::key(&Item::Entry {
                owner: owner.clone(),
                section,
                id: id.to_string(),
            });
            if kvs.iter().any(|(k, _)| *k == key) {
                return Err(refused(format!(
                    "{section} already has {} (key {key})",
                    crate::registry::value::quoted(id)
                )));
            }
            let value = entry.to_string();
            check_addition(kvs, revision, &key, &value)?;
            let label = text::entry_label(entry);
            Ok(Planned {
                puts: vec![(key.clone(), value)],
                deletes: Vec::new(),
                owner,
                what: format!("added {section} entry {}", crate::registry::value::quoted(&label)),
                detail: json!({"section": section, "entry": entry, "key": key,
                               "approval": entry.get("approval")}),
            })
        }
        Request::Remove { section, target } => {
            let section = text::section_name(section).map_err(|e| refused(e.to_string()))?;
            let found: Vec<(String, Value)> = entries(kvs, section)
                .into_iter()
                .filter(|(_, v)| text::matches_target(v, target))
                .collect();
            let (key, entry) = match found.as_slice() {
                [one] => one.clone(),
                [] => return Err(refused(text::no_entry(section, target))),
                more => {
                    let keys: Vec<&str> = more.iter().map(|(k, _)| k.as_str()).collect();
                    return Err(refused(format!(
                        "{} names {} {section} entries ({}): remove one by its name",
                        crate::registry::value::quoted(target),
                        more.len(),
                        keys.join(", ")
                    )));
                }
            };
            let owner = match layout::parse_key(&key) {
                Ok(Item::Entry { owner, .. }) => owner,
                _ => Owner::Board,
            };
            Ok(Planned {
                puts: Vec::new(),
                deletes: vec![key.clone()],
                owner,
                what: format!(
                    "removed {section} entry {}",
                    crate::registry::value::quoted(&text::entry_label(&entry))
                ),
                detail: json!({"section": section, "entry": entry, "key": key}),
            })
        }
        Request::Mode { mode } => Ok(setting("mode", &json!(mode))),
        Request::Egress { egress } => Ok(setting("egress", &json!(egress))),
        Request::Status | Request::Reload | Request::Check { .. } | Request::List { .. } => {
            Err(FleetError::Options(
                "with --etcd: allow, device, deny, vpn, upstream (add, remove, list) and mode; `enforcer fleet status` shows the agents".into(),
            ))
        }
    }
}

/// A setting of the board's.
fn setting(name: &'static str, value: &Value) -> Planned {
    Planned {
        puts: vec![(layout::key(&Item::Setting(name)), value.to_string())],
        deletes: Vec::new(),
        owner: Owner::Board,
        what: format!("set {name} to {value}"),
        detail: json!({"setting": name, "value": value}),
    }
}

/// Refuses an added key that fails validation, or that makes another key fail (a name taken in
/// another section or ministry, say).
fn check_addition(
    kvs: &[(String, Vec<u8>)],
    revision: i64,
    key: &str,
    value: &str,
) -> Result<(), FleetError> {
    let before = super::validate(kvs, revision, &plain)?;
    let mut with: Vec<(String, Vec<u8>)> = kvs.to_vec();
    let at = with.partition_point(|(k, _)| k.as_str() < key);
    with.insert(at, (key.to_string(), value.as_bytes().to_vec()));
    let after = super::validate(&with, revision, &plain)?;
    let newly: Vec<String> = after
        .refused
        .iter()
        .filter(|r| !before.refused.iter().any(|b| b.key == r.key))
        .map(|r| {
            if r.key == key {
                r.problem.clone()
            } else {
                format!("it would make {} invalid: {}", r.key, r.problem)
            }
        })
        .collect();
    if newly.is_empty() {
        Ok(())
    } else {
        Err(FleetError::Refused(format!(
            "refused, nothing changed: {}",
            newly.join("; ")
        )))
    }
}
