//! Attaching the program to an interface, pinned so that enforcement outlives the controller;
//! adopting or taking over a program an earlier run left attached; and the explicit way out.

use std::path::Path;

use aya::programs::{Xdp, XdpMode};

use enforcer_common::PROGRAM_NAME;

use super::{AttachMode, Datapath, DatapathError, boxed, interface_exists};

/// File names of the pinned link and program inside an instance's pin directory.
pub const LINK_PIN: &str = "link";
pub const PROGRAM_PIN: &str = "program";

/// Removes an instance's program from its interface and every pin: the explicit way out.
/// Returns whether a link was pinned.
pub fn detach_pinned(dir: &Path) -> Result<bool, DatapathError> {
    let link_path = dir.join(LINK_PIN);
    let had_link = link_path.exists();
    if had_link {
        let link = aya::programs::links::PinnedLink::from_pin(&link_path).map_err(|e| {
            DatapathError::Attach {
                iface: link_path.display().to_string(),
                source: boxed(e),
            }
        })?;
        // Unpinned and dropped: the last reference goes, the kernel detaches the program.
        drop(link.unpin().map_err(|e| DatapathError::Attach {
            iface: link_path.display().to_string(),
            source: boxed(e),
        })?);
    }
    super::egress::unpin_egress(dir);
    let _ = std::fs::remove_dir_all(dir);
    Ok(had_link)
}

impl Datapath {
    /// Attaches to `iface`; returns the XDP mode in use.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, DatapathError> {
        if !interface_exists(iface) {
            return Err(DatapathError::NoSuchInterface(iface.to_string()));
        }
        let program = self.program_mut();
        let attach_error = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source: boxed(source),
        };
        let (link, used) = match mode {
            AttachMode::Skb => (
                program.attach(iface, XdpMode::Skb).map_err(attach_error)?,
                "skb",
            ),
            AttachMode::Native => {
                let link = program.attach(iface, XdpMode::Driver).map_err(|source| {
                    DatapathError::NativeUnsupported {
                        iface: iface.to_string(),
                        source: boxed(source),
                    }
                })?;
                (link, "native")
            }
            AttachMode::Auto => match program.attach(iface, XdpMode::Driver) {
                Ok(link) => (link, "native"),
                Err(native) => {
                    tracing::warn!(%iface, error = %native, "native XDP unavailable, falling back to skb mode");
                    (
                        program.attach(iface, XdpMode::Skb).map_err(attach_error)?,
                        "skb",
                    )
                }
            },
        };
        self.link = Some(link);
        Ok(used)
    }

    /// Attaches the program and pins it and its link under `dir`, so that enforcement outlives
    /// this process (a killed controller leaves the program running).
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        dir: &Path,
    ) -> Result<&'static str, DatapathError> {
        let used = self.attach(iface, mode)?;
        let link_id = self.link.take().expect("attach stored the link");
        let pin_error = |name: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::Pin {
                name,
                path,
                source: e,
            }
        };
        let link_path = dir.join(LINK_PIN);
        let program = self.program_mut();
        let link = program
            .take_link(link_id)
            .map_err(|e| pin_error("link", &link_path)(boxed(e)))?;
        let fd_link = aya::programs::links::FdLink::try_from(link)
            .map_err(|e| pin_error("link", &link_path)(boxed(e)))?;
        fd_link
            .pin(&link_path)
            .map_err(|e| pin_error("link", &link_path)(boxed(e)))?;
        let program_path = dir.join(PROGRAM_PIN);
        let _ = std::fs::remove_file(&program_path);
        self.program_mut()
            .pin(&program_path)
            .map_err(|e| pin_error("program", &program_path)(boxed(e)))?;
        Ok(used)
    }

    /// Takes over an attached program pinned under `dir` by an earlier run. If it is the
    /// program this build carries (same tag), it stays; otherwise the link is switched to this
    /// build's program in one kernel call (no moment without a program). Returns what happened.
    pub fn adopt(&mut self, dir: &Path) -> Result<&'static str, DatapathError> {
        let link_path = dir.join(LINK_PIN);
        let program_path = dir.join(PROGRAM_PIN);
        let adopt_error = |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            iface: format!("pinned link {}", link_path.display()),
            source: e,
        };
        let pinned_tag = aya::programs::ProgramInfo::from_pin(&program_path)
            .map(|i| i.tag())
            .ok();
        let our_tag = self
            .program()
            .info()
            .map_err(|e| adopt_error(boxed(e)))?
            .tag();
        if pinned_tag == Some(our_tag) {
            self.adopted_program_id = aya::programs::ProgramInfo::from_pin(&program_path)
                .ok()
                .map(|i| i.id());
            return Ok("adopted the running program");
        }
        self.take_over_link(dir)?;
        Ok("replaced the running program with this build's (one link update)")
    }

    /// Takes over the link an earlier build pinned under `old_dir` (another pin layout): the
    /// link switches to this program in one kernel call and is pinned under `dir`; `old_dir`
    /// (the earlier build's program and maps) is removed.
    pub fn take_over_legacy(&mut self, old_dir: &Path, dir: &Path) -> Result<(), DatapathError> {
        self.take_over_link_from(&old_dir.join(LINK_PIN), dir)?;
        let _ = std::fs::remove_dir_all(old_dir);
        Ok(())
    }

    /// Switches the link pinned under `dir` to this program in one kernel call (no moment
    /// without a program) and pins this program in place of the one it replaced.
    pub(super) fn take_over_link(&mut self, dir: &Path) -> Result<(), DatapathError> {
        self.take_over_link_from(&dir.join(LINK_PIN), dir)
    }

    /// The same, for the link pinned at `link_from`; link and program end up pinned in `dir`.
    fn take_over_link_from(&mut self, link_from: &Path, dir: &Path) -> Result<(), DatapathError> {
        let link_path = dir.join(LINK_PIN);
        let program_path = dir.join(PROGRAM_PIN);
        let adopt_error = |e: Box<dyn std::error::Error + Send + Sync>| DatapathError::Attach {
            iface: format!("pinned link {}", link_path.display()),
            source: e,
        };
        let link = aya::programs::links::PinnedLink::from_pin(link_from)
            .map_err(|e| adopt_error(boxed(e)))?;
        let fd_link = link.unpin().map_err(|e| adopt_error(boxed(e)))?;
        let xdp_link =
            aya::programs::xdp::XdpLink::try_from(fd_link).map_err(|e| adopt_error(boxed(e)))?;
        let id = self
            .program_mut()
            .attach_to_link(xdp_link)
            .map_err(|e| adopt_error(boxed(e)))?;
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|e| adopt_error(boxed(e)))?;
        let fd_link =
            aya::programs::links::FdLink::try_from(link).map_err(|e| adopt_error(boxed(e)))?;
        fd_link.pin(&link_path).map_err(|e| adopt_error(boxed(e)))?;
        let _ = std::fs::remove_file(&program_path);
        self.program_mut()
            .pin(&program_path)
            .map_err(|e| adopt_error(boxed(e)))?;
        self.adopted_program_id = None;
        Ok(())
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .as_mut()
            .expect("the program is back from the verifier's thread")
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("load() checked that the program exists and is XDP")
    }

    /// The kernel's id of the program enforcing (an adopted one, or the one loaded here).
    pub fn program_id(&self) -> Option<u32> {
        self.adopted_program_id
            .or_else(|| self.program().info().ok().map(|info| info.id()))
    }
}
