//! Same-lab A/B of enforcer builds under the bench's veth flood (a developer tool, not part of
//! the tests or of `cargo xtask bench`). The eBPF object is cut out of each enforcer binary
//! given, loaded with empty maps (enforce mode, nothing listed: the flood's path), and on one
//! veth lab each round attaches bare `XDP_DROP` and each build in turn, in a rotating order.
//! Two labs running one program differ by 2–5 % in rate, two loads of it on one lab by 1–2 %,
//! so builds compared on one lab need fewer rounds to tell 3 % apart.
//!
//! `target/release/examples/floodab ROUNDS ENFORCER_BIN...` (root); prints each build's median
//! rate and its median per-round ratio to bare `XDP_DROP` and to the first build. With
//! `FLOODAB_VPN_FLOWS=1` in the environment, each build's `CONFIG` says that stateful VPN flows
//! are remembered (as after one `OpenVPN` reset from anywhere), with one flow's ends marked in
//! `FLOW_PEERS` where the build has it: the flood's sources are none of them. With
//! `FLOODAB_V6=1`, the flood is the bench's IPv6 one (and its bare `XDP_DROP` is measured on it).
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};
use enforcer_tests::flood::{self, FloodLab};

/// The largest BPF ELF object embedded in an enforcer binary (the enforcer program; the
/// baseline object is smaller).
fn bpf_object(bin: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut best: Option<&[u8]> = None;
    let mut at = 0;
    while let Some(i) = bin[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + i;
        at = start + 4;
        let h = &bin[start..];
        if h.len() < 64 || u16::from_le_bytes([h[18], h[19]]) != 247 {
            continue;
        }
        let shoff = u64::from_le_bytes(h[0x28..0x30].try_into()?) as usize;
        let shentsize = u16::from_le_bytes([h[0x3a], h[0x3b]]) as usize;
        let shnum = u16::from_le_bytes([h[0x3c], h[0x3d]]) as usize;
        let end = shoff + shentsize * shnum;
        if end > h.len() {
            continue;
        }
        if best.is_none_or(|b| b.len() < end) {
            best = Some(&h[..end]);
        }
    }
    Ok(best.context("no BPF object in the binary")?.to_vec())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args[1].parse()?;
    let bins = &args[2..];
    let lab = if std::env::var_os("FLOODAB_V6").is_some() {
        FloodLab::new_v6()?
    } else {
        FloodLab::new()?
    };
    let mut progs: Vec<Ebpf> = Vec::new();
    {
        let mut bare = EbpfLoader::new().load(enforcer::datapath::BASELINE_OBJECT)?;
        let p: &mut Xdp = bare
            .program_mut("baseline_drop")
            .context("baseline_drop")?
            .try_into()?;
        p.load()?;
        progs.push(bare);
    }
    for bin in bins {
        let object = bpf_object(&std::fs::read(bin)?)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("VPN_STAGE", &1u8, true)
            .override_global("FAST_PATH", &1u8, true)
            .load(&object)?;
        let p: &mut Xdp = ebpf
            .program_mut("enforcer")
            .context("no enforcer program")?
            .try_into()?;
        p.load()?;
        if std::env::var_os("FLOODAB_VPN_FLOWS").is_some() {
            let mut config: aya::maps::Array<_, enforcer_common::Config> =
                aya::maps::Array::try_from(ebpf.map_mut("CONFIG").context("CONFIG")?)?;
            let mut c = config.get(&0, 0)?;
            c.vpn_flows_seen = 1;
            config.set(0, c, 0)?;
            if let Some(map) = ebpf.map_mut("FLOW_PEERS") {
                let mut peers: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map)?;
                for addr in [[192, 0, 2, 7], [192, 0, 2, 1]] {
                    peers.set(enforcer_common::peer_slot_v4(addr), 1, 0)?;
                }
            }
        }
        // Events on (a build that has them): every CPU's budget enabled, as `run --events`
        // leaves it between refills; spent after the first events, as under a real flood.
        if std::env::var_os("FLOODAB_EVENTS").is_some()
            && let Some(map) = ebpf.map_mut("EVENT_BUDGET")
        {
            let mut budget: aya::maps::PerCpuArray<_, enforcer_common::EventBudget> =
                aya::maps::PerCpuArray::try_from(map)?;
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            let value = enforcer_common::EventBudget {
                enabled: 1,
                tokens: 100,
            };
            budget.set(0, aya::maps::PerCpuValues::try_from(vec![value; cpus])?, 0)?;
        }
        progs.push(ebpf);
    }
    let name = |i: usize| {
        if i == 0 {
            "bare".to_string()
        } else {
            bins[i - 1].clone()
        }
    };
    let n = progs.len();
    let mut rates = vec![Vec::new(); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (k + round) % n;
            let prog_name = if i == 0 { "baseline_drop" } else { "enforcer" };
            let p: &mut Xdp = progs[i]
                .program_mut(prog_name)
                .context(prog_name)?
                .try_into()?;
            let link = lab.rx.enter(|| p.attach(flood::IFACE, XdpMode::Driver))??;
            let rate = lab.flood(4_000_000, 1)?.mpps();
            p.detach(link)?;
            rates[i].push(rate);
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for i in 0..n {
        let vs_bare: Vec<f64> = rates[i].iter().zip(&rates[0]).map(|(r, b)| r / b).collect();
        let vs_first: Vec<f64> = rates[i]
            .iter()
            .zip(&rates[1.min(n - 1)])
            .map(|(r, b)| r / b)
            .collect();
        println!(
            "{}: {:.2} Mpps, vs bare {:.3}, vs first build {:.3}",
            name(i),
            med(rates[i].clone()),
            med(vs_bare),
            med(vs_first)
        );
    }
    Ok(())
}
