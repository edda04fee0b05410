//! The one parser of `pmad run`'s log (stdout), for both `log.format`s, and the helpers that
//! wait for an event to show up in it.
//!
//! - JSON: one object per line with `timestamp`, `level`, `event` and the event's fields,
//!   flattened.
//! - Text: `2026-11-27T10:31:02Z INFO  merge.emitted recipe=sma2 steps=100..200 n=2 ...`:
//!   timestamp, level, event name, then `key=value` fields (values with spaces, quotes or `=`
//!   quoted and escaped like a Rust string), then the free-text message if there is one.
//!
//! Both become an [`Event`]. Only complete lines (ending in a newline) are parsed, so a line
//! being written while the test reads the file is picked up on the next read.

use serde_json::{Map, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How often the wait helpers look at the log again (reads are incremental, so this is cheap).
pub const POLL: Duration = Duration::from_millis(3);

/// Which format a line was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON object.
    Json,
    /// The human-readable text line.
    Text,
}

/// One event of pmad's log.
#[derive(Debug, Clone)]
pub struct Event {
    /// Every field as a JSON object, `timestamp`, `level` and `event` included. Fields of a
    /// text line are strings (the text format has no types; the typed accessors parse them).
    pub v: Value,
    /// Its `timestamp` (wall clock, comparable with `SystemTime::now()` in the test).
    pub t: SystemTime,
    /// The line as pmad wrote it.
    pub raw: String,
    /// The format of the line.
    pub format: Format,
}

impl Event {
    /// The `event` field (the event's name, e.g. `merge.emitted`).
    pub fn event(&self) -> &str {
        self.v["event"].as_str().unwrap_or("")
    }

    /// The `level` field ("INFO", "WARN", "ERROR", ...).
    pub fn level(&self) -> &str {
        self.v["level"].as_str().unwrap_or("")
    }

    /// The `step` field as a number.
    pub fn step(&self) -> Option<u64> {
        self.u("step")
    }

    /// A string field.
    pub fn s(&self, k: &str) -> Option<&str> {
        self.v[k].as_str()
    }

    /// An unsigned integer field (a JSON number; in a text line, a value that parses as one).
    pub fn u(&self, k: &str) -> Option<u64> {
        match self.format {
            Format::Json => self.v[k].as_u64(),
            Format::Text => self.v[k].as_str()?.parse().ok(),
        }
    }

    /// A boolean field (a JSON boolean; in a text line, `true` or `false`).
    pub fn b(&self, k: &str) -> Option<bool> {
        match self.format {
            Format::Json => self.v[k].as_bool(),
            Format::Text => self.v[k].as_str()?.parse().ok(),
        }
    }

    /// Whether the event has field `k` with a non-null value.
    pub fn has(&self, k: &str) -> bool {
        self.v.get(k).is_some_and(|x| !x.is_null())
    }

    /// `event` is `ev` and `step` is `step`.
    pub fn is(&self, ev: &str, step: u64) -> bool {
        self.event() == ev && self.step() == Some(step)
    }

    /// The line as pmad wrote it.
    pub fn line(&self) -> &str {
        &self.raw
    }

    /// A compact one-line form for messages: time of day, event and the other fields.
    pub fn short(&self) -> String {
        let mut v = self.v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("timestamp");
            o.remove("level");
        }
        let ts = self.s("timestamp").unwrap_or_default();
        format!("{} {v}", ts.get(11..23).unwrap_or(ts))
    }
}

/// A parsed log: its events and the complete lines that are not events in either format.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// The events, in order.
    pub events: Vec<Event>,
    /// Complete lines that are not events (neither a JSON object with a timestamp and an
    /// `event`, nor a text line with a timestamp, level and event name).
    pub other: Vec<String>,
}

impl Log {
    /// Lines that are not JSON events: [`Log::other`] plus the text-format events (a log
    /// configured as JSON must have none).
    pub fn non_json_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .events
            .iter()
            .filter(|e| e.format != Format::Json)
            .map(|e| e.raw.clone())
            .collect();
        v.extend(self.other.iter().cloned());
        v
    }

    fn push_line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        match parse_line(line) {
            Some(e) => self.events.push(e),
            None => self.other.push(line.to_string()),
        }
    }
}

/// Parse one line of either format (None: not an event).
pub fn parse_line(line: &str) -> Option<Event> {
    if line.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(line).ok()?;
        let t = humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()?;
        v["event"].as_str()?;
        return Some(Event {
            v,
            t,
            raw: line.to_string(),
            format: Format::Json,
        });
    }
    parse_text_line(line)
}

