//! Protocol edges through the real program (`BPF_PROG_TEST_RUN`): the link-layer protocols a
//! server's NIC needs (bonding, port authentication, discovery, spanning tree) pass as link
//! control, valid IPv6 extension-header chains are not malformed, and neighbour discovery
//! inside a fragment (forbidden by RFC 6980) is not link control.

use enforcer_common::Reason::{Allowed, LinkControl, NonIp, NotAllowlisted};
use enforcer_tests::{
    kernel::{Loaded, case, check_table},
    packet::{self, Frame, L4},
};

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce",
  "networks": [{"name": "open6", "cidr": "2001:db8:200::/48"}]}"#;

const SERVER6: &str = "2001:db8:1::1";

/// A frame of `ether_type` to the IEEE link-local group address `01:80:c2:00:00:0X`.
fn link_local(group: u8, ether_type: u16, body: &[u8]) -> Vec<u8> {
    let mut frame = packet::ethernet_header(&[], ether_type);
    frame[..6].copy_from_slice(&[0x01, 0x80, 0xC2, 0, 0, group]);
    frame.extend_from_slice(body);
    frame.resize(frame.len().max(60), 0);
    frame
}

/// A spanning-tree BPDU: an 802.3 frame (length, not `EtherType`) with LLC 42/42/03.
fn stp_bpdu() -> Vec<u8> {
    let mut body = vec![0x42, 0x42, 0x03, 0, 0, 0, 0];
    body.extend_from_slice(&[0; 28]);
    let length = u16::try_from(body.len()).unwrap();
    link_local(0x00, length, &body)
}

/// An `ICMPv6` message of type `kind` from `src` (hop limit 255), in `fragment` if given.
fn icmpv6(src: &str, kind: u8, fragment: Option<(u16, bool)>) -> Vec<u8> {
    let mut frame = Frame::new(
        src.parse().unwrap(),
        SERVER6.parse().unwrap(),
        L4::Icmpv6 { kind },
    )
    .hop_limit(255);
    if let Some((offset, more)) = fragment {
        frame = frame.fragment(offset, more, 9);
    }
    frame.build()
}

#[test]
fn link_layer_protocols_the_nic_needs_pass() {
    let loaded = Loaded::new(REGISTRY);
    check_table(
        &loaded,
        false,
        &[
            case(
                "LACP (slow protocols, bonding)",
                link_local(0x02, 0x8809, &[0x01, 0x01]),
                LinkControl,
                None,
            ),
            case(
                "802.1X EAPOL (port authentication)",
                link_local(0x03, 0x888E, &[0x02, 0x00, 0x00, 0x05]),
                LinkControl,
                None,
            ),
            case(
                "LLDP (discovery)",
                link_local(0x0E, 0x88CC, &[0x02, 0x07, 0x04]),
                LinkControl,
                None,
            ),
            case("STP BPDU (802.3 LLC)", stp_bpdu(), LinkControl, None),
            // The same protocols to an ordinary address are not link control.
            case(
                "LLDP to a unicast address",
                packet::non_ip_frame(),
                NonIp,
                None,
            ),
            case(
                "an 802.3 frame to a unicast address",
                {
                    let mut f = stp_bpdu();
                    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
                    f
                },
                NonIp,
                None,
            ),
        ],
    );
}

#[test]
fn valid_ipv6_chains_and_fragmented_ndp() {
    let loaded = Loaded::new(REGISTRY);
    // A Mobility header (RFC 6275): payload proto 59 (none), length 0 (8 bytes), a Binding
    // Refresh Request (type 0).
    let mobility = Frame::new(
        "2001:db8:200::5".parse().unwrap(),
        SERVER6.parse().unwrap(),
        L4::Raw {
            proto: 135,
            bytes: vec![59, 0, 0, 0, 0, 0, 0, 0],
        },
    );
    check_table(
        &loaded,
        false,
        &[
            case(
                "destination options, then a Mobility header",
                mobility.clone().ipv6_ext(60, 8).build(),
                Allowed,
                Some("open6"),
            ),
            case(
                "a Mobility header alone",
                mobility.build(),
                Allowed,
                Some("open6"),
            ),
            case(
                "hop-by-hop options, then a first fragment of UDP",
                Frame::udp("2001:db8:200::5", SERVER6, 53)
                    .ipv6_ext(0, 8)
                    .fragment(0, true, 7)
                    .build(),
                Allowed,
                Some("open6"),
            ),
            case(
                "neighbour solicitation, whole, from anywhere",
                icmpv6("2001:db8:bad::66", 135, None),
                LinkControl,
                None,
            ),
            case(
                "neighbour solicitation in a first fragment (RFC 6980), unlisted source",
                icmpv6("2001:db8:bad::66", 135, Some((0, true))),
                NotAllowlisted,
                None,
            ),
            case(
                "router advertisement in a fragment, link-local source",
                icmpv6("fe80::1", 134, Some((0, true))),
                NotAllowlisted,
                None,
            ),
        ],
    );
}
