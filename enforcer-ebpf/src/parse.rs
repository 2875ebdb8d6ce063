//! Frame parsing: the only module that touches packet memory. Every read goes through `ptr_at`,
//! which checks the read against `data_end` first, except the fast path's word loads in
//! `plain_v4` and `plain_v6`, which follow one bound check of their own; lengths come from the
//! headers (IPv4 `tot_len`, IPv6 `payload_len`), never from the frame end, because short frames
//! arrive padded.

use core::mem::{offset_of, size_of};

use aya_ebpf::programs::{TcContext, XdpContext};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// Slow protocols: LACP (bonding) and marker.
const ETH_P_SLOW: u16 = 0x8809;
/// 802.1X port authentication.
const ETH_P_EAPOL: u16 = 0x888E;
/// Link layer discovery.
const ETH_P_LLDP: u16 = 0x88CC;
/// Values of the type field below this are 802.3 lengths (an LLC frame follows: spanning tree).
const ETH_P_802_3_MIN: u16 = 0x0600;
/// The IEEE 802.1D link-local group addresses `01:80:C2:00:00:00` to `0F`: bridges never forward
/// frames to them, so they come from the link itself.
const LINK_LOCAL_GROUP: [u8; 5] = [0x01, 0x80, 0xC2, 0x00, 0x00];

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IGMP: u8 = 2;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_L2TPV3: u8 = 115;

/// How many 802.1Q / 802.1ad tags we step over (QinQ).
const MAX_VLAN_TAGS: usize = 2;
/// How many IPv6 extension headers we walk before calling the packet malformed.
const MAX_IPV6_EXT_HEADERS: usize = 8;

const IPV4_DF: u16 = 0x4000;
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1FFF;
const IPV6_FRAG_OFFSET_MASK: u16 = 0xFFF8;
const IPV6_FRAG_MF: u16 = 0x0001;

/// ICMPv6 types of neighbour discovery (RFC 4861) and multicast listener discovery (RFC 2710,
/// RFC 3810), which the link needs to work.
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_DONE: u8 = 132;
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_ROUTER_ADVERT: u8 = 134;
const ICMPV6_REDIRECT: u8 = 137;
const ICMPV6_MLDV2_REPORT: u8 = 143;
/// NDP packets must arrive with hop limit 255 (RFC 4861 §6.1, §7.1): proof they were not routed.
const NDP_HOP_LIMIT: u8 = 255;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: [u8; 2],
}

