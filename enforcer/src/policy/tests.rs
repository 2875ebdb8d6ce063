use enforcer_common::{MAX_RULES, PortKey, RULE_ANY_PORT, RULE_ICMP, Reason};

use super::{Policy, PolicyError, RuleKind};
use crate::registry::{Date, Protocol, Registry};
use enforcer_common::VpnProtocol;

const EXAMPLE: &str = include_str!("../../../examples/registry.json");

fn today() -> Date {
    Date::parse("2026-11-27").unwrap()
}

fn compile(text: &str) -> Policy {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    Policy::compile(&Registry::parse_at(text, &examples).unwrap(), today()).unwrap()
}

#[test]
fn rules_are_numbered_networks_devices_deny() {
    let policy = compile(EXAMPLE);
    let kinds: Vec<(u32, RuleKind, &str)> = policy
        .rules
        .iter()
        .map(|r| (r.index, r.kind, &*r.name))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, RuleKind::Network, "moitt-hq-lan"),
            (1, RuleKind::Network, "nitb-noc-v6"),
            (2, RuleKind::Network, "mofa-branch"),
            (3, RuleKind::Device, "dcs-laptop-01"),
            (4, RuleKind::Device, "auditor-laptop"),
            (5, RuleKind::Deny, "203.0.113.0/24"),
            (6, RuleKind::Deny, "compromised-host"),
            (7, RuleKind::DenyFeed, "feeds/vpn-providers.txt:3"),
            (8, RuleKind::DenyFeed, "feeds/vpn-providers.txt:4"),
            (9, RuleKind::DenyFeed, "feeds/vpn-providers.txt:5"),
            (10, RuleKind::VpnEndpoint, "nitb-wg-gw"),
            (11, RuleKind::VpnEndpoint, "moitt-ipsec"),
            (12, RuleKind::Upstream, "dns"),
            (13, RuleKind::Upstream, "ntp"),
            (14, RuleKind::Upstream, "ldap"),
            (15, RuleKind::Upstream, "update-mirror"),
        ]
    );
    assert_eq!(policy.rules[3].prefix.to_string(), "10.30.5.17/32");
    assert_eq!(policy.rules[4].prefix.to_string(), "2001:db8:20:5::17/128");
}

#[test]
fn flags_and_port_keys() {
    let policy = compile(EXAMPLE);
    assert_eq!(
        policy.rules[0].flags(),
        0,
        "443/tcp,22/tcp: port-restricted, no ICMP"
    );
    assert_eq!(policy.rules[1].flags(), RULE_ANY_PORT);
    assert_eq!(policy.rules[2].flags(), RULE_ICMP);
    let key = |rule, port: u16| PortKey {
        rule,
        port_be: port.to_be_bytes(),
        proto: 6,
        _pad: 0,
    };
    for expected in [
        key(0, 443),
        key(0, 22),
        key(2, 443),
        key(2, 8443),
        key(4, 443),
        key(12, 53),
        key(14, 636),
        key(15, 443),
    ] {
        assert!(policy.port_keys.contains(&expected), "missing {expected:?}");
    }
    // And the upstreams' 53/udp and 123/udp.
    assert_eq!(policy.port_keys.len(), 10);
    assert_eq!(
        policy.rules[12].flags(),
        enforcer_common::RULE_UPSTREAM,
        "an upstream: not a source entry"
    );
}

#[test]
fn port_ranges_expand_and_are_bounded() {
    let text = r#"{"schema": 1, "mode": "enforce", "networks": [
      {"name": "a", "cidr": "10.0.0.0/8", "ports": ["8000-8009/tcp", "53/udp", "8005/tcp"]}]}"#;
    let policy = compile(text);
    assert_eq!(
        policy.port_keys.len(),
        11,
        "10 TCP ports (8005 once) + 1 UDP"
    );
    assert!(
        policy
            .port_keys
            .iter()
            .any(|k| k.proto == 17 && k.port_be == 53u16.to_be_bytes())
    );

    let huge = r#"{"schema": 1, "mode": "enforce", "networks": [
      {"name": "a", "cidr": "10.0.0.0/8", "ports": ["1-65535/tcp"]},
      {"name": "b", "cidr": "10.1.0.0/16", "ports": ["1-65535/udp"]}]}"#;
    let error = Policy::compile(&Registry::parse(huge).unwrap(), today()).unwrap_err();
    assert!(
        matches!(error, PolicyError::TooManyPorts(n) if n > 65_536),
        "{error}"
    );
}

