//! What the XDP program and the controller must agree on: map names and sizes, keys and values,
//! verdict reasons. Everything here is `#[repr(C)]`, padded explicitly and size-checked, because
//! the kernel hashes and copies these bytes as they are.
#![no_std]

pub mod reason;

pub use reason::{Action, Reason, VpnProtocol};

/// Map names, defined once. The kernel program names its statics after these, and the
/// controller reaches the maps only through these constants.
pub mod map_names {
    pub const RULES: &str = "RULES";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const CONFIG: &str = "CONFIG";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const VPN_V4: &str = "VPN_V4";
    pub const VPN_V6: &str = "VPN_V6";
    pub const VPN_GROUPS: &str = "VPN_GROUPS";
    pub const VPN_FLOWS: &str = "VPN_FLOWS";
    pub const VPN_FLOW_SESSIONS: &str = "VPN_FLOW_SESSIONS";
    pub const VPN_VERDICTS: &str = "VPN_VERDICTS";
    pub const SOURCE_V4: &str = "SOURCE_V4";
    pub const LONG_V4: &str = "LONG_V4";
    pub const DIR_V6: &str = "DIR_V6";
    pub const NODE_V6: &str = "NODE_V6";
    pub const LONG_V6: &str = "LONG_V6";
    pub const LONG_V6_FILTER: &str = "LONG_V6_FILTER";
    pub const NODE_V6_TABLE: &str = "NODE_V6_TABLE";
    pub const DEEP_V6: &str = "DEEP_V6";
    pub const CONNS: &str = "CONNS";
    pub const PEERS: &str = "PEERS";
    pub const CONN_TIMEOUTS: &str = "CONN_TIMEOUTS";
    pub const FLOW_PEERS: &str = "FLOW_PEERS";
    pub const UPSTREAM_V4: &str = "UPSTREAM_V4";
    pub const UPSTREAM_V6: &str = "UPSTREAM_V6";
    pub const UPSTREAM_GROUPS: &str = "UPSTREAM_GROUPS";
    pub const EGRESS_CONFIG: &str = "EGRESS_CONFIG";
    pub const EGRESS_VERDICTS: &str = "EGRESS_VERDICTS";
    pub const EGRESS_RULE_HITS: &str = "EGRESS_RULE_HITS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const EVENT_SOURCES: &str = "EVENT_SOURCES";
    pub const EVENT_SUPPRESSED: &str = "EVENT_SUPPRESSED";
    pub const ACCESS_FLOWS: &str = "ACCESS_FLOWS";

    /// Every map the controller pins, in a stable order.
    pub const ALL: [&str; 35] = [
        RULES,
        PORT_RULES,
        RULE_HITS,
        VERDICTS,
        CONFIG,
        FRAGMENTS,
        VPN_V4,
        VPN_V6,
        VPN_GROUPS,
        VPN_FLOWS,
        VPN_FLOW_SESSIONS,
        VPN_VERDICTS,
        SOURCE_V4,
        LONG_V4,
        DIR_V6,
        NODE_V6,
        LONG_V6,
        LONG_V6_FILTER,
        NODE_V6_TABLE,
        DEEP_V6,
        CONNS,
        PEERS,
        CONN_TIMEOUTS,
        FLOW_PEERS,
        UPSTREAM_V4,
        UPSTREAM_V6,
        UPSTREAM_GROUPS,
        EGRESS_CONFIG,
        EGRESS_VERDICTS,
        EGRESS_RULE_HITS,
        EVENTS,
        EVENT_BUDGET,
        EVENT_SOURCES,
        EVENT_SUPPRESSED,
        ACCESS_FLOWS,
    ];
}

/// The XDP program's name in the object file.
pub const PROGRAM_NAME: &str = "enforcer";
/// The egress (TC) program's name in the object file.
pub const EGRESS_PROGRAM_NAME: &str = "enforcer_egress";

