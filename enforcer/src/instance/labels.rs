//! The rule labels `stats` shows beside the hit counters: `rules.json` beside the state file,
//! and the journal of in-place changes made since it was written.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{InstanceError, InstanceId, State, io_error, write_temporary};

/// A rule as `stats` names it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleLabel {
    pub index: u32,
    pub kind: String,
    pub name: String,
    pub prefix: String,
    /// The entry's ministry, where it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ministry: Option<String>,
}

/// One rule's label, as `rule_labels` writes it: the rule of `policy` with this number.
pub fn rule_label(policy: &crate::policy::Policy, rule: &crate::policy::CompiledRule) -> RuleLabel {
    RuleLabel {
        index: rule.index,
        kind: rule.kind.as_str().to_string(),
        name: rule.name.to_string(),
        prefix: rule.prefix.to_string(),
        ministry: policy
            .extra(rule.index)
            .and_then(|e| e.ministry.as_deref())
            .map(str::to_string),
    }
}

/// Rule labels for `stats`, from a compiled policy: written straight into the output, one at a
/// time, without a `String` per label (a million labels are tens of MiB).
pub fn rule_labels(policy: &crate::policy::Policy) -> impl Serialize + '_ {
    /// `RuleLabel`'s fields, borrowed from the rule.
    #[derive(Serialize)]
    struct Label<'a> {
        index: u32,
        kind: &'a str,
        name: &'a str,
        #[serde(serialize_with = "serialize_display")]
        prefix: &'a ipnet::IpNet,
        #[serde(skip_serializing_if = "Option::is_none")]
        ministry: Option<&'a str>,
    }
    fn serialize_display<S: serde::Serializer>(
        value: &&ipnet::IpNet,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }
    /// The labels as a JSON array, made one at a time while it is written.
    struct Labels<'a>(&'a crate::policy::Policy);
    impl Serialize for Labels<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            // The extras are sorted by rule number, as the rules are: walked beside them.
            let mut extras = self.0.extras.iter().peekable();
            serializer.collect_seq(self.0.rules.iter().map(|r| Label {
                index: r.index,
                kind: r.kind.as_str(),
                name: &r.name,
                prefix: &r.prefix,
                ministry: {
                    while extras.next_if(|(index, _)| *index < r.index).is_some() {}
                    extras
                        .peek()
                        .filter(|(index, _)| *index == r.index)
                        .and_then(|(_, e)| e.ministry.as_deref())
                },
            }))
        }
    }
    Labels(policy)
}

/// The file beside `state.json` that holds the rule labels.
const RULES_FILE: &str = "rules.json";
/// Beside it: the in-place changes made since it was written, one JSON line each.
const RULES_JOURNAL: &str = "rules.journal";
/// Past this size the journal is folded into a new `rules.json` (some 40,000 changes).
const JOURNAL_MAX: u64 = 4 << 20;

/// A line of `RULES_JOURNAL`: the rule numbered `gone` is gone, or `label` is added, to the
/// `rules.json` whose inode is `base` (a line for an earlier file is stale, and skipped).
#[derive(Serialize, Deserialize)]
struct JournalLine {
    base: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gone: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<RuleLabel>,
}

impl State {
    /// Replaces the rule labels beside the state file: `rules.json`, kept apart because a
    /// million labels would make every read of the state (each start, each CLI call) parse
    /// tens of MiB.
    pub fn write_rules(id: &InstanceId, labels: &impl Serialize) -> Result<(), InstanceError> {
        Self::prepare_rules(id, labels)?.commit()
    }

    /// Writes the rule labels aside (a temporary file beside `rules.json`), for `commit` to put
    /// in place once the policy they describe is. Streamed from `labels` (no copy of them is
    /// kept); not synced: they are derived data, written anew by every start and change, and a
    /// live change should not wait for a second disk flush.
    pub fn prepare_rules(
        id: &InstanceId,
        labels: &impl Serialize,
    ) -> Result<PreparedRules, InstanceError> {
        let path = id.state_file().with_file_name(RULES_FILE);
        let dir = path.parent().expect("state file has a parent");
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let tmp = path.with_extension("json.tmp");
        write_temporary(&tmp, false, |out| {
            serde_json::to_writer(out, labels).map_err(std::io::Error::from)
        })?;
        Ok(PreparedRules {
            tmp: Some(tmp),
            path,
        })
    }

