//! The explicit way out: remove an instance's program from its interface, and its pins and
//! state, once its controller has stopped.

use crate::{
    datapath::{self, DatapathError},
    instance::{self, InstanceError, InstanceId},
};

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the controller of {instance} is running (pid {pid}): stop it first")]
    Running { instance: String, pid: u32 },
    #[error("malformed instance name {0} in the state file")]
    MalformedName(String),
}

/// What `detach` removed.
pub struct Detached {
    pub instance: String,
    /// Whether a program was attached (and is now detached).
    pub had_link: bool,
}

/// Detaches the instance named `instance_name`, or the one on `iface`.
pub fn detach(instance_name: Option<&str>, iface: Option<&str>) -> Result<Detached, DetachError> {
    // A named instance whose controller is gone and whose link no longer exists (its interface
    // was removed) is not running, but its pins and state are still there to remove.
    let state = match instance::select(instance_name, iface) {
        Ok(state) => state,
        Err(e) => match instance_name
            .and_then(InstanceId::parse)
            .and_then(|id| instance::State::read(&id.state_file()).ok())
        {
            Some(state) => state,
            None => return Err(e.into()),
        },
    };
    if instance::daemon_alive(&state) && state.pid != std::process::id() {
        return Err(DetachError::Running {
            instance: state.instance,
            pid: state.pid,
        });
    }
    let id = InstanceId::parse(&state.instance)
        .ok_or_else(|| DetachError::MalformedName(state.instance.clone()))?;
    let mut had_link = datapath::detach_pinned(&id.pin_dir())?;
    for dir in id.legacy_pin_dirs() {
        had_link |= datapath::detach_pinned(&dir)?;
    }
    instance::release(&id);
    Ok(Detached {
        instance: state.instance,
        had_link,
    })
}
