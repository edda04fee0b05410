//! `pmad run`: the long-running service.
//!
//! The async side only moves events: it waits for a wake (inotify), a deadline (poll interval,
//! a checkpoint's settle time, an emission interval) or shutdown, then runs one *cycle* on the
//! blocking pool. A cycle is synchronous and owns all state ([`Core`]): scan → gate (marker,
//! settle, validation, schema, NaN/Inf) → select (phase, LR plateau, interval) → window update
//! (one pass feeding every recipe) → emissions that are due → state save (with `state.dir`;
//! after the emissions so it never delays an output: a crash before it re-processes that
//! checkpoint, and an output already on disk for exactly those steps is counted as published,
//! `merge.skipped`, never published twice). Shutdown stops intake at once and
//! lets an in-flight emission finish within `daemon.shutdown_grace`, then cancels it (its temp
//! dir is removed) and exits cleanly.
//!
//! A checkpoint is tracked by directory. Its states: pending (waiting for marker, quiescence,
//! validity), accepted (in the window), skipped (outside the phase), rejected (corrupt; logged
//! once, retried only if its files change), abandoned (a later step dropped by a rollback).

use crate::checkpoint::Checkpoint;
use crate::checkpoint::Fingerprint;
use crate::config::Config;
use crate::emit;
use crate::engine::Progress;
use crate::error::Error;
use crate::merge::Accumulator;
use crate::merge::{self, FloatKind};
use crate::metrics::{RecipeStatus, Shared, StatusSnapshot};
use crate::publish;
use crate::select::{self, Decision};
use crate::state::{Manifest, SavedCheckpoint, StateDir};
use crate::telemetry::{bytes, rate, secs};
use crate::watch::{self, Scanner, Signature};
use crate::window::Window;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

#[derive(Debug, Clone, PartialEq)]
enum TState {
    Pending,
    Accepted,
    Skipped,
    Rejected,
    Abandoned,
}

#[derive(Debug)]
struct Tracked {
    step: u64,
    sig: Signature,
    since: Instant,
    state: TState,
}

/// A command to run after an emission.
#[derive(Debug)]
pub struct HookJob {
    /// Recipe name.
    pub recipe: String,
    /// Step published.
    pub step: u64,
    /// Command and arguments, placeholders substituted.
    pub argv: Vec<String>,
    /// Time limit.
    pub timeout: Duration,
}

/// All daemon state; driven one cycle at a time.
pub struct Core {
    cfg: Config,
    scanner: Arc<Scanner>,
    tracked: BTreeMap<PathBuf, Tracked>,
    window: Window,
    /// Accepted step → directory (for merge.json).
    paths: BTreeMap<u64, PathBuf>,
    /// Steps whose directory vanished while pinned (logged once).
    vanished: BTreeSet<u64>,
    pool: rayon::ThreadPool,
    hooks: tokio::sync::mpsc::UnboundedSender<HookJob>,
    cancel: Arc<AtomicBool>,
    /// Set at SIGTERM: no new checkpoint or emission is started (the in-flight one goes on
    /// until `cancel`).
    stopping: Arc<AtomicBool>,
    shared: Arc<Shared>,
    /// Persistent state (None without `state.dir`).
    state: Option<StateDir>,
    /// Checkpoints at or below this step were handled before a restart: not re-processed.
    restored_upto: Option<u64>,
    /// Newest step considered (accepted, skipped or rejected), saved in the manifest.
    considered_upto: Option<u64>,
    /// The sums changed since they were last saved (or that save failed): the next save
    /// must include them (a manifest must never describe sums that are not on disk).
    acc_unsaved: bool,
    /// Per recipe: the step LATEST named at restore when it was newer than the restored
    /// window, i.e. published after the last state save. When the re-processed window
    /// reaches exactly that output again, it is not published a second time.
    published_unsaved: Vec<Option<u64>>,
    /// `watch.waiting` was logged (watch.dir missing); logged again only after it appeared.
    waiting_logged: bool,
}

impl Core {
    /// Build the daemon state from a validated config.
    pub fn new(
        cfg: Config,
        hooks: tokio::sync::mpsc::UnboundedSender<HookJob>,
        cancel: Arc<AtomicBool>,
        stopping: Arc<AtomicBool>,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Core> {
        let mut exclude: Vec<PathBuf> = cfg.recipes.iter().map(|r| r.out_dir.clone()).collect();
        if let Some(d) = &cfg.state.dir {
            exclude.push(d.clone());
        }
        let scanner = Arc::new(Scanner::new(cfg.watch.clone(), &exclude));
        let window = fresh_window(&cfg);
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("pmad-worker-{i}"))
            .build()?;
        let state = match &cfg.state.dir {
            Some(d) => Some(StateDir::open(d)?),
            None => None,
        };
        Ok(Core {
            cfg,
            scanner,
            tracked: BTreeMap::new(),
            window,
            paths: BTreeMap::new(),
            vanished: BTreeSet::new(),
            pool,
            hooks,
            cancel,
            stopping,
            shared,
            state,
            restored_upto: None,
            considered_upto: None,
            acc_unsaved: false,
            published_unsaved: Vec::new(),
            waiting_logged: false,
        })
    }

