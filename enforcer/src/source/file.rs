//! The registry as a JSON file on this host: read whole, versioned by the file's stamp, written by
//! a new file beside it that is renamed over it (fsync of the file, then of the directory).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use super::{RegistrySource, Snapshot, SourceError, Staged, Version};
use crate::registry::{
    Registry, RegistryError,
    read::{REGISTRY_MAX_BYTES, read_regular},
};

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

/// The registry file.
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn version(&self) -> Option<Version> {
        FileStamp::of(&self.path).map(Version::File)
    }
}

impl RegistrySource for FileSource {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn base_dir(&self) -> PathBuf {
        parent_dir(&self.path).to_path_buf()
    }

    fn load(&self) -> Result<(Registry, Option<Version>), RegistryError> {
        // Before the read: a write in between moves the stamp, and live changes then read anew.
        let version = self.version();
        Ok((Registry::load(&self.path)?, version))
    }

    fn read(&self) -> Result<Snapshot, SourceError> {
        let version = self.version();
        let text =
            read_regular(&self.path, REGISTRY_MAX_BYTES).map_err(|source| SourceError::Read {
                location: self.location(),
                source,
            })?;
        Ok(Snapshot { text, version })
    }

    fn read_if(&self, version: Version) -> Option<String> {
        // The stamp before and after the read: a write during the read moves it, so a hand edit
        // is never spliced over unseen.
        if self.version() != Some(version) {
            return None;
        }
        let text = read_regular(&self.path, REGISTRY_MAX_BYTES).ok()?;
        (self.version() == Some(version)).then_some(text)
    }

    fn recover(&self) -> Vec<String> {
        let target = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        let dir = parent_dir(&target);
        let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return Vec::new();
        };
        let prefix = format!(".{name}.tmp-");
        let mut done = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = file
                .strip_prefix(&prefix)
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: kill with signal 0 only checks that the process exists.
            let alive = pid == i32::try_from(std::process::id()).unwrap_or(0)
                || unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
            if !alive && std::fs::remove_file(entry.path()).is_ok() {
                done.push(format!(
                    "removed {}, a new registry text whose writer (pid {pid}) died before putting it in force",
                    entry.path().display()
                ));
            }
        }
        done
    }

    fn stage(&self, text: &str) -> Result<Box<dyn Staged>, SourceError> {
        StagedFile::write(&self.path, text)
            .map(|staged| Box::new(staged) as Box<dyn Staged>)
            .map_err(|source| SourceError::Write {
                location: self.location(),
                source,
            })
    }
}

/// A new text for a file, written and synced beside it (so that the text need not be held
/// while other work is done); `commit` renames it over the file, and a dropped one is removed.
struct StagedFile {
    tmp: Option<PathBuf>,
    path: PathBuf,
}

/// Replaces the file `path` with `text` as a change does (beside it, synced, renamed over it,
/// its link, mode and owner kept): a crash leaves the old file or the new one.
pub fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    StagedFile::write(path, text)?.commit_file()
}

impl StagedFile {
    /// Writes `text` beside the file `path` names: beside its target if `path` is a symbolic
    /// link (the link stays, and the file it names is replaced), with the mode and owner of the
    /// file it replaces.
    fn write(path: &Path, text: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let target = if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::canonicalize(path)?
        } else {
            path.to_path_buf()
        };
        let dir = parent_dir(&target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let staged = Self {
            tmp: Some(tmp.clone()),
            path: target.clone(),
        };
        let mut file = std::fs::File::create(&tmp)?;
        if let Ok(existing) = std::fs::metadata(&target) {
            // The owner first: a change of owner clears the set-id bits the mode then restores.
            std::os::unix::fs::fchown(&file, Some(existing.uid()), Some(existing.gid()))?;
            file.set_permissions(std::fs::Permissions::from_mode(existing.mode() & 0o7777))?;
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        Ok(staged)
    }

    /// Renames the new text over the file, and syncs the directory: a crash leaves the old
    /// file or the new one.
    fn commit_file(mut self) -> std::io::Result<()> {
        let tmp = self.tmp.take().expect("committed once");
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(parent_dir(&self.path))?.sync_all()
    }
}

impl Staged for StagedFile {
    fn commit(self: Box<Self>) -> Result<Option<Version>, SourceError> {
        let path = self.path.clone();
        self.commit_file().map_err(|source| SourceError::Write {
            location: path.display().to_string(),
            source,
        })?;
        Ok(FileStamp::of(&path).map(Version::File))
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
