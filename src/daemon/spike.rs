//! The loss-spike sentinel: watches the training curves a checkpoint carries and says when the
//! run has spiked (so no recipe absorbs what came after) and when it is healthy again.
//!
//! HF's `trainer_state.json` holds the run's whole `log_history`; every new checkpoint brings
//! the entries logged since the last one. Each value of a watched series (`loss`,
//! `grad_norm`, ...) is scored against the trailing window of that series' healthy values
//! with a robust z-score: z = (x − median) / (1.4826 · MAD). A value with z ≥ `z`, or one
//! that is not finite, is a spike; its step is the onset (the first spiking series sets it).
//! While a series is spiking its values do not enter its window, so the baseline stays the
//! pre-spike distribution; it recovers when a value scores below `recover_z` again, and the
//! run is healthy when every series has recovered. Scores need at least [`MIN_HISTORY`]
//! healthy values (only a non-finite value is a spike before that): sparse logging gives no
//! false alarms, at the cost of seeing spikes late. HF logs `loss` averaged over
//! `logging_steps` and `grad_norm` at a single step, so both under-sample short spikes.
//!
//! Pure: entries come in as values; no I/O, no clock.

use crate::format::hf::{json_f64, parse_python_json};
use std::collections::{BTreeMap, VecDeque};

/// Healthy values a series needs before its values are scored.
pub const MIN_HISTORY: usize = 8;

/// The sentinel's settings (`[spike]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The `log_history` keys watched.
    pub series: Vec<String>,
    /// Healthy values kept per series.
    pub window: usize,
    /// A value scoring at least this is a spike.
    pub z: f64,
    /// A spiking series recovers when a value scores below this.
    pub recover_z: f64,
}

/// Where a spike began.
#[derive(Debug, Clone, PartialEq)]
pub struct Onset {
    /// The step of the first spiking value.
    pub step: u64,
    /// The series it was seen in.
    pub series: String,
    /// The value.
    pub value: f64,
    /// Its score (infinite for a non-finite value).
    pub z: f64,
    /// The median of the healthy window it was scored against.
    pub median: f64,
    /// The window's robust scale (1.4826 · MAD).
    pub scale: f64,
}

/// A change of the run's health.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A spike began (the first series to spike).
    Detected(Onset),
    /// Every series is healthy again.
    Recovered {
        /// The step of the value that recovered last.
        step: u64,
        /// Its series.
        series: String,
        /// The value.
        value: f64,
        /// Its score.
        z: f64,
    },
}

#[derive(Debug, Default)]
struct SeriesState {
    /// Healthy values, oldest first, at most `window`.
    healthy: VecDeque<f64>,
    spiking: bool,
}

/// The sentinel over one run.
#[derive(Debug)]
pub struct Sentinel {
    settings: Settings,
    series: BTreeMap<String, SeriesState>,
    onset: Option<Onset>,
    /// The newest step whose entries were taken in.
    fed_upto: Option<u64>,
    /// Recent (step, value) per series, for `rescue.json`.
    recent: BTreeMap<String, VecDeque<(u64, f64)>>,
}

/// The entries of an HF `trainer_state.json`'s `log_history` for the watched series:
/// (step, series, value), in step order. Non-finite values (Python writes `NaN`) are kept.
pub fn history(trainer_state: &[u8], series: &[String]) -> Result<Vec<(u64, String, f64)>, String> {
    let v = parse_python_json(trainer_state)
        .map_err(|e| format!("trainer_state.json is not valid JSON: {e}"))?;
    let log = v
        .get("log_history")
        .and_then(|h| h.as_array())
        .ok_or("trainer_state.json has no log_history list")?;
    let mut out = Vec::new();
    for e in log {
        let Some(step) = e.get("step").and_then(|s| s.as_u64()) else {
            continue;
        };
        for name in series {
            if let Some(x) = e.get(name).and_then(json_f64) {
                out.push((step, name.clone(), x));
            }
        }
    }
    out.sort_by_key(|e| e.0);
    Ok(out)
}

