//! The control socket's wire protocol: one JSON request on one line, one JSON answer on one line.
//! The client side (`send`) is here too; the server's loop is the daemon's (`daemon::serve`).

use std::{io::Write as _, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::{EgressMode, Mode, Protocol};

/// One request on the control socket (a JSON object on one line).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Add an entry to a section (`networks`, `devices`, `deny`, `vpn_endpoints`); `entry` has
    /// the registry's fields.
    Add {
        section: String,
        entry: Value,
    },
    /// Remove the entry of a section whose name, CIDR or address is `target`.
    Remove {
        section: String,
        target: String,
    },
    List {
        section: String,
    },
    Mode {
        mode: Mode,
    },
    /// Switch the egress mode.
    Egress {
        egress: EgressMode,
    },
    /// Re-read the registry and apply the difference (or reject it whole).
    Reload,
    /// The verdict for a packet from `addr`, or (with `to`) for one the server sends to it.
    Check {
        addr: IpAddr,
        port: Option<u16>,
        proto: Protocol,
        vpn: Option<String>,
        #[serde(default)]
        to: bool,
    },
}

/// Who is asking, for the lockout check: the SSH client of the calling terminal.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Operator {
    pub addr: IpAddr,
    /// The server-side port of the session (22 for SSH, usually).
    pub port: Option<u16>,
}

/// A request with the caller's context: what a client sends on the socket, as one JSON line
/// `{"request": {"verb": ...}, "operator": ..., "force": false}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub request: Request,
    #[serde(default)]
    pub operator: Option<Operator>,
    /// Apply even if the change would cut off the operator or a protected network.
    #[serde(default)]
    pub force: bool,
}

/// The answer: `ok`, a one-line `message`, and `data` for scripts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default)]
    pub data: Value,
}

impl Response {
    pub fn ok(message: impl Into<String>, data: Value) -> Self {
        Self {
            ok: true,
            message: message.into(),
            data,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            data: Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "cannot reach the enforcer at {socket}: {source} (is `enforcer run` running, and are you root?)"
    )]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("talking to the enforcer at {socket}: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error(
        "the enforcer closed the connection without an answer (did it stop?): whether the change was made shows in the registry's serial and its audit log"
    )]
    NoAnswer,
    #[error("the enforcer's answer is not understood: {0}")]
    Answer(#[from] serde_json::Error),
}

/// Sends one request to a running enforcer's socket and waits for its answer.
pub fn send(socket: &Path, request: &Envelope) -> Result<Response, SendError> {
    use std::io::{BufRead as _, BufReader};
    let io = |source| SendError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| SendError::Connect {
            socket: socket.display().to_string(),
            source,
        })?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(io)?;
    let line = serde_json::to_string(request)?;
    writeln!(stream, "{line}").map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    if line.is_empty() {
        return Err(SendError::NoAnswer);
    }
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    use super::{Envelope, Request};

    #[test]
    fn envelopes_round_trip() {
        let envelope = Envelope {
            request: Request::Add {
                section: "networks".into(),
                entry: serde_json::json!({"name": "a", "cidr": "10.0.0.0/8"}),
            },
            operator: None,
            force: false,
        };
        let line = serde_json::to_string(&envelope).unwrap();
        let back: Envelope = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(matches!(back.request, Request::Add { .. }));
        let status: Envelope = serde_json::from_str(r#"{"request":{"verb":"status"}}"#).unwrap();
        assert!(matches!(status.request, Request::Status));
    }
}