#[test]
fn expired_entries_are_skipped_and_reported() {
    let text = r#"{"schema": 1, "mode": "enforce",
      "networks": [{"name": "old", "cidr": "10.0.0.0/8", "expires": "2026-11-26"},
                   {"name": "today", "cidr": "10.1.0.0/16", "expires": "2026-11-27"}],
      "devices": [{"name": "gone", "address": "192.0.2.1", "expires": "2020-01-01"}],
      "vpn_endpoints": [{"name": "wg", "address": "198.51.100.7", "protocol": "wireguard", "approval": "X", "expires": "2026-01-31"}],
      "deny": [{"cidr": "203.0.113.0/24", "expires": "2025-01-01"}]}"#;
    let policy = compile(text);
    let names: Vec<&str> = policy.rules.iter().map(|r| &*r.name).collect();
    assert_eq!(
        names,
        vec!["today"],
        "an entry applies through its expiry day"
    );
    let expired: Vec<(&str, &str)> = policy
        .expired
        .iter()
        .map(|e| (e.section, e.name.as_str()))
        .collect();
    assert_eq!(
        expired,
        vec![
            ("networks", "old"),
            ("devices", "gone"),
            ("deny", "203.0.113.0/24"),
            ("vpn_endpoints", "wg")
        ]
    );
    assert_eq!(policy.vpn_endpoints, 0);
}

#[test]
fn check_follows_the_verdict_order() {
    let policy = compile(EXAMPLE);
    let check = |addr: &str, proto, port| {
        let d = policy.check(addr.parse().unwrap(), proto, port);
        (d.reason, d.rule.map(|r| r.name.clone()))
    };
    let some = |s: &str| Some(Box::<str>::from(s));
    assert_eq!(
        check("10.20.3.4", Protocol::Tcp, Some(443)),
        (Reason::Allowed, some("moitt-hq-lan"))
    );
    assert_eq!(
        check("10.20.3.4", Protocol::Tcp, Some(22)),
        (Reason::Allowed, some("moitt-hq-lan"))
    );
    assert_eq!(
        check("10.20.3.4", Protocol::Tcp, Some(80)),
        (Reason::PortNotAllowed, some("moitt-hq-lan"))
    );
    assert_eq!(
        check("10.20.3.4", Protocol::Udp, Some(443)),
        (Reason::PortNotAllowed, some("moitt-hq-lan"))
    );
    assert_eq!(
        check("10.20.3.4", Protocol::Icmp, None),
        (Reason::PortNotAllowed, some("moitt-hq-lan"))
    );
    assert_eq!(
        check("10.40.8.9", Protocol::Icmp, None),
        (Reason::Allowed, some("mofa-branch"))
    );
    // deny beats a covering allow
    assert_eq!(
        check("10.20.66.6", Protocol::Tcp, Some(443)),
        (Reason::Denied, some("compromised-host"))
    );
    assert_eq!(
        check("203.0.113.5", Protocol::Tcp, Some(443)),
        (Reason::Denied, some("203.0.113.0/24"))
    );
    // device: every port
    assert_eq!(
        check("10.30.5.17", Protocol::Udp, Some(9999)),
        (Reason::Allowed, some("dcs-laptop-01"))
    );
    assert_eq!(
        check("10.30.5.18", Protocol::Tcp, Some(443)),
        (Reason::NotAllowlisted, None)
    );
    // IPv6: a device inside a network is the longer prefix and carries its own ports
    assert_eq!(
        check("2001:db8:20:5::17", Protocol::Tcp, Some(22)),
        (Reason::PortNotAllowed, some("auditor-laptop"))
    );
    assert_eq!(
        check("2001:db8:20:5::18", Protocol::Tcp, Some(22)),
        (Reason::Allowed, some("nitb-noc-v6"))
    );
    assert_eq!(
        check("2001:db8:21::1", Protocol::Tcp, Some(443)),
        (Reason::NotAllowlisted, None)
    );
}