/// Registry entries (networks, devices, deny ranges) the maps can hold. Rule indices run from 0
/// to `MAX_RULES - 1`; each LPM trie holds at most this many prefixes.
pub const MAX_RULES: u32 = 1 << 20;
/// (rule, protocol, port) triples allowed across all port-restricted networks.
pub const MAX_PORT_RULES: u32 = 1 << 16;
/// First fragments remembered so that their later fragments can be matched (LRU).
pub const MAX_TRACKED_FRAGMENTS: u32 = 16_384;
/// Slots in the per-CPU verdict counter array: `Reason as u32` for verdicts carried out, and
/// `MONITOR_SLOT_OFFSET + Reason as u32` for drops that monitor mode let through.
pub const VERDICT_SLOTS: u32 = 64;
pub const MONITOR_SLOT_OFFSET: u32 = 32;
/// Marks "no registry entry decided" (e.g. a malformed packet).
pub const NO_RULE: u32 = u32::MAX;
/// Distinct approved-endpoint prefixes (each with its group of approvals).
pub const MAX_VPN_GROUPS: u32 = 4096;
/// Approvals that may cover one address (its own and those of wider prefixes around it).
pub const MAX_APPROVALS_PER_GROUP: usize = 8;
/// Flows remembered as VPN after a signature that only the first packet carries (`OpenVPN`'s
/// resets). LRU: the least recently seen flow is forgotten first.
pub const MAX_VPN_FLOWS: u32 = 65_536;
/// In a `VPN_FLOWS` value (the `VpnProtocol`, in the low 7 bits): set by the program when the
/// flow has a packet, cleared by the controller's sweep. A flow the sweep finds without it had
/// no packet for a whole sweep period, and is forgotten.
pub const FLOW_ACTIVE: u8 = 0x80;
/// In a `VPN_FLOWS` value: the reset that put the flow there was not approved. Such a flow's
/// later packets count as `OpenVPN` only when they are control packets carrying the session id
/// that their own end's reset carried (`VPN_FLOW_SESSIONS`), so that a reset spoofed with an
/// allowed client's address and port turns none of that client's own packets into drops. An
/// approved flow's packets all count as `OpenVPN` (they pass either way).
pub const FLOW_STRICT: u8 = 0x40;
/// Slots of `VPN_VERDICTS`: `protocol * 2` unapproved (dropped or would-drop), `+ 1` approved.
pub const VPN_VERDICT_SLOTS: u32 = 32;

/// Key data of the IPv4 LPM tries (the prefix length sits in aya's `Key` wrapper).
pub type Ipv4Addr = [u8; 4];
/// Key data of the IPv6 LPM tries.
pub type Ipv6Addr = [u8; 16];

/// One registry entry as the kernel needs it, indexed by rule number in `RULES`. The program
/// reads only the flags; the prefix makes `RULES` the controller's record of what the lookup
/// tables hold (read back after a restart).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | flags (`RULE_*`, host order) |
/// | 4 | 1 | address family of the prefix (4 or 6; 0 for a VPN endpoint's number) |
/// | 5 | 1 | prefix length |
/// | 6 | 2 | padding, 0 |
/// | 8 | 16 | prefix address (IPv4 in the first 4 bytes) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub flags: u32,
    pub family: u8,
    pub len: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Rule>() == 24);

/// The number holds a source entry (allow or deny) of the registry.
pub const RULE_IN_USE: u32 = 1 << 4;
/// The entry allows every port and protocol (no `ports` in the registry).
pub const RULE_ANY_PORT: u32 = 1 << 0;
/// A port-restricted entry that also allows ICMP / `ICMPv6` (`"icmp"` in its ports).
pub const RULE_ICMP: u32 = 1 << 1;
/// A deny entry that came from a deny feed file (counted as `denied_feed`).
pub const RULE_FEED: u32 = 1 << 2;
/// A deny entry: the source is dropped (`denied`, or `denied_feed` with `RULE_FEED`).
pub const RULE_DENY: u32 = 1 << 3;
/// An upstream (`upstreams`): a destination the server may reach on the rule's ports (with
/// `RULE_ICMP`, ICMP too). Not a source entry: the source lookup never holds it.
pub const RULE_UPSTREAM: u32 = 1 << 5;

