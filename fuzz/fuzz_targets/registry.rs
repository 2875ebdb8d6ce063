//! Registry text, as `validate`, `run` and a live reload read it: any bytes either parse into a
//! registry that compiles into a policy, or are refused with located problems. Never a panic,
//! and a problem always names a place in the text.
#![no_main]

use enforcer::{policy::Policy, registry::Date, registry::Registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Registry::parse(text) {
        Ok(registry) => {
            // Compiling may refuse (capacity, lengths), but never panic.
            let _ = Policy::compile(&registry, Date::parse("2026-12-06").expect("a date"));
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "a refused registry names a problem");
            for problem in &problems {
                assert!(!problem.to_string().is_empty(), "a problem says what it is");
            }
        }
    }
});
