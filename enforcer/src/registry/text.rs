//! Changes of the registry file's text: an entry added or removed, the mode set, expired entries
//! removed, the serial set. Each is spliced into the text as written, so that a million-entry
//! file is neither built into a JSON tree (a GiB) nor reformatted; where the text does not
//! splice (escapes in a section's text, a section the file does not have yet) the change is made
//! to the document's tree instead. Pure: no file is read or written here.

use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};

use super::{Date, EgressMode, Mode};

pub const ORDER: [&str; 5] = ["networks", "devices", "vpn_endpoints", "deny", "upstreams"];

/// Where a section's entries and the serial are in the file's text.
pub struct Layout<'a> {
    array: &'a RawValue,
    pub entries: Vec<&'a RawValue>,
    serial: SerialAt<'a>,
    /// Every section's array, in `ORDER`.
    pub sections: [Option<&'a RawValue>; 5],
}

/// The top level of a registry file: where each section's array, the serial and the mode are.
struct Top<'a> {
    /// In `ORDER`.
    sections: [Option<&'a RawValue>; 5],
    serial: Option<&'a RawValue>,
    mode: Option<&'a RawValue>,
    egress: Option<&'a RawValue>,
}

/// Where the serial goes: its value, or (a file that has none yet) after the mode's.
#[derive(Clone, Copy)]
enum SerialAt<'a> {
    Value(&'a RawValue),
    AfterMode(&'a RawValue),
}

impl<'a> Top<'a> {
    fn serial_at(&self) -> Option<SerialAt<'a>> {
        self.serial
            .map(SerialAt::Value)
            .or_else(|| self.mode.map(SerialAt::AfterMode))
    }
}

impl SerialAt<'_> {
    /// The span to replace and its new text, for `serial`.
    fn set(self, text: &str, serial: u64) -> (std::ops::Range<usize>, String) {
        match self {
            Self::Value(raw) => (span(text, raw), serial.to_string()),
            Self::AfterMode(mode) => {
                let end = span(text, mode).end;
                (end..end, format!(", \"serial\": {serial}"))
            }
        }
    }
}

fn top(text: &str) -> Option<Top<'_>> {
    /// Only what a splice needs; the rest of the file is skipped, not built.
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        networks: Option<&'a RawValue>,
        #[serde(borrow)]
        devices: Option<&'a RawValue>,
        #[serde(borrow)]
        vpn_endpoints: Option<&'a RawValue>,
        #[serde(borrow)]
        deny: Option<&'a RawValue>,
        #[serde(borrow)]
        upstreams: Option<&'a RawValue>,
        #[serde(borrow)]
        serial: Option<&'a RawValue>,
        #[serde(borrow)]
        mode: Option<&'a RawValue>,
        #[serde(borrow)]
        egress: Option<&'a RawValue>,
    }
    let raw: Raw<'_> = serde_json::from_str(text).ok()?;
    Some(Top {
        sections: [
            raw.networks,
            raw.devices,
            raw.vpn_endpoints,
            raw.deny,
            raw.upstreams,
        ],
        serial: raw.serial,
        mode: raw.mode,
        egress: raw.egress,
    })
}

/// A section's entries, from its array's text; `None` if the text has escapes, which would let
/// a value differ from its text (the searches here read the text).
pub fn entries(array: &RawValue) -> Option<Vec<&RawValue>> {
    if array.get().contains('\\') {
        return None;
    }
    serde_json::from_str(array.get()).ok()
}

pub fn layout<'a>(text: &'a str, section: &str) -> Option<Layout<'a>> {
    let top = top(text)?;
    let array = top.sections[ORDER.iter().position(|s| *s == section)?]?;
    Some(Layout {
        array,
        entries: entries(array)?,
        serial: top.serial_at()?,
        sections: top.sections,
    })
}

/// Byte offset of `raw` (a slice of `text`) in `text`.
fn offset(text: &str, raw: &RawValue) -> usize {
    raw.get().as_ptr() as usize - text.as_ptr() as usize
}

/// Where `raw` (a slice of `text`) is in `text`.
fn span(text: &str, raw: &RawValue) -> std::ops::Range<usize> {
    let at = offset(text, raw);
    at..at + raw.get().len()
}

