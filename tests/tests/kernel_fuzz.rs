//! The differential fuzzer: generated frames through the real XDP program
//! (`BPF_PROG_TEST_RUN`) and through the userspace reference (`enforcer_tests::reference`), on
//! several generated registries, failing on any difference in verdict, reason, rule credited or
//! VPN protocol counted. The frames are well formed (IPv4 and IPv6, VLAN and `QinQ` tags, IPv4
//! options, IPv6 extension headers, fragments, VPN-shaped payloads, flows that follow a reset),
//! then some are mutated at a header boundary, truncated or replaced by random bytes.
//!
//! `ENFORCER_FUZZ_PACKETS` sets the number of frames (default 100,000, split over the
//! registries), `ENFORCER_FUZZ_SEED` the seed. A difference prints the seed, the registry and
//! the frame in hex, which `ENFORCER_FUZZ_SEED` replays.

use enforcer::registry::Mode;
use enforcer_common::{Action, Reason, VpnProtocol};
use enforcer_tests::{
    generate::{FEED_FILE, Frames, Generated},
    kernel::{Loaded, XDP_DROP, XDP_PASS},
    reference::Reference,
    rng::Rng,
    vpn::TempDir,
};

const REGISTRIES: u64 = 5;

#[test]
fn the_kernel_agrees_with_the_reference_on_generated_frames() {
    let packets: u64 = std::env::var("ENFORCER_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("ENFORCER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x00e1_f0ce_2026);
    let started = std::time::Instant::now();
    let mut total = 0;
    let mut reasons = std::collections::BTreeSet::new();
    for round in 0..REGISTRIES {
        let mut rng = Rng(seed ^ (round + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let registry = Generated::new(&mut rng, round);
        let text = registry.text();
        let feed = registry.feed_text();
        let dir = TempDir::new("enf-fuzz").expect("a temporary folder");
        std::fs::write(dir.0.join(FEED_FILE), &feed).expect("the feed written");
        let mut loaded = Loaded::with_feeds(&text, &dir.0);
        // One registry in monitor mode: the same reasons, counted as would-drops.
        let monitor = round == REGISTRIES - 1;
        if monitor {
            loaded.set_mode(Mode::Monitor);
        }
        let mut reference = Reference::new(&loaded.policy);
        let mut generator = Frames::new(&registry);
        let count = packets / REGISTRIES;
        for i in 0..count {
            let frame = generator.next(&mut rng);
            let expected = reference.decide(&frame);
            reasons.insert(expected.reason as u32);
            let seen = Observed::run(&loaded, &frame);
            let want_action = if expected.reason.action() == Action::Drop && !monitor {
                XDP_DROP
            } else {
                XDP_PASS
            };
            let agree = seen.action == want_action
                && seen.reason == Some(expected.reason)
                && seen.monitored == (monitor && expected.reason.action() == Action::Drop)
                && seen.rule == expected.rule
                && seen.vpn == expected.vpn;
            assert!(
                agree,
                "the kernel and the reference disagree on frame {i} of registry {round} \
                 (ENFORCER_FUZZ_SEED={seed}):\n  reference: {expected:?} (action {want_action})\n  \
                 kernel:    {seen:?}\n  frame: {}\n  registry: {text}\n  {FEED_FILE}: {feed}",
                hex(&frame)
            );
        }
        total += count;
        // What the run covered, so a generator that stopped producing a kind is noticed.
        let covered = generator.coverage(&reference_reasons(&loaded));
        println!("registry {round}: {count} frames; reasons seen: {covered}");
    }
    println!(
        "{total} frames, 0 differences, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        total >= packets - REGISTRIES,
        "ran {total} of {packets} frames"
    );
    // Every reason an incoming packet can get (but a reply, which needs the server's own
    // connections) came up: a generator that stopped reaching one would test nothing there.
    if packets >= 10_000 {
        let missing: Vec<&str> = Reason::ALL
            .into_iter()
            .filter(|r| {
                !matches!(
                    r,
                    Reason::EstablishedReply | Reason::EgressDenied | Reason::Upstream
                )
            })
            .filter(|r| !reasons.contains(&(*r as u32)))
            .map(Reason::label)
            .collect();
        assert!(missing.is_empty(), "no generated frame got {missing:?}");
    }
}

/// Every reason the kernel counted on this registry (enforced or would-drop), with its count.
fn reference_reasons(loaded: &Loaded) -> Vec<(Reason, u64)> {
    let counts = loaded.counts();
    Reason::ALL
        .into_iter()
        .map(|r| (r, counts.packets(r) + counts.would_drop(r)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// What the kernel did with one frame: its action and the counters that moved.
#[derive(Debug)]
struct Observed {
    action: u32,
    reason: Option<Reason>,
    monitored: bool,
    rule: Option<u32>,
    vpn: Option<VpnProtocol>,
}

impl Observed {
    fn run(loaded: &Loaded, frame: &[u8]) -> Self {
        let (before, hits_before, vpn_before) = (
            loaded.counts(),
            loaded.hits(),
            loaded.datapath.vpn_verdicts().unwrap(),
        );
        let action = loaded.run(frame);
        let (after, hits_after, vpn_after) = (
            loaded.counts(),
            loaded.hits(),
            loaded.datapath.vpn_verdicts().unwrap(),
        );
        let mut reason = None;
        let mut monitored = false;
        for r in Reason::ALL {
            if after.packets(r) != before.packets(r) {
                reason = Some(r);
            }
            if after.would_drop(r) != before.would_drop(r) {
                reason = Some(r);
                monitored = true;
            }
        }
        let rule = (0..hits_after.len())
            .find(|&i| hits_after[i] != hits_before[i])
            .map(|i| loaded.policy.rules[i].index);
        let vpn = VpnProtocol::ALL.into_iter().find(|&p| {
            vpn_after.unapproved(p) != vpn_before.unapproved(p)
                || vpn_after.approved(p) != vpn_before.approved(p)
        });
        Self {
            action,
            reason,
            monitored,
            rule,
            vpn,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
