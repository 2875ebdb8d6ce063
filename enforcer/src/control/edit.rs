//! Live changes of single entries without re-reading the whole registry. A change is checked
//! against the policy in force, made to it in place (`Policy::edit`), and spliced into the
//! file's text; at a million entries that takes a fraction of a second where the whole-registry
//! path (parse, validate, compile and diff everything) takes seconds and a second policy's
//! memory. Whatever this path cannot decide exactly as the whole-registry path would goes that
//! path instead (`Plan::Full`): a possible duplicate name or prefix (for its exact message),
//! expired entries still in the file, deny feeds beside a deny change, escapes in the section's
//! text, a section the file does not have yet.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, value::RawValue};

use crate::{
    policy::{CompiledRule, Policy, RuleKind},
    registry::{Date, Registry, SCHEMA_VERSION},
};

/// What to do with a request.
#[derive(Debug)]
pub enum Plan {
    /// Take the whole-registry path.
    Full,
    /// Refused, with the reason; nothing changed.
    Refused(String),
    /// Made in place.
    Edit(Edit),
}

/// A change made in place: the policy's edit and the file's new text.
#[derive(Debug)]
pub struct Edit {
    pub text: String,
    pub add: Option<CompiledRule>,
    pub remove: Vec<u32>,
    /// The added entry's expiry date.
    pub expires: Option<Date>,
    pub what: String,
}

/// The sections in the order the registry numbers its entries for its checks across them.
const ORDER: [&str; 4] = ["networks", "devices", "vpn_endpoints", "deny"];

/// Where a section's entries and the serial are in the file's text.
struct Layout<'a> {
    array: &'a RawValue,
    entries: Vec<&'a RawValue>,
    serial: SerialAt<'a>,
    /// Every section's array, in `ORDER`.
    sections: [Option<&'a RawValue>; 4],
}

/// The top level of a registry file: where each section's array, the serial and the mode are.
struct Top<'a> {
    /// In `ORDER`.
    sections: [Option<&'a RawValue>; 4],
    serial: Option<&'a RawValue>,
    mode: Option<&'a RawValue>,
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
        serial: Option<&'a RawValue>,
        #[serde(borrow)]
        mode: Option<&'a RawValue>,
    }
    let raw: Raw<'_> = serde_json::from_str(text).ok()?;
    Some(Top {
        sections: [raw.networks, raw.devices, raw.vpn_endpoints, raw.deny],
        serial: raw.serial,
        mode: raw.mode,
    })
}

/// A section's entries, from its array's text; `None` if the text has escapes, which would let
/// a value differ from its text (the searches here read the text).
fn entries(array: &RawValue) -> Option<Vec<&RawValue>> {
    if array.get().contains('\\') {
        return None;
    }
    serde_json::from_str(array.get()).ok()
}

