//! The running enforcer's control plane: a root-only Unix socket taking one JSON request per
//! connection, and the live state behind it. Every change is validated like the registry file
//! (it *is* the registry file, edited), applied to the kernel as a diff, written to the registry
//! atomically with the next serial, and appended to the audit log — in that order, all or
//! nothing. A single added or removed entry, or a mode switch, is checked and made in place
//! against the policy in force (`edit`); anything else, or anything that path cannot decide
//! exactly, re-reads and recompiles the whole registry against the policy in force.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    datapath::Datapath,
    instance::{InstanceId, State},
    policy::{Policy, RuleKind},
    registry::{Date, Mode, Protocol, Registry, VpnProtocol},
};

mod edit;

/// What identifies the registry file's content without reading it: device, inode, size and
/// change time (which every write moves, and no one can set back). A file whose stamp is the one
/// the daemon last read or wrote holds what the policy in force was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

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
    /// Re-read the registry file and apply the difference (or reject it whole).
    Reload,
    Check {
        addr: IpAddr,
        port: Option<u16>,
        proto: Protocol,
        vpn: Option<String>,
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
    fn ok(message: impl Into<String>, data: Value) -> Self {
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

const SECTIONS: [&str; 4] = ["networks", "devices", "deny", "vpn_endpoints"];

/// The default period of the VPN flow sweep (`run --vpn-flow-idle`): an `OpenVPN` flow is
/// forgotten after 5 to 10 minutes without a packet. `OpenVPN`'s usual keepalive (a ping every
/// 10 s) keeps a quiet tunnel's flow; NAT bindings of a UDP flow silent that long are gone too.
pub const DEFAULT_FLOW_SWEEP: std::time::Duration = std::time::Duration::from_secs(300);

/// What the daemon holds while it runs.
pub struct Live {
    pub datapath: Datapath,
    pub policy: Policy,
    registry_path: PathBuf,
    /// The earliest expiry among the registry's entries: the sweep reads the file only once a
    /// date has passed. (The document itself is read from the file when a change needs it, not
    /// kept: a million-entry document is hundreds of MiB as a JSON tree.)
    next_expiry: Option<Date>,
    serial: u64,
    /// `run --mode` wins over the file until a `mode` request changes it.
    mode_override: Option<Mode>,
    audit_path: PathBuf,
    started: SystemTime,
    pub instance: String,
    pub xdp_mode: String,
    id: InstanceId,
    /// The state file `stats` reads; its rule labels follow every change.
    state: State,
    /// Management networks no change may cut off without `force`.
    pub protected: Vec<ipnet::IpNet>,
    /// How often expired entries are swept out.
    pub expiry_check: std::time::Duration,
    /// How often the remembered VPN flows are swept: a flow is forgotten after one to two
    /// periods without a packet.
    pub flow_sweep: std::time::Duration,
    /// The registry file as the daemon last read or wrote it: while the file still has this
    /// stamp, an added or removed entry is made in place (`edit`); otherwise (edited by hand
    /// since, or not known) the change goes the whole way, which reads the file as it is.
    pub file_stamp: Option<FileStamp>,
    /// The context of the request being served.
    caller: Option<Operator>,
    force: bool,
}

impl Live {
    #[expect(
        clippy::too_many_arguments,
        reason = "the daemon's state, gathered once at start"
    )]
    pub fn new(
        datapath: Datapath,
        policy: Policy,
        serial: u64,
        next_expiry: Option<Date>,
        registry_path: &Path,
        mode_override: Option<Mode>,
        id: InstanceId,
        state: State,
        xdp_mode: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            datapath,
            policy,
            audit_path: audit_path(registry_path),
            registry_path: registry_path.to_path_buf(),
            next_expiry,
            serial,
            mode_override,
            started: SystemTime::now(),
            instance: id.name(),
            xdp_mode,
            id,
            state,
            protected: Vec::new(),
            expiry_check: std::time::Duration::from_secs(60),
            flow_sweep: DEFAULT_FLOW_SWEEP,
            file_stamp: None,
            caller: None,
            force: false,
        })
    }

    /// Serves one request (with its caller's context) from a peer with this uid.
    pub fn handle_envelope(&mut self, envelope: Envelope, uid: u32) -> Response {
        self.caller = envelope.operator;
        self.force = envelope.force;
        let response = self.handle(envelope.request, uid);
        self.caller = None;
        self.force = false;
        response
    }

    /// Serves one request from a peer with this uid.
    pub fn handle(&mut self, request: Request, uid: u32) -> Response {
        let response = self.handle_request(request, uid);
        crate::release_freed_memory();
        response
    }

    fn handle_request(&mut self, request: Request, uid: u32) -> Response {
        match request {
            Request::Status => self.status(),
            Request::List { section } => match section_name(&section) {
                Ok(section) => self.list(section),
                Err(e) => Response::error(e),
            },
            Request::Check {
                addr,
                port,
                proto,
                vpn,
            } => self.check(addr, port, proto, vpn.as_deref()),
            Request::Add { section, entry } => {
                let section = match section_name(&section) {
                    Ok(s) => s,
                    Err(e) => return Response::error(e),
                };
                let label = entry_label(&entry);
                let approval = entry.get("approval").cloned().unwrap_or(Value::Null);
                let verb = format!("{section} add");
                let today = Date::today();
                if let Some(response) =
                    self.edit_in_place(uid, &verb, &entry, &approval, |policy, text, serial| {
                        edit::plan_add(policy, text, section, &entry, serial, today)
                    })
                {
                    return response;
                }
                if let Some(response) =
                    self.mutate_text(uid, &verb, &entry, &approval, |text, serial| {
                        // (A non-object is refused by `mutate`, in its words.)
                        entry.is_object().then_some(())?;
                        let spliced = edit::splice_add(text, section, &entry, serial)?;
                        Some(Ok((spliced, format!("added {section} entry {label}"))))
                    })
                {
                    return response;
                }
                self.mutate(uid, &verb, &entry, &approval, |doc| {
                    if !entry.is_object() {
                        return Err("the entry must be a JSON object with the registry's fields"
                            .to_string());
                    }
                    section_array(doc, section).push(entry.clone());
                    Ok(format!("added {section} entry {label}"))
                })
            }
            Request::Remove { section, target } => {
                let section = match section_name(&section) {
                    Ok(s) => s,
                    Err(e) => return Response::error(e),
                };
                let entry = json!({"target": target});
                let verb = format!("{section} remove");
                if let Some(response) =
                    self.edit_in_place(uid, &verb, &entry, &Value::Null, |policy, text, serial| {
                        edit::plan_remove(policy, text, section, &target, serial)
                    })
                {
                    return response;
                }
                if let Some(response) =
                    self.mutate_text(uid, &verb, &entry, &Value::Null, |text, serial| {
                        let spliced = edit::splice_remove(text, section, &target, serial)?;
                        Some(spliced.map(|t| (t, format!("removed {section} entry {target}"))))
                    })
                {
                    return response;
                }
                self.mutate(uid, &verb, &entry, &Value::Null, |doc| {
                    let list = section_array(doc, section);
                    let before = list.len();
                    list.retain(|e| !matches_target(e, &target));
                    if list.len() == before {
                        return Err(edit::no_entry(section, &target));
                    }
                    Ok(format!("removed {section} entry {target}"))
                })
            }
            Request::Mode { mode } => {
                let entry = json!({"mode": mode});
                // An explicit mode request ends `run --mode`'s override.
                let saved = self.mode_override.take();
                let response = match self.mode_in_place(uid, mode, &entry) {
                    Some(response) => response,
                    None => self.mutate(uid, "mode", &entry, &Value::Null, |doc| {
                        doc["mode"] = json!(mode.as_str());
                        Ok(format!("mode {mode}"))
                    }),
                };
                if !response.ok {
                    self.mode_override = saved;
                }
                response
            }
            Request::Reload => self.reload(uid),
        }
    }

    fn base_dir(&self) -> PathBuf {
        self.registry_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    /// An added or removed entry made in place (see `edit`): checked against the policy in
    /// force, applied to it and to the kernel as a one-entry diff, spliced into the file,
    /// audited; all or nothing, like `mutate`. `None`: the change must go the whole way.
    fn edit_in_place(
        &mut self,
        uid: u32,
        verb: &str,
        entry: &Value,
        approval: &Value,
        plan: impl FnOnce(&Policy, &str, u64) -> edit::Plan,
    ) -> Option<Response> {
        let text = self.own_text()?;
        let serial = self.serial + 1;
        let edit = match plan(&self.policy, &text, serial) {
            edit::Plan::Full => return None,
            edit::Plan::Refused(message) => return Some(Response::error(message)),
            edit::Plan::Edit(edit) => edit,
        };
        drop(text);
        // Written aside now, so that the new text is not held while the kernel is changed (at a
        // million entries it is 50 MB); renamed into place once the change is in force.
        let staged = match StagedFile::write(&self.registry_path, &edit.text) {
            Ok(staged) => staged,
            Err(e) => {
                return Some(Response::error(format!(
                    "refused, nothing changed: writing {}: {e}",
                    self.registry_path.display()
                )));
            }
        };
        let edit::Edit {
            add,
            remove,
            expires,
            what,
            ..
        } = edit;
        tracing::debug!(mib = ?crate::memory_mib(), "in place: planned");
        let before = self.reach(&self.policy);
        let change = match self.policy.edit(add, &remove) {
            Ok(change) => change,
            Err(e) => return Some(Response::error(format!("refused, nothing changed: {e}"))),
        };
        if !self.force
            && let Some(cut) = self.cut_off(&before, &self.reach(&self.policy))
        {
            self.policy.undo(change);
            return Some(cut_off_refusal(&cut));
        }
        let applied = self.datapath.apply_change(&change, &self.policy);
        tracing::debug!(mib = ?crate::memory_mib(), "in place: applied");
        let written = applied
            .map_err(|e| format!("applying to the kernel failed: {e}"))
            .and_then(|()| {
                staged
                    .commit()
                    .map_err(|e| format!("writing {}: {e}", self.registry_path.display()))
            });
        if let Err(e) = written {
            self.policy.undo(change.clone());
            // Put back what was there; the maps hold the change only until this returns.
            let _ = self.datapath.revert_change(&change, &self.policy);
            return Some(Response::error(format!("refused, nothing changed: {e}")));
        }
        self.file_stamp = FileStamp::of(&self.registry_path);
        self.serial = serial;
        self.next_expiry = match (self.next_expiry, expires) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.commit_state_in_place(&change);
        self.audit(uid, verb, entry, approval, serial - 1, serial);
        Some(Response::ok(
            what,
            json!({"serial": serial, "applied": "in_place"}),
        ))
    }

    /// The registry file's text if it is what the daemon last read or wrote (its stamp before
    /// and after the read is the one the daemon holds); `None` otherwise, or if unreadable.
    /// A write during the read moves the stamp, so a hand edit is never spliced over unseen.
    fn own_text(&self) -> Option<String> {
        let stamp = self.file_stamp?;
        if FileStamp::of(&self.registry_path) != Some(stamp) {
            return None;
        }
        let text = std::fs::read_to_string(&self.registry_path).ok()?;
        (FileStamp::of(&self.registry_path) == Some(stamp)).then_some(text)
    }

    /// A mode switch made in place: no entry changes, so the policy in force takes the mode and
    /// the file's `mode` and `serial` are spliced (at a million entries the whole-registry path
    /// would take seconds for the one word that matters most in a rollout). `None`: the whole
    /// way.
    fn mode_in_place(&mut self, uid: u32, mode: Mode, entry: &Value) -> Option<Response> {
        let text = self.own_text()?;
        let serial = self.serial + 1;
        let spliced = edit::splice_mode(&text, mode, serial)?;
        drop(text);
        let old = self.policy.mode;
        let before = self.reach(&self.policy);
        self.policy.mode = mode;
        if !self.force
            && let Some(cut) = self.cut_off(&before, &self.reach(&self.policy))
        {
            self.policy.mode = old;
            return Some(cut_off_refusal(&cut));
        }
        let done = self
            .datapath
            .set_mode(mode)
            .map_err(|e| format!("applying to the kernel failed: {e}"))
            .and_then(|()| {
                write_atomically(&self.registry_path, &spliced)
                    .map_err(|e| format!("writing {}: {e}", self.registry_path.display()))
            });
        if let Err(e) = done {
            self.policy.mode = old;
            let _ = self.datapath.set_mode(old);
            return Some(Response::error(format!("refused, nothing changed: {e}")));
        }
        self.file_stamp = FileStamp::of(&self.registry_path);
        self.serial = serial;
        self.state.mode = mode.to_string();
        if let Err(e) = self.state.write(&self.id) {
            tracing::warn!(error = %e, "cannot update the state file");
        }
        self.audit(uid, "mode", entry, &Value::Null, serial - 1, serial);
        Some(Response::ok(
            format!("mode {mode}"),
            json!({"serial": serial, "applied": "in_place"}),
        ))
    }

    /// Writes the state file and records an in-place change's rule labels in the journal
    /// beside `rules.json` (or, when the journal is full, writes them whole).
    fn commit_state_in_place(&mut self, change: &crate::policy::RuleChange) {
        let gone: Vec<u32> = change.removed.iter().map(|r| r.index).collect();
        let added: Vec<crate::instance::RuleLabel> =
            change.added.iter().map(crate::cli::rule_label).collect();
        let written = self.state.write(&self.id).and_then(|()| {
            if State::journal_rules(&self.id.state_file(), &gone, &added)? {
                Ok(())
            } else {
                State::write_rules(&self.id, &crate::cli::rule_labels(&self.policy))
            }
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot update the state file (stats may show old rule names)");
        }
    }

    /// Writes the state file and puts the prepared rule labels in place.
    fn commit_state(
        &mut self,
        labels: std::thread::Result<
            Result<crate::instance::PreparedRules, crate::instance::InstanceError>,
        >,
    ) {
        self.state.mode = self.policy.mode.to_string();
        let labels = labels.unwrap_or_else(|_| {
            Err(crate::instance::InstanceError::Io {
                path: "rules.json".into(),
                source: std::io::Error::other("the thread writing the rule labels panicked"),
            })
        });
        if let Err(e) = self
            .state
            .write(&self.id)
            .and_then(|()| labels.and_then(crate::instance::PreparedRules::commit))
        {
            tracing::warn!(error = %e, "cannot update the state file (stats may show old rule names)");
        }
    }

    /// The whole-registry path for a change the file's text takes as a splice (`change`: the
    /// new text and what it did, or why it is refused; `None` if the text does not splice):
    /// no document tree is built. `None`: the change must go through `mutate`.
    fn mutate_text(
        &mut self,
        uid: u32,
        verb: &str,
        entry: &Value,
        approval: &Value,
        change: impl FnOnce(&str, u64) -> Option<Result<(String, String), String>>,
    ) -> Option<Response> {
        let text = std::fs::read_to_string(&self.registry_path).ok()?;
        let serial = self.serial + 1;
        let (spliced, what) = match change(&text, serial)? {
            Ok(done) => done,
            Err(e) => return Some(Response::error(e)),
        };
        drop(text);
        let response = self.adopt(spliced, false, None, serial, what);
        if response.ok {
            self.audit(uid, verb, entry, approval, serial - 1, serial);
        }
        Some(response)
    }

    /// Validates, compiles, applies, persists and audits one change of the registry document.
    fn mutate(
        &mut self,
        uid: u32,
        verb: &str,
        entry: &Value,
        approval: &Value,
        change: impl FnOnce(&mut Value) -> Result<String, String>,
    ) -> Response {
        let mut doc = match self.doc() {
            Ok(doc) => doc,
            Err(e) => return Response::error(format!("refused, nothing changed: {e}")),
        };
        let what = match change(&mut doc) {
            Ok(what) => what,
            Err(e) => return Response::error(e),
        };
        let serial = self.serial + 1;
        doc["serial"] = json!(serial);
        let text = serde_json::to_string_pretty(&doc).expect("JSON serialises") + "\n";
        // The document tree is the largest thing here at a million entries (about a GiB with
        // the policy in force): not held while the new text is parsed, compiled and applied.
        drop(doc);
        let response = self.adopt(text, false, None, serial, what);
        if response.ok {
            self.audit(uid, verb, entry, approval, serial - 1, serial);
        }
        response
    }

    /// The registry document, from the file (which every change rewrites).
    fn doc(&self) -> Result<Value, String> {
        let text = std::fs::read_to_string(&self.registry_path)
            .map_err(|e| format!("cannot read {}: {e}", self.registry_path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", self.registry_path.display()))
    }

    /// Makes `text` (a whole registry) the policy in force and the file on disk, or nothing.
    /// `written`: the text is the registry file as it is on disk already (a reload), so it is
    /// not written back.
    /// `stamp`: for a reload, the file's stamp taken before it was read.
    fn adopt(
        &mut self,
        text: String,
        written: bool,
        stamp: Option<FileStamp>,
        serial: u64,
        what: String,
    ) -> Response {
        let registry = match Registry::parse_at(&text, &self.base_dir()) {
            Ok(r) => r,
            Err(problems) => return Response::error(edit::refusal(&problems)),
        };
        tracing::debug!(mib = ?crate::memory_mib(), "registry parsed");
        // A new text is written aside now and renamed into place once the policy is in force
        // (so that its tens of MB are not held meanwhile); a reload's text is the file already.
        let staged = if written {
            None
        } else {
            match StagedFile::write(&self.registry_path, &text) {
                Ok(staged) => Some(staged),
                Err(e) => {
                    return Response::error(format!(
                        "refused, nothing changed: writing {}: {e}",
                        self.registry_path.display()
                    ));
                }
            }
        };
        drop(text);
        let expiry = next_expiry(&registry);
        // The registry goes into the policy (its names move, not copied); at a million entries it
        // is the largest thing held while the policy is compiled.
        let mut policy = match Policy::from_registry(registry, Date::today(), Some(&self.policy)) {
            Ok(p) => p,
            Err(e) => return Response::error(format!("refused, nothing changed: {e}")),
        };
        tracing::debug!(mib = ?crate::memory_mib(), "policy compiled");
        if let Some(mode) = self.mode_override {
            policy.mode = mode;
        }
        if !self.force
            && let Some(cut) = self.lockout(&policy)
        {
            return cut_off_refusal(&cut);
        }
        // The new rule labels (a million take most of a second) are written aside meanwhile,
        // and put in place only if the policy is.
        let (applied, labels) = std::thread::scope(|scope| {
            let labels =
                scope.spawn(|| State::prepare_rules(&self.id, &crate::cli::rule_labels(&policy)));
            let applied = self.datapath.apply(&self.policy, &policy);
            (applied, labels.join())
        });
        tracing::debug!(mib = ?crate::memory_mib(), "policy applied");
        if let Err(e) = applied {
            // Put back what was there; the maps hold a mixture only until this returns.
            let _ = self.datapath.apply(&policy, &self.policy);
            return Response::error(format!(
                "refused, nothing changed: applying to the kernel failed: {e}"
            ));
        }
        if let Some(staged) = staged
            && let Err(e) = staged.commit()
        {
            let _ = self.datapath.apply(&policy, &self.policy);
            return Response::error(format!(
                "refused, nothing changed: writing {}: {e}",
                self.registry_path.display()
            ));
        }
        self.policy = policy;
        self.next_expiry = expiry;
        self.serial = serial;
        // A written file is ours now; a reloaded one was stamped before it was read.
        self.file_stamp = if written {
            stamp
        } else {
            FileStamp::of(&self.registry_path)
        };
        self.commit_state(labels);
        Response::ok(what, json!({"serial": serial, "applied": "whole_registry"}))
    }

    /// What `new` would cut off that the policy in force lets in: the caller's SSH session (its
    /// address on its server port), or a protected management network (its first address no
    /// longer allowlisted at all).
    fn lockout(&self, new: &Policy) -> Option<String> {
        self.cut_off(&self.reach(&self.policy), &self.reach(new))
    }

    /// Under `policy`: whether the caller's session passes, then whether each protected
    /// network is allowlisted.
    fn reach(&self, policy: &Policy) -> Vec<bool> {
        use enforcer_common::{Action, Reason};
        let passes = |p: &Policy, addr: IpAddr, port: u16| {
            p.mode == Mode::Monitor
                || p.check(addr, Protocol::Tcp, Some(port)).reason.action() == Action::Pass
        };
        let listed = |p: &Policy, addr: IpAddr| {
            p.mode == Mode::Monitor
                || matches!(
                    p.check(addr, Protocol::Tcp, None).reason,
                    Reason::Allowed | Reason::PortNotAllowed
                )
        };
        let session = self
            .caller
            .is_some_and(|op| passes(policy, op.addr, op.port.unwrap_or(22)));
        std::iter::once(session)
            .chain(
                self.protected
                    .iter()
                    .map(|net| listed(policy, protected_probe(net))),
            )
            .collect()
    }

    /// What `reach` found reachable before and not after, worded for the refusal.
    fn cut_off(&self, before: &[bool], after: &[bool]) -> Option<String> {
        let lost = |i: usize| before.get(i) == Some(&true) && after.get(i) == Some(&false);
        if let Some(op) = self.caller
            && lost(0)
        {
            let port = op.port.unwrap_or(22);
            return Some(format!("your own session from {} (tcp/{port})", op.addr));
        }
        self.protected
            .iter()
            .enumerate()
            .find(|(i, _)| lost(i + 1))
            .map(|(_, net)| format!("the protected management network {net}"))
    }

    /// One sweep of the remembered VPN flows (see `Datapath::sweep_vpn_flows`), logged when it
    /// forgets any or turns the flow lookup off.
    pub fn sweep_flows(&mut self) {
        match self.datapath.sweep_vpn_flows() {
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

    /// Removes the entries whose expiry date has passed from the registry (written and audited
    /// like any change); the kernel stops applying them in the same step.
    pub fn expire(&mut self) -> Option<Response> {
        let today = Date::today();
        let expired = |e: &Value| {
            e.get("expires")
                .and_then(Value::as_str)
                .and_then(|d| Date::parse(d).ok())
                .is_some_and(|d| d.is_past(today))
        };
        if self.next_expiry.is_none_or(|d| !d.is_past(today)) {
            return None;
        }
        // The file's text, spliced (no document tree); the tree where the text does not splice.
        let text = match std::fs::read_to_string(&self.registry_path) {
            Ok(text) => text,
            Err(e) => {
                return Some(Response::error(format!(
                    "cannot read {}: {e}",
                    self.registry_path.display()
                )));
            }
        };
        let serial = self.serial + 1;
        let spliced = edit::splice_expired(&text, today, serial);
        drop(text);
        let (spliced, gone) = match spliced {
            Some(expiry) if expiry.gone.is_empty() => {
                // Nothing past after all (the entry was removed meanwhile): the sweep reads the
                // file again at the next date, not every minute.
                self.next_expiry = expiry.next;
                return None;
            }
            Some(expiry) => (Some(expiry.text), expiry.gone),
            None => {
                let doc = match self.doc() {
                    Ok(doc) => doc,
                    Err(e) => return Some(Response::error(e)),
                };
                let mut gone = Vec::new();
                for section in SECTIONS {
                    for e in doc
                        .get(section)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if expired(e) {
                            gone.push(json!({"section": section, "entry": e}));
                        }
                    }
                }
                (None, gone)
            }
        };
        if gone.is_empty() {
            return None;
        }
        let entry = json!(gone);
        let count = gone.len();
        let what = format!("removed {count} expired entries");
        // The system removes what its owner set to expire: no lockout check applies.
        self.force = true;
        let response = match spliced {
            Some(spliced) => {
                let response = self.adopt(spliced, false, None, serial, what);
                if response.ok {
                    self.audit(0, "expire", &entry, &Value::Null, serial - 1, serial);
                }
                response
            }
            None => self.mutate(0, "expire", &entry, &Value::Null, |doc| {
                for section in SECTIONS {
                    if let Some(list) = doc.get_mut(section).and_then(Value::as_array_mut) {
                        list.retain(|e| !expired(e));
                    }
                }
                Ok(what)
            }),
        };
        self.force = false;
        crate::release_freed_memory();
        Some(response)
    }

    fn reload(&mut self, uid: u32) -> Response {
        let stamp = FileStamp::of(&self.registry_path);
        let text = match std::fs::read_to_string(&self.registry_path) {
            Ok(t) => t,
            Err(e) => {
                return Response::error(format!(
                    "cannot read {}: {e}",
                    self.registry_path.display()
                ));
            }
        };
        /// Only the serial: the whole document as a JSON tree would be hundreds of MiB.
        #[derive(serde::Deserialize)]
        struct Serial {
            #[serde(default)]
            serial: u64,
        }
        let serial = match serde_json::from_str::<Serial>(&text) {
            Ok(d) => d.serial,
            Err(e) => return Response::error(format!("refused, nothing changed: {e}")),
        };
        let before = self.serial;
        let response = self.adopt(
            text,
            true,
            stamp,
            serial,
            format!("reloaded {}", self.registry_path.display()),
        );
        if response.ok {
            self.audit(
                uid,
                "reload",
                &json!({"file": self.registry_path}),
                &Value::Null,
                before,
                serial,
            );
        }
        response
    }

    fn status(&self) -> Response {
        let uptime = self.started.elapsed().map_or(0, |d| d.as_secs());
        // Whether remembered VPN flows send every TCP/UDP packet to the flow lookup (and keep
        // the fast path off) until the sweep forgets them.
        let flow_lookup = self.datapath.config().is_ok_and(|c| c.vpn_flows_seen != 0);
        let data = json!({
            "instance": self.instance,
            "mode": self.policy.mode,
            "xdp_mode": self.xdp_mode,
            "program_id": self.datapath.program_id(),
            "registry": self.registry_path,
            "serial": self.serial,
            "uptime_s": uptime,
            "networks": self.policy.count(RuleKind::Network),
            "devices": self.policy.count(RuleKind::Device),
            "deny": self.policy.count(RuleKind::Deny),
            "deny_feed": self.policy.count(RuleKind::DenyFeed),
            "vpn_endpoints": self.policy.vpn_endpoints,
            "vpn_flow_lookup": flow_lookup,
        });
        let flows = if flow_lookup {
            ", VPN flows remembered (flow lookup on)"
        } else {
            ""
        };
        let message = format!(
            "{} in {} mode ({} XDP), registry serial {}, {} networks, {} devices, {} deny, {} feed ranges, {} VPN endpoints{flows}, up {uptime} s",
            self.instance,
            self.policy.mode,
            self.xdp_mode,
            self.serial,
            data["networks"],
            data["devices"],
            data["deny"],
            data["deny_feed"],
            data["vpn_endpoints"]
        );
        Response::ok(message, data)
    }

    fn list(&self, section: &'static str) -> Response {
        let doc = match self.doc() {
            Ok(doc) => doc,
            Err(e) => return Response::error(e),
        };
        let entries = doc.get(section).cloned().unwrap_or_else(|| json!([]));
        let count = entries.as_array().map_or(0, Vec::len);
        Response::ok(format!("{count} {section} entries"), entries)
    }

    fn check(
        &self,
        addr: IpAddr,
        port: Option<u16>,
        proto: Protocol,
        vpn: Option<&str>,
    ) -> Response {
        let deny = self.policy.check(addr, proto, port);
        let decision = match vpn.map(|v| VpnProtocol::from_name(v).ok_or(v)) {
            Some(Err(v)) => return Response::error(format!("unknown VPN protocol {v}")),
            Some(Ok(v))
                if !matches!(
                    deny.reason,
                    enforcer_common::Reason::Denied | enforcer_common::Reason::DeniedFeed
                ) =>
            {
                self.policy.check_vpn(addr, v, port)
            }
            _ => deny,
        };
        let data = json!({"reason": decision.reason.label(), "rule": decision.rule});
        Response::ok(decision.to_string(), data)
    }

    fn audit(
        &self,
        uid: u32,
        verb: &str,
        entry: &Value,
        approval: &Value,
        before: u64,
        after: u64,
    ) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let line = json!({
            "time": timestamp(now), "uid": uid, "verb": verb, "entry": entry, "approval": approval,
            "serial_before": before, "serial_after": after, "instance": self.instance,
        });
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit_path)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
        if let Err(e) = written {
            tracing::error!(path = %self.audit_path.display(), error = %e, "cannot append to the audit log");
        }
    }
}

/// The audit log beside the registry: `REGISTRY.audit.jsonl`.
pub fn audit_path(registry: &Path) -> PathBuf {
    let mut name = registry
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".audit.jsonl");
    registry.with_file_name(name)
}

fn section_name(section: &str) -> Result<&'static str, String> {
    SECTIONS.into_iter().find(|s| *s == section).ok_or_else(|| {
        format!(
            "unknown section {section} (expected one of {})",
            SECTIONS.join(", ")
        )
    })
}