/// `text` with each span replaced (spans do not overlap), built in one pass.
fn replace_spans(text: &str, mut spans: Vec<(std::ops::Range<usize>, String)>) -> String {
    spans.sort_by_key(|(range, _)| range.start);
    let mut out =
        String::with_capacity(text.len() + spans.iter().map(|(_, w)| w.len()).sum::<usize>());
    let mut at = 0;
    for (range, with) in spans {
        out.push_str(&text[at..range.start]);
        out.push_str(&with);
        at = range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// A section's new array text: its `entries` (slices of `text`, the array's elements) filtered
/// by `keep`, then `extra` (JSON text). Entries keep their text; the whitespace between them
/// is that before the first entry.
fn section_array(
    text: &str,
    array: &RawValue,
    entries: &[&RawValue],
    keep: impl Fn(usize) -> bool,
    extra: Option<&str>,
) -> Option<String> {
    let range = span(text, array);
    let (first, last) = (entries.first()?, entries.last()?);
    let separator = text.get(range.start + 1..offset(text, first))?;
    let closing = text.get(span(text, last).end..range.end - 1)?;
    let indent = separator.rsplit('\n').next().unwrap_or_default();
    let mut out = String::with_capacity(range.len() + extra.map_or(0, str::len));
    out.push('[');
    let mut count = 0;
    let kept = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, e)| std::borrow::Cow::Borrowed(e.get()));
    let extra = extra.map(|e| std::borrow::Cow::Owned(e.replace('\n', &format!("\n{indent}"))));
    for entry in kept.chain(extra) {
        if count > 0 {
            out.push(',');
        }
        out.push_str(separator);
        out.push_str(&entry);
        count += 1;
    }
    if count > 0 {
        out.push_str(closing);
    }
    out.push(']');
    Some(out)
}

/// The text with the section's entries filtered by `keep`, `extra` appended to them, and the
/// serial set to `serial`.
fn splice(
    text: &str,
    layout: &Layout<'_>,
    keep: impl Fn(usize) -> bool,
    extra: Option<&str>,
    serial: u64,
) -> Option<String> {
    let array = section_array(text, layout.array, &layout.entries, keep, extra)?;
    Some(replace_spans(
        text,
        vec![
            (span(text, layout.array), array),
            layout.serial.set(text, serial),
        ],
    ))
}

/// The text with the registry's `mode` and `serial` set; `None` if it has no mode.
pub fn splice_mode(text: &str, mode: Mode, serial: u64) -> Option<String> {
    let top = top(text)?;
    let mode_span = (span(text, top.mode?), format!("\"{}\"", mode.as_str()));
    let spans = match top.serial_at()? {
        // Both at the mode's place: one replacement.
        SerialAt::AfterMode(_) => vec![(
            mode_span.0,
            format!("{}, \"serial\": {serial}", mode_span.1),
        )],
        at @ SerialAt::Value(_) => vec![mode_span, at.set(text, serial)],
    };
    Some(replace_spans(text, spans))
}

/// The file with the egress mode set (its value replaced, or the field put after the mode's)
/// and the serial set; `None` if the text does not splice.
pub fn splice_egress(text: &str, egress: EgressMode, serial: u64) -> Option<String> {
    let top = top(text)?;
    let value = format!("\"{}\"", egress.as_str());
    let spans = match (top.egress, top.serial_at()?) {
        (Some(raw), at) => vec![(span(text, raw), value), at.set(text, serial)],
        (None, SerialAt::AfterMode(mode)) => {
            let end = span(text, mode).end;
            vec![(
                end..end,
                format!(", \"egress\": {value}, \"serial\": {serial}"),
            )]
        }
        (None, at @ SerialAt::Value(_)) => {
            let end = span(text, top.mode?).end;
            vec![
                (end..end, format!(", \"egress\": {value}")),
                at.set(text, serial),
            ]
        }
    };
    Some(replace_spans(text, spans))
}

/// What removing the entries whose expiry date is past makes of the file.
pub struct Expiry {
    /// The text without them, with the serial set.
    pub text: String,
    /// The entries removed, as `{"section", "entry"}` objects.
    pub gone: Vec<Value>,
    /// The earliest expiry date of the entries left.
    pub next: Option<Date>,
}

