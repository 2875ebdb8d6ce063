//! The frame generator: well-formed frames of every kind the parser and the verdict order
//! tell apart, follow-ups of the `OpenVPN` resets it sent, random bytes, and mutations.

use std::net::IpAddr;

use enforcer_common::Reason;

use super::{
    Generated, below,
    payloads::{mutate, tcp_payload, vpn_payload},
    pick_port, random_bytes, reset_session, weighted,
};
use crate::{
    packet::{Frame, L4},
    rng::Rng,
};

const SERVER_V4: &str = "10.255.0.1";
const SERVER_V6: &str = "2001:db8:ffff::1";

/// The frame generator, with the resets it sent (their flows get follow-up packets).
pub struct Frames<'g> {
    registry: &'g Generated,
    /// (source, source port, destination, destination port, TCP, session id) of resets sent.
    resets: Vec<(IpAddr, u16, IpAddr, u16, bool, [u8; 8])>,
    kinds: std::collections::BTreeMap<&'static str, u64>,
}

impl<'g> Frames<'g> {
    pub fn new(registry: &'g Generated) -> Self {
        Self {
            registry,
            resets: Vec::new(),
            kinds: std::collections::BTreeMap::new(),
        }
    }

    /// The kinds of frames sent and the reasons counted, for the log.
    pub fn coverage(&self, reasons: &[(Reason, u64)]) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let reasons: Vec<String> = reasons
            .iter()
            .map(|(r, n)| format!("{} {n}", r.label()))
            .collect();
        format!("{}; frames: {}", reasons.join(", "), kinds.join(", "))
    }

    fn count(&mut self, kind: &'static str) {
        *self.kinds.entry(kind).or_default() += 1;
    }

    /// The next frame.
    pub fn next(&mut self, rng: &mut Rng) -> Vec<u8> {
        let roll = rng.next_u64() % 100;
        let mut frame = if roll < 3 {
            self.count("random bytes");
            let len = 14 + usize::try_from(rng.next_u64() % 120).unwrap();
            return random_bytes(rng, len);
        } else if roll < 15 && !self.resets.is_empty() {
            self.count("follow-up of a reset");
            self.follow_up(rng)
        } else {
            self.well_formed(rng)
        };
        if rng.next_u64() % 100 < 35 {
            self.count("mutated");
            mutate(rng, &mut frame);
        }
        frame
    }

    fn source(&self, rng: &mut Rng) -> IpAddr {
        let pool = if self.registry.endpoints.is_empty() || !rng.next_u64().is_multiple_of(4) {
            &self.registry.prefixes
        } else {
            &self.registry.endpoints
        };
        let near = pool[below(rng, pool.len())];
        if rng.next_u64().is_multiple_of(3) {
            // Inside the prefix itself.
            return match near {
                ipnet::IpNet::V4(n) => {
                    let span = u32::MAX >> n.prefix_len().min(31);
                    let offset = u32::try_from(rng.next_u64() >> 32).unwrap() & span;
                    std::net::Ipv4Addr::from(u32::from(n.network()) | offset).into()
                }
                ipnet::IpNet::V6(n) => {
                    let span = u128::MAX >> n.prefix_len().min(127);
                    let offset = u128::from(rng.next_u64()) & span;
                    std::net::Ipv6Addr::from(u128::from(n.network()) | offset).into()
                }
            };
        }
        rng.address_near(&near)
    }

    fn well_formed(&mut self, rng: &mut Rng) -> Vec<u8> {
        let src = self.source(rng);
        let v6 = src.is_ipv6();
        let dst: IpAddr = if rng.next_u64().is_multiple_of(8) {
            // Towards a VPN endpoint (an approval may cover the destination).
            let net = self.registry.prefixes
                [usize::try_from(rng.next_u64()).unwrap() % self.registry.prefixes.len()];
            if net.addr().is_ipv6() == v6 {
                net.addr()
            } else if v6 {
                SERVER_V6.parse().unwrap()
            } else {
                SERVER_V4.parse().unwrap()
            }
        } else if v6 {
            SERVER_V6.parse().unwrap()
        } else {
            SERVER_V4.parse().unwrap()
        };
        let sport = pick_port(rng);
        let dport = pick_port(rng);
        let l4 = match rng.next_u64() % 12 {
            0..=3 => {
                let (kind, data) = vpn_payload(rng);
                self.count(kind);
                if let Some(session) = reset_session(&data) {
                    self.resets.push((src, sport, dst, dport, false, session));
                }
                L4::UdpData {
                    src_port: sport,
                    dst_port: dport,
                    data,
                }
            }
            4..=6 => {
                let (kind, data) = tcp_payload(rng);
                self.count(kind);
                if let Some(session) = data.get(2..).and_then(reset_session) {
                    self.resets.push((src, sport, dst, dport, true, session));
                }
                L4::TcpData {
                    src_port: sport,
                    dst_port: dport,
                    data,
                }
            }
            7 => {
                self.count("tcp syn");
                L4::Tcp { dst_port: dport }
            }
            8 => {
                self.count("icmp echo");
                L4::Echo
            }
            9 => {
                self.count("icmpv6 other");
                L4::Icmpv6 {
                    kind: [128, 129, 133, 134, 135, 136, 143, 1]
                        [usize::try_from(rng.next_u64() % 8).unwrap()],
                }
            }
            10 => {
                self.count("esp/ah/l2tpv3/other protocol");
                L4::Raw {
                    proto: [50, 51, 115, 99, 132][usize::try_from(rng.next_u64() % 5).unwrap()],
                    bytes: {
                        let len = 8 + below(rng, 40);
                        random_bytes(rng, len)
                    },
                }
            }
            _ => {
                self.count("gre");
                let mut bytes = vec![0x30, 0x01, 0x88, 0x0B];
                if rng.next_u64().is_multiple_of(3) {
                    bytes[0] = u8::try_from(rng.next_u64() % 256).unwrap();
                }
                bytes.extend(random_bytes(rng, 12));
                L4::Raw { proto: 47, bytes }
            }
        };
        let mut frame = Frame::new(src, dst, l4).hop_limit(if rng.next_u64().is_multiple_of(2) {
            255
        } else {
            64
        });
        for _ in 0..weighted(rng, &[70, 18, 9, 3]) {
            let tpid = if rng.next_u64().is_multiple_of(2) {
                0x8100
            } else {
                0x88A8
            };
            frame = frame.vlan(tpid, u16::try_from(rng.next_u64() % 4095).unwrap());
        }
        if !v6 && rng.next_u64().is_multiple_of(8) {
            frame = frame.ipv4_options(4 * usize::try_from(rng.next_u64() % 11).unwrap());
        }
        if v6 && rng.next_u64().is_multiple_of(5) {
            for _ in 0..weighted(rng, &[0, 40, 20, 10, 5, 5, 5, 5, 5, 3, 2]) {
                let kind = [0, 43, 60][usize::try_from(rng.next_u64() % 3).unwrap()];
                frame =
                    frame.ipv6_ext(kind, 8 * (1 + usize::try_from(rng.next_u64() % 2).unwrap()));
            }
        }
        if rng.next_u64().is_multiple_of(7) {
            self.count("fragment");
            // A few ids, so that later fragments meet the first fragments that passed.
            let id = u32::try_from(rng.next_u64() % 4).unwrap();
            frame = if rng.next_u64().is_multiple_of(2) {
                frame.fragment(0, true, id)
            } else {
                frame.fragment(
                    u16::try_from(1 + rng.next_u64() % 185).unwrap(),
                    rng.next_u64().is_multiple_of(2),
                    id,
                )
            };
        }
        frame.build()
    }

    /// A packet of a flow that sent a reset: a control packet with its session id (or another),
    /// a data packet, or the other end's packet.
    fn follow_up(&mut self, rng: &mut Rng) -> Vec<u8> {
        let (src, sport, dst, dport, tcp, session) =
            self.resets[usize::try_from(rng.next_u64()).unwrap() % self.resets.len()];
        let mut data = match rng.next_u64() % 4 {
            0 | 1 => [vec![0x20], session.to_vec(), random_bytes(rng, 30)].concat(),
            2 => [vec![0x48], random_bytes(rng, 60)].concat(),
            _ => [vec![0x28], random_bytes(rng, 38)].concat(),
        };
        if tcp {
            let len = u16::try_from(data.len()).unwrap().to_be_bytes();
            data.splice(0..0, len);
        }
        let (src, sport, dst, dport) = if rng.next_u64().is_multiple_of(4) {
            (dst, dport, src, sport)
        } else {
            (src, sport, dst, dport)
        };
        let l4 = if tcp {
            L4::TcpData {
                src_port: sport,
                dst_port: dport,
                data,
            }
        } else {
            L4::UdpData {
                src_port: sport,
                dst_port: dport,
                data,
            }
        };
        Frame::new(src, dst, l4).build()
    }
}
