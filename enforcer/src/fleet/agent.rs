//! The agent: `enforcer run --etcd …` enforces the fleet's registry. At start it reads the
//! registry at one revision and writes it to its local cache (the registry file the daemon
//! loads); when etcd cannot be reached it starts from that cache, and without one it refuses to
//! start. Then `follow` watches the registry from that revision and hands the daemon's loop
//! each new registry, one watch message at a time: the keys a transaction changed arrive
//! together and reach the kernel as one change. It reconnects with backoff, catches up from
//! its last revision, or reads the registry whole when that revision was compacted. `status`
//! keeps the host's status key under a lease, so that a dead agent's status disappears.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, mpsc};

use super::{EtcdArgs, FleetError, assemble::Refused, connect::read_prefix, layout};

/// What `enforcer run` needs to follow the fleet.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub etcd: EtcdArgs,
    /// This host's name in the fleet (its status key, its role's name).
    pub host: String,
}

/// The agent's local copy of the fleet's registry: the registry file the daemon loads, and its
/// deny feeds in `FILE.feeds/`, each named after its content (a change that is refused leaves
/// the feeds of the registry in force untouched).
#[derive(Clone, Debug)]
pub struct Cache {
    pub file: PathBuf,
}

/// A registry of the fleet, ready for the daemon.
#[derive(Debug)]
pub struct Update {
    pub revision: i64,
    pub text: String,
    /// The text, parsed and validated already (the daemon does not parse it again).
    pub registry: Box<crate::registry::Registry>,
    /// Keys left out, each with its problem.
    pub refused: Vec<Refused>,
}

/// What the follower tells the daemon's loop.
#[derive(Debug)]
pub enum Followed {
    /// A new registry: put it in force.
    Update(Update),
    /// etcd cannot be reached, or its registry cannot be enforced (why); the registry in
    /// force stays.
    Failed(String),
}

/// The registry as the follower knows it: every key and value at `revision`.
pub struct Mirror {
    revision: i64,
    kvs: BTreeMap<String, Vec<u8>>,
}

impl Cache {
    fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    /// The feeds' directory, as `deny_files` names it (relative to the cache's directory).
    fn feed_dir(&self) -> String {
        let name = self
            .file
            .file_name()
            .map_or_else(|| "registry".into(), |n| n.to_string_lossy().into_owned());
        format!("{name}.feeds/")
    }

    /// The registry of `mirror`, validated, with its feeds written beside the cache.
    fn update(&self, mirror: &Mirror) -> Result<Update, FleetError> {
        let dir = self.feed_dir();
        let kvs: Vec<(String, Vec<u8>)> = mirror
            .kvs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let fleet = super::validate(&kvs, mirror.revision, &|name, text| {
            let digest = Sha256::digest(text.as_bytes());
            let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
            format!("{dir}{name}.{short}")
        })?;
        for (path, text) in &fleet.feeds {
            let path = self.dir().join(path);
            if !path.exists() {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|source| FleetError::Io {
                        what: format!("cannot create {}", parent.display()),
                        source,
                    })?;
                }
                write_private(&path, text).map_err(|source| FleetError::Io {
                    what: format!("cannot write {}", path.display()),
                    source,
                })?;
            }
        }
        Ok(Update {
            revision: mirror.revision,
            text: fleet.text,
            registry: Box::new(fleet.registry),
            refused: fleet.refused,
        })
    }

    /// Removes the feed files the registry in force (`text`) does not name.
    pub fn prune_feeds(&self, text: &str) {
        let dir = self.dir().join(self.feed_dir());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !text.contains(&format!("{}{name}\"", self.feed_dir())) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Replaces `path` with `text` (synced, renamed over it); a file made anew is readable by root
/// only, as the shipped registry is.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
    }
    crate::source::replace_file(path, text)
}

/// How long the start waits for etcd before it enforces from the cache.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agent starts.
pub struct Start {
    /// The registry read from etcd (`None`: etcd was unreachable, the cache is in force).
    pub mirror: Option<Mirror>,
    pub revision: i64,
    pub refused: Vec<Refused>,
}

