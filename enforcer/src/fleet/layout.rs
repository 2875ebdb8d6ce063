//! How a registry lies in etcd: one key per entry, under prefixes that etcd's role-based access
//! control can tell apart, so that etcd itself refuses a ministry that writes a VPN approval.
//!
//! ```text
//! /enforcer/v1/registry/board/settings/{mode,egress,connections,note}
//! /enforcer/v1/registry/board/vpn_endpoints/NAME
//! /enforcer/v1/registry/board/deny/CIDR
//! /enforcer/v1/registry/board/feeds/NAME/NNNNNN        a deny feed, in chunks of whole lines
//! /enforcer/v1/registry/board/{networks,devices,upstreams}/NAME          entries of no ministry
//! /enforcer/v1/registry/ministries/M/{networks,devices,upstreams}/NAME  entries of ministry M
//! /enforcer/v1/registry/{board,ministries/M}/audit     the last change its owner made
//! /enforcer/v1/status/HOST                                              an agent's status
//! /enforcer/v1/seen/HOST                                 that the host's agent has run
//! ```
//!
//! Each value is the entry's JSON object as the registry file has it. A key's last segments are
//! percent-encoded (`/` and anything but letters, digits and `.-_~:@+`), so a name never reaches
//! another prefix. The key is what access control protects, so it decides: an entry under a
//! ministry's prefix belongs to that ministry (its `ministry` field, when present, must say the
//! same), and an entry under the board's prefix has no `ministry`.
//!
//! Every write puts its record (who, what, when) into its owner's `audit` key in the same
//! transaction: etcd's history of those keys is the fleet's audit trail, and a write that
//! removes an entry still changes a key, which the revision check of the next writer sees.

use std::fmt::Write as _;

use serde_json::Value;

/// Everything the enforcer keeps in etcd.
pub const ROOT: &str = "/enforcer/v1/";
/// The registry: what the agents read.
pub const REGISTRY: &str = "/enforcer/v1/registry/";
/// What only the board writes.
pub const BOARD: &str = "/enforcer/v1/registry/board/";
/// Each ministry's own prefix is `MINISTRIES` + its encoded name + `/`.
pub const MINISTRIES: &str = "/enforcer/v1/registry/ministries/";
/// Agents' status, one key per host, under the agent's lease.
pub const STATUS: &str = "/enforcer/v1/status/";
/// Hosts whose agent has run, one key per host (without a lease: a host seen here with no
/// status is gone).
pub const SEEN: &str = "/enforcer/v1/seen/";

/// The registry's settings (top-level fields other than the sections).
const SETTINGS: [&str; 4] = ["mode", "egress", "connections", "note"];
/// Sections a ministry may own.
pub(super) const OWNED: [&str; 3] = ["networks", "devices", "upstreams"];
/// Sections only the board writes.
pub(super) const BOARD_ONLY: [&str; 2] = ["vpn_endpoints", "deny"];
/// A feed is stored in chunks of whole lines of at most this many bytes (etcd refuses values
/// past its request limit, 1.5 MiB by default).
const FEED_CHUNK_BYTES: usize = 512 * 1024;

/// The key range of a prefix: `[prefix, end)`.
pub fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// The prefix a ministry writes.
pub fn ministry_prefix(ministry: &str) -> String {
    format!("{MINISTRIES}{}/", encode_segment(ministry))
}

/// The key of a host's status.
pub fn status_key(host: &str) -> String {
    format!("{STATUS}{}", encode_segment(host))
}

/// The key that says a host's agent has run.
pub fn seen_key(host: &str) -> String {
    format!("{SEEN}{}", encode_segment(host))
}

/// Percent-encodes one key segment.
pub fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b".-_~:@+".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The text of a percent-encoded segment, or `None` if it is not one.
pub fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Who owns an entry's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Board,
    Ministry(String),
}

/// What a key of the registry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A top-level setting (`mode`, `egress`, `connections`, `note`).
    Setting(&'static str),
    /// An entry of `section`, identified by its name (its CIDR for `deny`).
    Entry {
        owner: Owner,
        section: &'static str,
        id: String,
    },
    /// A chunk of a deny feed.
    FeedChunk { name: String, index: u32 },
    /// The last change the owner made (not part of the registry).
    Audit(Owner),
}

/// The key of an item.
pub fn key(item: &Item) -> String {
    match item {
        Item::Setting(name) => format!("{BOARD}settings/{name}"),
        Item::Entry { owner, section, id } => {
            let base = match owner {
                Owner::Board => BOARD.to_string(),
                Owner::Ministry(m) => ministry_prefix(m),
            };
            format!("{base}{section}/{}", encode_segment(id))
        }
        Item::FeedChunk { name, index } => {
            format!("{BOARD}feeds/{}/{index:06}", encode_segment(name))
        }
        Item::Audit(Owner::Board) => format!("{BOARD}audit"),
        Item::Audit(Owner::Ministry(m)) => format!("{}audit", ministry_prefix(m)),
    }
}