#[repr(C)]
struct VlanHdr {
    tci: [u8; 2],
    ether_type: [u8; 2],
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The first two bytes every hop-by-hop, routing and destination-options header shares.
#[repr(C)]
struct Ipv6ExtHdr {
    next_header: u8,
    len_8_octets_minus_1: u8,
}

#[repr(C)]
struct Ipv6FragHdr {
    next_header: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

#[repr(C)]
struct TcpHdr {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    data_offset: u8,
    flags: u8,
    window: [u8; 2],
    check: [u8; 2],
    urgent: [u8; 2],
}

#[repr(C)]
struct UdpHdr {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
}

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: [u8; 2],
}

const ETH_HDR_LEN: usize = size_of::<EthHdr>();
const VLAN_HDR_LEN: usize = size_of::<VlanHdr>();
const IPV4_MIN_HDR_LEN: usize = size_of::<Ipv4Hdr>();
const IPV6_HDR_LEN: usize = size_of::<Ipv6Hdr>();
const IPV6_FRAG_HDR_LEN: usize = size_of::<Ipv6FragHdr>();
const TCP_MIN_HDR_LEN: usize = size_of::<TcpHdr>();
const UDP_HDR_LEN: usize = size_of::<UdpHdr>();
const ICMP_HDR_LEN: usize = size_of::<IcmpHdr>();

// Where the fast path's word loads read, from the frame start, for an untagged frame. Each
// 32-bit word covers the field named and those after it.
/// EtherType, then (IPv4) version/IHL and TOS, or (IPv6) version and traffic class.
const ETHER_TYPE_AT: usize = offset_of!(EthHdr, ether_type);
/// IPv4 total length, identification.
const V4_TOT_LEN_AT: usize = ETH_HDR_LEN + offset_of!(Ipv4Hdr, tot_len);
/// IPv4 fragment bits and offset, TTL, protocol.
const V4_FRAG_AT: usize = ETH_HDR_LEN + offset_of!(Ipv4Hdr, frag_off);
const V4_SRC_AT: usize = ETH_HDR_LEN + offset_of!(Ipv4Hdr, src);
/// The transport header after an IPv4 header without options: the ports.
const V4_L4_AT: usize = ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
const V4_UDP_LEN_AT: usize = V4_L4_AT + offset_of!(UdpHdr, len);
/// IPv6 payload length, next header, hop limit.
const V6_PAYLOAD_LEN_AT: usize = ETH_HDR_LEN + offset_of!(Ipv6Hdr, payload_len);
/// The IPv6 source address's two 64-bit halves.
const V6_SRC_HI_AT: usize = ETH_HDR_LEN + offset_of!(Ipv6Hdr, src);
const V6_SRC_LO_AT: usize = V6_SRC_HI_AT + 8;
/// The transport header after an IPv6 header without extension headers: the ports.
const V6_L4_AT: usize = ETH_HDR_LEN + IPV6_HDR_LEN;
const V6_UDP_LEN_AT: usize = V6_L4_AT + offset_of!(UdpHdr, len);
const _: () = assert!(
    ETHER_TYPE_AT == 12
        && V4_TOT_LEN_AT == 16
        && V4_FRAG_AT == 20
        && V4_SRC_AT == 26
        && V4_L4_AT == 34
        && V4_UDP_LEN_AT == 38
        && V6_PAYLOAD_LEN_AT == 18
        && V6_SRC_HI_AT == 22
        && V6_L4_AT == 54
        && V6_UDP_LEN_AT == 58
);

/// A packet's bytes as a program sees them: XDP's frame, or the linear part of a TC program's
/// socket buffer. Every read below goes through these two bounds.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

/// A frame the policy cannot be applied to because its headers are truncated or inconsistent.
pub struct Malformed;

/// What the parser found in a frame.
pub enum Frame {
    /// ARP, NDP or MLD: passed before any policy so that the link keeps working.
    LinkControl,
    /// Another EtherType.
    NonIp,
    Ip(IpPacket),
}

pub enum Addrs {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more fragments to come: carries the L4 header.
    First { id: [u8; 4] },
    /// Offset > 0: no L4 header, so no ports.
    Later { id: [u8; 4] },
}

/// Where the L4 payload is. Lengths come from the IP and UDP headers, never from the frame end.
#[derive(Clone, Copy)]
pub struct Payload {
    /// Offset from the frame start.
    pub offset: usize,
    /// Bytes of payload in this packet (within the IP datagram).
    pub len: usize,
    /// Bytes of payload in the whole datagram: the UDP length field's view, which a first
    /// fragment carries too; for TCP and other protocols the same as `len`.
    pub total: usize,
}

pub enum L4 {
    /// TCP or UDP, with the ports as on the wire.
    Ports {
        src_port_be: [u8; 2],
        dst_port_be: [u8; 2],
        /// TCP's flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for UDP.
        tcp_flags: u8,
        payload: Payload,
    },
    /// ICMP or `ICMPv6`: its type, and the echo identifier (zero where the message is too short
    /// to have one).
    Icmp { kind: u8, echo_id_be: [u8; 2] },
    /// Another IP protocol (its number is in `IpPacket::proto`).
    Other { payload: Payload },
    /// A later fragment: the L4 header is in the first fragment.
    Unknown,
}

pub struct IpPacket {
    pub addrs: Addrs,
    /// IP protocol of the payload, after IPv6 extension headers.
    pub proto: u8,
    pub fragment: Fragment,
    pub l4: L4,
}

/// Bytes in the frame, for the byte counters.
#[inline(always)]
pub fn frame_len(ctx: &impl Packet) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// `N` bytes at `offset` into the frame, if they lie inside it.
#[inline(always)]
pub fn read<const N: usize>(ctx: &impl Packet, offset: usize) -> Option<[u8; N]> {
    let ptr = ptr_at::<[u8; N]>(ctx, offset).ok()?;
    // SAFETY: ptr_at checked that N bytes at `offset` lie inside the frame.
    Some(unsafe { *ptr })
}

/// `value & mask`, computed where the compiler cannot drop the mask. Verifier: a variable packet
/// offset must visibly stay under 64 KiB, but LLVM removes a mask it can prove redundant from
/// earlier range checks that the verifier does not connect to this register.
#[inline(always)]
pub fn masked(value: usize, mask: usize) -> usize {
    // SAFETY: a volatile read of a local that is initialised and aligned.
    unsafe { core::ptr::read_volatile(&raw const value) & mask }
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// A 16-bit field in network byte order.
#[inline(always)]
pub fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

/// Ethernet, up to two VLAN tags, then IPv4 or IPv6.
#[inline(always)]
pub fn parse_frame(ctx: &impl Packet) -> Result<Frame, Malformed> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked that ETH_HDR_LEN bytes lie inside the frame.
    let mut ether_type = be16(unsafe { (*eth).ether_type });
    let mut offset = ETH_HDR_LEN;

    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan = ptr_at::<VlanHdr>(ctx, offset)?;
        // SAFETY: ptr_at checked that VLAN_HDR_LEN bytes at `offset` lie inside the frame.
        ether_type = be16(unsafe { (*vlan).ether_type });
        offset += VLAN_HDR_LEN;
    }

    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        ETH_P_ARP => Ok(Frame::LinkControl),
        // What a server's link needs besides ARP (bonding, port authentication, discovery,
        // spanning tree), to the link-local group addresses only.
        ETH_P_SLOW | ETH_P_EAPOL | ETH_P_LLDP if link_local_group(ctx) => Ok(Frame::LinkControl),
        length if length < ETH_P_802_3_MIN && offset == ETH_HDR_LEN && link_local_group(ctx) => {
            Ok(Frame::LinkControl)
        }
        // A third VLAN tag is as foreign to us as any other EtherType.
        _ => Ok(Frame::NonIp),
    }
}

