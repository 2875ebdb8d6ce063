//! The running enforcer's control plane: the live state behind the root-only control socket.
//! Every change is validated like the registry (it *is* the registry, edited), applied to the
//! kernel as a diff, written back to the registry source with the next serial, and appended to
//! the audit log — in that order, all or nothing.
//!
//! - `protocol`: the socket's requests and answers, and the client side.
//! - `live`: the state.
//! - `requests`: the requests it serves.
//! - `change`: the one write path every change takes, and its rollback.
//! - `plan`: single entries added or removed in place, without re-reading the whole registry.
//! - `guard`: the lockout guard (the operator's session, protected networks).
//! - `expiry`: entries removed when their date has passed.
//! - `fleet`: the registry of a fleet put in force, and local changes refused.
//! - `link`: the watch on the interface the program is attached to.
//! - `audit`: the audit log.

mod audit;
mod change;
mod expiry;
mod fleet;
mod guard;
mod link;
mod live;
mod plan;
mod protocol;
mod requests;

pub use audit::{AuditEntry, AuditLog, Verified, VerifyError, verify as verify_audit};
pub use live::{InForce, LinkState, Live, LiveConfig};
pub use protocol::{Envelope, Operator, Request, Response, SendError, send};
