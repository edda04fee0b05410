//! Resuming after a restart: from the saved manifest and facts read from disk to a plan.
//!
//! Two pure steps, so every case is unit-tested without a daemon:
//! - [`plan`]: which saved checkpoints are still exactly what was accepted, which recipes'
//!   sums must be recomputed, from which step on checkpoints are processed again. A saved
//!   checkpoint whose files changed means the run went back to it: it and every later step are
//!   abandoned and processed again as they are rewritten. One that vanished is dropped from
//!   the window recipes (an EMA keeps its state: it never reads absorbed checkpoints again).
//! - [`reconcile`]: per recipe, what its output directory says was published. An output for
//!   the restored window's newest step (or later) counts as published; a later one was
//!   published after the last state save, so when re-processing reaches exactly it, it is not
//!   published again; and an output renamed into place whose `LATEST` update was lost to the
//!   crash is finished by writing `LATEST`.

use super::state::Manifest;
use crate::config::Recipe;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What became of a saved checkpoint while pmad was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Still the same files (fingerprints match).
    Same,
    /// Its files changed (or it no longer opens).
    Changed,
    /// Its directory is gone.
    Vanished,
}

/// How to resume.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Saved steps to pin again, oldest first.
    pub keep: Vec<u64>,
    /// Saved steps whose files changed.
    pub changed: Vec<u64>,
    /// Saved steps whose directory is gone.
    pub vanished: Vec<u64>,
    /// Recipes (config order) whose saved sums hold a lost step: recomputed from `keep`.
    pub rebuild: Vec<usize>,
    /// Per recipe, the steps its saved sums hold.
    pub held: Vec<Vec<u64>>,
    /// Per recipe, (accepted since its last emission, last published step).
    pub counters: Vec<(u64, Option<u64>)>,
    /// Checkpoints at or below this step were handled before the restart.
    pub restored_upto: Option<u64>,
    /// Accepted step → directory, for the steps still valid.
    pub paths: Vec<(u64, PathBuf)>,
}

/// Plan a resume from manifest `m`, given what was `found` of each saved checkpoint and the
/// configured `recipes` (whose signature is `signature`). `None` when the state was saved for
/// other recipes: its sums mean nothing to these (then pmad starts fresh).
pub fn plan(
    m: &Manifest,
    found: &BTreeMap<u64, Found>,
    recipes: &[Recipe],
    signature: &str,
) -> Option<Plan> {
    if m.recipes_signature != signature || m.recipes.len() != recipes.len() {
        return None;
    }
    let with = |f: Found| -> Vec<u64> {
        m.window
            .iter()
            .filter(|e| found.get(&e.step).copied().unwrap_or(Found::Vanished) == f)
            .map(|e| e.step)
            .collect()
    };
    let (same, changed, vanished) = (
        with(Found::Same),
        with(Found::Changed),
        with(Found::Vanished),
    );
    // A changed checkpoint means the run went back to it: it and everything after it are
    // abandoned.
    let cut = changed.iter().min().copied();
    let before_cut = |s: u64| cut.is_none_or(|c| s < c);
    let lost: Vec<u64> = changed.iter().chain(&vanished).copied().collect();
    let rebuild = recipes
        .iter()
        .zip(&m.recipes)
        .enumerate()
        .filter(|(_, (r, saved))| {
            if matches!(r.method, crate::math::Method::Ema { .. }) {
                saved.absorbed.iter().any(|s| !before_cut(*s))
            } else {
                saved.members.iter().any(|s| lost.contains(s))
            }
        })
        .map(|(i, _)| i)
        .collect();
    Some(Plan {
        keep: same.into_iter().filter(|s| before_cut(*s)).collect(),
        held: recipes
            .iter()
            .zip(&m.recipes)
            .map(|(r, saved)| {
                if matches!(r.method, crate::math::Method::Ema { .. }) {
                    saved.absorbed.clone()
                } else {
                    saved.members.clone()
                }
            })
            .collect(),
        counters: m
            .recipes
            .iter()
            .map(|s| (s.since_emit, s.last_emitted_step))
            .collect(),
        restored_upto: match cut {
            Some(c) => c.checked_sub(1),
            None => m.newest_step,
        },
        paths: m
            .paths
            .iter()
            .filter(|(s, _)| before_cut(*s))
            .cloned()
            .collect(),
        changed,
        vanished,
        rebuild,
    })
}