/// `TIMESTAMP LEVEL EVENT key=value ... [message]`.
fn parse_text_line(line: &str) -> Option<Event> {
    let mut rest = line.trim_end_matches(['\r', '\n']);
    let mut word = || -> Option<&str> {
        let r = rest.trim_start_matches(' ');
        let end = r.find(' ').unwrap_or(r.len());
        let (w, tail) = r.split_at(end);
        rest = tail;
        (!w.is_empty()).then_some(w)
    };
    let ts = word()?;
    let t = humantime::parse_rfc3339_weak(ts).ok()?;
    let level = word()?;
    if !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level) {
        return None;
    }
    let event = word()?;
    if event.contains('=') {
        return None;
    }
    let mut m = Map::new();
    m.insert("timestamp".into(), Value::String(ts.into()));
    m.insert("level".into(), Value::String(level.into()));
    m.insert("event".into(), Value::String(event.into()));
    loop {
        let r = rest.trim_start_matches(' ');
        let Some((key, after)) = r.split_once('=') else {
            break;
        };
        if key.is_empty() || key.contains([' ', '"']) {
            break;
        }
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            unquote(q)?
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        m.insert(key.into(), Value::String(value));
        rest = tail;
    }
    let message = rest.trim();
    if !message.is_empty() {
        m.insert("message".into(), Value::String(message.into()));
    }
    Some(Event {
        v: Value::Object(m),
        t,
        raw: line.to_string(),
        format: Format::Text,
    })
}

/// A Rust-`Debug`-quoted string body (after the opening quote): the value and what follows the
/// closing quote.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'u' => {
                    let (j, open) = chars.next()?;
                    if open != '{' {
                        return None;
                    }
                    let close = s[j..].find('}')? + j;
                    let code = u32::from_str_radix(&s[j + 1..close], 16).ok()?;
                    out.push(char::from_u32(code)?);
                    while chars.next()?.0 < close {}
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Parse the complete lines of a log text.
pub fn parse_log(text: &str) -> Log {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut log = Log::default();
    for line in complete.lines() {
        log.push_line(line);
    }
    log
}

/// Follows a growing log file: each [`LogFollower::poll`] parses only what was appended since
/// the last one.
#[derive(Debug)]
pub struct LogFollower {
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
    log: Log,
}

impl LogFollower {
    /// Follow `path` from its start (it need not exist yet).
    pub fn new(path: &Path) -> LogFollower {
        LogFollower {
            path: path.to_path_buf(),
            pos: 0,
            partial: Vec::new(),
            log: Log::default(),
        }
    }

    /// Read the lines completed since the last call; returns the whole log so far.
    pub fn poll(&mut self) -> &Log {
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(self.pos)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                self.pos += buf.len() as u64;
                self.partial.extend_from_slice(&buf);
                if let Some(i) = self.partial.iter().rposition(|b| *b == b'\n') {
                    let rest = self.partial.split_off(i + 1);
                    let done = std::mem::replace(&mut self.partial, rest);
                    for line in String::from_utf8_lossy(&done).lines() {
                        self.log.push_line(line);
                    }
                }
            }
        }
        &self.log
    }

    /// Wait up to `timeout` for an event matching `pred` (the first one in the log).
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.poll().events.iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Wait up to `timeout` until an event matching `pred` shows up in the log file `path`.
pub fn wait_for_event(
    path: &Path,
    timeout: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Option<Event> {
    LogFollower::new(path).wait_for(timeout, pred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_parser_reads_both_formats() {
        let text = concat!(
            r#"{"timestamp":"2026-11-27T10:31:02.123456Z","level":"INFO","event":"merge.emitted","recipe":"sma2","step":200,"ok":true}"#,
            "\n",
            "2026-11-27T10:31:02Z INFO  merge.emitted recipe=sma2 step=200 ok=true ",
            r#"error="a \"b\" = c" out=/x/step-200 done"#,
            "\n",
            "not an event\n",
            "2026-11-27T10:31:03Z INFO  partial",
        );
        let log = parse_log(text);
        assert_eq!(log.events.len(), 2, "{log:?}");
        assert_eq!(log.other, ["not an event"]);
        for e in &log.events {
            assert_eq!(e.event(), "merge.emitted");
            assert_eq!(e.level(), "INFO");
            assert_eq!(e.s("recipe"), Some("sma2"));
            assert_eq!(e.step(), Some(200));
            assert_eq!(e.b("ok"), Some(true));
            assert!(e.is("merge.emitted", 200));
        }
        let text_ev = &log.events[1];
        assert_eq!(text_ev.format, Format::Text);
        assert_eq!(text_ev.s("error"), Some(r#"a "b" = c"#));
        assert_eq!(text_ev.s("out"), Some("/x/step-200"));
        assert_eq!(text_ev.s("message"), Some("done"));
        assert_eq!(log.non_json_lines().len(), 2);
        assert_eq!(log.events[0].t, text_ev.t + Duration::from_micros(123_456));
    }
}
