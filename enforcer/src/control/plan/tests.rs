//! The in-place path against the whole-registry path, on random changes of a registry: the
//! same refusals, the same file (as a parsed registry) and the same policy (as entries and
//! what the kernel holds for them; rule numbers may differ).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use super::{Plan, plan_add, plan_remove};
use crate::test_rng::Rng;
use crate::{
    policy::Policy,
    registry::{Date, Registry},
};

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
            list.retain(|e| !crate::registry::text::matches_target(e, target));
            if list.len() == before {
                return Err(format!(
                    "no {section} entry named {target} or covering exactly {target}"
                ));
            }
        }
    }
    doc["serial"] = json!(doc["serial"].as_u64().unwrap_or(0) + 1);
    let text = serde_json::to_string_pretty(&doc).expect("JSON") + "\n";
    let registry = Registry::parse(&text).map_err(|p| crate::registry::refusal(&p))?;
    let policy = Policy::from_registry(registry, today, Some(policy)).map_err(|e| e.to_string())?;
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
        // The expiry dates and ministries, by entry.
        .chain(
            policy
                .extras
                .iter()
                .map(|(rule, extra)| format!("extra {:?} {extra:?}", key_of(*rule))),
        )
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
                    let edited = policy.edit(edit.add, edit.extra, &edit.remove);
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
