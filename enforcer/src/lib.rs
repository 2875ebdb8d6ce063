//! The enforcer's controller: registry → policy → kernel maps, and the CLI around it.
//!
//! - `registry`: the JSON file, parsed and validated, every problem with its place.
//! - `policy`: the compiler from registry to map entries (pure, host-testable).
//! - `lookup`: the flat source-lookup tables built from the policy (pure, host-testable).
//! - `datapath`: the one module that talks to aya (load, fill, attach, pin, counters).
//! - `instance`: pin and state directories of a running enforcer.
//! - `control`: the running enforcer's socket, live changes, persistence and audit.
//! - `cli`: the verbs.

pub mod cli;
pub mod control;
pub mod datapath;
pub mod instance;
pub mod lookup;
pub mod policy;
pub mod registry;
