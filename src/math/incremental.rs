//! How each averaging method is kept up to date as checkpoints arrive: the accumulator slots
//! a recipe needs, the [`Op`]s that add a checkpoint (and drop the one it evicts), the ops that
//! recompute the sums from scratch, and which slot holds the output.
//!
//! - SMA keeps S/N: a sliding sum (add the newest, subtract the evicted).
//! - WMA keeps S/W and T/W with T = Σ i·x_i over positions 1..n: evicting shifts every
//!   position down by one (T −= S), then the newest enters at position n.
//! - EMA keeps e: e += α(x − e), over every accepted checkpoint, not only the window.
//! - `weights` and `schedule` keep nothing: their outputs are computed from the pinned members
//!   at emission (their weights depend on every member's position, so no O(1) update exists).
//!
//! Sums are kept pre-scaled (1/N; 1/W with W = N(N+1)/2) so they hold the output directly and
//! cannot overflow; SMA/WMA/`weights` outputs are published only from a full window, so the
//! scale is fixed. An empty recipe's slots hold nothing meaningful: the first update of an
//! empty recipe starts its slots with `Zero`, so no caller ever has to clear them.
//!
//! A new recipe kind that can be maintained incrementally adds its case to [`Sums`] here (and
//! its weights to [`crate::math::method`]); nothing else in the daemon is method-specific.

use crate::math::accum::Op;
use crate::math::method::Method;

/// One recipe's sums: its method, window and accumulator slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Sums {
    method: Method,
    window: usize,
    /// S (SMA, WMA) or e (EMA).
    first: Option<usize>,
    /// T (WMA).
    second: Option<usize>,
}

