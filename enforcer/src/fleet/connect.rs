//! Reaching the fleet's etcd: endpoints, TLS, identity, and reads of a whole prefix at one
//! revision.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use super::FleetError;

/// How the CLI and the agent reach etcd (`--etcd` and its TLS options).
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated: `https://HOST:PORT` (with --etcd-ca), or `http://` on
    /// loopback only.
    #[arg(long = "etcd", value_delimiter = ',', value_name = "URL")]
    pub endpoints: Vec<String>,
    /// The CA certificate (PEM) that signed etcd's server certificates.
    #[arg(long = "etcd-ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM); with client-certificate authentication its common name
    /// is the etcd user.
    #[arg(long = "etcd-cert", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long = "etcd-key", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// An etcd user authenticated by password (read from `ENFORCER_ETCD_PASSWORD`), instead of a
    /// client certificate.
    #[arg(long = "etcd-user", value_name = "NAME")]
    pub user: Option<String>,
}

/// How long a request may take before it counts as etcd being unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// Keys read per request of a prefix read (etcd and gRPC bound one answer's size).
const PAGE: i64 = 5000;

impl EtcdArgs {
    /// Checks the options against each other and connects.
    pub async fn connect(&self) -> Result<Client, FleetError> {
        let bad = |why: String| FleetError::Options(why);
        if self.endpoints.is_empty() {
            return Err(bad(
                "--etcd URL[,URL…] is needed: the fleet's etcd endpoints".into(),
            ));
        }
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        for endpoint in &self.endpoints {
            if let Some(rest) = endpoint.strip_prefix("http://") {
                if tls {
                    return Err(bad("mixed http:// and https:// endpoints".into()));
                }
                if !loopback(rest) {
                    return Err(bad(format!(
                        "{endpoint}: plain http:// only to loopback; use https:// with --etcd-ca"
                    )));
                }
            } else if !endpoint.starts_with("https://") {
                return Err(bad(format!(
                    "{endpoint}: an endpoint starts with https:// (or http:// on loopback)"
                )));
            }
        }
        // HTTP/2 pings find a connection whose peer vanished (a partition, a dead member)
        // within seconds, where TCP alone would wait minutes.
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE)
            .with_keep_alive_while_idle(true);
        if tls {
            let ca = self
                .ca
                .as_ref()
                .ok_or_else(|| bad("https:// endpoints need --etcd-ca".into()))?;
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(config);
        } else if self.ca.is_some() || self.cert.is_some() {
            return Err(bad(
                "--etcd-ca and --etcd-cert need https:// endpoints".into()
            ));
        }
        if let Some(user) = &self.user {
            let password = std::env::var("ENFORCER_ETCD_PASSWORD").map_err(|_| {
                bad("--etcd-user needs its password in ENFORCER_ETCD_PASSWORD".into())
            })?;
            options = options.with_user(user, password);
        }
        // One member at a time, from a place that differs between processes (so that agents
        // spread over the members): the first that answers a read is used. A member that is
        // down is passed over, where a client balanced over all of them would fail the
        // requests it sends to the dead one.
        let count = self.endpoints.len();
        let first = std::process::id() as usize % count.max(1);
        let mut why = Vec::new();
        for k in 0..count {
            let endpoint = &self.endpoints[(first + k) % count];
            match probe(endpoint, options.clone()).await {
                Ok(client) => return Ok(client),
                Err(e) => why.push(format!("{endpoint}: {e}")),
            }
        }
        Err(FleetError::Unreachable(format!(
            "no etcd member answers ({})",
            why.join("; ")
        )))
    }
}

/// The largest answer taken from etcd (a watch message of one large transaction, the answer to
/// an import): gRPC's default is 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// How long a member has to answer the first read.
const PROBE: Duration = Duration::from_secs(3);

/// A client of `endpoint` once it answers a read (an answer that refuses the read, such as a
/// permission denied, counts: the request that follows reports it).
async fn probe(endpoint: &str, options: ConnectOptions) -> Result<Client, String> {
    let attempt = async {
        let mut client = Client::connect([endpoint], Some(options))
            .await
            .map_err(|e| e.to_string())?;
        match client
            .get(
                super::layout::REGISTRY,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
        {
            Err(e) if unreachable(&e) => Err(e.to_string()),
            _ => Ok(client),
        }
    };
    tokio::time::timeout(PROBE, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", PROBE.as_secs())))
}

/// Whether an error says the member cannot be reached (rather than refusing the request).
pub fn unreachable(error: &etcd_client::Error) -> bool {
    // gRPC codes: 4 deadline exceeded, 14 unavailable.
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(i32::from(status.code()), 4 | 14),
        _ => false,
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, FleetError> {
    crate::registry::read::read_regular(path, 1 << 20)
        .map(String::into_bytes)
        .map_err(|e| FleetError::Options(format!("cannot read {}: {e}", path.display())))
}

/// Whether `host:port/...` names a loopback host.
fn loopback(rest: &str) -> bool {
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every key and value under `prefix` at one revision (the revision of the first read, or
/// `at`), read in pages.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
    at: Option<i64>,
) -> Result<(i64, Vec<(String, Vec<u8>)>), FleetError> {
    let end = super::layout::range_end(prefix);
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = at.unwrap_or(0);
    let mut out = Vec::new();
    // Bounded: each page moves past its last key; an empty page or a short one ends it.
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let response = client
            .get(start.clone(), Some(options))
            .await
            .map_err(|source| FleetError::Etcd {
                what: format!("read {prefix}"),
                source,
            })?;
        if revision == 0 {
            revision = response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
        }
        let kvs = response.kvs();
        for kv in kvs {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            out.push((key, kv.value().to_vec()));
        }
        match kvs.last() {
            Some(last) if response.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok((revision, out)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::loopback;

    #[test]
    fn only_loopback_hosts_take_plain_http() {
        for host in [
            "127.0.0.1:2379",
            "localhost:2379",
            "[::1]:2379",
            "127.9.9.9:1/x",
        ] {
            assert!(loopback(host), "{host}");
        }
        for host in ["10.0.0.1:2379", "etcd.example:2379", "[2001:db8::1]:2379"] {
            assert!(!loopback(host), "{host}");
        }
    }
}
