//! The counters' history for the compliance report: every `interval` the daemon appends the
//! verdict counters by reason (each direction) and the unapproved VPN packets by protocol to
//! `history.jsonl` beside the state file, one line a sample, keeping about a week of them.

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value, json};

use crate::datapath::{Datapath, VerdictCounts};

/// The history file's name, beside the state file.
pub const HISTORY_FILE: &str = "history.jsonl";
/// Samples kept: a week at one a minute. The file is cut back to this when it holds twice as
/// many (so it is rewritten once a week, not at every sample).
const KEEP: usize = 7 * 24 * 60;

pub struct History {
    path: PathBuf,
    lines: usize,
}

fn by_reason(counts: &VerdictCounts) -> Value {
    let mut out = Map::new();
    for (reason, counter) in &counts.enforced {
        if counter.packets > 0 {
            out.insert(reason.label().to_string(), json!(counter.packets));
        }
    }
    for (reason, counter) in &counts.monitored {
        if counter.packets > 0 {
            out.insert(
                format!("{}_would_drop", reason.label()),
                json!(counter.packets),
            );
        }
    }
    Value::Object(out)
}

impl History {
    pub fn new(state_file: &Path) -> Self {
        let path = state_file.with_file_name(HISTORY_FILE);
        let lines = std::fs::read_to_string(&path).map_or(0, |t| t.lines().count());
        Self { path, lines }
    }

    /// Appends one sample of the counters `datapath` holds.
    pub fn sample(&mut self, datapath: &Datapath) {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (Ok(ingress), Ok(vpn)) = (datapath.verdicts(), datapath.vpn_verdicts()) else {
            return;
        };
        let egress = datapath
            .egress_verdicts()
            .map_or(Value::Null, |e| by_reason(&e));
        let unapproved: Map<String, Value> = vpn
            .0
            .iter()
            .filter(|(_, unapproved, _)| unapproved.packets > 0)
            .map(|(p, u, _)| (p.name().to_string(), json!(u.packets)))
            .collect();
        let line = json!({"time": time, "ingress": by_reason(&ingress), "egress": egress,
                          "vpn_unapproved": unapproved});
        let appended = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = appended {
            tracing::warn!(path = %self.path.display(), "cannot append the counters' history: {e}");
            return;
        }
        self.lines += 1;
        if self.lines > 2 * KEEP {
            self.cut();
        }
    }

    /// Keeps the last `KEEP` samples (written aside, then renamed over).
    fn cut(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return;
        };
        let lines: Vec<&str> = text.lines().collect();
        let kept = lines[lines.len().saturating_sub(KEEP)..].join("\n") + "\n";
        let aside = self.path.with_extension("jsonl.new");
        if std::fs::write(&aside, kept)
            .and_then(|()| std::fs::rename(&aside, &self.path))
            .is_ok()
        {
            self.lines = KEEP.min(lines.len());
        }
    }
}
