//! Logging: one line per event, with a stable `event` field.
//!
//! Text format (people tailing `kubectl logs -f`):
//! `2026-11-27T10:31:02Z INFO merge.emitted recipe=sma10 steps=9100..10000 n=10 ...`
//! — timestamp, level, the event name, then `key=value` fields in the order they were
//! recorded (values with spaces quoted). No colour codes, ever, so pipes and files stay clean.
//! JSON format (`log.format = "json"`): the same events as JSON lines from tracing-subscriber.

use crate::config::LogFormat;
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `level` is an EnvFilter directive ("info", "pmad=debug").
pub fn init(format: LogFormat, level: &str) {
    // Dependencies' own info lines (notify's watch bookkeeping, hyper) carry no `event`
    // field; keep them to warnings unless the user names them.
    let directive = format!("{level},notify=warn,hyper=warn,axum=warn");
    let filter = EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(false)
            .try_init(),
        LogFormat::Text => builder.event_format(TextFormat).try_init(),
    };
}

/// The human-readable line format.
pub struct TextFormat;

struct Fields {
    event: Option<String>,
    message: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "event" => self.event = Some(value),
            "message" => self.message = Some(value),
            name => {
                if value.is_empty() || value.contains([' ', '"', '=']) {
                    self.rest.push_str(&format!(" {name}={value:?}"));
                } else {
                    self.rest.push_str(&format!(" {name}={value}"));
                }
            }
        }
    }
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut f = Fields {
            event: None,
            message: None,
            rest: String::new(),
        };
        event.record(&mut f);
        let ts = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        write!(w, "{ts} {:<5}", event.metadata().level())?;
        if let Some(e) = &f.event {
            write!(w, " {e}")?;
        }
        w.write_str(&f.rest)?;
        if let Some(m) = &f.message {
            write!(w, " {m}")?;
        }
        writeln!(w)
    }
}

/// Format a byte count for log lines: decimal units, no space ("950B", "13.5GB").
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// Format a duration for log lines ("41.7s", "250ms").
pub fn secs(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{s:.1}s")
    }
}

/// Format a rate for log lines ("331MB/s").
pub fn rate(bytes: u64, d: std::time::Duration) -> String {
    let s = d.as_secs_f64().max(1e-6);
    format!("{}/s", self::bytes((bytes as f64 / s) as u64))
}

/// Format a run of steps for log lines: "9100..10000", "700", or "-" when empty.
pub fn fmt_steps(s: &[u64]) -> String {
    match (s.first(), s.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}..{b}"),
        (Some(a), _) => a.to_string(),
        _ => "-".into(),
    }
}

/// Format a list of steps for log lines: "300,400", or "-" when empty.
pub fn fmt_list<T: std::fmt::Display>(s: &[T]) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_the_design_example() {
        assert_eq!(super::bytes(950), "950B");
        assert_eq!(super::bytes(13_500_000_000), "13.5GB");
        assert_eq!(
            super::rate(331_000_000, std::time::Duration::from_secs(1)),
            "331.0MB/s"
        );
        assert_eq!(
            super::secs(std::time::Duration::from_millis(41_700)),
            "41.7s"
        );
        assert_eq!(super::fmt_steps(&[9100, 9200, 10000]), "9100..10000");
        assert_eq!(super::fmt_steps(&[700]), "700");
        assert_eq!(super::fmt_steps(&[]), "-");
        assert_eq!(super::fmt_list(&[300, 400]), "300,400");
    }
}
