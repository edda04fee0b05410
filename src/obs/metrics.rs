//! Prometheus metrics.
//!
//! Names follow Prometheus conventions (docs/metrics.md): prefix `pmad_`, base units, `_total`
//! counters; labels are only small closed sets (recipe, reason, result) — never a step or a
//! path. Process metrics (`process_*`) are read from /proc at scrape time.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

/// Every metric pmad exports.
pub struct Metrics {
    registry: Registry,
    /// Full scans of the watched directory.
    pub scans: Counter,
    /// Checkpoint directories seen for the first time.
    pub discovered: Counter,
    /// Checkpoints accepted into the window.
    pub accepted: Counter,
    /// Checkpoints rejected, by reason.
    pub rejected: Family<Labels, Counter>,
    /// Checkpoints skipped (outside the phase or interval).
    pub skipped: Counter,
    /// Complete checkpoints deleted before pmad could use them.
    pub lost: Counter,
    /// Emissions by recipe and result (ok, failed, cancelled).
    pub merges: Family<Labels, Counter>,
    /// Emission wall time by recipe.
    pub merge_duration: Family<Labels, Histogram>,
    /// Tensor bytes read from checkpoints.
    pub read_bytes: Counter,
    /// Tensor bytes written to outputs.
    pub written_bytes: Counter,
    /// Checkpoints pinned in the window.
    pub window: Gauge,
    /// Newest step published, by recipe.
    pub last_emitted_step: Family<Labels, Gauge>,
    /// Unix time of the last successful emission, by recipe.
    pub last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Newest checkpoint step accepted.
    pub newest_step: Gauge,
    /// Seconds between the newest published checkpoint being written and its output appearing.
    pub lag: Gauge<f64, AtomicU64>,
    /// Free bytes on each recipe's output filesystem.
    pub output_free: Family<Labels, Gauge>,
    /// Loss spikes detected, by the series that spiked first.
    pub spikes: Family<Labels, Counter>,
    /// 1 while a spike is in progress (checkpoints are not absorbed), else 0.
    pub spike_active: Gauge,
    /// 1 when `/readyz` would answer 200, else 0 (set at each scrape).
    pub ready: Gauge,
    /// With `[partition]`: parts present for the oldest output waiting to be committed,
    /// by recipe (0 when nothing waits).
    pub parts_present: Family<Labels, Gauge>,
    /// With `[partition]`: seconds the oldest waiting output has waited for its parts, by
    /// recipe (0 when nothing waits).
    pub commit_wait: Family<Labels, Gauge<f64, AtomicU64>>,
    /// With `[partition]`: outputs abandoned (parts missing past `part_timeout`, or a newer
    /// step committed first), by recipe.
    pub parts_abandoned: Family<Labels, Counter>,
    /// With `[partition]`: staging directories of another plan seen for a step this
    /// instance wrote a part of (instances disagree on inputs, options or version).
    pub plan_mismatches: Counter,
    process_rss: Gauge,
    process_cpu: Counter<f64, AtomicU64>,
    /// Serialises [`Metrics::refresh_process`]: the CPU counter advances by a difference.
    refresh: std::sync::Mutex<()>,
    process_fds: Gauge,
    process_start: Gauge<f64, AtomicU64>,
}