/// Distinct upstream prefixes (each with its group of upstreams).
pub const MAX_UPSTREAM_GROUPS: u32 = 4096;
/// Upstreams that may cover one address (its own prefix and wider ones around it).
pub const MAX_UPSTREAMS_PER_GROUP: usize = 8;

/// The upstreams that apply to addresses whose longest upstream prefix is this group's (value
/// of `UPSTREAM_GROUPS`, indexed by the value of `UPSTREAM_V4`/`UPSTREAM_V6`): their rule
/// numbers, the longest prefix first, so that the most specific upstream listing a port is the
/// one counted.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | count of rule numbers in use (host order) |
/// | 4 | 32 | rule numbers (host order) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamGroup {
    pub count: u32,
    pub rules: [u32; MAX_UPSTREAMS_PER_GROUP],
}
const _: () = assert!(core::mem::size_of::<UpstreamGroup>() == 4 + 4 * MAX_UPSTREAMS_PER_GROUP);

/// One approval of a VPN endpoint group.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | rule index of the `vpn_endpoints` entry (host order) |
/// | 4 | 1 | `VpnProtocol` |
/// | 5 | 1 | padding, 0 |
/// | 6 | 2 | port (network order), 0 = any port |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpnApproval {
    pub rule: u32,
    pub protocol: u8,
    pub _pad: u8,
    pub port_be: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<VpnApproval>() == 8);

/// The approvals that apply to addresses whose longest approved-endpoint prefix is this group's
/// (value of `VPN_GROUPS`, indexed by the value of `VPN_V4`/`VPN_V6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpnGroup {
    pub count: u32,
    pub _pad: u32,
    pub approvals: [VpnApproval; MAX_APPROVALS_PER_GROUP],
}
const _: () = assert!(core::mem::size_of::<VpnGroup>() == 8 + 8 * MAX_APPROVALS_PER_GROUP);

/// Key of `VPN_FLOWS`: a flow in canonical order (the lower address/port pair first), so both
/// directions find the same entry. IPv4 addresses use the first 4 bytes.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | lower address |
/// | 16 | 16 | higher address |
/// | 32 | 2 | port of the lower address (network order) |
/// | 34 | 2 | port of the higher address (network order) |
/// | 36 | 1 | IP protocol |
/// | 37 | 1 | family (4 or 6) |
/// | 38 | 2 | padding, 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub lo_addr: [u8; 16],
    pub hi_addr: [u8; 16],
    pub lo_port: [u8; 2],
    pub hi_port: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of `VPN_FLOW_SESSIONS` (key: the flow's `FlowKey`): the `OpenVPN` session id that the
/// last reset from each end of a `FLOW_STRICT` flow carried, its 8 bytes read in the host's
/// order; 0 for none seen (a packet whose session id reads 0 matches nothing).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | session id of the `lo` end's reset |
/// | 8 | 8 | session id of the `hi` end's reset |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSessions {
    pub lo: u64,
    pub hi: u64,
}
const _: () = assert!(core::mem::size_of::<FlowSessions>() == 16);

/// Connections the server opened, whose replies ingress lets in (LRU: when the server opens more
/// than this, the least recently used entry is forgotten and its replies drop).
pub const MAX_CONNS: u32 = 65_536;
/// Slots of `PEERS`: one byte per slot, set when some connection's remote address hashes there
/// (`peer_slot`), so that a packet from a peer the server has no connection with pays one array
/// read, not a hash lookup.
pub const PEER_SLOTS: u32 = 1 << 16;

/// Key of `CONNS`: a connection the server opened, as its replies show it (remote side first).
/// IPv4 addresses use the first 4 bytes. ICMP echo keeps its identifier in `local_port`.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | remote address |
/// | 16 | 16 | local address (the server's) |
/// | 32 | 2 | remote port (network order) |
/// | 34 | 2 | local port (network order) |
/// | 36 | 1 | IP protocol |
/// | 37 | 1 | family (4 or 6) |
/// | 38 | 2 | padding, 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port: [u8; 2],
    pub local_port: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);

