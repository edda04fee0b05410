//! Selection: which complete checkpoints belong to the constant-LR phase and enter the window.
//!
//! Pure decisions, no I/O: the caller reads `trainer_state.json` and passes its bytes. Owns the
//! rules of the `[phase]` settings: step range, LR plateau, minimum interval. Rollback and
//! out-of-order handling live in the tracker and the window.

use crate::config::PhaseConfig;

/// One learning-rate log entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrPoint {
    /// Training step.
    pub step: u64,
    /// Learning rate logged at that step.
    pub lr: f64,
}

/// Extract `(step, learning_rate)` pairs from an HF `trainer_state.json`, sorted by step.
pub fn lr_history(trainer_state: &[u8]) -> Result<Vec<LrPoint>, String> {
    let v = crate::format::hf::parse_python_json(trainer_state)
        .map_err(|e| format!("trainer_state.json is not valid JSON: {e}"))?;
    let hist = v
        .get("log_history")
        .and_then(|h| h.as_array())
        .ok_or("trainer_state.json has no log_history list")?;
    let mut out: Vec<LrPoint> = hist
        .iter()
        .filter_map(|e| {
            Some(LrPoint {
                step: e.get("step")?.as_u64()?,
                lr: e.get("learning_rate")?.as_f64()?,
            })
        })
        .collect();
    out.sort_by_key(|p| p.step);
    Ok(out)
}

/// The LR in force at `step`: the latest entry at or before it.
pub fn lr_at(hist: &[LrPoint], step: u64) -> Option<f64> {
    let i = hist.partition_point(|p| p.step <= step);
    (i > 0).then(|| hist[i - 1].lr)
}

/// What to do with a complete checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// It belongs to the window.
    Accept,
    /// It does not; the reason is logged on the `checkpoint.skipped` line.
    Skip(String),
}

