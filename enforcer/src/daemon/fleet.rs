//! The daemon's side of a fleet agent: the follower's messages put in force, and the status the
//! agent publishes kept current.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::{
    control::Live,
    events::EventLog,
    fleet::{
        agent::{self, AgentConfig, Cache, Followed, Start, Status},
        assemble::Refused,
    },
};

/// What the serve loop holds of the agent.
pub struct FleetLink {
    updates: mpsc::Receiver<Followed>,
    status: Status,
    changed: Arc<Notify>,
    cache: Cache,
    host: String,
    /// The revision in force, and when it was put in force (ms since the epoch).
    applied: i64,
    applied_at_ms: Option<u64>,
    /// Why the last revision was not put in force, or etcd cannot be reached.
    error: Option<String>,
    /// Keys of the revision in force left out.
    left_out: Vec<Refused>,
}

/// Messages the follower may send ahead of the loop.
const QUEUE: usize = 16;

impl FleetLink {
    /// Starts the follower and the status publisher on the running event loop.
    pub fn start(config: &AgentConfig, cache: Cache, start: Start, live: &Live) -> Self {
        let (to_loop, updates) = mpsc::channel(QUEUE);
        let error = start
            .mirror
            .is_none()
            .then(|| "etcd unreachable at start: enforcing the cached registry".to_string());
        tokio::spawn(agent::follow(
            config.clone(),
            cache.clone(),
            start.mirror,
            to_loop,
        ));
        let mut link = Self {
            updates,
            status: Arc::default(),
            changed: Arc::new(Notify::new()),
            cache,
            host: config.host.clone(),
            applied: start.revision,
            applied_at_ms: Some(unix_ms()),
            error,
            left_out: start.refused,
        };
        link.refresh(live, true);
        tokio::spawn(agent::publish(
            config.clone(),
            Arc::clone(&link.status),
            Arc::clone(&link.changed),
        ));
        link
    }

    /// The follower's next message (never, without a fleet).
    pub async fn next(link: Option<&mut Self>) -> Option<Followed> {
        match link {
            Some(link) => link.updates.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Puts a followed registry in force (or records why not), logs it, publishes the status.
    pub fn handle(&mut self, followed: Followed, live: &mut Live, log: Option<&mut EventLog>) {
        match followed {
            Followed::Update(update) => {
                let revision = update.revision;
                let left_out = update.refused.clone();
                for r in &left_out {
                    tracing::warn!(key = %r.key, "left out of fleet revision {revision}: {}", r.problem);
                }
                let keys: Vec<&str> = left_out.iter().map(|r| r.key.as_str()).collect();
                let response = live.apply_fleet(revision, (update.text, update.registry), &keys);
                tracing::info!(ok = response.ok, "{}", response.message);
                if let Some(log) = log {
                    let action = if response.ok {
                        "policy-changed"
                    } else {
                        "change-refused"
                    };
                    let fields = json!({
                        "labels": {"registry_serial": live.serial().to_string(),
                                   "fleet_revision": revision.to_string()},
                    });
                    log.daemon(action, &response.message, response.ok, fields);
                }
                if response.ok {
                    self.applied = revision;
                    self.applied_at_ms = Some(unix_ms());
                    self.error = None;
                    self.left_out = left_out;
                    if let Ok(text) = crate::registry::read::read_regular(
                        &self.cache.file,
                        crate::registry::read::REGISTRY_MAX_BYTES,
                    ) {
                        self.cache.prune_feeds(&text);
                    }
                } else {
                    self.error = Some(format!("revision {revision}: {}", response.message));
                }
            }
            Followed::Failed(why) => {
                tracing::warn!("fleet: {why}");
                self.error = Some(why);
            }
        }
        self.refresh(live, true);
    }

    /// Makes the published status current (`now`: write it at once, not at the next tick).
    pub fn refresh(&mut self, live: &Live, now: bool) {
        let left_out: Vec<Value> = self
            .left_out
            .iter()
            .take(20)
            .map(|r| json!({"key": r.key, "problem": r.problem}))
            .collect();
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
        let status = live.fleet_status(json!({
            "host": self.host,
            "applied_revision": self.applied,
            "applied_at_ms": self.applied_at_ms,
            "last_error": self.error,
            "left_out": left_out,
            "left_out_count": self.left_out.len(),
            "updated": crate::events::timestamp(ns),
        }));
        if let Ok(mut shared) = self.status.lock() {
            *shared = status;
        }
        if now {
            self.changed.notify_one();
        }
    }
}

/// Now, in ms since the epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}
