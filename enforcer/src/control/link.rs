//! The link watch: the interface the program is attached to may be removed, or replaced by a
//! new one of the same name (a driver reload, a hot-plug, a recreated veth). The kernel keeps the
//! old link, which then holds nothing: the new interface is unfiltered. The daemon checks every
//! second; a replaced interface gets the programs attached again at once, a removed one is
//! reported loudly until it is back.

use super::live::{LinkState, Live};
use crate::datapath::{self, AttachMode};

impl Live {
    /// Checks that the pinned link still holds the interface; re-attaches to a replaced one.
    pub fn check_link(&mut self, attach: AttachMode) -> LinkState {
        let iface = self.state.iface.clone();
        let dir = self.id.pin_dir();
        let link = dir.join(datapath::LINK_PIN);
        let current = datapath::ifindex(&iface);
        let held = datapath::pinned_link_ifindex(&link).ok();
        let state = match (current, held) {
            (Some(now), Some(held)) if now == held => LinkState::Attached,
            (None, _) => LinkState::InterfaceGone,
            (Some(_), _) => {
                let _ = std::fs::remove_file(&link);
                let _ = std::fs::remove_file(dir.join(datapath::EGRESS_LINK_PIN));
                let attached = self
                    .datapath
                    .attach_egress_pinned(&iface, &dir)
                    .and_then(|()| self.datapath.attach_pinned(&iface, attach, &dir));
                match attached {
                    Ok(mode) => {
                        self.state.xdp_mode = mode.to_string();
                        self.state.program_id = self.datapath.program_id();
                        if let Err(e) = self.state.write(&self.id) {
                            tracing::warn!(error = %e, "cannot update the state file");
                        }
                        LinkState::Reattached
                    }
                    Err(e) => {
                        tracing::error!(%iface, error = %e, "the interface was replaced and attaching to the new one failed: it is NOT being enforced");
                        LinkState::ReattachFailed
                    }
                }
            }
        };
        if state != self.link {
            match state {
                LinkState::Attached => {
                    tracing::info!(%iface, "the program holds the interface again");
                }
                LinkState::InterfaceGone => tracing::error!(
                    %iface,
                    "the interface is gone: NOTHING is enforced until it returns (the programs will be attached to it then)"
                ),
                LinkState::Reattached => tracing::warn!(
                    %iface,
                    "the interface was replaced: the programs are attached to the new one"
                ),
                LinkState::ReattachFailed => {}
            }
        }
        // A re-attached link holds the interface from now on.
        self.link = if state == LinkState::Reattached {
            LinkState::Attached
        } else {
            state
        };
        state
    }

    /// Whether the programs hold the interface (as the last check found).
    pub fn enforcing(&self) -> bool {
        self.link == LinkState::Attached
    }
}