#[test]
fn vpn_groups_merge_covering_approvals() {
    let text = r#"{"schema": 1, "mode": "enforce", "vpn_endpoints": [
      {"name": "wg", "address": "198.51.100.7", "protocol": "wireguard", "port": 51820, "approval": "A-1"},
      {"name": "ipsec", "address": "198.51.100.0/28", "protocol": "ipsec", "approval": "A-2"},
      {"name": "ovpn6", "address": "2001:db8:7::/64", "protocol": "openvpn", "approval": "A-3", "expires": "2020-01-01"}]}"#;
    let policy = compile(text);
    assert_eq!(
        policy.vpn_endpoints, 2,
        "the expired approval is not in force"
    );
    // (prefix, [(rule, protocol, port)])
    type Groups = Vec<(String, Vec<(u32, u8, u16)>)>;
    let groups: Groups = policy
        .vpn_groups
        .iter()
        .map(|(p, a)| {
            (
                p.to_string(),
                a.iter()
                    .map(|a| (a.rule, a.protocol, u16::from_be_bytes(a.port_be)))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            (
                "198.51.100.0/28".to_string(),
                vec![(1, VpnProtocol::Ipsec as u8, 0)]
            ),
            // the /32 inherits the /28's approval, so the kernel's longest match finds both
            (
                "198.51.100.7/32".to_string(),
                vec![
                    (0, VpnProtocol::WireGuard as u8, 51820),
                    (1, VpnProtocol::Ipsec as u8, 0)
                ]
            ),
        ]
    );
    let check = |addr: &str, protocol, port| {
        let d = policy.check_vpn(addr.parse().unwrap(), protocol, port);
        (d.reason, d.rule.map(|r| r.name.clone()))
    };
    let some = |s: &str| Some(Box::<str>::from(s));
    assert_eq!(
        check("198.51.100.7", VpnProtocol::WireGuard, Some(51820)),
        (Reason::ApprovedVpn, some("wg"))
    );
    assert_eq!(
        check("198.51.100.7", VpnProtocol::WireGuard, Some(51821)),
        (Reason::UnapprovedVpn, None)
    );
    assert_eq!(
        check("198.51.100.7", VpnProtocol::Ipsec, None),
        (Reason::ApprovedVpn, some("ipsec"))
    );
    assert_eq!(
        check("198.51.100.9", VpnProtocol::Ipsec, Some(500)),
        (Reason::ApprovedVpn, some("ipsec"))
    );
    assert_eq!(
        check("198.51.100.9", VpnProtocol::WireGuard, Some(51820)),
        (Reason::UnapprovedVpn, None)
    );
    assert_eq!(
        check("198.51.100.99", VpnProtocol::Ipsec, None),
        (Reason::UnapprovedVpn, None)
    );
    assert_eq!(
        check("2001:db8:7::1", VpnProtocol::OpenVpn, None),
        (Reason::UnapprovedVpn, None)
    );
}

