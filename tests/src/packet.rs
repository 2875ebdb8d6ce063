//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`: a small builder that writes real headers
//! (lengths and checksums where the kernel program could care), so each table row says in one
//! line what it sends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_LLDP: u16 = 0x88CC;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const GRE: u8 = 47;

/// The transport part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        dst_port: u16,
    },
    Udp {
        dst_port: u16,
    },
    /// ICMP echo request (`ICMPv6` echo request on IPv6).
    Echo,
    /// An `ICMPv6` message of this type (NDP, MLD, ...).
    Icmpv6 {
        kind: u8,
    },
    /// Raw bytes of another protocol.
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
    /// A UDP datagram with this exact payload (`Frame::payload` is ignored).
    UdpData {
        src_port: u16,
        dst_port: u16,
        data: Vec<u8>,
    },
    /// A TCP segment (ACK|PSH) with this exact payload.
    TcpData {
        src_port: u16,
        dst_port: u16,
        data: Vec<u8>,
    },
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } | Self::TcpData { .. } => TCP,
            Self::Udp { .. } | Self::UdpData { .. } => UDP,
            Self::Echo if v6 => ICMPV6,
            Self::Echo => ICMP,
            Self::Icmpv6 { .. } => ICMPV6,
            Self::Raw { proto, .. } => *proto,
        }
    }

    fn bytes(&self, v6: bool, payload: usize) -> Vec<u8> {
        let mut out = match self {
            Self::Tcp { dst_port } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&40_000u16.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[12] = 5 << 4; // data offset: 5 words
                h[13] = 0x02; // SYN
                h[14..16].copy_from_slice(&64_240u16.to_be_bytes());
                h
            }
            Self::Udp { dst_port } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&40_000u16.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&u16::try_from(8 + payload).unwrap().to_be_bytes());
                h
            }
            Self::Echo => vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1],
            Self::Icmpv6 { kind } => vec![*kind, 0, 0, 0, 0, 0, 0, 0],
            Self::Raw { bytes, .. } => bytes.clone(),
            Self::UdpData {
                src_port,
                dst_port,
                data,
            } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&u16::try_from(8 + data.len()).unwrap().to_be_bytes());
                h.extend_from_slice(data);
                return h;
            }
            Self::TcpData {
                src_port,
                dst_port,
                data,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = 0x18; // ACK | PSH
                h[14..16].copy_from_slice(&64_240u16.to_be_bytes());
                h.extend_from_slice(data);
                return h;
            }
        };
        out.extend(std::iter::repeat_n(0xAB, payload));
        out
    }
}

