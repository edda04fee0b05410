//! The window: the last N accepted checkpoints, pinned, and the recipes' running averages over
//! them.
//!
//! Owns the invariants that tie accumulators to checkpoints:
//! - every SMA/WMA recipe's sums hold exactly the checkpoints listed in its `members` (oldest
//!   first), which are the newest `min(N, len)` checkpoints of the window;
//! - an EMA recipe's state holds every step in its `absorbed` list, in order;
//! - every member is pinned (open, mapped) in [`Window::ckpts`] until no recipe needs it.
//!
//! An arrival is one pass over the new and evicted checkpoints that updates every recipe; when
//! that is impossible (a source changed, a rollback, an out-of-order arrival, drift control),
//! the sums are rebuilt from the pinned members.

use crate::accum::{self, AccStore, Accumulators, FlatLayout, Op};
use crate::checkpoint::Checkpoint;
use crate::config::Recipe;
use crate::error::{Error, Result};
use crate::merge::{Accumulator, FloatKind, Method};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a recipe's sums live in the accumulator store.
#[derive(Debug, Clone)]
pub struct RecipeSlots {
    /// Slot of S (SMA, WMA) or e (EMA).
    pub first: Option<usize>,
    /// Slot of T (WMA).
    pub second: Option<usize>,
}

/// One recipe's incremental state.
#[derive(Debug, Clone)]
pub struct RecipeState {
    /// The configuration.
    pub recipe: Recipe,
    /// Accumulator slots.
    pub slots: RecipeSlots,
    /// Steps whose data the sums hold, oldest first (SMA/WMA/weights).
    pub members: Vec<u64>,
    /// Steps absorbed by the EMA, oldest first.
    pub absorbed: Vec<u64>,
    /// Updates since the sums were last rebuilt from scratch.
    pub updates_since_rebuild: u64,
    /// Accepted checkpoints since the last emission.
    pub since_emit: u64,
    /// When it last published.
    pub last_emit: Option<std::time::Instant>,
    /// Step it last published.
    pub last_emitted_step: Option<u64>,
}

impl RecipeState {
    /// Whether the recipe averages the window (as opposed to a running EMA).
    pub fn is_ema(&self) -> bool {
        matches!(self.recipe.method, Method::Ema { .. })
    }

    /// Steps of the checkpoints the next output would average, oldest first.
    pub fn steps(&self) -> &[u64] {
        if self.is_ema() {
            &self.absorbed
        } else {
            &self.members
        }
    }

    /// Whether there is enough to publish: a full window, or any EMA state.
    pub fn ready(&self) -> bool {
        if self.is_ema() {
            !self.absorbed.is_empty()
        } else {
            self.members.len() == self.recipe.window
        }
    }

    /// Weights of the current output, oldest first.
    pub fn weights(&self) -> Vec<f64> {
        let n = self.steps().len();
        self.recipe.method.weights(n).unwrap_or_default()
    }
}

/// Pinned checkpoints plus recipe states and their accumulators.
pub struct Window {
    /// Accepted, pinned checkpoints by step.
    pub ckpts: BTreeMap<u64, Arc<Checkpoint>>,
    /// Recipe states, in config order.
    pub recipes: Vec<RecipeState>,
    /// Accumulators (created with the first accepted checkpoint, whose schema they follow).
    pub acc: Option<Box<dyn AccStore>>,
    /// The checkpoint whose names/shapes/dtypes every later one must match.
    pub schema: Option<Arc<Checkpoint>>,
    accumulator: Accumulator,
    acc_file: Option<PathBuf>,
    memory_budget: u64,
    /// Rebuild SMA/WMA sums after this many incremental updates (drift control; 0 = never).
    rebuild_every: Vec<u64>,
}

/// What an arrival did, for the `window.updated` log line.
#[derive(Debug, Clone)]
pub struct ArrivalReport {
    /// Steps evicted from some recipe's sums.
    pub evicted: Vec<u64>,
    /// Checkpoints read in the pass (new + evicted).
    pub inputs: usize,
    /// Bytes of tensor data read.
    pub bytes_read: u64,
    /// Whether sums were rebuilt from the window instead of updated.
    pub rebuilt: bool,
}