#[test]
fn too_many_overlapping_approvals_are_refused() {
    let endpoints: Vec<String> = (0..9)
        .map(|i| format!(r#"{{"name": "e{i}", "address": "198.51.100.0/{}", "protocol": "wireguard", "port": {}, "approval": "X"}}"#, 24 + i / 3, 1000 + i))
        .collect();
    let text = format!(
        r#"{{"schema": 1, "mode": "enforce", "vpn_endpoints": [{}]}}"#,
        endpoints.join(",")
    );
    let error = Policy::compile(&Registry::parse(&text).unwrap(), today()).unwrap_err();
    assert!(
        matches!(error, PolicyError::TooManyApprovals(9, _)),
        "{error}"
    );
}

#[test]
fn deny_feeds_become_feed_rules() {
    let dir = std::env::temp_dir().join(format!("enforcer-feed-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("feeds")).unwrap();
    std::fs::write(
        dir.join("feeds/vpn.txt"),
        "# providers\n192.0.2.0/24\n203.0.113.0/24 # also in deny\n2001:db8:66::/48\n",
    )
    .unwrap();
    let text = r#"{"schema": 1, "mode": "enforce", "deny": [{"cidr": "203.0.113.0/24"}],
      "deny_files": ["feeds/vpn.txt"], "networks": [{"name": "lan", "cidr": "192.0.2.0/23"}]}"#;
    let registry = Registry::parse_at(text, &dir).unwrap();
    let policy = Policy::compile(&registry, today()).unwrap();
    let feed: Vec<(String, String, u32)> = policy
        .rules
        .iter()
        .filter(|r| r.kind == RuleKind::DenyFeed)
        .map(|r| (r.name.to_string(), r.prefix.to_string(), r.flags()))
        .collect();
    assert_eq!(
        feed,
        vec![
            (
                "feeds/vpn.txt:2".to_string(),
                "192.0.2.0/24".to_string(),
                enforcer_common::RULE_DENY | enforcer_common::RULE_FEED
            ),
            (
                "feeds/vpn.txt:4".to_string(),
                "2001:db8:66::/48".to_string(),
                enforcer_common::RULE_DENY | enforcer_common::RULE_FEED
            ),
        ]
    );
    assert_eq!(policy.feed_duplicates, 1);
    let d = policy.check("192.0.2.9".parse().unwrap(), Protocol::Tcp, Some(443));
    assert_eq!(
        d.reason,
        Reason::DeniedFeed,
        "a feed range beats a covering allow"
    );
    assert_eq!(
        policy
            .check("192.0.3.9".parse().unwrap(), Protocol::Tcp, Some(443))
            .reason,
        Reason::Allowed
    );

    std::fs::write(dir.join("feeds/vpn.txt"), "192.0.2.0/24\nbogus\n").unwrap();
    let problems = Registry::parse_at(text, &dir).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].line, 2);
    assert!(
        problems[0]
            .file
            .as_deref()
            .unwrap()
            .ends_with("feeds/vpn.txt")
    );
    std::fs::remove_file(dir.join("feeds/vpn.txt")).unwrap();
    let problems = Registry::parse_at(text, &dir).unwrap_err();
    assert!(
        problems[0].message.contains("cannot read deny feed"),
        "{problems:#?}"
    );
    assert_eq!(problems[0].line, 2, "placed at the deny_files field");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compile_after_keeps_rule_numbers_and_never_reuses_a_freed_one_at_once() {
    let v1 = r#"{"schema": 1, "mode": "enforce", "networks": [
      {"name": "a", "cidr": "10.1.0.0/16"}, {"name": "b", "cidr": "10.2.0.0/16"}, {"name": "c", "cidr": "10.3.0.0/16"}]}"#;
    let v2 = r#"{"schema": 1, "mode": "enforce", "networks": [
      {"name": "c-limited", "cidr": "10.3.0.0/16", "ports": ["443/tcp"]}, {"name": "a", "cidr": "10.1.0.0/16"},
      {"name": "b-renamed", "cidr": "10.2.0.0/16"}, {"name": "d", "cidr": "10.4.0.0/16"}]}"#;
    let old = compile(v1);
    let new = Policy::compile_after(&Registry::parse(v2).unwrap(), today(), Some(&old)).unwrap();
    let numbers: Vec<(&str, u32)> = new.rules.iter().map(|r| (&*r.name, r.index)).collect();
    // a keeps 0 and b 1 (by its prefix, renamed); c's ports changed, so it is written beside the
    // old c under a fresh number (3) and 2 is freed, but not reused by d in the same update.
    assert_eq!(
        numbers,
        vec![("a", 0), ("b-renamed", 1), ("c-limited", 3), ("d", 4)]
    );
    assert_eq!(
        new.rule(3).unwrap().ports.as_ref().map(|p| p.len()),
        Some(1)
    );
    assert!(new.rule(2).is_none());
    let next = Policy::compile_after(&Registry::parse(v1).unwrap(), today(), Some(&new)).unwrap();
    let numbers: Vec<(&str, u32)> = next.rules.iter().map(|r| (&*r.name, r.index)).collect();
    assert_eq!(
        numbers,
        vec![("a", 0), ("b", 1), ("c", 2)],
        "2 is free again one update later"
    );
}