/// Decide whether the checkpoint at `step` is selected.
///
/// `last_accepted` is the newest accepted step (for `interval_steps`); `lookback` is the step
/// of the previous checkpoint seen in the directory, if any (for the plateau test); `lr` the
/// parsed `trainer_state.json` log history when `lr_from_trainer_state` is on.
///
/// Plateau rule (docs/daemon.md, "Selection"): the LR at `step` must be within `lr_tolerance`
/// (relative) of the highest LR logged so far — so decay is excluded — and of the LR at the
/// previous checkpoint's step — so a still-rising warmup is excluded. With no previous
/// checkpoint, the LR at step/2 stands in for it.
pub fn decide(
    cfg: &PhaseConfig,
    step: u64,
    last_accepted: Option<u64>,
    lookback: Option<u64>,
    lr: Option<&[LrPoint]>,
) -> Decision {
    if step < cfg.start_step {
        return Decision::Skip(format!(
            "before the stable phase (step {step} < phase.start_step {})",
            cfg.start_step
        ));
    }
    if cfg.end_step != 0 && step > cfg.end_step {
        return Decision::Skip(format!(
            "after the stable phase (step {step} > phase.end_step {})",
            cfg.end_step
        ));
    }
    if cfg.lr_from_trainer_state {
        let Some(hist) = lr else {
            return Decision::Skip("no trainer_state.json learning-rate history".into());
        };
        let Some(now) = lr_at(hist, step) else {
            return Decision::Skip(format!(
                "trainer_state.json logs no learning_rate at or before step {step}"
            ));
        };
        let peak = hist
            .iter()
            .take_while(|p| p.step <= step)
            .map(|p| p.lr)
            .fold(f64::MIN, f64::max);
        let tol = cfg.lr_tolerance;
        let close = |a: f64, b: f64| (a - b).abs() <= tol * a.abs().max(b.abs());
        if !close(now, peak) {
            return Decision::Skip(format!("lr {now} is below the plateau lr {peak} (decay)"));
        }
        // Every LR logged since the previous checkpoint (exclusive) must be on the same
        // plateau; with coarse logging and nothing in between, the LR in force at the previous
        // checkpoint stands in.
        let back_step = lookback.filter(|b| *b < step).unwrap_or(step / 2);
        let between: Vec<&LrPoint> = hist
            .iter()
            .filter(|p| p.step > back_step && p.step <= step)
            .collect();
        let off = if between.len() > 1 {
            between
                .iter()
                .find(|p| !close(now, p.lr))
                .map(|p| (p.step, p.lr))
        } else {
            match lr_at(hist, back_step) {
                Some(before) if close(now, before) => None,
                Some(before) => Some((back_step, before)),
                None => {
                    return Decision::Skip(format!(
                        "lr {now}: no lr logged at or before step {back_step} to confirm the plateau (warmup)"
                    ))
                }
            }
        };
        if let Some((s, before)) = off {
            return Decision::Skip(format!(
                "lr {now} is still changing since step {back_step} (lr {before} at step {s}: warmup)"
            ));
        }
    }
    if cfg.interval_steps > 0 {
        if let Some(last) = last_accepted {
            if step > last && step - last < cfg.interval_steps {
                return Decision::Skip(format!(
                    "{} steps after accepted step {last} (phase.interval_steps = {})",
                    step - last,
                    cfg.interval_steps
                ));
            }
        }
    }
    Decision::Accept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PhaseConfig {
        PhaseConfig {
            start_step: 0,
            end_step: 0,
            lr_from_trainer_state: false,
            lr_tolerance: 0.01,
            interval_steps: 0,
        }
    }

    /// WSD schedule: linear warmup to 3e-3 over 100 steps, flat to 1000, linear decay to 0 at
    /// 1200; logged every 10 steps.
    fn wsd() -> Vec<LrPoint> {
        (1..=120)
            .map(|i| {
                let step = i * 10;
                let lr = if step <= 100 {
                    3e-3 * step as f64 / 100.0
                } else if step <= 1000 {
                    3e-3
                } else {
                    3e-3 * (1200 - step) as f64 / 200.0
                };
                LrPoint { step, lr }
            })
            .collect()
    }

    #[test]
    fn step_range_and_interval() {
        let mut c = cfg();
        c.start_step = 100;
        c.end_step = 500;
        c.interval_steps = 200;
        assert!(
            matches!(decide(&c, 50, None, None, None), Decision::Skip(s) if s.contains("start_step"))
        );
        assert!(
            matches!(decide(&c, 600, None, None, None), Decision::Skip(s) if s.contains("end_step"))
        );
        assert_eq!(decide(&c, 100, None, None, None), Decision::Accept);
        assert!(
            matches!(decide(&c, 200, Some(100), None, None), Decision::Skip(s) if s.contains("interval"))
        );
        assert_eq!(decide(&c, 300, Some(100), None, None), Decision::Accept);
    }

    #[test]
    fn plateau_skips_warmup_and_decay() {
        let mut c = cfg();
        c.lr_from_trainer_state = true;
        let h = wsd();
        // warmup: still rising relative to the previous checkpoint
        assert!(
            matches!(decide(&c, 100, None, Some(50), Some(&h)), Decision::Skip(s) if s.contains("warmup"))
        );
        // first checkpoint on the plateau, no previous checkpoint: compares with step/2 (=150)
        assert_eq!(decide(&c, 300, None, None, Some(&h)), Decision::Accept);
        assert_eq!(decide(&c, 200, None, Some(150), Some(&h)), Decision::Accept);
        assert_eq!(
            decide(&c, 1000, None, Some(950), Some(&h)),
            Decision::Accept
        );
        // LR not logged exactly at 1005: uses the entry at 1000 (still plateau)
        assert_eq!(
            decide(&c, 1005, None, Some(1000), Some(&h)),
            Decision::Accept
        );
        let d = decide(&c, 1100, None, Some(1050), Some(&h));
        assert!(
            matches!(&d, Decision::Skip(s) if s.contains("decay") && s.contains("0.0015")),
            "{d:?}"
        );
        // HF logs the last warmup LR at the previous checkpoint (3e-3 * 49/50 at step 50);
        // every entry since is on the plateau: accepted (seen with the HF Trainer example).
        let hf: Vec<LrPoint> = (1..=20)
            .map(|i| {
                let step = i * 5;
                let lr = match step {
                    s if s < 50 => 3e-3 * s as f64 / 50.0,
                    50 => 2.94e-3,
                    _ => 3e-3,
                };
                LrPoint { step, lr }
            })
            .collect();
        assert_eq!(decide(&c, 100, None, Some(50), Some(&hf)), Decision::Accept);
        // ... while a checkpoint inside the warmup is not.
        assert!(matches!(
            decide(&c, 40, None, Some(20), Some(&hf)),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&c, 5, None, None, Some(&h)),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&c, 300, None, None, None),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn parses_trainer_state() {
        let j = br#"{"global_step": 30, "log_history": [
            {"step": 20, "learning_rate": 0.002, "loss": 1.3},
            {"step": 10, "learning_rate": 0.001, "loss": 1.5},
            {"step": 30, "eval_loss": 1.2}
        ]}"#;
        let h = lr_history(j).unwrap();
        assert_eq!(
            h,
            vec![
                LrPoint {
                    step: 10,
                    lr: 0.001
                },
                LrPoint {
                    step: 20,
                    lr: 0.002
                }
            ]
        );
        assert_eq!(lr_at(&h, 25), Some(0.002));
        assert_eq!(lr_at(&h, 5), None);
        assert!(lr_history(b"{").is_err());
        assert!(lr_history(b"{}").is_err());
    }
}