    fn recipes_signature(&self) -> String {
        self.cfg
            .recipes
            .iter()
            .map(|r| format!("{}:{:?}:{}", r.name, r.method, r.window))
            .collect::<Vec<_>>()
            .join(";")
    }

    fn manifest(&self) -> Option<Manifest> {
        let layout = self.window.layout()?.clone();
        Some(Manifest {
            format: crate::state::FORMAT,
            generation: 0,
            accumulator: self.window.accumulator().name().into(),
            recipes_signature: self.recipes_signature(),
            layout,
            window: self
                .window
                .ckpts
                .iter()
                .map(|(step, c)| SavedCheckpoint {
                    step: *step,
                    path: c.path.clone(),
                    files: c
                        .files
                        .iter()
                        .map(|f| (f.path.clone(), f.fingerprint))
                        .collect(),
                })
                .collect(),
            recipes: self.window.saved_recipes(),
            newest_step: self.considered_upto.max(self.restored_upto),
            paths: self.paths.iter().map(|(s, p)| (*s, p.clone())).collect(),
        })
    }

    /// Persist the state (with the accumulators when `sums` changed).
    fn save(&mut self, sums: bool) {
        let Some(m) = self.manifest() else { return };
        let Some(sd) = self.state.as_mut() else {
            return;
        };
        let t0 = Instant::now();
        let sums = sums || self.acc_unsaved;
        let acc = match (sums, self.window.acc.as_ref()) {
            (true, Some(a)) => Some(crate::state::AccBytes::of(a.as_ref())),
            _ => None,
        };
        let result = sd.save(m, acc);
        self.acc_unsaved = sums && result.is_err();
        if result.is_ok() {
            // A file-backed store must keep the generation the manifest now names.
            let g = sd.generation();
            if let Some(a) = self.window.acc.as_mut() {
                a.persisted(g);
            }
        }
        match result {
            Ok(n) => {
                info!(event = "state.saved", dir = %sd.path().display(), size = %bytes(n), took = %secs(t0.elapsed()), accumulators = sums)
            }
            Err(e) => {
                // Keep running: the previous generation stays valid on disk.
                match e.errno() {
                    Some(errno) => {
                        error!(event = "state.saved", ok = false, reason = e.reason(), errno, error = %e)
                    }
                    None => {
                        error!(event = "state.saved", ok = false, reason = e.reason(), error = %e)
                    }
                }
            }
        }
    }

    /// Resume from `state.dir` if a usable state is there (reliability promise 3).
    pub fn restore(&mut self) {
        let Some(sd) = self.state.as_mut() else {
            return;
        };
        let dir = sd.path().display().to_string();
        let m = match sd.load() {
            Ok(Some(x)) => x,
            Ok(None) => return,
            Err(why) => {
                warn!(event = "state.restored", restored = false, dir = %dir, reason = %why, "starting fresh");
                return;
            }
        };
        if m.recipes_signature != self.recipes_signature() {
            warn!(event = "state.restored", restored = false, dir = %dir, reason = "the recipes in the config changed", "starting fresh");
            return;
        }
        let acc_kind = if m.accumulator == "f64" {
            Accumulator::F64
        } else {
            Accumulator::F32
        };
        // Which saved checkpoints are still exactly what was accepted?
        let mut ok = BTreeMap::new();
        let mut changed = Vec::new();
        let mut vanished = Vec::new();
        for e in &m.window {
            match Checkpoint::open(&e.path) {
                Ok(c) => {
                    let now: Vec<(PathBuf, Fingerprint)> = c
                        .files
                        .iter()
                        .map(|f| (f.path.clone(), f.fingerprint))
                        .collect();
                    if now == e.files {
                        ok.insert(e.step, Arc::new(c));
                    } else {
                        changed.push(e.step);
                    }
                }
                Err(_) if !e.path.exists() => vanished.push(e.step),
                Err(_) => changed.push(e.step),
            }
        }
        // A changed checkpoint means the run went back to it: it and everything after it
        // are abandoned, and will be processed again as they are written.
        let cut = changed.iter().min().copied();
        if let Some(c) = cut {
            ok.retain(|s, _| *s < c);
        }
        if let Err(e) = self.window.restore(
            m.layout.clone(),
            acc_kind,
            m.generation,
            ok.clone(),
            &m.recipes,
        ) {
            warn!(event = "state.restored", restored = false, dir = %dir, reason = %e, "starting fresh");
            self.window = fresh_window(&self.cfg);
            return;
        }
        let lost: Vec<u64> = changed.iter().chain(&vanished).copied().collect();
        let rebuild: Vec<usize> = (0..self.window.recipes.len())
            .filter(|i| {
                let r = &self.window.recipes[*i];
                if r.is_ema() {
                    cut.is_some_and(|c| r.absorbed.iter().any(|s| *s >= c))
                } else {
                    r.members.iter().any(|s| lost.contains(s))
                }
            })
            .collect();
        let rebuilt: Vec<String> = rebuild
            .iter()
            .map(|i| self.window.recipes[*i].recipe.name.clone())
            .collect();
        if !rebuild.is_empty() {
            let (pool, window) = (&self.pool, &mut self.window);
            if let Err(e) = pool.install(|| window.rebuild(&rebuild)) {
                warn!(event = "state.restored", restored = false, dir = %dir, reason = %e, "rebuild failed; starting fresh");
                self.window = fresh_window(&self.cfg);
                return;
            }
        }
        self.paths = m
            .paths
            .iter()
            .filter(|(s, _)| cut.is_none_or(|c| *s < c))
            .cloned()
            .collect();
        self.restored_upto = match cut {
            Some(c) => c.checked_sub(1),
            None => m.newest_step,
        };
        self.considered_upto = self.restored_upto;
        // An output published just before a crash, after the last save: do not publish the
        // same step again. If the crash came between renaming it into place and updating
        // LATEST, finish that last step instead of publishing it anew.
        self.published_unsaved = vec![None; self.window.recipes.len()];
        for (ri, r) in self.window.recipes.iter_mut().enumerate() {
            let Some(newest) = r.steps().last().copied() else {
                continue;
            };
            let out = &r.recipe.out_dir;
            let latest = emit::latest_step(out);
            if latest.is_some_and(|l| l >= newest) {
                r.since_emit = 0;
                r.last_emitted_step = latest;
                // State is saved after publishing, so a crash in between leaves an output
                // newer than the restored window (the steps after it are re-processed).
                self.published_unsaved[ri] = latest.filter(|l| *l > newest);
            } else if emit::published_as(out, newest, r.steps())
                && publish::write_latest(out, &emit::step_dir_name(newest)).is_ok()
            {
                r.since_emit = 0;
                r.last_emitted_step = Some(newest);
            }
        }
        let steps = self.window.steps();
        info!(
            event = "state.restored",
            restored = true,
            dir = %dir,
            generation = m.generation,
            window = %fmt_steps(&steps),
            n = steps.len(),
            vanished = %fmt_list(&vanished),
            changed = %fmt_list(&changed),
            rebuilt = %if rebuilt.is_empty() { "-".to_string() } else { rebuilt.join(",") },
            "resuming; checkpoints up to step {} are not processed again",
            self.restored_upto.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
        );
        if !rebuild.is_empty() || cut.is_some() {
            self.save(true);
        }
    }