/// Value of `CONNS`: until when replies are let in, and the TCP state.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | expiry, `CLOCK_MONOTONIC` ns (`bpf_ktime_get_ns`) |
/// | 8 | 4 | state: `CONN_OPEN`, or `CONN_CLOSING` once the server sent FIN or RST |
/// | 12 | 4 | padding, 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub expires_ns: u64,
    pub state: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Conn>() == 16);

pub const CONN_OPEN: u32 = 0;
pub const CONN_CLOSING: u32 = 1;

/// How long a connection admits replies after the server's last packet on it (index 0 of
/// `CONN_TIMEOUTS`, written by the controller; all zero means the defaults below).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | TCP, open (ns) |
/// | 8 | 8 | TCP after the server's FIN or RST (ns) |
/// | 16 | 8 | UDP (ns) |
/// | 24 | 8 | ICMP echo (ns) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnTimeouts {
    pub tcp_open_ns: u64,
    pub tcp_closing_ns: u64,
    pub udp_ns: u64,
    pub icmp_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ConnTimeouts>() == 32);

const SECOND_NS: u64 = 1_000_000_000;

impl ConnTimeouts {
    /// An open TCP connection idle for an hour, a closing one 10 s after the server's FIN or
    /// RST, a UDP exchange 60 s after the server's last datagram, an ICMP echo 30 s.
    pub const DEFAULT: Self = Self {
        tcp_open_ns: 3600 * SECOND_NS,
        tcp_closing_ns: 10 * SECOND_NS,
        udp_ns: 60 * SECOND_NS,
        icmp_ns: 30 * SECOND_NS,
    };
}

/// The `PEERS` slot of a remote address (IPv4 in the first 4 bytes): its 32-bit words folded,
/// multiplied by a 32-bit golden-ratio constant, top 16 bits.
#[inline(always)]
pub const fn peer_slot(addr: &[u8; 16], family: u8) -> u32 {
    let folded = if family == 4 {
        word(addr, 0)
    } else {
        word(addr, 0) ^ word(addr, 4) ^ word(addr, 8) ^ word(addr, 12)
    };
    folded.wrapping_mul(0x9E37_79B9) >> 16
}

/// `peer_slot` of an IPv4 address given as its 4 bytes.
#[inline(always)]
pub const fn peer_slot_v4(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr).wrapping_mul(0x9E37_79B9) >> 16
}

/// The 32-bit word at `at` of an address, in host order.
#[inline(always)]
const fn word(addr: &[u8; 16], at: usize) -> u32 {
    u32::from_ne_bytes([addr[at], addr[at + 1], addr[at + 2], addr[at + 3]])
}
const _: () = assert!(PEER_SLOTS == 1 << 16);

/// Key of `PORT_RULES`: this rule allows this destination port for this protocol.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | rule index (host order) |
/// | 4 | 2 | destination port (network order, as on the wire) |
/// | 6 | 1 | IP protocol number (6 TCP, 17 UDP) |
/// | 7 | 1 | padding, always 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub rule: u32,
    pub port_be: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);

/// Packets and bytes for one verdict slot (per CPU in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Settings the controller may change while the program runs (index 0 of `CONFIG`).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | mode (`MODE_*`), written by the controller |
/// | 4 | 4 | 1 while `VPN_FLOWS` holds flows: set by the program when it puts one there, cleared by the controller once its sweep has forgotten the last (so that ordinary traffic skips the flow lookup, and the fast path runs, while no stateful VPN flow is remembered) |
/// | 8 | 4 | 1 if some approved VPN endpoint names a port (written by the controller): then a TCP/UDP packet from that endpoint's address and port passes as approved VPN even without a signature (a TCP VPN's SYN-ACK and ACKs carry none) |
/// | 12 | 4 | generation of the source lookup tables in force, 0 or 1 (written by the controller: the new tables are built aside, then this one word switches every packet to them) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub mode: u32,
    pub vpn_flows_seen: u32,
    pub port_endpoints: u32,
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// The egress program's settings (index 0 of `EGRESS_CONFIG`, written by the controller).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | egress mode (`EGRESS_*`); 0, what a fresh map holds, is off |
/// | 4 | 4 | padding, 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressConfig {
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EgressConfig>() == 8);