/// The file without the entries of every section whose expiry date is past on `today`; `None`
/// if the text does not splice.
pub fn splice_expired(text: &str, today: Date, serial: u64) -> Option<Expiry> {
    let top = top(text)?;
    let mut spans = vec![top.serial_at()?.set(text, serial)];
    let mut gone = Vec::new();
    let mut next: Option<Date> = None;
    for (n, array) in top.sections.iter().enumerate() {
        let Some(array) = array else {
            continue;
        };
        let entries = entries(array)?;
        let mut past = Vec::new();
        for (i, raw) in entries.iter().enumerate() {
            if !raw.get().contains("\"expires\"") {
                continue;
            }
            let entry: Value = serde_json::from_str(raw.get()).ok()?;
            let Some(date) = entry
                .get("expires")
                .and_then(Value::as_str)
                .and_then(|d| Date::parse(d).ok())
            else {
                continue;
            };
            if date.is_past(today) {
                past.push(i);
                gone.push(serde_json::json!({"section": ORDER[n], "entry": entry}));
            } else {
                next = Some(next.map_or(date, |d| d.min(date)));
            }
        }
        if !past.is_empty() {
            let kept = section_array(text, array, &entries, |i| !past.contains(&i), None)?;
            spans.push((span(text, array), kept));
        }
    }
    Some(Expiry {
        text: replace_spans(text, spans),
        gone,
        next,
    })
}

/// The text with `entry` appended to the section and the serial set.
pub fn append(text: &str, layout: &Layout<'_>, entry: &Value, serial: u64) -> Option<String> {
    let pretty = serde_json::to_string_pretty(entry).ok()?;
    splice(text, layout, |_| true, Some(&pretty), serial)
}

/// The text without the `matched` entries and with the serial set.
pub fn without(
    text: &str,
    layout: &Layout<'_>,
    matched: &[(usize, Value)],
    serial: u64,
) -> Option<String> {
    splice(
        text,
        layout,
        |i| !matched.iter().any(|(m, _)| *m == i),
        None,
        serial,
    )
}

/// The section's entries named `target` or covering exactly `target`, with their positions;
/// `None` if an entry that mentions it is not JSON.
pub fn matching(layout: &Layout<'_>, target: &str) -> Option<Vec<(usize, Value)>> {
    let mut matched = Vec::new();
    for (i, raw) in layout.entries.iter().enumerate() {
        if !raw.get().contains(target) {
            continue;
        }
        let entry: Value = serde_json::from_str(raw.get()).ok()?;
        if matches_target(&entry, target) {
            matched.push((i, entry));
        }
    }
    Some(matched)
}

/// Why a removal that matches nothing is refused.
pub fn no_entry(section: &str, target: &str) -> String {
    format!("no {section} entry named {target} or covering exactly {target}")
}

/// For the whole-registry path: the file's text with `entry` added to `section` and the
/// serial set, without building the document's tree (a GiB at a million entries). `None`
/// where the text does not splice (see `layout`): the document's tree it is, then.
pub fn splice_add(text: &str, section: &str, entry: &Value, serial: u64) -> Option<String> {
    append(text, &layout(text, section)?, entry, serial)
}

/// The same for removing the entries of `section` named `target` or covering exactly `target`;
/// `Some(Err)` if none does.
pub fn splice_remove(
    text: &str,
    section: &str,
    target: &str,
    serial: u64,
) -> Option<Result<String, TextError>> {
    let layout = layout(text, section)?;
    let matched = matching(&layout, target)?;
    if matched.is_empty() {
        return Some(Err(TextError::Refused(no_entry(section, target))));
    }
    without(text, &layout, &matched, serial).map(Ok)
}

/// The sections a live change may name, as the control protocol lists them.
pub const SECTIONS: [&str; 5] = ["networks", "devices", "deny", "vpn_endpoints", "upstreams"];

/// The section named `section`, or why there is none.
pub fn section_name(section: &str) -> Result<&'static str, TextError> {
    SECTIONS
        .into_iter()
        .find(|s| *s == section)
        .ok_or_else(|| TextError::UnknownSection(section.to_string()))
}

/// What names an entry in messages: its name, CIDR or address.
pub fn entry_label(entry: &Value) -> String {
    ["name", "cidr", "address"]
        .iter()
        .find_map(|k| entry.get(*k).and_then(Value::as_str))
        .unwrap_or("?")
        .to_string()
}

/// Whether `target` is the entry's name, CIDR or address.
pub fn matches_target(entry: &Value, target: &str) -> bool {
    ["name", "cidr", "address"]
        .iter()
        .any(|k| entry.get(*k).and_then(Value::as_str) == Some(target))
}