    /// The scanner (shared with the inotify callback).
    pub fn scanner(&self) -> Arc<Scanner> {
        self.scanner.clone()
    }

    /// One cycle. Returns when the next cycle is due at the latest.
    pub fn cycle(&mut self) -> Instant {
        self.shared.beat();
        self.shared.metrics.scans.inc();
        let next = self.cycle_inner();
        self.shared.scanned.store(true, Ordering::Relaxed);
        self.publish_status(next);
        self.shared.beat();
        next
    }

    /// Refresh the `/status` snapshot and the gauges.
    fn publish_status(&self, next: Instant) {
        let m = &self.shared.metrics;
        let steps = self.window.steps();
        m.window.set(steps.len() as i64);
        if let Some(n) = self.window.newest() {
            m.newest_step.set(n as i64);
        }
        let now = Instant::now();
        let recipes = self
            .window
            .recipes
            .iter()
            .enumerate()
            .map(|(ri, r)| {
                if let Ok(st) = rustix::fs::statvfs(&r.recipe.out_dir) {
                    m.free(&r.recipe.name, st.f_bavail.saturating_mul(st.f_frsize));
                }
                let next_due = match self.due(ri, now) {
                    Due::Now => "now".to_string(),
                    Due::At(t) => format!("in {}", secs(t.saturating_duration_since(now))),
                    Due::No if !r.ready() => {
                        format!("window filling ({}/{})", r.steps().len(), r.recipe.window)
                    }
                    Due::No => format!(
                        "after {} more accepted checkpoint(s)",
                        r.recipe.emit_every.saturating_sub(r.since_emit).max(1)
                    ),
                };
                RecipeStatus {
                    name: r.recipe.name.clone(),
                    method: r.recipe.method.name().into(),
                    steps: r.steps().to_vec(),
                    last_emitted_step: r.last_emitted_step,
                    last_output: r.last_emitted_step.map(|s| {
                        r.recipe
                            .out_dir
                            .join(emit::step_dir_name(s))
                            .display()
                            .to_string()
                    }),
                    last_emit_unix: r.last_emit.map(|t| {
                        (SystemTime::now() - t.elapsed())
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0)
                    }),
                    next_due,
                }
            })
            .collect();
        let pending = self
            .tracked
            .values()
            .filter(|t| t.state == TState::Pending)
            .map(|t| t.step)
            .collect();
        let snap = StatusSnapshot {
            version: env!("CARGO_PKG_VERSION").into(),
            watch_dir: self.cfg.watch.dir.display().to_string(),
            window: steps,
            newest_checkpoint_step: self.window.newest(),
            recipes,
            state_dir: self.cfg.state.dir.as_ref().map(|d| d.display().to_string()),
            accumulator: self.window.accumulator().name().into(),
            pending,
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = snap;
        }
        let _ = next;
    }

    fn cycle_inner(&mut self) -> Instant {
        let now = Instant::now();
        let mut next = now + self.cfg.watch.poll_interval;
        let cands = match self.scanner.scan() {
            Ok(c) => {
                self.waiting_logged = false;
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A sidecar usually starts before the trainer creates its output directory.
                if !self.waiting_logged {
                    info!(event = "watch.waiting", dir = %self.cfg.watch.dir.display(), "watch.dir does not exist yet; waiting for the trainer to create it");
                    self.waiting_logged = true;
                }
                return next;
            }
            Err(e) => {
                warn!(event = "watch.error", dir = %self.cfg.watch.dir.display(), error = %e, "cannot list the watched directory");
                return next;
            }
        };
        let present: BTreeSet<PathBuf> = cands.iter().map(|c| c.path.clone()).collect();
        self.tracked.retain(|p, t| {
            let keep = present.contains(p);
            if !keep && t.state == TState::Pending {
                debug!(event = "checkpoint.gone", step = t.step, path = %p.display());
            }
            keep
        });
        let mut ready = Vec::new();
        for (i, c) in cands.iter().enumerate() {
            let sig = match self.scanner.signature(&c.path) {
                Ok(s) => s,
                Err(_) => continue, // vanished mid-scan: gone next time
            };
            let lookback = i.checked_sub(1).map(|j| cands[j].step);
            let restored = self.restored_upto.is_some_and(|u| c.step <= u);
            let in_window = self.window.ckpts.contains_key(&c.step);
            let t = self.tracked.entry(c.path.clone()).or_insert_with(|| {
                let state = if restored {
                    // Handled before the restart.
                    if in_window {
                        TState::Accepted
                    } else {
                        TState::Skipped
                    }
                } else {
                    info!(event = "checkpoint.discovered", step = c.step, path = %c.path.display());
                    self.shared.metrics.discovered.inc();
                    TState::Pending
                };
                Tracked {
                    step: c.step,
                    sig: sig.clone(),
                    since: now,
                    state,
                }
            });
            if t.sig != sig {
                // Files only disappearing is a deletion in progress (rotation), not a
                // rewrite: the pinned maps stay valid and `source.vanished` covers it.
                // Other files changing (an eval job writing results into the directory, the
                // trainer adding files) do not touch the weights we pinned either.
                let weights = |e: &&(String, u64, i128, u64)| {
                    e.0.ends_with(".safetensors") || e.0 == crate::checkpoint::INDEX_FILE
                };
                let only_removed = sig.0.iter().filter(weights).all(|e| t.sig.0.contains(e));
                if t.state == TState::Accepted && only_removed {
                    t.sig = sig;
                } else {
                    let was = t.state.clone();
                    t.sig = sig;
                    t.since = now;
                    t.state = TState::Pending;
                    if was == TState::Accepted {
                        self.rewritten(c.step);
                    }
                }
            }
            let t = &self.tracked[&c.path];
            if t.state != TState::Pending || !self.scanner.marker_ok(&c.path, c.step) {
                continue;
            }
            let settle_at = t.since + self.cfg.watch.settle;
            if now < settle_at {
                next = next.min(settle_at);
                continue;
            }
            ready.push((c.clone(), lookback));
        }
        for (c, lookback) in ready {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            self.consider(c.step, c.path, lookback);
        }
        // Emissions may also become due by time alone.
        for ri in 0..self.window.recipes.len() {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            match self.due(ri, Instant::now()) {
                Due::Now => self.emit(ri),
                Due::At(t) => next = next.min(t),
                Due::No => {}
            }
        }
        next
    }

    /// A complete-looking checkpoint: validate, check against the window, select, update.
    fn consider(&mut self, step: u64, path: PathBuf, lookback: Option<u64>) {
        let opened = Checkpoint::open(&path).and_then(|c| {
            self.window.check_schema(&c)?;
            if !self.cfg.watch.allow_nonfinite {
                self.pool.install(|| nonfinite(&c))?;
                // The scan read every byte: make sure they were the validated ones.
                c.check_fds()?;
            }
            Ok(c)
        });
        // The directory must look exactly as it did when it passed the gate: otherwise it
        // is being deleted (rotation) or rewritten, and what we captured (weights, config
        // files) may not belong together.
        let before = self.tracked.get(&path).map(|t| t.sig.clone());
        let after = self.scanner.signature(&path).ok();
        if opened.is_ok() && (after.is_none() || after != before) {
            debug!(event = "checkpoint.unsettled", step, path = %path.display());
            if let Some(t) = self.tracked.get_mut(&path) {
                t.state = TState::Pending;
                t.since = Instant::now();
                if let Some(sig) = after {
                    t.sig = sig;
                }
            }
            return;
        }
        if path.exists() {
            // A decision (accept, skip or reject) follows: remembered across restarts.
            self.considered_upto = self.considered_upto.max(Some(step));
        }
        let ckpt = match opened {
            Ok(c) => c,
            Err(_) if !path.exists() => {
                // Deleted while we looked at it: not bad input, just gone.
                debug!(event = "checkpoint.gone", step, path = %path.display());
                self.tracked.remove(&path);
                return;
            }
            Err(e) => {
                let reason = match &e {
                    // Marker present and files quiet for `settle`, yet still short: the writer
                    // died or the file is corrupt. Retried if its files change.
                    Error::NotReady { .. } => "incomplete",
                    other => other.reason(),
                };
                warn!(event = "checkpoint.rejected", step, path = %path.display(), reason, error = %e);
                self.shared.metrics.reject(reason);
                self.set_state(&path, TState::Rejected);
                return;
            }
        };
        let lr = if self.cfg.phase.lr_from_trainer_state {
            std::fs::read(path.join("trainer_state.json"))
                .ok()
                .and_then(|b| select::lr_history(&b).ok())
        } else {
            None
        };
        let decision = select::decide(
            &self.cfg.phase,
            step,
            self.window.newest(),
            lookback,
            lr.as_deref(),
        );
        if let Decision::Skip(why) = decision {
            let lr_seen = lr.as_deref().and_then(|h| select::lr_at(h, step));
            match lr_seen {
                Some(l) => info!(event = "checkpoint.skipped", step, lr = l, reason = %why),
                None => info!(event = "checkpoint.skipped", step, reason = %why),
            }
            self.set_state(&path, TState::Skipped);
            self.shared.metrics.skipped.inc();
            return;
        }
        self.verify_window();
        if self.paths.contains_key(&step) {
            // Accepted before, and complete again with other files: the directory was
            // deleted and written anew (a restart from an earlier step).
            self.rewritten(step);
        }
        info!(event = "checkpoint.accepted", step, path = %path.display(), size = %bytes(ckpt.data_bytes()), tensors = ckpt.tensors.len());
        self.set_state(&path, TState::Accepted);
        self.shared.metrics.accepted.inc();
        self.paths.insert(step, path.clone());
        let t0 = Instant::now();
        let (pool, window) = (&self.pool, &mut self.window);
        let result = with_heartbeat(&self.shared, || {
            pool.install(|| window.arrive(step, Arc::new(ckpt)))
        });
        match result {
            Ok(rep) => {
                let took = t0.elapsed();
                self.shared.metrics.read_bytes.inc_by(rep.bytes_read);
                let steps = self.window.steps();
                info!(
                    event = "window.updated",
                    step,
                    window = %fmt_steps(&steps),
                    n = steps.len(),
                    evicted = %if rep.evicted.is_empty() {
                        "-".to_string()
                    } else {
                        rep.evicted
                            .iter()
                            .map(|(r, s)| format!("{r}:{s}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    read = %bytes(rep.bytes_read),
                    took = %secs(took),
                    rate = %rate(rep.bytes_read, took),
                    rebuilt = rep.rebuilt,
                );
                // Saved after the emissions below: publishing is not delayed by the copy of
                // the sums, and a crash before the save only re-processes this step.
                self.acc_unsaved = true;
                self.skip_republish(step);
            }
            Err(e) => {
                error!(event = "checkpoint.rejected", step, path = %path.display(), reason = e.reason(), error = %e, "update failed; window rebuilt without it");
                self.shared.metrics.reject(e.reason());
                self.set_state(&path, TState::Rejected);
                return;
            }
        }
        for ri in 0..self.window.recipes.len() {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            if matches!(self.due(ri, Instant::now()), Due::Now) {
                self.emit(ri);
            }
        }
        if self.acc_unsaved {
            self.save(true);
        }
    }

    /// After a restart, re-processing reached `step`: a recipe whose output for exactly these
    /// steps was published before the crash (and after the last state save) counts it as
    /// published instead of publishing it again (reliability.md promise 3).
    fn skip_republish(&mut self, step: u64) {
        for (ri, r) in self.window.recipes.iter_mut().enumerate() {
            let Some(p) = self.published_unsaved.get_mut(ri) else {
                continue;
            };
            let Some(published) = *p else { continue };
            if step < published {
                continue;
            }
            *p = None;
            if r.steps().last() != Some(&published) {
                continue;
            }
            if emit::published_as(&r.recipe.out_dir, published, r.steps()) {
                let dir = r.recipe.out_dir.join(emit::step_dir_name(published));
                r.since_emit = 0;
                r.last_emitted_step = Some(published);
                r.last_emit = Some(Instant::now());
                info!(event = "merge.skipped", recipe = %r.recipe.name, step = published, out = %dir.display(), "published before the restart; not published again");
            }
        }
    }

    fn set_state(&mut self, path: &PathBuf, s: TState) {
        if let Some(t) = self.tracked.get_mut(path) {
            t.state = s;
        }
    }

    /// Re-check every pinned source; drop the ones that changed and rebuild.
    fn verify_window(&mut self) {
        let mut changed = Vec::new();
        for (step, c) in &self.window.ckpts {
            match c.verify() {
                Ok(crate::checkpoint::SourceState::Same) => {}
                Ok(crate::checkpoint::SourceState::Unlinked) => {
                    if self.vanished.insert(*step) {
                        info!(event = "source.vanished", step, path = %c.path.display(), "deleted on disk; still pinned, so the window keeps it until it slides out");
                    }
                }
                Err(e) => {
                    warn!(event = "source.changed", step, path = %c.path.display(), error = %e, "dropped from the window");
                    changed.push(*step);
                }
            }
        }
        if !changed.is_empty() {
            self.drop_steps(&changed, "source changed");
        }
        let pinned = &self.window.ckpts;
        self.vanished.retain(|s| pinned.contains_key(s));
    }

    fn drop_steps(&mut self, steps: &[u64], why: &str) {
        let result = self.pool.install(|| self.window.remove(steps));
        match result {
            Ok(removed) => {
                let w = self.window.steps();
                info!(event = "window.updated", removed = %fmt_list(&removed), window = %fmt_steps(&w), n = w.len(), rebuilt = true, reason = why);
                self.save(true);
            }
            Err(e) => {
                error!(event = "window.updated", error = %e, reason = why, "rebuild failed; window cleared");
                let all = self.window.steps();
                for s in all {
                    self.window.ckpts.remove(&s);
                }
            }
        }
    }

    /// An accepted checkpoint's files changed: the run restarted from an earlier step (or the
    /// files were rewritten). Every step at or after it is abandoned.
    fn rewritten(&mut self, step: u64) {
        let abandoned: Vec<u64> = self
            .window
            .steps()
            .into_iter()
            .filter(|s| *s >= step)
            .collect();
        warn!(event = "source.changed", step, abandoned = %fmt_list(&abandoned), "checkpoint rewritten: the run went back to an earlier step; dropping it and every later step");
        for t in self.tracked.values_mut() {
            if t.step > step && t.state == TState::Accepted {
                t.state = TState::Abandoned;
            }
        }
        for s in &abandoned {
            self.paths.remove(s);
        }
        for p in &mut self.published_unsaved {
            *p = None;
        }
        self.drop_steps(&abandoned, "rollback");
    }

    fn due(&self, ri: usize, now: Instant) -> Due {
        let r = &self.window.recipes[ri];
        if !r.ready() || r.since_emit == 0 {
            return Due::No;
        }
        if r.recipe.emit_every > 0 && r.since_emit < r.recipe.emit_every {
            return Due::No;
        }
        match (r.recipe.emit_interval, r.last_emit) {
            (Some(iv), Some(last)) if now < last + iv => Due::At(last + iv),
            _ => Due::Now,
        }
    }

    fn emit(&mut self, ri: usize) {
        let (name, steps) = {
            let r = &self.window.recipes[ri];
            (r.recipe.name.clone(), r.steps().to_vec())
        };
        let step = steps.last().copied().unwrap_or(0);
        info!(event = "merge.started", recipe = %name, step, n = steps.len());
        let progress = Progress::default();
        let done = AtomicBool::new(false);
        let interval = self.cfg.progress_interval;
        let started = Instant::now();
        let shared = self.shared.clone();
        let result = std::thread::scope(|s| {
            let ticker = s.spawn(|| {
                let mut last = Instant::now();
                let mut seen = 0;
                while !done.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(200));
                    // Liveness follows progress: a stuck write stops the heartbeat.
                    let w = progress.written.load(Ordering::Relaxed);
                    if w != seen {
                        seen = w;
                        shared.beat();
                    }
                    if last.elapsed() >= interval && !done.load(Ordering::Relaxed) {
                        last = Instant::now();
                        let w = progress.written.load(Ordering::Relaxed);
                        let t = progress.total.load(Ordering::Relaxed).max(1);
                        info!(event = "merge.progress", recipe = %name, step, done = %format!("{:.0}%", 100.0 * w as f64 / t as f64), written = %bytes(w), rate = %rate(w, started.elapsed()));
                    }
                }
            });
            let r = self.pool.install(|| {
                emit::emit(
                    &self.window,
                    ri,
                    &self.paths,
                    self.window.accumulator(),
                    &progress,
                    &self.cancel,
                )
            });
            done.store(true, Ordering::Relaxed);
            ticker.thread().unpark();
            r
        });
        let mut emitted_ok = false;
        let r = &mut self.window.recipes[ri];
        match result {
            Ok(e) => {
                let m = &self.shared.metrics;
                m.merge(&name, "ok", Some(e.duration.as_secs_f64()));
                m.emitted(&name, e.step, e.bytes);
                r.since_emit = 0;
                r.last_emit = Some(Instant::now());
                r.last_emitted_step = Some(e.step);
                let lag = self
                    .paths
                    .get(&e.step)
                    .and_then(|p| {
                        std::fs::metadata(p.join(crate::checkpoint::SINGLE_FILE))
                            .or_else(|_| std::fs::metadata(p))
                            .ok()
                    })
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                m.lag.set(lag.as_secs_f64());
                emitted_ok = true;
                info!(
                    event = "merge.emitted",
                    recipe = %name,
                    steps = %fmt_steps(&e.steps),
                    n = e.steps.len(),
                    out = %e.path.display(),
                    size = %bytes(e.bytes),
                    took = %secs(e.duration),
                    rate = %rate(e.bytes, e.duration),
                    lag = %secs(lag),
                );
                for p in &e.removed {
                    debug!(event = "merge.retired", recipe = %name, path = %p.display());
                }
                if !r.recipe.on_emit.is_empty() {
                    let argv = r
                        .recipe
                        .on_emit
                        .iter()
                        .map(|a| {
                            a.replace("{path}", &e.path.display().to_string())
                                .replace("{step}", &e.step.to_string())
                                .replace("{recipe}", &name)
                        })
                        .collect();
                    let _ = self.hooks.send(HookJob {
                        recipe: name.clone(),
                        step: e.step,
                        argv,
                        timeout: r.recipe.on_emit_timeout,
                    });
                }
            }
            Err(Error::Cancelled) => {
                self.shared.metrics.merge(&name, "cancelled", None);
                warn!(event = "merge.failed", recipe = %name, step, reason = "cancelled", "shutdown: emission aborted, temp dir removed");
            }
            Err(e) => {
                self.shared
                    .metrics
                    .merge(&name, "failed", Some(started.elapsed().as_secs_f64()));
                match e.errno() {
                    Some(errno) => {
                        error!(event = "merge.failed", recipe = %name, step, reason = e.reason(), errno, error = %e)
                    }
                    None => {
                        error!(event = "merge.failed", recipe = %name, step, reason = e.reason(), error = %e)
                    }
                }
                // Try again with the next arrival (or interval), not in a tight loop.
                r.since_emit = 0;
                r.last_emit = Some(Instant::now());
            }
        }
        if emitted_ok {
            self.save(false);
        }
    }
}

