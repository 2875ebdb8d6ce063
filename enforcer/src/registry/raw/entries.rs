//! One function per section: an entry's JSON into its typed value, each problem placed at the
//! field it concerns (through `EntryCheck`).

use ipnet::IpNet;
use serde::Deserialize;

use super::EntryCheck;
use crate::registry::{DenyEntry, Device, Network, Upstream, VpnEndpoint, VpnProtocol};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: String,
    cidr: String,
    ministry: Option<String>,
    ports: Option<Vec<String>>,
    expires: Option<String>,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: String,
    address: String,
    ministry: Option<String>,
    owner: Option<String>,
    ports: Option<Vec<String>>,
    expires: Option<String>,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVpnEndpoint {
    name: String,
    address: String,
    protocol: String,
    port: Option<u16>,
    approval: String,
    expires: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeny {
    name: Option<String>,
    cidr: String,
    note: Option<String>,
    expires: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    cidr: Option<String>,
    address: Option<String>,
    ports: Option<Vec<String>>,
    ministry: Option<String>,
    expires: Option<String>,
    note: Option<String>,
}

pub(super) fn network(check: &mut EntryCheck<'_>) -> Option<Network> {
    let raw: RawNetwork = check.deserialize()?;
    check.named(Some(&raw.name));
    let named = check.name(&raw.name);
    let cidr = check.cidr("cidr", &raw.cidr);
    let ports = check.ports(raw.ports.as_deref());
    let expires = check.date("expires", raw.expires.as_deref());
    Some(Network {
        name: named.then_some(raw.name)?,
        cidr: cidr?,
        ministry: raw.ministry.map(String::into_boxed_str),
        ports: ports?,
        expires: expires?,
        note: raw.note.map(String::into_boxed_str),
    })
}

pub(super) fn device(check: &mut EntryCheck<'_>) -> Option<Device> {
    let raw: RawDevice = check.deserialize()?;
    check.named(Some(&raw.name));
    let named = check.name(&raw.name);
    let address = check.address("address", &raw.address);
    let ports = check.ports(raw.ports.as_deref());
    let expires = check.date("expires", raw.expires.as_deref());
    Some(Device {
        name: named.then_some(raw.name)?,
        address: address?,
        ministry: raw.ministry.map(String::into_boxed_str),
        owner: raw.owner.map(String::into_boxed_str),
        ports: ports?,
        expires: expires?,
        note: raw.note.map(String::into_boxed_str),
    })
}

pub(super) fn vpn_endpoint(check: &mut EntryCheck<'_>) -> Option<VpnEndpoint> {
    let raw: RawVpnEndpoint = check.deserialize()?;
    check.named(Some(&raw.name));
    let named = check.name(&raw.name);
    let address = check.cidr("address", &raw.address);
    let protocol = VpnProtocol::from_name(&raw.protocol);
    let protocol_ok = protocol.is_some();
    if !protocol_ok {
        check.problem(
            "protocol",
            format!(
                "unknown VPN protocol \"{}\" (expected one of: {})",
                raw.protocol,
                VpnProtocol::ALL.map(VpnProtocol::name).join(", ")
            ),
        );
    }
    if raw.port == Some(0) {
        check.problem("port", "port 0 is not a port".to_string());
    }
    let approval_ok = !raw.approval.trim().is_empty();
    if !approval_ok {
        check.problem(
            "approval",
            "an approved VPN endpoint needs its approval reference".to_string(),
        );
    }
    let expires = check.date("expires", raw.expires.as_deref());
    let valid = named && protocol_ok && approval_ok && raw.port != Some(0);
    Some(VpnEndpoint {
        name: raw.name,
        address: address?,
        protocol: protocol?,
        port: raw.port,
        approval: raw.approval,
        expires: expires?,
    })
    .filter(|_| valid)
}

pub(super) fn deny(check: &mut EntryCheck<'_>) -> Option<DenyEntry> {
    let raw: RawDeny = check.deserialize()?;
    check.named(raw.name.as_deref());
    let named = raw.name.as_deref().is_none_or(|name| check.name(name));
    let cidr = check.cidr("cidr", &raw.cidr);
    let expires = check.date("expires", raw.expires.as_deref());
    Some(DenyEntry {
        name: raw.name,
        cidr: cidr?,
        note: raw.note.map(String::into_boxed_str),
        expires: expires?,
    })
    .filter(|_| named)
}

pub(super) fn upstream(check: &mut EntryCheck<'_>) -> Option<Upstream> {
    let raw: RawUpstream = check.deserialize()?;
    check.named(Some(&raw.name));
    let named = check.name(&raw.name);
    let prefix = match (&raw.cidr, &raw.address) {
        (Some(cidr), None) => check.cidr("cidr", cidr),
        (None, Some(address)) => check.address("address", address).map(IpNet::from),
        (Some(_), Some(_)) => {
            check.problem(
                "address",
                "an upstream has a \"cidr\" or an \"address\", not both".to_string(),
            );
            None
        }
        (None, None) => {
            check.problem(
                "name",
                "an upstream needs its \"cidr\" or \"address\" (e.g. \"address\": \"192.0.2.53\")"
                    .to_string(),
            );
            None
        }
    };
    let ports = match raw.ports.as_deref() {
        Some([]) => {
            check.problem(
                "ports",
                "empty ports list: an upstream is reached on the ports it lists".to_string(),
            );
            None
        }
        Some(specs) => check.ports(Some(specs)).flatten(),
        None => {
            check.problem(
                "name",
                "an upstream needs its \"ports\" (e.g. [\"53/udp\", \"53/tcp\"]): the server reaches it on those only"
                    .to_string(),
            );
            None
        }
    };
    let expires = check.date("expires", raw.expires.as_deref());
    Some(Upstream {
        name: named.then_some(raw.name)?,
        prefix: prefix?,
        ports: ports?,
        ministry: raw.ministry.map(String::into_boxed_str),
        expires: expires?,
        note: raw.note.map(String::into_boxed_str),
    })
}
