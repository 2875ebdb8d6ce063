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
    /// Link-layer control the link needs: ARP, IPv6 neighbour discovery, MLD.
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
}

impl Reason {
    /// Every reason, in number order.
    pub const ALL: [Self; 8] = [
        Self::Allowed,
        Self::LinkControl,
        Self::Malformed,
        Self::Denied,
        Self::NotAllowlisted,
        Self::PortNotAllowed,
        Self::FragmentUnverified,
        Self::NonIp,
    ];

    pub const fn action(self) -> Action {
        match self {
            Self::Allowed | Self::LinkControl => Action::Pass,
            Self::Malformed
            | Self::Denied
            | Self::NotAllowlisted
            | Self::PortNotAllowed
            | Self::FragmentUnverified
            | Self::NonIp => Action::Drop,
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
        }
    }

    /// One line for an operator.
    pub const fn help(self) -> &'static str {
        match self {
            Self::Allowed => "source allowlisted and its port/protocol allowed",
            Self::LinkControl => "ARP, IPv6 neighbour discovery or MLD, needed for the link",
            Self::Malformed => "truncated or inconsistent Ethernet/VLAN/IP/TCP/UDP headers",
            Self::Denied => "source in the deny list",
            Self::NotAllowlisted => "source in no approved network or device",
            Self::PortNotAllowed => "source approved, but not for this port or protocol",
            Self::FragmentUnverified => {
                "later IP fragment whose first fragment was not seen passing the port check"
            }
            Self::NonIp => "EtherType that is neither IP nor link-layer control",
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
