//! The `/status` snapshot and the gauges, refreshed from the parts after every cycle.

use super::schedule::{Due, Schedule};
use super::tracker::Tracker;
use super::window::Window;
use crate::config::Config;
use crate::obs::log::secs;
use crate::obs::status::{RecipeStatus, StatusSnapshot};
use crate::obs::Shared;
use crate::output::OutDir;
use std::time::{Instant, SystemTime};

/// Refresh the `/status` snapshot and the gauges (free space is read here, on the blocking
/// pool, never by the HTTP handlers).
pub fn publish(
    shared: &Shared,
    cfg: &Config,
    window: &Window,
    schedule: &Schedule,
    tracker: &Tracker,
    outputs: &[OutDir],
    spike_onset: Option<u64>,
) {
    let m = &shared.metrics;
    let steps = window.steps();
    m.window.set(steps.len() as i64);
    if let Some(n) = window.newest() {
        m.newest_step.set(n as i64);
    }
    let now = Instant::now();
    let recipes = cfg
        .recipes
        .iter()
        .zip(outputs)
        .enumerate()
        .map(|(ri, (r, out))| {
            if let Ok(st) = rustix::fs::statvfs(out.path()) {
                m.free(&r.name, st.f_bavail.saturating_mul(st.f_frsize));
            }
            let held = window.held(ri);
            let next_due = match schedule.due(ri, window.ready(ri), now) {
                Due::Now => "now".to_string(),
                Due::At(t) => format!("in {}", secs(t.saturating_duration_since(now))),
                Due::No if !window.ready(ri) => {
                    format!("window filling ({}/{})", held.len(), r.window)
                }
                Due::No => format!(
                    "after {} more accepted checkpoint(s)",
                    schedule.remaining(ri)
                ),
            };
            let last = schedule.last_step(ri);
            RecipeStatus {
                name: r.name.clone(),
                method: r.method.name().into(),
                steps: held.to_vec(),
                last_emitted_step: last,
                last_output: last.map(|s| out.step_path(s).display().to_string()),
                last_emit_unix: schedule.last_emit(ri).map(|t| {
                    (SystemTime::now() - t.elapsed())
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                }),
                next_due,
            }
        })
        .collect();
    let snap = StatusSnapshot {
        version: env!("CARGO_PKG_VERSION").into(),
        watch_dir: cfg.watch.dir.display().to_string(),
        window: steps,
        newest_checkpoint_step: window.newest(),
        recipes,
        state_dir: cfg.state.dir.as_ref().map(|d| d.display().to_string()),
        accumulator: window.accumulator().name().into(),
        pending: tracker.pending(),
        spike_onset,
    };
    if let Ok(mut s) = shared.status.lock() {
        *s = snap;
    }
}