fn layout<'a>(text: &'a str, section: &str) -> Option<Layout<'a>> {
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
pub fn splice_mode(text: &str, mode: crate::registry::Mode, serial: u64) -> Option<String> {
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
fn append(text: &str, layout: &Layout<'_>, entry: &Value, serial: u64) -> Option<String> {
    let pretty = serde_json::to_string_pretty(entry).ok()?;
    splice(text, layout, |_| true, Some(&pretty), serial)
}

/// The text without the `matched` entries and with the serial set.
fn without(
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
fn matching(layout: &Layout<'_>, target: &str) -> Option<Vec<(usize, Value)>> {
    let mut matched = Vec::new();
    for (i, raw) in layout.entries.iter().enumerate() {
        if !raw.get().contains(target) {
            continue;
        }
        let entry: Value = serde_json::from_str(raw.get()).ok()?;
        if super::matches_target(&entry, target) {
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
) -> Option<Result<String, String>> {
    let layout = layout(text, section)?;
    let matched = matching(&layout, target)?;
    if matched.is_empty() {
        return Some(Err(no_entry(section, target)));
    }
    without(text, &layout, &matched, serial).map(Ok)
}

/// Deny feeds interact with deny entries (a feed range equal to a deny entry is left out):
/// changes of the deny section go the whole way while any feed is loaded.
fn feeds_loaded(policy: &Policy) -> bool {
    policy.feed_duplicates > 0 || policy.rules.iter().any(|r| r.kind == RuleKind::DenyFeed)
}

/// The message of a refused registry, as the whole-registry path words it.
pub fn refusal(problems: &[crate::registry::Problem]) -> String {
    let list: Vec<String> = problems
        .iter()
        .map(|p| match &p.file {
            Some(file) => format!("{file}:{}: {}", p.line, p.message),
            None if p.place.is_empty() => p.message.clone(),
            None => format!("{}: {}", p.place, p.message),
        })
        .collect();
    format!("refused, nothing changed: {}", list.join("; "))
}

/// Adding `entry` to `section` of the registry whose file text is `text` (and whose policy in
/// force is `policy`), as change number `serial`.
pub fn plan_add(
    policy: &Policy,
    text: &str,
    section: &'static str,
    entry: &Value,
    serial: u64,
    today: Date,
) -> Plan {
    if !entry.is_object() || !policy.expired.is_empty() || section == "deny" && feeds_loaded(policy)
    {
        return Plan::Full;
    }
    let Some(layout) = layout(text, section) else {
        return Plan::Full;
    };
    // The entry alone, through the registry's own checks.
    let alone = serde_json::json!({
        "schema": SCHEMA_VERSION, "mode": policy.mode.as_str(), section: [entry],
    });
    let registry = match Registry::parse_at(&alone.to_string(), Path::new("/nonexistent")) {
        Ok(registry) => registry,
        Err(mut problems) => {
            // Named by its place in the file, as the whole-registry path names it.
            let here = format!("{section}[{}]", layout.entries.len());
            for p in &mut problems {
                if let Some(rest) = p.place.strip_prefix(&format!("{section}[0]")) {
                    p.place = format!("{here}{rest}");
                }
            }
            return Plan::Refused(refusal(&problems));
        }
    };
    let Ok(mut compiled) = Policy::compile(&registry, today) else {
        return Plan::Full;
    };
    if compiled.rules.len() != 1 {
        // Expired on arrival: recorded as expired by the whole-registry path.
        return Plan::Full;
    }
    let rule = compiled.rules.remove(0);
    // Unique names across the registry and unique prefixes per list: any rule that might repeat
    // one sends the request the whole way, for its exact message. (An unnamed deny rule is
    // named by its prefix here, so this errs on the side of the whole way.)
    let name = match section {
        "deny" => registry.deny.first().and_then(|d| d.name.clone()),
        _ => Some(rule.name.to_string()),
    };
    let allow = |k: RuleKind| matches!(k, RuleKind::Network | RuleKind::Device);
    let deny = |k: RuleKind| matches!(k, RuleKind::Deny | RuleKind::DenyFeed);
    let name_repeats = name.as_deref().is_some_and(|name| {
        policy
            .rules
            .iter()
            .any(|r| r.kind != RuleKind::DenyFeed && &*r.name == name)
    });
    let prefix_repeats = rule.kind != RuleKind::VpnEndpoint
        && policy.rules.iter().any(|r| {
            r.prefix == rule.prefix
                && (allow(r.kind) && allow(rule.kind) || deny(r.kind) && deny(rule.kind))
        });
    if name_repeats || prefix_repeats {
        let repeats = (name_repeats, prefix_repeats);
        return match repeat_problems(&layout, section, name.as_deref(), repeats, &rule) {
            Some(problems) => Plan::Refused(refusal(&problems)),
            None => Plan::Full,
        };
    }
    let expires = registry
        .networks
        .first()
        .map(|n| n.expires)
        .or_else(|| registry.devices.first().map(|d| d.expires))
        .or_else(|| registry.vpn_endpoints.first().map(|v| v.expires))
        .or_else(|| registry.deny.first().map(|d| d.expires))
        .flatten();
    let Some(text) = append(text, &layout, entry, serial) else {
        return Plan::Full;
    };
    Plan::Edit(Edit {
        text,
        add: Some(rule),
        remove: Vec::new(),
        expires,
        what: format!("added {section} entry {}", super::entry_label(entry)),
    })
}

/// The problems the whole-registry path reports for a new entry (`rule`, named `entry_name`, to be
/// appended to `section`) whose name or prefix an entry of the file has: each names the first
/// entry with the value, in the order the registry numbers entries across sections. `None`
/// where that takes the whole path to tell: the other user comes later in that order (the
/// problem is then reported on it), or is not found in the text as written.
fn repeat_problems(
    layout: &Layout<'_>,
    section: &'static str,
    entry_name: Option<&str>,
    (name_repeats, prefix_repeats): (bool, bool),
    rule: &CompiledRule,
) -> Option<Vec<crate::registry::Problem>> {
    let own = ORDER.iter().position(|s| *s == section)?;
    // The first entry, in sections up to the entry's own, whose `field` text holds `needle`
    // and satisfies `same`.
    let first_user = |sections: &[usize], needle: &str, same: &dyn Fn(&str, &Value) -> bool| {
        for &n in sections.iter().filter(|n| **n <= own) {
            let Some(array) = layout.sections[n] else {
                continue;
            };
            let entries = entries(array)?;
            for (i, raw) in entries.iter().enumerate() {
                if raw.get().contains(needle)
                    && serde_json::from_str::<Value>(raw.get()).is_ok_and(|v| same(ORDER[n], &v))
                {
                    return Some(format!("{}[{i}]", ORDER[n]));
                }
            }
        }
        None
    };
    let here = format!("{section}[{}]", layout.entries.len());
    let mut problems = Vec::new();
    let problem = |place: String, message: String| crate::registry::Problem {
        file: None,
        line: 0,
        column: 0,
        place,
        message,
    };
    if name_repeats {
        let name = entry_name?;
        let named = |_: &str, v: &Value| v.get("name").and_then(Value::as_str) == Some(name);
        let everywhere = [0, 1, 2, 3];
        let there = first_user(&everywhere, name, &named)?;
        problems.push(problem(
            format!("{here} \"{name}\" field \"name\""),
            format!("duplicate name \"{name}\", already used by {there}"),
        ));
    }
    if prefix_repeats {
        let prefix_of = |section: &str, v: &Value| -> Option<ipnet::IpNet> {
            let field = |k: &str| v.get(k).and_then(Value::as_str);
            if section == "devices" {
                field("address")?
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(ipnet::IpNet::from)
            } else {
                field("cidr")?.parse().ok()
            }
        };
        let same = |section: &str, v: &Value| prefix_of(section, v) == Some(rule.prefix);
        let (lists, needle): (&[usize], String) = if rule.kind == RuleKind::Deny {
            (&[3], rule.prefix.to_string())
        } else if rule.kind == RuleKind::Device {
            (&[0, 1], rule.prefix.addr().to_string())
        } else {
            (&[0, 1], rule.prefix.to_string())
        };
        let there = first_user(lists, &needle, &same)?;
        problems.push(problem(
            format!(
                "{here}{}",
                entry_name.map(|n| format!(" \"{n}\"")).unwrap_or_default()
            ),
            format!("prefix {} is already listed by {there}", rule.prefix),
        ));
    }
    Some(problems)
}

/// Removing the entries of `section` named `target` or covering exactly `target`.
pub fn plan_remove(
    policy: &Policy,
    text: &str,
    section: &'static str,
    target: &str,
    serial: u64,
) -> Plan {
    if !policy.expired.is_empty() || section == "deny" && feeds_loaded(policy) {
        return Plan::Full;
    }
    let Some(layout) = layout(text, section) else {
        return Plan::Full;
    };
    let Some(matched) = matching(&layout, target) else {
        return Plan::Full;
    };
    if matched.is_empty() {
        return Plan::Refused(no_entry(section, target));
    }
    // Each matched entry's rule: same kind, prefix and name.
    let mut remove = Vec::new();
    for (_, entry) in &matched {
        let field = |k: &str| entry.get(k).and_then(Value::as_str);
        let prefix = match section {
            "devices" => field("address")
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .map(ipnet::IpNet::from),
            _ => field(if section == "vpn_endpoints" {
                "address"
            } else {
                "cidr"
            })
            .and_then(|c| {
                c.parse::<ipnet::IpNet>()
                    .ok()
                    .or_else(|| c.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
            }),
        };
        let (kind, name) = match section {
            "networks" => (RuleKind::Network, field("name").map(str::to_string)),
            "devices" => (RuleKind::Device, field("name").map(str::to_string)),
            "vpn_endpoints" => (RuleKind::VpnEndpoint, field("name").map(str::to_string)),
            _ => (
                RuleKind::Deny,
                field("name")
                    .map(str::to_string)
                    .or_else(|| prefix.map(|p| p.to_string())),
            ),
        };
        let (Some(prefix), Some(name)) = (prefix, name) else {
            return Plan::Full;
        };
        match policy
            .rules
            .iter()
            .find(|r| r.kind == kind && r.prefix == prefix && *r.name == *name)
        {
            Some(rule) => remove.push(rule.index),
            None => return Plan::Full,
        }
    }
    let Some(text) = without(text, &layout, &matched, serial) else {
        return Plan::Full;
    };
    Plan::Edit(Edit {
        text,
        add: None,
        remove,
        expires: None,
        what: format!("removed {section} entry {target}"),
    })
}

#[cfg(test)]
mod tests {
    //! The in-place path against the whole-registry path, on random changes of a registry: the
    //! same refusals, the same file (as a parsed registry) and the same policy (as entries and
    //! what the kernel holds for them; rule numbers may differ).

    use std::collections::BTreeSet;

    use serde_json::{Value, json};

    use super::{Plan, plan_add, plan_remove};
    use crate::{
        policy::Policy,
        registry::{Date, Registry},
    };

    /// A small deterministic generator (xorshift), so a failure repeats.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    const NAMES: [&str; 12] = [
        "a", "b", "c", "d", "e", "f", "lan", "hq", "gw", "x-1", "y", "z",
    ];
    const CIDRS: [&str; 14] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.2.0.0/16",
        "10.3.0.0/16",
        "198.51.100.0/24",
        "198.51.100.128/25",
        "203.0.113.0/24",
        "2001:db8::/32",
        "2001:db8:1::/48",
        "2001:db8:2::/48",
        "10.0.0.1/33",
        "10.0.0.1/8",
        "not-a-prefix",
    ];
    const ADDRESSES: [&str; 7] = [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "2001:db8::5",
        "10.1.2.3",
        "10.2.3.4",
        "300.1.1.1",
    ];

    fn random_change(rng: &mut Rng) -> (&'static str, Result<Value, String>) {
        let section = rng.pick(&["networks", "devices", "deny", "vpn_endpoints"]);
        let section: &'static str = match section {
            "networks" => "networks",
            "devices" => "devices",
            "deny" => "deny",
            _ => "vpn_endpoints",
        };
        if rng.below(4) == 0 {
            let target = match rng.below(3) {
                0 => rng.pick(&NAMES),
                1 => rng.pick(&CIDRS),
                _ => rng.pick(&ADDRESSES),
            };
            return (section, Err(target.to_string()));
        }
        let mut entry = json!({"name": rng.pick(&NAMES)});
        match section {
            "networks" => entry["cidr"] = json!(rng.pick(&CIDRS)),
            "devices" => entry["address"] = json!(rng.pick(&ADDRESSES)),
            "deny" => {
                entry["cidr"] = json!(rng.pick(&CIDRS));
                if rng.below(2) == 0 {
                    entry.as_object_mut().expect("object").remove("name");
                }
            }
            _ => {
                entry["address"] = json!(rng.pick(&ADDRESSES));
                entry["protocol"] = json!(rng.pick(&["wireguard", "openvpn", "ipsec", "nope"]));
                entry["approval"] = json!("NITB-2026-0001");
                if rng.below(2) == 0 {
                    entry["port"] = json!(51820);
                }
            }
        }
        if section != "deny" && section != "vpn_endpoints" && rng.below(3) == 0 {
            entry["ports"] = json!([rng.pick(&["443/tcp", "53/udp", "icmp", "70000/tcp"])]);
        }
        if rng.below(4) == 0 {
            entry["expires"] = json!(rng.pick(&["2099-01-01", "2030-02-30"]));
        }
        if rng.below(10) == 0 {
            entry["unknown_field"] = json!(1);
        }
        (section, Ok(entry))
    }

    /// The whole-registry path: the document edited as a tree, written pretty, parsed and
    /// compiled against the policy in force.
    fn whole(
        text: &str,
        policy: &Policy,
        section: &str,
        change: &Result<Value, String>,
        today: Date,
    ) -> Result<(String, Policy), String> {
        let mut doc: Value = serde_json::from_str(text).expect("our own text");
        let list = doc[section].as_array_mut().expect("sections exist");
        match change {
            Ok(entry) => list.push(entry.clone()),
            Err(target) => {
                let before = list.len();
                list.retain(|e| !super::super::matches_target(e, target));
                if list.len() == before {
                    return Err(format!(
                        "no {section} entry named {target} or covering exactly {target}"
                    ));
                }
            }
        }
        doc["serial"] = json!(doc["serial"].as_u64().unwrap_or(0) + 1);
        let text = serde_json::to_string_pretty(&doc).expect("JSON") + "\n";
        let registry = Registry::parse(&text).map_err(|p| super::refusal(&p))?;
        let policy =
            Policy::from_registry(registry, today, Some(policy)).map_err(|e| e.to_string())?;
        Ok((text, policy))
    }

    /// A policy as what it holds, without rule numbers.
    fn shape(policy: &Policy) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
        let key_of = |index: u32| policy.rule(index).map(|r| format!("{:?}", r.key()));
        let rules = policy
            .rules
            .iter()
            .map(|r| {
                format!(
                    "{:?} {} {} {:?} {:?}",
                    r.kind, r.name, r.prefix, r.ports, r.vpn
                )
            })
            .collect();
        let ports = policy
            .port_keys
            .iter()
            .map(|k| format!("{:?} {} {:?}", key_of(k.rule), k.proto, k.port_be))
            .collect();
        let groups = policy
            .vpn_groups
            .iter()
            .flat_map(|(prefix, approvals)| {
                approvals
                    .iter()
                    .map(move |a| (*prefix, a.rule, a.protocol, a.port_be))
            })
            .map(|(prefix, rule, protocol, port)| {
                format!("{prefix} {:?} {protocol} {port:?}", key_of(rule))
            })
            .collect();
        (rules, ports, groups)
    }

    #[test]
    fn in_place_changes_match_the_whole_registry_path() {
        let today = Date::parse("2026-11-27").expect("date");
        let start = json!({
            "schema": 1, "mode": "enforce", "serial": 7,
            "networks": [{"name": "seed-net", "cidr": "172.16.0.0/12"}],
            "devices": [{"name": "seed-dev", "address": "192.0.2.99"}],
            "vpn_endpoints": [{"name": "seed-vpn", "address": "192.0.2.7", "protocol": "wireguard", "approval": "NITB-1"}],
            "deny": [{"cidr": "203.0.113.0/24"}]
        });
        let mut outcomes = [0usize; 3];
        // Refusals of a repeated name or prefix, worded in place.
        let mut repeats = 0;
        for seed in 1..=40u64 {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
            // Half the files have no serial yet (the first change writes one).
            let mut first = start.clone();
            if seed % 2 == 0 {
                first.as_object_mut().expect("object").remove("serial");
            }
            let mut text = serde_json::to_string_pretty(&first).expect("JSON") + "\n";
            let mut policy =
                Policy::compile(&Registry::parse(&text).expect("valid"), today).expect("compiles");
            for step in 0..30 {
                let (section, change) = random_change(&mut rng);
                let serial = Registry::parse(&text).expect("valid").serial + 1;
                let plan = match &change {
                    Ok(entry) => plan_add(&policy, &text, section, entry, serial, today),
                    Err(target) => plan_remove(&policy, &text, section, target, serial),
                };
                let reference = whole(&text, &policy, section, &change, today);
                let at = format!("seed {seed} step {step}: {section} {change:?}");
                match plan {
                    Plan::Full => {
                        outcomes[0] += 1;
                        if let Ok((t, p)) = reference {
                            (text, policy) = (t, p);
                        }
                    }
                    Plan::Refused(message) => {
                        outcomes[1] += 1;
                        if message.contains("already") {
                            repeats += 1;
                        }
                        match reference {
                            Err(whole) => assert_eq!(message, whole, "{at}: the refusal"),
                            Ok(_) => panic!("{at}: refused in place ({message}), accepted whole"),
                        }
                    }
                    Plan::Edit(edit) => {
                        outcomes[2] += 1;
                        let before = policy.clone();
                        let edited = policy.edit(edit.add, &edit.remove);
                        let (whole_text, whole_policy) = match (edited, reference) {
                            (Ok(_), Ok(r)) => r,
                            (Err(_), Err(_)) => {
                                assert_eq!(policy, before, "{at}: a failed edit changes nothing");
                                continue;
                            }
                            (edited, reference) => panic!(
                                "{at}: in place {:?}, whole {:?}",
                                edited.map(|_| ()),
                                reference.map(|_| ())
                            ),
                        };
                        assert_eq!(
                            Registry::parse(&edit.text).map_err(|p| format!("{p:?}")),
                            Registry::parse(&whole_text).map_err(|p| format!("{p:?}")),
                            "{at}: the file\n{}",
                            edit.text
                        );
                        assert_eq!(shape(&policy), shape(&whole_policy), "{at}: the policy");
                        let numbers: Vec<u32> = policy.rules.iter().map(|r| r.index).collect();
                        assert!(
                            numbers.windows(2).all(|w| w[0] < w[1]),
                            "{at}: rule numbers sorted and unique: {numbers:?}"
                        );
                        let kept = before
                            .rules
                            .iter()
                            .filter(|r| policy.rule(r.index).is_some_and(|n| n.key() == r.key()))
                            .count();
                        assert!(
                            kept + edit.remove.len() >= before.rules.len(),
                            "{at}: entries kept keep their numbers"
                        );
                        text = edit.text;
                    }
                }
            }
        }
        let [full, refused, edited] = outcomes;
        assert!(
            edited > 300 && refused > 100 && repeats > 50 && full > 30,
            "each way taken often enough to mean something: {full} whole, {refused} refused ({repeats} repeats), {edited} in place"
        );
    }

    /// The mode and the expiry sweep, spliced, against the document tree edited.
    #[test]
    fn mode_and_expiry_splices_match_the_document_tree() {
        use crate::registry::Mode;
        let today = Date::parse("2026-11-27").expect("date");
        let dates = [
            "2026-11-26",
            "2026-11-27",
            "2026-11-28",
            "2099-01-01",
            "2020-01-01",
        ];
        for seed in 1..=30u64 {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ seed);
            let mut doc = json!({
                "schema": 1, "mode": "monitor", "serial": seed,
                "networks": [], "devices": [], "vpn_endpoints": [], "deny": []
            });
            for i in 0..rng.below(12) {
                let section = rng.pick(&["networks", "devices", "vpn_endpoints", "deny"]);
                let mut entry = match section {
                    "networks" => {
                        json!({"name": format!("n{i}"), "cidr": format!("10.{i}.0.0/16")})
                    }
                    "devices" => {
                        json!({"name": format!("d{i}"), "address": format!("192.0.2.{i}")})
                    }
                    "vpn_endpoints" => json!({"name": format!("v{i}"), "address": "192.0.2.200",
                        "protocol": "wireguard", "approval": "NITB-1"}),
                    _ => json!({"cidr": format!("203.0.{i}.0/24")}),
                };
                if rng.below(2) == 0 {
                    entry["expires"] = json!(rng.pick(&dates));
                }
                doc[section].as_array_mut().expect("array").push(entry);
            }
            let text = serde_json::to_string_pretty(&doc).expect("JSON");
            let parse = |t: &str| Registry::parse(t).map_err(|p| format!("{p:?}"));

            let mut by_tree = doc.clone();
            by_tree["mode"] = json!("enforce");
            by_tree["serial"] = json!(seed + 1);
            let spliced = super::splice_mode(&text, Mode::Enforce, seed + 1).expect("splices");
            assert_eq!(
                parse(&spliced),
                parse(&serde_json::to_string(&by_tree).expect("JSON")),
                "seed {seed}: mode"
            );

            let expiry = super::splice_expired(&text, today, seed + 1).expect("splices");
            let past = |e: &Value| {
                e.get("expires")
                    .and_then(Value::as_str)
                    .and_then(|d| Date::parse(d).ok())
                    .is_some_and(|d| d.is_past(today))
            };
            let mut by_tree = doc.clone();
            let mut gone = Vec::new();
            for section in ["networks", "devices", "vpn_endpoints", "deny"] {
                let list = by_tree[section].as_array_mut().expect("array");
                gone.extend(
                    list.iter()
                        .filter(|e| past(e))
                        .map(|e| json!({"section": section, "entry": e})),
                );
                list.retain(|e| !past(e));
            }
            by_tree["serial"] = json!(seed + 1);
            let left = parse(&expiry.text).expect("valid");
            assert_eq!(
                Ok(left.clone()),
                parse(&serde_json::to_string(&by_tree).expect("JSON")),
                "seed {seed}: expiry"
            );
            assert_eq!(expiry.gone, gone, "seed {seed}: what expired");
            assert_eq!(
                expiry.next,
                crate::control::next_expiry(&left),
                "seed {seed}: the next date"
            );
        }
        // A file without a serial gets one after its mode; one without a mode does not splice.
        let no_serial = r#"{"schema": 1, "mode": "enforce", "networks": [{"name": "a", "cidr": "10.0.0.0/8", "expires": "2020-01-01"}]}"#;
        let moded = super::splice_mode(no_serial, Mode::Monitor, 1).expect("splices");
        let parsed = Registry::parse(&moded).expect("valid");
        assert_eq!((parsed.mode, parsed.serial), (Mode::Monitor, 1));
        let expired = super::splice_expired(no_serial, today, 1).expect("splices");
        let parsed = Registry::parse(&expired.text).expect("valid");
        assert_eq!((parsed.networks.len(), parsed.serial), (0, 1));
        assert!(super::splice_mode(r#"{"schema": 1}"#, Mode::Monitor, 1).is_none());
    }
}