/// The median of a non-empty list.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Robust z-score of `x` against `healthy` (None while there are too few values): with a
/// zero MAD (a constant series) any rise scores infinite.
fn score(healthy: &VecDeque<f64>, x: f64) -> Option<(f64, f64, f64)> {
    if !x.is_finite() {
        let m = if healthy.is_empty() {
            f64::NAN
        } else {
            median(&mut healthy.iter().copied().collect::<Vec<_>>())
        };
        return Some((f64::INFINITY, m, f64::NAN));
    }
    if healthy.len() < MIN_HISTORY {
        return None;
    }
    let m = median(&mut healthy.iter().copied().collect::<Vec<_>>());
    let mad = median(&mut healthy.iter().map(|v| (v - m).abs()).collect::<Vec<_>>());
    let scale = 1.4826 * mad;
    let z = if scale > 0.0 {
        (x - m) / scale
    } else if x > m {
        f64::INFINITY
    } else {
        0.0
    };
    Some((z, m, scale))
}

impl Sentinel {
    /// A sentinel that has seen nothing.
    pub fn new(settings: Settings) -> Sentinel {
        Sentinel {
            settings,
            series: BTreeMap::new(),
            onset: None,
            fed_upto: None,
            recent: BTreeMap::new(),
        }
    }

    /// The spike in progress, if any.
    pub fn onset(&self) -> Option<&Onset> {
        self.onset.as_ref()
    }