impl Sums {
    /// Sums for `method` over `window` checkpoints, taking slots from `*next` on (and moving
    /// `*next` past them).
    pub fn new(method: &Method, window: usize, next: &mut usize) -> Sums {
        let mut take = || {
            *next += 1;
            Some(*next - 1)
        };
        let (first, second) = match method {
            Method::Sma | Method::Ema { .. } => (take(), None),
            Method::Wma => {
                let s = take();
                (s, take())
            }
            Method::Weights(_) | Method::Schedule { .. } => (None, None),
        };
        Sums {
            method: method.clone(),
            window,
            first,
            second,
        }
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Accumulator slots used.
    pub fn slots(&self) -> usize {
        self.first.is_some() as usize + self.second.is_some() as usize
    }

    /// Whether the sums run over every accepted checkpoint (EMA) rather than a window.
    pub fn is_running(&self) -> bool {
        matches!(self.method, Method::Ema { .. })
    }

    /// How many of the newest checkpoints must stay pinned for this recipe.
    pub fn capacity(&self) -> usize {
        if self.is_running() {
            1
        } else {
            self.window
        }
    }

    /// Whether sums holding `held` checkpoints can be published.
    pub fn ready(&self, held: usize) -> bool {
        if self.is_running() {
            held > 0
        } else {
            held == self.window
        }
    }

    /// Whether adding a checkpoint to sums holding `held` evicts the oldest one.
    pub fn evicts(&self, held: usize) -> bool {
        !self.is_running() && held == self.window
    }

    /// Whether an eviction must read the evicted checkpoint (to subtract it).
    pub fn reads_evicted(&self) -> bool {
        !self.is_running() && self.first.is_some()
    }

    /// How many of `pinned` checkpoints (the newest ones) a rebuild averages.
    pub fn rebuild_count(&self, pinned: usize) -> usize {
        if self.is_running() {
            pinned
        } else {
            self.window.min(pinned)
        }
    }

    /// Factor applied to every term so the sums hold the output directly.
    fn scale(&self) -> f64 {
        let n = self.window as f64;
        match self.method {
            Method::Sma => 1.0 / n,
            Method::Wma => 2.0 / (n * (n + 1.0)),
            _ => 1.0,
        }
    }

    /// The slot that holds the output, or `None` when the output is computed from the pinned
    /// members at emission.
    pub fn output_slot(&self) -> Option<usize> {
        match self.method {
            Method::Wma => self.second,
            _ => self.first,
        }
    }

    /// Append the ops that add input `new` to sums holding `held` checkpoints. `evicted` is
    /// the input holding the checkpoint that leaves, given exactly when
    /// [`Sums::evicts`]`(held)` and [`Sums::reads_evicted`].
    pub fn arrive(&self, held: usize, new: usize, evicted: Option<usize>, ops: &mut Vec<Op>) {
        if held == 0 {
            ops.extend(self.first.into_iter().chain(self.second).map(Op::Zero));
        }
        if let Method::Ema { alpha } = self.method {
            if let Some(e) = self.first {
                if held == 0 {
                    ops.push(Op::Axpy {
                        slot: e,
                        input: new,
                        coef: 1.0,
                    });
                } else {
                    ops.push(Op::Ema {
                        slot: e,
                        input: new,
                        alpha,
                    });
                }
            }
            return;
        }
        let n = held as f64;
        let scale = self.scale();
        if let (Method::Wma, Some(t), Some(s)) = (&self.method, self.second, self.first) {
            if evicted.is_some() {
                // Positions 2..=n become 1..n-1, the newest enters at n.
                ops.push(Op::Sub { slot: t, other: s });
                ops.push(Op::Axpy {
                    slot: t,
                    input: new,
                    coef: n * scale,
                });
            } else {
                ops.push(Op::Axpy {
                    slot: t,
                    input: new,
                    coef: (n + 1.0) * scale,
                });
            }
        }
        if let Some(s) = self.first {
            ops.push(Op::Axpy {
                slot: s,
                input: new,
                coef: scale,
            });
            if let Some(o) = evicted {
                ops.push(Op::Axpy {
                    slot: s,
                    input: o,
                    coef: -scale,
                });
            }
        }
    }

    /// Append the ops that recompute the sums from scratch over `inputs` (input indices,
    /// oldest first).
    pub fn rebuild(&self, inputs: &[usize], ops: &mut Vec<Op>) {
        if let Method::Ema { alpha } = self.method {
            if let Some(e) = self.first {
                ops.push(Op::Zero(e));
                for (k, &i) in inputs.iter().enumerate() {
                    ops.push(if k == 0 {
                        Op::Axpy {
                            slot: e,
                            input: i,
                            coef: 1.0,
                        }
                    } else {
                        Op::Ema {
                            slot: e,
                            input: i,
                            alpha,
                        }
                    });
                }
            }
            return;
        }
        let scale = self.scale();
        if let Some(s) = self.first {
            ops.push(Op::Zero(s));
            for &i in inputs {
                ops.push(Op::Axpy {
                    slot: s,
                    input: i,
                    coef: scale,
                });
            }
        }
        if let Some(t) = self.second {
            ops.push(Op::Zero(t));
            for (k, &i) in inputs.iter().enumerate() {
                ops.push(Op::Axpy {
                    slot: t,
                    input: i,
                    coef: (k + 1) as f64 * scale,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apply ops to scalar "checkpoints" (one element each) in f64.
    fn run(ops: &[Op], slots: &mut [f64], inputs: &[f64]) {
        for op in ops {
            match *op {
                Op::Zero(s) => slots[s] = 0.0,
                Op::Axpy { slot, input, coef } => slots[slot] += coef * inputs[input],
                Op::Sub { slot, other } => slots[slot] -= slots[other],
                Op::Ema { slot, input, alpha } => {
                    slots[slot] += alpha * (inputs[input] - slots[slot])
                }
            }
        }
    }

    #[test]
    fn incremental_updates_equal_the_weighted_average() {
        let xs: Vec<f64> = (1..=12).map(|i| (i as f64 * 0.37).sin() + 2.0).collect();
        for method in [Method::Sma, Method::Wma, Method::Ema { alpha: 0.3 }] {
            let window = 4;
            let mut next = 0;
            let sums = Sums::new(&method, window, &mut next);
            assert_eq!(sums.slots(), next);
            // Garbage in the slots: an empty recipe's first update must not depend on it.
            let mut slots = vec![123.0; next];
            let mut held: Vec<f64> = Vec::new();
            let mut all: Vec<f64> = Vec::new();
            for &x in &xs {
                let evicts = sums.evicts(held.len());
                let mut inputs = vec![x];
                let evicted = (evicts && sums.reads_evicted()).then(|| {
                    inputs.push(held[0]);
                    1
                });
                let mut ops = Vec::new();
                sums.arrive(held.len(), 0, evicted, &mut ops);
                run(&ops, &mut slots, &inputs);
                if evicts {
                    held.remove(0);
                }
                held.push(x);
                all.push(x);
                if !sums.ready(held.len()) {
                    continue;
                }
                let over = if sums.is_running() { &all } else { &held };
                let w = method.weights(over.len()).unwrap();
                let want: f64 = over.iter().zip(&w).map(|(x, w)| x * w).sum();
                let got = slots[sums.output_slot().unwrap()];
                assert!((got - want).abs() < 1e-12, "{method:?}: {got} vs {want}");
                // A rebuild over the same checkpoints gives the same output.
                let mut fresh = vec![-7.0; next];
                let mut ops = Vec::new();
                let idx: Vec<usize> = (0..over.len()).collect();
                sums.rebuild(&idx, &mut ops);
                run(&ops, &mut fresh, over);
                let again = fresh[sums.output_slot().unwrap()];
                assert!((again - want).abs() < 1e-12, "{method:?} rebuild");
            }
        }
    }

    #[test]
    fn weights_keep_no_sums() {
        let mut next = 5;
        let s = Sums::new(&Method::Weights(vec![1.0, 2.0]), 2, &mut next);
        assert_eq!((s.slots(), next, s.output_slot()), (0, 5, None));
        assert!(!s.reads_evicted() && s.evicts(2) && s.ready(2));
        let mut ops = Vec::new();
        s.arrive(0, 0, None, &mut ops);
        assert!(ops.is_empty());
    }
}