impl Window {
    /// An empty window for these recipes.
    pub fn new(
        recipes: &[Recipe],
        accumulator: Accumulator,
        state_dir: Option<PathBuf>,
        memory_budget: u64,
    ) -> Window {
        let mut next = 0;
        let mut states = Vec::new();
        let mut rebuild_every = Vec::new();
        for r in recipes {
            let slots = match r.method {
                Method::Sma | Method::Ema { .. } => {
                    next += 1;
                    RecipeSlots {
                        first: Some(next - 1),
                        second: None,
                    }
                }
                Method::Wma => {
                    next += 2;
                    RecipeSlots {
                        first: Some(next - 2),
                        second: Some(next - 1),
                    }
                }
                Method::Weights(_) => RecipeSlots {
                    first: None,
                    second: None,
                },
            };
            // f32 sliding sums drift by about sqrt(k) f32 ulps after k add/subtract updates.
            // For bf16/f16 outputs that stays far below one output ulp for any realistic k;
            // for f32 outputs it would pass 1e-6 after ~100 updates, so rebuild every 32.
            let wide_out = !matches!(
                r.dtype,
                crate::engine::OutDtype::Float(FloatKind::BF16)
                    | crate::engine::OutDtype::Float(FloatKind::F16)
            );
            rebuild_every.push(
                if accumulator == Accumulator::F32
                    && wide_out
                    && !matches!(r.method, Method::Ema { .. })
                {
                    32
                } else {
                    0
                },
            );
            states.push(RecipeState {
                recipe: r.clone(),
                slots,
                members: Vec::new(),
                absorbed: Vec::new(),
                updates_since_rebuild: 0,
                since_emit: 0,
                last_emit: None,
                last_emitted_step: None,
            });
        }
        Window {
            ckpts: BTreeMap::new(),
            recipes: states,
            acc: None,
            schema: None,
            accumulator,
            acc_file: state_dir.map(|d| d.join("accumulators.bin")),
            memory_budget,
            rebuild_every,
        }
    }

    /// How many checkpoints must stay pinned: the largest window.
    pub fn capacity(&self) -> usize {
        self.recipes
            .iter()
            .map(|r| if r.is_ema() { 1 } else { r.recipe.window })
            .max()
            .unwrap_or(1)
    }

    /// Steps currently pinned, oldest first.
    pub fn steps(&self) -> Vec<u64> {
        self.ckpts.keys().copied().collect()
    }

    /// Newest pinned step.
    pub fn newest(&self) -> Option<u64> {
        self.ckpts.keys().next_back().copied()
    }

    fn slot_count(&self) -> usize {
        self.recipes
            .iter()
            .map(|r| r.slots.first.is_some() as usize + r.slots.second.is_some() as usize)
            .sum()
    }

    /// Check a new checkpoint against the schema (names, shapes, dtypes).
    pub fn check_schema(&self, c: &Checkpoint) -> Result<()> {
        match &self.schema {
            Some(s) => s.check_compatible(c),
            None => Ok(()),
        }
    }