/// Nothing leaving is checked: connections are only recorded.
pub const EGRESS_OFF: u32 = 0;
/// Outgoing packets are checked and counted; nothing is dropped.
pub const EGRESS_MONITOR: u32 = 1;
/// Outgoing packets the policy denies are dropped.
pub const EGRESS_ENFORCE: u32 = 2;

/// Bytes of the event ring buffer (`EVENTS`): 16,384 events of 64 bytes.
pub const EVENT_RING_BYTES: u32 = 1 << 20;
/// Sources whose events are rate-limited one by one (LRU).
pub const MAX_EVENT_SOURCES: u32 = 16_384;
/// Events one source may raise per second; the rest are counted in its next event.
pub const EVENTS_PER_SOURCE: u32 = 5;
/// UDP flows the access log remembers (LRU), so that it logs a flow's first datagram only.
pub const MAX_ACCESS_FLOWS: u32 = 16_384;
/// A UDP flow silent this long (ns) starts anew in the access log.
pub const ACCESS_FLOW_IDLE_NS: u64 = 60_000_000_000;

/// Key of `ACCESS_FLOWS`: a UDP flow (or an ICMP echo exchange) to the server, by its
/// client's address and ports (an echo: 0 and its identifier); IPv4 in the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccessKey {
    pub addr: [u8; 16],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<AccessKey>() == 24);

/// One event: a packet dropped (or, in monitor mode, that would have been), a VPN packet, in
/// either direction. Addresses as on the wire, IPv4 in the first 4 bytes.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | time, `CLOCK_MONOTONIC` ns (`bpf_ktime_get_ns`) |
/// | 8 | 16 | source address |
/// | 24 | 16 | destination address |
/// | 40 | 4 | rule (`NO_RULE` for none) |
/// | 44 | 4 | interface index |
/// | 48 | 2 | source port (network order; ICMP: 0) |
/// | 50 | 2 | destination port (network order) |
/// | 52 | 2 | VLAN id of the outer tag (0: untagged) |
/// | 54 | 1 | `Reason` |
/// | 55 | 1 | flags: `EVENT_EGRESS`, `EVENT_MONITOR`, `EVENT_ACCESS` |
/// | 56 | 1 | IP protocol |
/// | 57 | 1 | family (4 or 6) |
/// | 58 | 1 | `VpnProtocol`, or `EVENT_NO_VPN` |
/// | 59 | 1 | padding, 0 |
/// | 60 | 4 | this source's events suppressed since its last one (rate limit) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub time_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub rule: u32,
    pub ifindex: u32,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub vlan: u16,
    pub reason: u8,
    pub flags: u8,
    pub proto: u8,
    pub family: u8,
    pub vpn: u8,
    pub _pad: u8,
    pub suppressed: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 64);

/// In `Event::flags`: the packet was leaving (the egress program).
pub const EVENT_EGRESS: u8 = 1;
/// In `Event::flags`: monitor mode let it through; enforce mode would have dropped it.
pub const EVENT_MONITOR: u8 = 2;
/// In `Event::flags`: an allowed packet that opens a flow (a TCP SYN): the access log.
pub const EVENT_ACCESS: u8 = 4;
/// In `Event::vpn`: no VPN protocol.
pub const EVENT_NO_VPN: u8 = 0xFF;

/// Per-CPU event budget (`EVENT_BUDGET`, written by the controller several times a second).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | 1 while events are wanted; 0 (what a fresh map holds): none are raised |
/// | 4 | 4 | events this CPU may still raise until the controller's next refill |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub enabled: u32,
    pub tokens: u32,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 8);

/// Key of `EVENT_SOURCES`: a source address (IPv4 in the first 4 bytes) and its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventSource {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EventSource>() == 20);

/// Value of `EVENT_SOURCES`: the source's events in the current second.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | the second (`bpf_ktime_get_ns` / 10^9) |
/// | 8 | 4 | events raised in it |
/// | 12 | 4 | events suppressed since the source's last one |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceWindow {
    pub second: u64,
    pub raised: u32,
    pub suppressed: u32,
}
const _: () = assert!(core::mem::size_of::<SourceWindow>() == 16);

