//! The lab: an "e-Office server" namespace and client namespaces on one switched segment (a
//! bridge in a namespace of its own). The enforcer attaches to the server's `eth0`.
//!
//! Addresses are documentation ranges only: the server holds `.1` of each client's subnet.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::{Netns, veth};

/// The server's TCP service port (an echo service standing in for the e-Office web app).
pub const TCP_PORT: u16 = 8080;
/// The server's UDP service port (a sink that counts datagrams).
pub const UDP_PORT: u16 = 5353;
/// A TCP port on the server that the demo registry does not allow.
pub const CLOSED_TCP_PORT: u16 = 2222;

/// A client host: its namespace and addresses.
pub struct Client {
    pub ns: Netns,
    pub label: String,
    pub v4: IpAddr,
    pub v6: IpAddr,
    /// The server's address in this client's subnets.
    pub server_v4: IpAddr,
    pub server_v6: IpAddr,
}

/// A client subnet: `(label, client v4, server v4, prefix v4, client v6, server v6)`.
pub struct ClientSpec {
    pub label: &'static str,
    pub v4: &'static str,
    pub server_v4: &'static str,
    pub v6: &'static str,
    pub server_v6: &'static str,
}

/// The approved ministry LAN client (in `198.51.100.0/24` and `2001:db8:100::/64`).
pub const MINISTRY_LAN: ClientSpec = ClientSpec {
    label: "ministry-lan client",
    v4: "198.51.100.10",
    server_v4: "198.51.100.1",
    v6: "2001:db8:100::10",
    server_v6: "2001:db8:100::1",
};
/// An unapproved "internet" client (`192.0.2.0/24`, `2001:db8:bad::/64`).
pub const INTERNET: ClientSpec = ClientSpec {
    label: "internet client",
    v4: "192.0.2.66",
    server_v4: "192.0.2.1",
    v6: "2001:db8:bad::66",
    server_v6: "2001:db8:bad::1",
};
/// The pre-approved device (`192.0.2.17`, a device entry inside the unapproved subnet).
pub const DCS_LAPTOP: ClientSpec = ClientSpec {
    label: "dcs-laptop device",
    v4: "192.0.2.17",
    server_v4: "192.0.2.1",
    v6: "2001:db8:bad::17",
    server_v6: "2001:db8:bad::1",
};
/// A client in the deny list (`203.0.113.0/24`).
pub const DENIED: ClientSpec = ClientSpec {
    label: "denied VPN-provider client",
    v4: "203.0.113.9",
    server_v4: "203.0.113.1",
    v6: "2001:db8:203::9",
    server_v6: "2001:db8:203::1",
};

/// A VPN gateway whose address the VPN test registry approves (`192.0.2.7`).
pub const APPROVED_VPN_GW: ClientSpec = ClientSpec {
    label: "approved VPN gateway",
    v4: "192.0.2.7",
    server_v4: "192.0.2.1",
    v6: "2001:db8:bad::7",
    server_v6: "2001:db8:bad::1",
};
/// A VPN gateway inside the allowlisted ministry LAN whose VPN is not approved.
pub const ROGUE_VPN_GW: ClientSpec = ClientSpec {
    label: "unapproved VPN gateway in the LAN",
    v4: "198.51.100.66",
    server_v4: "198.51.100.1",
    v6: "2001:db8:100::66",
    server_v6: "2001:db8:100::1",
};

pub struct Lab {
    pub server: Netns,
    pub clients: Vec<Client>,
    server_addrs: Vec<String>,
    // Dropped last: deleting it removes the bridge and the client-side veth ends.
    switch: Netns,
}

/// The interface the enforcer protects, inside the server namespace.
pub const SERVER_IFACE: &str = "eth0";

