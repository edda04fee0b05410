//! The window: the last N accepted checkpoints, pinned, and every recipe's running sums over
//! them.
//!
//! Invariants, kept by this type's API (its fields are private):
//! - every step a window recipe (SMA, WMA, `weights`) holds is pinned here; an EMA's absorbed
//!   steps need not stay pinned (its state never reads them again);
//! - a recipe's sums hold exactly its held steps, oldest first: the newest min(N, pinned)
//!   pinned steps for a window recipe, every absorbed step for an EMA. Held steps and sums
//!   change together, only when a pass succeeded;
//! - a failed pass leaves held steps and sums as they were, bit for bit, whenever the sums
//!   were not touched: always with file-backed sums (a pass writes the next generation and a
//!   failed one is discarded), and in RAM when the failure was found before the first page
//!   was updated (each page re-checks its sources first; a source that changed since the gate
//!   fails there). Sums in RAM that a pass did change before failing are recomputed from the
//!   pinned checkpoints (dropping any whose files changed): window recipes come back with the
//!   same steps, and an EMA restarts from the pinned checkpoints, because its older history
//!   only existed in the damaged sums. [`Failure::recovery`] says which happened;
//! - if no recomputation can succeed, the window is cleared (nothing pinned, nothing held),
//!   which needs no pass and cannot fail.
//!
//! An arrival is one pass over the new checkpoint and the ones it evicts that updates every
//! recipe; when that is impossible (a source changed, a rollback, an out-of-order arrival) the
//! affected sums are rebuilt from the pinned checkpoints. Which ops each method needs is
//! [`crate::math::incremental`]'s business: nothing here is method-specific.

use crate::config::Recipe;
use crate::error::{Error, Result};
use crate::format::{Checkpoint, Schema, Select};
use crate::math::accum::{self, AccStore, Accumulators, FlatLayout, Op};
use crate::math::incremental::Sums;
use crate::math::kinds::{Accumulator, FloatKind, OutDtype};
use crate::math::Method;
use crate::output::partition::Share;
use crate::output::plan;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

/// One recipe's sums and the steps they hold.
#[derive(Debug, Clone)]
struct Held {
    name: String,
    dtype: OutDtype,
    sums: Sums,
    /// Steps in the sums, oldest first (members of a window recipe; absorbed by an EMA).
    steps: Vec<u64>,
}

/// Pinned checkpoints plus every recipe's sums over them.
pub struct Window {
    pinned: BTreeMap<u64, Arc<Checkpoint>>,
    recipes: Vec<Held>,
    /// Created with the first accepted (or restored) checkpoint, whose layout it follows.
    acc: Option<Box<dyn AccStore>>,
    /// The names, shapes and dtypes every later checkpoint must match.
    schema: Option<Schema>,
    accumulator: Accumulator,
    /// Where file-backed accumulators live (`state.dir`).
    acc_dir: Option<PathBuf>,
    memory_budget: u64,
    /// Steps kept pinned beyond what the recipes need (the newest rescue's checkpoints).
    held_extra: BTreeSet<u64>,
    /// With `[partition]`: this instance's share, and each recipe's output dtype and shard
    /// size (which decide the tensors it owns). Sums are kept for owned tensors only.
    share: Option<(Share, Vec<(OutDtype, u64)>)>,
    /// Which tensors are averaged (`[select]`): checkpoints are opened with it.
    select: Select,
}

/// What an arrival did, for the `window.updated` log line and the schedule.
#[derive(Debug, Clone, Default)]
pub struct ArrivalReport {
    /// (recipe, step) pairs: the step left that recipe's window (it may remain in another's).
    pub evicted: Vec<(String, u64)>,
    /// Checkpoints read in the pass.
    pub inputs: usize,
    /// Bytes of tensor data read.
    pub bytes_read: u64,
    /// Whether sums were rebuilt from the window instead of updated.
    pub rebuilt: bool,
    /// Recipes whose sums took in the new checkpoint (indexes in config order).
    pub absorbed: Vec<usize>,
}

/// What became of the window after a failed pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// Exactly as before the call (file-backed sums, or nothing was written yet).
    Unchanged,
    /// Sums recomputed from the pinned checkpoints, without these (their files changed).
    Rebuilt {
        /// Steps dropped because their files changed.
        dropped: Vec<u64>,
    },
    /// Nothing could be recomputed: the window is empty.
    Cleared,
}

/// A failed update, and the state it left the window in.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    /// What went wrong.
    pub error: Error,
    /// What the window holds now.
    pub recovery: Recovery,
}

/// Where a recipe's output comes from at emission.
pub enum Source<'a> {
    /// The running sums: this slot holds the output.
    Sums {
        /// The accumulator store.
        acc: &'a dyn AccStore,
        /// The slot.
        slot: usize,
    },
    /// Computed from the pinned members, oldest first (`weights`).
    Members(Vec<&'a Checkpoint>),
}