/// Drop what the policy drops.
pub const MODE_ENFORCE: u32 = 0;
/// Pass everything; count what would have been dropped in the monitor slots.
pub const MODE_MONITOR: u32 = 1;

/// Key of `FRAGMENTS`: a first fragment that passed the port check, so that the later fragments
/// of the same datagram (which carry no ports) may pass too. IPv4 addresses use the first 4 bytes.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | source address (network order) |
/// | 16 | 16 | destination address (network order) |
/// | 32 | 4 | fragment identification (as on the wire; IPv4's 16 bits in the first 2 bytes) |
/// | 36 | 1 | IP protocol of the payload |
/// | 37 | 1 | address family (4 or 6) |
/// | 38 | 2 | padding, always 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

/// The source lookup: flat tables whose cost does not grow with the registry (see
/// `enforcer/src/lookup.rs` for the design and the numbers behind it).
///
/// Each table exists twice, one copy per generation; `Config::generation` says which one is in
/// force. Values are `rule + 1`, so 0 means "no entry".
///
/// IPv4: `SOURCE_V4` is an array of 256-slot blocks. Blocks `generation * 256 + first octet`
/// are the roots, indexed by the second octet: a slot holds the value of the longest prefix of
/// /0 to /16 covering that /16, or `V4_POINTER | block` when longer prefixes lie inside. Such a
/// block is indexed by the third octet; its slot holds the value of the longest prefix up to /24
/// in its low bits and, in bits 24 to 31, which lengths /25 to /32 exist inside that /24. Those
/// are looked up in `LONG_V4` (key: address masked to the length, and the length), longest first.
///
/// IPv6: `DIR_V6` is indexed by `generation * 65536 + first 16 bits` and holds the longest
/// prefix of /0 to /16 plus which lengths /17 to /32 exist inside; `NODE_V6` (key: the first 32
/// bits) lists which lengths /33 to /128 exist inside that /32, and `NODE_V6_TABLE` holds the
/// same lists in buckets the program reads first. Both lead into `LONG_V6`.
pub mod lookup {
    /// Slots of a block (one octet).
    pub const BLOCK_SLOTS: usize = 256;
    /// Root blocks of one generation (one per first octet).
    pub const V4_ROOT_BLOCKS: u32 = 256;
    /// A root slot with this bit set points to a block (the other bits are its index).
    pub const V4_POINTER: u32 = 1 << 31;
    /// The value part of a slot: `rule + 1` (rule numbers are below `MAX_RULES` = 2^20).
    pub const VALUE_MASK: u32 = (1 << 21) - 1;
    /// In a /24 slot, bit `V4_LONG_SHIFT + i` says that prefixes of length 25 + i exist inside.
    pub const V4_LONG_SHIFT: u32 = 24;
    /// `DIR_V6` slots of one generation.
    pub const V6_DIR_SLOTS: u32 = 1 << 16;
    /// Blocks `SOURCE_V4` has beyond the roots unless the controller sizes it for a registry.
    pub const V4_DEFAULT_BLOCKS: u32 = 2048;
    /// The most blocks `SOURCE_V4` may be given beyond the roots: every /16, twice.
    pub const V4_MAX_BLOCKS: u32 = 2 * 65_536;
}

/// Key of `LONG_V4`: a prefix of /25 to /32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LongKeyV4 {
    pub addr: [u8; 4],
    pub len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<LongKeyV4>() == 8);

impl LongKeyV4 {
    /// The key of the prefix `addr/len` (host order, already masked to `len`).
    pub const fn new(addr: u32, len: u8) -> Self {
        Self {
            addr: addr.to_be_bytes(),
            len,
            _pad: [0; 3],
        }
    }
}

/// Key of `LONG_V6`: a prefix of /17 to /128 (address masked to its length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LongKeyV6 {
    pub addr: [u8; 16],
    pub len: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<LongKeyV6>() == 20);

impl LongKeyV6 {
    /// The key of the prefix `addr/len` (host order, already masked to `len`).
    pub const fn new(addr: u128, len: u8) -> Self {
        Self {
            addr: addr.to_be_bytes(),
            len,
            _pad: [0; 3],
        }
    }
}