fn section_array<'a>(doc: &'a mut Value, section: &str) -> &'a mut Vec<Value> {
    if !doc.get(section).is_some_and(Value::is_array) {
        doc[section] = json!([]);
    }
    doc[section].as_array_mut().expect("just made an array")
}

fn entry_label(entry: &Value) -> String {
    ["name", "cidr", "address"]
        .iter()
        .find_map(|k| entry.get(*k).and_then(Value::as_str))
        .unwrap_or("?")
        .to_string()
}

fn matches_target(entry: &Value, target: &str) -> bool {
    ["name", "cidr", "address"]
        .iter()
        .any(|k| entry.get(*k).and_then(Value::as_str) == Some(target))
}

/// The refusal of a change that would cut off the operator or a protected network.
fn cut_off_refusal(cut: &str) -> Response {
    Response::error(format!(
        "refused, nothing changed: the change would cut off {cut}; repeat with --force if that is intended"
    ))
}

/// The address that stands for a protected network: its first host.
fn protected_probe(net: &ipnet::IpNet) -> IpAddr {
    match net {
        ipnet::IpNet::V4(n) => IpAddr::V4(n.hosts().next().unwrap_or(n.network())),
        ipnet::IpNet::V6(n) => IpAddr::V6(n.hosts().next().unwrap_or(n.network())),
    }
}