/// An empty window for the configured recipes.
fn fresh_window(cfg: &Config) -> Window {
    Window::new(
        &cfg.recipes,
        cfg.state.accumulator,
        cfg.state.dir.clone(),
        cfg.state.memory_budget,
    )
}

/// Run `f` while a ticker keeps the heartbeat fresh: a long pass over a big checkpoint is
/// work, not a hang. (Emissions tie the heartbeat to byte progress instead.)
fn with_heartbeat<T>(shared: &Arc<Shared>, f: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                shared.beat();
                std::thread::park_timeout(Duration::from_millis(500));
            }
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        ticker.thread().unpark();
        r
    })
}

enum Due {
    No,
    Now,
    At(Instant),
}

/// Refuse checkpoints holding NaN/Inf, naming the first tensor and the count.
fn nonfinite(c: &Checkpoint) -> crate::Result<()> {
    let counts: Vec<(usize, u64)> = c
        .tensors
        .par_iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let kind: FloatKind = FloatKind::of(t.dtype)?;
            let f = &c.files[t.file];
            let n = merge::count_nonfinite(kind, f.slice(t.range.clone()));
            f.release(t.range.clone());
            (n > 0).then_some((i, n))
        })
        .collect();
    if let Some(&(first, _)) = counts.first() {
        let total: u64 = counts.iter().map(|x| x.1).sum();
        let t = &c.tensors[first];
        return Err(Error::NonFinite {
            path: c.files[t.file].path.clone(),
            tensor: t.name.clone(),
            count: total,
            more: if counts.len() > 1 {
                format!(" (in {} tensors)", counts.len())
            } else {
                String::new()
            },
        });
    }
    Ok(())
}

