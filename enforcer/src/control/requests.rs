//! The requests a running enforcer serves: each change request is turned into one `Change` (its
//! new registry text and what it does to the policy in force) and made by the one write path
//! (`change`); reads (`status`, `list`, `check`) answer from the policy in force and the
//! registry source.

use std::net::IpAddr;

use serde_json::{Value, json};

use super::{
    AuditEntry, Envelope, Request, Response,
    change::{Change, Effect},
    live::{Caller, Live},
    plan::{self, Plan},
};
use crate::{
    policy::RuleKind,
    registry::{
        Date, EgressMode, Mode, Protocol, VpnProtocol,
        text::{self, TextError},
    },
};

impl Live {
    /// Serves one request (with its caller's context) from a peer with this uid.
    pub fn handle_envelope(&mut self, envelope: Envelope, uid: u32) -> Response {
        let caller = Caller {
            uid,
            operator: envelope.operator,
            force: envelope.force,
        };
        let response = self.handle(caller, envelope.request);
        crate::release_freed_memory();
        response
    }

    fn handle(&mut self, caller: Caller, request: Request) -> Response {
        let reads = matches!(
            request,
            Request::Status | Request::List { .. } | Request::Check { .. }
        );
        if !reads && let Some(refusal) = self.fleet_refusal() {
            return refusal;
        }
        match request {
            Request::Status => self.status(),
            Request::List { section } => match text::section_name(&section) {
                Ok(section) => self.list(section),
                Err(e) => Response::error(e.to_string()),
            },
            Request::Check {
                addr,
                port,
                proto,
                vpn,
                to,
            } => self.check(addr, port, proto, vpn.as_deref(), to),
            Request::Add { section, entry } => match text::section_name(&section) {
                Ok(section) => self.add(caller, section, &entry),
                Err(e) => Response::error(e.to_string()),
            },
            Request::Remove { section, target } => match text::section_name(&section) {
                Ok(section) => self.remove(caller, section, &target),
                Err(e) => Response::error(e.to_string()),
            },
            Request::Mode { mode } => {
                // An explicit mode request ends `run --mode`'s override.
                let saved = self.mode_override.take();
                let response = self.mode(caller, mode);
                if !response.ok {
                    self.mode_override = saved;
                }
                response
            }
            Request::Egress { egress } => self.egress(caller, egress),
            Request::Reload => self.reload(caller),
        }
    }

    /// The registry's text if the source still holds what the policy in force was made from.
    fn own_text(&self) -> Option<String> {
        self.source.read_if(self.version?)
    }

    /// The registry's text as the source holds it now.
    fn read_text(&self) -> Result<String, Response> {
        self.source
            .read()
            .map(|snapshot| snapshot.text)
            .map_err(|e| Response::error(format!("refused, nothing changed: {e}")))
    }

    /// The answer to a change of the text that failed.
    fn text_refusal(&self, error: TextError) -> Response {
        match error {
            TextError::Refused(message) => Response::error(message),
            other => Response::error(format!(
                "refused, nothing changed: {}: {other}",
                self.source.location()
            )),
        }
    }

    /// A change of the whole registry's text: `edit` makes the new text from the current one.
    fn whole(
        &mut self,
        caller: Caller,
        what: String,
        audit: AuditEntry,
        edit: impl FnOnce(&str, u64) -> Result<String, TextError>,
    ) -> Response {
        let text = match self.read_text() {
            Ok(text) => text,
            Err(response) => return response,
        };
        let serial = self.serial + 1;
        let new = edit(&text, serial);
        drop(text);
        match new {
            Ok(new) => self.make(caller, Change::whole(new, serial, what, audit)),
            Err(e) => self.text_refusal(e),
        }
    }

    fn add(&mut self, caller: Caller, section: &'static str, entry: &Value) -> Response {
        let audit = AuditEntry {
            uid: caller.uid,
            verb: format!("{section} add"),
            entry: entry.clone(),
            approval: entry.get("approval").cloned().unwrap_or(Value::Null),
        };
        let serial = self.serial + 1;
        if let Some(text) = self.own_text() {
            let today = Date::today();
            match plan::plan_add(&self.policy, &text, section, entry, serial, today) {
                Plan::Refused(message) => return Response::error(message),
                Plan::Edit(edit) => {
                    return self.make(caller, Change::in_place(edit, serial, audit));
                }
                Plan::Full => {}
            }
        }
        let what = format!("added {section} entry {}", text::entry_label(entry));
        self.whole(caller, what, audit, |text, serial| {
            text::with_entry(text, section, entry, serial)
        })
    }

    fn remove(&mut self, caller: Caller, section: &'static str, target: &str) -> Response {
        let audit = AuditEntry {
            uid: caller.uid,
            verb: format!("{section} remove"),
            entry: json!({"target": target}),
            approval: Value::Null,
        };
        let serial = self.serial + 1;
        if let Some(text) = self.own_text() {
            match plan::plan_remove(&self.policy, &text, section, target, serial) {
                Plan::Refused(message) => return Response::error(message),
                Plan::Edit(edit) => {
                    return self.make(caller, Change::in_place(edit, serial, audit));
                }
                Plan::Full => {}
            }
        }
        let what = format!("removed {section} entry {target}");
        self.whole(caller, what, audit, |text, serial| {
            text::without_entry(text, section, target, serial)
        })
    }

