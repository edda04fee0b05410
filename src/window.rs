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
use crate::checkpoint::{Checkpoint, Schema};
use crate::config::Recipe;
use crate::engine::OutDtype;
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

/// A recipe's bookkeeping as saved in the state manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedRecipe {
    /// Recipe name.
    pub name: String,
    /// Steps in the sums (SMA/WMA/weights).
    pub members: Vec<u64>,
    /// Steps absorbed (EMA).
    pub absorbed: Vec<u64>,
    /// Accepted since the last emission.
    pub since_emit: u64,
    /// Last published step.
    pub last_emitted_step: Option<u64>,
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

    /// Factor applied to every term of the sums so they hold the output directly and cannot
    /// overflow: SMA keeps S/N, WMA keeps S/W and T/W with W = N(N+1)/2 (outputs are only
    /// published from a full window).
    pub fn sum_scale(&self) -> f64 {
        let n = self.recipe.window as f64;
        match self.recipe.method {
            Method::Sma => 1.0 / n,
            Method::Wma => 2.0 / (n * (n + 1.0)),
            _ => 1.0,
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
    pub schema: Option<Schema>,
    accumulator: Accumulator,
    /// Where file-backed accumulators live (`state.dir`).
    acc_dir: Option<PathBuf>,
    memory_budget: u64,
}

/// What an arrival did, for the `window.updated` log line.
#[derive(Debug, Clone)]
pub struct ArrivalReport {
    /// (recipe, step) pairs: the step left that recipe's window (it may remain in another's).
    pub evicted: Vec<(String, u64)>,
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
            states.push(RecipeState {
                recipe: r.clone(),
                slots,
                members: Vec::new(),
                absorbed: Vec::new(),
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
            acc_dir: state_dir,
            memory_budget,
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

    /// Check a new checkpoint against the schema (names, shapes, dtypes), or, after a restore
    /// with no pinned checkpoint left, against the accumulators' layout.
    pub fn check_schema(&self, c: &Checkpoint) -> Result<()> {
        match (&self.schema, self.layout()) {
            (Some(s), _) => s.check(c),
            (None, Some(l)) if *l != FlatLayout::of(c) => Err(Error::Mismatch {
                path: c.path.clone(),
                detail: "float tensors (names, shapes or dtypes) differ from the restored state's"
                    .into(),
            }),
            _ => Ok(()),
        }
    }

    /// The accumulator precision in use (see [`Window::arrive`] for when f64 is chosen).
    pub fn accumulator(&self) -> Accumulator {
        self.accumulator
    }

    fn ensure_acc(&mut self, c: &Arc<Checkpoint>) -> Result<()> {
        if self.acc.is_some() {
            if self.schema.is_none() {
                self.schema = Some(Schema::of(c));
            }
            return Ok(());
        }
        // f32 running sums stay within one output ulp for bf16/f16 outputs over any realistic
        // number of updates, but not within 1e-6 for f32/f64 outputs (each add/subtract costs
        // about one f32 ulp of the sum). If any recipe publishes a wide dtype, accumulate in f64.
        let wide = self.recipes.iter().any(|r| match r.recipe.dtype {
            OutDtype::Float(k) => matches!(k, FloatKind::F32 | FloatKind::F64),
            OutDtype::Source => c.tensors.iter().any(|t| {
                matches!(
                    FloatKind::of(t.dtype),
                    Some(FloatKind::F32 | FloatKind::F64)
                )
            }),
        });
        if wide && self.accumulator == Accumulator::F32 {
            tracing::info!(
                event = "window.accumulator",
                accumulator = "f64",
                "a recipe publishes f32/f64 tensors: accumulating in f64 so outputs stay within 1e-6 of a one-shot merge"
            );
            self.accumulator = Accumulator::F64;
        }
        self.create_acc(FlatLayout::of(c))?;
        self.schema = Some(Schema::of(c));
        Ok(())
    }

    /// Bytes of accumulators over `layout`.
    fn acc_bytes(&self, layout: &FlatLayout) -> u64 {
        accum::store_bytes(layout, self.slot_count(), self.accumulator.size())
    }

    /// Say where the accumulators live and how big they are (operators size memory and
    /// disk from this line).
    fn log_placement(&self, layout: &FlatLayout, dir: Option<&std::path::Path>) {
        let bytes = self.acc_bytes(layout);
        tracing::info!(
            event = "window.accumulator",
            accumulator = self.accumulator.name(),
            placement = if dir.is_some() { "file" } else { "ram" },
            size = %crate::telemetry::bytes(bytes),
            dir = %dir.map(|d| d.display().to_string()).unwrap_or_else(|| "-".into()),
            "accumulators {}",
            if dir.is_some() {
                "in files under state.dir (above state.memory_budget)"
            } else {
                "in RAM"
            }
        );
    }

    /// Where accumulators over `layout` go: None = RAM, Some(dir) = file-backed.
    fn acc_home(&self, layout: &FlatLayout) -> Result<Option<PathBuf>> {
        let bytes = self.acc_bytes(layout);
        if bytes <= self.memory_budget {
            return Ok(None);
        }
        match &self.acc_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| Error::io("create directory", d, e))?;
                Ok(Some(d.clone()))
            }
            None => Err(Error::Usage(format!(
                "accumulators need {} but state.memory_budget is {}; set state.dir so they can live in files, or raise state.memory_budget",
                crate::telemetry::bytes(bytes),
                crate::telemetry::bytes(self.memory_budget)
            ))),
        }
    }

    fn create_acc(&mut self, layout: FlatLayout) -> Result<()> {
        let slots = self.slot_count();
        let dir = self.acc_home(&layout)?;
        self.log_placement(&layout, dir.as_deref());
        self.acc = Some(match self.accumulator {
            Accumulator::F32 => Box::new(Accumulators::<f32>::new(layout, slots, dir.as_deref())?),
            Accumulator::F64 => Box::new(Accumulators::<f64>::new(layout, slots, dir.as_deref())?),
        });
        Ok(())
    }

    /// Recipe states for a state snapshot.
    pub fn saved_recipes(&self) -> Vec<SavedRecipe> {
        self.recipes
            .iter()
            .map(|r| SavedRecipe {
                name: r.recipe.name.clone(),
                members: r.members.clone(),
                absorbed: r.absorbed.clone(),
                since_emit: r.since_emit,
                last_emitted_step: r.last_emitted_step,
            })
            .collect()
    }

    /// Restore accumulators and recipe states from a snapshot: `acc-<generation>.bin` in the
    /// state directory holds the saved accumulator bytes (read into RAM, or adopted as the
    /// current generation of a file-backed store, without a copy); `ckpts` are the saved
    /// window's checkpoints that are still valid.
    pub fn restore(
        &mut self,
        layout: FlatLayout,
        accumulator: Accumulator,
        generation: u64,
        ckpts: BTreeMap<u64, Arc<Checkpoint>>,
        saved: &[SavedRecipe],
    ) -> Result<()> {
        self.accumulator = accumulator;
        let slots = self.slot_count();
        match self.acc_home(&layout)? {
            Some(dir) => {
                self.log_placement(&layout, Some(&dir));
                self.acc = Some(match accumulator {
                    Accumulator::F32 => {
                        Box::new(Accumulators::<f32>::adopt(layout, slots, &dir, generation)?)
                    }
                    Accumulator::F64 => {
                        Box::new(Accumulators::<f64>::adopt(layout, slots, &dir, generation)?)
                    }
                });
            }
            None => {
                let dir = self.acc_dir.clone().ok_or_else(|| {
                    Error::Usage("internal: restoring without a state directory".into())
                })?;
                self.create_acc(layout)?;
                if let Some(acc) = self.acc.as_mut() {
                    acc.load(&accum::generation_path(&dir, generation))?;
                }
            }
        }
        self.schema = ckpts.values().next_back().map(|c| Schema::of(c));
        self.ckpts = ckpts;
        for (r, s) in self.recipes.iter_mut().zip(saved) {
            r.members = s.members.clone();
            r.absorbed = s.absorbed.clone();
            r.since_emit = s.since_emit;
            r.last_emitted_step = s.last_emitted_step;
        }
        Ok(())
    }

    /// The accumulators' layout, once created.
    pub fn layout(&self) -> Option<&FlatLayout> {
        self.acc.as_ref().map(|a| a.layout())
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
        for r in &self.recipes {
            let n = r.members.len();
            match r.recipe.method.clone() {
                Method::Sma | Method::Wma | Method::Weights(_) => {
                    let full = n == r.recipe.window;
                    if full {
                        evicted.push((r.recipe.name.clone(), r.members[0]));
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
                    let scale = r.sum_scale();
                    if let (Method::Wma, Some(t), Some(s)) =
                        (&r.recipe.method, r.slots.second, r.slots.first)
                    {
                        if old.is_some() {
                            ops.push(Op::Sub { slot: t, other: s });
                            ops.push(Op::Axpy {
                                slot: t,
                                input: 0,
                                coef: n as f64 * scale,
                            });
                        } else {
                            ops.push(Op::Axpy {
                                slot: t,
                                input: 0,
                                coef: (n + 1) as f64 * scale,
                            });
                        }
                    }
                    if let Some(s) = r.slots.first {
                        ops.push(Op::Axpy {
                            slot: s,
                            input: 0,
                            coef: scale,
                        });
                        if let Some(o) = old {
                            ops.push(Op::Axpy {
                                slot: s,
                                input: o,
                                coef: -scale,
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
        for r in self.recipes.iter_mut() {
            if r.is_ema() {
                r.absorbed.push(step);
            } else {
                r.members.push(step);
                if r.members.len() > r.recipe.window {
                    r.members.remove(0);
                }
            }
            r.since_emit += 1;
        }
        self.trim();
        Ok(ArrivalReport {
            evicted,
            inputs: inputs.len(),
            bytes_read,
            rebuilt: false,
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
                    let scale = r.sum_scale();
                    if let Some(s) = r.slots.first {
                        ops.push(Op::Zero(s));
                        for i in first..pinned.len() {
                            ops.push(Op::Axpy {
                                slot: s,
                                input: i,
                                coef: scale,
                            });
                        }
                    }
                    if let Some(t) = r.slots.second {
                        ops.push(Op::Zero(t));
                        for (k, i) in (first..pinned.len()).enumerate() {
                            ops.push(Op::Axpy {
                                slot: t,
                                input: i,
                                coef: (k + 1) as f64 * scale,
                            });
                        }
                    }
                    r.members = pinned[first..].iter().map(|(s, _)| *s).collect();
                }
            }
        }
        // With nothing pinned the ops are only Zero: they must still run, or stale sums
        // would survive into the next outputs.
        if !ops.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::OutDtype;
    use crate::header::build_header;
    use crate::merge::{self, Acc};
    use rand::{Rng, SeedableRng};
    use safetensors::Dtype;
    use std::path::Path;

    const SHAPES: [(&str, usize); 3] = [("a", 3000), ("b", 111), ("c", 1)];

    /// A checkpoint whose float tensors are base + noise (like consecutive training steps).
    fn write_ckpt(dir: &Path, step: u64, kind: FloatKind, seed: u64) -> Arc<Checkpoint> {
        write_ckpt_shaped(dir, step, kind, seed, &SHAPES)
    }

    fn write_ckpt_shaped(
        dir: &Path,
        step: u64,
        kind: FloatKind,
        seed: u64,
        shapes: &[(&str, usize)],
    ) -> Arc<Checkpoint> {
        let mut base = rand::rngs::StdRng::seed_from_u64(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + step);
        let mut tensors = Vec::new();
        let mut data = Vec::new();
        for &(name, n) in shapes {
            tensors.push((name.to_string(), kind.dtype(), vec![n]));
            let v: Vec<f32> = (0..n)
                .map(|_| base.random_range(-2.0f32..2.0) * (1.0 + rng.random_range(-0.05f32..0.05)))
                .collect();
            let mut b = vec![0u8; n * kind.size()];
            f32::encode(kind, &v, &mut b);
            data.extend(b);
        }
        tensors.push(("ids".into(), Dtype::I64, vec![2]));
        data.extend((step as i64).to_le_bytes());
        data.extend((seed as i64).to_le_bytes());
        let (mut bytes, _) = build_header(&Default::default(), &tensors).unwrap();
        bytes.extend(data);
        let d = dir.join(format!("checkpoint-{step}-{seed}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        Arc::new(Checkpoint::open(&d).unwrap())
    }

    fn recipes(dtype: &str) -> Vec<Recipe> {
        let text = format!(
            r#"[watch]
dir = "/w"
[[recipe]]
name = "sma"
method = "sma"
window = 4
out_dir = "/o/sma"
dtype = "{dtype}"
[[recipe]]
name = "wma"
method = "wma"
window = 3
out_dir = "/o/wma"
dtype = "{dtype}"
[[recipe]]
name = "ema"
method = "ema"
alpha = 0.3
out_dir = "/o/ema"
dtype = "{dtype}"
"#
        );
        Config::parse(&text).unwrap().recipes
    }

    /// Compare every recipe's accumulator output with a one-shot merge of the same steps.
    fn check(w: &Window, ckpts: &BTreeMap<u64, Arc<Checkpoint>>, out: FloatKind) {
        let acc = w.acc.as_ref().unwrap();
        for r in &w.recipes {
            if !r.ready() {
                continue;
            }
            let steps = r.steps();
            let weights = r.weights();
            let (slot, div) = match r.recipe.method {
                Method::Wma => (r.slots.second.unwrap(), 1.0),
                _ => (r.slots.first.unwrap(), 1.0),
            };
            for ft in &acc.layout().tensors {
                let mut got = vec![0u8; ft.len * out.size()];
                acc.emit_into(slot, div, ft.start..ft.start + ft.len, out, &mut got);
                let srcs: Vec<&[u8]> = steps
                    .iter()
                    .map(|s| {
                        let c = &ckpts[s];
                        let t = c.tensor(&ft.name).unwrap();
                        c.files[t.file].slice(t.range.clone())
                    })
                    .collect();
                let mut want = vec![0u8; got.len()];
                merge::merge_chunk::<f64>(&srcs, ft.kind, &weights, out, &mut want, false);
                let mut g = vec![0f64; ft.len];
                let mut e = vec![0f64; ft.len];
                f64::decode(out, &got, &mut g);
                f64::decode(out, &want, &mut e);
                for (j, (x, y)) in g.iter().zip(&e).enumerate() {
                    let tol = match out {
                        FloatKind::BF16 => y.abs() * 2f64.powi(-7),
                        FloatKind::F16 => y.abs().max(6.1e-5) * 2f64.powi(-10),
                        _ => y.abs().max(1e-30) * 1e-6,
                    };
                    assert!(
                        (x - y).abs() <= tol,
                        "{} {} elem {j}: incremental {x} vs one-shot {y} (steps {steps:?})",
                        r.recipe.name,
                        ft.name
                    );
                }
            }
        }
    }

    fn run_case(kind: FloatKind, dtype: &str, acc: Accumulator) {
        let d = tempfile::tempdir().unwrap();
        let out = match dtype {
            "bf16" => FloatKind::BF16,
            "f32" => FloatKind::F32,
            _ => kind,
        };
        let mut w = Window::new(&recipes(dtype), acc, None, u64::MAX);
        let mut all = BTreeMap::new();
        // 3N+ in-order arrivals (N = 4), checking after every one.
        for k in 1..=16u64 {
            let c = write_ckpt(d.path(), k * 100, kind, 0);
            all.insert(k * 100, c.clone());
            w.arrive(k * 100, c).unwrap();
            check(&w, &all, out);
        }
        assert_eq!(w.steps(), vec![1300, 1400, 1500, 1600]);
        assert_eq!(w.recipes[0].members, vec![1300, 1400, 1500, 1600]);
        assert_eq!(w.recipes[2].absorbed.len(), 16);
        // Rollback: the run restarted from 1400; 1500 and 1600 are abandoned.
        w.remove(&[1500, 1600]).unwrap();
        assert_eq!(w.recipes[0].members, vec![1300, 1400]);
        for k in 15..=17u64 {
            let c = write_ckpt(d.path(), k * 100, kind, 1);
            all.insert(k * 100, c.clone());
            w.arrive(k * 100, c).unwrap();
            check(&w, &all, out);
        }
        // Out of order: 1650 arrives after 1700.
        let c = write_ckpt(d.path(), 1650, kind, 1);
        all.insert(1650, c.clone());
        w.arrive(1650, c).unwrap();
        assert_eq!(w.recipes[0].members, vec![1500, 1600, 1650, 1700]);
        check(&w, &all, out);
    }

    #[test]
    fn incremental_equals_one_shot_bf16() {
        run_case(FloatKind::BF16, "source", Accumulator::F32);
    }

    #[test]
    fn incremental_equals_one_shot_f32_output_with_f32_accumulator() {
        // f32 outputs switch the accumulators to f64.
        run_case(FloatKind::F32, "f32", Accumulator::F32);
        run_case(FloatKind::BF16, "f32", Accumulator::F32);
    }

    #[test]
    fn incremental_equals_one_shot_f64_accumulator() {
        run_case(FloatKind::F16, "source", Accumulator::F64);
    }

    #[test]
    fn long_run_drift_stays_within_one_ulp() {
        // Many more updates than the window: sliding sums must not drift past 1 ulp (bf16).
        let d = tempfile::tempdir().unwrap();
        let mut w = Window::new(&recipes("bf16"), Accumulator::F32, None, u64::MAX);
        let mut all = BTreeMap::new();
        for k in 1..=120u64 {
            let c = write_ckpt(d.path(), k, FloatKind::BF16, 3);
            all.insert(k, c.clone());
            w.arrive(k, c).unwrap();
        }
        check(&w, &all, FloatKind::BF16);
    }

    #[test]
    fn file_backed_accumulators_match_ram() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let mut ram = Window::new(&recipes("source"), Accumulator::F32, None, u64::MAX);
        let mut file = Window::new(&recipes("source"), Accumulator::F32, Some(state.clone()), 1);
        for k in 1..=6u64 {
            let c = write_ckpt(d.path(), k * 10, FloatKind::BF16, 0);
            ram.arrive(k * 10, c.clone()).unwrap();
            file.arrive(k * 10, c).unwrap();
        }
        let (g, path) = file.acc.as_ref().unwrap().file().unwrap();
        assert_eq!(path, state.join(format!("acc-{g}.bin")));
        assert_eq!(crate::accum::generations(&state), vec![g]);
        for s in 0..4 {
            assert_eq!(
                ram.acc.as_ref().unwrap().slot_f64(s),
                file.acc.as_ref().unwrap().slot_f64(s)
            );
        }
        // Over budget without a state dir: a clear error naming the keys.
        let mut none = Window::new(&recipes("source"), Accumulator::F32, None, 1);
        let c = write_ckpt(d.path(), 999, FloatKind::BF16, 0);
        let e = none.arrive(999, c).err().unwrap().to_string();
        assert!(
            e.contains("state.memory_budget") && e.contains("state.dir"),
            "{e}"
        );
        let _ = OutDtype::Source;
    }

    #[test]
    fn file_backed_pages_released_after_use_keep_their_values() {
        // Several accumulator pages, evictions, and emission reads in pieces that cross page
        // boundaries: the file-backed store drops its mappings of pages it has finished with
        // (to bound RSS), and every later read must still see the same sums as RAM.
        let d = tempfile::tempdir().unwrap();
        let shapes = [("big", 2 * accum::PAGE + 12_345), ("small", 777)];
        let mut ram = Window::new(&recipes("bf16"), Accumulator::F32, None, u64::MAX);
        let mut file = Window::new(
            &recipes("bf16"),
            Accumulator::F32,
            Some(d.path().join("state")),
            1,
        );
        for k in 1..=6u64 {
            let c = write_ckpt_shaped(d.path(), k * 10, FloatKind::BF16, 0, &shapes);
            ram.arrive(k * 10, c.clone()).unwrap();
            file.arrive(k * 10, c).unwrap();
        }
        let (ra, fa) = (ram.acc.as_ref().unwrap(), file.acc.as_ref().unwrap());
        assert!(fa.file().is_some());
        let total = fa.layout().total;
        for slot in 0..4 {
            for piece in [total, accum::PAGE / 3 + 1, 4096] {
                let (mut a, mut b) = (vec![0u8; total * 2], vec![0u8; total * 2]);
                let mut pos = 0;
                while pos < total {
                    let e = (pos + piece).min(total);
                    ra.emit_into(slot, 1.0, pos..e, FloatKind::BF16, &mut a[pos * 2..e * 2]);
                    fa.emit_into(slot, 1.0, pos..e, FloatKind::BF16, &mut b[pos * 2..e * 2]);
                    pos = e;
                }
                assert!(a == b, "slot {slot}, pieces of {piece}");
            }
            assert_eq!(ra.slot_f64(slot), fa.slot_f64(slot));
        }
    }

    #[test]
    fn restore_from_a_snapshot_into_ram_or_a_file_backed_store() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Window::new(&recipes("bf16"), Accumulator::F32, None, u64::MAX);
        for k in 1..=5u64 {
            let c = write_ckpt(d.path(), k * 10, FloatKind::BF16, 0);
            w.arrive(k * 10, c).unwrap();
        }
        let layout = w.layout().unwrap().clone();
        for budget in [u64::MAX, 1] {
            let state = d.path().join(format!("state-{budget}"));
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(state.join("acc-7.bin"), w.acc.as_ref().unwrap().raw()).unwrap();
            let mut r = Window::new(
                &recipes("bf16"),
                Accumulator::F32,
                Some(state.clone()),
                budget,
            );
            r.restore(
                layout.clone(),
                Accumulator::F32,
                7,
                w.ckpts.clone(),
                &w.saved_recipes(),
            )
            .unwrap();
            let acc = r.acc.as_ref().unwrap();
            // File-backed: the snapshot itself became the current generation (no copy).
            assert_eq!(
                acc.file().map(|(g, p)| (g, p.to_path_buf())),
                (budget == 1).then(|| (7, state.join("acc-7.bin")))
            );
            for slot in 0..4 {
                assert_eq!(acc.slot_f64(slot), w.acc.as_ref().unwrap().slot_f64(slot));
            }
            assert_eq!(r.recipes[2].absorbed, w.recipes[2].absorbed);
            // The next arrival writes generation 8 and never touches 7 (the saved snapshot).
            let before = std::fs::read(state.join("acc-7.bin")).unwrap();
            let c = write_ckpt(d.path(), 60, FloatKind::BF16, 0);
            r.arrive(60, c).unwrap();
            assert_eq!(std::fs::read(state.join("acc-7.bin")).unwrap(), before);
            if budget == 1 {
                assert_eq!(r.acc.as_ref().unwrap().file().unwrap().0, 8);
            }
        }
        // A snapshot of the wrong size is refused, naming the file.
        let state = d.path().join("s");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("acc-3.bin"), [0u8; 12]).unwrap();
        for budget in [u64::MAX, 1] {
            let mut r = Window::new(
                &recipes("bf16"),
                Accumulator::F32,
                Some(state.clone()),
                budget,
            );
            let e = r
                .restore(
                    layout.clone(),
                    Accumulator::F32,
                    3,
                    w.ckpts.clone(),
                    &w.saved_recipes(),
                )
                .unwrap_err()
                .to_string();
            assert!(e.contains("acc-3.bin") && e.contains("12 bytes"), "{e}");
        }
    }

    #[test]
    fn file_backed_passes_write_new_generations_and_keep_the_persisted_one() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let mut w = Window::new(&recipes("bf16"), Accumulator::F32, Some(state.clone()), 1);
        let gens = || crate::accum::generations(&state);
        w.arrive(10, write_ckpt(d.path(), 10, FloatKind::BF16, 0))
            .unwrap();
        // Created as generation 1, updated out of place into 2; 1 was not persisted: deleted.
        assert_eq!(gens(), vec![2]);
        w.acc.as_mut().unwrap().persisted(2);
        w.arrive(20, write_ckpt(d.path(), 20, FloatKind::BF16, 0))
            .unwrap();
        w.arrive(30, write_ckpt(d.path(), 30, FloatKind::BF16, 0))
            .unwrap();
        // 2 is what a manifest names: kept; 3 was superseded by 4: deleted.
        assert_eq!(gens(), vec![2, 4]);
        // A failed pass (an input truncated under it) leaves no partial generation behind
        // (the window then rebuilds without it, into a new generation).
        let c = write_ckpt(d.path(), 40, FloatKind::BF16, 0);
        let f = c.files[0].path.clone();
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert!(w.arrive(40, c).is_err());
        let cur = w.acc.as_ref().unwrap().file().unwrap().0;
        assert_eq!(gens(), vec![2, cur]);
    }
}
