//! The daemon's loop: the control socket and the timers (expiry, the VPN flow sweep, the
//! connection sweep), until a signal. Each client gets a task of its own that reads one request
//! line (at most `MAX_REQUEST_BYTES`, within `REQUEST_TIMEOUT`) and writes the answer (within
//! `ANSWER_TIMEOUT`), so an idle, slow or huge client delays no other client and no timer. The
//! requests themselves are served one at a time, here, so concurrent clients never interleave
//! their changes.

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    sync::{mpsc, oneshot},
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{DaemonError, Timers};
use crate::{
    control::{Envelope, Live, Request, Response},
    datapath::AttachMode,
    events::EventLog,
};

/// Events the kernel may raise per second, all CPUs together (a flood's events beyond it are
/// suppressed and counted); refilled every `EVENT_REFILL`.
pub const EVENT_RATE: u32 = 2000;
const EVENT_REFILL: Duration = Duration::from_millis(100);

/// What the daemon publishes besides the control socket.
pub struct Watchers<'a> {
    pub metrics: Option<&'a crate::metrics::Shared>,
    pub events: Option<Events>,
    /// The fleet agent's follower and status, when following a fleet.
    pub fleet: Option<super::fleet::FleetLink>,
}

/// The event log and the kernel's ring it reads.
pub struct Events {
    log: EventLog,
    ring: AsyncFd<RingBuf<MapData>>,
    /// Each CPU's budget per refill.
    per_cpu: u32,
}

impl Events {
    /// Must run on the event loop (the ring's descriptor is registered with it).
    pub fn new(log: EventLog, ring: RingBuf<MapData>) -> std::io::Result<Self> {
        let per_cpu = event_budget_per_cpu();
        // SAFETY: the ring owns its map's descriptor for as long as it lives, and the
        // `AsyncFd` owns the ring.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self { log, ring, per_cpu })
    }
}

/// Each CPU's event budget per refill: `EVENT_RATE` a second over all CPUs.
pub fn event_budget_per_cpu() -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1));
    let refills =
        u32::try_from(Duration::from_secs(1).as_millis() / EVENT_REFILL.as_millis()).unwrap_or(10);
    (EVENT_RATE / refills / u32::try_from(cpus).unwrap_or(1)).max(1)
}

/// Waits until the ring has events (never, without an event log).
async fn ring_ready(
    ring: Option<&mut AsyncFd<RingBuf<MapData>>>,
) -> Option<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match ring {
        Some(ring) => ring.readable_mut().await.ok(),
        None => std::future::pending().await,
    }
}

/// Writes every event the ring holds.
fn drain(ring: &mut RingBuf<MapData>, log: &mut EventLog, live: &Live) {
    // Bounded: the ring holds at most this many; more arrive on the next wake.
    for _ in 0..enforcer_common::EVENT_RING_BYTES / 64 {
        let Some(item) = ring.next() else {
            break;
        };
        if item.len() < size_of::<enforcer_common::Event>() {
            continue;
        }
        // SAFETY: the item holds an `Event` as the kernel wrote it (plain bytes, any pattern
        // valid); read unaligned.
        let event: enforcer_common::Event =
            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        let rule = (event.rule != enforcer_common::NO_RULE)
            .then(|| live.rule_info(event.rule))
            .flatten();
        log.kernel(&event, rule.as_ref());
    }
}

/// How often the daemon checks that the program still holds the interface.
const LINK_CHECK: Duration = Duration::from_secs(1);

/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line: a request names one entry, far below this.
const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Requests read and waiting for their turn.
const QUEUE: usize = 64;

/// A request read by a client's task, with the channel for its answer.
struct Job {
    envelope: Envelope,
    uid: u32,
    answer: oneshot::Sender<Response>,
}

