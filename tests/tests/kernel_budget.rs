//! The verifier's budget: the program, as the enforcer loads it, verifies within a fixed number
//! of instructions. The kernel walks every path of a program, up to a million instructions;
//! a change that makes the verifier walk more (a constant carried through a branch, an inlined
//! call) shows here before it shows as a slow start or a refused program. A change that needs
//! more for a reason raises the budget here, saying why.

use enforcer_tests::kernel::Loaded;

/// The instructions the verifier may walk for the whole program (a 10-network registry): about
/// 66,000 for the ingress policy; the reply check of connection state, which every packet that
/// would drop may take (as a global function its stack and the caller's would exceed the
/// kernel's 512 bytes together); and the fast path running on while VPN flows are remembered
/// (for packets from other peers than the flows'), which the verifier walks for both states of
/// the flag; and the event offer at the one exit (a drop, a VPN packet or an allowed TCP SYN,
/// each with the budget spent or not; the UDP access flows are a global function of their
/// own): 118,689 measured on 2026-12-06, from 113,953 before events; and the IPv6 lookup's
/// filter check before each of its 16 hash probes (8 lengths of a /32 node, 8 of a /16 slot;
/// the probe loops take their lengths as one number to stay within the stack): 129,661 on
/// 2026-12-06, from 116,886.
const BUDGET: u32 = 130_000;

#[test]
fn the_program_verifies_within_its_instruction_budget() {
    let networks: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"name": "n{i}", "cidr": "10.{i}.0.0/16"}}"#))
        .collect();
    let registry = format!(
        r#"{{"schema": 1, "mode": "enforce", "networks": [{}]}}"#,
        networks.join(", ")
    );
    let loaded = Loaded::new(&registry);
    let info = loaded
        .datapath
        .program()
        .info()
        .expect("the kernel describes the loaded program");
    let verified = info
        .verified_instruction_count()
        .expect("the kernel reports the verified instruction count (Linux 5.16 or later)");
    println!("verified instructions: {verified} (budget {BUDGET})");
    assert!(
        verified <= BUDGET,
        "the program verified in {verified} instructions, over its budget of {BUDGET}"
    );
}