    fn ensure_acc(&mut self, c: &Arc<Checkpoint>) -> Result<()> {
        if self.acc.is_some() {
            return Ok(());
        }
        let layout = FlatLayout::of(c);
        let slots = self.slot_count();
        let size = match self.accumulator {
            Accumulator::F32 => 4,
            Accumulator::F64 => 8,
        };
        let bytes = accum::store_bytes(&layout, slots, size);
        let file = if bytes > self.memory_budget {
            match &self.acc_file {
                Some(f) => Some(f.clone()),
                None => {
                    return Err(Error::Usage(format!(
                        "accumulators need {} but state.memory_budget is {}; set state.dir so they can live in files, or raise state.memory_budget",
                        crate::telemetry::bytes(bytes),
                        crate::telemetry::bytes(self.memory_budget)
                    )))
                }
            }
        } else {
            None
        };
        if let Some(f) = &file {
            if let Some(d) = f.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::io("create directory", d, e))?;
            }
        }
        self.acc = Some(match self.accumulator {
            Accumulator::F32 => Box::new(Accumulators::<f32>::new(layout, slots, file.as_deref())?),
            Accumulator::F64 => Box::new(Accumulators::<f64>::new(layout, slots, file.as_deref())?),
        });
        self.schema = Some(c.clone());
        Ok(())
    }

    /// Add the newest accepted checkpoint: one pass over it and the checkpoints it evicts
    /// updates every recipe.
    pub fn arrive(&mut self, step: u64, c: Arc<Checkpoint>) -> Result<ArrivalReport> {
        self.ensure_acc(&c)?;
        if let Some(newest) = self.newest() {
            if step <= newest {
                return self.insert_out_of_order(step, c);
            }
        }
        // inputs[0] is the new checkpoint; evicted ones follow.
        let mut inputs: Vec<Arc<Checkpoint>> = vec![c.clone()];
        let mut input_steps: Vec<u64> = vec![step];
        let mut ops = Vec::new();
        let mut evicted = Vec::new();
        let mut rebuild = Vec::new();
        for (ri, r) in self.recipes.iter().enumerate() {
            let n = r.members.len();
            match r.recipe.method.clone() {
                Method::Sma | Method::Wma | Method::Weights(_) => {
                    let full = n == r.recipe.window;
                    let every = if r.slots.first.is_some() {
                        self.rebuild_every[ri]
                    } else {
                        0
                    };
                    if every > 0 && r.updates_since_rebuild + 1 >= every {
                        rebuild.push(ri);
                        continue;
                    }
                    if full {
                        evicted.push(r.members[0]);
                    }
                    // Weights recipes average the pinned members at emission: no sums.
                    let old = if full && r.slots.first.is_some() {
                        let s = r.members[0];
                        Some(match input_steps.iter().position(|x| *x == s) {
                            Some(i) => i,
                            None => {
                                let ck = self.ckpts.get(&s).cloned().ok_or_else(|| {
                                    Error::Usage(format!("internal: step {s} not pinned"))
                                })?;
                                inputs.push(ck);
                                input_steps.push(s);
                                inputs.len() - 1
                            }
                        })
                    } else {
                        None
                    };
                    if let (Method::Wma, Some(t), Some(s)) =
                        (&r.recipe.method, r.slots.second, r.slots.first)
                    {
                        if old.is_some() {
                            ops.push(Op::Sub { slot: t, other: s });
                            ops.push(Op::Axpy {
                                slot: t,
                                input: 0,
                                coef: n as f64,
                            });
                        } else {
                            ops.push(Op::Axpy {
                                slot: t,
                                input: 0,
                                coef: (n + 1) as f64,
                            });
                        }
                    }
                    if let Some(s) = r.slots.first {
                        ops.push(Op::Axpy {
                            slot: s,
                            input: 0,
                            coef: 1.0,
                        });
                        if let Some(o) = old {
                            ops.push(Op::Axpy {
                                slot: s,
                                input: o,
                                coef: -1.0,
                            });
                        }
                    }
                }
                Method::Ema { alpha } => {
                    let e = r.slots.first.unwrap_or(0);
                    if r.absorbed.is_empty() {
                        ops.push(Op::Zero(e));
                        ops.push(Op::Axpy {
                            slot: e,
                            input: 0,
                            coef: 1.0,
                        });
                    } else {
                        ops.push(Op::Ema {
                            slot: e,
                            input: 0,
                            alpha,
                        });
                    }
                }
            }
        }
        let refs: Vec<&Checkpoint> = inputs.iter().map(|c| c.as_ref()).collect();
        let bytes_read = refs.iter().map(|c| c.data_bytes()).sum();
        let acc = self.acc.as_mut().ok_or(Error::Cancelled)?;
        if let Err(e) = acc.pass(&refs, &ops) {
            // Sums are now partially updated: rebuild them from what is pinned (without the
            // new checkpoint, which never entered the window).
            self.rebuild_all()?;
            return Err(e);
        }
        self.ckpts.insert(step, c);
        for (ri, r) in self.recipes.iter_mut().enumerate() {
            if rebuild.contains(&ri) {
                continue;
            }
            if r.is_ema() {
                r.absorbed.push(step);
            } else {
                r.members.push(step);
                if r.members.len() > r.recipe.window {
                    r.members.remove(0);
                }
                r.updates_since_rebuild += 1;
            }
            r.since_emit += 1;
        }
        for ri in &rebuild {
            let r = &mut self.recipes[*ri];
            r.since_emit += 1;
        }
        let rebuilt = !rebuild.is_empty();
        if rebuilt {
            self.rebuild(&rebuild)?;
        }
        self.trim();
        evicted.sort();
        evicted.dedup();
        Ok(ArrivalReport {
            evicted,
            inputs: inputs.len(),
            bytes_read,
            rebuilt,
        })
    }

    /// A checkpoint older than the newest accepted one (written late). It joins the window if
    /// it is newer than the oldest pinned step, and the window averages are rebuilt. A running
    /// EMA has already moved past it and does not absorb it.
    fn insert_out_of_order(&mut self, step: u64, c: Arc<Checkpoint>) -> Result<ArrivalReport> {
        let cap = self.capacity();
        let oldest = self.ckpts.keys().next().copied().unwrap_or(0);
        if self.ckpts.len() >= cap && step < oldest {
            return Ok(ArrivalReport {
                evicted: vec![],
                inputs: 0,
                bytes_read: 0,
                rebuilt: false,
            });
        }
        self.ckpts.insert(step, c);
        let window_recipes: Vec<usize> = (0..self.recipes.len())
            .filter(|i| !self.recipes[*i].is_ema())
            .collect();
        for ri in &window_recipes {
            self.recipes[*ri].since_emit += 1;
        }
        let report = self.rebuild(&window_recipes)?;
        self.trim();
        Ok(report)
    }

    /// Drop pinned checkpoints no recipe needs any more.
    fn trim(&mut self) {
        let cap = self.capacity();
        while self.ckpts.len() > cap {
            let Some(first) = self.ckpts.keys().next().copied() else {
                break;
            };
            self.ckpts.remove(&first);
        }
    }

    /// Remove steps from the window (source changed, or abandoned by a rollback) and rebuild
    /// every recipe that held them. Returns the steps removed.
    pub fn remove(&mut self, steps: &[u64]) -> Result<Vec<u64>> {
        let removed: Vec<u64> = steps
            .iter()
            .copied()
            .filter(|s| self.ckpts.remove(s).is_some())
            .collect();
        let affected: Vec<usize> = (0..self.recipes.len())
            .filter(|i| {
                let r = &self.recipes[*i];
                r.steps().iter().any(|s| steps.contains(s))
            })
            .collect();
        if !affected.is_empty() {
            self.rebuild(&affected)?;
        }
        Ok(removed)
    }

    fn rebuild_all(&mut self) -> Result<ArrivalReport> {
        let all: Vec<usize> = (0..self.recipes.len()).collect();
        self.rebuild(&all)
    }

    /// Recompute the given recipes' sums from the pinned window in one pass. An EMA restarts
    /// from the pinned checkpoints (its older history is gone with the files; logged by the
    /// caller).
    pub fn rebuild(&mut self, which: &[usize]) -> Result<ArrivalReport> {
        let pinned: Vec<(u64, Arc<Checkpoint>)> =
            self.ckpts.iter().map(|(s, c)| (*s, c.clone())).collect();
        let refs: Vec<&Checkpoint> = pinned.iter().map(|(_, c)| c.as_ref()).collect();
        let mut ops = Vec::new();
        for &ri in which {
            let r = &mut self.recipes[ri];
            let n = if r.is_ema() {
                pinned.len()
            } else {
                r.recipe.window.min(pinned.len())
            };
            let first = pinned.len() - n;
            match r.recipe.method {
                Method::Ema { alpha } => {
                    if let Some(e) = r.slots.first {
                        ops.push(Op::Zero(e));
                        for (k, i) in (first..pinned.len()).enumerate() {
                            if k == 0 {
                                ops.push(Op::Axpy {
                                    slot: e,
                                    input: i,
                                    coef: 1.0,
                                });
                            } else {
                                ops.push(Op::Ema {
                                    slot: e,
                                    input: i,
                                    alpha,
                                });
                            }
                        }
                    }
                    r.absorbed = pinned[first..].iter().map(|(s, _)| *s).collect();
                }
                _ => {
                    if let Some(s) = r.slots.first {
                        ops.push(Op::Zero(s));
                        for i in first..pinned.len() {
                            ops.push(Op::Axpy {
                                slot: s,
                                input: i,
                                coef: 1.0,
                            });
                        }
                    }
                    if let Some(t) = r.slots.second {
                        ops.push(Op::Zero(t));
                        for (k, i) in (first..pinned.len()).enumerate() {
                            ops.push(Op::Axpy {
                                slot: t,
                                input: i,
                                coef: (k + 1) as f64,
                            });
                        }
                    }
                    r.members = pinned[first..].iter().map(|(s, _)| *s).collect();
                    r.updates_since_rebuild = 0;
                }
            }
        }
        if !pinned.is_empty() && !ops.is_empty() {
            if let Some(acc) = self.acc.as_mut() {
                acc.pass(&refs, &ops)?;
            }
        }
        Ok(ArrivalReport {
            evicted: vec![],
            inputs: pinned.len(),
            bytes_read: refs.iter().map(|c| c.data_bytes()).sum(),
            rebuilt: true,
        })
    }
}
