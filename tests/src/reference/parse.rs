//! The reference's frame parser: Ethernet, two VLAN tags at most, IPv4, IPv6 and its extension
//! headers, the transport header; link control, malformed and non-IP frames as documented.

use std::net::IpAddr;

use super::{be16, get};

/// A parsed frame.
pub(super) enum Parsed {
    LinkControl,
    NonIp,
    Malformed,
    Ip(Ip),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fragment {
    Whole,
    First([u8; 4]),
    Later([u8; 4]),
}

pub(super) struct Ip {
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) proto: u8,
    pub(super) fragment: Fragment,
    pub(super) transport: Transport,
}

/// Where a payload lies: offset in the frame, bytes in this packet, bytes in the datagram.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Payload {
    pub(super) offset: usize,
    pub(super) len: usize,
    pub(super) total: usize,
}

pub(super) enum Transport {
    Ports {
        src_port: u16,
        dst_port: u16,
        payload: Payload,
    },
    Icmp,
    Other(Payload),
    /// A later fragment: no header to read.
    None,
}

pub(super) const TCP: u8 = 6;
pub(super) const UDP: u8 = 17;

pub(super) fn parse(frame: &[u8]) -> Parsed {
    let Some(mut ether_type) = be16(frame, 12) else {
        return Parsed::Malformed;
    };
    let mut l3 = 14;
    for _ in 0..2 {
        if ether_type != 0x8100 && ether_type != 0x88A8 {
            break;
        }
        let Some(inner) = be16(frame, l3 + 2) else {
            return Parsed::Malformed;
        };
        ether_type = inner;
        l3 += 4;
    }
    let link_local_group = frame[..5] == [0x01, 0x80, 0xC2, 0x00, 0x00] && frame[5] & 0xF0 == 0;
    match ether_type {
        0x0800 => parse_v4(frame, l3).unwrap_or(Parsed::Malformed),
        0x86DD => parse_v6(frame, l3).unwrap_or(Parsed::Malformed),
        0x0806 => Parsed::LinkControl,
        0x8809 | 0x888E | 0x88CC if link_local_group => Parsed::LinkControl,
        length if length < 0x0600 && l3 == 14 && link_local_group => Parsed::LinkControl,
        _ => Parsed::NonIp,
    }
}

/// `None`: malformed.
fn parse_v4(frame: &[u8], l3: usize) -> Option<Parsed> {
    let h = get(frame, l3, 20)?;
    let header_len = usize::from(h[0] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || header_len < 20 || total < header_len || l3 + total > frame.len() {
        return None;
    }
    let (ttl, proto) = (h[8], h[9]);
    let src = IpAddr::from(<[u8; 4]>::try_from(&h[12..16]).unwrap());
    let dst_bytes: [u8; 4] = h[16..20].try_into().unwrap();
    if proto == 2 && dst_bytes[..3] == [224, 0, 0] && ttl == 1 {
        return Some(Parsed::LinkControl);
    }
    let flags_offset = u16::from_be_bytes([h[6], h[7]]);
    let offset_8 = flags_offset & 0x1FFF;
    let id = [h[4], h[5], 0, 0];
    let fragment = if offset_8 != 0 {
        Fragment::Later(id)
    } else if flags_offset & 0x2000 != 0 {
        Fragment::First(id)
    } else {
        Fragment::Whole
    };
    let dst = IpAddr::from(dst_bytes);
    if let Fragment::Later(_) = fragment {
        if proto == TCP && offset_8 == 1 {
            return None;
        }
        return Some(Parsed::Ip(Ip {
            src,
            dst,
            proto,
            fragment,
            transport: Transport::None,
        }));
    }
    let transport = transport(frame, l3 + header_len, total - header_len, proto)?;
    Some(Parsed::Ip(Ip {
        src,
        dst,
        proto,
        fragment,
        transport,
    }))
}

/// `None`: malformed.
fn parse_v6(frame: &[u8], l3: usize) -> Option<Parsed> {
    let h = get(frame, l3, 40)?;
    let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if h[0] >> 4 != 6 || payload_len == 0 || l3 + 40 + payload_len > frame.len() {
        return None;
    }
    let hop_limit = h[7];
    let src_bytes: [u8; 16] = h[8..24].try_into().unwrap();
    let src = IpAddr::from(src_bytes);
    let dst = IpAddr::from(<[u8; 16]>::try_from(&h[24..40]).unwrap());
    let mut next = h[6];
    let mut walked = 0usize;
    let mut fragment = Fragment::Whole;
    // At most 8 extension headers; a ninth means the protocol is not known: malformed.
    let mut headers = 0;
    loop {
        let at = l3 + 40 + walked;
        match next {
            0 | 43 | 60 => {
                let ext = get(frame, at, 2)?;
                next = ext[0];
                walked += (usize::from(ext[1]) + 1) * 8;
            }
            44 => {
                let ext = get(frame, at, 8)?;
                next = ext[0];
                walked += 8;
                let offset_flags = u16::from_be_bytes([ext[2], ext[3]]);
                let id: [u8; 4] = ext[4..8].try_into().unwrap();
                if offset_flags & 0xFFF8 != 0 {
                    if walked > payload_len {
                        return None;
                    }
                    return Some(Parsed::Ip(Ip {
                        src,
                        dst,
                        proto: next,
                        fragment: Fragment::Later(id),
                        transport: Transport::None,
                    }));
                }
                if offset_flags & 1 != 0 {
                    fragment = Fragment::First(id);
                }
            }
            _ => break,
        }
        headers += 1;
        if walked > payload_len || headers > 8 {
            return None;
        }
    }
    let l4 = l3 + 40 + walked;
    if next == 58 && fragment == Fragment::Whole {
        let kind = get(frame, l4, 4)?[0];
        let link_local = src_bytes[0] == 0xFE && src_bytes[1] & 0xC0 == 0x80;
        let link_control = match kind {
            134 | 137 => hop_limit == 255 && link_local,
            133..=137 => hop_limit == 255,
            130..=132 => link_local,
            143 => link_local || src_bytes == [0; 16],
            _ => false,
        };
        if link_control {
            return Some(Parsed::LinkControl);
        }
    }
    let transport = transport(frame, l4, payload_len - walked, next)?;
    Some(Parsed::Ip(Ip {
        src,
        dst,
        proto: next,
        fragment,
        transport,
    }))
}

/// The transport header of a whole datagram or a first fragment; `None`: malformed.
fn transport(frame: &[u8], l4: usize, ip_payload_len: usize, proto: u8) -> Option<Transport> {
    match proto {
        TCP => {
            let h = get(frame, l4, 20)?;
            let header_len = usize::from(h[12] >> 4) * 4;
            if header_len < 20 || header_len > ip_payload_len {
                return None;
            }
            let len = ip_payload_len - header_len;
            Some(Transport::Ports {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                payload: Payload {
                    offset: l4 + header_len,
                    len,
                    total: len,
                },
            })
        }
        UDP => {
            let h = get(frame, l4, 8)?;
            let udp_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
            if ip_payload_len < 8 || udp_len < 8 {
                return None;
            }
            let total = udp_len - 8;
            Some(Transport::Ports {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                payload: Payload {
                    offset: l4 + 8,
                    len: total.min(ip_payload_len - 8),
                    total,
                },
            })
        }
        1 | 58 => {
            get(frame, l4, 4)?;
            (ip_payload_len >= 4).then_some(Transport::Icmp)
        }
        _ => Some(Transport::Other(Payload {
            offset: l4,
            len: ip_payload_len,
            total: ip_payload_len,
        })),
    }
}
