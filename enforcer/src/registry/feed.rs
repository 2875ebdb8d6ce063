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

/// Parses a feed's text; every bad line is a problem naming `display` and its line.
pub fn parse(display: &str, text: &str) -> (Vec<FeedEntry>, Vec<Problem>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw_line.split(['#', ';']).next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let parsed = content
            .parse::<IpNet>()
            .or_else(|_| content.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| format!("invalid CIDR \"{content}\""))
            .and_then(|net| {
                if net.trunc() == net {
                    Ok(net)
                } else {
                    Err(format!(
                        "host bits set in \"{content}\": the network is {}",
                        net.trunc()
                    ))
                }
            });
        match parsed {
            Ok(cidr) => entries.push(FeedEntry { line, cidr }),
            Err(message) => problems.push(Problem {
                file: Some(display.to_string()),
                line,
                column: 1 + raw_line.len() - raw_line.trim_start().len(),
                place: "deny feed".to_string(),
                message,
            }),
        }
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
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (entries, mut bad) = parse(&path.display().to_string(), &text);
                problems.append(&mut bad);
                feeds.push(Feed {
                    path: name.clone(),
                    entries,
                });
            }
            Err(error) => {
                let at = registry_text.find("\"deny_files\"").unwrap_or(0);
                let before = &registry_text[..at];
                let line = before.matches('\n').count() + 1;
                let column = at - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
                problems.push(Problem {
                    file: None,
                    line,
                    column,
                    place: "field \"deny_files\"".to_string(),
                    message: format!("cannot read deny feed {}: {error}", path.display()),
                });
            }
        }
    }
    (feeds, problems)
}

#[cfg(test)]
mod tests {
    use super::parse;

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
            (6, "invalid CIDR \"not-a-cidr\"")
        );
        assert_eq!(problems[0].file.as_deref(), Some("feeds/x.txt"));
        assert_eq!(problems[1].line, 7);
        assert!(problems[1].message.contains("host bits set"));
    }
}