/// Whether the frame is addressed to an IEEE 802.1D link-local group (`01:80:C2:00:00:0X`).
#[inline(always)]
fn link_local_group(ctx: &impl Packet) -> bool {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: ptr_at checked that the Ethernet header lies inside the frame.
    let dst = unsafe { (*eth).dst };
    dst[..5] == LINK_LOCAL_GROUP && dst[5] & 0xF0 == 0
}

/// Frame fields in one block of BPF loads, `name = size @ OFFSET` (a named offset constant)
/// from the frame start `data` (see `plain_v4` for why assembly), as a tuple of 64-bit
/// registers in the order given.
///
/// # Safety
/// Every load must lie inside the frame; the caller has checked it against `data_end` (the
/// verifier checks it again).
macro_rules! frame_loads {
    ($data:expr; $($name:ident = $size:ident @ $offset:ident),+ $(,)?) => {{
        $(let $name: u64;)+
        core::arch::asm!(
            $(concat!("{", stringify!($name), "} = *(", stringify!($size), " *)({data} + {",
                stringify!($offset), "})"),)+
            data = in(reg) $data,
            $($name = lateout(reg) $name,)+
            $($offset = const $offset,)+
            options(pure, readonly, nostack, preserves_flags),
        );
        ($($name),+)
    }};
}

/// The commonest frame in a few reads: untagged Ethernet, an IPv4 header without options, a
/// whole datagram (no fragment), TCP or UDP. `None` for anything else, and for anything
/// `parse_frame` would call malformed, link control or a fragment: those take the full parse.
/// Where this returns a packet, `parse_frame` returns the same source, protocol, ports and
/// payload (the fast path in `fast.rs` depends on it).
///
/// The header fields arrive in six word loads written as BPF assembly. LLVM's BPF backend
/// compiles a read it cannot prove aligned (a frame pointer has none it knows of) into byte
/// loads, shifts and ORs, and its option for misaligned loads applies to the whole program,
/// where it also emits misaligned stack stores the verifier refuses. The kernel allows a
/// misaligned packet load where the CPU handles one (x86-64, arm64: no strict alignment there)
/// and checks its bounds like any other load.
#[inline(always)]
pub fn plain_v4(ctx: &impl Packet) -> Option<PlainV4> {
    const L3: usize = ETH_HDR_LEN;
    let data = ctx.data();
    // Verifier: one bound check covers the Ethernet and IPv4 headers and the UDP header (the
    // shorter of the two transport headers); TCP's is checked below.
    if data + V4_L4_AT + UDP_HDR_LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: inside the bytes checked above, at their offsets from the frame start: EtherType
    // and version, total length, fragment bits and protocol, source address, ports, UDP length
    // (meaningless for TCP, and then unused).
    let (w12, w16, w20, src, ports, udp_len) = unsafe {
        frame_loads!(data;
            w12 = u32 @ ETHER_TYPE_AT, w16 = u32 @ V4_TOT_LEN_AT, w20 = u32 @ V4_FRAG_AT,
            src = u32 @ V4_SRC_AT, ports = u32 @ V4_L4_AT, udp_len = u32 @ V4_UDP_LEN_AT)
    };
    let [type_hi, type_lo, version_ihl, _] = bytes(w12);
    let [len_hi, len_lo, ..] = bytes(w16);
    let [frag_hi, frag_lo, _, proto] = bytes(w20);
    // 0x45: version 4, no options. Only DF may be set among the fragment bits.
    if u16::from_be_bytes([type_hi, type_lo]) != ETH_P_IPV4
        || version_ihl != 0x45
        || u16::from_be_bytes([frag_hi, frag_lo]) & !IPV4_DF != 0
    {
        return None;
    }
    let tot_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if tot_len < IPV4_MIN_HDR_LEN || data + L3 + tot_len > ctx.data_end() {
        return None;
    }
    let transport = plain_transport(
        ctx,
        V4_L4_AT,
        tot_len - IPV4_MIN_HDR_LEN,
        proto,
        bytes(ports),
        bytes(udp_len),
    )?;
    Some(PlainV4 {
        src: bytes(src),
        transport,
    })
}

