//! `enforcer top`: a terminal view of a running enforcer, refreshed each second — rates by
//! reason in each direction, the busiest rules, the busiest dropped sources (from the event log,
//! when `run --events` writes one to a file), VPN packets by protocol, the maps' fill. It reads
//! what `stats` reads (the pinned counters, the rule labels), the controller's `status` and the
//! event log's new lines; `q` (or Esc, or Ctrl-C) quits. Built on ratatui's crossterm backend, which draws
//! on any terminal, over SSH too.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::{Action, MAX_CONNS, MAX_RULES};
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Style, Stylize as _},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
};

use crate::{
    control::{self, Envelope, Request},
    datapath::{InstanceCounters, VerdictCounts},
    instance::{self, InstanceId, RuleLabel, State},
};

const REFRESH: Duration = Duration::from_secs(1);
/// How often the rule labels are read again (a million labels take a moment).
const LABELS_REFRESH: Duration = Duration::from_secs(10);
/// Rows of the busiest-rules table.
const BUSIEST: usize = 12;
/// The window of the busiest dropped sources, in refreshes.
const SOURCES_WINDOW: usize = 10;
/// The most of the event log read per refresh (a flood's lines beyond wait for the next).
const LOG_READ: u64 = 4 << 20;

/// The event log's new lines, read a refresh at a time: the drops per (source, reason) of
/// each of the last `SOURCES_WINDOW` refreshes.
struct Sources {
    path: Option<std::path::PathBuf>,
    offset: u64,
    windows: std::collections::VecDeque<std::collections::HashMap<(String, String), u64>>,
}

impl Sources {
    fn new(state: Option<&State>) -> Self {
        let path = state
            .and_then(|s| s.events.as_ref())
            .map(std::path::PathBuf::from);
        // Only what arrives from now on.
        let offset = path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        Self {
            path,
            offset,
            windows: std::collections::VecDeque::new(),
        }
    }

    fn refresh(&mut self) -> Result<Vec<[String; 3]>, &'static str> {
        use std::io::{Read as _, Seek as _};
        let Some(path) = &self.path else {
            return Err("(run with --events FILE to see them)");
        };
        let mut drops = std::collections::HashMap::new();
        if let Ok(mut file) = std::fs::File::open(path) {
            let len = file.metadata().map_or(0, |m| m.len());
            if len < self.offset {
                // Rotated: the new file from its start.
                self.offset = 0;
            }
            let mut text = String::new();
            if file.seek(std::io::SeekFrom::Start(self.offset)).is_ok() {
                let _ = file.take(LOG_READ).read_to_string(&mut text);
            }
            // Whole lines only; a partial last one waits.
            let whole = text.rfind('\n').map_or(0, |at| at + 1);
            self.offset += whole as u64;
            for line in text[..whole].lines() {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if event["event"]["type"][0] != "denied" {
                    continue;
                }
                let remote = if event["network"]["direction"] == "egress" {
                    &event["destination"]["ip"]
                } else {
                    &event["source"]["ip"]
                };
                let key = (
                    remote.as_str().unwrap_or("?").to_string(),
                    event["event"]["action"].as_str().unwrap_or("?").to_string(),
                );
                *drops.entry(key).or_insert(0) += event["event"]["count"].as_u64().unwrap_or(1);
            }
        }
        self.windows.push_back(drops);
        if self.windows.len() > SOURCES_WINDOW {
            self.windows.pop_front();
        }
        let mut total: std::collections::HashMap<&(String, String), u64> =
            std::collections::HashMap::new();
        for window in &self.windows {
            for (key, n) in window {
                *total.entry(key).or_insert(0) += n;
            }
        }
        let mut rows: Vec<_> = total.into_iter().collect();
        rows.sort_by_key(|(key, n)| (std::cmp::Reverse(*n), (*key).clone()));
        Ok(rows
            .into_iter()
            .take(BUSIEST)
            .map(|((source, reason), n)| [source.clone(), reason.clone(), n.to_string()])
            .collect())
    }
}

pub fn top(instance_name: Option<&str>, iface: Option<&str>) -> anyhow::Result<ExitCode> {
    let state = instance::select(instance_name, iface)?;
    let id = InstanceId::parse(&state.instance).context("malformed instance name in state file")?;
    let mut terminal = ratatui::try_init().context("cannot draw on this terminal")?;
    let result = run(&mut terminal, &id);
    ratatui::restore();
    result
}

/// One reading of the counters.
struct Sample {
    at: Instant,
    counters: InstanceCounters,
}

