//! Why a packet got its verdict: a stable, append-only numbered enum. Dashboards, logs and the
//! JSON output of `enforcer stats` depend on these numbers; a retired number is never reused.

/// What the program does with a packet of this reason in enforce mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Source in the allowlist, and its port/protocol allowed.
    Allowed = 0,
    /// Link-layer control the link needs: ARP, IPv6 neighbour discovery, MLD, link-local IGMP.
    LinkControl = 1,
    /// Truncated or inconsistent headers.
    Malformed = 2,
    /// Source in the deny list (beats every allow).
    Denied = 3,
    /// Source in no allowlisted network or device.
    NotAllowlisted = 4,
    /// Source allowlisted, but not for this port or protocol.
    PortNotAllowed = 5,
    /// A later fragment of a datagram from a port-restricted network whose first fragment was
    /// not seen passing (fragments carry no ports, so they may not bypass the port check).
    FragmentUnverified = 6,
    /// Neither IP nor link-layer control (another `EtherType`).
    NonIp = 7,
    /// A VPN packet to or from an endpoint approved for its protocol.
    ApprovedVpn = 8,
    /// A VPN packet (recognised by its signature) whose endpoints are not approved for it.
    UnapprovedVpn = 9,
    /// Source in a deny feed (a plain list of ranges named by the registry).
    DeniedFeed = 10,
    /// A reply to a connection the server opened (its source need not be allowlisted).
    EstablishedReply = 11,
    /// Outgoing: the destination is neither an approved network or device nor an upstream on
    /// this port.
    EgressDenied = 12,
    /// Outgoing: the destination is an upstream (`upstreams`) that lists this port.
    Upstream = 13,
}

impl Reason {
    /// Every reason, in number order.
    pub const ALL: [Self; 14] = [
        Self::Allowed,
        Self::LinkControl,
        Self::Malformed,
        Self::Denied,
        Self::NotAllowlisted,
        Self::PortNotAllowed,
        Self::FragmentUnverified,
        Self::NonIp,
        Self::ApprovedVpn,
        Self::UnapprovedVpn,
        Self::DeniedFeed,
        Self::EstablishedReply,
        Self::EgressDenied,
        Self::Upstream,
    ];

    pub const fn action(self) -> Action {
        match self {
            Self::Allowed
            | Self::LinkControl
            | Self::ApprovedVpn
            | Self::EstablishedReply
            | Self::Upstream => Action::Pass,
            Self::Malformed
            | Self::Denied
            | Self::NotAllowlisted
            | Self::PortNotAllowed
            | Self::FragmentUnverified
            | Self::NonIp
            | Self::UnapprovedVpn
            | Self::DeniedFeed
            | Self::EgressDenied => Action::Drop,
        }
    }

    /// The stable label used in output and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::LinkControl => "link_control",
            Self::Malformed => "malformed",
            Self::Denied => "denied",
            Self::NotAllowlisted => "not_allowlisted",
            Self::PortNotAllowed => "port_not_allowed",
            Self::FragmentUnverified => "fragment_unverified",
            Self::NonIp => "non_ip",
            Self::ApprovedVpn => "approved_vpn",
            Self::UnapprovedVpn => "unapproved_vpn",
            Self::DeniedFeed => "denied_feed",
            Self::EstablishedReply => "established_reply",
            Self::EgressDenied => "egress_denied",
            Self::Upstream => "upstream",
        }
    }

    /// One line for an operator.
    pub const fn help(self) -> &'static str {
        match self {
            Self::Allowed => "source allowlisted and its port/protocol allowed",
            Self::LinkControl => {
                "ARP, LACP, 802.1X, LLDP, spanning tree, IPv6 neighbour discovery, MLD or link-local IGMP: the link needs them"
            }
            Self::Malformed => "truncated or inconsistent Ethernet/VLAN/IP/TCP/UDP headers",
            Self::Denied => "source in the deny list",
            Self::NotAllowlisted => "source in no approved network or device",
            Self::PortNotAllowed => "source approved, but not for this port or protocol",
            Self::FragmentUnverified => {
                "later IP fragment whose first fragment was not seen passing the port check"
            }
            Self::NonIp => "EtherType that is neither IP nor link-layer control",
            Self::ApprovedVpn => "VPN packet to/from an endpoint approved for its protocol",
            Self::UnapprovedVpn => "VPN packet whose endpoints are not approved for its protocol",
            Self::DeniedFeed => "source in a deny feed file",
            Self::EstablishedReply => "reply to a connection this server opened",
            Self::EgressDenied => {
                "outgoing to a destination that is neither approved nor an upstream on this port"
            }
            Self::Upstream => "outgoing to an upstream on one of its ports",
        }
    }
}

impl TryFrom<u32> for Reason {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, u32> {
        Self::ALL
            .iter()
            .copied()
            .find(|reason| *reason as u32 == value)
            .ok_or(value)
    }
}

/// VPN protocols the program recognises, one packet at a time: a stable, append-only numbering
/// (counters are indexed by it).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VpnProtocol {
    /// All four message types, data packets included.
    WireGuard = 0,
    /// Client and server hard resets (UDP and TCP); the rest of the flow through the flow map.
    OpenVpn = 1,
    /// IKEv1/IKEv2 (500, 4500 with the non-ESP marker, any port), ESP, AH, ESP-in-UDP and
    /// NAT-T keepalives on 4500.
    Ipsec = 2,
    /// `L2TPv2` control (and data on 1701), `L2TPv3` (IP 115).
    L2tp = 3,
    /// PPTP control (TCP, magic cookie) and its enhanced GRE v1.
    Pptp = 4,
    /// Tailscale disco packets (its data is `WireGuard`).
    Tailscale = 5,
    /// Cloudflare WARP (a `WireGuard` variant with message types 0xC1-0xC4), gated on UDP 2408.
    CloudflareWarp = 6,
    /// Cisco `AnyConnect` / `OpenConnect` DTLS records with the Cisco-legacy version 0x0100.
    AnyConnect = 7,
    /// `SoftEther`'s NAT-traversal helper (`IP=...,PORT=...`).
    SoftEther = 8,
    /// `UltraSurf`'s first TCP payload bytes.
    UltraSurf = 9,
    /// `ExpressVPN` Lightway over UDP (`He` header).
    Lightway = 10,
    /// `ZeroTier` HELLO (unencrypted, identity address equals source address).
    ZeroTier = 11,
}

impl VpnProtocol {
    pub const ALL: [Self; 12] = [
        Self::WireGuard,
        Self::OpenVpn,
        Self::Ipsec,
        Self::L2tp,
        Self::Pptp,
        Self::Tailscale,
        Self::CloudflareWarp,
        Self::AnyConnect,
        Self::SoftEther,
        Self::UltraSurf,
        Self::Lightway,
        Self::ZeroTier,
    ];

    /// The name used in the registry (`vpn_endpoints[].protocol`) and in output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::WireGuard => "wireguard",
            Self::OpenVpn => "openvpn",
            Self::Ipsec => "ipsec",
            Self::L2tp => "l2tp",
            Self::Pptp => "pptp",
            Self::Tailscale => "tailscale",
            Self::CloudflareWarp => "warp",
            Self::AnyConnect => "anyconnect",
            Self::SoftEther => "softether",
            Self::UltraSurf => "ultrasurf",
            Self::Lightway => "lightway",
            Self::ZeroTier => "zerotier",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl TryFrom<u8> for VpnProtocol {
    type Error = u8;

    fn try_from(value: u8) -> Result<Self, u8> {
        Self::ALL
            .into_iter()
            .find(|p| *p as u8 == value)
            .ok_or(value)
    }
}