/// The same for IPv6: untagged Ethernet, an IPv6 header whose next header is TCP or UDP (no
/// extension headers, so no fragment; and no ICMPv6, so no link control). `None` for anything
/// else and for anything `parse_frame` would call malformed.
#[inline(always)]
pub fn plain_v6(ctx: &impl Packet) -> Option<PlainV6> {
    const L3: usize = ETH_HDR_LEN;
    let data = ctx.data();
    // Verifier: one bound check covers the Ethernet and IPv6 headers and a UDP header.
    if data + V6_L4_AT + UDP_HDR_LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: inside the bytes checked above: EtherType and version, payload length and next
    // header, the source address's two halves, ports, UDP length.
    let (w12, w18, src_hi, src_lo, ports, udp_len) = unsafe {
        frame_loads!(data;
            w12 = u32 @ ETHER_TYPE_AT, w18 = u32 @ V6_PAYLOAD_LEN_AT, src_hi = u64 @ V6_SRC_HI_AT,
            src_lo = u64 @ V6_SRC_LO_AT, ports = u32 @ V6_L4_AT, udp_len = u32 @ V6_UDP_LEN_AT)
    };
    let [type_hi, type_lo, version_class, _] = bytes(w12);
    let [len_hi, len_lo, proto, _] = bytes(w18);
    let payload_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    // payload_len 0 would be a jumbogram, which `parse_frame` calls malformed.
    if u16::from_be_bytes([type_hi, type_lo]) != ETH_P_IPV6
        || version_class >> 4 != 6
        || payload_len == 0
        || data + L3 + IPV6_HDR_LEN + payload_len > ctx.data_end()
    {
        return None;
    }
    let transport = plain_transport(
        ctx,
        V6_L4_AT,
        payload_len,
        proto,
        bytes(ports),
        bytes(udp_len),
    )?;
    let mut src = [0u8; 16];
    src[..8].copy_from_slice(&src_hi.to_ne_bytes());
    src[8..].copy_from_slice(&src_lo.to_ne_bytes());
    Some(PlainV6 { src, transport })
}

/// The 4 frame bytes a 32-bit load put in the low half of `word`, in frame order.
#[inline(always)]
fn bytes(word: u64) -> [u8; 4] {
    (word as u32).to_ne_bytes()
}

/// A TCP or UDP header at `l4` in an IP payload of `ip_payload_len` bytes, checked by the
/// checks `parse_l4` makes (`tcp_payload`, `udp_payload`): its ports and payload, or `None`
/// (another protocol, or malformed). `ports` and `udp_len` are the header's first two words,
/// read by the caller.
#[inline(always)]
fn plain_transport(
    ctx: &impl Packet,
    l4: usize,
    ip_payload_len: usize,
    proto: u8,
    ports: [u8; 4],
    udp_len: [u8; 4],
) -> Option<Transport> {
    let [src_hi, src_lo, dst_hi, dst_lo] = ports;
    let mut tcp_flags = 0;
    let payload = match proto {
        IPPROTO_TCP => {
            let tcp = ptr_at::<TcpHdr>(ctx, l4).ok()?;
            // SAFETY: ptr_at checked that the TCP header lies inside the frame.
            let (data_offset, flags) = unsafe { ((*tcp).data_offset, (*tcp).flags) };
            tcp_flags = flags;
            tcp_payload(l4, ip_payload_len, data_offset)?
        }
        IPPROTO_UDP => udp_payload(
            l4,
            ip_payload_len,
            usize::from(be16([udp_len[0], udp_len[1]])),
        )?,
        _ => return None,
    };
    Some(Transport {
        proto,
        src_port_be: [src_hi, src_lo],
        dst_port_be: [dst_hi, dst_lo],
        tcp_flags,
        payload,
    })
}

