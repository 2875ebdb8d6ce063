//! The JSON layer: reads the file into raw entries, keeping where each one starts, so that every
//! problem can name its line and column as well as its entry and field.

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::value::RawValue;

mod entries;

use entries::{deny, device, network, upstream, vpn_endpoint};

use super::{
    Date, EgressMode, Located, Mode, PortSpec, Problem, Registry, SCHEMA_VERSION, top::message_of,
};

/// Where each line starts, so that a byte offset becomes a line and column without rescanning
/// the text (a registry may hold a million entries).
pub(super) struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    pub(super) fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(at, _)| at + 1))
            .collect();
        Self { starts }
    }

    /// Line and column (1-based) of a byte offset.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&start| start <= offset);
        (line, offset - self.starts[line - 1] + 1)
    }
}

/// Collects the problems of one entry, placing each at the field it concerns.
struct EntryCheck<'t> {
    text: &'t str,
    /// Built on the first problem: a valid file never needs line numbers.
    lines: &'t std::sync::OnceLock<Lines>,
    raw: &'t RawValue,
    section: &'static str,
    index: usize,
    /// The entry's name once known; the place text is built only when there is a problem (a
    /// registry may hold a million entries).
    name: Option<String>,
    problems: Vec<Problem>,
}

impl<'t> EntryCheck<'t> {
    fn new(
        text: &'t str,
        lines: &'t std::sync::OnceLock<Lines>,
        raw: &'t RawValue,
        section: &'static str,
        index: usize,
    ) -> Self {
        Self {
            text,
            lines,
            raw,
            section,
            index,
            name: None,
            problems: Vec::new(),
        }
    }

    /// `section[index] "name"`, for messages.
    fn place(&self) -> String {
        match &self.name {
            Some(name) => format!(
                "{}[{}] {}",
                self.section,
                self.index,
                super::value::quoted(name)
            ),
            None => format!("{}[{}]", self.section, self.index),
        }
    }

    fn offset(&self) -> usize {
        self.raw.get().as_ptr() as usize - self.text.as_ptr() as usize
    }

    fn start(&self) -> (usize, usize) {
        self.position(self.offset())
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        self.lines
            .get_or_init(|| Lines::new(self.text))
            .position(offset)
    }

    fn named(&mut self, name: Option<&str>) {
        self.name = name.map(str::to_string);
    }

    /// Where `"field":` appears in this entry, or the entry's start.
    fn field_position(&self, field: &str) -> (usize, usize) {
        let raw = self.raw.get();
        let key = format!("\"{field}\"");
        let mut from = 0;
        while let Some(found) = raw[from..].find(&key) {
            let at = from + found;
            if raw[at + key.len()..].trim_start().starts_with(':') {
                return self.position(self.offset() + at);
            }
            from = at + key.len();
        }
        self.start()
    }

    fn problem(&mut self, field: &str, message: String) {
        let (line, column) = self.field_position(field);
        let place = format!("{} field \"{field}\"", self.place());
        self.problems.push(Problem {
            file: None,
            line,
            column,
            place,
            message,
        });
    }

    /// Parses the entry into its raw struct, or records serde's problem at its position.
    fn deserialize<T: for<'de> Deserialize<'de>>(&mut self) -> Option<T> {
        match serde_json::from_str::<T>(self.raw.get()) {
            Ok(value) => Some(value),
            Err(error) => {
                let (line0, column0) = self.start();
                let line = line0 + error.line().saturating_sub(1);
                let column = if error.line() <= 1 {
                    column0 + error.column().saturating_sub(1)
                } else {
                    error.column()
                };
                self.problems.push(Problem {
                    file: None,
                    line,
                    column,
                    place: self.place(),
                    message: message_of(&error),
                });
                None
            }
        }
    }

    fn cidr(&mut self, field: &str, text: &str) -> Option<IpNet> {
        match super::value::prefix(text) {
            Ok(net) => Some(net),
            Err(message) => {
                self.problem(field, message);
                None
            }
        }
    }

