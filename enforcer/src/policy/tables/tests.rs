use super::*;

/// The straightforward reference: every prefix that covers the address, longest wins.
fn reference(entries: &[(IpNet, u32)], addr: std::net::IpAddr) -> Option<u32> {
    entries
        .iter()
        .filter(|(p, _)| p.contains(&addr))
        .max_by_key(|(p, _)| p.prefix_len())
        .map(|(_, r)| *r)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A random registry's entries, clustered in a few /8s (so prefixes nest and overlap). In
/// odd rounds every IPv6 /16 lists its few lengths over /32 itself; in even rounds the /16s
/// hold too many and each /32 has a node.
fn random_entries(rng: &mut Rng, round: usize) -> Vec<(IpNet, u32)> {
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    let count = 1 + rng.next() % 400;
    while entries.len() < usize::try_from(count).unwrap() {
        let net = random_prefix(rng, round);
        if seen.insert(net) {
            let rule = u32::try_from(entries.len()).unwrap();
            entries.push((net, rule));
        }
    }
    entries
}

fn random_prefix(rng: &mut Rng, round: usize) -> IpNet {
    if rng.next().is_multiple_of(2) {
        let addr =
            (0xC6u32 << 24 | (rng.next() as u32 & 0x0003_FFFF) << 6) ^ (rng.next() as u32 & 0x3F);
        let len =
            [0, 8, 12, 15, 16, 17, 20, 23, 24, 25, 26, 28, 30, 31, 32][(rng.next() % 15) as usize];
        IpNet::V4(ipnet::Ipv4Net::new(addr.into(), len).unwrap().trunc())
    } else if round % 4 == 2 {
        // Every length from /17 to /128 under one /16 (2001::/16) and its /32s: far more than
        // a list holds, so these regions are expanded.
        let addr = (0x2001u128 << 112)
            | u128::from(rng.next() % 3) << 96
            | u128::from(rng.next()) << 32
            | u128::from(rng.next() as u32);
        let len = if rng.next().is_multiple_of(3) {
            17 + (rng.next() % 16) as u8
        } else {
            33 + (rng.next() % 96) as u8
        };
        IpNet::V6(ipnet::Ipv6Net::new(addr.into(), len).unwrap().trunc())
    } else {
        // Two /16s, four /32s in each.
        let addr = (0x2001_0db8u128 << 96)
            | u128::from(rng.next() % 2) << 113
            | u128::from(rng.next() as u16) << 80
            | u128::from(rng.next() % 4) << 110
            | u128::from(rng.next() % 8);
        let len = if round % 2 == 1 {
            [0, 8, 16, 17, 24, 31, 32, 48, 128][(rng.next() % 9) as usize]
        } else {
            [0, 8, 16, 17, 24, 31, 32, 33, 40, 48, 56, 64, 65, 96, 128][(rng.next() % 15) as usize]
        };
        IpNet::V6(ipnet::Ipv6Net::new(addr.into(), len).unwrap().trunc())
    }
}

/// Addresses near the entries must get the reference's answer.
#[test]
fn tables_agree_with_the_reference_on_random_registries() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for round in 0..20 {
        let entries = random_entries(&mut rng, round);
        let count = entries.len() as u64;
        let (v4, v6) = build(&entries).unwrap();
        if round % 2 == 1 {
            assert!(
                v6.nodes.is_empty(),
                "round {round}: {} nodes",
                v6.nodes.len()
            );
        }
        for _ in 0..2000 {
            // Addresses near the entries: an entry's network with some low bits flipped.
            let (base, _) = entries[(rng.next() % count) as usize];
            let addr = match base {
                IpNet::V4(n) => {
                    let a = u32::from(n.network()) ^ (rng.next() as u32 >> (rng.next() % 32));
                    let got = v4.lookup(a);
                    assert_eq!(
                        got,
                        reference(&entries, std::net::Ipv4Addr::from(a).into()),
                        "round {round}: {}",
                        std::net::Ipv4Addr::from(a)
                    );
                    continue;
                }
                IpNet::V6(n) => {
                    u128::from(n.network()) ^ (u128::from(rng.next()) >> (rng.next() % 64))
                }
            };
            assert_eq!(
                v6.lookup(addr),
                reference(&entries, std::net::Ipv6Addr::from(addr).into()),
                "round {round}: {}",
                std::net::Ipv6Addr::from(addr)
            );
        }
    }
}

