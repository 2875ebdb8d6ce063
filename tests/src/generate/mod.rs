//! Generated registries and frames for the differential fuzzer (`tests/kernel_fuzz.rs`): the
//! registries overlap and nest in a few clusters, the frames come from those clusters, shaped
//! like the traffic the verdict order distinguishes, then some are mutated.

mod frames;
mod payloads;

pub use frames::Frames;

use crate::rng::Rng;

/// A generated registry: overlapping networks (some with ports), devices, deny ranges and VPN
/// endpoints (some with a port), clustered so that the generated sources meet them.
pub struct Generated {
    entries: Vec<(&'static str, String)>,
    /// Every prefix listed, for sources next to them.
    pub(crate) prefixes: Vec<ipnet::IpNet>,
    /// The VPN endpoints' prefixes, which a quarter of the sources come from.
    pub(crate) endpoints: Vec<ipnet::IpNet>,
    /// The deny feed's ranges.
    feed: Vec<ipnet::IpNet>,
}

/// The deny feed's file name, beside the registry.
pub const FEED_FILE: &str = "feed.txt";

const PORT_SETS: [&str; 5] = [
    r#"["443/tcp", "22/tcp"]"#,
    r#"["1194/udp", "51820/udp", "icmp"]"#,
    r#"["1-1024/tcp", "53/udp"]"#,
    r#"["icmp"]"#,
    r#"["500/udp", "4500/udp", "1701/udp", "1723/tcp", "8080/tcp"]"#,
];
const VPN_PROTOCOLS: [&str; 12] = [
    "wireguard",
    "openvpn",
    "ipsec",
    "l2tp",
    "pptp",
    "tailscale",
    "warp",
    "anyconnect",
    "softether",
    "ultrasurf",
    "lightway",
    "zerotier",
];

impl Generated {
    /// The registry of `round` (later rounds list more entries).
    pub fn new(rng: &mut Rng, round: u64) -> Self {
        let mut seen = std::collections::HashSet::new();
        let mut entries = Vec::new();
        let mut prefixes = Vec::new();
        let mut vpn_seen = std::collections::HashSet::new();
        let mut endpoints = Vec::new();
        let mut feed = Vec::new();
        for i in 0..40 + round * 10 {
            let pick = rng.next_u64() % 10;
            let (section, host) = match pick {
                0..=4 => ("networks", false),
                5 => ("devices", true),
                6 => ("deny", false),
                7 => ("feed", false),
                _ => ("vpn_endpoints", rng.next_u64().is_multiple_of(2)),
            };
            // Deny ranges narrower than networks, so that most sources meet an allow or none.
            let net = random_prefix(rng, host, matches!(section, "deny" | "feed"));
            let key = (section == "vpn_endpoints", net);
            if section == "vpn_endpoints" {
                // At most 8 approvals may cover one address: keep them few and apart.
                if !vpn_seen.insert(net) || vpn_seen.len() > 6 {
                    continue;
                }
            } else if !seen.insert(key) {
                continue;
            }
            let ports = match rng.next_u64() % 3 {
                0 => String::new(),
                _ => format!(
                    r#", "ports": {}"#,
                    PORT_SETS[usize::try_from(rng.next_u64() % 5).unwrap()]
                ),
            };
            if section == "feed" {
                prefixes.push(net);
                feed.push(net);
                continue;
            }
            let json = match section {
                "networks" => format!(r#"{{"name": "n{i}", "cidr": "{net}"{ports}}}"#),
                "devices" => format!(r#"{{"name": "h{i}", "address": "{}"{ports}}}"#, net.addr()),
                "deny" => format!(r#"{{"name": "d{i}", "cidr": "{net}"}}"#),
                _ => {
                    // Mostly the protocols whose packets the generator sends most.
                    let protocol = match below(rng, 10) {
                        0..=3 => "openvpn",
                        4 | 5 => "wireguard",
                        6 => "ipsec",
                        _ => VPN_PROTOCOLS[below(rng, 12)],
                    };
                    let port = match rng.next_u64() % 3 {
                        0 => String::new(),
                        _ => format!(
                            r#", "port": {}"#,
                            [1194, 51820, 443, 500, 4500]
                                [usize::try_from(rng.next_u64() % 5).unwrap()]
                        ),
                    };
                    format!(
                        r#"{{"name": "v{i}", "address": "{net}", "protocol": "{protocol}"{port}, "approval": "NITB-{i}"}}"#
                    )
                }
            };
            if section == "vpn_endpoints" {
                endpoints.push(net);
            }
            prefixes.push(net);
            entries.push((section, json));
        }
        Self {
            entries,
            prefixes,
            endpoints,
            feed,
        }
    }

    /// The deny feed the registry names (`FEED_FILE`, beside it): one range a line.
    pub fn feed_text(&self) -> String {
        let mut text = String::from("# generated deny feed\n");
        for net in &self.feed {
            text.push_str(&format!("{net}\n"));
        }
        text
    }

    /// The registry as JSON text.
    pub fn text(&self) -> String {
        let section = |name: &str| {
            self.entries
                .iter()
                .filter(|(s, _)| *s == name)
                .map(|(_, json)| json.as_str())
                .collect::<Vec<_>>()
                .join(",\n    ")
        };
        format!(
            "{{\"schema\": 1, \"mode\": \"enforce\",\n  \"networks\": [{}],\n  \"devices\": [{}],\n  \"deny\": [{}],\n  \"deny_files\": [\"{FEED_FILE}\"],\n  \"vpn_endpoints\": [{}]}}",
            section("networks"),
            section("devices"),
            section("deny"),
            section("vpn_endpoints")
        )
    }
}

/// A prefix in the clusters the generated sources come from: `10.0.0.0/8` around a few
/// anchors, and `2001:db8::/32` at a few lengths (the IPv6 lookup takes at most 8 lengths under
/// one /16 or /32). `host`: one address.
fn random_prefix(rng: &mut Rng, host: bool, narrow: bool) -> ipnet::IpNet {
    if rng.next_u64().is_multiple_of(3) {
        let len = if host {
            128
        } else if narrow {
            [64, 96, 112, 128][below(rng, 4)]
        } else {
            [32, 48, 56, 64, 96, 112, 128][below(rng, 7)]
        };
        let addr = (0x2001_0db8_u128 << 96)
            | u128::from(rng.next_u64() % 3) << 80
            | u128::from(rng.next_u64() % 3) << 64
            | u128::from(rng.next_u64() % 5);
        ipnet::Ipv6Net::new(addr.into(), len)
            .unwrap()
            .trunc()
            .into()
    } else {
        let len = match (host, narrow) {
            (true, _) => 32,
            (false, true) => 20 + rng.next_u64() % 13,
            (false, false) => 8 + rng.next_u64() % 25,
        };
        let addr = u32::try_from(rng.next_u64() & 0x0003_03FF | 0x0A00_0000).unwrap();
        ipnet::Ipv4Net::new(addr.into(), u8::try_from(len).unwrap())
            .unwrap()
            .trunc()
            .into()
    }
}

/// An index drawn with the given weights.
pub(crate) fn weighted(rng: &mut Rng, weights: &[u64]) -> usize {
    let total: u64 = weights.iter().sum();
    let mut roll = rng.next_u64() % total;
    for (i, w) in weights.iter().enumerate() {
        if roll < *w {
            return i;
        }
        roll -= w;
    }
    weights.len() - 1
}

/// The ports the VPN signatures and the port sets name, and a few others.
const PORTS: [u16; 14] = [
    22, 53, 80, 443, 500, 1194, 1701, 1723, 2408, 4500, 8080, 41641, 51820, 40000,
];

pub(crate) fn pick_port(rng: &mut Rng) -> u16 {
    if rng.next_u64().is_multiple_of(5) {
        u16::try_from(rng.next_u64() % 65_536).unwrap()
    } else {
        PORTS[usize::try_from(rng.next_u64() % 14).unwrap()]
    }
}

/// A number below `n`.
pub(crate) fn below(rng: &mut Rng, n: usize) -> usize {
    usize::try_from(rng.next_u64() % n as u64).unwrap()
}

pub(crate) fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64().to_le_bytes()[3]).collect()
}

/// The session id of an `OpenVPN` reset at the start of `data`.
pub(crate) fn reset_session(data: &[u8]) -> Option<[u8; 8]> {
    matches!(data.first(), Some(0x38 | 0x40 | 0x50))
        .then(|| data.get(1..9)?.try_into().ok())
        .flatten()
}
