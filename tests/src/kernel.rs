//! Running crafted frames through the real compiled XDP program with `BPF_PROG_TEST_RUN`, and
//! reading which counter each one moved.

use aya::programs::{TestRun as _, TestRunOptions};
use enforcer::{
    datapath::{Datapath, Stages, VerdictCounts},
    policy::Policy,
    registry::{Date, EgressMode, Mode, Registry},
};
use enforcer_common::{Action, Reason};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The program loaded with a policy, ready for test runs.
pub struct Loaded {
    pub datapath: Datapath,
    pub policy: Policy,
}

impl Loaded {
    /// Loads the program and fills its maps from registry text (entries in force on 2026-11-27).
    pub fn new(registry: &str) -> Self {
        Self::with_stages(registry, Stages::ALL)
    }

    /// The same, with the VPN stage switched off at load time (benchmark baseline).
    pub fn without_vpn_stage(registry: &str) -> Self {
        Self::with_stages(
            registry,
            Stages {
                vpn: false,
                ..Stages::ALL
            },
        )
    }

    /// The same, with the fast path switched off: every packet takes the full path.
    pub fn without_fast_path(registry: &str) -> Self {
        Self::with_stages(
            registry,
            Stages {
                fast_path: false,
                ..Stages::ALL
            },
        )
    }

    /// The same for registry text whose deny feeds lie under `dir`.
    pub fn with_feeds(registry: &str, dir: &std::path::Path) -> Self {
        crate::netns::require_root();
        let registry = Registry::parse_at(registry, dir)
            .unwrap_or_else(|p| panic!("test registry invalid: {p:#?}"));
        Self::of(&registry, Stages::ALL)
    }

    fn with_stages(registry: &str, stages: Stages) -> Self {
        crate::netns::require_root();
        let registry =
            Registry::parse(registry).unwrap_or_else(|p| panic!("test registry invalid: {p:#?}"));
        Self::of(&registry, stages)
    }

    fn of(registry: &Registry, stages: Stages) -> Self {
        let policy = Policy::compile(registry, Date::parse("2026-11-27").unwrap())
            .expect("test policy compiles");
        let datapath = Datapath::load_filled(&policy, stages)
            .expect("the XDP program loads (verifier accepts it) and its maps fill");
        Self { datapath, policy }
    }

    /// Replaces the whole policy with registry text, as a reload does (a live diff).
    pub fn replace(&mut self, registry: &str) {
        let registry =
            Registry::parse(registry).unwrap_or_else(|p| panic!("test registry invalid: {p:#?}"));
        let policy = Policy::compile_after(
            &registry,
            Date::parse("2026-11-27").unwrap(),
            Some(&self.policy),
        )
        .expect("test policy compiles");
        self.datapath
            .apply(&self.policy, &policy)
            .expect("the maps take the new policy");
        self.policy = policy;
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.datapath.set_mode(mode).expect("set mode");
    }

    /// Runs one frame; returns the XDP action.
    pub fn run(&self, frame: &[u8]) -> u32 {
        self.try_run(frame).expect("BPF_PROG_TEST_RUN")
    }

