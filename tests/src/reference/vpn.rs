//! The reference's VPN signatures, one packet at a time, as docs/vpn-signatures.md lists them.

use enforcer_common::VpnProtocol;

use super::{
    get,
    parse::{Payload, TCP, UDP},
};

/// The VPN a packet shows, and whether only the first packets of its flow show it.
pub(super) fn signature(
    frame: &[u8],
    proto: u8,
    src_port: u16,
    dst_port: u16,
    p: Payload,
) -> Option<(VpnProtocol, bool)> {
    match proto {
        50 | 51 => Some((VpnProtocol::Ipsec, false)),
        115 => Some((VpnProtocol::L2tp, false)),
        UDP => udp_signature(frame, src_port, dst_port, p),
        TCP => tcp_signature(frame, p),
        47 => {
            let h = get(frame, p.offset, 4).filter(|_| p.len >= 8)?;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            (flags & 0xEF7F == 0x2001 && h[2..4] == [0x88, 0x0B])
                .then_some((VpnProtocol::Pptp, false))
        }
        _ => None,
    }
}

fn udp_signature(
    frame: &[u8],
    src_port: u16,
    dst_port: u16,
    p: Payload,
) -> Option<(VpnProtocol, bool)> {
    let on = |port: u16| src_port == port || dst_port == port;
    let at = |offset: usize, n: usize| get(frame, p.offset + offset, n);
    // The gate every UDP signature implies (the kernel's fast path relies on it too).
    let gate = on(4500)
        || on(1701)
        || on(2408)
        || (p.len >= 4
            && at(0, 2).is_some_and(
                |b| matches!(b[0], 1..=4 | 20..=23 | 0x38 | 0x40 | 0x50 | b'H' | b'I' | b'T'),
            ))
        || (p.len >= 4 && p.total >= 28 && at(16, 2).is_some_and(|b| b[1] == 0x10 || b[1] == 0x20))
        || (p.len >= 111 && at(26, 2).is_some_and(|b| b[1] & 0x1F == 1));
    if !gate {
        return None;
    }
    if on(4500) && p.len == 1 {
        return Some((VpnProtocol::Ipsec, false));
    }
    if p.len < 4 {
        return None;
    }
    let head: [u8; 4] = at(0, 4)?.try_into().unwrap();
    if on(4500) && p.len >= 8 {
        if head == [0; 4] {
            return ike(frame, p.offset + 4, p.total - 4).then_some((VpnProtocol::Ipsec, false));
        }
        if u32::from_be_bytes(head) > 255 {
            return Some((VpnProtocol::Ipsec, false));
        }
    }
    let wireguard = head[1..4] == [0; 3]
        && p.len == p.total
        && match head[0] {
            1 => p.len == 148 || p.len == 204,
            2 => p.len == 92 || p.len == 100,
            3 => p.len == 64,
            4 => {
                p.len >= 32
                    && (p.len.is_multiple_of(16) || p.len >= 1280)
                    && at(12, 4) == Some(&[0; 4][..])
            }
            _ => false,
        };
    if wireguard {
        return Some((VpnProtocol::WireGuard, false));
    }
    if p.len >= 62 && at(0, 6)? == b"TS\xF0\x9F\x92\xAC" {
        return Some((VpnProtocol::Tailscale, false));
    }
    if on(1701) {
        let flags = u16::from_be_bytes([head[0], head[1]]);
        let l2tp = if flags == 0xC802 {
            usize::from(u16::from_be_bytes([head[2], head[3]])) == p.len
        } else {
            flags & 0x8000 == 0 && flags & 0x34F0 == 0 && flags & 0x000F == 2
        };
        if l2tp {
            return Some((VpnProtocol::L2tp, false));
        }
    }
    if ike(frame, p.offset, p.total) {
        return Some((VpnProtocol::Ipsec, false));
    }
    if openvpn_reset(frame, p.offset, p.len, head[0]) {
        return Some((VpnProtocol::OpenVpn, true));
    }
    if on(2408) {
        let warp = match head[0] {
            0xC1 => head[1..4] == [0; 3] && p.len >= 64,
            0xC2 | 0xC3 => p.len >= 64,
            0xC4 => p.len >= 32 && at(12, 4) == Some(&[0; 4][..]),
            _ => false,
        };
        if warp {
            return Some((VpnProtocol::CloudflareWarp, false));
        }
    }
    if (20..=23).contains(&head[0]) && head[1..3] == [1, 0] && p.len >= 13 {
        let length = at(11, 2)?;
        if usize::from(u16::from_be_bytes([length[0], length[1]])) + 13 <= p.len {
            return Some((VpnProtocol::AnyConnect, false));
        }
    }
    if head[..3] == *b"IP=" && (10..30).contains(&p.len) {
        let window = get(frame, p.offset, p.len)?;
        if (3..24).any(|start| start + 6 <= p.len && window[start..start + 6] == *b",PORT=") {
            return Some((VpnProtocol::SoftEther, false));
        }
    }
    if head[..3] == [b'H', b'e', 1] && p.len > 16 && at(5, 3) == Some(&[0; 3][..]) {
        return Some((VpnProtocol::Lightway, false));
    }
    if p.len >= 111
        && let Some(h) = at(0, 47)
        && h[18] & 0x38 == 0
        && h[27] & 0x1F == 1
        && (4..=30).contains(&h[28])
        && h[41..46] == h[13..18]
        && h[46] == 0
    {
        return Some((VpnProtocol::ZeroTier, false));
    }
    None
}