/// Serves `listener` until `shutdown` resolves with the signal's name.
pub async fn serve(
    listener: tokio::net::UnixListener,
    live: &mut Live,
    timers: Timers,
    attach: AttachMode,
    watchers: Watchers<'_>,
    shutdown: impl std::future::Future<Output = std::io::Result<&'static str>>,
) -> Result<&'static str, DaemonError> {
    tokio::pin!(shutdown);
    let Watchers {
        metrics,
        events,
        mut fleet,
    } = watchers;
    // The ring and the log apart, so that waiting on the one leaves the other free.
    let (mut ring, mut events) = match events {
        Some(Events { log, ring, per_cpu }) => (Some(ring), Some((log, per_cpu))),
        None => (None, None),
    };
    let mut history = super::history::History::new(&live.state_file());
    let mut history_tick = tokio::time::interval(timers.history);
    let mut refill = tokio::time::interval(EVENT_REFILL);
    let mut folds = tokio::time::interval(Duration::from_secs(1));
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Signal)?;
    let mut expiry = tokio::time::interval(timers.expiry_check);
    // Not at once: flows pinned by an earlier run get a whole period to show a packet.
    let mut flows = tokio::time::interval_at(
        tokio::time::Instant::now() + timers.flow_sweep,
        timers.flow_sweep,
    );
    let mut conns = tokio::time::interval(timers.conn_sweep);
    let mut link = tokio::time::interval(LINK_CHECK);
    let (jobs_in, mut jobs) = mpsc::channel::<Job>(QUEUE);
    loop {
        tokio::select! {
            signal = &mut shutdown => {
                let signal = signal.map_err(DaemonError::Signal)?;
                if let Some((log, _)) = &mut events {
                    let _ = live.datapath_mut().set_event_budget(None);
                    log.close_folds(true);
                    log.daemon(
                        "stopped",
                        &format!("controller stopping on {signal}; the program stays attached unless told to detach"),
                        true,
                        serde_json::json!({}),
                    );
                }
                return Ok(signal);
            }
            _ = expiry.tick() => {
                let serial = live.serial();
                if let Some(response) = live.expire() {
                    tracing::info!(ok = response.ok, "expiry: {}", response.message);
                    if let Some((log, _)) = &mut events {
                        log.daemon("expired", &response.message, response.ok, serde_json::json!({}));
                    }
                }
                publish(metrics, live, serial);
            }
            ready = ring_ready(ring.as_mut()) => {
                if let (Some(mut guard), Some((log, _))) = (ready, events.as_mut()) {
                    drain(guard.get_inner_mut(), log, live);
                    guard.clear_ready();
                }
            }
            _ = refill.tick(), if events.is_some() => {
                let per_cpu = events.as_ref().map(|(_, per_cpu)| *per_cpu);
                if let Err(e) = live.datapath_mut().set_event_budget(per_cpu) {
                    tracing::warn!("cannot refill the event budget: {e}");
                }
            }
            _ = folds.tick(), if events.is_some() => {
                if let Some((log, _)) = &mut events {
                    log.close_folds(false);
                }
            }
            _ = hangup.recv() => {
                if let Some((log, _)) = &mut events
                    && let Err(error) = log.reopen()
                {
                    tracing::warn!("{error}");
                }
            }
            _ = flows.tick() => sweep_flows(live),
            _ = history_tick.tick() => history.sample(live.datapath_mut()),
            _ = conns.tick() => {
                let kept = sweep_conns(live);
                if let (Some(metrics), Some(kept)) = (metrics, kept) {
                    metrics.set_connections(kept);
                }
            }
            Some(followed) = super::fleet::FleetLink::next(fleet.as_mut()) => {
                let serial = live.serial();
                if let Some(link) = &mut fleet {
                    link.handle(followed, live, events.as_mut().map(|(log, _)| log));
                }
                publish(metrics, live, serial);
            }
            _ = link.tick() => {
                if let Some(link) = &mut fleet {
                    link.refresh(live, false);
                }
                let enforcing = live.enforcing();
                live.check_link(attach);
                if live.enforcing() != enforcing
                    && let Some(metrics) = metrics
                {
                    metrics.publish(live.facts(), false);
                }
            }
            Some(job) = jobs.recv() => {
                let serial = live.serial();
                let change = !matches!(
                    job.envelope.request,
                    Request::Status | Request::List { .. } | Request::Check { .. }
                );
                let response = live.handle_envelope(job.envelope, job.uid);
                tracing::info!(uid = job.uid, ok = response.ok, "{}", response.message);
                publish(metrics, live, serial);
                if change && let Some((log, _)) = &mut events {
                    let action = if response.ok { "policy-changed" } else { "change-refused" };
                    let fields = serde_json::json!({
                        "user": {"id": job.uid.to_string()},
                        "labels": {"registry_serial": live.serial().to_string()},
                    });
                    log.daemon(action, &response.message, response.ok, fields);
                }
                // A client that has gone no longer wants the answer; the change stands.
                let _ = job.answer.send(response);
            }
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(DaemonError::Accept)?;
                tokio::spawn(client(stream, jobs_in.clone()));
            }
        }
    }
}