#[test]
fn the_source_trie_leaves_out_allow_prefixes_inside_deny_ranges() {
    let text = r#"{"schema": 1, "mode": "enforce",
      "networks": [{"name": "wide", "cidr": "10.0.0.0/8"}, {"name": "inside", "cidr": "10.66.1.0/24"},
                   {"name": "same", "cidr": "10.77.0.0/16"}, {"name": "v6", "cidr": "2001:db8:1::/48"}],
      "devices": [{"name": "dev", "address": "10.66.1.5"}],
      "deny": [{"name": "d66", "cidr": "10.66.0.0/16"}, {"name": "d77", "cidr": "10.77.0.0/16"}, {"name": "d6", "cidr": "2001:db8:1:2::/64"}]}"#;
    let policy = compile(text);
    let mut entries: Vec<String> = policy
        .trie_entries()
        .into_iter()
        .map(|(p, i)| format!("{p}={}", policy.rule(i).unwrap().name))
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        vec![
            "10.0.0.0/8=wide",
            "10.66.0.0/16=d66",
            "10.77.0.0/16=d77",
            "2001:db8:1:2::/64=d6",
            "2001:db8:1::/48=v6"
        ],
        "inside, same and dev can never decide; a deny inside an allow splits it by longest match"
    );
    // The one-lookup verdicts equal the two-lookup reference.
    for (addr, want) in [
        ("10.66.1.5", Reason::Denied),
        ("10.77.3.3", Reason::Denied),
        ("10.5.5.5", Reason::Allowed),
        ("2001:db8:1:2::9", Reason::Denied),
        ("2001:db8:1:3::9", Reason::Allowed),
    ] {
        assert_eq!(
            policy
                .check(addr.parse().unwrap(), Protocol::Tcp, Some(443))
                .reason,
            want,
            "{addr}"
        );
    }
}

