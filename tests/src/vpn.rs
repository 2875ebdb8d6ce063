//! Real VPN software in test namespaces: wireguard-go (userspace `WireGuard` over TUN; this kernel
//! has no `WireGuard` module) and `OpenVPN` in TLS mode with tls-crypt. Every daemon is a child
//! process killed on drop; keys and certificates live in a temporary directory.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// Sends one `WireGuard` handshake initiation (148 bytes, message type 1) from `from:51820` to
/// `to:51820`, inside `ns`: what the VPN stage recognises, without a tunnel.
pub fn send_wireguard_initiation(
    ns: &Netns,
    from: std::net::IpAddr,
    to: std::net::IpAddr,
) -> anyhow::Result<()> {
    let mut init = vec![1u8, 0, 0, 0, 0x11, 0x22, 0x33, 0x44];
    init.resize(148, 0x5C);
    ns.enter(|| {
        std::net::UdpSocket::bind((from, 51_820))?.send_to(&init, (to, 51_820))?;
        anyhow::Ok(())
    })?
}

/// A child process killed (and reaped) on drop.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// dnsmasq in `ns`, answering on `listen`:53 with `address` for `name` and nothing else
    /// (no upstream servers, no hosts file), its output in `log`.
    pub fn dnsmasq(
        ns: &Netns,
        listen: &str,
        (name, address): (&str, &str),
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::spawn(
            ns,
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={listen}"),
                "--port=53",
                "--pid-file=",
                "--user=root",
                &format!("--address=/{name}/{address}"),
            ],
            log,
            &[],
        )
    }

    /// Starts `command` inside `ns` with its output in `log`.
    pub fn spawn(
        ns: &Netns,
        command: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn_in(&ns.name, command, log, env)
    }

    /// Starts `command` inside the namespace named `ns` with its output in `log`.
    pub fn spawn_in(
        ns: &str,
        command: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(command)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {command:?} (installed by `cargo xtask setup`)"))?;
        Ok(Self { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name(prefix));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn output(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program} (installed by `cargo xtask setup`)"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// A `WireGuard` key pair (`wg genkey`, `wg pubkey`).
pub struct WgKeys {
    pub private: String,
    pub public: String,
}

impl WgKeys {
    pub fn generate() -> anyhow::Result<Self> {
        let private = output("wg", &["genkey"], None)?;
        let public = output("wg", &["pubkey"], Some(&private))?;
        Ok(Self { private, public })
    }
}

/// One `WireGuard` peer: wireguard-go in a namespace, configured with `wg set`. The interface
/// name is unique across the host because wireguard-go's control socket
/// (`/var/run/wireguard/NAME.sock`) is not per network namespace.
pub struct WireGuard {
    _daemon: Daemon,
    ns_name: String,
    pub iface: String,
}

impl WireGuard {
    /// Brings up an interface with `address/24`, listening on `port`, with one peer.
    #[expect(
        clippy::too_many_arguments,
        reason = "one peer's whole configuration, spelled out at the call"
    )]
    pub fn up(
        ns: &Netns,
        dir: &TempDir,
        keys: &WgKeys,
        port: u16,
        address: &str,
        peer_public: &str,
        peer_endpoint: Option<String>,
        peer_allowed: &str,
    ) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let iface = format!("wg{}x{n}", std::process::id() % 100_000);
        let daemon = Daemon::spawn(
            ns,
            &["wireguard-go", "-f", &iface],
            dir.0.join(format!("wireguard-go-{}.log", ns.name)),
            &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "error")],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns
            .exec_status(&["ip", "link", "show", &iface])?
            .status
            .code()
            != Some(0)
            || !std::path::Path::new(&format!("/var/run/wireguard/{iface}.sock")).exists()
        {
            if Instant::now() > deadline {
                bail!("wireguard-go did not create {iface}: {}", daemon.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let key_file = dir.0.join(format!("{}.key", ns.name));
        std::fs::write(&key_file, &keys.private)?;
        let port = port.to_string();
        let mut set = vec![
            "wg",
            "set",
            &iface,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            &port,
        ];
        set.extend([
            "peer",
            peer_public,
            "allowed-ips",
            peer_allowed,
            "persistent-keepalive",
            "1",
        ]);
        let endpoint;
        if let Some(e) = peer_endpoint {
            endpoint = e;
            set.extend(["endpoint", &endpoint]);
        }
        ns.exec(&set)?;
        ns.exec(&["ip", "addr", "add", &format!("{address}/24"), "dev", &iface])?;
        ns.exec(&["ip", "link", "set", &iface, "up"])?;
        Ok(Self {
            _daemon: daemon,
            ns_name: ns.name.clone(),
            iface,
        })
    }

    /// Seconds since the epoch of the last completed handshake with the peer (0: never).
    pub fn latest_handshake(&self) -> anyhow::Result<u64> {
        let out = output(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns_name,
                "wg",
                "show",
                &self.iface,
                "latest-handshakes",
            ],
            None,
        )?;
        Ok(out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }
}

/// A self-signed certificate and key for `OpenVPN`'s `peer-fingerprint` mode (no CA needed).
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub fingerprint: String,
}

