//! The control socket's requests: any line is either refused as JSON, or decoded into a request
//! whose registry edit (add, remove, mode) gives a text that the registry parser then reads
//! again, as the daemon does before anything is put in force. Never a panic.
#![no_main]

use enforcer::{
    control::{Envelope, Request},
    registry::{Registry, text},
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const REGISTRY: &str = r#"{
  "schema": 1,
  "mode": "monitor",
  "networks": [
    {"name": "lan", "cidr": "198.51.100.0/24", "ports": ["443/tcp"]},
    {"name": "lan6", "cidr": "2001:db8:100::/64"}
  ],
  "devices": [{"name": "dcs", "address": "192.0.2.17"}],
  "vpn_endpoints": [
    {"name": "gw", "address": "192.0.2.7", "protocol": "wireguard", "port": 51820, "approval": "NITB-1"}
  ],
  "deny": [{"cidr": "203.0.113.0/24"}],
  "upstreams": [{"name": "dns", "address": "192.0.2.53", "ports": ["53/udp"]}]
}
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(data) else {
        return;
    };
    let entries = |text: &str, section: &str| -> usize {
        let doc: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("an edit gave text that is not JSON ({e}):\n{text}"));
        doc.get(section)
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    };
    match envelope.request {
        Request::Add { section, entry } => {
            let Ok(section) = text::section_name(&section) else {
                return;
            };
            if let Ok(edited) = text::with_entry(REGISTRY, section, &entry, 2) {
                // The in-place splice and the whole-tree edit must both add exactly one entry.
                assert_eq!(
                    entries(&edited, section),
                    entries(REGISTRY, section) + 1,
                    "{edited}"
                );
                let _ = Registry::parse(&edited);
            }
        }
        Request::Remove { section, target } => {
            let Ok(section) = text::section_name(&section) else {
                return;
            };
            if let Ok(edited) = text::without_entry(REGISTRY, section, &target, 2) {
                assert!(
                    entries(&edited, section) < entries(REGISTRY, section),
                    "{edited}"
                );
                let _ = Registry::parse(&edited);
            }
        }
        Request::Mode { mode } => {
            if let Ok(edited) = text::with_mode(REGISTRY, mode, 2) {
                Registry::parse(&edited).expect("a mode change keeps the registry valid");
            }
        }
        _ => {}
    }
});