/// The earliest expiry date among a registry's entries.
pub fn next_expiry(registry: &Registry) -> Option<Date> {
    registry
        .networks
        .iter()
        .map(|n| n.expires)
        .chain(registry.devices.iter().map(|d| d.expires))
        .chain(registry.vpn_endpoints.iter().map(|v| v.expires))
        .chain(registry.deny.iter().map(|d| d.expires))
        .flatten()
        .min()
}

/// Replaces `path` with `text`: a new file beside it, fsync, rename over, fsync of the directory.
/// A crash leaves the old file or the new one, never a torn one.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    StagedFile::write(path, text)?.commit()
}

/// A new text for a file, written and synced beside it (so that the text need not be held
/// while other work is done); `commit` renames it over the file, and a dropped one is removed.
pub struct StagedFile {
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl StagedFile {
    pub fn write(path: &Path, text: &str) -> std::io::Result<Self> {
        let dir = parent_dir(path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let staged = Self {
            tmp: Some(tmp.clone()),
            path: path.to_path_buf(),
        };
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        Ok(staged)
    }

    /// Renames the new text over the file, and syncs the directory: a crash leaves the old
    /// file or the new one.
    pub fn commit(mut self) -> std::io::Result<()> {
        let tmp = self.tmp.take().expect("committed once");
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(parent_dir(&self.path))?.sync_all()
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `YYYY-MM-DDThh:mm:ssZ` for Unix seconds.
fn timestamp(secs: u64) -> String {
    let day = Date::from_days_since_epoch(i64::try_from(secs / 86_400).unwrap_or(0));
    let rem = secs % 86_400;
    format!(
        "{day}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Sends one request to a running enforcer's socket and waits for its answer.
pub fn send(socket: &Path, request: &Envelope) -> anyhow::Result<Response> {
    use std::io::{BufRead as _, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the enforcer at {}: {e} (is `enforcer run` running, and are you root?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    writeln!(stream, "{}", serde_json::to_string(request)?)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        anyhow::bail!("the enforcer closed the connection without an answer");
    }
    Ok(serde_json::from_str(&line)?)
}

/// Serves the socket until `shutdown` resolves; requests are handled one at a time, so
/// concurrent clients never interleave their changes.
pub async fn serve(
    listener: tokio::net::UnixListener,
    live: &mut Live,
    shutdown: impl std::future::Future<Output = anyhow::Result<&'static str>>,
) -> anyhow::Result<&'static str> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    tokio::pin!(shutdown);
    let mut expiry = tokio::time::interval(live.expiry_check);
    // Not at once: flows pinned by an earlier run get a whole period to show a packet.
    let mut flows = tokio::time::interval_at(
        tokio::time::Instant::now() + live.flow_sweep,
        live.flow_sweep,
    );
    loop {
        let (stream, _) = tokio::select! {
            signal = &mut shutdown => return signal,
            _ = expiry.tick() => {
                if let Some(response) = live.expire() {
                    tracing::info!(ok = response.ok, "expiry: {}", response.message);
                }
                continue;
            }
            _ = flows.tick() => {
                live.sweep_flows();
                continue;
            }
            accepted = listener.accept() => accepted?,
        };
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read);
        let read_line = reader.read_line(&mut line);
        let response =
            match tokio::time::timeout(std::time::Duration::from_secs(5), read_line).await {
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
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        let _ = write.write_all(out.as_bytes()).await;
    }
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