/// What `plain_v6` reads.
pub struct PlainV6 {
    pub src: [u8; 16],
    pub transport: Transport,
}

/// The TCP or UDP part of a plain packet.
#[derive(Clone, Copy)]
pub struct Transport {
    pub proto: u8,
    pub src_port_be: [u8; 2],
    pub dst_port_be: [u8; 2],
    /// TCP's flags (0 for UDP).
    pub tcp_flags: u8,
    pub payload: Payload,
}

/// TCP flags: a SYN without ACK opens a connection.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Whether TCP `flags` open a connection (the first packet of a flow: the access log's).
#[inline(always)]
pub const fn opens(proto: u8, flags: u8) -> bool {
    proto == IPPROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// What `plain_v4` reads.
pub struct PlainV4 {
    pub src: [u8; 4],
    pub transport: Transport,
}

#[inline(always)]
fn parse_ipv4(ctx: &impl Packet, l3: usize) -> Result<Frame, Malformed> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
    // SAFETY: ptr_at checked that IPV4_MIN_HDR_LEN bytes at `l3` lie inside the frame.
    let (version_ihl, tot_len, id, frag_off, ttl, proto, src, dst) = unsafe {
        (
            (*ip).version_ihl,
            usize::from(be16((*ip).tot_len)),
            (*ip).id,
            be16((*ip).frag_off),
            (*ip).ttl,
            (*ip).proto,
            (*ip).src,
            (*ip).dst,
        )
    };
    let header_len = usize::from(version_ihl & 0x0F) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN || tot_len < header_len {
        return Err(Malformed);
    }
    // The datagram must be all there (trailing Ethernet padding is fine).
    if ctx.data() + l3 + tot_len > ctx.data_end() {
        return Err(Malformed);
    }
    // IGMP to link-local multicast (224.0.0.0/24) with TTL 1: membership reports and queries,
    // the IPv4 counterpart of MLD (hosts send them from 0.0.0.0 before they have an address).
    if proto == IPPROTO_IGMP && dst[0..3] == [224, 0, 0] && ttl == 1 {
        return Ok(Frame::LinkControl);
    }

    let offset_8 = frag_off & IPV4_OFFSET_MASK;
    let id = [id[0], id[1], 0, 0];
    let fragment = if offset_8 != 0 {
        Fragment::Later { id }
    } else if frag_off & IPV4_MF != 0 {
        Fragment::First { id }
    } else {
        Fragment::Whole
    };
    let addrs = Addrs::V4 { src, dst };

    if let Fragment::Later { .. } = fragment {
        // RFC 1858: a TCP fragment at offset 8 bytes can only serve to overwrite the header.
        if proto == IPPROTO_TCP && offset_8 == 1 {
            return Err(Malformed);
        }
        return Ok(Frame::Ip(IpPacket {
            addrs,
            proto,
            fragment,
            l4: L4::Unknown,
        }));
    }
    let l4 = parse_l4(ctx, l3 + header_len, tot_len - header_len, proto)?;
    Ok(Frame::Ip(IpPacket {
        addrs,
        proto,
        fragment,
        l4,
    }))
}