/// The item a key holds, or why the key is not one of the layout's.
pub fn parse_key(key: &str) -> Result<Item, String> {
    let rest = key
        .strip_prefix(REGISTRY)
        .ok_or_else(|| format!("not under {REGISTRY}"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let segment = |s: &str| decode_segment(s).ok_or_else(|| format!("bad encoding in {s:?}"));
    let section = |s: &str, allowed: &[&'static str]| {
        allowed
            .iter()
            .copied()
            .find(|a| *a == s)
            .ok_or_else(|| format!("no section {s:?} here"))
    };
    match parts.as_slice() {
        ["board", "audit"] => Ok(Item::Audit(Owner::Board)),
        ["ministries", m, "audit"] => Ok(Item::Audit(Owner::Ministry(segment(m)?))),
        ["board", "settings", name] => SETTINGS
            .iter()
            .copied()
            .find(|s| s == name)
            .map(Item::Setting)
            .ok_or_else(|| format!("no setting {name:?}")),
        ["board", "feeds", name, index] => {
            let index = index
                .parse::<u32>()
                .ok()
                .filter(|_| index.len() == 6)
                .ok_or_else(|| format!("feed chunk {index:?} is not six digits"))?;
            let name = segment(name)?;
            feed_name(&name)?;
            Ok(Item::FeedChunk { name, index })
        }
        ["board", s, id] => Ok(Item::Entry {
            owner: Owner::Board,
            section: section(s, &[OWNED.as_slice(), BOARD_ONLY.as_slice()].concat())?,
            id: segment(id)?,
        }),
        ["ministries", m, s, id] => Ok(Item::Entry {
            owner: Owner::Ministry(segment(m)?),
            section: section(s, &OWNED)?,
            id: segment(id)?,
        }),
        _ => Err("not a key of the registry's layout".to_string()),
    }
}

/// A feed's name in etcd: a plain file name, so that writing it out never leaves its directory.
pub fn feed_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if plain {
        Ok(())
    } else {
        Err(format!(
            "feed name {name:?} is not a plain file name (letters, digits, '.', '_', '-')"
        ))
    }
}

/// The keys and values of a validated registry's text, with its feeds as (name as the registry
/// writes it, text). A feed is stored under its file name.
pub fn encode(text: &str, feeds: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let Value::Object(top) = serde_json::from_str::<Value>(text).map_err(|e| e.to_string())? else {
        return Err("the registry is not a JSON object".into());
    };
    let mut out = Vec::new();
    for name in SETTINGS {
        if let Some(value) = top.get(name) {
            out.push((key(&Item::Setting(name)), value.to_string()));
        }
    }
    for section in OWNED.iter().chain(BOARD_ONLY.iter()).copied() {
        for entry in top
            .get(section)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = if section == "deny" { "cidr" } else { "name" };
            let id = entry[field]
                .as_str()
                .ok_or_else(|| format!("a {section} entry without {field}"))?;
            let owner = match entry.get("ministry").and_then(Value::as_str) {
                Some(m) if OWNED.contains(&section) => Owner::Ministry(m.to_string()),
                _ => Owner::Board,
            };
            let item = Item::Entry {
                owner,
                section,
                id: id.to_string(),
            };
            out.push((key(&item), entry.to_string()));
        }
    }
    let mut seen: Vec<String> = Vec::new();
    for path in top
        .get("deny_files")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let path = path.as_str().unwrap_or_default();
        let name = std::path::Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        feed_name(&name).map_err(|e| format!("deny feed {path:?}: {e}"))?;
        if seen.contains(&name) {
            return Err(format!(
                "two deny feeds are named {name:?}: in a fleet a feed is known by its file name"
            ));
        }
        let (_, feed) = feeds
            .iter()
            .find(|(p, _)| p == path)
            .ok_or_else(|| format!("deny feed {path:?} was not read"))?;
        for (index, chunk) in chunks(feed).into_iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| "a feed of too many chunks")?;
            let item = Item::FeedChunk {
                name: name.clone(),
                index,
            };
            out.push((key(&item), chunk.to_string()));
        }
        seen.push(name);
    }
    Ok(out)
}

/// A feed's text in chunks of whole lines (a line longer than a chunk is a chunk of its own).
fn chunks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + FEED_CHUNK_BYTES).min(text.len());
        if end < text.len() {
            end = match text[start..end].rfind('\n') {
                Some(nl) => start + nl + 1,
                None => text[end..].find('\n').map_or(text.len(), |nl| end + nl + 1),
            };
        }
        out.push(&text[start..end]);
        start = end;
    }
    if out.is_empty() {
        out.push("");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_keep_names_inside_their_prefix() {
        for name in ["MoITT", "a/b", "../x", "100%", "2001:db8::/32", "ünï"] {
            let encoded = encode_segment(name);
            assert!(!encoded.contains('/'), "{encoded}");
            assert_eq!(decode_segment(&encoded).as_deref(), Some(name));
        }
        assert_eq!(decode_segment("%2"), None);
        assert_eq!(decode_segment("%zz"), None);
    }

    #[test]
    fn keys_round_trip_and_foreign_keys_are_refused() {
        let items = [
            Item::Setting("mode"),
            Item::Entry {
                owner: Owner::Ministry("Mo/ITT".into()),
                section: "networks",
                id: "hq lan".into(),
            },
            Item::Entry {
                owner: Owner::Board,
                section: "deny",
                id: "203.0.113.0/24".into(),
            },
            Item::FeedChunk {
                name: "providers.txt".into(),
                index: 3,
            },
            Item::Audit(Owner::Ministry("MoITT".into())),
            Item::Audit(Owner::Board),
        ];
        for item in items {
            assert_eq!(parse_key(&key(&item)), Ok(item.clone()));
        }
        for bad in [
            "/enforcer/v1/registry/ministries/M/vpn_endpoints/x",
            "/enforcer/v1/registry/ministries/M/deny/x",
            "/enforcer/v1/registry/board/settings/serial",
            "/enforcer/v1/registry/board/feeds/../000000",
            "/enforcer/v1/registry/board/feeds/a/1",
            "/enforcer/v1/registry/board/networks/a/b",
            "/elsewhere/x",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn feeds_are_chunked_at_line_ends() {
        let line = "203.0.113.0/24\n";
        let text = line.repeat(FEED_CHUNK_BYTES / line.len() * 2 + 7);
        let parts = chunks(&text);
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.ends_with('\n')));
        assert_eq!(parts.concat(), text);
        assert_eq!(chunks(""), vec![""]);
    }
}
