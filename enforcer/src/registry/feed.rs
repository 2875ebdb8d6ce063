//! Deny feeds: plain files of address ranges named by the registry's `deny_files`, in the format
//! of public VPN-provider and threat lists: one CIDR (or address) a line, `#` or `;` comments.

use std::path::Path;

use ipnet::IpNet;

use super::Problem;

/// One range of a feed, with its line for error messages and stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEntry {
    pub line: usize,
    pub cidr: IpNet,
}

/// A feed as named in the registry, and its ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feed {
    pub path: String,
    pub entries: Vec<FeedEntry>,
}

/// Bad lines reported per feed; the rest are counted.
const MAX_FEED_PROBLEMS: usize = 20;
/// A file whose first content lines are all bad is not taken for a feed, and none of its lines
/// is quoted: a registry pointed at a file that is not a feed (`/etc/shadow`, say) must not
/// print it.
const FEED_PROBE_LINES: usize = 3;

/// Parses a feed's text; every bad line is a problem naming `display` and its line.
pub fn parse(display: &str, text: &str) -> (Vec<FeedEntry>, Vec<Problem>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let mut bad = 0;
    let mut content_lines = 0;
    let problem = |line: usize, column: usize, message: String| Problem {
        file: Some(display.to_string()),
        line,
        column,
        place: "deny feed".to_string(),
        message,
    };
    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw_line.split(['#', ';']).next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        content_lines += 1;
        match super::value::prefix(content) {
            Ok(cidr) => entries.push(FeedEntry { line, cidr }),
            Err(message) => {
                bad += 1;
                if content_lines == FEED_PROBE_LINES && entries.is_empty() {
                    return (
                        Vec::new(),
                        vec![problem(
                            1,
                            1,
                            format!(
                                "not a deny feed: its first {FEED_PROBE_LINES} lines are not addresses or CIDRs (its lines are not shown)"
                            ),
                        )],
                    );
                }
                if problems.len() < MAX_FEED_PROBLEMS {
                    let column = 1 + raw_line.len() - raw_line.trim_start().len();
                    problems.push(problem(line, column, message));
                }
            }
        }
    }
    if bad > problems.len() {
        problems.push(problem(
            1,
            1,
            format!("{} more bad lines not listed", bad - problems.len()),
        ));
    }
    (entries, problems)
}

/// Reads every feed named by the registry (relative to `base`). A feed that cannot be read is a
/// problem placed at the registry's `deny_files` field.
pub fn load_all(names: &[String], base: &Path, registry_text: &str) -> (Vec<Feed>, Vec<Problem>) {
    let mut feeds = Vec::new();
    let mut problems = Vec::new();
    for name in names {
        let path = base.join(name);
        match super::read::read_regular(&path, super::read::FEED_MAX_BYTES) {
            Ok(text) => {
                let (entries, mut bad) = parse(&path.display().to_string(), &text);
                problems.append(&mut bad);
                feeds.push(Feed {
                    path: name.clone(),
                    entries,
                });
            }
            Err(error) => problems.push(at_deny_files(
                registry_text,
                format!("cannot read deny feed {}: {error}", path.display()),
            )),
        }
    }
    (feeds, problems)
}

/// The feeds named by the registry, from `given` (name, text) pairs instead of files.
pub fn from_texts(
    names: &[String],
    given: &[(String, String)],
    registry_text: &str,
) -> (Vec<Feed>, Vec<Problem>) {
    let mut feeds = Vec::new();
    let mut problems = Vec::new();
    for name in names {
        match given.iter().find(|(n, _)| n == name) {
            Some((_, text)) => {
                let (entries, mut bad) = parse(name, text);
                problems.append(&mut bad);
                feeds.push(Feed {
                    path: name.clone(),
                    entries,
                });
            }
            None => problems.push(at_deny_files(
                registry_text,
                format!("no deny feed named {}", super::value::quoted(name)),
            )),
        }
    }
    (feeds, problems)
}

/// A problem placed at the registry's `deny_files` field.
fn at_deny_files(registry_text: &str, message: String) -> Problem {
    let at = registry_text.find("\"deny_files\"").unwrap_or(0);
    let before = &registry_text[..at];
    let line = before.matches('\n').count() + 1;
    let column = at - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
    Problem {
        file: None,
        line,
        column,
        place: "field \"deny_files\"".to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn a_file_that_is_not_a_feed_is_not_quoted() {
        let shadow = "root:$6$abcdefgh$secret:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n";
        let (entries, problems) = parse("/etc/shadow", shadow);
        assert!(entries.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("not a deny feed"));
        assert!(!problems[0].message.contains("root"), "{problems:?}");
        // A real feed with many bad lines lists at most 20 and counts the rest.
        let mut feed = String::from("192.0.2.0/24\n");
        for i in 0..50 {
            feed.push_str(&format!("bad-{i}\n"));
        }
        let (entries, problems) = parse("feed.txt", &feed);
        assert_eq!(entries.len(), 1);
        assert_eq!(problems.len(), 21);
        assert!(
            problems[20].message.contains("30 more bad lines"),
            "{problems:?}"
        );
    }

    #[test]
    fn comments_blank_lines_and_bad_lines() {
        let text = "# VPN providers\n\n198.51.100.0/24   # provider A\n203.0.113.7\n2001:db8:66::/48 ; B\nnot-a-cidr\n10.1.2.3/8\n";
        let (entries, problems) = parse("feeds/x.txt", text);
        let cidrs: Vec<String> = entries
            .iter()
            .map(|e| format!("{}@{}", e.cidr, e.line))
            .collect();
        assert_eq!(
            cidrs,
            vec![
                "198.51.100.0/24@3",
                "203.0.113.7/32@4",
                "2001:db8:66::/48@5"
            ]
        );
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert_eq!(
            (problems[0].line, problems[0].message.as_str()),
            (
                6,
                "invalid CIDR \"not-a-cidr\" (expected e.g. 10.20.0.0/16 or 2001:db8::/48)"
            )
        );
        assert_eq!(problems[0].file.as_deref(), Some("feeds/x.txt"));
        assert_eq!(problems[1].line, 7);
        assert!(problems[1].message.contains("host bits set"));
    }
}
