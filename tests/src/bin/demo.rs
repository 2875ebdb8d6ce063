//! `cargo xtask demo`: a throw-away lab (an e-Office server namespace, an approved ministry-LAN
//! client, an unapproved internet client, a pre-approved device, a denied client), the enforcer on
//! the server's NIC with the embedded example registry, first in monitor mode and then in enforce
//! mode, with live traffic and the counters by reason. Everything is removed at the end.

use std::{io::Write as _, process::Command, sync::atomic::Ordering, time::Duration};

use enforcer_tests::{
    daemon::{Enforcer, enforcer_bin},
    netns::require_root,
    topology::{
        self, DCS_LAPTOP, DENIED, INTERNET, Lab, MINISTRY_LAN, SERVER_IFACE, Services, TCP_PORT,
        UDP_PORT,
    },
};

/// The demo registry, embedded so that the demo needs no file from the user.
const DEMO_REGISTRY: &str = include_str!("../../../examples/demo-registry.json");

fn main() -> anyhow::Result<()> {
    require_root();
    println!("== enforcer demo: an e-Office server behind an XDP allowlist ==\n");
    println!(
        "building the lab: server namespace (eth0, TCP echo on {TCP_PORT}, UDP sink on {UDP_PORT}), 4 clients on one switch"
    );
    let lab = Lab::new(&[MINISTRY_LAN, INTERNET, DCS_LAPTOP, DENIED])?;
    let services = Services::start(&lab.server)?;

    let registry = std::env::temp_dir().join(format!(
        "enforcer-demo-registry-{}.json",
        std::process::id()
    ));
    std::fs::write(&registry, DEMO_REGISTRY)?;
    println!("registry (embedded example, examples/demo-registry.json):");
    println!(
        "  networks ministry-lan 198.51.100.0/24 and ministry-lan-v6 2001:db8:100::/64 (ports 8080/tcp, 5353/udp, icmp)"
    );
    println!(
        "  device dcs-laptop 192.0.2.17 (every port); deny vpn-provider-range 203.0.113.0/24\n"
    );

    for (phase, mode) in [
        (
            "1. rollout: monitor mode (nothing dropped, would-drops counted)",
            "monitor",
        ),
        ("2. enforce mode", "enforce"),
    ] {
        println!("-- phase {phase} --");
        let mut enforcer =
            Enforcer::start(&lab.server, SERVER_IFACE, &registry, &["--mode", mode])?;
        println!(
            "enforcer attached to the server's {SERVER_IFACE} (instance {})",
            enforcer.instance
        );
        println!(
            "{:<28} {:<18} {:<12} {:<12} {:<8} {:<8}",
            "client", "address", "TCP v4", "TCP v6", "ping", "UDP"
        );
        for client in &lab.clients {
            print!("{:<28} {:<18} ", client.label, client.v4.to_string());
            std::io::stdout().flush()?;
            let timeout = Duration::from_millis(800);
            let tcp4 = topology::tcp_exchange(&client.ns, client.server_v4, TCP_PORT, timeout)?;
            let tcp6 = topology::tcp_exchange(&client.ns, client.server_v6, TCP_PORT, timeout)?;
            let pings = topology::ping(&client.ns, client.server_v4, 3)?;
            let before = services.udp_received.load(Ordering::Relaxed);
            topology::udp_send(&client.ns, client.server_v4, UDP_PORT, 5)?;
            std::thread::sleep(Duration::from_millis(150));
            let udp = services.udp_received.load(Ordering::Relaxed) - before;
            let word = |ok: bool| if ok { "delivered" } else { "DROPPED" };
            println!(
                "{:<12} {:<12} {:<8} {:<8}",
                word(tcp4),
                word(tcp6),
                format!("{pings}/3"),
                format!("{udp}/5")
            );
        }
        println!();
        let stats = Command::new(enforcer_bin())
            .args(["stats", "--instance", &enforcer.instance])
            .output()?;
        println!(
            "$ enforcer stats\n{}",
            String::from_utf8_lossy(&stats.stdout)
        );
        enforcer.stop()?;
        println!("enforcer stopped and detached (`enforcer detach`)\n");
    }
    drop(services);
    drop(lab);
    let _ = std::fs::remove_file(&registry);
    println!(
        "lab removed. Run it on a real interface with:\n  sudo enforcer run --iface IFACE --registry examples/registry.json --mode monitor"
    );
    Ok(())
}