fn recipe(name: &str) -> Labels {
    vec![("recipe".into(), name.into())]
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            scans: Counter::default(),
            discovered: Counter::default(),
            accepted: Counter::default(),
            rejected: Family::default(),
            skipped: Counter::default(),
            lost: Counter::default(),
            merges: Family::default(),
            merge_duration: Family::new_with_constructor(|| {
                Histogram::new([
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ])
            }),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            window: Gauge::default(),
            last_emitted_step: Family::default(),
            last_success: Family::default(),
            newest_step: Gauge::default(),
            lag: Gauge::default(),
            output_free: Family::default(),
            spikes: Family::default(),
            spike_active: Gauge::default(),
            ready: Gauge::default(),
            parts_present: Family::default(),
            commit_wait: Family::default(),
            parts_abandoned: Family::default(),
            plan_mismatches: Counter::default(),
            process_rss: Gauge::default(),
            process_cpu: Counter::default(),
            refresh: std::sync::Mutex::new(()),
            process_fds: Gauge::default(),
            process_start: Gauge::default(),
        };
        {
            let r = registry.sub_registry_with_prefix("pmad");
            // A gauge fixed at 1, not an OpenMetrics info: the same sample, and parsers of the
            // classic text format (promtool check metrics) know the type.
            let build = Family::<Labels, Gauge>::default();
            build
                .get_or_create(&vec![(
                    "version".to_string(),
                    env!("CARGO_PKG_VERSION").to_string(),
                )])
                .set(1);
            r.register("build_info", "pmad build information", build);
            r.register(
                "scans",
                "Full scans of the watched directory",
                m.scans.clone(),
            );
            r.register(
                "checkpoints_discovered",
                "Checkpoint directories discovered",
                m.discovered.clone(),
            );
            r.register(
                "checkpoints_accepted",
                "Checkpoints accepted into the window",
                m.accepted.clone(),
            );
            r.register(
                "checkpoints_rejected",
                "Checkpoints rejected, by reason",
                m.rejected.clone(),
            );
            r.register(
                "checkpoints_skipped",
                "Checkpoints skipped (outside the phase or interval)",
                m.skipped.clone(),
            );
            r.register(
                "checkpoints_lost",
                "Complete checkpoints deleted before pmad could use them",
                m.lost.clone(),
            );
            r.register("merges", "Emissions by recipe and result", m.merges.clone());
            r.register_with_unit(
                "merge_duration",
                "Emission wall time",
                Unit::Seconds,
                m.merge_duration.clone(),
            );
            r.register_with_unit(
                "read",
                "Tensor bytes read from checkpoints",
                Unit::Bytes,
                m.read_bytes.clone(),
            );
            r.register_with_unit(
                "written",
                "Tensor bytes written to outputs",
                Unit::Bytes,
                m.written_bytes.clone(),
            );
            r.register(
                "window_checkpoints",
                "Checkpoints pinned in the window",
                m.window.clone(),
            );
            r.register(
                "last_emitted_step",
                "Newest step published, by recipe",
                m.last_emitted_step.clone(),
            );
            r.register_with_unit(
                "last_success_timestamp",
                "Unix time of the last successful emission",
                Unit::Seconds,
                m.last_success.clone(),
            );
            r.register(
                "newest_checkpoint_step",
                "Newest accepted checkpoint step",
                m.newest_step.clone(),
            );
            r.register_with_unit(
                "lag",
                "Time from the newest published checkpoint being written to its output",
                Unit::Seconds,
                m.lag.clone(),
            );
            r.register(
                "spikes",
                "Loss spikes detected, by the series that spiked first",
                m.spikes.clone(),
            );
            r.register(
                "spike_active",
                "1 while a loss spike is in progress and checkpoints are not absorbed",
                m.spike_active.clone(),
            );
            r.register(
                "ready",
                "1 when /readyz answers 200 (first scan done, watcher running, outputs writable)",
                m.ready.clone(),
            );
            r.register(
                "partition_parts_present",
                "Parts present for the oldest output waiting to be committed, by recipe",
                m.parts_present.clone(),
            );
            r.register_with_unit(
                "partition_commit_wait",
                "Time the oldest output waiting to be committed has waited, by recipe",
                Unit::Seconds,
                m.commit_wait.clone(),
            );
            r.register(
                "partition_abandoned",
                "Outputs abandoned with parts missing, by recipe",
                m.parts_abandoned.clone(),
            );
            r.register(
                "partition_plan_mismatches",
                "Staging directories of another plan for a step this instance wrote a part of",
                m.plan_mismatches.clone(),
            );
            r.register_with_unit(
                "output_free",
                "Free bytes on the output filesystem, by recipe",
                Unit::Bytes,
                m.output_free.clone(),
            );
        }
        {
            let r = registry.sub_registry_with_prefix("process");
            r.register_with_unit(
                "resident_memory",
                "Resident set size",
                Unit::Bytes,
                m.process_rss.clone(),
            );
            r.register_with_unit(
                "cpu",
                "User and system CPU time",
                Unit::Seconds,
                m.process_cpu.clone(),
            );
            r.register("open_fds", "Open file descriptors", m.process_fds.clone());
            r.register_with_unit(
                "start_time",
                "Start time since the epoch",
                Unit::Seconds,
                m.process_start.clone(),
            );
        }
        Metrics { registry, ..m }
    }

    /// Count a rejection.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Count an emission outcome.
    pub fn merge(&self, name: &str, result: &str, secs: Option<f64>) {
        let mut l = recipe(name);
        l.push(("result".into(), result.into()));
        self.merges.get_or_create(&l).inc();
        if let Some(s) = secs {
            self.merge_duration.get_or_create(&recipe(name)).observe(s);
        }
    }

    /// Record a successful emission.
    pub fn emitted(&self, name: &str, step: u64, bytes: u64) {
        self.last_emitted_step
            .get_or_create(&recipe(name))
            .set(step as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_success.get_or_create(&recipe(name)).set(now);
        self.written_bytes.inc_by(bytes);
    }

    /// Count a detected spike.
    pub fn spike(&self, series: &str) {
        self.spikes
            .get_or_create(&vec![("series".into(), series.into())])
            .inc();
    }

    /// Set a recipe's output free space.
    pub fn free(&self, name: &str, bytes: u64) {
        self.output_free
            .get_or_create(&recipe(name))
            .set(bytes.min(i64::MAX as u64) as i64);
    }

    /// Prometheus text exposition (process metrics refreshed first).
    pub fn render(&self) -> String {
        self.refresh_process();
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }

    fn refresh_process(&self) {
        let _one_at_a_time = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
        let page = crate::sys::page_size() as i64;
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some(rss) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|x| x.parse::<i64>().ok())
            {
                self.process_rss.set(rss * page);
            }
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name; utime, stime are 14, 15 (1-based).
            if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let tick = crate::sys::clock_ticks_per_second() as f64;
                let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
                let cpu = (num(11) + num(12)) / tick;
                let seen = self.process_cpu.get();
                if cpu > seen {
                    self.process_cpu.inc_by(cpu - seen);
                }
                let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("btime "))
                        .and_then(|l| l[6..].trim().parse::<f64>().ok())
                });
                if let Some(b) = boot {
                    self.process_start.set(b + num(19) / tick);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/proc/self/fd") {
            self.process_fds.set(rd.count() as i64);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let m = Metrics::new();
        m.discovered.inc();
        m.reject("invalid");
        m.merge("sma10", "ok", Some(2.0));
        m.emitted("sma10", 1200, 10);
        m.free("sma10", 123);
        m.spike("loss");
        let text = m.render();
        for name in [
            "# TYPE pmad_build_info gauge",
            "pmad_build_info{version=",
            "pmad_checkpoints_discovered_total 1",
            "pmad_scans_total 0",
            "pmad_checkpoints_accepted_total 0",
            "pmad_checkpoints_lost_total 0",
            "pmad_checkpoints_rejected_total{reason=\"invalid\"} 1",
            "pmad_merges_total{recipe=\"sma10\",result=\"ok\"} 1",
            "pmad_merge_duration_seconds_bucket",
            "pmad_read_bytes_total",
            "pmad_written_bytes_total 10",
            "pmad_window_checkpoints",
            "pmad_last_emitted_step{recipe=\"sma10\"} 1200",
            "pmad_last_success_timestamp_seconds{recipe=\"sma10\"}",
            "pmad_newest_checkpoint_step",
            "pmad_lag_seconds",
            "pmad_output_free_bytes{recipe=\"sma10\"} 123",
            "pmad_spikes_total{series=\"loss\"} 1",
            "pmad_spike_active 0",
            "pmad_ready 0",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
