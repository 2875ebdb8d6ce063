//! Live changes of single entries without re-reading the whole registry. A change is checked
//! against the policy in force, made to it in place (`Policy::edit`), and spliced into the
//! file's text; at a million entries that takes a fraction of a second where the whole-registry
//! path (parse, validate, compile and diff everything) takes seconds and a second policy's
//! memory. Whatever this path cannot decide exactly as the whole-registry path would goes that
//! path instead (`Plan::Full`): a possible duplicate name or prefix (for its exact message),
//! expired entries still in the file, deny feeds beside a deny change, escapes in the section's
//! text, a section the file does not have yet.

use std::path::Path;

use serde_json::Value;

use crate::{
    policy::{CompiledRule, Extra, Policy, RuleKind},
    registry::{
        Date, Problem, Registry, SCHEMA_VERSION, refusal,
        text::{self as splice, Layout, ORDER},
    },
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
    /// The added entry's expiry date and ministry.
    pub extra: Extra,
    pub what: String,
}

/// The sections in the order the registry numbers its entries for its checks across them.
/// Deny feeds interact with deny entries (a feed range equal to a deny entry is left out):
/// changes of the deny section go the whole way while any feed is loaded.
fn feeds_loaded(policy: &Policy) -> bool {
    policy.feed_duplicates > 0 || policy.rules.iter().any(|r| r.kind == RuleKind::DenyFeed)
}
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
    let Some(layout) = splice::layout(text, section) else {
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
    let prefix_repeats = rule.kind.is_source()
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
    // The compiled policy of the entry alone holds its extra.
    let extra = compiled
        .extras
        .pop()
        .map(|(_, extra)| extra)
        .unwrap_or_default();
    let Some(text) = splice::append(text, &layout, entry, serial) else {
        return Plan::Full;
    };
    Plan::Edit(Edit {
        text,
        add: Some(rule),
        remove: Vec::new(),
        extra,
        what: format!("added {section} entry {}", splice::entry_label(entry)),
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
) -> Option<Vec<Problem>> {
    let own = ORDER.iter().position(|s| *s == section)?;
    // The first entry, in sections up to the entry's own, whose `field` text holds `needle`
    // and satisfies `same`.
    let first_user = |sections: &[usize], needle: &str, same: &dyn Fn(&str, &Value) -> bool| {
        for &n in sections.iter().filter(|n| **n <= own) {
            let Some(array) = layout.sections[n] else {
                continue;
            };
            let entries = splice::entries(array)?;
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
    let problem = |place: String, message: String| Problem {
        file: None,
        line: 0,
        column: 0,
        place,
        message,
    };
    if name_repeats {
        let name = entry_name?;
        let named = |_: &str, v: &Value| v.get("name").and_then(Value::as_str) == Some(name);
        let everywhere = [0, 1, 2, 3, 4];
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
    let Some(layout) = splice::layout(text, section) else {
        return Plan::Full;
    };
    let Some(matched) = splice::matching(&layout, target) else {
        return Plan::Full;
    };
    if matched.is_empty() {
        return Plan::Refused(splice::no_entry(section, target));
    }
    // Each matched entry's rule: same kind, prefix and name.
    let mut remove = Vec::new();
    for (_, entry) in &matched {
        let field = |k: &str| entry.get(k).and_then(Value::as_str);
        let prefix = match section {
            "devices" => field("address")
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .map(ipnet::IpNet::from),
            _ => match section {
                "vpn_endpoints" => field("address"),
                "upstreams" => field("cidr").or_else(|| field("address")),
                _ => field("cidr"),
            }
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
            "upstreams" => (RuleKind::Upstream, field("name").map(str::to_string)),
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
    let Some(text) = splice::without(text, &layout, &matched, serial) else {
        return Plan::Full;
    };
    Plan::Edit(Edit {
        text,
        add: None,
        remove,
        extra: Extra::default(),
        what: format!("removed {section} entry {target}"),
    })
}

#[cfg(test)]
mod tests;