/// Before the daemon loads its registry: reads the fleet's registry and writes it to the cache,
/// or, when etcd cannot be reached, keeps the cache (and says so). Without either, refuses:
/// the agent never starts with nothing to enforce.
pub fn prepare(config: &AgentConfig, cache: &Cache) -> Result<Start, FleetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| FleetError::Io {
            what: "cannot start the event loop".into(),
            source,
        })?;
    let read = runtime.block_on(async {
        tokio::time::timeout(START_TIMEOUT, async {
            let mut client = config.etcd.connect().await?;
            read_prefix(&mut client, layout::REGISTRY, None).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(FleetError::Options(format!(
                "no answer from {} within {} s",
                config.etcd.endpoints.join(","),
                START_TIMEOUT.as_secs()
            )))
        })
    });
    match read {
        Ok((revision, kvs)) => {
            let mirror = Mirror {
                revision,
                kvs: kvs.into_iter().collect(),
            };
            let update = cache.update(&mirror)?;
            if let Some(parent) = cache.file.parent() {
                std::fs::create_dir_all(parent).map_err(|source| FleetError::Io {
                    what: format!("cannot create {}", parent.display()),
                    source,
                })?;
            }
            write_private(&cache.file, &update.text).map_err(|source| FleetError::Io {
                what: format!("cannot write the cache {}", cache.file.display()),
                source,
            })?;
            cache.prune_feeds(&update.text);
            Ok(Start {
                mirror: Some(mirror),
                revision,
                refused: update.refused,
            })
        }
        Err(error) => {
            let cached = cached_revision(&cache.file).ok_or_else(|| {
                FleetError::Refused(format!(
                    "{error}; and there is no cached registry at {}: nothing to enforce, not starting",
                    cache.file.display()
                ))
            })?;
            tracing::warn!(
                "{error}: enforcing the cached registry of revision {cached} ({}) until etcd answers",
                cache.file.display()
            );
            Ok(Start {
                mirror: None,
                revision: cached,
                refused: Vec::new(),
            })
        }
    }
}

/// The revision (serial) of the cached registry, if there is one.
fn cached_revision(file: &Path) -> Option<i64> {
    let text = crate::registry::read::read_regular(file, crate::registry::read::REGISTRY_MAX_BYTES)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Serial {
        serial: Option<i64>,
    }
    serde_json::from_str::<Serial>(&text).ok()?.serial
}

/// Backoff between reconnections: doubled from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_LAST: Duration = Duration::from_secs(8);

/// Follows the registry from the mirror `prepare` read (or, without one, from a whole read once
/// etcd answers) until the daemon's loop stops listening.
pub async fn follow(
    config: AgentConfig,
    cache: Cache,
    mut mirror: Option<Mirror>,
    to_loop: mpsc::Sender<Followed>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let error = match connection(&config, &cache, &mut mirror, &to_loop, &mut backoff).await {
            Ok(()) => return,
            Err(error) => error,
        };
        if to_loop
            .send(Followed::Failed(error.to_string()))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_LAST);
    }
}