    /// A mode switch: no entry changes, so it is made in place whenever the text splices (at a
    /// million entries the whole-registry path would take seconds for the one word that matters
    /// most in a rollout).
    fn mode(&mut self, caller: Caller, mode: Mode) -> Response {
        let audit = AuditEntry {
            uid: caller.uid,
            verb: "mode".into(),
            entry: json!({"mode": mode}),
            approval: Value::Null,
        };
        let serial = self.serial + 1;
        let spliced = self
            .own_text()
            .and_then(|text| text::splice_mode(&text, mode, serial));
        match spliced {
            Some(text) => self.make(
                caller,
                Change::new(
                    text,
                    serial,
                    Effect::Mode(mode),
                    format!("mode {mode}"),
                    audit,
                ),
            ),
            None => self.whole(caller, format!("mode {mode}"), audit, |text, serial| {
                text::with_mode(text, mode, serial)
            }),
        }
    }

    /// An egress mode switch, made in place like `mode`.
    fn egress(&mut self, caller: Caller, egress: EgressMode) -> Response {
        let audit = AuditEntry {
            uid: caller.uid,
            verb: "egress".into(),
            entry: json!({"egress": egress}),
            approval: Value::Null,
        };
        let serial = self.serial + 1;
        let what = format!("egress {egress}");
        match self
            .own_text()
            .and_then(|text| text::splice_egress(&text, egress, serial))
        {
            Some(text) => self.make(
                caller,
                Change::new(text, serial, Effect::Egress(egress), what, audit),
            ),
            None => self.whole(caller, what, audit, |text, serial| {
                text::with_egress(text, egress, serial)
            }),
        }
    }

    fn reload(&mut self, caller: Caller) -> Response {
        let snapshot = match self.source.read() {
            Ok(snapshot) => snapshot,
            Err(e) => return Response::error(e.to_string()),
        };
        /// Only the serial: the whole document as a JSON tree would be hundreds of MiB.
        #[derive(serde::Deserialize)]
        struct Serial {
            #[serde(default)]
            serial: u64,
        }
        let serial = match serde_json::from_str::<Serial>(&snapshot.text) {
            Ok(d) => d.serial,
            Err(e) => return Response::error(format!("refused, nothing changed: {e}")),
        };
        let location = self.source.location();
        let audit = AuditEntry {
            uid: caller.uid,
            verb: "reload".into(),
            entry: json!({"file": location}),
            approval: Value::Null,
        };
        self.make(
            caller,
            Change::reloaded(snapshot, serial, format!("reloaded {location}"), audit),
        )
    }

    /// What `status` reports, as data.
    pub(super) fn status_data(&self) -> Value {
        let uptime = self.started.elapsed().map_or(0, |d| d.as_secs());
        // Whether remembered VPN flows send their ends' packets to the flow lookup until the
        // sweep forgets them.
        let flow_lookup = self.datapath.config().is_ok_and(|c| c.vpn_flows_seen != 0);
        let connections = self.datapath.conn_count().unwrap_or(0);
        json!({
            "instance": self.state.instance,
            "mode": self.policy.mode,
            "egress": self.policy.egress,
            "xdp_mode": self.state.xdp_mode,
            "program_id": self.datapath.program_id(),
            "registry": self.source.location(),
            "serial": self.serial,
            "uptime_s": uptime,
            "networks": self.policy.count(RuleKind::Network),
            "devices": self.policy.count(RuleKind::Device),
            "deny": self.policy.count(RuleKind::Deny),
            "deny_feed": self.policy.count(RuleKind::DenyFeed),
            "vpn_endpoints": self.policy.vpn_endpoints,
            "upstreams": self.policy.count(RuleKind::Upstream),
            "vpn_flow_lookup": flow_lookup,
            "connections": connections,
            "events_suppressed": self.datapath.events_suppressed().unwrap_or(0),
            "enforcing": self.enforcing(),
            "connections_max": enforcer_common::MAX_CONNS,
            "fleet": self.fleet,
        })
    }

    fn status(&self) -> Response {
        let data = self.status_data();
        let uptime = data["uptime_s"].as_u64().unwrap_or(0);
        let flow_lookup = data["vpn_flow_lookup"].as_bool().unwrap_or(false);
        let connections = data["connections"].as_u64().unwrap_or(0);
        let mode = if self.enforcing() {
            format!("{} mode", self.policy.mode)
        } else {
            format!(
                "{} mode but NOT ENFORCING (the interface is gone)",
                self.policy.mode
            )
        };
        let flows = if flow_lookup {
            ", VPN flows remembered (flow lookup on)"
        } else {
            ""
        };
        let message = format!(
            "{} in {mode}, egress {} ({} XDP), registry serial {}, {} networks, {} devices, {} deny, {} feed ranges, {} VPN endpoints{flows}, {} upstreams, {connections} of {} connections tracked, up {uptime} s",
            self.state.instance,
            self.policy.egress,
            self.state.xdp_mode,
            self.serial,
            data["networks"],
            data["devices"],
            data["deny"],
            data["deny_feed"],
            data["vpn_endpoints"],
            data["upstreams"],
            enforcer_common::MAX_CONNS
        );
        Response::ok(message, data)
    }

    fn list(&self, section: &'static str) -> Response {
        let text = match self.source.read() {
            Ok(snapshot) => snapshot.text,
            Err(e) => return Response::error(e.to_string()),
        };
        let doc: Value = match serde_json::from_str(&text) {
            Ok(doc) => doc,
            Err(e) => {
                return Response::error(format!("{}: {e}", self.source.location()));
            }
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
        to: bool,
    ) -> Response {
        let vpn = match vpn.map(|v| VpnProtocol::from_name(v).ok_or(v)).transpose() {
            Ok(vpn) => vpn,
            Err(v) => return Response::error(format!("unknown VPN protocol {v}")),
        };
        let decision = if to {
            self.policy.decide_egress(addr, proto, port, vpn)
        } else {
            self.policy.decide(addr, proto, port, vpn)
        };
        let data = json!({"reason": decision.reason.label(), "rule": decision.rule,
            "direction": if to { "egress" } else { "ingress" }});
        Response::ok(decision.to_string(), data)
    }
}
