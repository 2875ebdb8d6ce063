//! The registry file's top level, read field by field so that a missing, mistyped or unknown
//! field is one problem among the others rather than the end of the reading: `validate` then
//! reports it beside every problem of the entries. Only text that is not a JSON object stops
//! the reading.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::SCHEMA_VERSION;

/// The top-level fields, each as it was read; `None` where missing or unreadable (the problem
/// is recorded).
#[derive(Default)]
pub(super) struct Top<'a> {
    pub schema: Option<u32>,
    pub mode: Option<String>,
    pub egress: Option<String>,
    pub networks: Vec<&'a RawValue>,
    pub devices: Vec<&'a RawValue>,
    pub vpn_endpoints: Vec<&'a RawValue>,
    pub deny: Vec<&'a RawValue>,
    pub deny_files: Vec<String>,
    pub upstreams: Vec<&'a RawValue>,
    /// Increases by one with every change applied through the control socket.
    pub serial: u64,
    pub connections: super::Connections,
}

/// The fields a registry may have, in the order the documentation lists them.
const FIELDS: [&str; 12] = [
    "schema",
    "note",
    "mode",
    "egress",
    "serial",
    "networks",
    "devices",
    "vpn_endpoints",
    "deny",
    "deny_files",
    "upstreams",
    "connections",
];

/// A problem of the top level: the field, the byte offset to place it at, the message.
pub(super) struct TopProblem {
    pub field: String,
    pub offset: usize,
    pub message: String,
}

/// The object's members in file order, keys with their values' text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object with the registry's fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((key, value));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// `serde_json`'s message without its " at line L column C" suffix (we give the place ourselves).
pub(super) fn message_of(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Byte offset of `raw` (a slice of `text`) in `text`.
fn offset(text: &str, raw: &RawValue) -> usize {
    raw.get().as_ptr() as usize - text.as_ptr() as usize
}

/// Reads the top level of `text`; `Err` only if it is not a JSON object.
pub(super) fn read(text: &str) -> Result<(Top<'_>, Vec<TopProblem>), serde_json::Error> {
    let Members(members) = serde_json::from_str(text)?;
    let mut top = Top::default();
    let mut problems = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (key, raw) in &members {
        let at = offset(text, raw);
        let mut problem = |message: String| {
            problems.push(TopProblem {
                field: key.clone(),
                offset: at,
                message,
            });
        };
        if seen.contains(&key.as_str()) {
            problem(format!("duplicate field `{key}`"));
            continue;
        }
        /// The field's value as `T`, or its problem.
        fn value<'a, T: serde::Deserialize<'a>>(raw: &'a RawValue) -> Result<T, String> {
            serde_json::from_str(raw.get()).map_err(|e| message_of(&e))
        }
        let read: Result<(), String> = match key.as_str() {
            "schema" => value(raw).map(|v| top.schema = Some(v)),
            // Free text for the people who edit the file; the enforcer does not read it.
            "note" => value::<String>(raw).map(|_| ()),
            "mode" => value(raw).map(|v| top.mode = Some(v)),
            "egress" => value(raw).map(|v| top.egress = Some(v)),
            "serial" => value(raw).map(|v| top.serial = v),
            "networks" => value(raw).map(|v| top.networks = v),
            "devices" => value(raw).map(|v| top.devices = v),
            "vpn_endpoints" => value(raw).map(|v| top.vpn_endpoints = v),
            "deny" => value(raw).map(|v| top.deny = v),
            "deny_files" => value(raw).map(|v| top.deny_files = v),
            "upstreams" => value(raw).map(|v| top.upstreams = v),
            "connections" => value::<super::Connections>(raw).and_then(|v| {
                let max = super::Connections::MAX_SECONDS;
                let bad = [v.tcp_idle, v.tcp_closing, v.udp_idle, v.icmp_idle]
                    .into_iter()
                    .flatten()
                    .any(|s| s == 0 || s > max);
                if bad {
                    return Err(format!(
                        "connection timeouts are seconds from 1 to {max} (a week)"
                    ));
                }
                top.connections = v;
                Ok(())
            }),
            _ => Err(format!(
                "unknown field `{key}`, expected one of {}",
                FIELDS.map(|f| format!("`{f}`")).join(", ")
            )),
        };
        if let Err(message) = read {
            problem(message);
        }
        seen.push(key);
    }
    for (field, hint) in [
        (
            "schema",
            format!(" (this enforcer reads schema {SCHEMA_VERSION})"),
        ),
        ("mode", " (\"enforce\" or \"monitor\")".to_string()),
    ] {
        if !seen.contains(&field) {
            problems.push(TopProblem {
                field: field.to_string(),
                offset: 0,
                message: format!("missing field `{field}`{hint}"),
            });
        }
    }
    Ok((top, problems))
}
