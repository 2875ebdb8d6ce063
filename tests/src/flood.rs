//! A bounded veth flood for the benchmark: 60-byte UDP frames from 16,384 sources in
//! 198.18.0.0/15 (RFC 2544's benchmarking range, which no benchmark registry lists) sent from one
//! namespace to another, for a fixed number of frames per flood.
//!
//! The frames are made in the kernel, not by a userspace socket (which spends a microsecond a
//! frame and would hide every filter's cost): the sender runs the `flood_gen` XDP program with
//! `BPF_PROG_TEST_RUN` in live-frames mode, which gives each frame its source and redirects it
//! out of the sender's veth; the veth hands it to the receiver's side as an XDP frame, where the
//! receiver's XDP program (or, behind a pass-through XDP program, the stack with its
//! nftables/iptables hooks) handles it. The sender is pinned to one CPU and the receiver's work
//! runs there too, in softirq: the drop rate is the rate of the whole pipeline on one core, and
//! the receiver's share is the softirq time per frame (from /proc/stat).

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::Instant,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};

use crate::netns::{Netns, veth};

/// The receiver's address; the sender's frames go to it.
pub const RECEIVER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
/// The interface name on both sides.
pub const IFACE: &str = "eth0";
/// Where the flood's sources come from (and what registries must leave out).
pub const SOURCES: &str = "198.18.0.0/15";
/// Where the IPv6 flood's sources come from: 16,384 /64s of this /48, in the /16 of the bench
/// registries' approved IPv6 network (so that the lookup probes that network's length for each
/// frame, as an attacker's addresses next to an approved range would make it).
pub const SOURCES_V6: &str = "2001:db8:ff00::/48";
/// The IPv6 flood's destination.
pub const RECEIVER_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// Two namespaces joined by a veth pair (removed on drop), and the frame generator.
pub struct FloodLab {
    pub tx: Netns,
    pub rx: Netns,
    rx_mac: [u8; 6],
    generator: Ebpf,
    /// The frames are IPv6 (from `SOURCES_V6`), not IPv4.
    pub v6: bool,
}

/// One flood's outcome.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub sent: u64,
    pub seconds: f64,
    /// Softirq CPU time (all CPUs) per frame sent, in ns.
    pub softirq_ns: f64,
}

impl Sample {
    pub fn mpps(&self) -> f64 {
        self.sent as f64 / self.seconds / 1e6
    }
}

/// Softirq time of all CPUs since boot, in ns (from /proc/stat's `USER_HZ` ticks).
fn softirq_ns() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    // cpu user nice system idle iowait irq softirq ...
    let ticks: f64 = line
        .split_whitespace()
        .nth(7)
        .context("no softirq column in /proc/stat")?
        .parse()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1e9 / hz)
}

impl FloodLab {
    /// A lab whose flood is IPv4, from `SOURCES`.
    pub fn new() -> anyhow::Result<Self> {
        Self::of(false)
    }

    /// A lab whose flood is IPv6, from `SOURCES_V6`.
    pub fn new_v6() -> anyhow::Result<Self> {
        Self::of(true)
    }

    fn of(v6: bool) -> anyhow::Result<Self> {
        let tx = Netns::new("fl-tx")?;
        let rx = Netns::new("fl-rx")?;
        veth(&tx, IFACE, &rx, IFACE)?;
        rx.exec(&["ip", "addr", "add", "192.0.2.1/24", "dev", IFACE])?;
        tx.exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", IFACE])?;
        let mac = rx.exec(&["cat", &format!("/sys/class/net/{IFACE}/address")])?;
        let text = String::from_utf8(mac.stdout)?;
        let mut rx_mac = [0u8; 6];
        for (byte, hex) in rx_mac.iter_mut().zip(text.trim().split(':')) {
            *byte = u8::from_str_radix(hex, 16)?;
        }
        let ifindex: u32 = tx.enter(|| {
            let name = std::ffi::CString::new(IFACE).expect("no NUL");
            // SAFETY: a valid C string.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })?;
        anyhow::ensure!(ifindex != 0, "no {IFACE} in the sender namespace");
        let flood_v6 = u8::from(v6);
        let mut generator = EbpfLoader::new()
            .override_global("FLOOD_IFINDEX", &ifindex, true)
            .override_global("FLOOD_V6", &flood_v6, true)
            .load(enforcer::datapath::BASELINE_OBJECT)?;
        let program: &mut Xdp = generator
            .program_mut("flood_gen")
            .context("flood_gen missing from the baseline object")?
            .try_into()?;
        program.load()?;
        Ok(Self {
            tx,
            rx,
            rx_mac,
            generator,
            v6,
        })
    }

    /// The IPv6 template: Ethernet to the receiver's MAC, IPv6 from `SOURCES_V6` (the generator
    /// sets the fourth group) to `RECEIVER_V6`, UDP to port 9 with 10 bytes of payload: 72
    /// bytes on the wire before the FCS (the IPv4 frame's 18 bytes of payload, less the 20 more
    /// an IPv6 header takes, would leave none; 10 keep a payload).
    fn template_v6(&self) -> Vec<u8> {
        let mut f = vec![0u8; 72];
        f[..6].copy_from_slice(&self.rx_mac);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f[12..14].copy_from_slice(&0x86DDu16.to_be_bytes());
        let ip = &mut f[14..54];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&18u16.to_be_bytes());
        ip[6] = 17;
        ip[7] = 64;
        let source: ipnet::Ipv6Net = SOURCES_V6.parse().expect("a prefix");
        ip[8..24].copy_from_slice(&source.network().octets());
        ip[23] = 2;
        ip[24..40].copy_from_slice(&RECEIVER_V6.octets());
        f[54..56].copy_from_slice(&4096u16.to_be_bytes());
        f[56..58].copy_from_slice(&9u16.to_be_bytes());
        f[58..60].copy_from_slice(&18u16.to_be_bytes());
        f
    }

    /// The template frame: Ethernet to the receiver's MAC, IPv4 from 198.18.0.0 (the
    /// generator sets the low 16 bits) to `RECEIVER`, UDP to port 9 (discard), 18 bytes of
    /// payload: 60 bytes on the wire before the FCS.
    fn template(&self) -> [u8; 60] {
        let mut f = [0u8; 60];
        f[..6].copy_from_slice(&self.rx_mac);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&46u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[198, 18, 0, 0]);
        ip[16..20].copy_from_slice(&RECEIVER.octets());
        let checksum = crate::packet::internet_checksum(ip);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        f[34..36].copy_from_slice(&4096u16.to_be_bytes());
        f[36..38].copy_from_slice(&9u16.to_be_bytes());
        f[38..40].copy_from_slice(&26u16.to_be_bytes());
        f
    }