/// Value of `LONG_V4` and `LONG_V6`: the prefix's `rule + 1` in each generation (0: absent).
pub type LongValue = [u32; 2];

/// Distinct prefix lengths the IPv6 lookup probes below one /16 (lengths /17 to /32) or one /32
/// (lengths /33 to /128): the controller refuses a registry with more.
pub const MAX_V6_LENGTHS: usize = 8;

/// Lengths /33 to /128 a `DIR_V6` slot may list itself, for every address of its /16: a /16
/// whose longer prefixes use at most this many lengths (and whose list has room) needs no
/// `NODE_V6` entries; a registry of scattered /128s needs none at all.
pub const V6_DEEP_LENGTHS: usize = 2;

/// Bits of one generation of `LONG_V6_FILTER` (a power of two): 8 Mi bits, 1 MiB, so that a
/// million keys set about one bit in nine.
pub const V6_FILTER_BITS_LOG2: u32 = 23;
/// 64-bit words of one generation of `LONG_V6_FILTER`.
pub const V6_FILTER_WORDS: u32 = 1 << (V6_FILTER_BITS_LOG2 - 6);

/// The bit of `LONG_V6_FILTER` a `LONG_V6` key sets: the key's address masked to its length,
/// as two host-order halves of its network-order bytes, and the length. A one-hash Bloom
/// filter: every key of a generation has its bit set in that generation's half, so a clear bit
/// means "not in the hash" and spares the lookup the hash probe (what a flood from addresses
/// next to an approved IPv6 range would otherwise pay on every packet). A set bit may be another
/// key's: the probe then answers.
#[inline(always)]
pub const fn v6_filter_bit(hi: u64, lo: u64, len: u8) -> u32 {
    (v6_mix(hi, lo, len) >> (64 - V6_FILTER_BITS_LOG2)) as u32
}

/// The hash of a masked IPv6 prefix (`v6_filter_bit`, `v6_deep_slot`).
#[inline(always)]
const fn v6_mix(hi: u64, lo: u64, len: u8) -> u64 {
    let x = hi ^ lo.rotate_left(29) ^ (len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x ^ (x >> 31)).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// The /40s the node markers of `LONG_V6_FILTER` stand for: inside a /16 whose /32s have
/// `NODE_V6` entries, every key longer than /32 sets the marker bit of each /40 it overlaps, so a
/// clear marker means that nothing longer than /32 decides the /40's addresses and the lookup
/// skips the node and its probes (a flood from the empty parts of a /32 that lists many lengths
/// would otherwise pay them on every packet).
pub const V6_MARKER_BITS: u8 = 40;

/// The marker bit of the /40 holding the address whose first 64 bits are `hi`: a filter bit
/// of length 0, which no `LONG_V6` key has.
#[inline(always)]
pub const fn v6_marker_bit(hi: u64) -> u32 {
    v6_filter_bit(hi & (u64::MAX << (64 - V6_MARKER_BITS as u32)), 0, 0)
}

/// The /48s of `DEEP_V6`: under a node, each key longer than /48 marks its own /48 there.
pub const V6_DEEP_BITS: u8 = 48;
/// Byte slots of one generation of `DEEP_V6` (a power of two): 1 MiB.
pub const V6_DEEP_SLOTS_LOG2: u32 = 20;
/// 64-bit words of one generation of `DEEP_V6` (eight slots each).
pub const V6_DEEP_WORDS: u32 = 1 << (V6_DEEP_SLOTS_LOG2 - 3);

/// The `DEEP_V6` byte slot (within a generation) of the /48 holding the address whose first 64
/// bits are `hi`: byte `slot % 8` (the least significant first) of word `slot / 8`. The slot's
/// bit `i` is set when a key of the `i`th length of its node's list (longest first), a length
/// over /48, lies in a /48 of this slot: the lookup probes a node's lengths over /48 only where
/// their bits are set (an allowed /48, or a packet beside a listed /63, paid a probe for every
/// longer length of an expanded /32 before). Slots are shared by the /48s that hash alike,
/// whose bits add up: a set bit only costs a probe.
#[inline(always)]
pub const fn v6_deep_slot(hi: u64) -> u32 {
    (v6_mix(hi & (u64::MAX << (64 - V6_DEEP_BITS as u32)), 0, 1) >> (64 - V6_DEEP_SLOTS_LOG2))
        as u32
}

/// A slot of `DIR_V6`.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | `rule + 1` of the longest prefix /0 to /16 covering this /16, or 0 |
/// | 4 | 4 | 1 if the /32s inside have `NODE_V6` entries for their lengths /33 to /128, else 0 |
/// | 8 | 8 | the lengths to probe for every address of this /16, longest first, 0-terminated: /17 to /32, and /33 to /128 unless the /32s have nodes |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirV6 {
    pub value: u32,
    pub nodes: u32,
    pub lengths: [u8; MAX_V6_LENGTHS],
}
const _: () = assert!(core::mem::size_of::<DirV6>() == 16);

