//! Reading public packet captures (pcap and pcapng, any of the link types in the labelled corpus)
//! as Ethernet frames, ready for `BPF_PROG_TEST_RUN`.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::packet::{ETH_P_IPV4, ETH_P_IPV6, ethernet_header};

/// Link types (tcpdump.org/linktypes.html) the corpus uses.
const LINKTYPE_NULL: u32 = 0;
const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LOOP: u32 = 108;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_IPV6: u32 = 229;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// Every packet of a capture as an Ethernet frame (an Ethernet header is put in front of what
/// is not Ethernet). Packets of link types we cannot place are skipped and counted.
///
/// Hand-written on purpose: test corpora contain files that strict readers refuse (captured
/// length above the snapshot length, FCS bits in the link type), and the formats are small.
pub struct Capture {
    pub frames: Vec<Vec<u8>>,
    pub skipped: usize,
}

struct Bytes<'a> {
    data: &'a [u8],
    big_endian: bool,
}

impl Bytes<'_> {
    fn u32(&self, at: usize) -> Option<u32> {
        let b: [u8; 4] = self.data.get(at..at + 4)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
    fn u16(&self, at: usize) -> Option<u16> {
        let b: [u8; 2] = self.data.get(at..at + 2)?.try_into().ok()?;
        Some(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }
}

pub fn read(path: &Path) -> anyhow::Result<Capture> {
    let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut capture = Capture {
        frames: Vec::new(),
        skipped: 0,
    };
    let ok = if data.starts_with(&[0x0A, 0x0D, 0x0D, 0x0A]) {
        read_pcapng(&data, &mut capture)
    } else {
        read_pcap(&data, &mut capture)
    };
    if ok.is_none() && capture.frames.is_empty() {
        bail!("{}: not a pcap or pcapng file we can read", path.display());
    }
    Ok(capture)
}

/// Classic pcap: 24-byte file header, then (16-byte record header, data) records.
fn read_pcap(data: &[u8], capture: &mut Capture) -> Option<()> {
    let magic = data.get(0..4)?;
    let big_endian = match magic {
        [0xD4, 0xC3, 0xB2, 0xA1] | [0x4D, 0x3C, 0xB2, 0xA1] => false,
        [0xA1, 0xB2, 0xC3, 0xD4] | [0xA1, 0xB2, 0x3C, 0x4D] => true,
        _ => return None,
    };
    let bytes = Bytes { data, big_endian };
    // Some writers put FCS flags in the high bits of the link type.
    let link = bytes.u32(20)? & 0x0FFF_FFFF;
    let mut at = 24;
    while at + 16 <= data.len() {
        let captured = bytes.u32(at + 8)? as usize;
        let packet = data.get(at + 16..at + 16 + captured)?;
        push(capture, link, packet);
        at += 16 + captured;
    }
    Some(())
}

/// pcapng: blocks of (type, total length, body, total length); interfaces give link types.
fn read_pcapng(data: &[u8], capture: &mut Capture) -> Option<()> {
    let mut links: Vec<u32> = Vec::new();
    let mut big_endian = false;
    let mut at = 0;
    while at + 12 <= data.len() {
        if data.get(at..at + 4)? == [0x0A, 0x0D, 0x0D, 0x0A] {
            // Section header: its byte-order magic decides the rest of the section.
            big_endian = data.get(at + 8..at + 12)? == [0x1A, 0x2B, 0x3C, 0x4D];
            links.clear();
        }
        let bytes = Bytes { data, big_endian };
        let kind = bytes.u32(at)?;
        let len = bytes.u32(at + 4)? as usize;
        if len < 12 || at + len > data.len() {
            break;
        }
        match kind {
            1 => links.push(u32::from(bytes.u16(at + 8)?)),
            // Enhanced packet: interface, timestamp (8), captured length, original length, data.
            6 => {
                let interface = bytes.u32(at + 8)? as usize;
                let captured = bytes.u32(at + 20)? as usize;
                let packet = data.get(at + 28..at + 28 + captured)?;
                push(
                    capture,
                    links.get(interface).copied().unwrap_or(LINKTYPE_ETHERNET),
                    packet,
                );
            }
            // Simple packet: original length, then data up to the block's end.
            3 => {
                let packet = data.get(at + 12..at + len - 4)?;
                push(
                    capture,
                    links.first().copied().unwrap_or(LINKTYPE_ETHERNET),
                    packet,
                );
            }
            _ => {}
        }
        at += len;
    }
    Some(())
}

fn push(capture: &mut Capture, link: u32, data: &[u8]) {
    match to_ethernet(link, data) {
        Some(frame) => capture.frames.push(frame),
        None => capture.skipped += 1,
    }
}

/// The packet as an Ethernet frame.
fn to_ethernet(link: u32, data: &[u8]) -> Option<Vec<u8>> {
    let with_header = |ether_type: u16, ip: &[u8]| {
        let mut frame = ethernet_header(&[], ether_type);
        frame.extend_from_slice(ip);
        frame
    };
    let by_version = |ip: &[u8]| match ip.first()? >> 4 {
        4 => Some(with_header(ETH_P_IPV4, ip)),
        6 => Some(with_header(ETH_P_IPV6, ip)),
        _ => None,
    };
    match link {
        LINKTYPE_ETHERNET => (data.len() >= 14).then(|| data.to_vec()),
        LINKTYPE_RAW | LINKTYPE_IPV4 | LINKTYPE_IPV6 => by_version(data),
        // BSD loopback: a 4-byte address family, then IP.
        LINKTYPE_NULL | LINKTYPE_LOOP => by_version(data.get(4..)?),
        // Linux cooked capture v1: 16-byte header, protocol in the last 2 bytes.
        LINKTYPE_LINUX_SLL => {
            let ether_type = u16::from_be_bytes([*data.get(14)?, *data.get(15)?]);
            Some(with_header(ether_type, data.get(16..)?))
        }
        // v2: 20-byte header, protocol first.
        LINKTYPE_LINUX_SLL2 => {
            let ether_type = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
            Some(with_header(ether_type, data.get(20..)?))
        }
        _ => None,
    }
}
