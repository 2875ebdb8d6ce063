//! Real VPN software through the enforcer. The e-Office server (enforcer on its eth0) opens a
//! tunnel to a VPN gateway: to the approved gateway the tunnel comes up and carries pings; to a
//! gateway in the allowlisted ministry LAN whose VPN is not approved, the handshake never
//! completes, and the counters say why. Needs root, wireguard-go, wireguard-tools, openvpn.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use enforcer_tests::{
    daemon::{Enforcer, Stats},
    netns::Netns,
    netns::require_root,
    topology::{self, APPROVED_VPN_GW, Lab, ROGUE_VPN_GW, SERVER_IFACE},
    vpn::{Certificate, OpenVpn, StrongSwan, TempDir, WgKeys, WireGuard, tls_crypt_key},
};

const REGISTRY: &str = r#"{
  "schema": 1, "mode": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24"}],
  "vpn_endpoints": [
    {"name": "nitb-wg-gw", "address": "192.0.2.7", "protocol": "wireguard", "port": 51820,
     "approval": "NITB-2026-0042", "expires": "2099-01-31"},
    {"name": "nitb-ovpn-gw", "address": "192.0.2.7", "protocol": "openvpn", "port": 1194,
     "approval": "NITB-2026-0043"}
  ]
}"#;

/// Tunnel addresses (inside the tunnel only).
const TUN_GW: &str = "203.0.113.201";
const TUN_SERVER: &str = "203.0.113.202";

struct Setup {
    lab: Lab,
    enforcer: Enforcer,
    dir: TempDir,
}

const IPSEC_REGISTRY: &str = r#"{
  "schema": 1, "mode": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24"}],
  "vpn_endpoints": [
    {"name": "nitb-ipsec-gw", "address": "192.0.2.0/29", "protocol": "ipsec", "approval": "NITB-2026-0057"}
  ]
}"#;

fn setup() -> Setup {
    setup_with(REGISTRY)
}

/// Pings `to` from `ns` with source address `from` (tunnel inner addresses).
fn ping_from(ns: &Netns, from: &str, to: &str, count: u32) -> u32 {
    let out = ns
        .exec_status(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.3",
            "-W",
            "1",
            "-I",
            from,
            to,
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn setup_with(registry_text: &str) -> Setup {
    setup_with_args(registry_text, &[])
}

fn setup_with_args(registry_text: &str, args: &[&str]) -> Setup {
    require_root();
    let lab = Lab::new(&[APPROVED_VPN_GW, ROGUE_VPN_GW]).unwrap();
    let dir = TempDir::new("enf-vpn").unwrap();
    let registry: PathBuf = dir.0.join("registry.json");
    std::fs::write(&registry, registry_text).unwrap();
    let enforcer = Enforcer::start(&lab.server, SERVER_IFACE, &registry, args).unwrap();
    Setup { lab, enforcer, dir }
}

fn wireguard_tunnel(s: &Setup, gateway: &str) -> (WireGuard, WireGuard) {
    let gw = s.lab.client(gateway);
    let (server_keys, gw_keys) = (WgKeys::generate().unwrap(), WgKeys::generate().unwrap());
    let gw_side = WireGuard::up(
        &gw.ns,
        &s.dir,
        &gw_keys,
        51820,
        TUN_GW,
        &server_keys.public,
        None,
        &format!("{TUN_SERVER}/32"),
    )
    .unwrap();
    let endpoint = format!("{}:51820", gw.v4);
    let server_side = WireGuard::up(
        &s.lab.server,
        &s.dir,
        &server_keys,
        40000,
        TUN_SERVER,
        &gw_keys.public,
        Some(endpoint),
        &format!("{TUN_GW}/32"),
    )
    .unwrap();
    (gw_side, server_side)
}

#[test]
fn wireguard_to_the_approved_gateway_carries_traffic() {
    let s = setup();
    let (_gw, server) = wireguard_tunnel(&s, APPROVED_VPN_GW.label);
    let replies = topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 5).unwrap();
    assert!(
        replies >= 4,
        "pings through the approved WireGuard tunnel: {replies}/5"
    );
    assert!(
        server.latest_handshake().unwrap() > 0,
        "the handshake completed"
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.vpn_approved("wireguard") >= 5,
        "approved WireGuard packets counted: {}",
        stats.0["vpn"]
    );
    assert_eq!(stats.vpn_unapproved("wireguard"), 0);
    assert!(stats.rule_hits("nitb-wg-gw") >= 5);
}

#[test]
fn wireguard_to_an_unapproved_gateway_never_completes_its_handshake() {
    let s = setup();
    let (_gw, server) = wireguard_tunnel(&s, ROGUE_VPN_GW.label);
    let replies = topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 5).unwrap();
    assert_eq!(replies, 0, "no ping may cross an unapproved tunnel");
    assert_eq!(
        server.latest_handshake().unwrap(),
        0,
        "the handshake must never complete"
    );
    let stats: Stats = s.enforcer.stats().unwrap();
    assert!(
        stats.vpn_unapproved("wireguard") >= 1,
        "the gateway's handshake responses are counted: {}",
        stats.0["vpn"]
    );
    assert!(stats.packets("unapproved_vpn") >= 1);
    assert_eq!(
        stats.rule_hits("ministry-lan"),
        0,
        "the gateway's allowlisted network did not let the VPN through"
    );
}