/// Everything needed to publish a recipe's current average.
pub struct Output<'a> {
    /// Steps averaged, oldest first.
    pub steps: &'a [u64],
    /// Their weights.
    pub weights: Vec<f64>,
    /// The newest checkpoint (non-float tensors and aux files come from it).
    pub newest: &'a Arc<Checkpoint>,
    /// Where the averaged values come from.
    pub source: Source<'a>,
}

/// A state snapshot to resume from (see [`Window::restore`]).
pub struct Saved {
    /// Layout of the saved accumulators.
    pub layout: FlatLayout,
    /// Their precision.
    pub accumulator: Accumulator,
    /// Generation of `acc-<generation>.bin` in the state directory.
    pub generation: u64,
    /// The saved window's checkpoints that are still valid.
    pub pinned: BTreeMap<u64, Arc<Checkpoint>>,
    /// Per recipe (config order), the steps its saved sums hold.
    pub held: Vec<Vec<u64>>,
    /// Recipes whose saved sums hold a step that is no longer valid: recomputed from `pinned`.
    pub rebuild: Vec<usize>,
}

impl Failure {
    fn unchanged(error: Error) -> Failure {
        Failure {
            error,
            recovery: Recovery::Unchanged,
        }
    }
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
        let recipes = recipes
            .iter()
            .map(|r| Held {
                name: r.name.clone(),
                dtype: r.dtype,
                sums: Sums::new(&r.method, r.window, &mut next),
                steps: Vec::new(),
            })
            .collect();
        Window {
            pinned: BTreeMap::new(),
            recipes,
            acc: None,
            schema: None,
            accumulator,
            acc_dir: state_dir,
            memory_budget,
            held_extra: BTreeSet::new(),
            share: None,
            select: Select::default(),
        }
    }

    /// Keep sums only for the tensors this instance writes in every recipe's output.
    pub fn with_share(mut self, share: Share, recipes: &[Recipe]) -> Window {
        let outs = recipes.iter().map(|r| (r.dtype, r.shard_size)).collect();
        self.share = Some((share, outs));
        self
    }

    /// With a share: the tensors of checkpoints like `c` this instance owns (its part of some
    /// recipe's output). None without a share.
    pub fn owned_names(&self, c: &Checkpoint) -> Result<Option<BTreeSet<String>>> {
        if self.share.is_none() {
            return Ok(None);
        }
        let layout = match self.acc.as_ref() {
            Some(acc) => acc.layout().clone(),
            None => self.layout_for(c)?,
        };
        Ok(Some(layout.tensors.into_iter().map(|t| t.name).collect()))
    }

    /// The layout of the sums over checkpoints like `c`: every float tensor, or with a
    /// share, those this instance writes for some recipe.
    fn layout_for(&self, c: &Checkpoint) -> Result<FlatLayout> {
        let Some((share, outs)) = &self.share else {
            return Ok(FlatLayout::of(c));
        };
        let mut owned = BTreeSet::new();
        for (dtype, shard_size) in outs {
            owned.extend(share.owned(plan::output_tensors(c, *dtype)?, *shard_size)?);
        }
        Ok(FlatLayout::of_only(c, |n| owned.contains(n)))
    }

    /// Keep `steps` pinned (those that are) even after the recipes no longer need them, until
    /// the next call names others.
    pub fn hold(&mut self, steps: &[u64]) {
        self.held_extra = steps.iter().copied().collect();
    }

    /// Steps currently pinned, oldest first.
    pub fn steps(&self) -> Vec<u64> {
        self.pinned.keys().copied().collect()
    }

    /// Open checkpoints with `select` (`[select]`) instead of the formats' rules alone.
    pub fn with_select(mut self, select: Select) -> Window {
        self.select = select;
        self
    }

    /// Which tensors are averaged: open checkpoints with it.
    pub fn select(&self) -> &Select {
        &self.select
    }

    /// Newest pinned step.
    pub fn newest(&self) -> Option<u64> {
        self.pinned.keys().next_back().copied()
    }

    /// The pinned checkpoint of `step`.
    pub fn pinned(&self, step: u64) -> Option<&Arc<Checkpoint>> {
        self.pinned.get(&step)
    }

    /// Every pinned checkpoint, oldest first.
    pub fn pinned_all(&self) -> impl Iterator<Item = (u64, &Arc<Checkpoint>)> {
        self.pinned.iter().map(|(s, c)| (*s, c))
    }

    /// Number of recipes (config order).
    pub fn recipe_count(&self) -> usize {
        self.recipes.len()
    }

    /// The steps recipe `ri`'s next output would average, oldest first.
    pub fn held(&self, ri: usize) -> &[u64] {
        &self.recipes[ri].steps
    }

    /// Whether recipe `ri` has enough to publish: a full window, or any EMA state.
    pub fn ready(&self, ri: usize) -> bool {
        let r = &self.recipes[ri];
        r.sums.ready(r.steps.len())
    }

    /// Whether recipe `ri` runs over every accepted checkpoint (EMA).
    pub fn is_running(&self, ri: usize) -> bool {
        self.recipes[ri].sums.is_running()
    }

    /// The accumulator precision in use (see [`Window::arrive`] for when f64 is chosen).
    pub fn accumulator(&self) -> Accumulator {
        self.accumulator
    }

    /// The accumulators' layout, once created.
    pub fn layout(&self) -> Option<&FlatLayout> {
        self.acc.as_ref().map(|a| a.layout())
    }

    /// The accumulator store, once created (for state snapshots).
    pub fn acc(&self) -> Option<&dyn AccStore> {
        self.acc.as_deref()
    }

    /// A saved state now names generation `generation` of a file-backed store (see
    /// [`AccStore::persisted`]).
    pub fn persisted(&mut self, generation: u64) {
        if let Some(a) = self.acc.as_mut() {
            a.persisted(generation);
        }
    }

    /// How many checkpoints must stay pinned: the largest need over recipes.
    fn capacity(&self) -> usize {
        self.recipes
            .iter()
            .map(|r| r.sums.capacity())
            .max()
            .unwrap_or(1)
    }

    fn slot_count(&self) -> usize {
        self.recipes.iter().map(|r| r.sums.slots()).sum()
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

    /// Everything needed to publish recipe `ri`'s current average, or `None` when it holds
    /// nothing or its newest step is not pinned (an EMA restored after its newest checkpoint
    /// was deleted: the next arrival brings one).
    pub fn output(&self, ri: usize) -> Option<Output<'_>> {
        let r = &self.recipes[ri];
        let newest = self.pinned.get(r.steps.last()?)?;
        let source = match r.sums.output_slot() {
            Some(slot) => Source::Sums {
                acc: self.acc.as_deref()?,
                slot,
            },
            None => Source::Members(
                r.steps
                    .iter()
                    .map(|s| self.pinned.get(s).map(|c| c.as_ref()))
                    .collect::<Option<_>>()?,
            ),
        };
        Some(Output {
            steps: &r.steps,
            weights: r.sums.method().weights(r.steps.len()).unwrap_or_default(),
            newest,
            source,
        })
    }

    /// The method of recipe `ri`.
    pub fn method(&self, ri: usize) -> &Method {
        self.recipes[ri].sums.method()
    }

    /// Create the accumulators for checkpoints like `c` if there are none yet.
    fn ensure_acc(&mut self, c: &Checkpoint) -> Result<()> {
        if self.acc.is_some() {
            if self.schema.is_none() {
                self.schema = Some(Schema::of(c));
            }
            return Ok(());
        }
        // f32 running sums stay within one output ulp for bf16/f16 outputs over any realistic
        // number of updates, but not within 1e-6 for f32/f64 outputs (each add/subtract costs
        // about one f32 ulp of the sum). If any recipe publishes a wide dtype, accumulate in f64.
        let kinds = || c.tensors.iter().filter_map(|t| FloatKind::of(t.dtype));
        let wide = self.recipes.iter().any(|r| r.dtype.writes_wide(kinds()));
        let accumulator = if wide && self.accumulator == Accumulator::F32 {
            tracing::info!(
                event = "window.accumulator",
                accumulator = "f64",
                "a recipe publishes f32/f64 tensors: accumulating in f64 so outputs stay within 1e-6 of a one-shot merge"
            );
            Accumulator::F64
        } else {
            self.accumulator
        };
        let layout = self.layout_for(c)?;
        let dir = self.acc_home(&layout, accumulator)?;
        self.acc = Some(self.create_acc(layout, accumulator, dir.as_deref())?);
        self.accumulator = accumulator;
        self.schema = Some(Schema::of(c));
        Ok(())
    }

    /// Where accumulators over `layout` go: None = RAM, Some(dir) = file-backed.
    fn acc_home(&self, layout: &FlatLayout, accumulator: Accumulator) -> Result<Option<PathBuf>> {
        let bytes = accum::store_bytes(layout, self.slot_count(), accumulator.size());
        if bytes <= self.memory_budget {
            return Ok(None);
        }
        match &self.acc_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| Error::io("create directory", d, e))?;
                Ok(Some(d.clone()))
            }
            None => Err(Error::Config {
                file: None,
                detail: format!(
                    "state.memory_budget: accumulators need {} but state.memory_budget is {}; set state.dir so they can live in files, or raise state.memory_budget",
                    crate::obs::log::bytes(bytes),
                    crate::obs::log::bytes(self.memory_budget)
                ),
            }),
        }
    }

    /// Say where the accumulators live and how big they are (operators size memory and
    /// disk from this line).
    fn log_placement(
        &self,
        layout: &FlatLayout,
        accumulator: Accumulator,
        dir: Option<&std::path::Path>,
    ) {
        let bytes = accum::store_bytes(layout, self.slot_count(), accumulator.size());
        tracing::info!(
            event = "window.accumulator",
            accumulator = accumulator.name(),
            placement = if dir.is_some() { "file" } else { "ram" },
            size = %crate::obs::log::bytes(bytes),
            dir = %dir.map(|d| d.display().to_string()).unwrap_or_else(|| "-".into()),
            "accumulators {}",
            if dir.is_some() {
                "in files under state.dir (above state.memory_budget)"
            } else {
                "in RAM"
            }
        );
    }

    /// Zeroed accumulators over `layout` (in RAM, or a new generation file in `dir`).
    fn create_acc(
        &self,
        layout: FlatLayout,
        accumulator: Accumulator,
        dir: Option<&std::path::Path>,
    ) -> Result<Box<dyn AccStore>> {
        self.log_placement(&layout, accumulator, dir);
        let slots = self.slot_count();
        Ok(match accumulator {
            Accumulator::F32 => Box::new(Accumulators::<f32>::new(layout, slots, dir)?),
            Accumulator::F64 => Box::new(Accumulators::<f64>::new(layout, slots, dir)?),
        })
    }

    /// Resume from a snapshot: `acc-<generation>.bin` in the state directory holds the saved
    /// accumulator bytes (read into RAM, or adopted as the current generation of a file-backed
    /// store, without a copy). Recipes in `snapshot.rebuild` are recomputed from the pinned
    /// checkpoints. On error the window is left empty (as new).
    pub fn restore(&mut self, snapshot: Saved) -> Result<()> {
        let r = self.try_restore(snapshot);
        if r.is_err() {
            self.acc = None;
            self.schema = None;
            self.pinned.clear();
            for h in &mut self.recipes {
                h.steps.clear();
            }
        }
        r
    }

    fn try_restore(&mut self, snapshot: Saved) -> Result<()> {
        let Saved {
            layout,
            accumulator,
            generation,
            pinned,
            held,
            rebuild,
        } = snapshot;
        if held.len() != self.recipes.len() {
            return Err(Error::Internal(format!(
                "snapshot has {} recipes, the config {}",
                held.len(),
                self.recipes.len()
            )));
        }
        if self.share.is_some() {
            if let Some(c) = pinned.values().next_back() {
                if self.layout_for(c)? != layout {
                    return Err(Error::Mismatch {
                        path: c.path.clone(),
                        detail: "the saved sums cover other tensors than this instance's part \
                                 (partition.count, partition.by or a recipe's dtype or \
                                 shard size changed)"
                            .into(),
                    });
                }
            }
        }
        let slots = self.slot_count();
        let acc: Box<dyn AccStore> = match self.acc_home(&layout, accumulator)? {
            Some(dir) => {
                self.log_placement(&layout, accumulator, Some(&dir));
                match accumulator {
                    Accumulator::F32 => {
                        Box::new(Accumulators::<f32>::adopt(layout, slots, &dir, generation)?)
                    }
                    Accumulator::F64 => {
                        Box::new(Accumulators::<f64>::adopt(layout, slots, &dir, generation)?)
                    }
                }
            }
            None => {
                let dir = self.acc_dir.clone().ok_or_else(|| {
                    Error::Internal("restoring accumulators without a state directory".into())
                })?;
                let mut acc = self.create_acc(layout, accumulator, None)?;
                acc.load(&accum::generation_path(&dir, generation))?;
                acc
            }
        };
        self.acc = Some(acc);
        self.accumulator = accumulator;
        self.schema = pinned.values().next_back().map(|c| Schema::of(c));
        self.pinned = pinned;
        for (h, steps) in self.recipes.iter_mut().zip(held) {
            h.steps = steps;
        }
        if !rebuild.is_empty() {
            let pinned = self.pinned.clone();
            self.rebuild_over(pinned, &rebuild)?;
        }
        Ok(())
    }

    /// Add the newest accepted checkpoint: one pass over it and the checkpoints it evicts
    /// updates every recipe. A checkpoint older than the newest pinned one joins the window
    /// sums by a rebuild (an out-of-order arrival).
    pub fn arrive(&mut self, step: u64, c: Arc<Checkpoint>) -> Result<ArrivalReport, Failure> {
        self.ensure_acc(&c).map_err(Failure::unchanged)?;
        if self.newest().is_some_and(|n| step <= n) {
            return self.insert_out_of_order(step, c);
        }
        // inputs[0] is the new checkpoint; evicted ones follow, each once.
        let mut inputs: Vec<Arc<Checkpoint>> = vec![c.clone()];
        let mut input_steps: Vec<u64> = vec![step];
        let mut ops = Vec::new();
        let mut evicted = Vec::new();
        for r in &self.recipes {
            let held = r.steps.len();
            let evicts = r.sums.evicts(held);
            if evicts {
                evicted.push((r.name.clone(), r.steps[0]));
            }
            let old = if evicts && r.sums.reads_evicted() {
                let s = r.steps[0];
                Some(match input_steps.iter().position(|x| *x == s) {
                    Some(i) => i,
                    None => {
                        let ck = self.pinned.get(&s).cloned().ok_or_else(|| {
                            Failure::unchanged(Error::Internal(format!(
                                "recipe {} holds step {s}, which is not pinned",
                                r.name
                            )))
                        })?;
                        inputs.push(ck);
                        input_steps.push(s);
                        inputs.len() - 1
                    }
                })
            } else {
                None
            };
            r.sums.arrive(held, 0, old, &mut ops);
        }
        let refs: Vec<&Checkpoint> = inputs.iter().map(|c| c.as_ref()).collect();
        // Recipes that keep no sums (`weights`, `schedule`) have no ops: nothing is read.
        let bytes_read = if ops.is_empty() {
            0
        } else {
            refs.iter().map(|c| c.data_bytes()).sum()
        };
        if !ops.is_empty() {
            if let Err(e) = self.pass(&refs, &ops) {
                return Err(self.after_failed_pass(e, &[]));
            }
        }
        self.pinned.insert(step, c);
        for r in self.recipes.iter_mut() {
            r.steps.push(step);
            if !r.sums.is_running() && r.steps.len() > r.sums.capacity() {
                r.steps.remove(0);
            }
        }
        self.trim();
        Ok(ArrivalReport {
            evicted,
            inputs: inputs.len(),
            bytes_read,
            rebuilt: false,
            absorbed: (0..self.recipes.len()).collect(),
        })
    }

    /// A checkpoint older than the newest pinned one (written late). It joins the window if it
    /// is newer than the oldest pinned step (or the window is not full), and the window
    /// recipes are rebuilt. A running EMA has already moved past it and does not absorb it.
    fn insert_out_of_order(
        &mut self,
        step: u64,
        c: Arc<Checkpoint>,
    ) -> Result<ArrivalReport, Failure> {
        let oldest = self.pinned.keys().next().copied().unwrap_or(0);
        if self.pinned.len() >= self.capacity() && step < oldest {
            return Ok(ArrivalReport::default());
        }
        let mut pinned = self.pinned.clone();
        pinned.insert(step, c);
        let window_recipes: Vec<usize> = (0..self.recipes.len())
            .filter(|i| !self.recipes[*i].sums.is_running())
            .collect();
        match self.rebuild_over(pinned, &window_recipes) {
            Ok(mut report) => {
                self.trim();
                report.absorbed = window_recipes;
                Ok(report)
            }
            Err(e) => Err(self.after_failed_pass(e, &[])),
        }
    }

    /// Remove steps from the window (their files changed, or a rollback abandoned them) and
    /// rebuild every recipe that held one. Afterwards none of `steps` is pinned or held,
    /// whether the rebuild succeeded (`Ok`: the steps that were pinned) or not (`Err`: see
    /// [`Failure::recovery`]).
    pub fn remove(&mut self, steps: &[u64]) -> Result<Vec<u64>, Failure> {
        let removed: Vec<u64> = steps
            .iter()
            .copied()
            .filter(|s| self.pinned.contains_key(s))
            .collect();
        let affected: Vec<usize> = (0..self.recipes.len())
            .filter(|i| self.recipes[*i].steps.iter().any(|s| steps.contains(s)))
            .collect();
        let mut pinned = self.pinned.clone();
        pinned.retain(|s, _| !steps.contains(s));
        if affected.is_empty() {
            self.pinned = pinned;
            return Ok(removed);
        }
        match self.rebuild_over(pinned, &affected) {
            Ok(_) => Ok(removed),
            Err(error) => Err(Failure {
                error,
                recovery: self.recover(steps),
            }),
        }
    }

    /// Drop pinned checkpoints no recipe needs any more (and that are not held).
    fn trim(&mut self) {
        let cap = self.capacity();
        let Some(&keep_from) = self.pinned.keys().rev().nth(cap.saturating_sub(1)) else {
            return;
        };
        let extra = &self.held_extra;
        self.pinned
            .retain(|s, _| *s >= keep_from || extra.contains(s));
    }

    /// Run one pass of `ops` over `inputs`.
    fn pass(&mut self, inputs: &[&Checkpoint], ops: &[Op]) -> Result<()> {
        let acc = self
            .acc
            .as_mut()
            .ok_or_else(|| Error::Internal("a pass before the accumulators exist".into()))?;
        acc.pass(inputs, ops)
    }

    /// Recompute recipes `which` over `pinned` (the pinned set the window will have) in one
    /// pass. Commits (the pinned set and the recipes' held steps) only when the pass succeeded.
    fn rebuild_over(
        &mut self,
        pinned: BTreeMap<u64, Arc<Checkpoint>>,
        which: &[usize],
    ) -> Result<ArrivalReport> {
        let all: Vec<(u64, Arc<Checkpoint>)> =
            pinned.iter().map(|(s, c)| (*s, c.clone())).collect();
        let refs: Vec<&Checkpoint> = all.iter().map(|(_, c)| c.as_ref()).collect();
        let mut ops = Vec::new();
        let mut held = Vec::new();
        for &ri in which {
            let sums = &self.recipes[ri].sums;
            let n = sums.rebuild_count(all.len());
            let inputs: Vec<usize> = (all.len() - n..all.len()).collect();
            sums.rebuild(&inputs, &mut ops);
            held.push((ri, all[all.len() - n..].iter().map(|(s, _)| *s).collect()));
        }
        // With nothing pinned the ops are only Zero: they still run, so no stale sums survive.
        if !ops.is_empty() {
            self.pass(&refs, &ops)?;
        }
        self.pinned = pinned;
        for (ri, steps) in held {
            self.recipes[ri].steps = steps;
        }
        Ok(ArrivalReport {
            inputs: refs.len(),
            bytes_read: refs.iter().map(|c| c.data_bytes()).sum(),
            rebuilt: true,
            ..ArrivalReport::default()
        })
    }

    /// After a failed pass that was to leave the window as it is (plus a new checkpoint):
    /// sums the pass did not change (file-backed, or in RAM when it failed before its first
    /// page) are as they were; damaged ones are recomputed.
    fn after_failed_pass(&mut self, error: Error, exclude: &[u64]) -> Failure {
        let recovery = if self.acc.as_ref().is_some_and(|a| a.damaged()) {
            self.recover(exclude)
        } else {
            Recovery::Unchanged
        };
        Failure { error, recovery }
    }

    /// Recompute every recipe from the pinned checkpoints minus `exclude`, dropping pinned
    /// checkpoints whose files changed, until a pass succeeds; if none can, clear the window.
    fn recover(&mut self, exclude: &[u64]) -> Recovery {
        let all: Vec<usize> = (0..self.recipes.len()).collect();
        let mut dropped: Vec<u64> = Vec::new();
        loop {
            let mut pinned = self.pinned.clone();
            pinned.retain(|s, _| !exclude.contains(s) && !dropped.contains(s));
            let changed: Vec<u64> = pinned
                .iter()
                .filter(|(_, c)| c.verify().is_err())
                .map(|(s, _)| *s)
                .collect();
            pinned.retain(|s, _| !changed.contains(s));
            dropped.extend(&changed);
            match self.rebuild_over(pinned, &all) {
                Ok(_) => return Recovery::Rebuilt { dropped },
                // Another source changed under the recomputation: drop it and try again
                // (each round pins strictly fewer checkpoints, so this ends).
                Err(_) if !changed.is_empty() => continue,
                Err(_) => {
                    self.pinned.clear();
                    for h in &mut self.recipes {
                        h.steps.clear();
                    }
                    return Recovery::Cleared;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::format::safetensors::header::build_header;
    use crate::math::kernels::{self, Acc};
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
        for ri in 0..w.recipe_count() {
            if !w.ready(ri) {
                continue;
            }
            let o = w.output(ri).unwrap();
            let (steps, weights) = (o.steps, &o.weights);
            let Source::Sums { acc, slot } = o.source else {
                panic!("recipe {ri} has no sums")
            };
            let div = 1.0;
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
                kernels::merge_chunk::<f64>(&srcs, ft.kind, weights, out, &mut want, false);
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
                        w.recipes[ri].name,
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
        assert_eq!(w.held(0), [1300, 1400, 1500, 1600]);
        assert_eq!(w.held(2).len(), 16);
        // Rollback: the run restarted from 1400; 1500 and 1600 are abandoned.
        w.remove(&[1500, 1600]).unwrap();
        assert_eq!(w.held(0), [1300, 1400]);
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
        assert_eq!(w.held(0), [1500, 1600, 1650, 1700]);
        check(&w, &all, out);
    }

    /// A snapshot of `w` as saved in generation `generation`.
    fn snapshot(w: &Window, layout: &FlatLayout, generation: u64) -> Saved {
        Saved {
            layout: layout.clone(),
            accumulator: Accumulator::F32,
            generation,
            pinned: w.pinned.clone(),
            held: (0..w.recipe_count()).map(|i| w.held(i).to_vec()).collect(),
            rebuild: Vec::new(),
        }
    }

    /// Every slot's values, every recipe's held steps and the pinned steps: all a failed pass
    /// may not change.
    fn state_of(w: &Window) -> (Vec<Vec<f64>>, Vec<Vec<u64>>, Vec<u64>) {
        let acc = w.acc().unwrap();
        (
            (0..w.slot_count()).map(|s| acc.slot_f64(s)).collect(),
            (0..w.recipe_count()).map(|i| w.held(i).to_vec()).collect(),
            w.steps(),
        )
    }

    /// Shapes spanning several accumulator pages, so a pass can fail in its middle.
    const PAGES: [(&str, usize); 2] = [("big", 3 * accum::PAGE + 5), ("small", 77)];

    /// Make the next `times` passes reading checkpoints under `dir` fail at `page` (after
    /// the pages before it were applied); whatever is left is withdrawn when dropped.
    struct FailAt(PathBuf, usize);
    impl FailAt {
        fn new(dir: &std::path::Path, page: usize, times: usize) -> FailAt {
            for _ in 0..times {
                accum::FAIL_AT_PAGE
                    .lock()
                    .unwrap()
                    .push((dir.to_path_buf(), page));
            }
            FailAt(dir.to_path_buf(), page)
        }
    }
    impl Drop for FailAt {
        fn drop(&mut self) {
            accum::FAIL_AT_PAGE
                .lock()
                .unwrap()
                .retain(|(d, p)| !(*d == self.0 && *p == self.1));
        }
    }

    fn truncate(c: &Checkpoint) {
        let f = &c.files[0].path;
        let len = std::fs::metadata(f).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    }

    /// A window over five checkpoints of multi-page shapes, in RAM or file-backed, with the
    /// checkpoints of the run under `root/run`.
    fn five(root: &std::path::Path, file_backed: bool) -> (Window, BTreeMap<u64, Arc<Checkpoint>>) {
        let run = root.join("run");
        let (dir, budget) = if file_backed {
            (Some(root.join("state")), 1)
        } else {
            (None, u64::MAX)
        };
        let mut w = Window::new(&recipes("bf16"), Accumulator::F32, dir, budget);
        let mut all = BTreeMap::new();
        for k in 1..=5u64 {
            let c = write_ckpt_shaped(&run, k * 10, FloatKind::BF16, 0, &PAGES);
            all.insert(k * 10, c.clone());
            w.arrive(k * 10, c).unwrap();
        }
        (w, all)
    }

    #[test]
    fn a_failed_pass_leaves_held_steps_and_sums_exactly_as_they_were() {
        for file_backed in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let (mut w, _) = five(d.path(), file_backed);
            let before = state_of(&w);
            // The new checkpoint changes between the gate and the pass: the first page's
            // check finds it, before any sum is touched.
            let late = d.path().join("late");
            let c = write_ckpt_shaped(&late, 60, FloatKind::BF16, 0, &PAGES);
            truncate(&c);
            let f = w.arrive(60, c).unwrap_err();
            assert_eq!(f.recovery, Recovery::Unchanged, "file-backed {file_backed}");
            assert_eq!(f.error.reason(), "source_changed");
            assert!(state_of(&w) == before, "file-backed {file_backed}");
        }
        // File-backed sums also survive a failure in the middle of a pass: it wrote a new
        // generation, which is discarded.
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = five(d.path(), true);
        let before = state_of(&w);
        let late = d.path().join("late");
        let _fail = FailAt::new(&late, 2, 1);
        let c = write_ckpt_shaped(&late, 60, FloatKind::BF16, 0, &PAGES);
        let f = w.arrive(60, c).unwrap_err();
        assert_eq!(f.recovery, Recovery::Unchanged);
        assert!(state_of(&w) == before);
    }

    #[test]
    fn a_pass_failing_midway_in_ram_is_repaired_from_the_pinned_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, all) = five(d.path(), false);
        let (_, held_before, pinned_before) = state_of(&w);
        let late = d.path().join("late");
        let _fail = FailAt::new(&late, 2, 1);
        let c = write_ckpt_shaped(&late, 60, FloatKind::BF16, 0, &PAGES);
        let f = w.arrive(60, c).unwrap_err();
        assert_eq!(f.recovery, Recovery::Rebuilt { dropped: vec![] });
        let (_, held, pinned) = state_of(&w);
        assert_eq!(pinned, pinned_before);
        // Window recipes hold the same steps as before; the EMA restarted from the pinned
        // checkpoints (its older history was only in the damaged sums).
        assert_eq!(held[0], held_before[0]);
        assert_eq!(held[1], held_before[1]);
        assert_eq!(held[2], pinned);
        check(&w, &all, FloatKind::BF16);
    }

    #[test]
    fn a_failed_rebuild_never_leaves_a_recipe_holding_an_unpinned_step() {
        for file_backed in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let (mut w, all) = five(d.path(), file_backed);
            // A rollback abandons 50; the rebuild without it fails midway, and so does the
            // recomputation that follows although every pinned source verifies: nothing can
            // be recomputed, so the window is cleared rather than left inconsistent.
            let fail = FailAt::new(&d.path().join("run"), 1, 2);
            let f = w.remove(&[50]).unwrap_err();
            assert_eq!(f.recovery, Recovery::Cleared, "file-backed {file_backed}");
            assert!(w.steps().is_empty());
            for i in 0..w.recipe_count() {
                assert!(w.held(i).is_empty(), "file-backed {file_backed}");
            }
            drop(fail);
            // It fills again from the next arrivals, and its outputs are right.
            let mut all = all;
            for k in 6..=9u64 {
                let c =
                    write_ckpt_shaped(&d.path().join("run"), k * 10, FloatKind::BF16, 0, &PAGES);
                all.insert(k * 10, c.clone());
                w.arrive(k * 10, c).unwrap();
            }
            assert_eq!(w.held(0), [60, 70, 80, 90]);
            check(&w, &all, FloatKind::BF16);
        }
        // With one source really changed under the rebuild, the recomputation drops it and
        // keeps the rest.
        let d = tempfile::tempdir().unwrap();
        let (mut w, all) = five(d.path(), false);
        let fail = FailAt::new(&d.path().join("run"), 1, 1);
        truncate(&all[&30]);
        let f = w.remove(&[50]).unwrap_err();
        drop(fail);
        assert_eq!(f.recovery, Recovery::Rebuilt { dropped: vec![30] });
        assert_eq!(w.steps(), [20, 40]);
        for i in 0..w.recipe_count() {
            assert!(w.held(i).iter().all(|s| w.pinned(*s).is_some()), "{i}");
        }
        assert_eq!(w.held(2), [20, 40]);
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
        let (g, path) = file.acc().unwrap().file().unwrap();
        assert_eq!(path, state.join(format!("acc-{g}.bin")));
        assert_eq!(accum::generations(&state), vec![g]);
        for s in 0..4 {
            assert_eq!(
                ram.acc().unwrap().slot_f64(s),
                file.acc().unwrap().slot_f64(s)
            );
        }
        // Over budget without a state dir: a clear error naming the keys.
        let mut none = Window::new(&recipes("source"), Accumulator::F32, None, 1);
        let c = write_ckpt(d.path(), 999, FloatKind::BF16, 0);
        let f = none.arrive(999, c).err().unwrap();
        assert_eq!(f.recovery, Recovery::Unchanged);
        let e = f.error.to_string();
        assert!(
            e.contains("state.memory_budget") && e.contains("state.dir"),
            "{e}"
        );
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
        let (ra, fa) = (ram.acc().unwrap(), file.acc().unwrap());
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
            std::fs::write(state.join("acc-7.bin"), w.acc().unwrap().raw()).unwrap();
            let mut r = Window::new(
                &recipes("bf16"),
                Accumulator::F32,
                Some(state.clone()),
                budget,
            );
            r.restore(snapshot(&w, &layout, 7)).unwrap();
            let acc = r.acc().unwrap();
            // File-backed: the snapshot itself became the current generation (no copy).
            assert_eq!(
                acc.file().map(|(g, p)| (g, p.to_path_buf())),
                (budget == 1).then(|| (7, state.join("acc-7.bin")))
            );
            for slot in 0..4 {
                assert_eq!(acc.slot_f64(slot), w.acc().unwrap().slot_f64(slot));
            }
            assert_eq!(r.held(2), w.held(2));
            // The next arrival writes generation 8 and never touches 7 (the saved snapshot).
            let before = std::fs::read(state.join("acc-7.bin")).unwrap();
            let c = write_ckpt(d.path(), 60, FloatKind::BF16, 0);
            r.arrive(60, c).unwrap();
            assert_eq!(std::fs::read(state.join("acc-7.bin")).unwrap(), before);
            if budget == 1 {
                assert_eq!(r.acc().unwrap().file().unwrap().0, 8);
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
            let e = r.restore(snapshot(&w, &layout, 3)).unwrap_err().to_string();
            assert!(e.contains("acc-3.bin") && e.contains("12 bytes"), "{e}");
        }
    }

    #[test]
    fn file_backed_passes_write_new_generations_and_keep_the_persisted_one() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let mut w = Window::new(&recipes("bf16"), Accumulator::F32, Some(state.clone()), 1);
        let gens = || accum::generations(&state);
        w.arrive(10, write_ckpt(d.path(), 10, FloatKind::BF16, 0))
            .unwrap();
        // Created as generation 1, updated out of place into 2; 1 was not persisted: deleted.
        assert_eq!(gens(), vec![2]);
        w.persisted(2);
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
        let cur = w.acc().unwrap().file().unwrap().0;
        assert_eq!(gens(), vec![2, cur]);
    }
}