    /// Records an in-place change of the rules (the numbers of those gone, the labels of
    /// those added) in the journal beside the state file's `rules.json`, instead of writing a million labels
    /// anew (half a second). `Ok(false)`: no `rules.json` to add to, or the journal is full;
    /// write the labels whole instead (`write_rules`, which empties the journal).
    pub fn journal_rules(
        state_file: &Path,
        gone: &[u32],
        added: &[RuleLabel],
    ) -> Result<bool, InstanceError> {
        let path = state_file.with_file_name(RULES_FILE);
        let journal = path.with_file_name(RULES_JOURNAL);
        let Ok(base) = fs::metadata(&path).map(|m| m.ino()) else {
            return Ok(false);
        };
        if fs::metadata(&journal).is_ok_and(|m| m.len() > JOURNAL_MAX) {
            return Ok(false);
        }
        let mut lines = Vec::new();
        let lines_of = gone
            .iter()
            .map(|&index| JournalLine {
                base,
                gone: Some(index),
                label: None,
            })
            .chain(added.iter().map(|label| JournalLine {
                base,
                gone: None,
                label: Some(label.clone()),
            }));
        for line in lines_of {
            serde_json::to_writer(&mut lines, &line)
                .map_err(std::io::Error::from)
                .map_err(io_error(&journal))?;
            lines.push(b'\n');
        }
        // One write of a few hundred bytes, appended: a reader sees whole lines or none of
        // this change's (and skips a last line that does not parse).
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .and_then(|mut file| file.write_all(&lines))
            .map_err(io_error(&journal))?;
        Ok(true)
    }

    /// The rule labels written beside the state file at `path` (none if absent): `rules.json`
    /// with the journal's changes made since it was written.
    pub fn read_rules(path: &Path) -> Vec<RuleLabel> {
        let file = path.with_file_name(RULES_FILE);
        let journal = path.with_file_name(RULES_JOURNAL);
        let mut labels: Vec<RuleLabel> = Vec::new();
        // Bounded: `rules.json` is replaced between the two reads only by a whole-registry
        // change (then the journal's lines name the file before it, and are read again).
        for _ in 0..3 {
            let Ok(opened) = fs::File::open(&file) else {
                return Vec::new();
            };
            let Ok(base) = opened.metadata().map(|m| m.ino()) else {
                return Vec::new();
            };
            labels = serde_json::from_reader(std::io::BufReader::new(opened)).unwrap_or_default();
            let changes: Vec<JournalLine> = fs::read_to_string(&journal)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| serde_json::from_str::<JournalLine>(line).ok())
                .filter(|line| line.base == base)
                .collect();
            if !changes.is_empty() {
                let mut by_index: std::collections::BTreeMap<u32, RuleLabel> =
                    labels.into_iter().map(|l| (l.index, l)).collect();
                for change in changes {
                    if let Some(index) = change.gone {
                        by_index.remove(&index);
                    }
                    if let Some(label) = change.label {
                        by_index.insert(label.index, label);
                    }
                }
                labels = by_index.into_values().collect();
            }
            if fs::metadata(&file).is_ok_and(|m| m.ino() == base) {
                break;
            }
        }
        labels
    }
}

/// Rule labels written aside by `State::prepare_rules`: `commit` puts them in place; dropped
/// uncommitted, the temporary file is removed.
pub struct PreparedRules {
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl PreparedRules {
    /// Puts the labels in place, and empties the journal of changes to the ones before.
    pub fn commit(mut self) -> Result<(), InstanceError> {
        let tmp = self.tmp.take().expect("committed once");
        fs::rename(&tmp, &self.path).map_err(io_error(&self.path))?;
        // Its lines name the file just replaced: stale from now on, whenever they go.
        let _ = fs::remove_file(self.path.with_file_name(RULES_JOURNAL));
        Ok(())
    }
}

impl Drop for PreparedRules {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(index: u32, name: &str) -> RuleLabel {
        RuleLabel {
            index,
            kind: "network".into(),
            name: name.into(),
            prefix: format!("192.0.2.{index}/32"),
            ministry: None,
        }
    }

    /// In-place changes read back through the journal; lines for an earlier `rules.json` and a
    /// torn last line are skipped; a full journal asks for the labels whole.
    #[test]
    fn the_journal_of_label_changes_is_read_on_top_of_its_own_rules_json() {
        let dir = std::env::temp_dir().join(format!("enforcer-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state.json");
        let rules = dir.join(RULES_FILE);
        let journal = dir.join(RULES_JOURNAL);
        let write_rules = |labels: &[RuleLabel]| {
            let tmp = dir.join("rules.json.tmp");
            fs::write(&tmp, serde_json::to_vec(labels).unwrap()).unwrap();
            fs::rename(&tmp, &rules).unwrap();
        };
        write_rules(&[label(0, "a"), label(1, "b"), label(2, "c")]);
        assert!(State::journal_rules(&state, &[1], &[label(3, "d")]).unwrap());
        assert!(State::journal_rules(&state, &[3], &[label(1, "e")]).unwrap());
        assert_eq!(
            State::read_rules(&state),
            [label(0, "a"), label(1, "e"), label(2, "c")],
            "a number removed and another given to a new rule"
        );
        // A torn last line (a write seen half done) is skipped.
        fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap()
            .write_all(br#"{"base": 1, "gone"#)
            .unwrap();
        assert_eq!(State::read_rules(&state).len(), 3);
        // A new rules.json (a whole-registry change): the old lines name the file before it.
        write_rules(&[label(0, "x")]);
        assert_eq!(State::read_rules(&state), [label(0, "x")]);
        // Full: the caller writes the labels whole.
        fs::write(&journal, vec![b'\n'; JOURNAL_MAX as usize + 1]).unwrap();
        assert!(!State::journal_rules(&state, &[0], &[]).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
