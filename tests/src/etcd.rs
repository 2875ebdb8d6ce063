//! A real etcd (Debian's `etcd-server`) for the fleet tests: in a network namespace of its own,
//! on that namespace's loopback, with TLS from a CA the test makes (openssl), client
//! certificates, and client-certificate authentication (a certificate's common name is the
//! etcd user). `etcdctl` (Debian's `etcd-client`) acts as any user, past the enforcer's CLI.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    daemon::enforcer_bin,
    netns::Netns,
    vpn::{Daemon, TempDir},
};

/// The client and peer ports of each member (on its own address).
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// One member of the cluster.
struct Member {
    command: Vec<String>,
    daemon: Option<Daemon>,
}

/// An etcd cluster (one member or several), its CA and its users' certificates.
pub struct Etcd {
    /// Every member's client URL.
    pub urls: Vec<String>,
    /// The namespace etcd runs in.
    ns: String,
    /// The namespace, when etcd has one of its own (removed last).
    own: Option<Netns>,
    dir: TempDir,
    members: Vec<Member>,
}

/// `https://ADDR:PORT` (IPv6 in brackets).
fn url(scheme: &str, addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("{scheme}://[{addr}]:{port}")
    } else {
        format!("{scheme}://{addr}:{port}")
    }
}

impl Etcd {
    /// Starts a single-member etcd with TLS and client-certificate authentication (auth itself
    /// is off until `enforcer fleet init-roles` turns it on) in a namespace of its own, and
    /// waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let ns = Netns::new("enf-etcd")?;
        Self::cluster(ns.name.clone(), Some(ns), &["127.0.0.1"], &[])
    }

    /// The same on the loopback of `ns` (an agent's namespace reaches it there).
    pub fn start_in(ns: &Netns) -> anyhow::Result<Self> {
        Self::cluster(ns.name.clone(), None, &["127.0.0.1"], &[])
    }

    /// A cluster of one member per address of `addrs` (addresses of namespace `ns`), each
    /// member with `extra` options; waits until it answers.
    pub fn cluster(
        ns: String,
        own: Option<Netns>,
        addrs: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("enf-etcd")?;
        let mut etcd = Self {
            urls: addrs.iter().map(|a| url("https", a, CLIENT_PORT)).collect(),
            ns,
            own,
            dir,
            members: Vec::new(),
        };
        etcd.make_ca()?;
        let (cert, key) = etcd.server_cert(addrs)?;
        let initial: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("m{i}={}", url("http", a, PEER_PORT)))
            .collect();
        for (i, addr) in addrs.iter().enumerate() {
            let data = etcd.dir.0.join(format!("data-m{i}"));
            let client = url("https", addr, CLIENT_PORT);
            let peer = url("http", addr, PEER_PORT);
            let mut command: Vec<String> = [
                "etcd",
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &path(&data),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                "enforcer-test",
                "--cert-file",
                &path(&cert),
                "--key-file",
                &path(&key),
                "--trusted-ca-file",
                &path(&etcd.ca()),
                "--client-cert-auth",
            ]
            .iter()
            .map(ToString::to_string)
            .collect();
            command.extend(extra.iter().map(ToString::to_string));
            etcd.members.push(Member {
                command,
                daemon: None,
            });
        }
        etcd.resume()?;
        Ok(etcd)
    }

    /// Stops every member (SIGKILL, as a crash would); their data stays.
    pub fn stop(&mut self) {
        for member in &mut self.members {
            member.daemon.take();
        }
    }

    /// Stops member `i` (SIGKILL).
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].daemon.take();
    }

    /// Starts the stopped members again on their data, and waits until the cluster answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        for (i, member) in self.members.iter_mut().enumerate() {
            if member.daemon.is_none() {
                let command: Vec<&str> = member.command.iter().map(String::as_str).collect();
                member.daemon = Some(Daemon::spawn_in(
                    &self.ns,
                    &command,
                    self.dir.0.join(format!("etcd-m{i}.log")),
                    &[],
                )?);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.etcdctl("root", &["endpoint", "health", "--cluster"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy in 20 s: {}\n{}",
                    text(&out),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client URLs, comma-separated (the `--etcd` value).
    pub fn endpoints(&self) -> String {
        self.urls.join(",")
    }

    /// Every member's log.
    pub fn log(&self) -> String {
        self.members
            .iter()
            .filter_map(|m| m.daemon.as_ref().map(Daemon::log_text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn ca(&self) -> PathBuf {
        self.dir.0.join("ca.crt")
    }

    fn make_ca(&self) -> anyhow::Result<()> {
        let key = self.dir.0.join("ca.key");
        openssl(&[
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
            "/CN=enforcer test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &path(&key),
            "-out",
            &path(&self.ca()),
        ])
    }

    /// The members' certificate, for every member address.
    fn server_cert(&self, addrs: &[&str]) -> anyhow::Result<(PathBuf, PathBuf)> {
        let names: Vec<String> = addrs.iter().map(|a| format!("IP:{a}")).collect();
        self.leaf_with(
            "etcd-server",
            &format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                names.join(",")
            ),
        )
    }

    /// A client certificate signed by the CA for `cn` (made once).
    fn leaf(&self, cn: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.leaf_with(cn, "extendedKeyUsage=clientAuth\n")
    }

    /// A certificate signed by the CA for `cn` with the extensions `usage` (made once).
    fn leaf_with(&self, cn: &str, usage: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = self.dir.0.join(format!("{cn}.crt"));
        let key = self.dir.0.join(format!("{cn}.key"));
        if cert.exists() {
            return Ok((cert, key));
        }
        let csr = self.dir.0.join(format!("{cn}.csr"));
        let ext = self.dir.0.join(format!("{cn}.ext"));
        std::fs::write(
            &ext,
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{usage}"),
        )?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &path(&key),
            "-out",
            &path(&csr),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path(&csr),
            "-CA",
            &path(&self.ca()),
            "-CAkey",
            &path(&self.dir.0.join("ca.key")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &path(&ext),
            "-out",
            &path(&cert),
        ])?;
        Ok((cert, key))
    }

    /// The `--etcd` options of the enforcer's CLI for user `cn` (its certificate made once).
    pub fn options(&self, cn: &str) -> anyhow::Result<Vec<String>> {
        let (cert, key) = self.leaf(cn)?;
        Ok(vec![
            "--etcd".into(),
            self.endpoints(),
            "--etcd-ca".into(),
            path(&self.ca()),
            "--etcd-cert".into(),
            path(&cert),
            "--etcd-key".into(),
            path(&key),
        ])
    }

    /// Runs the enforcer's CLI in etcd's namespace as user `cn`: `args`, then the `--etcd`
    /// options. Returns whether it succeeded and what it printed.
    pub fn enforcer(&self, cn: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let bin = enforcer_bin();
        let mut command: Vec<String> = vec![path(&bin)];
        command.extend(args.iter().map(ToString::to_string));
        command.extend(self.options(cn)?);
        let refs: Vec<&str> = command.iter().map(String::as_str).collect();
        let out = self.exec(&refs)?;
        Ok((out.status.success(), text(&out)))
    }

    /// Runs `etcdctl` as user `cn`.
    pub fn etcdctl(&self, cn: &str, args: &[&str]) -> anyhow::Result<Output> {
        let (cert, key) = self.leaf(cn)?;
        let (ca, cert, key) = (path(&self.ca()), path(&cert), path(&key));
        let endpoints = self.endpoints();
        let mut command = vec![
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            &endpoints,
            "--cacert",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
        ];
        command.extend_from_slice(args);
        self.exec(&command)
    }

    /// Runs a command in etcd's namespace, whatever its exit status.
    fn exec(&self, command: &[&str]) -> anyhow::Result<Output> {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(command)
            .output()
            .with_context(|| format!("cannot run {command:?} in {}", self.ns))
    }

    /// Runs `etcdctl` as user `cn` with `input` on its standard input (`etcdctl txn`).
    pub fn etcdctl_input(&self, cn: &str, args: &[&str], input: &str) -> anyhow::Result<Output> {
        use std::io::Write as _;
        let (cert, key) = self.leaf(cn)?;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "env", "ETCDCTL_API=3", "etcdctl"])
            .args([
                "--endpoints",
                &self.endpoints(),
                "--cacert",
                &path(&self.ca()),
            ])
            .args(["--cert", &path(&cert), "--key", &path(&key)])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("etcdctl's input")?
            .write_all(input.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// The name of the namespace etcd runs in.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// A directory for the test's files, removed with the etcd.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        self.own.take();
    }
}

/// What a command printed, standard output then standard error.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .context("openssl (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", text(&out));
    }
    Ok(())
}