    fn address(&mut self, field: &str, text: &str) -> Option<IpAddr> {
        match text.parse::<IpAddr>() {
            Ok(addr) => match super::value::prefix(text) {
                Ok(_) => Some(addr),
                Err(message) => {
                    self.problem(field, message);
                    None
                }
            },
            Err(_) => {
                self.problem(
                    field,
                    format!(
                        "invalid address {} (a device is one IPv4 or IPv6 address, e.g. 10.30.5.17)",
                        super::value::quoted(text)
                    ),
                );
                None
            }
        }
    }

    fn date(&mut self, field: &str, text: Option<&str>) -> Option<Option<Date>> {
        match text.map(Date::parse) {
            None => Some(None),
            Some(Ok(date)) => Some(Some(date)),
            Some(Err(message)) => {
                self.problem(field, message.to_string());
                None
            }
        }
    }

    fn ports(&mut self, specs: Option<&[String]>) -> Option<Option<Box<[PortSpec]>>> {
        let Some(specs) = specs else {
            return Some(None);
        };
        if specs.is_empty() {
            self.problem(
                "ports",
                "empty ports list: omit \"ports\" to allow every port".to_string(),
            );
            return None;
        }
        let mut parsed = Vec::with_capacity(specs.len());
        let mut ok = true;
        for spec in specs {
            match PortSpec::parse(spec) {
                Ok(spec) => parsed.push(spec),
                Err(message) => {
                    self.problem("ports", message.to_string());
                    ok = false;
                }
            }
        }
        ok.then_some(Some(parsed.into_boxed_slice()))
    }

    fn name(&mut self, name: &str) -> bool {
        if name.trim().is_empty() {
            self.problem("name", "empty name".to_string());
            return false;
        }
        if name.chars().any(super::value::unsafe_char) {
            self.problem(
                "name",
                format!(
                    "the name {} holds control or text-direction characters, which would forge output and logs",
                    super::value::quoted(name)
                ),
            );
            return false;
        }
        true
    }
}

/// Parses every section and entry, collecting all problems; the registry only if there are none.
/// Only a file that is not a JSON object fails here; the problems of the top level's fields and
/// of entries are returned in `Located::problems`.
pub(super) fn parse(text: &str) -> Result<Located, Vec<Problem>> {
    let (top, top_problems) = super::top::read(text).map_err(|error| {
        vec![Problem {
            file: None,
            line: error.line().max(1),
            column: error.column().max(1),
            place: String::new(),
            message: message_of(&error),
        }]
    })?;
    let lines = std::sync::OnceLock::new();
    let position = |at: usize| lines.get_or_init(|| Lines::new(text)).position(at);
    let problem_at = |field: &str, (line, column): (usize, usize), message: String| Problem {
        file: None,
        line,
        column,
        place: format!("field \"{field}\""),
        message,
    };
    let mut problems: Vec<Problem> = top_problems
        .into_iter()
        .map(|p| {
            let at = if p.offset == 0 {
                (1, 1)
            } else {
                position(p.offset)
            };
            problem_at(&p.field, at, p.message)
        })
        .collect();
    // Placed at the field's key (a registry has one of each).
    let top_problem = |field: &str, message: String| {
        let at = text.find(&format!("\"{field}\"")).map_or((1, 1), &position);
        problem_at(field, at, message)
    };
    if let Some(schema) = top.schema
        && schema != SCHEMA_VERSION
    {
        problems.push(top_problem(
            "schema",
            format!("unsupported schema {schema} (this enforcer reads schema {SCHEMA_VERSION})"),
        ));
    }
    let mode = match top.mode.as_deref().map(str::parse::<Mode>) {
        Some(Ok(mode)) => Some(mode),
        Some(Err(message)) => {
            problems.push(top_problem("mode", message.to_string()));
            None
        }
        None => None,
    };
    let egress = match top.egress.as_deref().map(str::parse::<EgressMode>) {
        Some(Ok(egress)) => egress,
        Some(Err(message)) => {
            problems.push(top_problem("egress", message.to_string()));
            EgressMode::DEFAULT
        }
        None => EgressMode::DEFAULT,
    };

    let mut places = Places::default();
    let networks = section(
        text,
        &lines,
        "networks",
        &top.networks,
        network,
        &mut problems,
        &mut places,
    );
    let devices = section(
        text,
        &lines,
        "devices",
        &top.devices,
        device,
        &mut problems,
        &mut places,
    );
    let vpn_endpoints = section(
        text,
        &lines,
        "vpn_endpoints",
        &top.vpn_endpoints,
        vpn_endpoint,
        &mut problems,
        &mut places,
    );
    let deny = section(
        text,
        &lines,
        "deny",
        &top.deny,
        deny,
        &mut problems,
        &mut places,
    );

    let upstreams = section(
        text,
        &lines,
        "upstreams",
        &top.upstreams,
        upstream,
        &mut problems,
        &mut places,
    );

    // A bad mode is already a problem; Monitor only fills the slot so that the cross-entry
    // checks can still run and report everything at once.
    let registry = Registry {
        mode: mode.unwrap_or(Mode::Monitor),
        egress,
        networks,
        devices,
        vpn_endpoints,
        deny,
        upstreams,
        deny_files: top.deny_files,
        serial: top.serial,
        connections: top.connections,
        feeds: Vec::new(),
    };
    Ok(Located {
        registry,
        places,
        problems,
        lines,
    })
}