    /// The last values seen of `series` (up to the window), oldest first.
    pub fn recent(&self, series: &str) -> Vec<(u64, f64)> {
        self.recent
            .get(series)
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Take in a checkpoint's history (all of it: entries already taken in are skipped) and
    /// return what changed, in order.
    pub fn feed(&mut self, history: &[(u64, String, f64)]) -> Vec<Change> {
        let mut changes = Vec::new();
        let from = self.fed_upto;
        for (step, name, x) in history {
            if from.is_some_and(|f| *step <= f) {
                continue;
            }
            self.fed_upto = self.fed_upto.max(Some(*step));
            let recent = self.recent.entry(name.clone()).or_default();
            recent.push_back((*step, *x));
            while recent.len() > self.settings.window + 4 {
                recent.pop_front();
            }
            let st = self.series.entry(name.clone()).or_default();
            let scored = score(&st.healthy, *x);
            let z = scored.map(|s| s.0);
            if st.spiking {
                if z.is_some_and(|z| z < self.settings.recover_z) {
                    st.spiking = false;
                    st.healthy.push_back(*x);
                    if self.series.values().all(|s| !s.spiking) && self.onset.take().is_some() {
                        changes.push(Change::Recovered {
                            step: *step,
                            series: name.clone(),
                            value: *x,
                            z: z.unwrap_or(0.0),
                        });
                    }
                }
            } else if let Some((z, median, scale)) =
                scored.filter(|s| s.0 >= self.settings.z || s.0.is_nan())
            {
                st.spiking = true;
                if self.onset.is_none() {
                    let onset = Onset {
                        step: *step,
                        series: name.clone(),
                        value: *x,
                        z,
                        median,
                        scale,
                    };
                    self.onset = Some(onset.clone());
                    changes.push(Change::Detected(onset));
                }
            } else {
                st.healthy.push_back(*x);
            }
            let st = self.series.entry(name.clone()).or_default();
            while st.healthy.len() > self.settings.window {
                st.healthy.pop_front();
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            series: vec!["loss".into(), "grad_norm".into()],
            window: 32,
            z: 6.0,
            recover_z: 3.0,
        }
    }

    /// A noisy, slowly falling loss: 2.0 - 0.001 step/10 plus deterministic noise of ±0.02.
    fn loss(step: u64) -> f64 {
        let noise = ((step * 7919) % 101) as f64 / 101.0 - 0.5;
        2.0 - 0.0001 * step as f64 + 0.04 * noise
    }

    fn entries(
        steps: impl Iterator<Item = u64>,
        f: impl Fn(u64) -> f64,
    ) -> Vec<(u64, String, f64)> {
        steps.map(|s| (s, "loss".to_string(), f(s))).collect()
    }

    #[test]
    fn a_jump_is_a_spike_and_coming_back_down_recovers() {
        let mut s = Sentinel::new(settings());
        // Healthy history: nothing happens.
        assert!(s.feed(&entries((10..=500).step_by(10), loss)).is_empty());
        // A jump to 5x the loss at 510..530, then back to normal from 540.
        let spiky = |step: u64| {
            if (510..=530).contains(&step) {
                10.0
            } else {
                loss(step)
            }
        };
        let ch = s.feed(&entries((10..=600).step_by(10), spiky));
        assert_eq!(ch.len(), 2, "{ch:?}");
        let Change::Detected(o) = &ch[0] else {
            panic!("{ch:?}")
        };
        assert_eq!((o.step, o.series.as_str(), o.value), (510, "loss", 10.0));
        assert!(o.z > 100.0 && (o.median - loss(250)).abs() < 0.1, "{o:?}");
        assert!(
            matches!(&ch[1], Change::Recovered { step: 540, .. }),
            "{ch:?}"
        );
        assert!(s.onset().is_none());
    }

    #[test]
    fn feeding_stops_at_a_spike_still_in_progress() {
        let mut s = Sentinel::new(settings());
        s.feed(&entries((10..=300).step_by(10), loss));
        let rising = |step: u64| {
            if step > 300 {
                3.0 + step as f64
            } else {
                loss(step)
            }
        };
        let ch = s.feed(&entries((10..=400).step_by(10), rising));
        assert!(
            matches!(&ch[..], [Change::Detected(o)] if o.step == 310),
            "{ch:?}"
        );
        assert_eq!(s.onset().map(|o| o.step), Some(310));
        // Still high at the next checkpoint: no new change, the onset stays.
        assert!(s.feed(&entries((10..=500).step_by(10), rising)).is_empty());
        assert_eq!(s.onset().map(|o| o.step), Some(310));
    }

    #[test]
    fn slow_drifts_are_not_spikes() {
        // A loss that creeps up by 30% over 1000 logged values (a run going bad slowly), and
        // one that falls steeply: the trailing window follows both.
        for slope in [0.0003, -0.0015] {
            let mut s = Sentinel::new(settings());
            let f = |step: u64| loss(step) + slope * step as f64;
            let ch = s.feed(&entries((10..=10_000).step_by(10), f));
            assert!(ch.is_empty(), "slope {slope}: {ch:?}");
        }
    }

    #[test]
    fn non_finite_values_are_spikes_even_without_history() {
        let mut s = Sentinel::new(settings());
        let ch = s.feed(&[
            (10, "loss".into(), 2.0),
            (20, "grad_norm".into(), f64::NAN),
            (30, "loss".into(), f64::INFINITY),
        ]);
        assert!(
            matches!(&ch[..], [Change::Detected(o)] if o.step == 20 && o.series == "grad_norm" && o.z.is_infinite()),
            "{ch:?}"
        );
    }

    #[test]
    fn sparse_logging_decides_nothing_until_there_is_history() {
        let mut s = Sentinel::new(settings());
        // Seven values, the last one high: too little history to score it.
        let few = |step: u64| if step == 70 { 50.0 } else { loss(step) };
        assert!(s.feed(&entries((10..=70).step_by(10), few)).is_empty());
        // Entries already taken in are skipped when the next checkpoint repeats them.
        assert!(s.feed(&entries((10..=70).step_by(10), few)).is_empty());
        assert_eq!(s.recent("loss").len(), 7);
    }

    #[test]
    fn grad_norm_leads_and_every_series_must_recover() {
        let mut s = Sentinel::new(settings());
        let mut h = Vec::new();
        for step in (10..=400).step_by(10) {
            let bad = (310..=350).contains(&step);
            h.push((
                step,
                "grad_norm".to_string(),
                if bad { 40.0 } else { 1.0 + loss(step) / 10.0 },
            ));
            h.push((
                step,
                "loss".to_string(),
                if (330..=370).contains(&step) {
                    9.0
                } else {
                    loss(step)
                },
            ));
        }
        let ch = s.feed(&h);
        assert!(
            matches!(&ch[0], Change::Detected(o) if o.step == 310 && o.series == "grad_norm"),
            "{ch:?}"
        );
        // grad_norm is back at 360, the loss only at 380: healthy from 380.
        assert!(
            matches!(&ch[1], Change::Recovered { step: 380, series, .. } if series == "loss"),
            "{ch:?}"
        );
        assert_eq!(ch.len(), 2);
    }

    #[test]
    fn history_reads_the_watched_series_from_python_json() {
        let ts = br#"{"global_step": 30, "log_history": [
            {"step": 20, "loss": NaN, "grad_norm": 1.5, "learning_rate": 0.001},
            {"step": 10, "loss": 2.5, "grad_norm": 1.2},
            {"step": 30, "eval_loss": 2.0}]}"#;
        let h = history(ts, &["loss".into(), "grad_norm".into()]).unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!((h[0].0, h[0].1.as_str(), h[0].2), (10, "loss", 2.5));
        assert!(h[2].2.is_nan() && h[2].0 == 20);
        assert!(history(b"{}", &["loss".into()]).is_err());
    }
}
