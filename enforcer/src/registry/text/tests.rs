use serde_json::{Value, json};

use crate::{
    registry::{Date, Registry},
    test_rng::Rng,
};
/// The mode and the expiry sweep, spliced, against the document tree edited.
#[test]
fn mode_and_expiry_splices_match_the_document_tree() {
    use crate::registry::Mode;
    let today = Date::parse("2026-11-27").expect("date");
    let dates = [
        "2026-11-26",
        "2026-11-27",
        "2026-11-28",
        "2099-01-01",
        "2020-01-01",
    ];
    for seed in 1..=30u64 {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ seed);
        let mut doc = json!({
            "schema": 1, "mode": "monitor", "serial": seed,
            "networks": [], "devices": [], "vpn_endpoints": [], "deny": [], "upstreams": []
        });
        for i in 0..rng.below(12) {
            let section = rng.pick(&["networks", "devices", "vpn_endpoints", "deny", "upstreams"]);
            let mut entry = match section {
                "networks" => {
                    json!({"name": format!("n{i}"), "cidr": format!("10.{i}.0.0/16")})
                }
                "devices" => {
                    json!({"name": format!("d{i}"), "address": format!("192.0.2.{i}")})
                }
                "vpn_endpoints" => json!({"name": format!("v{i}"), "address": "192.0.2.200",
                    "protocol": "wireguard", "approval": "NITB-1"}),
                "upstreams" => json!({"name": format!("u{i}"), "address": "192.0.2.53",
                    "ports": ["53/udp"]}),
                _ => json!({"cidr": format!("203.0.{i}.0/24")}),
            };
            if rng.below(2) == 0 {
                entry["expires"] = json!(rng.pick(&dates));
            }
            doc[section].as_array_mut().expect("array").push(entry);
        }
        let text = serde_json::to_string_pretty(&doc).expect("JSON");
        let parse = |t: &str| Registry::parse(t).map_err(|p| format!("{p:?}"));

        let mut by_tree = doc.clone();
        by_tree["mode"] = json!("enforce");
        by_tree["serial"] = json!(seed + 1);
        let spliced = super::splice_mode(&text, Mode::Enforce, seed + 1).expect("splices");
        assert_eq!(
            parse(&spliced),
            parse(&serde_json::to_string(&by_tree).expect("JSON")),
            "seed {seed}: mode"
        );

        // The egress mode: its value replaced, or (no field yet) put in after the mode's.
        for egress in [super::EgressMode::Enforce, super::EgressMode::Off] {
            let mut by_tree = doc.clone();
            by_tree["egress"] = json!(egress.as_str());
            by_tree["serial"] = json!(seed + 1);
            let first = super::splice_egress(&text, egress, seed + 1).expect("splices");
            assert_eq!(
                parse(&first),
                parse(&serde_json::to_string(&by_tree).expect("JSON")),
                "seed {seed}: egress {egress}"
            );
            let again = super::splice_egress(&first, egress, seed + 2).expect("splices");
            by_tree["serial"] = json!(seed + 2);
            assert_eq!(
                parse(&again),
                parse(&serde_json::to_string(&by_tree).expect("JSON")),
                "seed {seed}: egress {egress} again"
            );
        }

        let expiry = super::splice_expired(&text, today, seed + 1).expect("splices");
        let past = |e: &Value| {
            e.get("expires")
                .and_then(Value::as_str)
                .and_then(|d| Date::parse(d).ok())
                .is_some_and(|d| d.is_past(today))
        };
        let mut by_tree = doc.clone();
        let mut gone = Vec::new();
        for section in ["networks", "devices", "vpn_endpoints", "deny", "upstreams"] {
            let list = by_tree[section].as_array_mut().expect("array");
            gone.extend(
                list.iter()
                    .filter(|e| past(e))
                    .map(|e| json!({"section": section, "entry": e})),
            );
            list.retain(|e| !past(e));
        }
        by_tree["serial"] = json!(seed + 1);
        let left = parse(&expiry.text).expect("valid");
        assert_eq!(
            Ok(left.clone()),
            parse(&serde_json::to_string(&by_tree).expect("JSON")),
            "seed {seed}: expiry"
        );
        assert_eq!(expiry.gone, gone, "seed {seed}: what expired");
        assert_eq!(
            expiry.next,
            left.next_expiry(),
            "seed {seed}: the next date"
        );
    }
    // A file without a serial gets one after its mode; one without a mode does not splice.
    let no_serial = r#"{"schema": 1, "mode": "enforce", "networks": [{"name": "a", "cidr": "10.0.0.0/8", "expires": "2020-01-01"}]}"#;
    let moded = super::splice_mode(no_serial, Mode::Monitor, 1).expect("splices");
    let parsed = Registry::parse(&moded).expect("valid");
    assert_eq!((parsed.mode, parsed.serial), (Mode::Monitor, 1));
    let expired = super::splice_expired(no_serial, today, 1).expect("splices");
    let parsed = Registry::parse(&expired.text).expect("valid");
    assert_eq!((parsed.networks.len(), parsed.serial), (0, 1));
    assert!(super::splice_mode(r#"{"schema": 1}"#, Mode::Monitor, 1).is_none());
}