/// Per section, for each valid entry in order: (index in the file's list, byte offset).
pub(super) type Places = HashMap<&'static str, Vec<(usize, usize)>>;

/// Parses one section's entries; an entry with a problem is left out and its problems recorded.
/// Large sections are split across the machine's cores (entries are independent); the results
/// are joined in file order.
fn section<T: Send>(
    text: &str,
    lines: &std::sync::OnceLock<Lines>,
    name: &'static str,
    raws: &[&RawValue],
    parse_entry: fn(&mut EntryCheck<'_>) -> Option<T>,
    problems: &mut Vec<Problem>,
    places: &mut Places,
) -> Vec<T> {
    // Each thread parses its share of the entries into its share of one list (no second copy
    // to join: at a million entries each copy is a hundred MiB or more).
    let mut slots: Vec<Option<(T, usize)>> =
        std::iter::repeat_with(|| None).take(raws.len()).collect();
    let parse_chunk = |first: usize, chunk: &[&RawValue], out: &mut [Option<(T, usize)>]| {
        let mut found = Vec::new();
        for (i, (raw, slot)) in chunk.iter().zip(out).enumerate() {
            let mut check = EntryCheck::new(text, lines, raw, name, first + i);
            *slot = parse_entry(&mut check).map(|entry| (entry, check.offset()));
            found.append(&mut check.problems);
        }
        found
    };
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if raws.len() < 10_000 || threads < 2 {
        problems.append(&mut parse_chunk(0, raws, &mut slots));
    } else {
        let size = raws.len().div_ceil(threads);
        let found: Vec<Vec<Problem>> = std::thread::scope(|scope| {
            let handles: Vec<_> = raws
                .chunks(size)
                .zip(slots.chunks_mut(size))
                .enumerate()
                .map(|(n, (chunk, out))| scope.spawn(move || parse_chunk(n * size, chunk, out)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a registry parser thread panicked"))
                .collect()
        });
        for mut part in found {
            problems.append(&mut part);
        }
    }
    // An entry with a problem left its slot empty.
    let mut here = Vec::with_capacity(raws.len());
    let mut index = 0;
    slots.retain(|slot| {
        if let Some((_, offset)) = slot {
            here.push((index, *offset));
        }
        index += 1;
        slot.is_some()
    });
    // In place: the same allocation, each slot's entry moved out of its `Some`.
    let entries: Vec<T> = slots
        .into_iter()
        .map(|slot| slot.expect("kept only filled slots").0)
        .collect();
    places.insert(name, here);
    entries
}