#[test]
fn more_ipv6_lengths_in_one_slash_32_than_a_list_probes_compile() {
    let networks: Vec<String> = (0..9)
        .map(|i| format!(r#"{{"name": "n{i}", "cidr": "2001:db8::/{}"}}"#, 40 + i * 8))
        .collect();
    let text = format!(
        r#"{{"schema": 1, "mode": "enforce", "networks": [{}]}}"#,
        networks.join(",")
    );
    let policy = Policy::compile(&Registry::parse(&text).unwrap(), today()).unwrap();
    assert_eq!(policy.rules.len(), 9);
}

/// A deny feed whose prefixes would expand past the kernel's table is refused, and the error
/// names the feed's file and line of the prefix that grows most.
#[test]
fn a_feed_whose_expansion_cannot_fit_is_refused_naming_its_line() {
    let dir = std::env::temp_dir().join(format!("enforcer-cpe-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("feeds")).unwrap();
    // 96 lengths in one /32, 40 prefixes each: eight targets need about 1.3 million keys.
    let mut feed = String::from("# hosting ranges\n");
    for len in 33..=128u32 {
        for i in 0..40u128 {
            let addr = (0x2001_0db8u128 << 96) | (i << (128 - len));
            feed.push_str(&format!("{}/{len}\n", std::net::Ipv6Addr::from(addr)));
        }
    }
    std::fs::write(dir.join("feeds/hosting.txt"), feed).unwrap();
    let text = r#"{"schema": 1, "mode": "enforce", "deny_files": ["feeds/hosting.txt"]}"#;
    let registry = Registry::parse_at(text, &dir).unwrap();
    let error = Policy::compile(&registry, today()).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    let message = error.to_string();
    assert!(matches!(error, PolicyError::Lookup(_)), "{message}");
    assert!(
        message.contains("inside 2001:db8::/32, feeds/hosting.txt:"),
        "{message}"
    );
}

/// `Policy::edit` numbers an added rule one past the highest in use, and once that would pass
/// the maps' end, with the first free number; `undo` restores the policy exactly.
#[test]
fn an_edit_numbers_past_the_highest_then_into_gaps_and_undoes_exactly() {
    let mut policy = compile(
        r#"{"schema": 1, "mode": "enforce",
            "networks": [{"name": "a", "cidr": "10.0.0.0/8", "ports": ["443/tcp"]},
                         {"name": "b", "cidr": "10.1.0.0/16"}],
            "devices": [{"name": "c", "address": "192.0.2.1", "ports": ["22/tcp"]}]}"#,
    );
    let spare = compile(
        r#"{"schema": 1, "mode": "enforce",
            "networks": [{"name": "d", "cidr": "198.51.100.0/24", "ports": ["53/udp"]}]}"#,
    )
    .rules
    .remove(0);
    let before = policy.clone();
    let change = policy
        .edit(Some(spare.clone()), super::Extra::default(), &[1])
        .expect("fits");
    assert_eq!(change.added[0].index, 3, "one past the highest");
    assert_eq!(change.removed.len(), 1);
    assert_eq!(
        policy.rules.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 2, 3]
    );
    assert!(policy.port_keys.iter().any(|k| k.rule == 3));
    policy.undo(change);
    assert_eq!(policy, before, "undo restores the policy exactly");

    // The highest number in use is the maps' last: the first gap (1) serves.
    policy.rules.retain(|r| r.index != 1);
    policy.port_keys.retain(|k| k.rule != 1);
    let last = policy.rules.len() - 1;
    policy.rules[last].index = MAX_RULES - 1;
    for key in &mut policy.port_keys {
        if key.rule == 2 {
            key.rule = MAX_RULES - 1;
        }
    }
    let change = policy
        .edit(Some(spare), super::Extra::default(), &[])
        .expect("a gap is free");
    assert_eq!(change.added[0].index, 1);
    assert_eq!(
        policy.rules.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, MAX_RULES - 1],
        "kept sorted by number"
    );
    let keys: Vec<u32> = policy.port_keys.iter().map(|k| k.rule).collect();
    assert!(keys.is_sorted(), "port keys sorted: {keys:?}");
}

