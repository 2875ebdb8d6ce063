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
        echoes(&mut stream, timeout)
    })
}

/// Sends a line on a connected stream and whether the echo service answers it in `timeout`.
fn echoes(stream: &mut TcpStream, timeout: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(timeout));
    let message = b"e-office hello\n";
    if stream.write_all(message).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(n) if &buf[..n] == message)
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

/// Sends crafted Ethernet frames, broadcast on the client's link (the bridge hands them to the
/// server), through a packet socket in `ns`.
pub fn send_raw(ns: &Netns, frames: impl Iterator<Item = Vec<u8>> + Send) {
    ns.enter(|| {
        // SAFETY: socket() with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(u16::try_from(libc::ETH_P_ALL).unwrap().to_be()),
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert_ne!(ifindex, 0);
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        to.sll_ifindex = i32::try_from(ifindex).unwrap();
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xFF; 6]);
        for mut frame in frames {
            frame[..6].copy_from_slice(&[0xFF; 6]);
            // SAFETY: sends `frame` (valid for its length) to the address built above.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const to).cast(),
                    u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap(),
                )
            };
            assert!(sent > 0, "sendto: {}", std::io::Error::last_os_error());
        }
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(fd) };
    })
    .unwrap();
}

/// `tcp_exchange` from a chosen local port.
pub fn tcp_exchange_from(
    client: &Netns,
    local_port: u16,
    server: IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<bool> {
    use std::os::fd::FromRawFd as _;
    client.enter(|| -> anyhow::Result<bool> {
        let IpAddr::V4(server_v4) = server else {
            anyhow::bail!("tcp_exchange_from speaks IPv4 only");
        };
        // SAFETY: socket() with constant arguments; the descriptor is owned by the stream below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh socket, owned from here on.
        let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let sockaddr = |addr: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.octets()),
            },
            sin_zero: [0; 8],
        };
        let one: libc::c_int = 1;
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs())?,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        let len = |size: usize| libc::socklen_t::try_from(size).unwrap();
        let (local, remote) = (
            sockaddr(std::net::Ipv4Addr::UNSPECIFIED, local_port),
            sockaddr(server_v4, port),
        );
        // SAFETY: valid option values and addresses of the sizes given, on the socket above;
        // SO_SNDTIMEO bounds the blocking connect.
        let connected = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                len(size_of::<libc::c_int>()),
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                len(size_of::<libc::timeval>()),
            );
            anyhow::ensure!(
                libc::bind(
                    fd,
                    (&raw const local).cast(),
                    len(size_of::<libc::sockaddr_in>())
                ) == 0,
                "bind port {local_port}: {}",
                std::io::Error::last_os_error()
            );
            libc::connect(
                fd,
                (&raw const remote).cast(),
                len(size_of::<libc::sockaddr_in>()),
            ) == 0
        };
        if !connected {
            return Ok(false);
        }
        let mut stream = socket;
        Ok(echoes(&mut stream, timeout))
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