/// One connection: catch up (whole, if there is no mirror), then watch. `Ok` when the loop is
/// gone.
async fn connection(
    config: &AgentConfig,
    cache: &Cache,
    mirror: &mut Option<Mirror>,
    to_loop: &mpsc::Sender<Followed>,
    backoff: &mut Duration,
) -> Result<(), FleetError> {
    let mut client = config.etcd.connect().await?;
    let etcd = |what: &str| {
        let what = what.to_string();
        move |source| FleetError::Etcd { what, source }
    };
    if mirror.is_none() {
        let (revision, kvs) = read_prefix(&mut client, layout::REGISTRY, None).await?;
        let whole = Mirror {
            revision,
            kvs: kvs.into_iter().collect(),
        };
        if !send(cache, &whole, to_loop).await {
            return Ok(());
        }
        *mirror = Some(whole);
    }
    let Some(state) = mirror.as_mut() else {
        return Ok(());
    };
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(state.revision + 1);
    // A transaction of many keys arrives as one message: larger than gRPC's default limit.
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(super::connect::MAX_MESSAGE_BYTES)
        .watch(layout::REGISTRY, Some(options))
        .await
        .map_err(etcd("watch the registry"))?;
    *backoff = BACKOFF_FIRST;
    // Bounded by the connection: it ends with an error or the stream's end.
    while let Some(message) = stream.message().await.map_err(etcd("watch the registry"))? {
        if message.compact_revision() > 0 {
            // Our revision is compacted away: read the registry whole on the next connection.
            tracing::warn!(
                compacted = message.compact_revision(),
                "the fleet's revision {} was compacted; reading the registry whole",
                state.revision
            );
            *mirror = None;
            *backoff = Duration::ZERO;
            return Err(FleetError::Refused("revision compacted".into()));
        }
        if message.canceled() {
            return Err(FleetError::Refused(format!(
                "the watch was cancelled: {}",
                message.cancel_reason()
            )));
        }
        if message.events().is_empty() {
            continue;
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            state.revision = state.revision.max(kv.mod_revision());
            match event.event_type() {
                EventType::Put => {
                    state.kvs.insert(key, kv.value().to_vec());
                }
                EventType::Delete => {
                    state.kvs.remove(&key);
                }
            }
        }
        if !send(cache, state, to_loop).await {
            return Ok(());
        }
    }
    Err(FleetError::Refused("the watch ended".into()))
}

/// Validates the mirror and hands it to the loop; false when the loop is gone.
async fn send(cache: &Cache, mirror: &Mirror, to_loop: &mpsc::Sender<Followed>) -> bool {
    let message = match cache.update(mirror) {
        Ok(update) => Followed::Update(update),
        Err(error) => Followed::Failed(format!(
            "revision {} cannot be enforced: {error}",
            mirror.revision
        )),
    };
    to_loop.send(message).await.is_ok()
}

/// The status the agent publishes, kept by the daemon's loop.
pub type Status = Arc<Mutex<Value>>;

/// How long a status outlives its agent.
const STATUS_TTL_S: i64 = 10;
/// How often the status is written when nothing changes.
const STATUS_EVERY: Duration = Duration::from_secs(3);

/// Keeps the host's status key (under a lease) equal to `status`, written when `changed` is
/// notified and every few seconds; reconnects with backoff.
pub async fn publish(config: AgentConfig, status: Status, changed: Arc<Notify>) {
    let key = layout::status_key(&config.host);
    let mut backoff = BACKOFF_FIRST;
    loop {
        if let Err(error) = keep_status(&config, &key, &status, &changed, &mut backoff).await {
            tracing::debug!("status: {error}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_LAST);
    }
}

async fn keep_status(
    config: &AgentConfig,
    key: &str,
    status: &Status,
    changed: &Notify,
    backoff: &mut Duration,
) -> Result<(), FleetError> {
    let etcd = |what: &'static str| {
        move |source| FleetError::Etcd {
            what: what.into(),
            source,
        }
    };
    let mut client: Client = config.etcd.connect().await?;
    let lease = client
        .lease_grant(STATUS_TTL_S, None)
        .await
        .map_err(etcd("grant the status lease"))?
        .id();
    let (mut keeper, mut answers) = client
        .lease_keep_alive(lease)
        .await
        .map_err(etcd("keep the status lease"))?;
    let seen = serde_json::json!({"host": config.host}).to_string();
    client
        .put(layout::seen_key(&config.host), seen, None)
        .await
        .map_err(etcd("write that this host was seen"))?;
    *backoff = BACKOFF_FIRST;
    let mut tick = tokio::time::interval(STATUS_EVERY);
    // Bounded by the connection: an error ends it.
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(etcd("keep the status lease"))?;
                answers.message().await.map_err(etcd("keep the status lease"))?;
            }
            () = changed.notified() => {}
        }
        let value = status.lock().map(|s| s.to_string()).unwrap_or_default();
        client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(etcd("write the status"))?;
    }
}
