//! When each recipe publishes: its emission state and the rule that says an output is due.
//!
//! A recipe is due when its sums are ready (a full window, or any EMA state), at least
//! `emit_every` accepted checkpoints went into them since its last emission (0: by interval
//! only), and `emit_interval` (if set) has passed since that emission. A failed emission is
//! retried with the next arrival or interval, never in a tight loop. After a restart, the
//! newest output published before the crash but after the last state save is *expected*:
//! when the re-processed window reaches exactly that output again, it counts as published
//! instead of being published twice, and outputs of the steps before it are not published
//! again either ([`Schedule::superseded`]).
//!
//! Pure bookkeeping: no I/O, no clock reads (callers pass `now`).

use crate::config::Recipe;
use std::time::{Duration, Instant};

/// Whether a recipe should publish now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Not until more checkpoints arrive.
    No,
    /// Now.
    Now,
    /// At this time, if nothing else changes.
    At(Instant),
}

/// One recipe's emission state.
#[derive(Debug, Clone)]
struct RecipeSchedule {
    emit_every: u64,
    emit_interval: Option<Duration>,
    /// Accepted checkpoints that went into the sums since the last emission.
    since: u64,
    /// When it last published (or last failed to).
    last_emit: Option<Instant>,
    /// The step it last published.
    last_step: Option<u64>,
    /// An output published before a restart, after the last state save.
    expected: Option<u64>,
}

/// Emission state of every recipe, in config order.
#[derive(Debug, Clone)]
pub struct Schedule {
    recipes: Vec<RecipeSchedule>,
}

impl Schedule {
    /// Nothing published yet.
    pub fn new(recipes: &[Recipe]) -> Schedule {
        Schedule {
            recipes: recipes
                .iter()
                .map(|r| RecipeSchedule {
                    emit_every: r.emit_every,
                    emit_interval: r.emit_interval,
                    since: 0,
                    last_emit: None,
                    last_step: None,
                    expected: None,
                })
                .collect(),
        }
    }

    /// Recipe `ri`'s sums took in another checkpoint.
    pub fn absorbed(&mut self, ri: usize) {
        self.recipes[ri].since += 1;
    }

    /// Whether recipe `ri`, whose sums are `ready` or not, is due at `now`.
    pub fn due(&self, ri: usize, ready: bool, now: Instant) -> Due {
        let r = &self.recipes[ri];
        if !ready || r.since == 0 {
            return Due::No;
        }
        if r.emit_every > 0 && r.since < r.emit_every {
            return Due::No;
        }
        match (r.emit_interval, r.last_emit) {
            (Some(iv), Some(last)) if now < last + iv => Due::At(last + iv),
            _ => Due::Now,
        }
    }

    /// Accepted checkpoints still needed before recipe `ri` is due (for `/status`).
    pub fn remaining(&self, ri: usize) -> u64 {
        let r = &self.recipes[ri];
        r.emit_every.saturating_sub(r.since).max(1)
    }

    /// Recipe `ri` published (or found already published) the output of `step` at `now`.
    pub fn emitted(&mut self, ri: usize, step: u64, now: Instant) {
        let r = &mut self.recipes[ri];
        r.since = 0;
        r.last_emit = Some(now);
        r.last_step = Some(step);
    }

    /// Recipe `ri` was due but its output was not published on purpose (retention would have
    /// deleted it at once): count from here as if it had been.
    pub fn passed(&mut self, ri: usize) {
        self.recipes[ri].since = 0;
    }

    /// Recipe `ri`'s emission failed at `now`: try again with the next arrival or interval.
    pub fn failed(&mut self, ri: usize, now: Instant) {
        let r = &mut self.recipes[ri];
        r.since = 0;
        r.last_emit = Some(now);
    }

    /// The step recipe `ri` last published.
    pub fn last_step(&self, ri: usize) -> Option<u64> {
        self.recipes[ri].last_step
    }

    /// When recipe `ri` last published (or failed to).
    pub fn last_emit(&self, ri: usize) -> Option<Instant> {
        self.recipes[ri].last_emit
    }

    /// Recipe `ri`'s saved counters: (accepted since the last emission, last published step).
    pub fn saved(&self, ri: usize) -> (u64, Option<u64>) {
        let r = &self.recipes[ri];
        (r.since, r.last_step)
    }

    /// Restore recipe `ri`'s saved counters.
    pub fn restore(&mut self, ri: usize, since: u64, last_step: Option<u64>) {
        let r = &mut self.recipes[ri];
        r.since = since;
        r.last_step = last_step;
    }

    /// Recipe `ri` is known to have published `step` before the restart (no time known).
    pub fn published_before(&mut self, ri: usize, step: u64) {
        let r = &mut self.recipes[ri];
        r.since = 0;
        r.last_step = Some(step);
    }

