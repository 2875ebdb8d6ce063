//! What moves the kernel's maps from one compiled policy to the next: the rules to write and to
//! clear, the port keys to add and to remove, and where the source tables change. Pure: the
//! datapath writes a diff in the order that never drops what both policies allow
//! (`Datapath::apply_diff`); this module only says what the difference is.

use std::collections::HashSet;

use enforcer_common::{PortKey, Rule};
use ipnet::IpNet;

use super::{CompiledRule, Policy, RuleChange};
use crate::registry::{EgressMode, Mode};

/// Where the source lookup tables change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceChange {
    /// Only inside these prefixes (of the source rules added and removed).
    Within(Vec<IpNet>),
    Unchanged,
}

/// What moves the maps from one policy to the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDiff {
    /// The mode the maps hold before.
    pub old_mode: Mode,
    /// The egress mode the maps hold before.
    pub old_egress: EgressMode,
    /// Numbers of new rules (their hit counters start afresh).
    pub fresh: Vec<u32>,
    /// Rules to write: new ones, and those whose record changed.
    pub flagged: Vec<(u32, Rule)>,
    /// Numbers of rules gone.
    pub gone: Vec<u32>,
    pub ports_added: Vec<PortKey>,
    pub ports_removed: Vec<PortKey>,
    pub sources: SourceChange,
}

/// A policy's rules in number order (as compiled; sorted here if not).
fn by_number(policy: &Policy) -> Vec<&CompiledRule> {
    let mut rules: Vec<&CompiledRule> = policy.rules.iter().collect();
    if !rules.is_sorted_by_key(|r| r.index) {
        rules.sort_by_key(|r| r.index);
    }
    rules
}