#[test]
fn upstreams_compile_to_groups_the_longest_prefix_first() {
    let policy = compile(
        r#"{"schema": 1, "mode": "enforce", "egress": "enforce",
  "networks": [{"name": "lan", "cidr": "198.51.100.0/24", "ports": ["443/tcp"]}],
  "deny": [{"name": "bad", "cidr": "203.0.113.0/24"}],
  "upstreams": [
    {"name": "pool", "cidr": "10.1.0.0/16", "ports": ["123/udp"]},
    {"name": "dns", "address": "10.1.2.3", "ports": ["53/udp", "icmp"]},
    {"name": "ldap", "address": "10.1.2.3", "ports": ["636/tcp"]},
    {"name": "denied-upstream", "address": "203.0.113.5", "ports": ["53/udp"]}
  ]}"#,
    );
    let index = |name: &str| {
        policy
            .rules
            .iter()
            .find(|r| &*r.name == name)
            .unwrap()
            .index
    };
    let group = |prefix: &str| {
        let prefix: ipnet::IpNet = prefix.parse().unwrap();
        policy
            .upstream_groups
            .iter()
            .find(|(p, _)| *p == prefix)
            .map(|(_, rules)| rules.clone())
            .unwrap()
    };
    assert_eq!(
        group("10.1.2.3/32"),
        [index("dns"), index("ldap"), index("pool")]
    );
    assert_eq!(group("10.1.0.0/16"), [index("pool")]);
    // Upstreams are not sources: the ingress lookup never holds them.
    assert!(
        policy
            .trie_entries()
            .iter()
            .all(|(_, rule)| *rule != index("dns"))
    );
    let decide = |to: &str, protocol, port| {
        let d = policy.decide_egress(to.parse().unwrap(), protocol, port, None);
        (d.reason.label(), d.rule.map(|r| r.name.to_string()))
    };
    let name = |n: &str| Some(n.to_string());
    assert_eq!(
        decide("10.1.2.3", Protocol::Udp, Some(53)),
        ("upstream", name("dns"))
    );
    assert_eq!(
        decide("10.1.2.3", Protocol::Udp, Some(123)),
        ("upstream", name("pool"))
    );
    assert_eq!(
        decide("10.1.2.3", Protocol::Icmp, None),
        ("upstream", name("dns"))
    );
    assert_eq!(
        decide("10.1.9.9", Protocol::Udp, Some(53)),
        ("egress_denied", None)
    );
    assert_eq!(
        decide("198.51.100.7", Protocol::Tcp, Some(40000)),
        ("allowed", name("lan"))
    );
    assert_eq!(
        decide("203.0.113.5", Protocol::Udp, Some(53)),
        ("denied", name("bad"))
    );
    assert_eq!(
        decide("192.0.2.99", Protocol::Tcp, Some(443)),
        ("egress_denied", None)
    );
}

#[test]
fn too_many_upstreams_over_one_address_are_refused_with_the_prefix() {
    let upstreams: Vec<String> = (0..9)
        .map(|i| {
            format!(
                r#"{{"name": "u{i}", "cidr": "10.0.0.0/{}", "ports": ["53/udp"]}}"#,
                16 + i
            )
        })
        .collect();
    let text = format!(
        r#"{{"schema": 1, "mode": "enforce", "upstreams": [{}]}}"#,
        upstreams.join(",")
    );
    let error = Policy::compile(&Registry::parse(&text).unwrap(), today()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "9 upstreams cover addresses in 10.0.0.0/24; at most 8 may overlap (merge upstreams entries)"
    );
}

#[test]
fn an_outgoing_vpn_packet_passes_only_towards_an_approved_endpoint() {
    let policy = compile(
        r#"{"schema": 1, "mode": "enforce", "egress": "enforce",
  "networks": [{"name": "lan", "cidr": "198.51.100.0/24"}],
  "deny": [{"name": "bad", "cidr": "203.0.113.0/24"}],
  "vpn_endpoints": [{"name": "gw", "address": "192.0.2.7", "protocol": "wireguard", "approval": "NITB-1"}],
  "upstreams": [{"name": "dns", "address": "10.1.2.3", "ports": ["53/udp"]}]}"#,
    );
    let decide = |to: &str, port| {
        let d = policy.decide_egress(
            to.parse().unwrap(),
            Protocol::Udp,
            Some(port),
            Some(VpnProtocol::WireGuard),
        );
        (d.reason, d.rule.map(|r| r.name.to_string()), d.outgoing)
    };
    assert_eq!(
        decide("192.0.2.7", 51820),
        (Reason::ApprovedVpn, Some("gw".into()), true)
    );
    assert_eq!(decide("10.1.2.3", 53), (Reason::UnapprovedVpn, None, true));
    assert_eq!(
        decide("198.51.100.9", 51820),
        (Reason::UnapprovedVpn, None, true)
    );
    assert_eq!(
        decide("203.0.113.7", 51820),
        (Reason::Denied, Some("bad".into()), true)
    );
}
