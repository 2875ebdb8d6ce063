//! xdp-filter (Debian's `xdp-tools`) as a benchmark peer: an exact-address allowlist in a
//! per-CPU hash. It keeps its state in one pin directory for the whole host, so one instance
//! at a time: loaded on a veth in a namespace of our own, filled through its pinned map, timed
//! with `BPF_PROG_TEST_RUN` on the attached program, and unloaded.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    process::Command,
};

use anyhow::{Context as _, bail};
use aya::maps::{Map, MapData, PerCpuHashMap, PerCpuValues};

use crate::netns::{Netns, veth};

/// Where xdp-filter pins its IPv4 address map.
const FILTER_IPV4: &str = "/sys/fs/bpf/xdp-filter/filter_ipv4";
/// xdp-filter's flag for "match the source address".
const MAP_FLAG_SRC: u64 = 1;

/// xdp-filter loaded in deny-by-default mode (listed sources pass) on a veth of its own.
pub struct XdpFilter {
    ns: Netns,
    program_id: u32,
}

fn run_in(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    // Network namespace only: xdp-filter needs the host's bpffs.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl XdpFilter {
    /// Whether xdp-filter is installed.
    pub fn available() -> bool {
        // Spawning succeeds only if the binary exists (its usage text exits non-zero).
        Command::new("xdp-filter").arg("help").output().is_ok()
    }

    /// Loads xdp-filter with `sources` (IPv4, network order) as its allowlist.
    pub fn load(sources: &[[u8; 4]]) -> anyhow::Result<Self> {
        let ns = Netns::new("xf")?;
        let peer = Netns::new("xfp")?;
        veth(&ns, "eth0", &peer, "eth0")?;
        run_in(
            &ns,
            &[
                "xdp-filter",
                "load",
                "eth0",
                "-m",
                "native",
                "-p",
                "deny",
                "-f",
                "ipv4",
            ],
        )?;
        let links: serde_json::Value =
            serde_json::from_str(&run_in(&ns, &["ip", "-j", "link", "show", "eth0"])?)?;
        let program_id = links[0]["xdp"]["prog"]["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .context("xdp-filter attached no program")?;
        let filter = Self { ns, program_id };
        let data = MapData::from_pin(FILTER_IPV4)?;
        let capacity = data.info()?.max_entries() as usize;
        if sources.len() > capacity {
            bail!("its address map holds {capacity} entries");
        }
        let mut map = Map::PerCpuHashMap(data);
        let mut addresses: PerCpuHashMap<&mut MapData, u32, u64> =
            PerCpuHashMap::try_from(&mut map)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for src in sources {
            let values = PerCpuValues::try_from(vec![MAP_FLAG_SRC; cpus])?;
            addresses.insert(u32::from_ne_bytes(*src), values, 0)?;
        }
        drop(peer);
        Ok(filter)
    }

    /// One test run of `repeat` repeats of `frame` through the attached program: mean ns.
    pub fn time(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, u64)> {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == self.program_id)
            .context("xdp-filter's program is gone")?;
        let fd = info.fd()?;
        /// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to `duration`.
        #[repr(C)]
        #[derive(Default)]
        struct TestAttr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
        }
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        let mut attr = TestAttr {
            prog_fd: u32::try_from(fd.as_fd().as_raw_fd())?,
            data_size_in: u32::try_from(frame.len())?,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestAttr::default()
        };
        // SAFETY: a valid `bpf_attr.test` prefix; the kernel reads `frame` during the call.
        unsafe { enforcer::datapath::bpf_call(BPF_PROG_TEST_RUN, &mut attr) }
            .context("BPF_PROG_TEST_RUN")?;
        Ok((attr.retval, u64::from(attr.duration)))
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = run_in(&self.ns, &["xdp-filter", "unload", "--all"]);
        // libxdp's (empty) working directory; left alone if anything else is in it.
        let _ = std::fs::remove_dir("/sys/fs/bpf/xdp");
    }
}
