//! The enforcer's controller: registry → policy → kernel maps, and the CLI around it.
//!
//! - `registry`: the JSON file, parsed and validated, every problem with its place; edits of
//!   its text.
//! - `policy`: the compiler from registry to map entries, the diff between two policies, the
//!   verdict a packet gets (pure, host-testable).
//! - `datapath`: the one module that talks to aya (load, fill, attach, pin, counters).
//! - `instance`: pin and state directories of a running enforcer.
//! - `source`: where the running enforcer reads its registry and writes changes back.
//! - `control`: the live state behind the control socket: one write path for every change,
//!   the lockout guard, expiry, the audit log.
//! - `daemon`: `enforcer run` — start-up, adoption, the socket's loop and the timers.
//! - `fleet`: the registry shared by many hosts, in etcd: its keys, roles, import and export.
//! - `cli`: arguments, the call of each verb, and what it prints.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod events;
pub mod fleet;
pub mod instance;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod report;
pub mod source;
#[cfg(test)]
mod test_rng;

/// This process's resident memory now and at its peak, in MiB (`VmRSS`, `VmHWM`), for the
/// debug log of the phases that handle a whole registry.
pub fn memory_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Gives the memory freed by a change back to the system. A change at a million entries frees
/// hundreds of MiB in small blocks, which the allocator otherwise keeps: the daemon's resident
/// memory stayed near a GiB after one `allow add`.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it is safe to call at
    // any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