    /// Recipe `ri` published `step`, newer than the restored state: expect the re-processed
    /// window to reach it again.
    pub fn expect(&mut self, ri: usize, step: u64) {
        self.recipes[ri].expected = Some(step);
    }

    /// A checkpoint at `step` was accepted: the expected output of recipe `ri` that this
    /// arrival reaches (so the caller checks whether it is on disk for exactly the recipe's
    /// steps), if any. Either way the expectation is settled.
    pub fn reached(&mut self, ri: usize, step: u64) -> Option<u64> {
        let r = &mut self.recipes[ri];
        match r.expected {
            Some(p) if step >= p => r.expected.take(),
            _ => None,
        }
    }

    /// The output published before a restart that makes recipe `ri`'s output at `step`
    /// superseded: re-processing a step older than it must not publish (the output is on
    /// disk already, or retention removed it, and `LATEST` never moves back).
    pub fn superseded(&self, ri: usize, step: u64) -> Option<u64> {
        self.recipes[ri].expected.filter(|&p| step < p)
    }

    /// A rollback abandoned steps: no output expected from before the restart can be
    /// reached exactly any more.
    pub fn forget_expected(&mut self) {
        for r in &mut self.recipes {
            r.expected = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn schedule(extra: &str) -> Schedule {
        let text = format!(
            "[watch]\ndir = \"/w\"\n[[recipe]]\nname = \"a\"\nmethod = \"sma\"\nwindow = 2\nout_dir = \"/o\"\n{extra}"
        );
        Schedule::new(&Config::parse(&text).unwrap().recipes)
    }

    #[test]
    fn due_after_every_kth_and_when_ready() {
        let mut s = schedule("emit_every = 2");
        let t = Instant::now();
        assert_eq!(s.due(0, true, t), Due::No);
        s.absorbed(0);
        assert_eq!(s.due(0, true, t), Due::No);
        assert_eq!(s.remaining(0), 1);
        s.absorbed(0);
        assert_eq!(s.due(0, false, t), Due::No, "not ready: window not full");
        assert_eq!(s.due(0, true, t), Due::Now);
        s.emitted(0, 200, t);
        assert_eq!(s.due(0, true, t), Due::No);
        // Passing over a due output restarts the count, without a published step.
        s.absorbed(0);
        s.absorbed(0);
        s.passed(0);
        assert_eq!(s.due(0, true, t), Due::No);
        assert_eq!(s.last_step(0), Some(200));
        assert_eq!(s.saved(0), (0, Some(200)));
    }

    #[test]
    fn interval_limits_and_failures_wait() {
        let mut s = schedule("emit_interval = \"30s\"");
        let t = Instant::now();
        s.absorbed(0);
        assert_eq!(
            s.due(0, true, t),
            Due::Now,
            "first emission is not held back"
        );
        s.emitted(0, 1, t);
        s.absorbed(0);
        assert_eq!(
            s.due(0, true, t + Duration::from_secs(10)),
            Due::At(t + Duration::from_secs(30))
        );
        assert_eq!(s.due(0, true, t + Duration::from_secs(30)), Due::Now);
        // A failure waits for the next arrival (and the interval), never loops.
        s.failed(0, t + Duration::from_secs(31));
        assert_eq!(s.due(0, true, t + Duration::from_secs(90)), Due::No);
        assert_eq!(s.last_step(0), Some(1));
        s.absorbed(0);
        assert_eq!(
            s.due(0, true, t + Duration::from_secs(40)),
            Due::At(t + Duration::from_secs(61))
        );
        // By interval only.
        let mut s = schedule("emit_every = 0\nemit_interval = \"1s\"");
        s.absorbed(0);
        assert_eq!(s.due(0, true, t), Due::Now);
    }

    #[test]
    fn an_output_published_before_the_restart_is_expected_once() {
        let mut s = schedule("");
        s.restore(0, 1, Some(100));
        s.expect(0, 300);
        assert_eq!(s.reached(0, 200), None, "not reached yet");
        assert_eq!(s.reached(0, 300), Some(300));
        assert_eq!(s.reached(0, 400), None, "settled once");
        s.expect(0, 500);
        s.forget_expected();
        assert_eq!(s.reached(0, 500), None);
        s.published_before(0, 300);
        assert_eq!(s.saved(0), (0, Some(300)));
        assert_eq!(s.last_emit(0), None);
    }

    #[test]
    fn steps_before_the_expected_output_are_superseded_until_it_is_reached() {
        let mut s = schedule("");
        assert_eq!(s.superseded(0, 100), None, "nothing expected");
        s.expect(0, 300);
        assert_eq!(s.superseded(0, 100), Some(300));
        assert_eq!(s.superseded(0, 200), Some(300));
        assert_eq!(s.superseded(0, 300), None, "the expected output itself");
        assert_eq!(s.reached(0, 300), Some(300));
        assert_eq!(s.superseded(0, 200), None, "settled");
    }
}
