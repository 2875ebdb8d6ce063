use super::{Mode, PortSpec, Problem, Protocol, Registry};

const EXAMPLE: &str = include_str!("../../../examples/registry.json");

/// The examples directory, against which the example's deny feed resolves.
pub fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}
const DEMO: &str = include_str!("../../../examples/demo-registry.json");

fn problems(text: &str) -> Vec<Problem> {
    Registry::parse(text).expect_err("registry should be rejected")
}

/// The one problem of a registry, asserting there is exactly one.
fn only_problem(text: &str) -> Problem {
    let mut all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.remove(0)
}

fn with_network(entry: &str) -> String {
    format!("{{\"schema\": 1, \"mode\": \"enforce\",\n \"networks\": [\n  {entry}\n ]}}")
}

#[test]
fn committed_examples_are_valid() {
    let registry =
        Registry::parse_at(EXAMPLE, &examples()).expect("examples/registry.json is valid");
    assert_eq!(registry.feeds.len(), 1);
    assert_eq!(
        registry.feeds[0].entries.len(),
        3,
        "examples/feeds/vpn-providers.txt"
    );
    assert_eq!(registry.mode, Mode::Enforce);
    assert_eq!(registry.networks.len(), 3);
    assert_eq!(registry.networks[0].name, "moitt-hq-lan");
    assert_eq!(registry.networks[0].cidr.to_string(), "10.20.0.0/16");
    assert_eq!(
        registry.networks[0].ports.as_deref(),
        Some(
            &[
                PortSpec::Range {
                    protocol: Protocol::Tcp,
                    first: 443,
                    last: 443
                },
                PortSpec::Range {
                    protocol: Protocol::Tcp,
                    first: 22,
                    last: 22
                }
            ][..]
        )
    );
    assert_eq!(registry.networks[1].ports, None, "no ports = every port");
    assert_eq!(registry.devices[0].address.to_string(), "10.30.5.17");
    assert_eq!(registry.vpn_endpoints.len(), 2);
    assert_eq!(registry.deny.len(), 2);
    Registry::parse(DEMO).expect("examples/demo-registry.json is valid");
}