/// A frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    vlans: Vec<(u16, u16)>,
    src: IpAddr,
    dst: IpAddr,
    l4: L4,
    payload: usize,
    ipv4_options: usize,
    /// (offset in 8-byte units, more fragments, id).
    fragment: Option<(u16, bool, u32)>,
    /// IPv6 extension headers to put first: (next-header number, total length in bytes).
    ipv6_ext: Vec<(u8, usize)>,
    hop_limit: u8,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            vlans: Vec::new(),
            src,
            dst,
            l4,
            payload: 16,
            ipv4_options: 0,
            fragment: None,
            ipv6_ext: Vec::new(),
            hop_limit: 64,
        }
    }

    pub fn tcp(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            L4::Tcp { dst_port },
        )
    }

    pub fn udp(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            L4::Udp { dst_port },
        )
    }

    /// UDP from `src:src_port` to `dst:dst_port` carrying `data`.
    pub fn udp_data(src: &str, src_port: u16, dst: &str, dst_port: u16, data: Vec<u8>) -> Self {
        Self::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            L4::UdpData {
                src_port,
                dst_port,
                data,
            },
        )
    }

    pub fn echo(src: &str, dst: &str) -> Self {
        Self::new(src.parse().unwrap(), dst.parse().unwrap(), L4::Echo)
    }

    /// Adds an outer-to-inner VLAN tag with this TPID (0x8100 or 0x88a8).
    #[must_use]
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    #[must_use]
    pub fn payload(mut self, bytes: usize) -> Self {
        self.payload = bytes;
        self
    }

    /// IPv4 options of this many bytes (a multiple of 4, at most 40).
    #[must_use]
    pub fn ipv4_options(mut self, bytes: usize) -> Self {
        self.ipv4_options = bytes;
        self
    }

    /// Makes this a fragment: `offset` in 8-byte units, `more` = MF flag.
    #[must_use]
    pub fn fragment(mut self, offset: u16, more: bool, id: u32) -> Self {
        self.fragment = Some((offset, more, id));
        self
    }

    /// Adds an IPv6 extension header (hop-by-hop 0, routing 43, destination options 60) of
    /// `len` bytes (a multiple of 8).
    #[must_use]
    pub fn ipv6_ext(mut self, kind: u8, len: usize) -> Self {
        self.ipv6_ext.push((kind, len));
        self
    }

    #[must_use]
    pub fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let ether_type = if v6 { ETH_P_IPV6 } else { ETH_P_IPV4 };
        let mut frame = ethernet_header(&self.vlans, ether_type);
        let is_later_fragment = self.fragment.is_some_and(|(offset, ..)| offset > 0);
        let l4 = if is_later_fragment {
            vec![0xCD; self.payload.max(8)]
        } else {
            self.l4.bytes(v6, self.payload)
        };
        let proto = self.l4.proto(v6);
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => frame.extend(self.ipv4(src, dst, proto, &l4)),
            (IpAddr::V6(src), IpAddr::V6(dst)) => frame.extend(self.ipv6(src, dst, proto, &l4)),
            _ => panic!("mixed address families"),
        }
        frame
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        assert!(self.ipv4_options.is_multiple_of(4) && self.ipv4_options <= 40);
        let header_len = 20 + self.ipv4_options;
        let total = header_len + l4.len();
        let mut h = vec![0u8; header_len];
        h[0] = 0x40 | u8::try_from(header_len / 4).unwrap();
        h[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
        let (offset, more, id) = self.fragment.unwrap_or((0, false, 0x1234));
        h[4..6].copy_from_slice(&u16::try_from(id & 0xFFFF).unwrap().to_be_bytes());
        let flags = offset | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        h[8] = self.hop_limit;
        h[9] = proto;
        h[12..16].copy_from_slice(&src.octets());
        h[16..20].copy_from_slice(&dst.octets());
        for option in &mut h[20..] {
            *option = 1; // NOP options
        }
        let checksum = internet_checksum(&h);
        h[10..12].copy_from_slice(&checksum.to_be_bytes());
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        // Chain: extension headers in order, then the fragment header if any, then L4.
        let mut kinds: Vec<(u8, usize)> = self.ipv6_ext.clone();
        if self.fragment.is_some() {
            kinds.push((44, 8));
        }
        let mut ext = Vec::new();
        for (i, (kind, len)) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).map_or(proto, |(k, _)| *k);
            if *kind == 44 {
                let (offset, more, id) = self.fragment.unwrap();
                ext.push(next);
                ext.push(0);
                ext.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                ext.extend_from_slice(&id.to_be_bytes());
            } else {
                assert!(len % 8 == 0 && *len >= 8);
                ext.push(next);
                ext.push(u8::try_from(len / 8 - 1).unwrap());
                // One PadN option fills the header.
                ext.push(1);
                ext.push(u8::try_from(len - 4).unwrap());
                ext.extend(std::iter::repeat_n(0, len - 4));
            }
        }
        let first = kinds.first().map_or(proto, |(k, _)| *k);
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&u16::try_from(ext.len() + l4.len()).unwrap().to_be_bytes());
        h[6] = first;
        h[7] = self.hop_limit;
        h[8..24].copy_from_slice(&src.octets());
        h[24..40].copy_from_slice(&dst.octets());
        h.extend(ext);
        h.extend_from_slice(l4);
        h
    }
}

/// Ethernet header (and VLAN tags) in front of `ether_type`.
pub fn ethernet_header(vlans: &[(u16, u16)], ether_type: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    for (tpid, vid) in vlans {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&vid.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// An ARP request frame.
/// A TCP segment from `src:src_port` to `dst:dst_port` with these flags (20-byte header).
pub fn tcp_segment(src: &str, src_port: u16, dst: &str, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    Frame::new(
        src.parse().expect("source address"),
        dst.parse().expect("destination address"),
        L4::Raw {
            proto: TCP,
            bytes: h,
        },
    )
    .build()
}

pub fn arp_request() -> Vec<u8> {
    let mut frame = ethernet_header(&[], ETH_P_ARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 198, 51, 100, 10]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 51, 100, 1]);
    frame
}

/// A frame of another `EtherType` (LLDP here), padded to the Ethernet minimum.
pub fn non_ip_frame() -> Vec<u8> {
    let mut frame = ethernet_header(&[], ETH_P_LLDP);
    frame.resize(60, 0);
    frame
}

/// RFC 1071 checksum.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}
