//! Port specifications of allowlist entries: `443/tcp`, `8000-8080/tcp`, `53/udp`, `icmp`.

use std::fmt;

use super::ValueError;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    /// IP protocol number (ICMP is 1 for IPv4; the kernel treats `ICMPv6` alike).
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            other => Err(ValueError::Protocol(other.to_string())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one entry of `ports` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// A port range (`first == last` for one port) of TCP or UDP.
    Range {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// ICMP and `ICMPv6` (no ports).
    Icmp,
}

impl PortSpec {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        if text == "icmp" {
            return Ok(Self::Icmp);
        }
        let bad = |why: &'static str| ValueError::PortSpec {
            spec: text.to_string(),
            why,
        };
        let (ports, protocol) = text.split_once('/').ok_or_else(|| bad("no /protocol"))?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad("protocol must be tcp or udp")),
        };
        let port = |s: &str| -> Result<u16, ValueError> {
            match s.parse::<u16>() {
                Ok(0) => Err(bad("port 0 is not a port")),
                Ok(port) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
                _ => Err(bad("ports are numbers from 1 to 65535")),
            }
        };
        let (first, last) = match ports.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => (port(ports)?, port(ports)?),
        };
        if first > last {
            return Err(bad("range runs backwards"));
        }
        Ok(Self::Range {
            protocol,
            first,
            last,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Range {
                protocol,
                first,
                last,
            } if first == last => write!(f, "{first}/{protocol}"),
            Self::Range {
                protocol,
                first,
                last,
            } => write!(f, "{first}-{last}/{protocol}"),
            Self::Icmp => f.write_str("icmp"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PortSpec, Protocol};

    #[test]
    fn parses_specs() {
        assert_eq!(
            PortSpec::parse("443/tcp").unwrap(),
            PortSpec::Range {
                protocol: Protocol::Tcp,
                first: 443,
                last: 443
            }
        );
        assert_eq!(PortSpec::parse("icmp").unwrap(), PortSpec::Icmp);
        assert_eq!(
            PortSpec::parse("8000-8080/udp").unwrap().to_string(),
            "8000-8080/udp"
        );
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "443",
            "443/sctp",
            "0/tcp",
            "65536/tcp",
            "80-22/tcp",
            "-1/tcp",
            "+80/tcp",
            "a/tcp",
            "",
            "icmp/tcp",
        ] {
            assert!(PortSpec::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