/// What one screen shows.
struct View {
    state: Option<State>,
    /// The controller's `status` message, or why there is none.
    status: Result<serde_json::Value, String>,
    /// (direction, rows of reason, packets/s, bytes/s, total, would-drop/s).
    directions: Vec<(&'static str, Vec<[String; 5]>)>,
    /// (rule, kind, in/s, out/s) of the busiest rules over the last second.
    busiest: Vec<[String; 4]>,
    /// (protocol, unapproved/s, approved/s, unapproved total, approved total).
    vpn: Vec<[String; 5]>,
    /// (source, reason, events) of the busiest dropped sources over `SOURCES_WINDOW`, or why
    /// there are none.
    sources: Result<Vec<[String; 3]>, &'static str>,
    rules: usize,
    seconds: f64,
}

fn run(terminal: &mut DefaultTerminal, id: &InstanceId) -> anyhow::Result<ExitCode> {
    let state_file = id.state_file();
    let mut labels: Vec<RuleLabel> = Vec::new();
    let mut labels_read: Option<Instant> = None;
    let mut previous: Option<Sample> = None;
    let mut sources = Sources::new(State::read(&state_file).ok().as_ref());
    loop {
        if labels_read.is_none_or(|at| at.elapsed() >= LABELS_REFRESH) {
            labels = State::read_rules(&state_file);
            labels_read = Some(Instant::now());
            // Rule numbers may have moved: rates start afresh.
            previous = None;
        }
        let indices: Vec<u32> = labels.iter().map(|r| r.index).collect();
        let counters = InstanceCounters::read_pinned(&id.pin_dir(), &indices)?;
        let now = Sample {
            at: Instant::now(),
            counters,
        };
        let status = control::send(
            &id.control_socket(),
            &Envelope {
                request: Request::Status,
                operator: None,
                force: false,
            },
        )
        .map(|r| r.data)
        .map_err(|e| e.to_string());
        let mut view = View::of(
            State::read(&state_file).ok(),
            status,
            &labels,
            previous.as_ref(),
            &now,
        );
        view.sources = sources.refresh();
        terminal.draw(|frame| draw(frame, &view))?;
        let deadline = Instant::now() + REFRESH;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()? {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        previous = Some(now);
    }
}

/// A count as a short number: 1234567 → "1.2M".
fn short(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

impl View {
    fn of(
        state: Option<State>,
        status: Result<serde_json::Value, String>,
        labels: &[RuleLabel],
        before: Option<&Sample>,
        now: &Sample,
    ) -> Self {
        let seconds = before.map_or(0.0, |b| now.at.duration_since(b.at).as_secs_f64());
        let per_second = |delta: u64| {
            if seconds > 0.0 {
                delta as f64 / seconds
            } else {
                0.0
            }
        };
        let rows = |now: &VerdictCounts, before: Option<&VerdictCounts>| -> Vec<[String; 5]> {
            let mut rows: Vec<(f64, [String; 5])> = now
                .enforced
                .iter()
                .zip(&now.monitored)
                .filter_map(|((reason, done), (_, would))| {
                    let (p0, b0, w0) = before
                        .map_or((done.packets, done.bytes, would.packets), |b| {
                            (b.packets(*reason), bytes(b, *reason), b.would_drop(*reason))
                        });
                    if done.packets == 0 && would.packets == 0 {
                        return None;
                    }
                    let rate = per_second(done.packets.saturating_sub(p0));
                    let label = match reason.action() {
                        Action::Pass => reason.label().to_string(),
                        Action::Drop => format!("{} (drop)", reason.label()),
                    };
                    Some((
                        rate,
                        [
                            label,
                            short(rate),
                            short(per_second(done.bytes.saturating_sub(b0))),
                            short(done.packets as f64),
                            short(per_second(would.packets.saturating_sub(w0))),
                        ],
                    ))
                })
                .collect();
            rows.sort_by(|a, b| b.0.total_cmp(&a.0));
            rows.into_iter().map(|(_, row)| row).collect()
        };
        let mut directions = vec![(
            "incoming",
            rows(&now.counters.verdicts, before.map(|b| &b.counters.verdicts)),
        )];
        if let Some((egress, _)) = &now.counters.egress {
            let earlier = before
                .and_then(|b| b.counters.egress.as_ref())
                .map(|(e, _)| e);
            directions.push(("outgoing", rows(egress, earlier)));
        }
        let hits_out = |s: &Sample, at: usize| {
            s.counters
                .egress
                .as_ref()
                .and_then(|(_, h)| h.get(at))
                .copied()
                .unwrap_or(0)
        };
        let mut busiest: Vec<(f64, [String; 4])> = labels
            .iter()
            .enumerate()
            .filter_map(|(at, rule)| {
                let before = before?;
                let inbound = now
                    .counters
                    .hits
                    .get(at)?
                    .saturating_sub(*before.counters.hits.get(at)?);
                let outbound = hits_out(now, at).saturating_sub(hits_out(before, at));
                (inbound + outbound > 0).then(|| {
                    (
                        per_second(inbound + outbound),
                        [
                            rule.name.clone(),
                            rule.kind.clone(),
                            short(per_second(inbound)),
                            short(per_second(outbound)),
                        ],
                    )
                })
            })
            .collect();
        busiest.sort_by(|a, b| b.0.total_cmp(&a.0));
        busiest.truncate(BUSIEST);
        let vpn = now
            .counters
            .vpn
            .0
            .iter()
            .enumerate()
            .filter(|(_, (_, unapproved, approved))| unapproved.packets + approved.packets > 0)
            .map(|(at, (protocol, unapproved, approved))| {
                let (u0, a0) = before
                    .and_then(|b| b.counters.vpn.0.get(at))
                    .map_or((unapproved.packets, approved.packets), |(_, u, a)| {
                        (u.packets, a.packets)
                    });
                [
                    protocol.name().to_string(),
                    short(per_second(unapproved.packets.saturating_sub(u0))),
                    short(per_second(approved.packets.saturating_sub(a0))),
                    short(unapproved.packets as f64),
                    short(approved.packets as f64),
                ]
            })
            .collect();
        Self {
            state,
            status,
            directions,
            busiest: busiest.into_iter().map(|(_, row)| row).collect(),
            vpn,
            sources: Ok(Vec::new()),
            rules: labels.len(),
            seconds,
        }
    }
}

fn bytes(counts: &VerdictCounts, reason: enforcer_common::Reason) -> u64 {
    counts
        .enforced
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, c)| c.bytes)
}

fn draw(frame: &mut Frame<'_>, view: &View) {
    let [header, middle, bottom, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(8),
        Constraint::Min(8),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(header_text(view), header);
    let halves = |area: Rect| Layout::horizontal([Constraint::Percentage(50); 2]).areas::<2>(area);
    let top_halves = halves(middle);
    for (area, (direction, rows)) in top_halves.into_iter().zip(&view.directions) {
        let table = Table::new(
            rows.iter().map(|r| Row::new(r.clone())),
            [
                Constraint::Min(22),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
            ],
        )
        .header(Row::new(["reason", "pkts/s", "bytes/s", "total", "mon/s"]).bold())
        .block(Block::bordered().title(format!(" {direction} ")));
        frame.render_widget(table, area);
    }
    let [left, side] = halves(bottom);
    let [rules_area, sources_area] = Layout::vertical([Constraint::Percentage(50); 2]).areas(left);
    let sources_title = format!(" busiest dropped sources, last {SOURCES_WINDOW} s ");
    match &view.sources {
        Ok(rows) => frame.render_widget(
            Table::new(
                rows.iter().map(|r| Row::new(r.clone())),
                [
                    Constraint::Min(24),
                    Constraint::Min(18),
                    Constraint::Length(8),
                ],
            )
            .header(Row::new(["source", "reason", "events"]).bold())
            .block(Block::bordered().title(sources_title)),
            sources_area,
        ),
        Err(why) => frame.render_widget(
            Paragraph::new(*why).block(Block::bordered().title(sources_title)),
            sources_area,
        ),
    }
    let rules = Table::new(
        view.busiest.iter().map(|r| Row::new(r.clone())),
        [
            Constraint::Min(20),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(["rule", "kind", "in/s", "out/s"]).bold())
    .block(Block::bordered().title(" busiest rules "));
    frame.render_widget(rules, rules_area);
    let [vpn_area, maps_area] =
        Layout::vertical([Constraint::Min(4), Constraint::Length(5)]).areas(side);
    let vpn = Table::new(
        view.vpn.iter().map(|r| Row::new(r.clone())),
        [
            Constraint::Min(11),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(["vpn", "unappr/s", "appr/s", "unappr", "appr"]).bold())
    .block(Block::bordered().title(" VPN packets "));
    frame.render_widget(vpn, vpn_area);
    frame.render_widget(maps_text(view), maps_area);
    frame.render_widget(Line::from(" q quits ".dim()), footer);
}

fn header_text(view: &View) -> Paragraph<'static> {
    let first = match &view.state {
        Some(s) => format!(
            "{} on {}: {} mode, egress {}, {} XDP, pid {}",
            s.instance,
            s.iface,
            s.mode,
            if s.egress.is_empty() { "?" } else { &s.egress },
            s.xdp_mode,
            s.pid
        ),
        None => "no state file: is the enforcer running?".to_string(),
    };
    let second = match &view.status {
        Ok(data) if data["enforcing"] == false => {
            "NOT ENFORCING: the interface is gone".to_string()
        }
        Ok(data) => format!(
            "enforcing · registry serial {} · up {} s · rates over {:.1} s",
            data["serial"], data["uptime_s"], view.seconds
        ),
        Err(e) => format!("no controller answers ({e}); the pinned program keeps enforcing"),
    };
    Paragraph::new(vec![Line::from(first).bold(), Line::from(second)])
        .block(Block::bordered().title(" enforcer top "))
        .style(Style::default())
}

fn maps_text(view: &View) -> Paragraph<'static> {
    let connections = view
        .status
        .as_ref()
        .ok()
        .and_then(|d| d["connections"].as_u64())
        .map_or_else(|| "?".to_string(), |c| c.to_string());
    let percent = |used: f64, capacity: f64| 100.0 * used / capacity;
    Paragraph::new(vec![
        Line::from(format!(
            "rules {} of {MAX_RULES} ({:.2}%)",
            view.rules,
            percent(view.rules as f64, f64::from(MAX_RULES))
        )),
        Line::from(format!(
            "connections {connections} of {MAX_CONNS}{}",
            connections
                .parse::<f64>()
                .map(|c| format!(" ({:.2}%)", percent(c, f64::from(MAX_CONNS))))
                .unwrap_or_default()
        )),
    ])
    .block(Block::bordered().title(" maps "))
}
