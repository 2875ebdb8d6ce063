//! Array maps mapped into this process (`BPF_F_MMAPABLE`): the large tables are written through
//! the mapping rather than one system call per entry. Also the byte view of plain map values.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::Map;

use super::{DatapathError, map_error};

/// A map's values, mapped into this process (`BPF_F_MMAPABLE` arrays).
pub(super) struct Mapped {
    ptr: *mut u8,
    pub(super) len: usize,
}

impl Mapped {
    pub(super) fn new(
        map: &Map,
        name: &'static str,
        value_size: usize,
    ) -> Result<Self, DatapathError> {
        let Map::Array(data) = map else {
            return Err(DatapathError::Map {
                name,
                source: "not an array".into(),
            });
        };
        let entries = data.info().map_err(map_error(name))?.max_entries() as usize;
        let len = entries * value_size;
        // SAFETY: maps `len` bytes of the array's values, shared with the kernel; the mapping
        // is only used through the bounds-checked accessors below and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Map {
                name,
                source: Box::new(std::io::Error::last_os_error()),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    pub(super) fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: as in `u32s`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub(super) fn u64s(&mut self) -> &mut [u64] {
        // SAFETY: as in `u32s`; a page-aligned mapping is aligned for `u64` too.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u64>(), self.len / 8) }
    }

    pub(super) fn u32s(&mut self) -> &mut [u32] {
        // SAFETY: the mapping is page-aligned, `len` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u32>(), self.len / 4) }
    }
}

// SAFETY: the mapping is plain shared memory of this process, valid until `drop`; moving the
// owner to another thread changes nothing about it.
unsafe impl Send for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The bytes of a plain map key or value.
pub(super) fn bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain bytes without padding.
    unsafe { std::slice::from_raw_parts((&raw const *value).cast::<u8>(), size_of::<T>()) }
}
