//! Reading the registry and its deny feeds safely: only regular files, never waiting on the open,
//! never reading more than a limit. A FIFO, a device (`/dev/zero`), a socket or a directory is
//! refused at once, and a file larger than the limit is refused before it is read, so no path
//! an administrator (or an attacker with write access to the registry) names can hang the
//! daemon or exhaust its memory.

use std::{
    fs::OpenOptions,
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// The largest registry read: a million entries are about 60 MB.
pub const REGISTRY_MAX_BYTES: u64 = 512 << 20;
/// The largest deny feed read.
pub const FEED_MAX_BYTES: u64 = 256 << 20;

/// The whole text of the regular file at `path` (symlinks followed), at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> io::Result<String> {
    // O_NONBLOCK: opening a FIFO for reading does not wait for a writer; O_NOCTTY: a terminal
    // never becomes the controlling one.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file: refused"),
        ));
    }
    let too_large = |size: u64| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{size} bytes or more, over the limit of {limit} bytes: refused"),
        )
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let mut text = String::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // A file that grows while it is read stops at the limit.
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(too_large(limit + 1));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::read_regular;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = std::env::temp_dir().join(format!("enforcer-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("registry.json");
        std::fs::write(&file, "0123456789").unwrap();
        assert_eq!(read_regular(&file, 10).unwrap(), "0123456789");
        let e = read_regular(&file, 9).unwrap_err().to_string();
        assert!(e.contains("over the limit of 9 bytes"), "{e}");
        let e = read_regular(std::path::Path::new("/dev/zero"), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a device"), "{e}");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let e = read_regular(&fifo, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let e = read_regular(&dir, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
