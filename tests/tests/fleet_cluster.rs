//! A fleet as the advisory needs it: a three-member etcd cluster (Debian's etcd, TLS, client
//! certificates, authentication on) and several agents, each an enforcer on its own namespace
//! and veth, checked with real connections. Changes written through the CLI reach every
//! agent's kernel (the time is measured); a transaction reaches each kernel whole; a member
//! killed during a stream of changes loses none; with every member down the agents keep
//! enforcing (a restarted one from its cache) and catch up when they return; an agent cut off
//! while its revision was compacted reads the registry whole.
//!
//! `ENFORCER_FLEET_AGENTS` sets the number of agents (default 5; `cargo xtask bench fleet`
//! runs 20).

use std::time::Duration;

use enforcer_tests::{
    etcd::text,
    fleet::{CLIENTS, FleetLab, MINISTRY, percentile, restart_from_cache},
    netns::require_root,
};

const REGISTRY: &str = r#"{"schema": 1, "mode": "enforce", "egress": "off",
  "networks": [{"name": "base", "cidr": "2001:db8:ffff::/48", "ministry": "MoITT"}]}"#;

fn agents() -> usize {
    std::env::var("ENFORCER_FLEET_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5)
}

/// The revision of the etcd transaction `etcdctl txn` (as the ministry) runs with `ops`.
fn txn(lab: &FleetLab, ops: &str) -> i64 {
    let out = lab
        .etcd
        .etcdctl_input(MINISTRY, &["txn", "-w", "json"], &format!("\n{ops}\n\n\n"))
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(text(&out).trim())
        .unwrap_or_else(|e| panic!("etcdctl txn: {e}: {}", text(&out)));
    assert_eq!(answer["succeeded"], true, "{answer}");
    answer["header"]["revision"].as_i64().unwrap()
}

#[test]
fn a_three_member_cluster_keeps_every_agent_in_step() {
    require_root();
    let n = agents();
    let mut lab = FleetLab::new(3, n, REGISTRY, &[]).unwrap();
    for i in 0..n {
        lab.start_agent(i).unwrap();
    }
    let sample = [0, n - 1];
    for &i in &sample {
        assert!(
            !lab.connects(i),
            "agent {i}: the clients are not approved yet"
        );
    }

    // Changes through the CLI, each timed from its audit record to each agent's kernel.
    let latencies = lab.propagation(10).unwrap();
    let (p50, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    eprintln!(
        "propagation to {n} agents over 10 changes: p50 {p50} ms, p99 {p99} ms, max {} ms",
        latencies.iter().max().unwrap()
    );
    assert!(p99 < 1000, "propagation p99 {p99} ms (target: under 1 s)");

    let (revision, _) = lab
        .change(&[
            "allow",
            "add",
            CLIENTS,
            "--name",
            "clients",
            "--ministry",
            "MoITT",
            "--ports",
            "8080/tcp",
        ])
        .unwrap();
    lab.all_applied(revision, Duration::from_secs(10)).unwrap();
    for &i in &sample {
        assert!(lab.connects(i), "agent {i}: the clients are approved now");
    }

    // Transactions that rename the clients' network (remove one key, add another with the same
    // prefix): applied whole, the clients never lose their way in; applied half, they would.
    let key = |j: usize| {
        let name = if j == 0 {
            "clients".to_string()
        } else {
            format!("clients-{j}")
        };
        (
            format!("/enforcer/v1/registry/ministries/MoITT/networks/{name}"),
            format!(r#"{{"name":"{name}","cidr":"{CLIENTS}","ports":["8080/tcp"]}}"#),
        )
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let probes = std::thread::scope(|scope| {
        let (lab, stop) = (&lab, &stop);
        let probe = scope.spawn(move || {
            let mut results = Vec::new();
            // Bounded: the renames take a few seconds; at most 400 probes.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && results.len() < 400 {
                results.push(lab.connects(0));
            }
            results
        });
        let mut last = 0;
        for j in 0..6 {
            let (old, _) = key(j);
            let (new, value) = key(j + 1);
            last = txn(lab, &format!("del {old}\nput {new} {value}"));
            std::thread::sleep(Duration::from_millis(300));
        }
        lab.all_applied(last, Duration::from_secs(10)).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        probe.join().unwrap()
    });
    let failed = probes.iter().filter(|ok| !**ok).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during the renames",
        probes.len()
    );
    eprintln!(
        "{} connections during 6 renaming transactions, none failed",
        probes.len()
    );

    // A member killed during a stream of changes: none is lost, the agents keep following.
    let mut last = 0;
    for k in 0..8 {
        if k == 3 {
            lab.etcd.stop_member(1);
        }
        (last, _) = lab
            .change(&[
                "allow",
                "add",
                &format!("2001:db8:e:{k:x}::/64"),
                "--name",
                &format!("stream-{k}"),
                "--ministry",
                "MoITT",
            ])
            .unwrap();
    }
    lab.all_applied(last, Duration::from_secs(20)).unwrap();
    let expected = 1 + 10 + 1 + 8;
    for (host, status) in lab.statuses().unwrap() {
        assert_eq!(status["networks"], expected, "{host}: {status}");
    }
    lab.etcd.resume().unwrap();

    // Every member down: the agents keep enforcing; one restarted meanwhile starts from its
    // cache.
    lab.etcd.stop();
    std::thread::sleep(Duration::from_secs(1));
    for &i in &sample {
        assert!(lab.connects(i), "agent {i} enforces without etcd");
    }
    let agent = &mut lab.agents[0];
    let mut options = lab.etcd.options("enforcer-agent-eoffice-0").unwrap();
    options.extend(["--host".to_string(), agent.host.clone()]);
    let enforcer = agent.enforcer.as_mut().unwrap();
    restart_from_cache(enforcer, &agent.ns, &agent.cache, &options).unwrap();
    assert!(lab.connects(0), "the restarted agent enforces its cache");
    // Back: every agent catches up.
    lab.etcd.resume().unwrap();
    let (revision, _) = lab
        .change(&[
            "allow",
            "add",
            "2001:db8:d::/64",
            "--name",
            "after-outage",
            "--ministry",
            "MoITT",
        ])
        .unwrap();
    lab.all_applied(revision, Duration::from_secs(30)).unwrap();

    // An agent cut off while its revision is compacted away reads the registry whole.
    lab.agents[1]
        .ns
        .exec(&["ip", "link", "set", "mgmt0", "down"])
        .unwrap();
    // Until the agent has noticed (its keep-alive pings go unanswered).
    let agent_log = |lab: &FleetLab| lab.agents[1].enforcer.as_ref().unwrap().log_text();
    let before = agent_log(&lab).matches("fleet: etcd").count();
    let cut = std::time::Instant::now();
    while agent_log(&lab).matches("fleet: etcd").count() == before {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "the agent never noticed the cut"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("a cut-off agent noticed after {:?}", cut.elapsed());
    let mut last = 0;
    for k in 0..3 {
        (last, _) = lab
            .change(&[
                "allow",
                "add",
                &format!("2001:db8:c:{k:x}::/64"),
                "--name",
                &format!("while-cut-{k}"),
                "--ministry",
                "MoITT",
            ])
            .unwrap();
    }
    let out = lab
        .etcd
        .etcdctl("root", &["compact", &last.to_string()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    lab.agents[1]
        .ns
        .exec(&["ip", "link", "set", "mgmt0", "up"])
        .unwrap();
    lab.all_applied(last, Duration::from_secs(40)).unwrap();
    let log = lab.agents[1].enforcer.as_ref().unwrap().log_text();
    assert!(log.contains("compacted"), "{log}");
}

#[test]
fn a_large_registry_reaches_a_fresh_agent() {
    require_root();
    let entries: usize = std::env::var("ENFORCER_FLEET_ENTRIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let large = enforcer_tests::fleet::large(entries).unwrap();
    eprintln!("{large:?}");
}