/// Ingress in monitor (it drops nothing) and egress enforce: only the egress verdict stands
/// between the server's own `WireGuard` and its gateway.
const EGRESS_REGISTRY: &str = r#"{
  "schema": 1, "mode": "monitor", "egress": "enforce",
  "networks": [{"name": "ministry-lan", "cidr": "198.51.100.0/24"}],
  "vpn_endpoints": [
    {"name": "nitb-wg-gw", "address": "192.0.2.7", "protocol": "wireguard", "port": 51820,
     "approval": "NITB-2026-0042"}
  ]
}"#;

#[test]
fn in_egress_enforce_the_servers_own_wireguard_reaches_only_the_approved_gateway() {
    let s = setup_with(EGRESS_REGISTRY);
    {
        let (_gw, server) = wireguard_tunnel(&s, APPROVED_VPN_GW.label);
        let replies = topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 5).unwrap();
        assert!(
            replies >= 4,
            "pings through the approved tunnel: {replies}/5"
        );
        assert!(
            server.latest_handshake().unwrap() > 0,
            "the handshake completed"
        );
        let stats = s.enforcer.stats().unwrap();
        assert!(
            stats.egress_packets("approved_vpn") >= 5,
            "the server's WireGuard packets leave as approved: {}",
            stats.0["egress"]
        );
        assert!(stats.egress_rule_hits("nitb-wg-gw") >= 5, "{}", stats.0);
    }
    // The rogue gateway sits in the approved ministry LAN, to which the server may send
    // anything else: its WireGuard handshake initiations still never leave. (Ingress drops
    // nothing here, so without the egress verdict this tunnel would come up.)
    let before = s.enforcer.stats().unwrap().egress_packets("unapproved_vpn");
    let (gw, server) = wireguard_tunnel(&s, ROGUE_VPN_GW.label);
    let replies = topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 3).unwrap();
    assert_eq!(replies, 0, "no ping may cross the unapproved tunnel");
    assert_eq!(
        server.latest_handshake().unwrap(),
        0,
        "no handshake on the server"
    );
    assert_eq!(
        gw.latest_handshake().unwrap(),
        0,
        "no handshake completed at the gateway either"
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.egress_packets("unapproved_vpn") > before,
        "the initiations drop on the way out as unapproved_vpn: {}",
        stats.0["egress"]
    );
    assert_eq!(
        stats.would_drop("unapproved_vpn"),
        0,
        "nothing came back for ingress monitor to count"
    );
}