/// A hash's entries whose key `keep` accepts, in key order.
fn inside<K: Copy + Ord, V: Copy>(map: &FastMap<K, V>, keep: impl Fn(&K) -> bool) -> Vec<(K, V)> {
    let mut kept: Vec<(K, V)> = map
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    kept.sort_unstable_by_key(|(k, _)| *k);
    kept
}

/// Tables built from only the entries overlapping some /16s (what an in-place change
/// rebuilds) are, inside those /16s, exactly the tables of all entries.
#[test]
fn tables_of_the_entries_overlapping_some_slash_16s_match_the_whole_inside_them() {
    let mut rng = Rng(0x005E_ED0F_2E61_0115);
    let (mut checked, mut refused) = (0, 0);
    for round in 0..40 {
        let entries = random_entries(&mut rng, round);
        let changed: Vec<IpNet> = (0..1 + rng.next() % 3)
            .map(|_| {
                if rng.next().is_multiple_of(2) {
                    entries[(rng.next() % entries.len() as u64) as usize].0
                } else {
                    random_prefix(&mut rng, round)
                }
            })
            .collect();
        let Some(regions) = Regions::of(&changed) else {
            assert!(
                changed.iter().any(|p| p.prefix_len() < 4),
                "round {round}: {changed:?} refused"
            );
            refused += 1;
            continue;
        };
        let Ok((v4, v6)) = build(&entries) else {
            continue;
        };
        let part: Vec<(IpNet, u32)> = entries
            .iter()
            .filter(|(p, _)| regions.overlaps(p))
            .copied()
            .collect();
        let (pv4, pv6) = build(&part).expect("a part has no more lengths than the whole");
        for &slot in regions.v4_slots() {
            let at = usize::from(slot);
            assert_eq!(
                (v4.root[at], v4.blocks.get(&slot)),
                (pv4.root[at], pv4.blocks.get(&slot)),
                "round {round}: IPv4 /16 {slot:#x}"
            );
        }
        for &slot in regions.v6_slots() {
            assert_eq!(v6.dir[usize::from(slot)], pv6.dir[usize::from(slot)]);
        }
        let (in_v4, in_v6) = (
            |a: u32| regions.has_v4((a >> 16) as u16),
            |a: u128| regions.has_v6((a >> 112) as u16),
        );
        let long_v4 = |t: &V4Tables| inside(&t.long, |(a, _)| in_v4(*a));
        assert_eq!(long_v4(&v4), long_v4(&pv4), "round {round}");
        assert_eq!(pv4.long.len(), long_v4(&pv4).len(), "only inside");
        let long_v6 = |t: &V6Tables| inside(&t.long, |(a, _)| in_v6(*a));
        assert_eq!(long_v6(&v6), long_v6(&pv6), "round {round}");
        let nodes = |t: &V6Tables| inside(&t.nodes, |top| in_v6(u128::from(*top) << 96));
        assert_eq!(nodes(&v6), nodes(&pv6), "round {round}");
        checked += 1;
    }
    assert!(
        checked >= 30 && refused >= 1,
        "{checked} checked, {refused} refused"
    );
}

#[test]
fn regions_name_the_slash_16s_a_prefix_overlaps() {
    let p = |s: &str| s.parse::<IpNet>().unwrap();
    let regions = Regions::of(&[p("10.1.2.0/24"), p("192.168.0.0/15"), p("2001:db8::/32")])
        .expect("three /16s");
    assert_eq!(regions.v4_slots(), [0x0A01, 0xC0A8, 0xC0A9]);
    assert_eq!(regions.v6_slots(), [0x2001]);
    assert!(
        regions.overlaps(&p("10.0.0.0/8")),
        "a wider prefix covering one"
    );
    assert!(regions.overlaps(&p("10.1.200.7/32")));
    assert!(!regions.overlaps(&p("10.2.0.0/16")));
    assert!(regions.overlaps(&p("192.169.3.0/24")));
    assert!(!regions.overlaps(&p("192.170.0.0/16")));
    assert!(regions.overlaps(&p("2000::/7")));
    assert!(!regions.overlaps(&p("2002::/16")));
    assert!(regions.overlaps(&p("::/0")));
    assert!(
        Regions::of(&[p("0.0.0.0/3")]).is_none(),
        "over 4,096 /16s: the whole"
    );
    assert!(Regions::of(&[p("0.0.0.0/4")]).is_some());
}