    /// Runs one frame; the kernel refuses frames larger than a page less its head and tail room.
    pub fn try_run(&self, frame: &[u8]) -> Result<u32, aya::programs::ProgramError> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        Ok(self.datapath.program().test_run(opts)?.return_value)
    }

    /// Runs one outgoing frame through the egress program; returns its TC action.
    pub fn run_egress(&self, frame: &[u8]) -> i32 {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        let result = self
            .datapath
            .egress_program()
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN of the egress program");
        result.return_value.cast_signed()
    }

    /// Runs one outgoing frame `repeat` times through the egress program; the mean ns per run.
    pub fn time_egress(&self, frame: &[u8], repeat: u32) -> u64 {
        time_of(self.datapath.egress_program(), frame, repeat)
    }

    /// Runs one frame `repeat` times in the kernel; returns the mean ns per run.
    pub fn time(&self, frame: &[u8], repeat: u32) -> u64 {
        time_of(self.datapath.program(), frame, repeat)
    }

    pub fn counts(&self) -> VerdictCounts {
        self.datapath.verdicts().expect("read verdict counters")
    }

    /// The egress program's verdict counters.
    pub fn egress_counts(&self) -> VerdictCounts {
        self.datapath
            .egress_verdicts()
            .expect("read egress verdict counters")
    }

    /// The egress program's hits, in the order of the policy's rules.
    pub fn egress_hits(&self) -> Vec<u64> {
        let indices: Vec<u32> = self.policy.rules.iter().map(|r| r.index).collect();
        self.datapath
            .egress_rule_hits(&indices)
            .expect("read egress rule hits")
    }

    pub fn set_egress(&mut self, egress: EgressMode) {
        self.datapath.set_egress(egress).expect("set egress mode");
        self.policy.egress = egress;
    }

    pub fn hits(&self) -> Vec<u64> {
        let indices: Vec<u32> = self.policy.rules.iter().map(|r| r.index).collect();
        self.datapath.rule_hits(&indices).expect("read rule hits")
    }

    fn rule_index(&self, name: &str) -> usize {
        self.policy
            .rules
            .iter()
            .position(|r| &*r.name == name)
            .unwrap_or_else(|| panic!("no rule named {name} in the test registry"))
    }
}

/// One row of a table: a frame and what the program must do with it.
pub struct Case {
    pub what: &'static str,
    pub frame: Vec<u8>,
    pub reason: Reason,
    /// The rule that must be credited, by name (`None`: no rule).
    pub rule: Option<&'static str>,
}

pub fn case(
    what: &'static str,
    frame: Vec<u8>,
    reason: Reason,
    rule: Option<&'static str>,
) -> Case {
    Case {
        what,
        frame,
        reason,
        rule,
    }
}

/// Runs `frame` `repeat` times through `program` in the kernel; the mean ns per run.
pub fn time_of<P>(program: &P, frame: &[u8], repeat: u32) -> u64
where
    P: for<'a> aya::programs::TestRun<
            Opts<'a> = TestRunOptions<'a>,
            Result = aya::programs::TestRunResult,
        >,
{
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs every case and checks the action, the one counter slot that moved (enforced, or
/// would-drop in monitor mode) and the rule credited. Panics listing every failed row.
pub fn check_table(loaded: &Loaded, monitor: bool, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let before = loaded.counts();
        let hits_before = loaded.hits();
        let action = loaded.run(&case.frame);
        let after = loaded.counts();
        let hits_after = loaded.hits();

        let drop = case.reason.action() == Action::Drop;
        let expected_action = if drop && !monitor { XDP_DROP } else { XDP_PASS };
        let mut problems = Vec::new();
        if action != expected_action {
            problems.push(format!(
                "action {action}, expected {expected_action} (1 drop, 2 pass)"
            ));
        }
        for reason in Reason::ALL {
            let enforced = after.packets(reason) - before.packets(reason);
            let monitored = after.would_drop(reason) - before.would_drop(reason);
            let want_monitored = u64::from(reason == case.reason && drop && monitor);
            let want_enforced = u64::from(reason == case.reason) - want_monitored;
            if enforced != want_enforced || monitored != want_monitored {
                problems.push(format!(
                    "counter {}: +{enforced} enforced/+{monitored} would-drop, expected +{want_enforced}/+{want_monitored}",
                    reason.label()
                ));
            }
        }
        let credited: Vec<usize> = (0..hits_after.len())
            .filter(|&i| hits_after[i] != hits_before[i])
            .collect();
        let want: Vec<usize> = case
            .rule
            .map(|name| loaded.rule_index(name))
            .into_iter()
            .collect();
        if credited != want {
            let names: Vec<&str> = credited
                .iter()
                .map(|&i| &*loaded.policy.rules[i].name)
                .collect();
            problems.push(format!(
                "rules credited {names:?}, expected {:?}",
                case.rule
            ));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} (expected {}): {}",
                case.what,
                case.reason.label(),
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}