impl Certificate {
    pub fn self_signed(dir: &TempDir, name: &str) -> anyhow::Result<Self> {
        let cert = dir.0.join(format!("{name}.crt"));
        let key = dir.0.join(format!("{name}.key"));
        output(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
            None,
        )?;
        let fp = output(
            "openssl",
            &[
                "x509",
                "-in",
                cert.to_str().unwrap(),
                "-noout",
                "-fingerprint",
                "-sha256",
            ],
            None,
        )?;
        let fingerprint = fp
            .split_once('=')
            .map(|(_, f)| f.to_string())
            .context("openssl fingerprint")?;
        Ok(Self {
            cert,
            key,
            fingerprint,
        })
    }
}

/// An `OpenVPN` peer in TLS mode (p2p, tls-crypt, peer fingerprints).
pub struct OpenVpn {
    daemon: Daemon,
}

impl OpenVpn {
    /// `server`: listens on `port`; otherwise connects to `remote:port`. `local`/`remote_tun` are
    /// the point-to-point tunnel addresses.
    #[expect(
        clippy::too_many_arguments,
        reason = "one peer's whole configuration, spelled out at the call"
    )]
    pub fn start(
        ns: &Netns,
        dir: &TempDir,
        proto: &str,
        me: &Certificate,
        peer: &Certificate,
        tls_crypt: &std::path::Path,
        server: bool,
        remote: Option<&str>,
        port: u16,
        local_tun: &str,
        remote_tun: &str,
    ) -> anyhow::Result<Self> {
        let port = port.to_string();
        let mut args = vec![
            "openvpn",
            "--dev",
            "tun",
            "--ifconfig",
            local_tun,
            remote_tun,
            "--cert",
            me.cert.to_str().unwrap(),
            "--key",
            me.key.to_str().unwrap(),
            "--peer-fingerprint",
            &peer.fingerprint,
            "--tls-crypt",
            tls_crypt.to_str().unwrap(),
            "--verb",
            "3",
            "--connect-retry",
            "1",
            "--hand-window",
            "60",
        ];
        let proto_arg = if server {
            format!("{proto}-server")
        } else {
            format!("{proto}-client")
        };
        let proto_arg = if proto == "udp" {
            "udp".to_string()
        } else {
            proto_arg
        };
        args.extend(["--proto", &proto_arg]);
        if server {
            args.extend(["--tls-server", "--dh", "none", "--lport", &port]);
        } else {
            args.extend([
                "--tls-client",
                "--nobind",
                "--remote",
                remote.context("client needs a remote")?,
                &port,
            ]);
        }
        let log = dir.0.join(format!("openvpn-{}.log", ns.name));
        Ok(Self {
            daemon: Daemon::spawn(ns, &args, log, &[])?,
        })
    }

    /// Whether `OpenVPN` logged that the connection completed.
    pub fn connected(&self) -> bool {
        self.daemon
            .log_text()
            .contains("Initialization Sequence Completed")
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// `openvpn --genkey tls-crypt FILE`.
pub fn tls_crypt_key(dir: &TempDir) -> anyhow::Result<PathBuf> {
    let path = dir.0.join("tls-crypt.key");
    output(
        "openvpn",
        &["--genkey", "tls-crypt", path.to_str().unwrap()],
        None,
    )?;
    Ok(path)
}

/// One strongSwan (charon) instance in a namespace: `IKEv2` with a pre-shared key, ESP carried by
/// the kernel-libipsec plugin (this kernel has XFRM but no ESP), so `IKE_AUTH` and ESP travel as
/// UDP on 4500 after `IKE_SA_INIT` on 500. Its own strongswan.conf, vici socket and a private
/// /run (charon always writes /run/charon.pid); retransmissions shortened so that a blocked
/// initiator gives up in seconds.
pub struct StrongSwan {
    _daemon: Daemon,
    dir: PathBuf,
    ns_name: String,
}

impl StrongSwan {
    /// Starts charon and loads one connection `tunnel` between `local` and `remote`, whose
    /// `CHILD_SA` covers `local_inner/32 === remote_inner/32` (added to the namespace's lo).
    pub fn start(
        ns: &Netns,
        dir: &TempDir,
        name: &str,
        (local, local_id, local_inner): (&str, &str, &str),
        (remote, remote_id, remote_inner): (&str, &str, &str),
    ) -> anyhow::Result<Self> {
        let home = dir.0.join(name);
        std::fs::create_dir_all(home.join("run"))?;
        let vici = home.join("charon.vici");
        let conf = home.join("strongswan.conf");
        std::fs::write(
            &conf,
            format!(
                "charon {{\n  load = random nonce pem pkcs1 x509 pubkey curve25519 aes sha1 sha2 hmac kdf \
                 kernel-libipsec kernel-netlink socket-default vici\n  port = 500\n  port_nat_t = 4500\n  \
                 retransmit_tries = 2\n  retransmit_timeout = 1.0\n  retransmit_base = 1.0\n  \
                 plugins {{\n    vici {{ socket = unix://{vici} }}\n  }}\n  \
                 filelog {{\n    log {{\n      path = {log}\n      default = 1\n      ike = 2\n      flush_line = yes\n    }}\n  }}\n}}\n",
                vici = vici.display(),
                log = home.join("charon.log").display()
            ),
        )?;
        let swanctl = home.join("swanctl.conf");
        std::fs::write(
            &swanctl,
            format!(
                "connections {{\n  tunnel {{\n    version = 2\n    local_addrs = {local}\n    remote_addrs = {remote}\n    \
                 proposals = aes128-sha256-x25519\n    \
                 local {{ auth = psk\n id = {local_id} }}\n    remote {{ auth = psk\n id = {remote_id} }}\n    \
                 children {{\n      net {{\n        local_ts = {local_inner}/32\n        remote_ts = {remote_inner}/32\n        \
                 esp_proposals = aes128-sha256\n      }}\n    }}\n  }}\n}}\n\
                 secrets {{\n  ike-lab {{\n    id-1 = {local_id}\n    id-2 = {remote_id}\n    secret = \"enforcer-lab-psk\"\n  }}\n}}\n"
            ),
        )?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{local_inner}/32"),
            "dev",
            "lo",
        ])?;
        let script = format!(
            "mount --bind {} /run && exec /usr/lib/ipsec/charon",
            home.join("run").display()
        );
        let daemon = Daemon::spawn(
            ns,
            &[
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ],
            home.join("charon.out"),
            &[("STRONGSWAN_CONF", conf.to_str().unwrap())],
        )?;
        let me = Self {
            _daemon: daemon,
            dir: home,
            ns_name: ns.name.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vici.exists() {
            if Instant::now() > deadline {
                bail!("charon did not open its vici socket: {}", me.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        me.swanctl(&["--load-all", "--file", swanctl.to_str().unwrap()])?;
        Ok(me)
    }

    fn swanctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let uri = format!("unix://{}", self.dir.join("charon.vici").display());
        let mut all = vec!["netns", "exec", &self.ns_name, "swanctl"];
        all.extend_from_slice(args);
        all.extend(["--uri", &uri]);
        output("ip", &all, None)
    }

    /// `swanctl --initiate --child net`: Ok if the `IKE_SA` and `CHILD_SA` came up, else what
    /// swanctl said.
    pub fn initiate(&self) -> Result<String, String> {
        self.swanctl(&["--initiate", "--child", "net", "--timeout", "15"])
            .map_err(|e| format!("{e:#}"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.dir.join("charon.out")).unwrap_or_default()
    }
}
