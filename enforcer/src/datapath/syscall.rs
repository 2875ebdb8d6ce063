//! The raw kernel calls aya 0.14 has no API for (batch map updates, a pinned link's interface)
//! and the interface look-ups. Every `unsafe` of the controller is here.

use std::path::Path;

/// The index of `iface` in this network namespace.
pub fn ifindex(iface: &str) -> Option<u32> {
    let c_iface = std::ffi::CString::new(iface).ok()?;
    // SAFETY: c_iface is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
    (index != 0).then_some(index)
}

/// The bpf(2) system call for the commands aya 0.14 has no API for: `attr` is the command's
/// part of `union bpf_attr` (the kernel zero-fills the rest, since the size passed is ours).
/// Returns what the call returns (a new descriptor for some commands).
///
/// # Safety
/// `attr` must be laid out as the start of `union bpf_attr` for `cmd`, and every address in it
/// valid for what the kernel reads or writes during the call.
pub unsafe fn bpf_call<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's promise, above; `attr` lives for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// The interface index a pinned XDP link is attached to: 0 once its interface is gone (the
/// kernel keeps the link but it no longer enforces anything). aya 0.14 does not expose it, so
/// this is `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` on `struct bpf_link_info`, whose union
/// (here `xdp.ifindex`) starts at byte 16.
pub fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::fd::FromRawFd as _;

    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;

    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut get = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET; the path outlives the call.
    let fd = unsafe { bpf_call(BPF_OBJ_GET, &mut get)? };
    // SAFETY: the kernel just returned this descriptor to us; it is closed on drop.
    let fd = unsafe {
        std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).map_err(std::io::Error::other)?)
    };
    let mut info = [0u32; 6];
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(std::io::Error::other)?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).expect("24"),
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD; the kernel writes at
    // most `info_len` bytes into `info`, which outlives the call.
    unsafe { bpf_call(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    if info[0] != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::other(format!(
            "{} is not an XDP link",
            path.display()
        )));
    }
    Ok(info[4])
}

/// Whether `iface` names an interface in this network namespace.
pub fn interface_exists(iface: &str) -> bool {
    let Ok(c_iface) = std::ffi::CString::new(iface) else {
        return false;
    };
    // SAFETY: c_iface is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c_iface.as_ptr()) != 0 }
}

/// `BPF_MAP_UPDATE_BATCH` (Linux 5.6+) into the map behind `fd`: aya 0.14 has no batch API, so
/// the one raw system call of the controller lives here. `keys`/`values` are packed arrays of
/// the map's key and value layout. Takes a descriptor, not the map, so that several maps can be
/// written from several threads.
pub(super) fn update_batch_fd(
    fd: std::os::fd::RawFd,
    keys: &[u8],
    values: &[u8],
    key_size: usize,
    value_size: usize,
) -> std::io::Result<()> {
    /// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const CHUNK: usize = 65_536;

    for (keys, values) in keys
        .chunks(CHUNK * key_size)
        .zip(values.chunks(CHUNK * value_size))
    {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: u32::try_from(keys.len() / key_size).expect("chunk fits u32"),
            map_fd: u32::try_from(fd)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` prefix; the kernel reads `count` keys and
        // values from the two slices, which outlive the call.
        unsafe { bpf_call(BPF_MAP_UPDATE_BATCH, &mut attr)? };
    }
    Ok(())
}
