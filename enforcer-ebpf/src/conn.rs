//! Connection state: the connections the server opens, as the egress program sees them leave,
//! so that ingress lets their replies in without the peers being allowlisted. Only packets the
//! server sends create entries, so no remote peer can fill the table.
//!
//! A TCP connection starts with the server's SYN, a UDP exchange with its first datagram, an
//! ICMP echo with its request. An entry admits replies until `Conn::expires_ns`, which each
//! packet the server sends on it moves forward (a TCP connection: its open timeout, or, once
//! the server sent FIN or RST, a short grace). `PEERS` marks the slots of remote addresses with
//! entries: a packet from any other address costs ingress one array read.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap},
};
use enforcer_common::{
    CONN_CLOSING, CONN_OPEN, Conn, ConnKey, ConnTimeouts, MAX_CONNS, PEER_SLOTS, peer_slot,
};

use crate::parse::{
    Addrs, Fragment, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IpPacket, L4,
};
use crate::source::BPF_F_MMAPABLE;

// Map names match `enforcer_common::map_names`.
#[map]
static CONNS: LruHashMap<ConnKey, Conn> = LruHashMap::with_max_entries(MAX_CONNS, 0);
/// One word per slot, written through a memory mapping by the controller's sweep.
#[map]
static PEERS: Array<u64> = Array::with_max_entries(PEER_SLOTS, BPF_F_MMAPABLE);
#[map]
static CONN_TIMEOUTS: Array<ConnTimeouts> = Array::with_max_entries(1, 0);

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// The connection an IP packet belongs to, seen from this host: `local` is this host's side.
#[inline(always)]
fn conn_key(
    family: u8,
    remote: [u8; 16],
    local: [u8; 16],
    proto: u8,
    remote_port: [u8; 2],
    local_port: [u8; 2],
) -> ConnKey {
    ConnKey {
        remote,
        local,
        remote_port,
        local_port,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// (family, source, destination) in `ConnKey`'s 16-byte form.
#[inline(always)]
fn addresses(addrs: &Addrs) -> (u8, [u8; 16], [u8; 16]) {
    match addrs {
        Addrs::V4 { src, dst } => {
            let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
            s[..4].copy_from_slice(src);
            d[..4].copy_from_slice(dst);
            (4, s, d)
        }
        Addrs::V6 { src, dst } => (6, *src, *dst),
    }
}

/// Whether the echo message type `kind` of `proto` is a request (`request`) or a reply.
#[inline(always)]
fn is_echo(proto: u8, kind: u8, request: bool) -> bool {
    match (proto, request) {
        (IPPROTO_ICMP, true) => kind == ICMP_ECHO_REQUEST,
        (IPPROTO_ICMP, false) => kind == ICMP_ECHO_REPLY,
        (IPPROTO_ICMPV6, true) => kind == ICMPV6_ECHO_REQUEST,
        (IPPROTO_ICMPV6, false) => kind == ICMPV6_ECHO_REPLY,
        _ => false,
    }
}

#[inline(always)]
fn timeouts() -> ConnTimeouts {
    match CONN_TIMEOUTS.get(0) {
        Some(t) if t.tcp_open_ns != 0 => *t,
        _ => ConnTimeouts::DEFAULT,
    }
}

/// Records what an outgoing packet that leaves does to the connection table.
#[inline(always)]
pub fn track(packet: &IpPacket) {
    if let Fragment::Later { .. } = packet.fragment {
        return;
    }
    let (family, local, remote) = addresses(&packet.addrs);
    let t = timeouts();
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (key, conn) = match packet.l4 {
        L4::Ports {
            src_port_be,
            dst_port_be,
            tcp_flags,
            ..
        } => {
            let key = conn_key(
                family,
                remote,
                local,
                packet.proto,
                dst_port_be,
                src_port_be,
            );
            if packet.proto == IPPROTO_UDP {
                (key, open(now + t.udp_ns))
            } else if packet.proto != IPPROTO_TCP {
                return;
            } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                // Closing: only a connection the table has; its replies get a short grace.
                if CONNS.get_ptr(&key).is_none() {
                    return;
                }
                (
                    key,
                    Conn {
                        expires_ns: now + t.tcp_closing_ns,
                        state: CONN_CLOSING,
                        _pad: 0,
                    },
                )
            } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                (key, open(now + t.tcp_open_ns))
            } else {
                // Any other segment keeps an open connection open.
                match CONNS.get_ptr_mut(&key) {
                    Some(conn) => {
                        // SAFETY: a pointer into the map's value, valid while this program runs;
                        // a racing writer can only store another expiry of the same connection.
                        unsafe {
                            if (*conn).state == CONN_OPEN {
                                (*conn).expires_ns = now + t.tcp_open_ns;
                            }
                        }
                        mark_peer(family, &remote);
                        return;
                    }
                    None => return,
                }
            }
        }
        L4::Icmp { kind, echo_id_be } if is_echo(packet.proto, kind, true) => (
            conn_key(family, remote, local, packet.proto, [0; 2], echo_id_be),
            open(now + t.icmp_ns),
        ),
        _ => return,
    };
    // If the table is full, the least recently used entry goes (LRU).
    let _ = CONNS.insert(&key, &conn, 0);
    mark_peer(family, &remote);
}

#[inline(always)]
const fn open(expires_ns: u64) -> Conn {
    Conn {
        expires_ns,
        state: CONN_OPEN,
        _pad: 0,
    }
}

#[inline(always)]
fn mark_peer(family: u8, remote: &[u8; 16]) {
    if let Some(slot) = PEERS.get_ptr_mut(peer_slot(remote, family)) {
        // SAFETY: a pointer into the array's value; one aligned word stored.
        unsafe { *slot = 1 };
    }
}

/// Whether the server may have a connection with the remote address of `PEERS` slot `slot`
/// (one array read).
#[inline(always)]
pub fn peer_may_have_conn(slot: u32) -> bool {
    PEERS.get(slot).is_some_and(|marked| *marked != 0)
}

/// Whether the server may have a connection with the sender of an incoming packet.
#[inline(always)]
pub fn peer_of(packet: &IpPacket) -> bool {
    let (family, remote, _) = addresses(&packet.addrs);
    peer_may_have_conn(peer_slot(&remote, family))
}

/// Whether an incoming packet answers a connection the server opened and that still admits
/// replies: the same peer, protocol and ports (or echo identifier), the server's own address.
#[inline(always)]
pub fn is_reply(packet: &IpPacket) -> bool {
    let (family, remote, local) = addresses(&packet.addrs);
    let key = match packet.l4 {
        L4::Ports {
            src_port_be,
            dst_port_be,
            ..
        } if packet.proto == IPPROTO_TCP || packet.proto == IPPROTO_UDP => conn_key(
            family,
            remote,
            local,
            packet.proto,
            src_port_be,
            dst_port_be,
        ),
        L4::Icmp { kind, echo_id_be } if is_echo(packet.proto, kind, false) => {
            conn_key(family, remote, local, packet.proto, [0; 2], echo_id_be)
        }
        _ => return false,
    };
    let Some(conn) = CONNS.get_ptr(&key) else {
        return false;
    };
    // SAFETY: a helper without arguments; a read of the map value the lookup returned.
    unsafe { bpf_ktime_get_ns() < (*conn).expires_ns }
}