/// One client: its request line in, its answer out, each within its deadline.
async fn client(stream: tokio::net::UnixStream, jobs: mpsc::Sender<Job>) {
    let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES + 1);
    let read_line = reader.read_until(b'\n', &mut line);
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_line).await {
        Err(_) => Response::error("no request within 5 s"),
        Ok(Err(e)) => Response::error(format!("cannot read the request: {e}")),
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST_BYTES => Response::error(format!(
            "request longer than {MAX_REQUEST_BYTES} bytes: refused, nothing changed"
        )),
        Ok(Ok(_)) if uid != 0 => {
            tracing::warn!(uid, "refused a control request from a non-root peer");
            Response::error("refused: only root may control the enforcer")
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Envelope>(&line) {
            Ok(envelope) => {
                let (answer, answered) = oneshot::channel();
                let job = Job {
                    envelope,
                    uid,
                    answer,
                };
                if jobs.send(job).await.is_err() {
                    return;
                }
                match answered.await {
                    Ok(response) => response,
                    Err(_) => return,
                }
            }
            Err(e) => Response::error(format!("malformed request, nothing changed: {e}")),
        },
    };
    let mut out = serde_json::to_string(&response).expect("a response serialises");
    out.push('\n');
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, write.write_all(out.as_bytes())).await;
}

/// One sweep of the remembered VPN flows (see `Datapath::sweep_vpn_flows`), logged when it
/// forgets any or turns the flow lookup off.
fn sweep_flows(live: &mut Live) {
    match live.datapath_mut().sweep_vpn_flows() {
        Ok(sweep) => {
            if sweep.forgotten > 0 {
                tracing::info!(
                    forgotten = sweep.forgotten,
                    kept = sweep.kept,
                    "forgot VPN flows silent for a whole sweep period"
                );
            }
            if sweep.flag_cleared {
                tracing::info!("no VPN flow is remembered: the flow lookup is off");
            }
        }
        Err(e) => tracing::warn!("VPN flow sweep failed (flows stay remembered): {e}"),
    }
}

/// Publishes the facts of the policy in force to the metrics endpoint when a change moved the
/// serial from `serial_before` (the facts are counted over every rule: not once a second).
fn publish(metrics: Option<&crate::metrics::Shared>, live: &Live, serial_before: u64) {
    if let Some(metrics) = metrics
        && live.serial() != serial_before
    {
        metrics.publish(live.facts(), true);
    }
}

/// One sweep of the connection table (see `Datapath::sweep_conns`): the connections kept.
fn sweep_conns(live: &mut Live) -> Option<usize> {
    match live.datapath_mut().sweep_conns() {
        Ok(sweep) => {
            if sweep.expired > 0 {
                tracing::debug!(
                    expired = sweep.expired,
                    kept = sweep.kept,
                    "removed expired connections"
                );
            }
            Some(sweep.kept)
        }
        Err(e) => {
            tracing::warn!(
                "connection sweep failed (expired entries admit no replies anyway): {e}"
            );
            None
        }
    }
}
