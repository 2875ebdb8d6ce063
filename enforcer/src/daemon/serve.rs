//! The daemon's loop: the control socket, one request at a time (so concurrent clients never
//! interleave their changes), and the timers (expiry, the VPN flow sweep), until a signal.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use super::{DaemonError, Timers};
use crate::control::{Envelope, Live, Response};

/// How long a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `listener` until `shutdown` resolves with the signal's name.
pub async fn serve(
    listener: tokio::net::UnixListener,
    live: &mut Live,
    timers: Timers,
    shutdown: impl std::future::Future<Output = std::io::Result<&'static str>>,
) -> Result<&'static str, DaemonError> {
    tokio::pin!(shutdown);
    let mut expiry = tokio::time::interval(timers.expiry_check);
    // Not at once: flows pinned by an earlier run get a whole period to show a packet.
    let mut flows = tokio::time::interval_at(
        tokio::time::Instant::now() + timers.flow_sweep,
        timers.flow_sweep,
    );
    let mut conns = tokio::time::interval(timers.conn_sweep);
    loop {
        let (stream, _) = tokio::select! {
            signal = &mut shutdown => return signal.map_err(DaemonError::Signal),
            _ = expiry.tick() => {
                if let Some(response) = live.expire() {
                    tracing::info!(ok = response.ok, "expiry: {}", response.message);
                }
                continue;
            }
            _ = flows.tick() => {
                sweep_flows(live);
                continue;
            }
            _ = conns.tick() => {
                match live.datapath_mut().sweep_conns() {
                    Ok(sweep) if sweep.expired > 0 => tracing::debug!(
                        expired = sweep.expired,
                        kept = sweep.kept,
                        "removed expired connections"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("connection sweep failed (expired entries admit no replies anyway): {e}"),
                }
                continue;
            }
            accepted = listener.accept() => accepted.map_err(DaemonError::Accept)?,
        };
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read);
        let read_line = reader.read_line(&mut line);
        let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_line).await {
            Err(_) => Response::error("no request within 5 s"),
            Ok(Err(e)) => Response::error(format!("cannot read the request: {e}")),
            Ok(Ok(_)) if uid != 0 => {
                tracing::warn!(uid, "refused a control request from a non-root peer");
                Response::error("refused: only root may control the enforcer")
            }
            Ok(Ok(_)) => match serde_json::from_str::<Envelope>(&line) {
                Ok(envelope) => {
                    let response = live.handle_envelope(envelope, uid);
                    tracing::info!(uid, ok = response.ok, "{}", response.message);
                    response
                }
                Err(e) => Response::error(format!("malformed request, nothing changed: {e}")),
            },
        };
        let mut out = serde_json::to_string(&response).expect("a response serialises");
        out.push('\n');
        let _ = write.write_all(out.as_bytes()).await;
    }
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
                tracing::info!(
                    "no VPN flow is remembered: the flow lookup is off and the fast path on"
                );
            }
        }
        Err(e) => tracing::warn!("VPN flow sweep failed (flows stay remembered): {e}"),
    }
}