fn tcp_signature(frame: &[u8], p: Payload) -> Option<(VpnProtocol, bool)> {
    const ULTRASURF: [u8; 8] = [0xCC, 0x1C, 0x30, 0x41, 0x5B, 0xA4, 0x38, 0x66];
    if p.len < 8 {
        return None;
    }
    let head = get(frame, p.offset, 4)?;
    let gate = head[0] == ULTRASURF[0]
        || (p.len >= 14 && (head[2..4] == [0, 1] || matches!(head[2], 0x38 | 0x40 | 0x50)));
    if !gate {
        return None;
    }
    if get(frame, p.offset, 8)? == ULTRASURF {
        return Some((VpnProtocol::UltraSurf, false));
    }
    if p.len < 14 {
        return None;
    }
    let h = get(frame, p.offset, 12)?;
    if h[2..4] == [0, 1]
        && h[4..8] == [0x1A, 0x2B, 0x3C, 0x4D]
        && (1..=15).contains(&u16::from_be_bytes([h[8], h[9]]))
        && h[10..12] == [0, 0]
    {
        return Some((VpnProtocol::Pptp, false));
    }
    let length = usize::from(u16::from_be_bytes([h[0], h[1]]));
    let plausible = (14..=255).contains(&length) || (336..=1278).contains(&length);
    (plausible && length == p.len - 2 && openvpn_reset(frame, p.offset + 2, length, h[2]))
        .then_some((VpnProtocol::OpenVpn, true))
}

/// `net_time`'s top byte: a Unix time from 2005 to 2044.
fn plausible_time(byte: u8) -> bool {
    (0x42..=0x8B).contains(&byte)
}

/// An `OpenVPN` hard reset of `len` bytes at `o` whose first byte is `opcode`.
fn openvpn_reset(frame: &[u8], o: usize, len: usize, opcode: u8) -> bool {
    const PACKET_ID_ONE: [u8; 4] = [0, 0, 0, 1];
    let at = |offset: usize, n: usize| get(frame, o + offset, n);
    match opcode {
        0x38 => {
            if len == 14 {
                return at(9, 5) == Some(&[0; 5][..]);
            }
            if len == 54
                && at(9, 5).is_some_and(|b| b[..4] == PACKET_ID_ONE && plausible_time(b[4]))
            {
                return true;
            }
            let hmac = match len {
                38 => 16,
                42 => 20,
                54 => 32,
                70 => 48,
                86 => 64,
                _ => return false,
            };
            at(9 + hmac, 13).is_some_and(|b| {
                b[..4] == PACKET_ID_ONE && plausible_time(b[4]) && b[8..13] == [0; 5]
            })
        }
        0x40 => {
            if len == 26 || len == 32 {
                return at(9, 17)
                    .is_some_and(|b| b[0] == 1 && b[1..5] == [0; 4] && b[13..17] == [0; 4]);
            }
            if (54..=120).contains(&len)
                && at(9, 5).is_some_and(|b| b[..4] == PACKET_ID_ONE && plausible_time(b[4]))
            {
                return true;
            }
            let hmac = match len {
                50 | 56 => 16,
                54 | 60 => 20,
                66 | 72 => 32,
                82 | 88 => 48,
                98 | 104 => 64,
                _ => return false,
            };
            at(9 + hmac, 25).is_some_and(|b| {
                b[..4] == PACKET_ID_ONE
                    && plausible_time(b[4])
                    && b[8] == 1
                    && b[9..13] == [0; 4]
                    && b[21..25] == [0; 4]
            })
        }
        0x50 => {
            if !(344..1500).contains(&len) {
                return false;
            }
            let (Some(trailer), Some(time)) = (at(len - 2, 2), at(13, 2)) else {
                return false;
            };
            let wkc = usize::from(u16::from_be_bytes([trailer[0], trailer[1]]));
            (290..=len - 54).contains(&wkc) && len - wkc <= 118 && plausible_time(time[0])
        }
        _ => false,
    }
}

/// An IKEv1/IKEv2 header at `offset` whose length field equals `total`.
fn ike(frame: &[u8], offset: usize, total: usize) -> bool {
    if total < 28 {
        return false;
    }
    let Some(h) = get(frame, offset, 28) else {
        return false;
    };
    let length = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
    if h[..8] == [0; 8] || length != total {
        return false;
    }
    let (next, version, exchange, flags) = (h[16], h[17], h[18], h[19]);
    match version {
        0x10 => matches!(exchange, 1..=6 | 32 | 33) && flags < 8 && next <= 13,
        0x20 => {
            matches!(exchange, 34..=37 | 43 | 44)
                && flags & 0xC7 == 0
                && (next == 0 || (33..=54).contains(&next))
        }
        _ => false,
    }
}

/// The session id of the `OpenVPN` control packet a payload starts with (behind the length on
/// TCP), as the kernel reads it (host order); 0 for none.
pub(super) fn openvpn_session(frame: &[u8], p: Payload, tcp: bool) -> u64 {
    let skip = if tcp { 2 } else { 0 };
    let Some(bytes) = get(frame, p.offset, skip + 9) else {
        return 0;
    };
    if p.len < skip + 9 || (tcp && u16::from_be_bytes([bytes[0], bytes[1]]) < 9) {
        return 0;
    }
    let head = &bytes[skip..];
    if !matches!(head[0] >> 3, 1..=5 | 7 | 8 | 10 | 11) {
        return 0;
    }
    u64::from_ne_bytes(head[1..9].try_into().unwrap())
}
