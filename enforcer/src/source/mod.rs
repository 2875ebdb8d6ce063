//! Where the running enforcer gets its registry and writes its changes back: one small interface,
//! so that the daemon, the control plane, the compiler and the datapath do not care whether the
//! registry is a file on this host (`FileSource`, the first implementation) or a store shared
//! by many hosts.
//!
//! The contract, for any source:
//! - `load` gives the registry and the version it was read at (taken *before* the read, so a
//!   write in between makes the version stale rather than hiding the write);
//! - `read_if` gives the registry's text only if the source still holds that version: a change
//!   made in place is spliced into the text the policy in force was made from, never over a
//!   change someone else made meanwhile;
//! - `stage` writes a new text aside; `Staged::commit` puts it in force in one step (a crash
//!   leaves the old text or the new one, never a torn one), and dropping it discards it.

mod file;

use std::path::PathBuf;

pub use file::{FileSource, FileStamp, replace as replace_file};

use crate::registry::{Registry, RegistryError};

/// Identifies what a source holds without reading it: a change to the registry changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// A file's device, inode, size and change times.
    File(FileStamp),
}

/// The registry's text as read, and the version it was read at.
#[derive(Debug)]
pub struct Snapshot {
    pub text: String,
    pub version: Option<Version>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {location}: {source}")]
    Read {
        location: String,
        source: std::io::Error,
    },
    #[error("writing {location}: {source}")]
    Write {
        location: String,
        source: std::io::Error,
    },
}

/// A registry source (see the module's contract).
pub trait RegistrySource: Send {
    /// Where the registry is, for messages and `status`: a path, or a store's address.
    fn location(&self) -> String;
    /// The directory that relative `deny_files` paths are read from.
    fn base_dir(&self) -> PathBuf;
    /// The registry, parsed and validated, with the version it was read at.
    fn load(&self) -> Result<(Registry, Option<Version>), RegistryError>;
    /// The registry's whole text now.
    fn read(&self) -> Result<Snapshot, SourceError>;
    /// The text, only if the source still holds `version`.
    fn read_if(&self, version: Version) -> Option<String>;
    /// Writes `text` aside, to be put in force by `commit`.
    fn stage(&self, text: &str) -> Result<Box<dyn Staged>, SourceError>;
    /// At start: finishes or rolls back what a crash left (a text written aside by a process
    /// that died before putting it in force is removed: the change did not happen). Returns
    /// what it did, for the log.
    fn recover(&self) -> Vec<String>;
}

/// A new registry text written aside.
pub trait Staged {
    /// Puts the text in force; returns the source's version after it.
    fn commit(self: Box<Self>) -> Result<Option<Version>, SourceError>;
}