fn openvpn_tunnel(s: &Setup, gateway: &str, proto: &str) -> (OpenVpn, OpenVpn) {
    let gw = s.lab.client(gateway);
    let (gw_cert, server_cert) = (
        Certificate::self_signed(&s.dir, "gateway").unwrap(),
        Certificate::self_signed(&s.dir, "eoffice").unwrap(),
    );
    let key = tls_crypt_key(&s.dir).unwrap();
    let gw_side = OpenVpn::start(
        &gw.ns,
        &s.dir,
        proto,
        &gw_cert,
        &server_cert,
        &key,
        true,
        None,
        1194,
        TUN_GW,
        TUN_SERVER,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let remote = gw.v4.to_string();
    let server_side = OpenVpn::start(
        &s.lab.server,
        &s.dir,
        proto,
        &server_cert,
        &gw_cert,
        &key,
        false,
        Some(&remote),
        1194,
        TUN_SERVER,
        TUN_GW,
    )
    .unwrap();
    (gw_side, server_side)
}

fn wait_connected(client: &OpenVpn, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if client.connected() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn openvpn_approved(proto: &str) {
    let s = setup();
    let (gw, client) = openvpn_tunnel(&s, APPROVED_VPN_GW.label, proto);
    let connected = wait_connected(&client, Duration::from_secs(20));
    assert!(
        connected,
        "OpenVPN ({proto}) to the approved gateway must connect.\nclient log:\n{}\ngateway log:\n{}\nenforcer: {:#}",
        client.log_text(),
        gw.log_text(),
        s.enforcer.stats().map(|st| st.0).unwrap_or_default()
    );
    let replies = topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 3).unwrap();
    assert!(
        replies >= 2,
        "pings through the approved OpenVPN ({proto}) tunnel: {replies}/3"
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.vpn_approved("openvpn") >= 3,
        "approved OpenVPN packets counted: {}",
        stats.0["vpn"]
    );
    assert_eq!(stats.vpn_unapproved("openvpn"), 0);
}

fn openvpn_unapproved(proto: &str) {
    let s = setup();
    let (_gw, client) = openvpn_tunnel(&s, ROGUE_VPN_GW.label, proto);
    assert!(
        !wait_connected(&client, Duration::from_secs(8)),
        "OpenVPN ({proto}) to an unapproved gateway must not connect:\n{}",
        client.log_text()
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.vpn_unapproved("openvpn") >= 1,
        "the gateway's reset is counted: {}",
        stats.0["vpn"]
    );
    assert_eq!(stats.vpn_approved("openvpn"), 0);
}

/// Whether the running enforcer sends TCP/UDP packets to the VPN flow lookup (remembered
/// `OpenVPN` flows), as `enforcer status` reports it.
fn flow_lookup(s: &Setup) -> bool {
    let status = s.enforcer.status().unwrap();
    status["vpn_flow_lookup"]
        .as_bool()
        .unwrap_or_else(|| panic!("status without vpn_flow_lookup: {status}"))
}

/// A real `OpenVPN` session leaves a remembered flow; the sweep (every second here) keeps it while
/// the tunnel carries traffic, and once the tunnel is gone forgets it and turns the flow lookup
/// off again, so that one session does not cost every later packet a lookup.
#[test]
fn a_finished_openvpn_session_is_forgotten_and_the_flow_lookup_turns_off() {
    let s = setup_with_args(REGISTRY, &["--vpn-flow-idle", "1"]);
    assert!(!flow_lookup(&s), "no flow is remembered before any VPN");
    let (gw, client) = openvpn_tunnel(&s, APPROVED_VPN_GW.label, "udp");
    assert!(
        wait_connected(&client, Duration::from_secs(20)),
        "OpenVPN to the approved gateway must connect:\n{}\n{}",
        client.log_text(),
        gw.log_text()
    );
    assert!(
        flow_lookup(&s),
        "the session's reset was remembered: {}",
        s.enforcer.log_text()
    );
    // Three seconds of traffic (a ping every 0.2 s): three sweeps, and the tunnel keeps working.
    let replies = topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 15).unwrap();
    assert!(
        replies >= 13,
        "pings through the tunnel across sweeps: {replies}/15"
    );
    assert!(flow_lookup(&s), "an active session's flow is kept");

    drop(client);
    drop(gw);
    let deadline = Instant::now() + Duration::from_secs(10);
    while flow_lookup(&s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !flow_lookup(&s),
        "within 10 s of the session's end (sweeps every 1 s) the flow is forgotten:\n{}",
        s.enforcer.log_text()
    );
    assert!(
        s.enforcer.log_text().contains("the flow lookup is off"),
        "the controller logs it:\n{}",
        s.enforcer.log_text()
    );
}

#[test]
fn openvpn_udp_to_the_approved_gateway_connects() {
    openvpn_approved("udp");
}