#[inline(always)]
fn parse_ipv6(ctx: &impl Packet, l3: usize) -> Result<Frame, Malformed> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3)?;
    // SAFETY: ptr_at checked that IPV6_HDR_LEN bytes at `l3` lie inside the frame.
    let (version, payload_len, mut next, hop_limit, src, dst) = unsafe {
        (
            (*ip).version_class_flow[0] >> 4,
            usize::from(be16((*ip).payload_len)),
            (*ip).next_header,
            (*ip).hop_limit,
            (*ip).src,
            (*ip).dst,
        )
    };
    // payload_len 0 would be a jumbogram (RFC 2675), which no Ethernet link carries.
    if version != 6 || payload_len == 0 {
        return Err(Malformed);
    }
    if ctx.data() + l3 + IPV6_HDR_LEN + payload_len > ctx.data_end() {
        return Err(Malformed);
    }

    // Bounded walk of the extension headers; `walked` counts bytes after the fixed header.
    let mut walked: usize = 0;
    let mut fragment = Fragment::Whole;
    let mut done = false;
    // One pass more than the headers we walk: the last pass can only find the final protocol.
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = ptr_at::<Ipv6ExtHdr>(ctx, l3 + IPV6_HDR_LEN + walked)?;
                // SAFETY: ptr_at checked the two bytes read here.
                let (following, len_units) =
                    unsafe { ((*ext).next_header, (*ext).len_8_octets_minus_1) };
                next = following;
                walked += (usize::from(len_units) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let frag = ptr_at::<Ipv6FragHdr>(ctx, l3 + IPV6_HDR_LEN + walked)?;
                // SAFETY: ptr_at checked that IPV6_FRAG_HDR_LEN bytes lie inside the frame.
                let (following, offset_flags, id) =
                    unsafe { ((*frag).next_header, be16((*frag).offset_flags), (*frag).id) };
                next = following;
                walked += IPV6_FRAG_HDR_LEN;
                if offset_flags & IPV6_FRAG_OFFSET_MASK != 0 {
                    fragment = Fragment::Later { id };
                    // What follows a later fragment's header is payload, not more headers.
                    done = true;
                    break;
                }
                if offset_flags & IPV6_FRAG_MF != 0 {
                    fragment = Fragment::First { id };
                }
            }
            _ => {
                done = true;
                break;
            }
        }
        if walked > payload_len {
            return Err(Malformed);
        }
    }
    if !done || walked > payload_len {
        // More extension headers than we walk: we cannot know the protocol, so we do not guess.
        return Err(Malformed);
    }

    let addrs = Addrs::V6 { src, dst };
    if let Fragment::Later { .. } = fragment {
        return Ok(Frame::Ip(IpPacket {
            addrs,
            proto: next,
            fragment,
            l4: L4::Unknown,
        }));
    }
    let l4_offset = l3 + IPV6_HDR_LEN + walked;
    // Neighbour discovery in a fragment is forbidden (RFC 6980): only a whole one is link
    // control; a fragmented one meets the policy like any packet.
    if next == IPPROTO_ICMPV6 && matches!(fragment, Fragment::Whole) {
        let icmp = ptr_at::<IcmpHdr>(ctx, l4_offset)?;
        // SAFETY: ptr_at checked that ICMP_HDR_LEN bytes lie inside the frame.
        let kind = unsafe { (*icmp).kind };
        if is_link_control_icmpv6(kind, hop_limit, &src) {
            return Ok(Frame::LinkControl);
        }
    }
    let l4 = parse_l4(ctx, l4_offset, payload_len - walked, next)?;
    Ok(Frame::Ip(IpPacket {
        addrs,
        proto: next,
        fragment,
        l4,
    }))
}

/// NDP with hop limit 255 (router advertisements and redirects only from link-local sources),
/// and MLD from link-local sources or, for reports sent before an address is configured
/// (RFC 3810 §5.2.13), from the unspecified address.
#[inline(always)]
fn is_link_control_icmpv6(kind: u8, hop_limit: u8, src: &[u8; 16]) -> bool {
    let link_local = src[0] == 0xFE && src[1] & 0xC0 == 0x80;
    match kind {
        ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT => hop_limit == NDP_HOP_LIMIT && link_local,
        ICMPV6_ROUTER_SOLICIT..=ICMPV6_REDIRECT => hop_limit == NDP_HOP_LIMIT,
        ICMPV6_MLD_QUERY..=ICMPV6_MLD_DONE => link_local,
        ICMPV6_MLDV2_REPORT => link_local || *src == [0; 16],
        _ => false,
    }
}

/// The payload of a TCP segment at `l4` whose header is `data_offset >> 4` 32-bit words long, in
/// an IP payload of `ip_payload_len` bytes; `None` if the header is too short or does not fit.
#[inline(always)]
fn tcp_payload(l4: usize, ip_payload_len: usize, data_offset: u8) -> Option<Payload> {
    let header_len = usize::from(data_offset >> 4) * 4;
    if header_len < TCP_MIN_HDR_LEN || header_len > ip_payload_len {
        return None;
    }
    let len = ip_payload_len - header_len;
    Some(Payload {
        offset: l4 + header_len,
        len,
        total: len,
    })
}