    /// Sends `frames` frames from the sender namespace, generated on `cpu`.
    pub fn flood(&self, frames: u32, cpu: usize) -> anyhow::Result<Sample> {
        let template = if self.v6 {
            self.template_v6()
        } else {
            self.template().to_vec()
        };
        let before = softirq_ns()?;
        let dropped_before = self.dropped()?;
        let seconds = self
            .tx
            .enter(|| -> anyhow::Result<f64> {
                // SAFETY: pins this thread (a plain system call on a zeroed, then filled set).
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
                }
                let program: &Xdp = self
                    .generator
                    .program("flood_gen")
                    .context("flood_gen")?
                    .try_into()?;
                let started = Instant::now();
                let mut left = frames;
                // Bounded: `frames` in chunks of at most a million.
                while left > 0 {
                    let chunk = left.min(1_000_000);
                    let opts = TestRunOptions {
                        data_in: Some(&template),
                        repeat: chunk,
                        attrs: TestRunAttrs::new().xdp_live_frames(64),
                        ..TestRunOptions::new()
                    };
                    program.test_run(opts).context("live-frames test run")?;
                    left -= chunk;
                }
                Ok(started.elapsed().as_secs_f64())
            })?
            .context("flood sender")?;
        let softirq = softirq_ns()? - before;
        let lost = self.dropped()? - dropped_before;
        let delivered = u64::from(frames).saturating_sub(lost);
        Ok(Sample {
            sent: delivered,
            seconds,
            softirq_ns: softirq / delivered.max(1) as f64,
        })
    }

    /// Frames the veth pair dropped (a full ring), both sides.
    fn dropped(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for (ns, counter) in [(&self.tx, "tx_dropped"), (&self.rx, "rx_dropped")] {
            let out = ns.exec(&[
                "cat",
                &format!("/sys/class/net/{IFACE}/statistics/{counter}"),
            ])?;
            total += String::from_utf8(out.stdout)?.trim().parse::<u64>()?;
        }
        Ok(total)
    }
}

/// Keeps the kernel's per-program run-time statistics on while it lives (`BPF_ENABLE_STATS`:
/// off again when the descriptor closes, so nothing is left changed).
pub fn enable_program_stats() -> anyhow::Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    #[repr(C)]
    struct EnableStats {
        kind: u32, // BPF_STATS_RUN_TIME = 0
    }
    let mut attr = EnableStats { kind: 0 };
    // SAFETY: a valid `bpf_attr.enable_stats`.
    let fd = unsafe { enforcer::datapath::bpf_call(BPF_ENABLE_STATS, &mut attr) }
        .context("BPF_ENABLE_STATS")?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) })
}

impl FloodLab {
    /// The id of the XDP program attached to the receiver's interface, if any.
    fn xdp_program_id(&self) -> anyhow::Result<Option<u32>> {
        let out = self.rx.exec(&["ip", "-j", "link", "show", IFACE])?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(links[0]["xdp"]["prog"]["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok()))
    }

    /// Floods `frames` and returns the receiver's XDP program run time per run (needs
    /// `enable_program_stats`), or `None` without a program.
    pub fn program_ns(&self, frames: u32, cpu: usize) -> anyhow::Result<Option<f64>> {
        let Some(id) = self.xdp_program_id()? else {
            return Ok(None);
        };
        let read = || {
            aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .map(|p| (p.run_time().as_nanos() as f64, p.run_count() as f64))
                .context("the receiver's program is gone")
        };
        let (time_before, count_before) = read()?;
        self.flood(frames, cpu)?;
        let (time_after, count_after) = read()?;
        Ok(Some(
            (time_after - time_before) / (count_after - count_before).max(1.0),
        ))
    }
}