/// Why a change of the registry's text failed.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The change itself is refused (the message says why).
    #[error("{0}")]
    Refused(String),
    #[error("the registry is not a JSON object")]
    NotObject,
    #[error(
        "unknown section {0} (expected one of networks, devices, deny, vpn_endpoints, upstreams)"
    )]
    UnknownSection(String),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The text with `change` made to the document's tree and the serial set.
fn edit_tree(
    text: &str,
    serial: u64,
    change: impl FnOnce(&mut serde_json::Map<String, Value>) -> Result<(), TextError>,
) -> Result<String, TextError> {
    let mut doc: Value = serde_json::from_str(text)?;
    let object = doc.as_object_mut().ok_or(TextError::NotObject)?;
    change(object)?;
    object.insert("serial".into(), json!(serial));
    Ok(serde_json::to_string_pretty(&doc).expect("JSON serialises") + "\n")
}

/// A section's list in the document's tree, made an empty one if the file has none.
fn list<'a>(doc: &'a mut serde_json::Map<String, Value>, section: &str) -> &'a mut Vec<Value> {
    let value = doc.entry(section).or_insert_with(|| json!([]));
    if !value.is_array() {
        *value = json!([]);
    }
    value.as_array_mut().expect("just made an array")
}

/// The text with `entry` appended to `section` and the serial set.
pub fn with_entry(
    text: &str,
    section: &str,
    entry: &Value,
    serial: u64,
) -> Result<String, TextError> {
    if !entry.is_object() {
        return Err(TextError::Refused(
            "the entry must be a JSON object with the registry's fields".to_string(),
        ));
    }
    if let Some(spliced) = splice_add(text, section, entry, serial) {
        return Ok(spliced);
    }
    edit_tree(text, serial, |doc| {
        list(doc, section).push(entry.clone());
        Ok(())
    })
}

/// The text without the entries of `section` named `target` or covering exactly `target`, and
/// with the serial set; an error if none does.
pub fn without_entry(
    text: &str,
    section: &str,
    target: &str,
    serial: u64,
) -> Result<String, TextError> {
    if let Some(spliced) = splice_remove(text, section, target, serial) {
        return spliced;
    }
    edit_tree(text, serial, |doc| {
        let entries = list(doc, section);
        let before = entries.len();
        entries.retain(|e| !matches_target(e, target));
        if entries.len() == before {
            return Err(TextError::Refused(no_entry(section, target)));
        }
        Ok(())
    })
}

/// The text with the mode and the serial set.
pub fn with_mode(text: &str, mode: Mode, serial: u64) -> Result<String, TextError> {
    if let Some(spliced) = splice_mode(text, mode, serial) {
        return Ok(spliced);
    }
    edit_tree(text, serial, |doc| {
        doc.insert("mode".into(), json!(mode.as_str()));
        Ok(())
    })
}

/// The text with the egress mode set and the serial set.
pub fn with_egress(text: &str, egress: EgressMode, serial: u64) -> Result<String, TextError> {
    if let Some(spliced) = splice_egress(text, egress, serial) {
        return Ok(spliced);
    }
    edit_tree(text, serial, |doc| {
        doc.insert("egress".into(), json!(egress.as_str()));
        Ok(())
    })
}

/// An entry's `expires` date, if it has a valid one.
fn expiry_date(entry: &Value) -> Option<Date> {
    entry
        .get("expires")
        .and_then(Value::as_str)
        .and_then(|d| Date::parse(d).ok())
}

/// The text without the entries whose expiry date is past on `today`, and with the serial set.
pub fn without_expired(text: &str, today: Date, serial: u64) -> Result<Expiry, TextError> {
    if let Some(expiry) = splice_expired(text, today, serial) {
        return Ok(expiry);
    }
    let mut gone = Vec::new();
    let mut next: Option<Date> = None;
    let text = edit_tree(text, serial, |doc| {
        for section in ORDER {
            let Some(entries) = doc.get_mut(section).and_then(Value::as_array_mut) else {
                continue;
            };
            entries.retain(|entry| match expiry_date(entry) {
                Some(date) if date.is_past(today) => {
                    gone.push(json!({"section": section, "entry": entry}));
                    false
                }
                Some(date) => {
                    next = Some(next.map_or(date, |d| d.min(date)));
                    true
                }
                None => true,
            });
        }
        Ok(())
    })?;
    Ok(Expiry { text, gone, next })
}

#[cfg(test)]
mod tests;
