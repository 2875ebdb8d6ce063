//! The registry a set of keys makes: the document a registry file would hold, each part with
//! the key it came from, so that a problem found by validation names its key.

use serde_json::{Map, Value};

use super::layout::{BOARD_ONLY, Item, OWNED, Owner, parse_key};

/// A key the registry could not take, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    pub key: String,
    pub problem: String,
}

/// The registry a set of keys makes, before validation: the document's parts, each with the
/// key (or keys) it came from.
pub struct Assembled {
    /// One line per part; `lines[i]`'s keys are `keys[i]`.
    lines: Vec<String>,
    keys: Vec<Vec<String>>,
    /// Feed name → its text and its chunks' keys.
    pub feeds: Vec<(String, String, Vec<String>)>,
    /// Keys refused before validation.
    pub refused: Vec<Refused>,
}

/// Entries of the document by section, as lines with their keys.
type Sections = Vec<(&'static str, Vec<(String, String)>)>;

/// Where a feed goes: its path in `deny_files`, from its name and text.
pub type FeedPath<'a> = &'a dyn Fn(&str, &str) -> String;

/// Collects the keys (in etcd's order: sorted) into a registry document at `revision`; each
/// feed is named in `deny_files` by `feed_path`.
pub fn assemble(kvs: &[(String, Vec<u8>)], revision: i64, feed_path: FeedPath<'_>) -> Assembled {
    let mut refused = Vec::new();
    let mut settings: Vec<(&'static str, String, String)> = Vec::new();
    let mut sections: Sections = OWNED
        .iter()
        .chain(BOARD_ONLY.iter())
        .map(|s| (*s, Vec::new()))
        .collect();
    let mut feeds: Vec<(String, String, Vec<String>)> = Vec::new();
    for (key, value) in kvs {
        let mut refuse = |problem: String| {
            refused.push(Refused {
                key: key.clone(),
                problem,
            });
        };
        let item = match parse_key(key) {
            Ok(item) => item,
            Err(e) => {
                refuse(e);
                continue;
            }
        };
        let Ok(text) = std::str::from_utf8(value) else {
            refuse("the value is not UTF-8".into());
            continue;
        };
        match item {
            Item::Audit(_) => {}
            Item::FeedChunk { name, index } => match feeds.iter_mut().find(|(n, ..)| *n == name) {
                Some((_, feed, keys)) if keys.len() == index as usize => {
                    feed.push_str(text);
                    keys.push(key.clone());
                }
                None if index == 0 => feeds.push((name, text.to_string(), vec![key.clone()])),
                _ => refuse("a feed chunk out of sequence (one before it is missing)".into()),
            },
            Item::Setting(name) => match serde_json::from_str::<Value>(text) {
                Ok(value) => settings.push((name, value.to_string(), key.clone())),
                Err(e) => refuse(format!("the value is not JSON: {e}")),
            },
            Item::Entry { owner, section, id } => match entry(text, &owner, section, &id) {
                Ok(line) => {
                    if let Some((_, lines)) = sections.iter_mut().find(|(s, _)| *s == section) {
                        lines.push((line, key.clone()));
                    }
                }
                Err(e) => refuse(e),
            },
        }
    }
    let mut lines = vec![
        "{\"schema\": 1,".to_string(),
        format!("\"serial\": {revision},"),
    ];
    let mut keys = vec![Vec::new(), Vec::new()];
    for (name, value, key) in settings {
        lines.push(format!("\"{name}\": {value},"));
        keys.push(vec![key]);
    }
    for (section, entries) in sections {
        lines.push(format!("\"{section}\": ["));
        keys.push(Vec::new());
        let count = entries.len();
        for (i, (line, key)) in entries.into_iter().enumerate() {
            lines.push(if i + 1 < count {
                format!("{line},")
            } else {
                line
            });
            keys.push(vec![key]);
        }
        lines.push("],".to_string());
        keys.push(Vec::new());
    }
    for (name, text, _) in &mut feeds {
        *name = feed_path(name, text);
    }
    let names: Vec<Value> = feeds
        .iter()
        .map(|(n, ..)| Value::from(n.as_str()))
        .collect();
    lines.push(format!("\"deny_files\": {}", Value::Array(names)));
    keys.push(feeds.iter().flat_map(|(_, _, k)| k.clone()).collect());
    lines.push("}".to_string());
    keys.push(Vec::new());
    Assembled {
        lines,
        keys,
        feeds,
        refused,
    }
}

/// An entry's value as one line of the document, checked against its key.
fn entry(text: &str, owner: &Owner, section: &str, id: &str) -> Result<String, String> {
    let Value::Object(mut object) =
        serde_json::from_str::<Value>(text).map_err(|e| format!("the value is not JSON: {e}"))?
    else {
        return Err("the value is not a JSON object".into());
    };
    let field = if section == "deny" { "cidr" } else { "name" };
    if object.get(field).and_then(Value::as_str) != Some(id) {
        return Err(format!("its {field} is not the one its key names ({id:?})"));
    }
    match (owner, object.get("ministry")) {
        (Owner::Board, Some(m)) => {
            return Err(format!(
                "an entry under the board's prefix names ministry {m}: a ministry's entries belong under its own prefix"
            ));
        }
        (Owner::Ministry(m), Some(v)) if v.as_str() != Some(m) => {
            return Err(format!(
                "its ministry {v} is not the ministry its key names ({m:?})"
            ));
        }
        (Owner::Ministry(m), None) => insert_ministry(&mut object, m),
        _ => {}
    }
    Ok(Value::Object(object).to_string())
}

/// Adds `ministry` after `name` (the place a registry file gives it).
fn insert_ministry(object: &mut Map<String, Value>, ministry: &str) {
    let mut out = Map::new();
    for (k, v) in std::mem::take(object) {
        let after_name = k == "name";
        out.insert(k, v);
        if after_name {
            out.insert("ministry".into(), Value::from(ministry));
        }
    }
    *object = out;
}

impl Assembled {
    /// The document's text.
    pub fn text(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }

    /// The keys of line `line` (1-based).
    pub fn keys_of_line(&self, line: usize) -> &[String] {
        line.checked_sub(1)
            .and_then(|i| self.keys.get(i))
            .map_or(&[], Vec::as_slice)
    }

    /// The chunks' keys of the feed named `name`.
    pub fn keys_of_feed(&self, name: &str) -> &[String] {
        self.feeds
            .iter()
            .find(|(n, ..)| n == name)
            .map_or(&[], |(_, _, k)| k.as_slice())
    }

    /// The feeds as (name, text).
    pub fn feed_texts(&self) -> Vec<(String, String)> {
        self.feeds
            .iter()
            .map(|(n, t, _)| (n.clone(), t.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_must_match_its_key() {
        let ministry = Owner::Ministry("MoITT".into());
        let ok = entry(
            r#"{"name": "a", "cidr": "10.0.0.0/8"}"#,
            &ministry,
            "networks",
            "a",
        )
        .unwrap();
        assert_eq!(ok, r#"{"name":"a","ministry":"MoITT","cidr":"10.0.0.0/8"}"#);
        for (text, owner) in [
            (r#"{"name": "b", "cidr": "10.0.0.0/8"}"#, &ministry),
            (
                r#"{"name": "a", "ministry": "MoFA", "cidr": "10.0.0.0/8"}"#,
                &ministry,
            ),
            (
                r#"{"name": "a", "ministry": "MoITT", "cidr": "10.0.0.0/8"}"#,
                &Owner::Board,
            ),
            ("[1]", &Owner::Board),
        ] {
            assert!(entry(text, owner, "networks", "a").is_err(), "{text}");
        }
    }
}