impl PolicyDiff {
    /// The difference between `old` (what the maps hold) and `new`.
    pub fn between(old: &Policy, new: &Policy) -> Self {
        // A rule is its entry and its number: a changed entry comes with a fresh number (see
        // `Policy::compile_after`), so it is written beside the old one, not over it. Both lists
        // are walked once in number order (no maps: at a million rules those cost 100 MB and a
        // second); a number both have is the same rule if its key is the same.
        // The source tables change only inside the prefixes of rules gone or new.
        let (olds, news) = (by_number(old), by_number(new));
        let (mut fresh, mut flagged, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        let mut moved = Vec::new();
        let mut source = |rule: &CompiledRule| {
            if rule.kind.is_source() {
                moved.push(rule.prefix);
            }
        };
        let (mut i, mut j) = (0, 0);
        loop {
            match (olds.get(i), news.get(j)) {
                (Some(o), Some(n)) if o.index == n.index && o.key() == n.key() => {
                    if o.record() != n.record() {
                        flagged.push((n.index, n.record()));
                    }
                    (i, j) = (i + 1, j + 1);
                }
                (Some(o), Some(n)) if o.index == n.index => {
                    gone.push(o.index);
                    fresh.push(n.index);
                    flagged.push((n.index, n.record()));
                    source(o);
                    source(n);
                    (i, j) = (i + 1, j + 1);
                }
                (Some(o), Some(n)) if o.index < n.index => {
                    gone.push(o.index);
                    source(o);
                    i += 1;
                }
                (Some(o), None) => {
                    gone.push(o.index);
                    source(o);
                    i += 1;
                }
                (_, Some(n)) => {
                    fresh.push(n.index);
                    flagged.push((n.index, n.record()));
                    source(n);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        drop((olds, news));
        let old_ports: HashSet<PortKey> = old.port_keys.iter().copied().collect();
        let new_ports: HashSet<PortKey> = new.port_keys.iter().copied().collect();
        Self {
            old_mode: old.mode,
            old_egress: old.egress,
            fresh,
            flagged,
            gone,
            ports_added: new_ports.difference(&old_ports).copied().collect(),
            ports_removed: old_ports.difference(&new_ports).copied().collect(),
            sources: if moved.is_empty() {
                SourceChange::Unchanged
            } else {
                SourceChange::Within(moved)
            },
        }
    }

    /// The diff of an in-place edit (`Policy::edit`) of a policy in `modes` (ingress, egress).
    pub fn of_change(change: &RuleChange, modes: (Mode, EgressMode)) -> Self {
        Self::of_edit(
            modes,
            [&change.added, &change.removed],
            [&change.ports_added, &change.ports_removed],
            change,
        )
    }

    /// The diff that takes an applied in-place edit back.
    pub fn of_undo(change: &RuleChange, modes: (Mode, EgressMode)) -> Self {
        Self::of_edit(
            modes,
            [&change.removed, &change.added],
            [&change.ports_removed, &change.ports_added],
            change,
        )
    }

    fn of_edit(
        (mode, egress): (Mode, EgressMode),
        [added, removed]: [&Vec<CompiledRule>; 2],
        [ports_added, ports_removed]: [&Vec<PortKey>; 2],
        change: &RuleChange,
    ) -> Self {
        Self {
            old_mode: mode,
            old_egress: egress,
            fresh: added.iter().map(|r| r.index).collect(),
            flagged: added.iter().map(|r| (r.index, r.record())).collect(),
            gone: removed.iter().map(|r| r.index).collect(),
            ports_added: ports_added.clone(),
            ports_removed: ports_removed.clone(),
            sources: if change.touches_sources() {
                SourceChange::Within(change.source_prefixes())
            } else {
                SourceChange::Unchanged
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! A diff written onto what the maps hold for one policy gives what they hold for the next.

    use std::collections::{BTreeMap, BTreeSet};

    use enforcer_common::{PortKey, Rule};
    use ipnet::IpNet;

    use super::{PolicyDiff, SourceChange};
    use crate::{
        policy::Policy,
        registry::{Date, Registry},
        test_rng::Rng,
    };

    /// A port key as a comparable tuple: (rule, protocol, port in wire order).
    type Port = (u32, u8, [u8; 2]);

    /// What the kernel's rule and port maps hold for a policy.
    fn image(policy: &Policy) -> (BTreeMap<u32, Rule>, BTreeSet<Port>) {
        let rules = policy
            .rules
            .iter()
            .map(|r| (r.index, r.record()))
            .filter(|(_, r)| *r != Rule::default())
            .collect();
        (rules, policy.port_keys.iter().map(port).collect())
    }

    fn port(key: &PortKey) -> Port {
        (key.rule, key.proto, key.port_be)
    }

    fn registry(networks: &[(&str, &str, &str)], deny: &[&str]) -> Registry {
        let networks: Vec<_> = networks
            .iter()
            .map(|(name, cidr, ports)| {
                let mut n = serde_json::json!({"name": name, "cidr": cidr});
                if !ports.is_empty() {
                    n["ports"] = serde_json::json!([ports]);
                }
                n
            })
            .collect();
        let deny: Vec<_> = deny
            .iter()
            .map(|c| serde_json::json!({"cidr": c}))
            .collect();
        let text =
            serde_json::json!({"schema": 1, "mode": "enforce", "networks": networks, "deny": deny})
                .to_string();
        Registry::parse(&text).unwrap_or_else(|p| panic!("{text}: {p:?}"))
    }

    #[test]
    fn a_diff_written_onto_the_old_maps_gives_the_new_ones() {
        let today = Date::parse("2026-11-27").expect("date");
        let names = ["a", "b", "c", "d", "e", "f"];
        let cidrs = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.0/24",
            "198.51.100.0/24",
            "2001:db8::/32",
            "203.0.113.0/25",
        ];
        let ports = ["", "443/tcp", "53/udp", "icmp"];
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let mut next = |n: usize| rng.below(n);
        let mut old = Policy::compile(&registry(&[], &[]), today).expect("compiles");
        let mut changed_sources = 0;
        for step in 0..200 {
            let count = next(5);
            let networks: Vec<(&str, &str, &str)> = (0..count)
                .map(|i| (names[i], cidrs[next(cidrs.len())], ports[next(ports.len())]))
                .collect();
            // Unique prefixes (the registry refuses repeats).
            let mut seen = BTreeSet::new();
            let networks: Vec<_> = networks.into_iter().filter(|n| seen.insert(n.1)).collect();
            let deny: Vec<&str> = (0..next(2))
                .map(|_| cidrs[next(cidrs.len())])
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let new = Policy::compile_after(&registry(&networks, &deny), today, Some(&old))
                .expect("compiles");
            let diff = PolicyDiff::between(&old, &new);

            let (mut rules, mut port_keys) = image(&old);
            for (index, rule) in &diff.flagged {
                rules.insert(*index, *rule);
            }
            // As the datapath writes it: the rules gone are cleared last.
            for index in &diff.gone {
                rules.remove(index);
            }
            port_keys.extend(diff.ports_added.iter().map(port));
            for key in &diff.ports_removed {
                port_keys.remove(&port(key));
            }
            assert_eq!((rules, port_keys), image(&new), "step {step}: {diff:?}");

            // Every source entry that differs lies inside the prefixes the diff names.
            let entries =
                |p: &Policy| -> BTreeSet<(IpNet, u32)> { p.trie_entries().into_iter().collect() };
            let (before, after) = (entries(&old), entries(&new));
            let differing: Vec<IpNet> = before
                .symmetric_difference(&after)
                .map(|(prefix, _)| *prefix)
                .collect();
            match &diff.sources {
                SourceChange::Unchanged => {
                    assert!(
                        differing.is_empty(),
                        "step {step}: {differing:?} changed unseen"
                    );
                }
                SourceChange::Within(prefixes) => {
                    changed_sources += 1;
                    for p in &differing {
                        assert!(
                            prefixes.iter().any(|w| w.contains(p)),
                            "step {step}: {p} changed outside {prefixes:?}"
                        );
                    }
                }
            }
            old = new;
        }
        assert!(
            changed_sources > 50,
            "the sources changed in {changed_sources} steps only"
        );
    }
}
