//! VPN-shaped payloads (some one byte off) and the mutations applied to frames.

use super::{below, random_bytes, weighted};
use crate::rng::Rng;

/// A UDP payload shaped like a VPN's packet (or like one almost: a field off by one), or plain.
pub(super) fn vpn_payload(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    let time = 0x42 + u8::try_from(rng.next_u64() % 0x4A).unwrap();
    let session = random_bytes(rng, 8);
    // OpenVPN and WireGuard twice as often as the rest.
    let (kind, mut data) = match [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5,
    ][below(rng, 22)]
    {
        0 => (
            "wireguard initiation",
            [vec![1, 0, 0, 0], random_bytes(rng, 144)].concat(),
        ),
        1 => {
            let blocks = 1 + below(rng, 6);
            let counter = random_bytes(rng, 8);
            (
                "wireguard data",
                [
                    vec![4, 0, 0, 0],
                    counter,
                    vec![0; 4],
                    random_bytes(rng, 16 * blocks),
                ]
                .concat(),
            )
        }
        2 => (
            "openvpn plain reset",
            [vec![0x38], session, vec![0; 5]].concat(),
        ),
        3 => {
            let hmac = [16, 20, 32, 48, 64][usize::try_from(rng.next_u64() % 5).unwrap()];
            (
                "openvpn tls-auth reset",
                [
                    vec![0x38],
                    session,
                    random_bytes(rng, hmac),
                    vec![0, 0, 0, 1, time, 0, 0, 0, 0, 0, 0, 0, 0],
                ]
                .concat(),
            )
        }
        4 => (
            "openvpn tls-crypt reset",
            [
                vec![0x38],
                session,
                vec![0, 0, 0, 1, time],
                random_bytes(rng, 40),
            ]
            .concat(),
        ),
        5 => (
            "openvpn server reset",
            [
                vec![0x40],
                session,
                vec![1, 0, 0, 0, 0],
                random_bytes(rng, 8),
                vec![0; 4],
            ]
            .concat(),
        ),
        6 => {
            let len = 344 + usize::try_from(rng.next_u64() % 100).unwrap();
            let mut d = [vec![0x50], session, vec![0, 0, 0, 1, time]].concat();
            d.extend(random_bytes(rng, len - d.len() - 2));
            let wkc = u16::try_from(len - 60).unwrap();
            d.extend(wkc.to_be_bytes());
            ("openvpn tls-crypt-v2 reset", d)
        }
        7 => {
            let mut h = [
                random_bytes(rng, 8),
                vec![0; 8],
                vec![33, 0x20, 34, 0x08],
                vec![0; 4],
            ]
            .concat();
            let total = 28 + usize::try_from(rng.next_u64() % 40).unwrap();
            h.extend((u32::try_from(total).unwrap()).to_be_bytes());
            h.extend(random_bytes(rng, total - 28));
            ("ike", h)
        }
        8 => (
            "l2tp",
            [vec![0xC8, 0x02, 0, 20], random_bytes(rng, 16)].concat(),
        ),
        9 => (
            "dtls",
            [
                vec![23, 1, 0],
                random_bytes(rng, 8),
                vec![0, 10],
                random_bytes(rng, 10),
            ]
            .concat(),
        ),
        10 => (
            "tailscale disco",
            [b"TS\xF0\x9F\x92\xAC".to_vec(), random_bytes(rng, 60)].concat(),
        ),
        11 => (
            "lightway",
            [vec![b'H', b'e', 1, 0, 0, 0, 0, 0], random_bytes(rng, 12)].concat(),
        ),
        12 => ("softether", b"IP=10.0.0.1,PORT=443".to_vec()),
        13 => {
            let mut z = random_bytes(rng, 120);
            z[18] &= !0x38;
            z[27] = 1;
            z[28] = 10;
            let address: Vec<u8> = z[13..18].to_vec();
            z[41..46].copy_from_slice(&address);
            z[46] = 0;
            ("zerotier hello", z)
        }
        14 => (
            "warp",
            [vec![0xC1, 0, 0, 0], random_bytes(rng, 70)].concat(),
        ),
        _ => {
            let len = below(rng, 80);
            ("plain udp", random_bytes(rng, len))
        }
    };
    if rng.next_u64().is_multiple_of(6) && !data.is_empty() {
        // Almost: one byte off.
        let at = usize::try_from(rng.next_u64()).unwrap() % data.len();
        data[at] = data[at].wrapping_add(1);
    }
    (kind, data)
}

/// A TCP payload: an `OpenVPN` reset behind its length, PPTP control, `UltraSurf`, or plain.
pub(super) fn tcp_payload(rng: &mut Rng) -> (&'static str, Vec<u8>) {
    match rng.next_u64() % 5 {
        0 | 1 => {
            let (_, reset) = loop {
                let (kind, data) = vpn_payload(rng);
                if kind.starts_with("openvpn") {
                    break (kind, data);
                }
            };
            let len = u16::try_from(reset.len()).unwrap().to_be_bytes();
            ("openvpn over tcp", [len.to_vec(), reset].concat())
        }
        2 => (
            "pptp control",
            [
                vec![0, 156, 0, 1, 0x1A, 0x2B, 0x3C, 0x4D, 0, 1, 0, 0],
                random_bytes(rng, 144),
            ]
            .concat(),
        ),
        3 => (
            "ultrasurf",
            [
                vec![0xCC, 0x1C, 0x30, 0x41, 0x5B, 0xA4, 0x38, 0x66],
                random_bytes(rng, 20),
            ]
            .concat(),
        ),
        _ => {
            let len = below(rng, 100);
            ("plain tcp", random_bytes(rng, len))
        }
    }
}

/// One mutation: a byte at a header boundary set to a boundary value, a cut, or a random byte.
pub(super) fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    // Offsets of the fields a parser decides on, for an untagged frame and a tagged one.
    const BOUNDARIES: [usize; 24] = [
        5, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 34, 35, 36, 37, 38, 39, 40, 46, 54, 55,
        58,
    ];
    let values = [
        0, 1, 2, 0x0F, 0x40, 0x45, 0x60, 0x7F, 0x80, 0xFF, 0x11, 0x06, 0x2C, 0x3A,
    ];
    match rng.next_u64() % 4 {
        0 | 1 => {
            let at = BOUNDARIES[usize::try_from(rng.next_u64() % 24).unwrap()]
                + 4 * weighted(rng, &[80, 15, 5]);
            if at < frame.len() {
                frame[at] = values[usize::try_from(rng.next_u64() % 14).unwrap()];
            }
        }
        2 => {
            let keep = 14
                + usize::try_from(rng.next_u64()).unwrap() % frame.len().saturating_sub(13).max(1);
            frame.truncate(keep.min(frame.len()));
        }
        _ => {
            let at = usize::try_from(rng.next_u64()).unwrap() % frame.len();
            frame[at] = rng.next_u64().to_le_bytes()[5];
        }
    }
}
