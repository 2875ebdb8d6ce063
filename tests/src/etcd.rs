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

/// The client port in the etcd namespace.
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// One etcd member, its CA and its users' certificates.
pub struct Etcd {
    pub url: String,
    /// The namespace etcd runs in.
    ns: String,
    /// The namespace, when etcd has one of its own (removed last).
    own: Option<Netns>,
    dir: TempDir,
    command: Vec<String>,
    daemon: Option<Daemon>,
}

impl Etcd {
    /// Starts a single-member etcd with TLS and client-certificate authentication (auth itself
    /// is off until `enforcer fleet init-roles` turns it on) in a namespace of its own, and
    /// waits until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let ns = Netns::new("enf-etcd")?;
        Self::start_with(ns.name.clone(), Some(ns))
    }

    /// The same on the loopback of `ns` (an agent's namespace reaches it there).
    pub fn start_in(ns: &Netns) -> anyhow::Result<Self> {
        Self::start_with(ns.name.clone(), None)
    }

    fn start_with(ns: String, own: Option<Netns>) -> anyhow::Result<Self> {
        let dir = TempDir::new("enf-etcd")?;
        let url = format!("https://127.0.0.1:{CLIENT_PORT}");
        let mut etcd = Self {
            url,
            ns,
            own,
            dir,
            command: Vec::new(),
            daemon: None,
        };
        etcd.make_ca()?;
        let (cert, key) = etcd.leaf("etcd-server", true)?;
        let peer = format!("http://127.0.0.1:{PEER_PORT}");
        let data = etcd.dir.0.join("data");
        etcd.command = [
            "etcd",
            "--name",
            "m0",
            "--data-dir",
            &path(&data),
            "--listen-client-urls",
            &etcd.url,
            "--advertise-client-urls",
            &etcd.url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("m0={peer}"),
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
        etcd.resume()?;
        Ok(etcd)
    }

    /// Stops etcd (SIGKILL, as a crash would); its data stays.
    pub fn stop(&mut self) {
        self.daemon.take();
    }

    /// Starts etcd again on its data, and waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let command: Vec<&str> = self.command.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::spawn_in(
            &self.ns,
            &command,
            self.dir.0.join("etcd.log"),
            &[],
        )?);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.etcdctl("root", &["endpoint", "health"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy in 15 s: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
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

    /// A certificate signed by the CA for `cn` (made once): for the server (with its address)
    /// or a client.
    fn leaf(&self, cn: &str, server: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = self.dir.0.join(format!("{cn}.crt"));
        let key = self.dir.0.join(format!("{cn}.key"));
        if cert.exists() {
            return Ok((cert, key));
        }
        let csr = self.dir.0.join(format!("{cn}.csr"));
        let ext = self.dir.0.join(format!("{cn}.ext"));
        let usage = if server {
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
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
        let (cert, key) = self.leaf(cn, false)?;
        Ok(vec![
            "--etcd".into(),
            self.url.clone(),
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
        let (cert, key) = self.leaf(cn, false)?;
        let (ca, cert, key) = (path(&self.ca()), path(&cert), path(&key));
        let mut command = vec![
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            &self.url,
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
        let (cert, key) = self.leaf(cn, false)?;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "env", "ETCDCTL_API=3", "etcdctl"])
            .args(["--endpoints", &self.url, "--cacert", &path(&self.ca())])
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
        self.daemon.take();
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
