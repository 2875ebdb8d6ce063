//! A bounded veth flood for the benchmark: 60-byte UDP frames from 65,536 sources in
//! 198.18.0.0/15 (RFC 2544's benchmarking range, which no benchmark registry lists) sent from one
//! namespace to another as fast as one CPU can, for a fixed time.
//!
//! Where the work lands: the sender is pinned to one CPU and writes frames with `sendmmsg` on a
//! raw packet socket that bypasses the qdisc. A veth delivers in the sender's context: the
//! receiving side's XDP program (or, without one, the stack with its nftables/iptables hooks)
//! runs in a softirq on that same CPU. So the drop rate is the rate of the whole pipeline on one
//! core, and the receiver's share is the softirq time per packet (from /proc/stat), which is the
//! figure that tells one filter from another.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, veth};

/// The receiver's address; the sender's frames go to it.
pub const RECEIVER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
/// The interface name on both sides.
pub const IFACE: &str = "eth0";
/// Where the flood's sources come from (and what registries must leave out).
pub const SOURCES: &str = "198.18.0.0/15";

const FRAMES: usize = 65_536;
const BATCH: usize = 512;

/// Two namespaces joined by a veth pair; removed on drop.
pub struct FloodLab {
    pub tx: Netns,
    pub rx: Netns,
    rx_mac: [u8; 6],
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
    pub fn new() -> anyhow::Result<Self> {
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
        Ok(Self { tx, rx, rx_mac })
    }

    /// The frames: Ethernet to the receiver's MAC, IPv4 from 198.18.x.y to `RECEIVER`, UDP to
    /// port 9 (discard), 18 bytes of payload: 60 bytes on the wire before the FCS.
    fn frames(&self) -> Vec<[u8; 60]> {
        (0..FRAMES)
            .map(|i| {
                let mut f = [0u8; 60];
                f[..6].copy_from_slice(&self.rx_mac);
                f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
                f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let ip = &mut f[14..34];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&46u16.to_be_bytes());
                ip[8] = 64;
                ip[9] = 17;
                let src = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) | (i as u32 * 2 + 1);
                ip[12..16].copy_from_slice(&src.to_be_bytes());
                ip[16..20].copy_from_slice(&RECEIVER.octets());
                let checksum = crate::packet::internet_checksum(ip);
                ip[10..12].copy_from_slice(&checksum.to_be_bytes());
                f[34..36].copy_from_slice(&(1024 + (i % 50_000) as u16).to_be_bytes());
                f[36..38].copy_from_slice(&9u16.to_be_bytes());
                f[38..40].copy_from_slice(&26u16.to_be_bytes());
                f
            })
            .collect()
    }

    /// Floods for `duration` from the sender namespace, pinned to `cpu`.
    pub fn flood(&self, duration: Duration, cpu: usize) -> anyhow::Result<Sample> {
        let frames = self.frames();
        let before = softirq_ns()?;
        let (sent, seconds) = self
            .tx
            .enter(|| send(&frames, duration, cpu))?
            .context("flood sender")?;
        let softirq = softirq_ns()? - before;
        Ok(Sample {
            sent,
            seconds,
            softirq_ns: softirq / sent.max(1) as f64,
        })
    }
}

/// Sends `frames` round-robin on `IFACE` of the current namespace until `duration` has passed.
fn send(frames: &[[u8; 60]], duration: Duration, cpu: usize) -> anyhow::Result<(u64, f64)> {
    // SAFETY: plain system calls on values we own; each result is checked.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let name = std::ffi::CString::new(IFACE)?;
        let ifindex = libc::if_nametoindex(name.as_ptr());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        if libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            bail!("bind to {IFACE}: {}", std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = std::mem::zeroed();
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut at = 0usize;
        // Bounded by time; checked once per batch.
        while started.elapsed() < duration {
            let n = libc::sendmmsg(fd.as_raw_fd(), messages[at..].as_mut_ptr(), BATCH as u32, 0);
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS)
                    || e.kind() == std::io::ErrorKind::WouldBlock
                {
                    continue;
                }
                bail!("sendmmsg: {e}");
            }
            sent += n as u64;
            at = (at + BATCH) % (messages.len() - BATCH + 1);
        }
        Ok((sent, started.elapsed().as_secs_f64()))
    }
}