/// One generation's half of a `NODE_V6` value: the lengths /33 to /128 of prefixes inside a
/// /32, longest first, 0-terminated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeV6 {
    pub lengths: [u8; MAX_V6_LENGTHS],
}
const _: () = assert!(core::mem::size_of::<NodeV6>() == 8);

/// Buckets of one generation of `NODE_V6_TABLE` (4 MiB): the `NODE_V6` entries again, in an
/// array the program reads without hashing (a hash lookup cost an allowed packet under a node
/// about 10 ns, a quarter of its lookup). 65,536 buckets of 4 slots hold the nodes of a
/// million-entry realistic registry with few overflows.
pub const V6_NODE_BUCKETS_LOG2: u32 = 16;
/// Buckets of one generation of `NODE_V6_TABLE`.
pub const V6_NODE_BUCKETS: u32 = 1 << V6_NODE_BUCKETS_LOG2;
/// Slots of a `NodeBucket`.
pub const V6_NODE_SLOTS: usize = 4;

/// The `NODE_V6_TABLE` bucket (within a generation) of the /32 whose first 32 bits are `top`.
#[inline(always)]
pub const fn v6_node_bucket(top: u32) -> u32 {
    top.wrapping_mul(0x9E37_79B1) >> (32 - V6_NODE_BUCKETS_LOG2)
}

/// A bucket of `NODE_V6_TABLE`, indexed by `generation * V6_NODE_BUCKETS + v6_node_bucket(top)`:
/// up to four /32s of that bucket with their node's lengths (as in `NodeV6`; all zero: a free
/// slot). `overflow` is 1 when more /32s of the bucket have nodes than it holds: the program then
/// asks `NODE_V6` (which holds every node) for a /32 it does not find here. One cache line.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 16 | the first 32 bits of each slot's /32 (host order) |
/// | 16 | 32 | each slot's lengths /33 to /128, longest first, 0-terminated |
/// | 48 | 4 | 1 if some node of this bucket is only in `NODE_V6`, else 0 |
/// | 52 | 12 | padding, 0 |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeBucket {
    pub tops: [u32; V6_NODE_SLOTS],
    pub lengths: [[u8; MAX_V6_LENGTHS]; V6_NODE_SLOTS],
    pub overflow: u32,
    pub _pad: [u8; 12],
}
const _: () = assert!(core::mem::size_of::<NodeBucket>() == 64);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), has no padding the compiler adds (checked by the size
    // asserts above) and is valid for any bit pattern.
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::VpnApproval {}
    unsafe impl aya::Pod for super::VpnGroup {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowSessions {}
    unsafe impl aya::Pod for super::LongKeyV4 {}
    unsafe impl aya::Pod for super::LongKeyV6 {}
    unsafe impl aya::Pod for super::DirV6 {}
    unsafe impl aya::Pod for super::NodeV6 {}
    unsafe impl aya::Pod for super::NodeBucket {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::ConnTimeouts {}
    unsafe impl aya::Pod for super::UpstreamGroup {}
    unsafe impl aya::Pod for super::EgressConfig {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::EventSource {}
    unsafe impl aya::Pod for super::SourceWindow {}
    unsafe impl aya::Pod for super::AccessKey {}
}