fn fmt_steps(s: &[u64]) -> String {
    match (s.first(), s.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}..{b}"),
        (Some(a), _) => a.to_string(),
        _ => "-".into(),
    }
}

fn fmt_list(s: &[u64]) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

async fn run_hook(job: HookJob) {
    let Some((prog, args)) = job.argv.split_first() else {
        return;
    };
    let started = Instant::now();
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, error = %e);
            return;
        }
    };
    match tokio::time::timeout(job.timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            info!(event = "hook.finished", recipe = %job.recipe, step = job.step, command = %prog, took = %secs(started.elapsed()));
        }
        Ok(Ok(status)) => {
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, status = %status);
        }
        Ok(Err(e)) => {
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, error = %e);
        }
        Err(_) => {
            let _ = child.kill().await;
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, reason = "timeout", timeout = %secs(job.timeout));
        }
    }
}

/// Run the daemon until `shutdown` is cancelled. Signal handling is the caller's.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if cfg.watch.dir.exists() && !cfg.watch.dir.is_dir() {
        anyhow::bail!("watch.dir {}: not a directory", cfg.watch.dir.display());
    }
    let shared = Arc::new(Shared::default());
    shared.beat();
    if let Ok(mut d) = shared.out_dirs.lock() {
        *d = cfg.recipes.iter().map(|r| r.out_dir.clone()).collect();
    }
    // The HTTP server comes up before the first scan so probes see the port at once.
    let server = match cfg.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("server.listen {addr}: {e}"))?;
            info!(event = "server.started", listen = %listener.local_addr().unwrap_or(addr));
            let state = crate::server::AppState {
                shared: shared.clone(),
                stale_after: cfg.watch.poll_interval * 3 + Duration::from_secs(60),
            };
            Some(tokio::spawn(crate::server::serve(
                listener,
                state,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let result = run_loop(cfg, shutdown.clone(), shared).await;
    shutdown.cancel();
    if let Some(s) = server {
        let _ = s.await;
    }
    let _ = &result;
    info!(event = "shutdown.completed");
    result
}

async fn run_loop(
    cfg: Config,
    shutdown: CancellationToken,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    for r in &cfg.recipes {
        std::fs::create_dir_all(&r.out_dir).map_err(|e| {
            anyhow::anyhow!("recipe {}: out_dir {}: {e}", r.name, r.out_dir.display())
        })?;
        let n = publish::sweep_temps(&r.out_dir)?;
        if n > 0 {
            info!(event = "startup.swept", dir = %r.out_dir.display(), removed = n, "removed temp dirs left by an earlier crash");
        }
    }
    let grace = cfg.shutdown_grace;
    let cancel = Arc::new(AtomicBool::new(false));
    let (hook_tx, mut hook_rx) = tokio::sync::mpsc::unbounded_channel::<HookJob>();
    let hooks = tokio_util::task::TaskTracker::new();
    let hooks2 = hooks.clone();
    let hook_loop = tokio::spawn(async move {
        while let Some(job) = hook_rx.recv().await {
            hooks2.spawn(run_hook(job));
        }
    });
    let wake = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    let core = Core::new(
        cfg.clone(),
        hook_tx,
        cancel.clone(),
        stopping.clone(),
        shared.clone(),
    )?;
    let scanner = core.scanner();
    // inotify needs the directory to exist: until it does, the periodic scan waits for it,
    // and the watcher is installed as soon as it appears.
    let mut inotify_wanted = match watch::use_inotify(&cfg.watch) {
        Ok(()) => true,
        Err(why) => {
            info!(event = "watch.mode", mode = "poll", reason = %why);
            false
        }
    };
    let mut watcher = None;
    let start_watcher = |watcher: &mut Option<notify::RecommendedWatcher>, wanted: &mut bool| {
        if !cfg.watch.dir.is_dir() {
            shared.watching.store(false, Ordering::Relaxed);
            return;
        }
        if *wanted && watcher.is_none() {
            match watch::start_notify(&cfg.watch.dir, scanner.clone(), wake.clone()) {
                Ok(w) => *watcher = Some(w),
                Err(e) => {
                    warn!(event = "watch.mode", mode = "poll", reason = %e, "inotify unavailable; polling only");
                    *wanted = false;
                }
            }
        }
        shared.watching.store(true, Ordering::Relaxed);
    };
    start_watcher(&mut watcher, &mut inotify_wanted);
    info!(
        event = "daemon.started",
        version = env!("CARGO_PKG_VERSION"),
        watch = %cfg.watch.dir.display(),
        recipes = %cfg.recipes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        poll = %secs(cfg.watch.poll_interval),
        settle = %secs(cfg.watch.settle),
    );
    let mut core = core;
    let core = tokio::task::spawn_blocking(move || {
        core.restore();
        core
    })
    .await?;
    let core = Arc::new(Mutex::new(core));
    let mut done = false;
    while !done {
        start_watcher(&mut watcher, &mut inotify_wanted);
        let c = core.clone();
        let mut job = tokio::task::spawn_blocking(move || match c.lock() {
            Ok(mut core) => core.cycle(),
            Err(_) => Instant::now() + Duration::from_secs(1),
        });
        let next = tokio::select! {
            r = &mut job => r?,
            _ = shutdown.cancelled() => {
                stopping.store(true, Ordering::Relaxed);
                info!(event = "shutdown.started", grace = %secs(grace), "stopping intake; finishing the current work");
                match tokio::time::timeout(grace, &mut job).await {
                    Ok(r) => { r?; }
                    Err(_) => {
                        cancel.store(true, Ordering::Relaxed);
                        warn!(event = "shutdown.started", "grace period over; aborting the in-flight emission");
                        job.await?;
                    }
                }
                break;
            }
        };
        let deadline = tokio::time::Instant::from_std(next);
        tokio::select! {
            _ = shutdown.cancelled() => {
                done = true;
                stopping.store(true, Ordering::Relaxed);
                info!(event = "shutdown.started", grace = %secs(grace), "stopping intake");
            }
            _ = wake.notified() => {
                // Coalesce a burst of filesystem events into one scan.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    cancel.store(true, Ordering::Relaxed);
    hook_loop.abort();
    hooks.close();
    if tokio::time::timeout(Duration::from_secs(1), hooks.wait())
        .await
        .is_err()
    {
        warn!(
            event = "shutdown.started",
            "on_emit commands still running were stopped"
        );
    }
    Ok(())
}