/// Nine lengths in one /32 and sixteen in one /16: more than a list probes, so
/// the regions are expanded; every address near a boundary gets the longest prefix's rule.
#[test]
fn more_lengths_than_a_list_probes_are_expanded_exactly() {
    let mut entries: Vec<(IpNet, u32)> = (0..9u32)
        .map(|i| (format!("2001:db8::/{}", 40 + i * 8).parse().unwrap(), i))
        .collect();
    entries.extend((17..=32u32).map(|len| {
        let net = ipnet::Ipv6Net::new("2001:0dff:ffff::".parse().unwrap(), len as u8).unwrap();
        (IpNet::V6(net.trunc()), 100 + len)
    }));
    let (_, v6) = build(&entries).expect("expanded, not refused");
    for list in v6
        .dir
        .iter()
        .map(|d| d.lengths)
        .chain(v6.nodes.values().map(|n| n.lengths))
    {
        assert!(list.iter().filter(|l| **l != 0).count() <= MAX_V6_LENGTHS);
    }
    let mut rng = Rng(0x00C0_FFEE_0021);
    for (net, _) in &entries {
        let IpNet::V6(net) = net else { unreachable!() };
        for _ in 0..200 {
            // The prefix's first and last address, and addresses around its boundary bits.
            let base = u128::from(net.network());
            let flip = u128::from(rng.next()) << 64 | u128::from(rng.next());
            let addr = base
                ^ (flip >> (u32::from(net.prefix_len()) + (rng.next() % 3) as u32 - 1).min(127));
            assert_eq!(
                v6.lookup(addr),
                reference(&entries, std::net::Ipv6Addr::from(addr).into()),
                "{}",
                std::net::Ipv6Addr::from(addr)
            );
        }
    }
}

/// An expansion that cannot fit the kernel's table is refused, naming the region and the entry
/// that grows most.
#[test]
fn an_expansion_past_the_table_is_refused_with_the_entry_named() {
    // 96 lengths in one /32, 40 prefixes each: eight targets need about 1.3 million keys.
    let mut prefixes: Vec<(IpNet, String)> = Vec::new();
    for len in 33..=128u8 {
        for i in 0..40u128 {
            let addr = (0x2001_0db8u128 << 96) | (i << (128 - u32::from(len)));
            let net = ipnet::Ipv6Net::new(addr.into(), len).unwrap().trunc();
            prefixes.push((IpNet::V6(net), format!("feed.txt:{}", prefixes.len() + 1)));
        }
    }
    let error = check(|| prefixes.iter().map(|(p, n)| (p, n.as_str()))).unwrap_err();
    assert_eq!(error.region.to_string(), "2001:db8::/32");
    assert!(error.entries > u128::from(MAX_RULES), "{error}");
    assert!(error.name.starts_with("feed.txt:"), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("inside 2001:db8::/32, feed.txt:"),
        "{message}"
    );
    // The same lengths with one prefix each fit.
    let few: Vec<(IpNet, String)> = prefixes.iter().step_by(40).cloned().collect();
    assert!(check(|| few.iter().map(|(p, n)| (p, n.as_str()))).is_ok());
}

#[test]
fn longer_prefixes_win_at_every_level() {
    let p = |s: &str| s.parse::<IpNet>().unwrap();
    let entries = vec![
        (p("10.0.0.0/8"), 1),
        (p("10.1.0.0/16"), 2),
        (p("10.1.2.0/24"), 3),
        (p("10.1.2.128/25"), 4),
        (p("10.1.2.130/32"), 5),
        (p("2001:db8::/32"), 6),
        (p("2001:db8:1::/48"), 7),
        (p("2001:db8:1::1/128"), 8),
        (p("2000::/3"), 9),
    ];
    let (v4, v6) = build(&entries).unwrap();
    let a4 = |s: &str| u32::from(s.parse::<std::net::Ipv4Addr>().unwrap());
    let a6 = |s: &str| u128::from(s.parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(v4.lookup(a4("10.9.9.9")), Some(1));
    assert_eq!(v4.lookup(a4("10.1.9.9")), Some(2));
    assert_eq!(v4.lookup(a4("10.1.2.1")), Some(3));
    assert_eq!(v4.lookup(a4("10.1.2.131")), Some(4));
    assert_eq!(v4.lookup(a4("10.1.2.130")), Some(5));
    assert_eq!(v4.lookup(a4("11.0.0.1")), None);
    assert_eq!(v4.block_count(), 1);
    assert_eq!(v6.lookup(a6("2001:db8:2::1")), Some(6));
    assert_eq!(v6.lookup(a6("2001:db8:1::2")), Some(7));
    assert_eq!(v6.lookup(a6("2001:db8:1::1")), Some(8));
    assert_eq!(v6.lookup(a6("2a00::1")), Some(9));
    assert_eq!(v6.lookup(a6("fe80::1")), None);
}