impl Lab {
    /// Builds the server, the switch and one namespace per client spec.
    pub fn new(clients: &[ClientSpec]) -> anyhow::Result<Self> {
        let switch = Netns::new("enf-sw")?;
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        switch.exec(&["ip", "link", "set", "br0", "up"])?;
        let server = Netns::new("enf-srv")?;
        veth(&server, SERVER_IFACE, &switch, "p0")?;
        switch.exec(&["ip", "link", "set", "p0", "master", "br0"])?;

        let mut built = Vec::new();
        let mut server_addrs: Vec<String> = Vec::new();
        for (i, spec) in clients.iter().enumerate() {
            let ns = Netns::new("enf-cli")?;
            let port = format!("p{}", i + 1);
            veth(&ns, "eth0", &switch, &port)?;
            switch.exec(&["ip", "link", "set", &port, "master", "br0"])?;
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", spec.v4),
                "dev",
                "eth0",
            ])?;
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/64", spec.v6),
                "dev",
                "eth0",
                "nodad",
            ])?;
            for addr in [
                format!("{}/24", spec.server_v4),
                format!("{}/64", spec.server_v6),
            ] {
                if !server_addrs.contains(&addr) {
                    server_addrs.push(addr);
                }
            }
            built.push(Client {
                ns,
                label: spec.label.to_string(),
                v4: spec.v4.parse()?,
                v6: spec.v6.parse()?,
                server_v4: spec.server_v4.parse()?,
                server_v6: spec.server_v6.parse()?,
            });
        }
        for addr in &server_addrs {
            let mut args = vec!["ip", "addr", "add", addr.as_str(), "dev", SERVER_IFACE];
            if addr.contains(':') {
                args.push("nodad");
            }
            server.exec(&args)?;
        }
        Ok(Self {
            server,
            clients: built,
            server_addrs,
            switch,
        })
    }

    /// Replaces the server's NIC by a new one of the same name (as a hot-plugged or re-created
    /// interface would be): the old one, and anything attached to it, is gone.
    pub fn replace_server_nic(&self) -> anyhow::Result<()> {
        self.server.exec(&["ip", "link", "del", SERVER_IFACE])?;
        self.recreate_server_nic()
    }

    /// Creates the server's NIC again after it was removed, with its addresses.
    pub fn recreate_server_nic(&self) -> anyhow::Result<()> {
        veth(&self.server, SERVER_IFACE, &self.switch, "p0")?;
        self.switch
            .exec(&["ip", "link", "set", "p0", "master", "br0"])?;
        for addr in &self.server_addrs {
            let mut args = vec!["ip", "addr", "add", addr.as_str(), "dev", SERVER_IFACE];
            if addr.contains(':') {
                args.push("nodad");
            }
            self.server.exec(&args)?;
        }
        Ok(())
    }

    pub fn client(&self, label: &str) -> &Client {
        self.clients
            .iter()
            .find(|c| c.label == label)
            .expect("client in the lab")
    }
}

/// The server's services: a TCP echo service and a UDP sink, both on all addresses.
pub struct Services {
    stop: Arc<AtomicBool>,
    pub udp_received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Services {
    pub fn start(server: &Netns) -> anyhow::Result<Self> {
        let (tcp, udp) = server.enter(|| -> anyhow::Result<_> {
            let tcp = TcpListener::bind(("::", TCP_PORT)).context("bind TCP service")?;
            let udp = UdpSocket::bind(("::", UDP_PORT)).context("bind UDP service")?;
            Ok((tcp, udp))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let udp_received = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 512];
                            if let Ok(n) = stream.read(&mut buf) {
                                let _ = stream.write_all(&buf[..n]);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        {
            let (stop, received) = (stop.clone(), udp_received.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if udp.recv_from(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            udp_received,
            threads,
        })
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Opens a TCP connection from `client` to `server:port`, sends a line and reads the echo.
/// `Ok(true)` if the echo came back, `Ok(false)` if the connection did not complete in time.
pub fn tcp_exchange(
    client: &Netns,
    server: IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<bool> {
    client.enter(|| {
        let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::new(server, port), timeout)
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(timeout));
        let message = b"e-office hello\n";
        if stream.write_all(message).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(stream.read(&mut buf), Ok(n) if &buf[..n] == message)
    })
}

/// Sends `count` UDP datagrams from `client` to `server:port`.
pub fn udp_send(client: &Netns, server: IpAddr, port: u16, count: u32) -> anyhow::Result<()> {
    client.enter(|| -> anyhow::Result<()> {
        let bind: SocketAddr = if server.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let socket = UdpSocket::bind(bind)?;
        for i in 0..count {
            socket.send_to(
                format!("datagram {i}").as_bytes(),
                SocketAddr::new(server, port),
            )?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })?
}

/// Pings `server` from `client` `count` times; returns how many replies came back.
pub fn ping(client: &Netns, server: IpAddr, count: u32) -> anyhow::Result<u32> {
    let count_arg = count.to_string();
    let server_arg = server.to_string();
    let output = client.exec_status(&[
        "ping",
        "-n",
        "-q",
        "-c",
        &count_arg,
        "-i",
        "0.2",
        "-W",
        "1",
        &server_arg,
    ])?;
    let text = String::from_utf8_lossy(&output.stdout);
    if output.stdout.is_empty() {
        anyhow::bail!(
            "ping printed nothing: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // "N packets transmitted, M received, ..."
    let received = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read ping's summary: {text}"))?;
    Ok(received)
}
