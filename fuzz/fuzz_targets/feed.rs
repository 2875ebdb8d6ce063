//! A deny feed file (one CIDR or address a line, comments): any bytes give entries and located
//! problems, never a panic; no more problem lines are quoted than the parser promises.
#![no_main]

use enforcer::registry::parse_feed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (entries, problems) = parse_feed("fuzz.txt", &text);
    let lines = text.lines().count();
    assert!(entries.len() <= lines, "one entry a line at most");
    for problem in &problems {
        assert!(!problem.to_string().is_empty());
    }
});