#[test]
fn sections_other_than_schema_and_mode_are_optional() {
    let registry = Registry::parse(r#"{"schema": 1, "mode": "monitor"}"#).unwrap();
    assert_eq!(registry.mode, Mode::Monitor);
    assert!(
        registry.networks.is_empty() && registry.devices.is_empty() && registry.deny.is_empty()
    );
}

#[test]
fn bad_json_is_located() {
    let p = only_problem("{\"schema\": 1,\n \"mode\": \"enforce\",\n \"networks\": [,]}");
    assert_eq!((p.line, p.column), (3, 15), "{p}");
}

#[test]
fn wrong_type_is_located_at_the_entry_field() {
    let p = only_problem(&with_network(r#"{"name": "a", "cidr": 10}"#));
    assert_eq!(p.line, 3, "{p}");
    assert!(
        p.message
            .contains("invalid type: integer `10`, expected a string"),
        "{p}"
    );
    assert!(p.place.starts_with("networks[0]"), "{p}");
}

#[test]
fn unknown_field_is_named() {
    let p = only_problem(&with_network(
        r#"{"name": "a", "cidr": "10.0.0.0/8", "prots": ["443/tcp"]}"#,
    ));
    assert!(p.message.contains("unknown field `prots`"), "{p}");
    assert_eq!(p.line, 3);
    let top = only_problem(r#"{"schema": 1, "mode": "enforce", "netwroks": []}"#);
    assert!(top.message.contains("unknown field `netwroks`"), "{top}");
}

#[test]
fn missing_mode_and_bad_mode_and_schema() {
    assert!(
        only_problem(r#"{"schema": 1}"#)
            .message
            .contains("missing field `mode`")
    );
    let p = only_problem(r#"{"schema": 1, "mode": "block"}"#);
    assert!(p.message.contains("unknown mode \"block\""), "{p}");
    assert_eq!(p.place, "field \"mode\"");
    let p = only_problem(r#"{"schema": 2, "mode": "enforce"}"#);
    assert!(p.message.contains("unsupported schema 2"), "{p}");
}

#[test]
fn invalid_cidr() {
    let p = only_problem(&with_network(r#"{"name": "a", "cidr": "10.0.0.0/33"}"#));
    assert_eq!(p.place, "networks[0] \"a\" field \"cidr\"");
    assert!(p.message.contains("invalid CIDR \"10.0.0.0/33\""), "{p}");
    assert_eq!((p.line, p.column), (3, 17), "{p}");
}

#[test]
fn host_bits_set() {
    let p = only_problem(&with_network(r#"{"name": "a", "cidr": "10.20.1.0/16"}"#));
    assert!(
        p.message.contains("host bits set") && p.message.contains("10.20.0.0/16"),
        "{p}"
    );
    let p = only_problem(&with_network(r#"{"name": "a", "cidr": "2001:db8::1/48"}"#));
    assert!(p.message.contains("2001:db8::/48"), "{p}");
}

#[test]
fn bare_address_as_cidr_is_a_host_prefix() {
    let registry = Registry::parse(&with_network(r#"{"name": "a", "cidr": "10.1.2.3"}"#)).unwrap();
    assert_eq!(registry.networks[0].cidr.to_string(), "10.1.2.3/32");
}

#[test]
fn bad_port_specs() {
    let p = only_problem(&with_network(
        r#"{"name": "a", "cidr": "10.0.0.0/8", "ports": ["443/tcp", "https"]}"#,
    ));
    assert_eq!(p.place, "networks[0] \"a\" field \"ports\"");
    assert!(p.message.contains("invalid port spec \"https\""), "{p}");
    let p = only_problem(&with_network(
        r#"{"name": "a", "cidr": "10.0.0.0/8", "ports": []}"#,
    ));
    assert!(p.message.contains("empty ports list"), "{p}");
}

#[test]
fn bad_dates() {
    let p = only_problem(&with_network(
        r#"{"name": "a", "cidr": "10.0.0.0/8", "expires": "2027-02-29"}"#,
    ));
    assert_eq!(p.place, "networks[0] \"a\" field \"expires\"");
    assert!(p.message.contains("no such day"), "{p}");
    let p = only_problem(&with_network(
        r#"{"name": "a", "cidr": "10.0.0.0/8", "expires": "30/06/2027"}"#,
    ));
    assert!(p.message.contains("expected YYYY-MM-DD"), "{p}");
}

#[test]
fn duplicate_names_across_sections() {
    let text = r#"{"schema": 1, "mode": "enforce",
      "networks": [{"name": "x", "cidr": "10.0.0.0/8"}],
      "devices": [{"name": "x", "address": "192.0.2.1"}]}"#;
    let p = only_problem(text);
    assert_eq!(p.line, 3, "{p}");
    assert!(
        p.message
            .contains("duplicate name \"x\", already used by networks[0]"),
        "{p}"
    );
}

#[test]
fn duplicate_prefixes() {
    let text = r#"{"schema": 1, "mode": "enforce",
      "networks": [{"name": "a", "cidr": "192.0.2.7/32"}],
      "devices": [{"name": "b", "address": "192.0.2.7"}],
      "deny": [{"cidr": "203.0.113.0/24"}, {"cidr": "203.0.113.0/24"}]}"#;
    let all = problems(text);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(
        all[0]
            .message
            .contains("prefix 192.0.2.7/32 is already listed by networks[0]"),
        "{}",
        all[0]
    );
    assert!(
        all[1].message.contains("already listed by deny[0]"),
        "{}",
        all[1]
    );
}

#[test]
fn every_repeat_names_the_first_user() {
    // Three users of one name and of one prefix, a repeat inside a section and across sections,
    // an entry with both problems, and an unnamed deny entry beside named ones.
    let text = r#"{"schema": 1, "mode": "enforce",
      "networks": [{"name": "x", "cidr": "10.0.0.0/8"}, {"name": "y", "cidr": "10.1.0.0/16"},
                   {"name": "x", "cidr": "10.0.0.0/8"}],
      "devices": [{"name": "z", "address": "10.1.2.3"}, {"name": "x", "address": "10.1.2.4"}],
      "deny": [{"cidr": "10.0.0.0/8"}, {"name": "y", "cidr": "10.1.0.0/16"}]}"#;
    let all: Vec<String> = problems(text)
        .iter()
        .map(|p| format!("{}: {}", p.place, p.message))
        .collect();
    assert_eq!(
        all,
        [
            "networks[2] \"x\" field \"name\": duplicate name \"x\", already used by networks[0]",
            "networks[2] \"x\": prefix 10.0.0.0/8 is already listed by networks[0]",
            "devices[1] \"x\" field \"name\": duplicate name \"x\", already used by networks[0]",
            "deny[1] \"y\" field \"name\": duplicate name \"y\", already used by networks[1]",
        ]
    );
}

#[test]
fn a_prefix_may_be_both_allowed_and_denied() {
    // deny beats allow at run time; listing both is how an operator carves out a range
    let text = r#"{"schema": 1, "mode": "enforce",
      "networks": [{"name": "a", "cidr": "10.0.0.0/8"}],
      "deny": [{"cidr": "10.0.0.0/8"}]}"#;
    Registry::parse(text).unwrap();
}

#[test]
fn every_problem_at_once_in_file_order() {
    let text = r#"{
  "schema": 1,
  "mode": "enforce",
  "networks": [
    {"name": "a", "cidr": "10.20.0.1/16", "ports": ["443/tcpx"]},
    {"name": "b", "cidr": "10.30.0.0/33", "expires": "2027-02-30"},
    {"name": "c", "cidr": "10.9.0.0/16", "colour": "red"}
  ],
  "devices": [{"name": "a", "address": "10.1.1.1/32"}],
  "vpn_endpoints": [{"name": "v", "address": "198.51.100.7", "protocol": "ssh", "approval": ""}],
  "deny": [{"cidr": "10.9.0.0/16"}, {"cidr": "10.9.0.0/16"}]
}"#;
    let all = problems(text);
    let lines: Vec<usize> = all.iter().map(|p| p.line).collect();
    assert_eq!(lines, vec![5, 5, 6, 6, 7, 9, 10, 10, 11], "{all:#?}");
    assert!(
        all.iter()
            .any(|p| p.message.contains("unknown VPN protocol \"ssh\""))
    );
    assert!(all.iter().any(|p| p.message.contains("approval reference")));
}

#[test]
fn vpn_endpoints_are_validated() {
    let text = r#"{"schema": 1, "mode": "enforce", "vpn_endpoints": [
      {"name": "gw", "address": "198.51.100.0/28", "protocol": "ipsec", "approval": "NITB-1", "port": 0}]}"#;
    let p = only_problem(text);
    assert!(p.message.contains("port 0"), "{p}");
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("enforcer-registry-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.json");
    std::fs::write(&path, with_network(r#"{"name": "a", "cidr": "nope"}"#)).unwrap();
    let message = Registry::load(&path).unwrap_err().to_string();
    assert!(
        message.contains(&format!("{}:3:", path.display())),
        "{message}"
    );
    let missing = Registry::load(&dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("cannot read registry"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn large_sections_parsed_in_parallel_keep_file_order_and_places() {
    // Above 10,000 entries a section is split across threads: problems and entries must still
    // come out in file order with the right index, line and column.
    let entries: Vec<String> = (0..20_000u32)
        .map(|i| {
            let cidr = match i {
                7_000 => "10.0.0.1/8".to_string(),
                15_000 => "not-a-cidr".to_string(),
                _ => format!("10.{}.{}.0/24", i / 256, i % 256),
            };
            format!(r#"{{"name": "n{i}", "cidr": "{cidr}"}}"#)
        })
        .collect();
    let text = format!(
        "{{\"schema\": 1, \"mode\": \"enforce\", \"networks\": [\n{}\n]}}",
        entries.join(",\n")
    );
    let all = problems(&text);
    let places: Vec<(usize, &str)> = all.iter().map(|p| (p.line, p.place.as_str())).collect();
    assert_eq!(
        places,
        vec![
            (7_002, "networks[7000] \"n7000\" field \"cidr\""),
            (15_002, "networks[15000] \"n15000\" field \"cidr\""),
        ],
        "{all:#?}"
    );
    let fine = format!(
        "{{\"schema\": 1, \"mode\": \"enforce\", \"networks\": [\n{}\n]}}",
        entries
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 7_000 && *i != 15_000)
            .map(|(_, e)| e.as_str())
            .collect::<Vec<_>>()
            .join(",\n")
    );
    let registry = Registry::parse(&fine).unwrap();
    assert_eq!(registry.networks.len(), 19_998);
    assert_eq!(registry.networks[12_000].name, "n12001");
}

#[test]
fn missing_and_mistyped_top_level_fields_are_reported_with_the_entries_problems() {
    // No mode, and a network whose CIDR is invalid: both at once.
    let all = problems(
        r#"{"schema": 1,
 "networks": [{"name": "lan", "cidr": "192.0.2.300/24"}]}"#,
    );
    let messages: Vec<&str> = all.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(messages[0].contains("missing field `mode`"), "{all:#?}");
    assert_eq!(all[0].place, "field \"mode\"");
    assert!(
        messages[1].contains("invalid CIDR \"192.0.2.300/24\""),
        "{all:#?}"
    );
    assert_eq!(
        (all[1].line, all[1].place.as_str()),
        (2, "networks[0] \"lan\" field \"cidr\"")
    );

    // No schema, a misspelt section, a section of the wrong type, a bad entry elsewhere.
    let all = problems(
        r#"{"mode": "enforce",
 "netwroks": [],
 "devices": {"name": "d"},
 "deny": [{"cidr": "10.0.0.0/33"}]}"#,
    );
    let found = |needle: &str, line: usize| {
        assert!(
            all.iter()
                .any(|p| p.message.contains(needle) && p.line == line),
            "{needle} on line {line}: {all:#?}"
        );
    };
    found("missing field `schema`", 1);
    found("unknown field `netwroks`", 2);
    found("invalid type: map, expected a sequence", 3);
    found("invalid CIDR", 4);
    assert_eq!(all.len(), 4, "{all:#?}");

    // A repeated field is a problem, not a silent choice of one.
    let p = only_problem(r#"{"schema": 1, "mode": "enforce", "mode": "monitor"}"#);
    assert!(p.message.contains("duplicate field `mode`"), "{p}");
    // Text that is not an object still stops at once, located.
    let p = only_problem("[1, 2]");
    assert!(p.message.contains("a JSON object"), "{p}");
}

#[test]
fn connection_timeouts_are_read_and_checked() {
    let registry = Registry::parse(
        r#"{"schema": 1, "mode": "enforce", "connections": {"udp_idle": 5, "tcp_idle": 600}}"#,
    )
    .expect("valid");
    let t = registry.connections.timeouts();
    let d = enforcer_common::ConnTimeouts::DEFAULT;
    assert_eq!(
        (t.udp_ns, t.tcp_open_ns, t.tcp_closing_ns, t.icmp_ns),
        (5_000_000_000, 600_000_000_000, d.tcp_closing_ns, d.icmp_ns)
    );
    let p = only_problem(r#"{"schema": 1, "mode": "enforce", "connections": {"udp_idle": 0}}"#);
    assert_eq!(p.place, "field \"connections\"");
    assert!(p.message.contains("seconds from 1 to 604800"), "{p}");
    let p = only_problem(r#"{"schema": 1, "mode": "enforce", "connections": {"udp": 5}}"#);
    assert!(p.message.contains("unknown field `udp`"), "{p}");
}

fn with_upstreams(entries: &str) -> String {
    format!(
        "{{\"schema\": 1, \"mode\": \"enforce\", \"egress\": \"enforce\",\n \"upstreams\": [\n  {entries}\n ]}}"
    )
}

#[test]
fn upstreams_and_the_egress_mode_are_read() {
    let registry = Registry::parse(&with_upstreams(
        r#"{"name": "dns", "address": "192.0.2.53", "ports": ["53/udp", "53/tcp"], "ministry": "MoITT", "note": "resolver", "expires": "2027-06-30"},
  {"name": "mirror", "cidr": "2001:db8:50::/48", "ports": ["443/tcp", "icmp"]}"#,
    ))
    .expect("valid");
    assert_eq!(registry.egress, super::EgressMode::Enforce);
    assert_eq!(registry.upstreams.len(), 2);
    assert_eq!(registry.upstreams[0].prefix.to_string(), "192.0.2.53/32");
    assert_eq!(registry.upstreams[1].prefix.to_string(), "2001:db8:50::/48");
    assert_eq!(registry.upstreams[1].ports.len(), 2);
    let without = Registry::parse(r#"{"schema": 1, "mode": "enforce"}"#).expect("valid");
    assert_eq!(
        without.egress,
        super::EgressMode::Monitor,
        "a registry without the key: egress monitor"
    );
}

#[test]
fn a_bad_upstream_or_egress_mode_is_named_with_its_place() {
    let cases = [
        (
            r#"{"name": "dns", "address": "192.0.2.53"}"#,
            "needs its \"ports\"",
        ),
        (
            r#"{"name": "dns", "address": "192.0.2.53", "ports": []}"#,
            "empty ports list",
        ),
        (
            r#"{"name": "dns", "ports": ["53/udp"]}"#,
            "needs its \"cidr\" or \"address\"",
        ),
        (
            r#"{"name": "dns", "cidr": "192.0.2.0/24", "address": "192.0.2.53", "ports": ["53/udp"]}"#,
            "not both",
        ),
        (
            r#"{"name": "dns", "address": "192.0.2.53", "ports": ["53/dns"]}"#,
            "invalid port spec",
        ),
        (
            r#"{"name": "dns", "address": "192.0.2.0/24", "ports": ["53/udp"]}"#,
            "invalid address",
        ),
    ];
    for (entry, message) in cases {
        let problem = only_problem(&with_upstreams(entry));
        assert!(
            problem.place.starts_with("upstreams[0]") && problem.message.contains(message),
            "{entry}: {problem}"
        );
        assert_eq!(problem.line, 3, "{entry}: {problem}");
    }
    let problem = only_problem(r#"{"schema": 1, "mode": "enforce", "egress": "block"}"#);
    assert!(
        problem.place == "field \"egress\""
            && problem
                .message
                .contains("\"off\", \"monitor\" or \"enforce\""),
        "{problem}"
    );
    let problem = only_problem(&with_upstreams(
        r#"{"name": "dup", "address": "192.0.2.53", "ports": ["53/udp"]},
  {"name": "dup", "address": "192.0.2.54", "ports": ["53/udp"]}"#,
    ));
    assert!(problem.message.contains("duplicate name"), "{problem}");
}