/// The payload of a UDP datagram at `l4` whose length field says `udp_len`, in an IP payload of
/// `ip_payload_len` bytes: the datagram's payload (`total`, which a first fragment carries too),
/// of which `len` bytes are in this packet; `None` if the header does not fit or its length is
/// shorter than a header.
#[inline(always)]
fn udp_payload(l4: usize, ip_payload_len: usize, udp_len: usize) -> Option<Payload> {
    if UDP_HDR_LEN > ip_payload_len || udp_len < UDP_HDR_LEN {
        return None;
    }
    let total = udp_len - UDP_HDR_LEN;
    let in_packet = ip_payload_len - UDP_HDR_LEN;
    Some(Payload {
        offset: l4 + UDP_HDR_LEN,
        len: if total < in_packet { total } else { in_packet },
        total,
    })
}

/// The L4 header of a whole datagram or first fragment. `ip_payload_len` comes from the IP
/// header; a header that does not fit in it is malformed (RFC 1858's tiny-fragment attack).
#[inline(always)]
fn parse_l4(
    ctx: &impl Packet,
    offset: usize,
    ip_payload_len: usize,
    proto: u8,
) -> Result<L4, Malformed> {
    match proto {
        IPPROTO_TCP => {
            let tcp = ptr_at::<TcpHdr>(ctx, offset)?;
            // SAFETY: ptr_at checked that TCP_MIN_HDR_LEN bytes at `offset` lie inside the frame.
            let (src_port_be, dst_port_be, data_offset, tcp_flags) = unsafe {
                (
                    (*tcp).src_port,
                    (*tcp).dst_port,
                    (*tcp).data_offset,
                    (*tcp).flags,
                )
            };
            Ok(L4::Ports {
                src_port_be,
                dst_port_be,
                tcp_flags,
                payload: tcp_payload(offset, ip_payload_len, data_offset).ok_or(Malformed)?,
            })
        }
        IPPROTO_UDP => {
            let udp = ptr_at::<UdpHdr>(ctx, offset)?;
            // SAFETY: ptr_at checked that UDP_HDR_LEN bytes at `offset` lie inside the frame.
            let (src_port_be, dst_port_be, udp_len) = unsafe {
                (
                    (*udp).src_port,
                    (*udp).dst_port,
                    usize::from(be16((*udp).len)),
                )
            };
            Ok(L4::Ports {
                src_port_be,
                dst_port_be,
                tcp_flags: 0,
                payload: udp_payload(offset, ip_payload_len, udp_len).ok_or(Malformed)?,
            })
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp = ptr_at::<IcmpHdr>(ctx, offset)?;
            if ICMP_HDR_LEN > ip_payload_len {
                return Err(Malformed);
            }
            // SAFETY: ptr_at checked that ICMP_HDR_LEN bytes at `offset` lie inside the frame.
            let kind = unsafe { (*icmp).kind };
            // Echo request and reply carry an identifier right after the common header.
            // Verifier: LLVM derives this read's bound from the IP length check and drops it,
            // which the verifier cannot follow; the masked offset keeps the check.
            let echo_id_be = if ICMP_HDR_LEN + 2 <= ip_payload_len {
                read::<2>(ctx, masked(offset + ICMP_HDR_LEN, 0xFFFF)).unwrap_or([0; 2])
            } else {
                [0; 2]
            };
            Ok(L4::Icmp { kind, echo_id_be })
        }
        _ => Ok(L4::Other {
            payload: Payload {
                offset,
                len: ip_payload_len,
                total: ip_payload_len,
            },
        }),
    }
}

/// The payload's position as values the verifier knows to be bounded, and cannot tell apart by
/// the check that produced them. Verifier: `enforcer_vpn_signature`'s arguments may be anything,
/// and a packet offset must stay under 64 KiB; inside, each check starts from fresh values, so
/// that a check that failed (`len < 62`, say) does not split the states of every later one. The
/// masks cannot cut a real value: offsets stay far below 16 KiB and lengths below 64 KiB.
#[inline(always)]
pub(crate) fn converge(p: Payload) -> Payload {
    Payload {
        offset: masked(p.offset, 0x3FFF),
        len: masked(p.len, 0xFFFF),
        total: masked(p.total, 0xFFFF),
    }
}