/// What a recipe's output directory says about the restored window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// Nothing to do.
    Nothing,
    /// `LATEST` names the newest held step or a later one: published (`last`). A later one
    /// was published after the last state save: `expect` it to be reached again.
    Published {
        /// The step `LATEST` names.
        last: u64,
        /// `last`, when newer than the restored window.
        expect: Option<u64>,
    },
    /// The output for the newest held step is complete on disk but `LATEST` still names an
    /// older one (a crash between the rename and the `LATEST` update): point `LATEST` at it.
    FinishLatest(u64),
}

/// Reconcile a recipe whose restored sums hold steps up to `newest` with its output
/// directory: `latest` is the step `LATEST` names; `published_as_newest` tells (when asked)
/// whether `step-<newest>` exists with exactly the recipe's steps.
pub fn reconcile(
    newest: Option<u64>,
    latest: Option<u64>,
    published_as_newest: impl FnOnce() -> bool,
) -> Reconciled {
    let Some(newest) = newest else {
        return Reconciled::Nothing;
    };
    match latest {
        Some(l) if l >= newest => Reconciled::Published {
            last: l,
            expect: (l > newest).then_some(l),
        },
        _ if published_as_newest() => Reconciled::FinishLatest(newest),
        _ => Reconciled::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::daemon::state::{recipes_signature, SavedCheckpoint, SavedRecipe, FORMAT};
    use crate::math::accum::FlatLayout;
    use crate::math::kinds::Accumulator;

    fn recipes() -> Vec<Recipe> {
        Config::parse(
            "[watch]\ndir = \"/w\"\n\
             [[recipe]]\nname = \"sma\"\nmethod = \"sma\"\nwindow = 3\nout_dir = \"/o/s\"\n\
             [[recipe]]\nname = \"ema\"\nmethod = \"ema\"\nalpha = 0.5\nout_dir = \"/o/e\"\n",
        )
        .unwrap()
        .recipes
    }

    /// A manifest after steps 100..=500 (window 3: 300, 400, 500; the EMA absorbed all).
    fn manifest() -> Manifest {
        let steps = [100, 200, 300, 400, 500];
        Manifest {
            format: FORMAT,
            generation: 4,
            accumulator: Accumulator::F32,
            recipes_signature: recipes_signature(&recipes()),
            layout: FlatLayout {
                tensors: vec![],
                total: 0,
            },
            window: steps[2..]
                .iter()
                .map(|s| SavedCheckpoint {
                    step: *s,
                    path: format!("/w/checkpoint-{s}").into(),
                    files: vec![],
                })
                .collect(),
            recipes: vec![
                SavedRecipe {
                    name: "sma".into(),
                    members: vec![300, 400, 500],
                    absorbed: vec![],
                    since_emit: 0,
                    last_emitted_step: Some(500),
                },
                SavedRecipe {
                    name: "ema".into(),
                    members: vec![],
                    absorbed: steps.to_vec(),
                    since_emit: 1,
                    last_emitted_step: Some(400),
                },
            ],
            newest_step: Some(500),
            paths: steps
                .iter()
                .map(|s| (*s, format!("/w/checkpoint-{s}").into()))
                .collect(),
        }
    }

    fn found(f: &[(u64, Found)]) -> BTreeMap<u64, Found> {
        f.iter().copied().collect()
    }

    fn plan_of(f: &[(u64, Found)]) -> Plan {
        let r = recipes();
        plan(&manifest(), &found(f), &r, &recipes_signature(&r)).unwrap()
    }

    #[test]
    fn everything_still_there() {
        let p = plan_of(&[(300, Found::Same), (400, Found::Same), (500, Found::Same)]);
        assert_eq!(p.keep, [300, 400, 500]);
        assert!(p.rebuild.is_empty() && p.changed.is_empty() && p.vanished.is_empty());
        assert_eq!(p.restored_upto, Some(500));
        assert_eq!(p.held, [vec![300, 400, 500], vec![100, 200, 300, 400, 500]]);
        assert_eq!(p.counters, [(0, Some(500)), (1, Some(400))]);
        assert_eq!(p.paths.len(), 5);
    }

    #[test]
    fn vanished_checkpoints_rebuild_the_window_recipes_only() {
        // Rotated away while pmad was down: the SMA loses a member, the EMA keeps its state.
        let p = plan_of(&[
            (300, Found::Vanished),
            (400, Found::Same),
            (500, Found::Same),
        ]);
        assert_eq!(p.keep, [400, 500]);
        assert_eq!(p.vanished, [300]);
        assert_eq!(p.rebuild, [0]);
        assert_eq!(p.restored_upto, Some(500), "nothing is processed again");
        // A checkpoint the manifest lists but nobody looked for counts as vanished.
        let p = plan_of(&[(400, Found::Same), (500, Found::Same)]);
        assert_eq!(p.vanished, [300]);
    }

    #[test]
    fn a_changed_checkpoint_rolls_back_from_its_step() {
        // The run went back to 400 and rewrote it: 400 and 500 are abandoned, both recipes
        // recomputed, and everything from 400 on is processed again.
        let p = plan_of(&[
            (300, Found::Same),
            (400, Found::Changed),
            (500, Found::Same),
        ]);
        assert_eq!(p.keep, [300]);
        assert_eq!(p.changed, [400]);
        assert_eq!(p.rebuild, [0, 1]);
        assert_eq!(p.restored_upto, Some(399));
        assert_eq!(
            p.paths.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [100, 200, 300]
        );
        // Changed at the very first step: nothing is restored as handled.
        let mut m = manifest();
        m.window[0].step = 0;
        let r = recipes();
        let p = plan(
            &m,
            &found(&[(0, Found::Changed)]),
            &r,
            &recipes_signature(&r),
        )
        .unwrap();
        assert_eq!(p.restored_upto, None);
    }

    #[test]
    fn changed_recipes_start_fresh() {
        let r = recipes();
        let e = plan(
            &manifest(),
            &found(&[]),
            &r[..1],
            &recipes_signature(&r[..1]),
        );
        assert_eq!(e, None);
        let e = plan(
            &manifest(),
            &found(&[]),
            &r,
            "sma:Sma:4;ema:Ema { alpha: 0.5 }:1",
        );
        assert_eq!(e, None);
    }

    #[test]
    fn outputs_are_reconciled_with_the_restored_window() {
        let never = || -> bool { panic!("not asked") };
        // LATEST names exactly the restored newest step: published.
        assert_eq!(
            reconcile(Some(500), Some(500), never),
            Reconciled::Published {
                last: 500,
                expect: None
            }
        );
        // Already published past the restored state (its save was lost): expect it.
        assert_eq!(
            reconcile(Some(500), Some(600), never),
            Reconciled::Published {
                last: 600,
                expect: Some(600)
            }
        );
        // A crash between the rename of step-500 and the LATEST update.
        assert_eq!(
            reconcile(Some(500), Some(400), || true),
            Reconciled::FinishLatest(500)
        );
        assert_eq!(
            reconcile(Some(500), None, || true),
            Reconciled::FinishLatest(500)
        );
        // Not published yet.
        assert_eq!(
            reconcile(Some(500), Some(400), || false),
            Reconciled::Nothing
        );
        assert_eq!(reconcile(None, Some(400), never), Reconciled::Nothing);
    }
}