#[test]
fn openvpn_udp_to_an_unapproved_gateway_never_connects() {
    openvpn_unapproved("udp");
}

#[test]
fn openvpn_tcp_to_the_approved_gateway_connects() {
    openvpn_approved("tcp");
}

#[test]
fn openvpn_tcp_to_an_unapproved_gateway_never_connects() {
    openvpn_unapproved("tcp");
}

fn strongswan_tunnel(s: &Setup, gateway: &str) -> (StrongSwan, StrongSwan) {
    let gw = s.lab.client(gateway);
    let (gw_addr, server_addr) = (gw.v4.to_string(), gw.server_v4.to_string());
    let gw_side = StrongSwan::start(
        &gw.ns,
        &s.dir,
        "gateway",
        (&gw_addr, "gateway", TUN_GW),
        (&server_addr, "eoffice", TUN_SERVER),
    )
    .unwrap();
    let server_side = StrongSwan::start(
        &s.lab.server,
        &s.dir,
        "eoffice",
        (&server_addr, "eoffice", TUN_SERVER),
        (&gw_addr, "gateway", TUN_GW),
    )
    .unwrap();
    (gw_side, server_side)
}

#[test]
fn ipsec_ikev2_to_the_approved_gateway_carries_traffic() {
    let s = setup_with(IPSEC_REGISTRY);
    let (gw, server) = strongswan_tunnel(&s, APPROVED_VPN_GW.label);
    let initiated = server.initiate();
    assert!(
        initiated.is_ok(),
        "IKEv2 to the approved gateway must come up: {initiated:?}\n{}\ngateway:\n{}",
        server.log_text(),
        gw.log_text()
    );
    let replies = ping_from(&s.lab.server, TUN_SERVER, TUN_GW, 3);
    assert!(
        replies >= 2,
        "pings through the approved IPsec tunnel (ESP in UDP 4500): {replies}/3"
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.vpn_approved("ipsec") >= 4,
        "approved IKE and ESP packets counted: {}",
        stats.0["vpn"]
    );
    assert_eq!(stats.vpn_unapproved("ipsec"), 0);
}

#[test]
fn ipsec_ikev2_to_an_unapproved_gateway_never_completes() {
    let s = setup_with(IPSEC_REGISTRY);
    let (_gw, server) = strongswan_tunnel(&s, ROGUE_VPN_GW.label);
    let initiated = server.initiate();
    assert!(
        initiated.is_err(),
        "IKEv2 to an unapproved gateway must not come up: {initiated:?}\n{}",
        server.log_text()
    );
    assert!(
        server.log_text().contains("sending packet"),
        "the initiator did try:\n{}",
        server.log_text()
    );
    let stats = s.enforcer.stats().unwrap();
    assert!(
        stats.vpn_unapproved("ipsec") >= 1,
        "the gateway's IKE_SA_INIT responses are counted: {}",
        stats.0["vpn"]
    );
    assert_eq!(stats.vpn_approved("ipsec"), 0);
}

/// Once live updates exist: revoking the approval of an established tunnel cuts it at once
/// (`WireGuard` data packets carry their signature, so the next packet is judged again).
#[test]
fn revoking_an_approval_cuts_an_established_wireguard_tunnel() {
    let s = setup();
    let (_gw, server) = wireguard_tunnel(&s, APPROVED_VPN_GW.label);
    assert!(
        topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 3).unwrap() >= 2,
        "the approved tunnel works"
    );
    assert!(server.latest_handshake().unwrap() > 0);
    let out = std::process::Command::new(enforcer_tests::daemon::enforcer_bin())
        .args([
            "vpn",
            "revoke",
            "nitb-wg-gw",
            "--instance",
            &s.enforcer.instance,
        ])
        .env_remove("SSH_CLIENT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = s.enforcer.stats().unwrap().vpn_unapproved("wireguard");
    assert_eq!(
        topology::ping(&s.lab.server, TUN_GW.parse().unwrap(), 3).unwrap(),
        0,
        "the tunnel is cut when its approval is revoked"
    );
    let after = s.enforcer.stats().unwrap().vpn_unapproved("wireguard");
    assert!(
        after > before,
        "its packets now count as unapproved: {before} → {after}"
    );
}
