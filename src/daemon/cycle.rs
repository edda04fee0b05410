//! One cycle of the daemon: the composition of its parts, driven synchronously on the
//! blocking pool.
//!
//! ```text
//! scan ─▶ tracker ─▶ gate ─▶ select ─▶ window ─▶ schedule ─▶ emit ─▶ state save
//! ```
//!
//! The parts own their state and return decisions ([`Tracker`], [`gate::Verdict`],
//! [`select::Decision`], the [`Window`]'s reports, [`Schedule`]'s [`Due`], [`resume`]'s plan);
//! this module turns decisions into actions, log lines and metrics. It also holds what no
//! single part owns: the accepted steps' directories (for `merge.json`, rollback detection and
//! the manifest), and the restart bookkeeping of which steps were already handled.
//!
//! The state is saved after an arrival's emissions, so it never delays an output: a crash
//! before the save re-processes that checkpoint, and an output already on disk for exactly
//! those steps is counted as published (`merge.skipped`), never published twice.

use super::gate::{self, Scan, Verdict};
use super::hooks::HookJob;
use super::resume::{self, Found, Reconciled};
use super::schedule::{Due, Schedule};
use super::select::{self, Decision};
use super::spike::{self, Change, Sentinel};
use super::state::{recipes_signature, AccBytes, Manifest, SavedCheckpoint, SavedRecipe, StateDir};
use super::tracker::{Phase, Ready, Seen, Tracker};
use super::watch::Scanner;
use super::window::{Recovery, Saved, Window};
use super::{emit, status};
use crate::config::{CommitMode, Config};
use crate::error::{Error, Result};
use crate::format::{Checkpoint, Dir, Snapshot, SourceState};
use crate::obs::log::{bytes, fmt_list, fmt_steps, rate, secs};
use crate::obs::Shared;
use crate::output::partition::{self, Part, Share};
use crate::output::{OutDir, Progress};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, error, info, warn};

/// What the async side hands a cycle, and reads back.
#[derive(Clone)]
pub struct Ctx {
    /// Commands to run after emissions.
    pub hooks: tokio::sync::mpsc::UnboundedSender<HookJob>,
    /// Set when the shutdown grace is over: the in-flight emission aborts.
    pub cancel: Arc<AtomicBool>,
    /// Set at SIGTERM: no new checkpoint or emission is started (the in-flight one goes on
    /// until `cancel`).
    pub stopping: Arc<AtomicBool>,
    /// Health, metrics and status, shared with the HTTP endpoints.
    pub shared: Arc<Shared>,
}

/// What a cycle found out for the async side.
#[derive(Debug, Clone, Copy)]
pub struct Cycled {
    /// When the next cycle is due at the latest.
    pub next: Instant,
    /// Whether `watch.dir` exists (inotify can only watch it once it does).
    pub watch_dir_present: bool,
}

/// Restart bookkeeping: which steps were handled, before and since the restart.
#[derive(Debug, Default)]
struct Intake {
    /// Checkpoints at or below this step were handled before a restart: not re-processed.
    restored_upto: Option<u64>,
    /// Newest step considered (accepted, skipped or rejected), saved in the manifest.
    considered_upto: Option<u64>,
    /// `watch.waiting` was logged (watch.dir missing); logged again only after it appeared.
    waiting_logged: bool,
}

/// The state directory and what of the sums is not saved yet.
///
/// Saving the sums writes all of them (several times a checkpoint's size when they are in
/// RAM), so changed sums wait up to `state.save_interval`: a crash before they are saved only
/// makes a restart read again the checkpoints absorbed since, which are still on disk. They
/// are saved at once when one of those checkpoints is deleted (a restart could no longer
/// read it), when the window was rebuilt, and at shutdown.
struct Persist {
    dir: StateDir,
    /// The sums changed since they were last saved (or that save failed): the next save must
    /// include them (a manifest must never describe sums that are not on disk).
    acc_unsaved: bool,
    /// The sums changed otherwise than by absorbing a checkpoint still on disk (a rebuild,
    /// a rollback): save them at the next opportunity.
    urgent: bool,
    /// When the sums were last saved (or the daemon started).
    saved_at: Instant,
    /// Checkpoints absorbed since the sums were last saved, which a restart would read again.
    unsaved: BTreeMap<u64, PathBuf>,
    /// How many of them the journal on disk lists.
    journaled: usize,
}

/// The daemon's state, driven one cycle at a time.
pub struct Daemon {
    cfg: Config,
    scanner: Arc<Scanner>,
    tracker: Tracker,
    window: Window,
    schedule: Schedule,
    /// Per recipe, in config order.
    outputs: Vec<OutDir>,
    /// Accepted step → its directory.
    accepted: BTreeMap<u64, PathBuf>,
    /// Pinned steps whose directory vanished (logged once).
    vanished: BTreeSet<u64>,
    /// The files of complete, pending checkpoints, opened when their marker appeared (with
    /// the signature they had then), so rotation cannot take them away before they are used.
    pins: BTreeMap<PathBuf, (super::watch::Signature, Snapshot)>,
    intake: Intake,
    persist: Option<Persist>,
    /// The loss-spike sentinel and where its rescues go (with `[spike]`).
    sentinel: Option<Sentinel>,
    rescues: Option<OutDir>,
    pool: rayon::ThreadPool,
    ctx: Ctx,
    /// With `[partition]`: outputs this instance wrote a part of that are not published yet.
    pending: Vec<Pending>,
    /// Recipes whose partition plan was logged (`partition.plan`, once per recipe and run).
    plans_logged: BTreeSet<usize>,
    /// With `[partition]`: this instance's NaN/Inf verdict on its part of a checkpoint still
    /// waiting for the others' (with its files as they were), so it is not scanned again.
    own_verdicts: BTreeMap<u64, (Option<super::watch::Signature>, OwnVerdict)>,
}

/// One instance's verdict on its part of a checkpoint: clean, or what it found.
type OwnVerdict = std::result::Result<(), String>;

/// What the instances' verdicts on a checkpoint say together.
enum Agreement {
    /// Every part is clean.
    Accept,
    /// Some instance found NaN/Inf (what it said).
    Reject(String),
    /// These instances have not said yet.
    Waiting(Vec<usize>),
    /// The verdicts are gone (swept after the step was published): scan everything here.
    ScanAll,
}

/// How long a cycle waits for the other instances' verdicts before looking again later.
const VERDICT_WAIT: Duration = Duration::from_secs(2);

/// An output this instance wrote its part of, waiting for the other parts and the commit.
struct Pending {
    ri: usize,
    part: emit::PartWritten,
    /// When this instance's part was written (or found written).
    since: Instant,
    /// When `partition.waiting` was last logged.
    logged: Option<Instant>,
}

/// Outputs staged at once per recipe: a newer one abandons the oldest beyond this.
const MAX_STAGED: usize = 2;

/// How often a waiting output's parts are looked at again.
const COMMIT_POLL: Duration = Duration::from_secs(1);

/// A checkpoint to decide on in this cycle.
enum Next {
    /// Its directory is quiet and complete.
    Ready(Ready),
    /// Complete, but its directory was deleted before it settled: use its pinned files.
    Vanished(u64, PathBuf),
}

/// An empty window for the configured recipes.
fn fresh_window(cfg: &Config) -> Window {
    let w = Window::new(
        &cfg.recipes,
        cfg.state.accumulator,
        cfg.state.dir.clone(),
        cfg.state.memory_budget,
    );
    let w = w.with_select(select_of(cfg));
    match share(cfg) {
        Some(s) => w.with_share(s, &cfg.recipes),
        None => w,
    }
}

/// `[select]` as the formats apply it (its patterns were validated with the config).
fn select_of(cfg: &Config) -> crate::format::Select {
    crate::format::Select::new(&cfg.select.include, &cfg.select.exclude).unwrap_or_default()
}

/// This instance's share of every output (with `[partition]` and more than one instance).
fn share(cfg: &Config) -> Option<Share> {
    cfg.partition
        .as_ref()
        .filter(|p| p.count > 1)
        .map(|p| Share {
            part: Part {
                index: p.index,
                count: p.count,
            },
            by: p.by,
        })
}

impl Daemon {
    /// Build the daemon state from a validated config (takes the state directory's lock).
    pub fn new(cfg: Config, ctx: Ctx) -> Result<Daemon> {
        let scanner = Arc::new(Scanner::new(cfg.watch.clone(), &cfg.own_dirs()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("pmad-worker-{i}"))
            .build()
            .map_err(|e| {
                Error::io(
                    "start worker threads",
                    "pmad",
                    std::io::Error::other(e.to_string()),
                )
            })?;
        let persist = match &cfg.state.dir {
            Some(d) => Some(Persist {
                dir: StateDir::open(d)?,
                acc_unsaved: false,
                urgent: false,
                saved_at: Instant::now(),
                unsaved: BTreeMap::new(),
                journaled: 0,
            }),
            None => None,
        };
        let sentinel = cfg.spike.as_ref().map(|s| {
            Sentinel::new(spike::Settings {
                series: s.series.clone(),
                window: s.window,
                z: s.z,
                recover_z: s.recover_z,
            })
        });
        let d = Daemon {
            rescues: cfg.spike.as_ref().map(|s| OutDir::new(&s.out_dir)),
            sentinel,
            window: fresh_window(&cfg),
            schedule: Schedule::new(&cfg.recipes),
            outputs: cfg
                .recipes
                .iter()
                .map(|r| recipe_out_dir(&cfg, r))
                .collect(),
            tracker: Tracker::new(),
            accepted: BTreeMap::new(),
            vanished: BTreeSet::new(),
            pins: BTreeMap::new(),
            intake: Intake::default(),
            scanner,
            persist,
            pool,
            ctx,
            cfg,
            pending: Vec::new(),
            plans_logged: BTreeSet::new(),
            own_verdicts: BTreeMap::new(),
        };
        for (ri, out) in d.outputs.iter().enumerate() {
            d.sweep_staging(ri, out.latest());
        }
        Ok(d)
    }

    /// The scanner (shared with the inotify callback).
    pub fn scanner(&self) -> Arc<Scanner> {
        self.scanner.clone()
    }

    /// Resume from `state.dir` if a usable state is there. Without one, outputs already in
    /// each `out_dir` are not published again (`LATEST` never moves back). Checkpoints the
    /// journal says were absorbed after the saved state, and that are gone now, are logged as
    /// lost.
    pub fn restore(&mut self) {
        if !self.restore_saved() {
            for (ri, out) in self.outputs.iter().enumerate() {
                if let Some(l) = out.latest() {
                    self.schedule.expect(ri, l);
                }
            }
        }
        let journal = self.persist.as_ref().and_then(|p| p.dir.journal());
        for (step, path) in journal.map(|j| j.absorbed).unwrap_or_default() {
            if self.intake.restored_upto.is_some_and(|u| step <= u) || path.exists() {
                continue;
            }
            self.ctx.shared.metrics.lost.inc();
            warn!(event = "checkpoint.lost", step, path = %path.display(), "absorbed before pmad stopped, but deleted by the trainer before pmad restarted and before its sums were saved (state.save_interval): the averages continue without it; state.save_interval = \"0s\" saves the sums after every checkpoint");
        }
    }

    /// Resume from `state.dir` if a usable state is there; whether it was.
    fn restore_saved(&mut self) -> bool {
        let Some(p) = self.persist.as_mut() else {
            return false;
        };
        let dir = p.dir.path().display().to_string();
        let m = match p.dir.load() {
            Ok(Some(x)) => x,
            Ok(None) => return false,
            Err(why) => {
                warn!(event = "state.restored", restored = false, dir = %dir, reason = %why, "starting fresh");
                return false;
            }
        };
        // Which saved checkpoints are still exactly what was accepted?
        let mut opened = BTreeMap::new();
        let mut found = BTreeMap::new();
        for e in &m.window {
            let f = match crate::format::open_with(&e.path, &select_of(&self.cfg)) {
                Ok(c) => {
                    let now: Vec<_> = c
                        .files
                        .iter()
                        .map(|f| (f.path.clone(), f.fingerprint))
                        .collect();
                    if now == e.files {
                        opened.insert(e.step, Arc::new(c));
                        Found::Same
                    } else {
                        Found::Changed
                    }
                }
                Err(_) if !e.path.exists() => Found::Vanished,
                Err(_) => Found::Changed,
            };
            found.insert(e.step, f);
        }
        let recipes = &self.cfg.recipes;
        let Some(plan) = resume::plan(&m, &found, recipes, &recipes_signature(recipes)) else {
            warn!(event = "state.restored", restored = false, dir = %dir, reason = "the recipes in the config changed", "starting fresh");
            return false;
        };
        let snapshot = Saved {
            layout: m.layout.clone(),
            accumulator: m.accumulator,
            generation: m.generation,
            pinned: plan
                .keep
                .iter()
                .filter_map(|s| opened.remove(s).map(|c| (*s, c)))
                .collect(),
            held: plan.held.clone(),
            rebuild: plan.rebuild.clone(),
        };
        let (pool, window) = (&self.pool, &mut self.window);
        if let Err(e) = pool.install(|| window.restore(snapshot)) {
            warn!(event = "state.restored", restored = false, dir = %dir, reason = %e, "starting fresh");
            self.window = fresh_window(&self.cfg);
            return false;
        }
        for (ri, (since, last)) in plan.counters.iter().enumerate() {
            self.schedule.restore(ri, *since, *last);
        }
        self.accepted = plan.paths.iter().cloned().collect();
        self.intake.restored_upto = plan.restored_upto;
        self.intake.considered_upto = plan.restored_upto;
        // Outputs published just before a crash, after the last save: not published again;
        // one renamed into place without its LATEST update gets it now.
        for (ri, out) in self.outputs.iter().enumerate() {
            let held = self.window.held(ri);
            let newest = held.last().copied();
            let published = || newest.is_some_and(|n| out.published_as(n, held));
            match resume::reconcile(newest, out.latest(), published) {
                Reconciled::Nothing => {}
                Reconciled::Published { last, expect } => {
                    self.schedule.published_before(ri, last);
                    if let Some(x) = expect {
                        self.schedule.expect(ri, x);
                    }
                }
                Reconciled::FinishLatest(step) => {
                    if out.advance_latest(step).is_ok() {
                        self.schedule.published_before(ri, step);
                    }
                }
            }
        }
        // With [partition]: a part written before the restart whose output is not published
        // yet is looked up again (found complete, not rewritten) so it is committed.
        if share(&self.cfg).is_some() {
            for ri in 0..self.outputs.len() {
                let held = self.window.held(ri);
                let newest = held.last().copied();
                if newest.is_some()
                    && self.schedule.saved(ri).1 == newest
                    && !newest.is_some_and(|n| self.outputs[ri].published_as(n, held))
                {
                    self.emit(ri);
                }
            }
        }
        let steps = self.window.steps();
        let rebuilt: Vec<&str> = plan
            .rebuild
            .iter()
            .map(|i| self.cfg.recipes[*i].name.as_str())
            .collect();
        info!(
            event = "state.restored",
            restored = true,
            dir = %dir,
            generation = m.generation,
            window = %fmt_steps(&steps),
            n = steps.len(),
            vanished = %fmt_list(&plan.vanished),
            changed = %fmt_list(&plan.changed),
            rebuilt = %if rebuilt.is_empty() { "-".to_string() } else { rebuilt.join(",") },
            "resuming; checkpoints up to step {} are not processed again",
            plan.restored_upto.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
        );
        if !plan.rebuild.is_empty() || !plan.changed.is_empty() {
            self.save(true);
        }
        true
    }

    /// One cycle.
    pub fn cycle(&mut self) -> Cycled {
        let shared = self.ctx.shared.clone();
        shared.beat();
        shared.metrics.scans.inc();
        let next = self.cycle_inner();
        shared.scanned.store(true, Ordering::Relaxed);
        status::publish(
            &shared,
            &self.cfg,
            &self.window,
            &self.schedule,
            &self.tracker,
            &self.outputs,
            self.sentinel
                .as_ref()
                .and_then(|s| s.onset())
                .map(|o| o.step),
        );
        shared.beat();
        Cycled {
            next,
            watch_dir_present: self.cfg.watch.dir.is_dir(),
        }
    }

    fn cycle_inner(&mut self) -> Instant {
        let now = Instant::now();
        let mut next = now + self.cfg.watch.poll_interval;
        let cands = match self.scanner.scan() {
            Ok(c) => {
                self.intake.waiting_logged = false;
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A sidecar usually starts before the trainer creates its output directory.
                if !self.intake.waiting_logged {
                    info!(event = "watch.waiting", dir = %self.cfg.watch.dir.display(), "watch.dir does not exist yet; waiting for the trainer to create it");
                    self.intake.waiting_logged = true;
                }
                return next;
            }
            Err(e) => {
                warn!(event = "watch.error", dir = %self.cfg.watch.dir.display(), error = %e, "cannot list the watched directory");
                return next;
            }
        };
        let seen: Vec<Seen> = cands
            .into_iter()
            .map(|c| Seen {
                sig: self.scanner.signature(&c.path).ok(),
                step: c.step,
                path: c.path,
            })
            .collect();
        let (window, scanner) = (&self.window, &self.scanner);
        let obs = self.tracker.observe(
            &seen,
            now,
            self.cfg.watch.settle,
            self.intake.restored_upto,
            |s| window.pinned(s).is_some(),
            |p, s| scanner.marker_ok(p, s),
        );
        // Pin what complete checkpoints hold now (again when their files changed), so a
        // trainer rotating them away before they settle cannot take them from pmad.
        for path in &obs.complete {
            let Some(sig) = self.tracker.signature(path).cloned() else {
                continue;
            };
            // Unchanged, or only lacking files of the pinned version: a deletion in progress
            // (`rm -rf` removes the files one by one, the marker maybe last). The pin keeps
            // the whole checkpoint; a new one would hold what is left of it.
            if self
                .pins
                .get(path)
                .is_some_and(|(pinned, _)| sig.only_removed(pinned))
            {
                continue;
            }
            // Pinned only if nothing changed while the files were opened.
            if let Ok(snap) = Snapshot::take(path) {
                if self.scanner.signature(path).is_ok_and(|now| now == sig) {
                    self.pins.insert(path.clone(), (sig, snap));
                }
            }
        }
        for (step, path) in &obs.discovered {
            info!(event = "checkpoint.discovered", step, path = %path.display());
            self.ctx.shared.metrics.discovered.inc();
        }
        if let Some(step) = obs.rewritten {
            self.rewritten(step);
        }
        if let Some(t) = obs.next_settle {
            next = next.min(t);
        }
        // Ready checkpoints, and complete ones whose directory is already gone (used from
        // their pinned files), in step order.
        let mut todo: Vec<Next> = obs.ready.into_iter().map(Next::Ready).collect();
        for (step, path, complete) in obs.gone {
            if complete {
                todo.push(Next::Vanished(step, path));
            } else {
                debug!(event = "checkpoint.gone", step, path = %path.display());
            }
        }
        todo.sort_by_key(|n| match n {
            Next::Ready(r) => r.step,
            Next::Vanished(s, _) => *s,
        });
        let n = todo.len();
        let mut deferred = vec![0usize; self.window.recipe_count()];
        for (i, item) in todo.into_iter().enumerate() {
            if self.stopping() {
                break;
            }
            let backlog = n - i - 1;
            match item {
                Next::Ready(r) => {
                    if !self.consider(r, backlog, &mut deferred) {
                        // Waiting for the other instances' verdicts: later steps wait too, so
                        // every instance takes checkpoints in the same order.
                        break;
                    }
                }
                Next::Vanished(step, path) => {
                    self.vanished_before_use(step, &path, backlog, &mut deferred)
                }
            }
        }
        if deferred.iter().any(|d| *d > 0) {
            let skipped: Vec<String> = deferred
                .iter()
                .zip(&self.cfg.recipes)
                .filter(|(d, _)| **d > 0)
                .map(|(d, r)| format!("{}:{d}", r.name))
                .collect();
            info!(event = "watch.backlog", n, not_published = %skipped.join(","), "caught up with a backlog: published only the outputs each recipe's keep retains");
        }
        // Pins are only for checkpoints still waiting.
        let tracker = &self.tracker;
        self.pins
            .retain(|p, _| tracker.phase(p) == Some(Phase::Pending));
        // Emissions may also become due by time alone.
        for ri in 0..self.window.recipe_count() {
            if self.stopping() {
                break;
            }
            match self.due(ri, Instant::now()) {
                Due::Now => self.emit(ri),
                Due::At(t) => next = next.min(t),
                Due::No => {}
            }
        }
        if !self.pending.is_empty() {
            self.commit_pending();
        }
        if !self.pending.is_empty() {
            next = next.min(Instant::now() + COMMIT_POLL);
        }
        // Sums waiting to be saved: due by time, or because the trainer deleted a checkpoint
        // they absorbed (this cycle's scan is when pmad sees that).
        if let Some(t) = self.save_sums_if_due(Instant::now()) {
            next = next.min(t);
        }
        next
    }

    fn stopping(&self) -> bool {
        self.ctx.stopping.load(Ordering::Relaxed)
    }

    /// A complete-looking checkpoint: gate, select, update the window, publish what is due.
    /// `backlog` more checkpoints are ready after this one in the same scan: an output that
    /// retention (`keep`) would delete as soon as those publish theirs is not published
    /// (counted in `deferred`, per recipe). Returns false when the checkpoint waits for the
    /// other instances' verdicts (`[partition]`): it is looked at again later.
    fn consider(&mut self, ready: Ready, backlog: usize, deferred: &mut [usize]) -> bool {
        let Ready {
            step,
            path,
            lookback,
        } = ready;
        let trainer_state = self.trainer_state(Dir::Live(&path));
        self.watch_spikes(step, trainer_state.as_deref());
        let before = self.tracker.signature(&path).cloned();
        let (pool, scanner, window) = (&self.pool, &self.scanner, &self.window);
        let allow = self.cfg.watch.allow_nonfinite;
        // With [partition] each instance scans its own part and the instances share their
        // verdicts: all of them accept or reject every checkpoint alike.
        let shared = share(&self.cfg).is_some() && !allow;
        let cached = self
            .own_verdicts
            .get(&step)
            .filter(|(sig, _)| shared && sig.as_ref() == before.as_ref())
            .map(|(_, v)| v.clone());
        let scan = match (allow, shared, &cached) {
            (true, _, _) | (_, _, Some(_)) => Scan::Skip,
            (false, true, None) => Scan::Owned,
            (false, false, None) => Scan::All,
        };
        let mut verdict =
            pool.install(|| gate::check(&path, before.as_ref(), scanner, window, scan));
        if shared {
            match self.shared_verdict(step, &path, before.as_ref(), cached, verdict) {
                Some(v) => verdict = v,
                None => return false,
            }
        }
        let ckpt = match verdict {
            Verdict::Unsettled(sig) => {
                debug!(event = "checkpoint.unsettled", step, path = %path.display());
                self.tracker.unsettled(&path, sig, Instant::now());
                return true;
            }
            Verdict::Gone => {
                // Its marker was there: a complete checkpoint deleted while it was checked.
                self.tracker.forget(&path);
                self.vanished_before_use(step, &path, backlog, deferred);
                return true;
            }
            Verdict::Reject { reason, error } => {
                self.rejected(step, &path, reason, &error);
                return true;
            }
            Verdict::Pass(c) => {
                self.considered(step);
                c
            }
        };
        self.pins.remove(&path);
        self.use_checkpoint(
            step,
            &path,
            lookback,
            ckpt,
            trainer_state.as_deref(),
            backlog,
            deferred,
        );
        true
    }

    /// With `[partition]`: turn this instance's verdict on its part of `step` into the
    /// instances' common one. Returns the verdict to act on, or None when the checkpoint must
    /// wait for other instances (it is offered again later, without a new scan).
    fn shared_verdict(
        &mut self,
        step: u64,
        path: &Path,
        before: Option<&super::watch::Signature>,
        cached: Option<OwnVerdict>,
        verdict: Verdict,
    ) -> Option<Verdict> {
        let own = match (&cached, &verdict) {
            (Some(v), Verdict::Pass(_)) => v.clone(),
            (None, Verdict::Pass(_)) => Ok(()),
            (
                None,
                Verdict::Reject {
                    error: error @ Error::NonFinite { .. },
                    ..
                },
            ) => Err(error.to_string()),
            // Changed, gone, or bad for reasons every instance sees alike (headers, schema).
            _ => {
                self.own_verdicts.remove(&step);
                return Some(verdict);
            }
        };
        let deadline = Instant::now() + VERDICT_WAIT;
        let agreement = loop {
            match self.agree(step, &own) {
                Ok(Agreement::Waiting(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => break other,
            }
        };
        let nonfinite = |detail: String| Verdict::Reject {
            reason: "non_finite",
            error: Error::invalid(path, detail),
        };
        match agreement {
            Ok(Agreement::Accept) => {
                self.own_verdicts.remove(&step);
                Some(verdict)
            }
            Ok(Agreement::Reject(detail)) => {
                self.own_verdicts.remove(&step);
                Some(match verdict {
                    Verdict::Reject { .. } => verdict,
                    _ => nonfinite(detail),
                })
            }
            Ok(Agreement::ScanAll) => {
                self.own_verdicts.remove(&step);
                let (pool, scanner, window) = (&self.pool, &self.scanner, &self.window);
                Some(pool.install(|| gate::check(path, before, scanner, window, Scan::All)))
            }
            Ok(Agreement::Waiting(missing)) => {
                if self
                    .own_verdicts
                    .insert(step, (before.cloned(), own))
                    .is_none()
                {
                    info!(event = "partition.waiting", step, missing = %fmt_list(&missing), what = "verdicts", "waiting for the other instances' NaN/Inf verdicts on their parts of this checkpoint");
                }
                self.tracker
                    .unsettled(path, before.cloned(), Instant::now());
                None
            }
            Err(e) => {
                error!(event = "partition.waiting", step, what = "verdicts", reason = e.reason(), error = %e, "cannot share this instance's verdict; trying again");
                self.own_verdicts.insert(step, (before.cloned(), own));
                self.tracker
                    .unsettled(path, before.cloned(), Instant::now());
                None
            }
        }
    }

    /// Where the instances leave their verdicts on `step` (under the first recipe's
    /// staging directory; swept once the step is published).
    fn verdict_dir(&self, step: u64) -> PathBuf {
        self.outputs[0]
            .path()
            .join(partition::STAGING_DIR)
            .join(format!("verdicts-{}", self.outputs[0].step_name(step)))
    }

    /// Leave this instance's verdict on `step` (once; atomically) and read everyone's.
    fn agree(&self, step: u64, own: &OwnVerdict) -> Result<Agreement> {
        let Some(s) = share(&self.cfg) else {
            return Ok(Agreement::Accept);
        };
        let dir = self.verdict_dir(step);
        let mine = dir.join(format!("part-{}", s.part.index));
        if !mine.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
            let tmp = dir.join(format!(".part-{}.tmp", s.part.index));
            let _ = std::fs::remove_file(&tmp);
            let text = match own {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("nonfinite {e}\n"),
            };
            if self.outputs[0].is_in_place() {
                // No renames in marker mode; a reader takes a verdict without its newline
                // for one still being written.
                crate::fsio::overwrite_file(&mine, text.as_bytes())?;
            } else {
                crate::fsio::write_file(&tmp, text.as_bytes())?;
                crate::fsio::rename(&tmp, &mine)?;
            }
        }
        if let Err(e) = own {
            return Ok(Agreement::Reject(e.clone()));
        }
        let mut missing = Vec::new();
        for k in 0..s.part.count {
            match std::fs::read_to_string(dir.join(format!("part-{k}"))) {
                Ok(t) if !t.ends_with('\n') => missing.push(k),
                Ok(t) if t.trim() == "ok" => {}
                Ok(t) => {
                    let what = t.trim().trim_start_matches("nonfinite").trim();
                    return Ok(Agreement::Reject(format!(
                        "instance {k} found non-finite values in its part: {what}"
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(k),
                Err(e) => return Err(Error::io("read", dir.join(format!("part-{k}")), e)),
            }
        }
        Ok(if missing.is_empty() {
            Agreement::Accept
        } else if self.outputs[0].latest().is_some_and(|l| l >= step) {
            // A step at or after this one is published, so every instance decided this one
            // (in step order) and the verdicts were swept: this instance is re-deciding after
            // a restart. Decide alone, on all of it.
            Agreement::ScanAll
        } else {
            Agreement::Waiting(missing)
        })
    }

    /// One read of `trainer_state.json` serves the LR plateau and the spike sentinel.
    fn trainer_state(&self, dir: Dir<'_>) -> Option<Vec<u8>> {
        if self.cfg.phase.lr_from_trainer_state || self.sentinel.is_some() {
            dir.read("trainer_state.json").ok().flatten()
        } else {
            None
        }
    }

    fn rejected(&mut self, step: u64, path: &Path, reason: &str, error: &Error) {
        // A decision (reject) was made: remembered across restarts.
        self.considered(step);
        warn!(event = "checkpoint.rejected", step, path = %path.display(), reason, error = %error);
        self.ctx.shared.metrics.reject(reason);
        self.tracker.set(path, Phase::Rejected);
        self.pins.remove(path);
    }

    /// A complete checkpoint's directory was deleted before pmad used it: use it from the
    /// files pinned when its marker appeared, or count it lost.
    fn vanished_before_use(
        &mut self,
        step: u64,
        path: &Path,
        backlog: usize,
        deferred: &mut [usize],
    ) {
        let Some((_, snapshot)) = self.pins.remove(path) else {
            self.lost(step, path);
            return;
        };
        info!(event = "source.vanished", step, path = %path.display(), "deleted before it settled; using the files pinned when its marker appeared");
        let trainer_state = self.trainer_state(Dir::Snapshot(&snapshot));
        // The sentinel first: the curves matter even when the weights are rejected.
        self.watch_spikes(step, trainer_state.as_deref());
        let (pool, window) = (&self.pool, &self.window);
        let allow = self.cfg.watch.allow_nonfinite;
        // Its directory is gone: scan all of it (the truth for every instance) and leave the
        // verdict for the others, who may still be waiting for it.
        let scan = if allow { Scan::Skip } else { Scan::All };
        let verdict = pool.install(|| gate::check_snapshot(&snapshot, window, scan));
        if share(&self.cfg).is_some() && !allow {
            let own = match &verdict {
                Verdict::Reject {
                    error: error @ Error::NonFinite { .. },
                    ..
                } => Err(error.to_string()),
                _ => Ok(()),
            };
            let _ = self.agree(step, &own);
            self.own_verdicts.remove(&step);
        }
        match verdict {
            Verdict::Pass(c) => {
                self.considered(step);
                let lookback = self.tracker.previous_step(step);
                self.use_checkpoint(
                    step,
                    path,
                    lookback,
                    c,
                    trainer_state.as_deref(),
                    backlog,
                    deferred,
                );
                // Logged once: the window's re-checks will find its directory gone too.
                if self.window.pinned(step).is_some() {
                    self.vanished.insert(step);
                }
            }
            Verdict::Reject {
                error: error @ Error::NonFinite { .. },
                reason,
            } => self.rejected(step, path, reason, &error),
            // What was pinned is not a whole checkpoint: most likely it was pinned while the
            // directory was being deleted (`rm -rf` removes files one by one, the marker maybe
            // last). Gone either way, so lost, not a bad checkpoint to warn about.
            Verdict::Reject { error, .. } => {
                self.ctx.shared.metrics.lost.inc();
                info!(event = "checkpoint.lost", step, path = %path.display(), error = %error, "deleted before it settled, and the files pinned when its marker appeared are not a whole checkpoint (pinned while it was being deleted)");
            }
            // A snapshot neither changes nor disappears.
            Verdict::Unsettled(_) | Verdict::Gone => self.lost(step, path),
        }
    }

    /// A checkpoint that passed the gate: select it, add it to the window, publish what is
    /// due, save the state.
    #[allow(clippy::too_many_arguments)]
    fn use_checkpoint(
        &mut self,
        step: u64,
        path: &Path,
        lookback: Option<u64>,
        ckpt: Checkpoint,
        trainer_state: Option<&[u8]>,
        backlog: usize,
        deferred: &mut [usize],
    ) {
        let path = path.to_path_buf();
        let lr = if self.cfg.phase.lr_from_trainer_state {
            trainer_state.and_then(|b| select::lr_history(b).ok())
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
            match lr.as_deref().and_then(|h| select::lr_at(h, step)) {
                Some(l) => info!(event = "checkpoint.skipped", step, lr = l, reason = %why),
                None => info!(event = "checkpoint.skipped", step, reason = %why),
            }
            self.tracker.set(&path, Phase::Skipped);
            self.ctx.shared.metrics.skipped.inc();
            return;
        }
        if let Some(o) = self.sentinel.as_ref().and_then(|s| s.onset()) {
            if step >= o.step {
                // An EMA cannot un-add a checkpoint: nothing from the spike on is absorbed
                // until the run is healthy again.
                info!(event = "checkpoint.skipped", step, reason = %format!("after the {} spike at step {} ({}): not absorbed until the run recovers", o.series, o.step, o.value));
                self.tracker.set(&path, Phase::Skipped);
                self.ctx.shared.metrics.skipped.inc();
                return;
            }
        }
        self.verify_window();
        if self.accepted.contains_key(&step) {
            // Accepted before, and complete again with other files: the directory was
            // deleted and written anew (a restart from an earlier step).
            self.rewritten(step);
        }
        info!(event = "checkpoint.accepted", step, path = %path.display(), size = %bytes(ckpt.data_bytes()), tensors = ckpt.tensors.len());
        self.tracker.set(&path, Phase::Accepted);
        self.ctx.shared.metrics.accepted.inc();
        self.accepted.insert(step, path.clone());
        let t0 = Instant::now();
        let (pool, window) = (&self.pool, &mut self.window);
        let result = with_heartbeat(&self.ctx.shared, || {
            pool.install(|| window.arrive(step, Arc::new(ckpt)))
        });
        match result {
            Ok(rep) => {
                let took = t0.elapsed();
                self.ctx.shared.metrics.read_bytes.inc_by(rep.bytes_read);
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
                for ri in rep.absorbed {
                    self.schedule.absorbed(ri);
                }
                // Saved after the emissions below, when due: publishing is not delayed by
                // the copy of the sums, and a crash before the save only re-processes this
                // step (still on disk: the sums are saved when it is deleted).
                self.sums_changed(Some((step, &path)));
                self.skip_republish(step);
            }
            Err(f) => {
                let window_now = match &f.recovery {
                    Recovery::Unchanged => "window unchanged".to_string(),
                    Recovery::Rebuilt { dropped } => format!(
                        "window sums recomputed without it{}",
                        if dropped.is_empty() {
                            String::new()
                        } else {
                            format!(" and without changed step(s) {}", fmt_list(dropped))
                        }
                    ),
                    Recovery::Cleared => "window cleared".to_string(),
                };
                error!(event = "checkpoint.rejected", step, path = %path.display(), reason = f.error.reason(), error = %f.error, "update failed; {window_now}");
                self.ctx.shared.metrics.reject(f.error.reason());
                self.tracker.set(&path, Phase::Rejected);
                // It never entered the window.
                self.accepted.remove(&step);
                if f.recovery != Recovery::Unchanged {
                    self.sums_changed(None);
                }
                return;
            }
        }
        for (ri, skipped) in deferred.iter_mut().enumerate() {
            if self.stopping() {
                break;
            }
            if self.due(ri, Instant::now()) != Due::Now {
                continue;
            }
            let r = &self.cfg.recipes[ri];
            // Outputs the rest of the backlog would publish after this one, if all of it
            // is accepted (emissions by interval are not predicted).
            let later = match (r.emit_every, r.emit_interval) {
                (e, None) if e > 0 => backlog as u64 / e,
                _ => 0,
            };
            if r.keep > 0 && later >= r.keep as u64 {
                debug!(event = "merge.deferred", recipe = %r.name, step, later, "retention would delete this output at once: not published");
                self.schedule.passed(ri);
                *skipped += 1;
                continue;
            }
            self.emit(ri);
        }
        self.save_sums_if_due(Instant::now());
    }

    /// Feed the sentinel the history a checkpoint at `step` carries; log what changed and
    /// publish a rescue when a spike begins (and is still in progress after this history).
    fn watch_spikes(&mut self, step: u64, trainer_state: Option<&[u8]>) {
        let (Some(sentinel), Some(bytes)) = (self.sentinel.as_mut(), trainer_state) else {
            return;
        };
        let series = &self
            .cfg
            .spike
            .as_ref()
            .map(|s| s.series.clone())
            .unwrap_or_default();
        let history = match spike::history(bytes, series) {
            Ok(h) => h,
            Err(e) => {
                debug!(event = "spike.unreadable", step, error = %e);
                return;
            }
        };
        let changes = sentinel.feed(&history);
        let mut detected = false;
        for c in &changes {
            match c {
                Change::Detected(o) => {
                    detected = true;
                    self.ctx.shared.metrics.spike(&o.series);
                    warn!(event = "spike.detected", step = o.step, series = %o.series, value = o.value, z = o.z, median = o.median, at = step, "checkpoints from step {} on are not absorbed until the run is healthy again", o.step);
                }
                Change::Recovered {
                    step: s,
                    series,
                    value,
                    z,
                } => {
                    info!(event = "spike.recovered", step = s, series = %series, value, z, at = step, "checkpoints are absorbed again");
                }
            }
        }
        let onset = self.sentinel.as_ref().and_then(|s| s.onset()).cloned();
        self.ctx
            .shared
            .metrics
            .spike_active
            .set(onset.is_some() as i64);
        if let (true, Some(o)) = (detected, onset) {
            self.rescue(&o, step);
        }
    }

    /// Publish the rescue of a spike starting at `onset`: the SMA of the last `spike.k`
    /// checkpoints before it, kept pinned while it is the newest rescue.
    fn rescue(&mut self, onset: &spike::Onset, at: u64) {
        let (Some(cfg), Some(out)) = (self.cfg.spike.as_ref(), self.rescues.as_ref()) else {
            return;
        };
        let clean: Vec<u64> = self
            .window
            .steps()
            .into_iter()
            .filter(|s| *s < onset.step)
            .collect();
        let steps = clean[clean.len().saturating_sub(cfg.k)..].to_vec();
        let Some(&newest) = steps.last() else {
            warn!(
                event = "rescue.failed",
                onset = onset.step,
                reason = "no_checkpoint",
                "no checkpoint from before the spike is pinned; nothing to rescue from"
            );
            return;
        };
        if out.published_as(newest, &steps)
            && out.step_path(newest).join(emit::RESCUE_FILE).is_file()
        {
            // Published before a restart (the sentinel replayed the history).
            self.window.hold(&steps);
            return;
        }
        self.window.hold(&steps);
        if self.part_index() != 0 {
            // Decided: with [partition], instance 0 publishes rescues whole (rare, and read
            // from the pinned checkpoints every instance holds); the others keep them pinned.
            return;
        }
        let values = self
            .sentinel
            .as_ref()
            .map(|s| s.recent(&onset.series))
            .unwrap_or_default();
        let progress = Progress::default();
        let (pool, window, accepted, cancel) =
            (&self.pool, &self.window, &self.accepted, &self.ctx.cancel);
        let r = pool.install(|| {
            emit::emit_rescue(
                window, &steps, out, accepted, onset, at, values, &progress, cancel,
            )
        });
        match r {
            Ok(e) => info!(
                event = "rescue.emitted",
                onset = onset.step,
                steps = %fmt_steps(&e.steps),
                n = e.steps.len(),
                out = %e.path.display(),
                restart_from = e.step,
                size = %bytes(e.bytes),
                took = %secs(e.duration),
                "restart training from step {} with these weights",
                e.step
            ),
            Err(e) => {
                error!(event = "rescue.failed", onset = onset.step, reason = e.reason(), error = %e)
            }
        }
    }

    /// A complete checkpoint was deleted before pmad could use it: say so, and what to change.
    fn lost(&self, step: u64, path: &std::path::Path) {
        self.ctx.shared.metrics.lost.inc();
        // Info, not a warning: deleting checkpoints is the trainer's right, not pmad's fault;
        // the counter is what an alert watches.
        info!(event = "checkpoint.lost", step, path = %path.display(), settle = %secs(self.cfg.watch.settle), "a complete checkpoint was deleted before pmad could use it (it waits watch.settle after the marker): keep more checkpoints in the trainer (e.g. save_total_limit) or lower watch.settle");
    }

    /// A decision (accept, skip or reject) about `step` was made: remembered across restarts.
    fn considered(&mut self, step: u64) {
        self.intake.considered_upto = self.intake.considered_upto.max(Some(step));
    }

    /// The sums changed (by absorbing the checkpoint `absorbed`, or otherwise): the next
    /// state save must include them.
    fn sums_changed(&mut self, absorbed: Option<(u64, &std::path::Path)>) {
        if let Some(p) = self.persist.as_mut() {
            p.acc_unsaved = true;
            match absorbed {
                Some((step, path)) => {
                    p.unsaved.insert(step, path.to_path_buf());
                }
                None => p.urgent = true,
            }
        }
    }

    /// Save changed sums if they are due (see [`Persist`]): `state.save_interval` has passed
    /// since the last save, or a checkpoint they absorbed since is gone from disk, or they
    /// changed otherwise. Returns when they will be due by time, if they still wait.
    fn save_sums_if_due(&mut self, now: Instant) -> Option<Instant> {
        let interval = self.cfg.state.save_interval;
        let p = self.persist.as_mut()?;
        if !p.acc_unsaved {
            return None;
        }
        let by_time = p.saved_at + interval;
        let reason = if p.urgent {
            "changed"
        } else if now >= by_time {
            "interval"
        } else if p.unsaved.values().any(|path| !path.exists()) {
            "deleted"
        } else if p.journaled < p.unsaved.len() {
            // Waiting: the journal names what a restart must find again.
            let absorbed: Vec<_> = p.unsaved.iter().map(|(s, p)| (*s, p.clone())).collect();
            match p.dir.write_journal(absorbed) {
                Ok(()) => {
                    p.journaled = p.unsaved.len();
                    return Some(by_time);
                }
                Err(e) => {
                    save_failed(&e, "cannot write the journal; saving the sums now");
                    "journal"
                }
            }
        } else {
            return Some(by_time);
        };
        self.save_because(true, reason);
        None
    }

    /// At shutdown: save whatever is not saved yet, so a restart reads nothing again.
    pub fn flush_state(&mut self) {
        if self.persist.as_ref().is_some_and(|p| p.acc_unsaved) {
            self.save_because(true, "shutdown");
        }
    }

    /// After a restart, re-processing reached `step`: a recipe whose output for exactly these
    /// steps was published before the crash (and after the last state save) counts it as
    /// published instead of publishing it again.
    fn skip_republish(&mut self, step: u64) {
        let now = Instant::now();
        for ri in 0..self.window.recipe_count() {
            if let Some(later) = self.schedule.superseded(ri, step) {
                // Older than the newest output published before the restart (the sums were
                // saved less often than outputs were published): never published again.
                if self.schedule.due(ri, self.window.ready(ri), now) == Due::Now {
                    let held = self.window.held(ri);
                    let at = held.last().copied().unwrap_or(step);
                    let out = &self.outputs[ri];
                    let on_disk = out.published_as(at, held);
                    self.schedule.emitted(ri, at, now);
                    info!(event = "merge.skipped", recipe = %self.cfg.recipes[ri].name, step = at, later, on_disk, "older than the output of step {later}, published before the restart; not published again");
                }
                continue;
            }
            let Some(published) = self.schedule.reached(ri, step) else {
                continue;
            };
            let held = self.window.held(ri);
            if held.last() != Some(&published) {
                continue;
            }
            let out = &self.outputs[ri];
            if out.published_as(published, held) {
                self.schedule.emitted(ri, published, Instant::now());
                info!(event = "merge.skipped", recipe = %self.cfg.recipes[ri].name, step = published, out = %out.step_path(published).display(), "published before the restart; not published again");
            }
        }
    }

    /// Re-check every pinned source; drop the ones that changed and rebuild.
    fn verify_window(&mut self) {
        let mut changed = Vec::new();
        for (step, c) in self.window.pinned_all() {
            match c.verify() {
                Ok(SourceState::Same) => {}
                Ok(SourceState::Unlinked) => {
                    if self.vanished.insert(step) {
                        info!(event = "source.vanished", step, path = %c.path.display(), "deleted on disk; still pinned, so the window keeps it until it slides out");
                    }
                }
                Err(e) => {
                    warn!(event = "source.changed", step, path = %c.path.display(), error = %e, "dropped from the window");
                    changed.push(step);
                }
            }
        }
        if !changed.is_empty() {
            self.drop_steps(&changed, "source changed");
        }
        let window = &self.window;
        self.vanished.retain(|s| window.pinned(*s).is_some());
    }

    fn drop_steps(&mut self, steps: &[u64], why: &str) {
        let (pool, window) = (&self.pool, &mut self.window);
        match pool.install(|| window.remove(steps)) {
            Ok(removed) => {
                let w = self.window.steps();
                info!(event = "window.updated", removed = %fmt_list(&removed), window = %fmt_steps(&w), n = w.len(), rebuilt = true, reason = why);
                self.save(true);
            }
            Err(f) => {
                let w = self.window.steps();
                let how = match &f.recovery {
                    Recovery::Cleared => "rebuild failed; window cleared".to_string(),
                    Recovery::Rebuilt { dropped } if !dropped.is_empty() => format!(
                        "rebuild failed; recomputed without changed step(s) {}",
                        fmt_list(dropped)
                    ),
                    _ => "rebuild failed; recomputed from the checkpoints still pinned".into(),
                };
                error!(event = "window.updated", error = %f.error, reason = why, window = %fmt_steps(&w), n = w.len(), "{how}");
                self.sums_changed(None);
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
        self.tracker.abandon_after(step);
        for s in &abandoned {
            self.accepted.remove(s);
        }
        self.schedule.forget_expected();
        self.drop_steps(&abandoned, "rollback");
    }

    fn due(&self, ri: usize, now: Instant) -> Due {
        // An output older than one published before a restart is never published (by an
        // interval either): `LATEST` never moves back.
        let newest = self.window.held(ri).last().copied();
        if newest.is_some_and(|s| self.schedule.superseded(ri, s).is_some()) {
            return Due::No;
        }
        self.schedule.due(ri, self.window.ready(ri), now)
    }

    /// Publish recipe `ri`'s current average, with progress lines and a heartbeat tied to
    /// byte progress; then run its hook and save the state.
    fn emit(&mut self, ri: usize) {
        let recipe = &self.cfg.recipes[ri];
        let name = recipe.name.clone();
        let held = self.window.held(ri);
        let step = held.last().copied().unwrap_or(0);
        info!(event = "merge.started", recipe = %name, step, n = held.len());
        let progress = Progress::default();
        let done = AtomicBool::new(false);
        let interval = self.cfg.progress_interval;
        let started = Instant::now();
        let shared = &self.ctx.shared;
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
                    recipe,
                    &self.outputs[ri],
                    &self.accepted,
                    share(&self.cfg),
                    &progress,
                    &self.ctx.cancel,
                )
            });
            done.store(true, Ordering::Relaxed);
            ticker.thread().unpark();
            r
        });
        let m = &self.ctx.shared.metrics;
        match result {
            Ok(emit::Emission::Part(p)) => {
                m.written_bytes.inc_by(if p.reused { 0 } else { p.bytes });
                if self.plans_logged.insert(ri) {
                    let loads = p.plan.loads();
                    let total: u64 = loads.iter().sum();
                    let max = loads.iter().copied().max().unwrap_or(0);
                    let mean = total as f64 / p.plan.count.max(1) as f64;
                    info!(
                        event = "partition.plan",
                        recipe = %name,
                        index = self.part_index(),
                        count = p.plan.count,
                        by = p.plan.by.name(),
                        files = p.plan.owner.iter().filter(|&&o| o == self.part_index()).count(),
                        files_total = p.plan.shards.len(),
                        size = %bytes(p.bytes),
                        size_total = %bytes(total),
                        imbalance = %format!("{:.3}", if mean > 0.0 { max as f64 / mean } else { 1.0 }),
                        commit = if self.outputs[ri].is_in_place() { "marker" } else { "rename" },
                        "this instance writes its part of every output; instance 0 commits"
                    );
                }
                info!(
                    event = "partition.part_written",
                    recipe = %name,
                    step = p.step,
                    part = %format!("{}/{}", self.part_index(), p.plan.count),
                    plan = %p.plan.hash,
                    files = p.plan.owner.iter().filter(|&&o| o == self.part_index()).count(),
                    size = %bytes(p.bytes),
                    took = %secs(p.duration),
                    reused = p.reused,
                    dir = %p.dir.display(),
                );
                self.schedule.emitted(ri, p.step, Instant::now());
                self.stage(ri, *p);
                self.save(false);
                self.commit_pending();
            }
            Ok(emit::Emission::Published(e)) => {
                m.merge(&name, "ok", Some(e.duration.as_secs_f64()));
                self.published(ri, e, None);
                self.save(false);
            }
            Err(Error::Cancelled) => {
                m.merge(&name, "cancelled", None);
                warn!(event = "merge.failed", recipe = %name, step, reason = "cancelled", "shutdown: emission aborted, temp dir removed");
            }
            Err(e) => {
                m.merge(&name, "failed", Some(started.elapsed().as_secs_f64()));
                match e.errno() {
                    Some(errno) => {
                        error!(event = "merge.failed", recipe = %name, step, reason = e.reason(), errno, error = %e)
                    }
                    None => {
                        error!(event = "merge.failed", recipe = %name, step, reason = e.reason(), error = %e)
                    }
                }
                // Try again with the next arrival (or interval), not in a tight loop.
                self.schedule.failed(ri, Instant::now());
            }
        }
    }

    /// This instance's index among the instances (0 without `[partition]`).
    fn part_index(&self) -> usize {
        share(&self.cfg).map_or(0, |s| s.part.index)
    }

    /// An output of recipe `ri` was published: by this instance (`by_other` is None), or by
    /// another instance that committed the parts (this instance counted its own bytes when it
    /// wrote its part). Metrics, the log line, the hook (run by the publisher only).
    fn published(&mut self, ri: usize, e: emit::Emitted, by_other: Option<&Path>) {
        let recipe = &self.cfg.recipes[ri];
        let name = recipe.name.clone();
        let m = &self.ctx.shared.metrics;
        let own = by_other.is_none() && share(&self.cfg).is_none();
        m.emitted(&name, e.step, if own { e.bytes } else { 0 });
        if share(&self.cfg).is_none() {
            // With [partition] the schedule counted the emission when the part was written:
            // all instances must count alike, whenever they see the commit.
            self.schedule.emitted(ri, e.step, Instant::now());
        }
        // Lag: from the newest averaged checkpoint's weights being written to its average
        // being published.
        let written_ns = self
            .window
            .pinned(e.step)
            .and_then(|c| c.files.iter().map(|f| f.fingerprint.mtime_ns).max());
        let lag = written_ns
            .and_then(|ns| u64::try_from(ns).ok())
            .map(|ns| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        m.lag.set(lag.as_secs_f64());
        if let Some(path) = by_other {
            info!(
                event = "partition.committed",
                recipe = %name,
                step = e.step,
                out = %path.display(),
                by = "other",
                lag = %secs(lag),
                "published by another instance"
            );
            return;
        }
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
        if let Some(job) = HookJob::after_emission(recipe, e.step, &e.path) {
            let _ = self.ctx.hooks.send(job);
        }
    }

    /// Add a part just written to the outputs waiting for their commit; beyond
    /// [`MAX_STAGED`] per recipe the oldest is abandoned.
    fn stage(&mut self, ri: usize, part: emit::PartWritten) {
        self.pending
            .retain(|p| !(p.ri == ri && p.part.step == part.step));
        self.pending.push(Pending {
            ri,
            part,
            since: Instant::now(),
            logged: None,
        });
        let mine: Vec<usize> = (0..self.pending.len())
            .filter(|i| self.pending[*i].ri == ri)
            .collect();
        if mine.len() > MAX_STAGED {
            let oldest = mine[0];
            let p = self.pending.remove(oldest);
            self.abandon(&p, "too many outputs staged at once (a part is missing)");
        }
    }

    /// Give up on a waiting output: log, count, and (instance 0) remove its staging
    /// directory. Its checkpoints are not published as this step; later steps are.
    fn abandon(&self, p: &Pending, why: &str) {
        let name = &self.cfg.recipes[p.ri].name;
        let out = &self.outputs[p.ri];
        let missing = partition::check_parts(&p.part.dir, &p.part.plan, out.is_in_place())
            .ok()
            .and_then(|s| match s {
                partition::PartsState::Missing(m) => Some(fmt_list(&m)),
                partition::PartsState::Complete(_) => None,
            })
            .unwrap_or_else(|| "-".into());
        warn!(
            event = "partition.abandoned",
            recipe = %name,
            step = p.part.step,
            missing = %missing,
            waited = %secs(p.since.elapsed()),
            reason = why,
            "output not published"
        );
        self.ctx
            .shared
            .metrics
            .parts_abandoned
            .get_or_create(&vec![("recipe".into(), name.clone())])
            .inc();
        // In marker mode the parts sit under the output's own name: never remove a
        // committed one (another instance may have committed it meanwhile).
        if self.part_index() == 0 && !(out.is_in_place() && out.is_committed(&p.part.dir)) {
            let _ = std::fs::remove_dir_all(&p.part.dir);
        }
    }

    /// Look at every output waiting for its parts: publish those complete (instance 0 at
    /// once, any other after `partition.takeover_after`; the first rename wins), note those published by
    /// another instance, abandon those past `partition.part_timeout` or overtaken by a newer
    /// published step, and say which parts are missing once a minute.
    fn commit_pending(&mut self) {
        let Some(pc) = self.cfg.partition.clone() else {
            return;
        };
        let pending = std::mem::take(&mut self.pending);
        let mut keep = Vec::new();
        let mut oldest_wait: BTreeMap<usize, (usize, f64)> = BTreeMap::new();
        for mut p in pending {
            let ri = p.ri;
            let recipe = &self.cfg.recipes[ri];
            let out = &self.outputs[ri];
            let waited = p.since.elapsed();
            let may = pc.index == 0 || waited >= pc.takeover_after;
            let r = emit::commit(&p.part, out, recipe.keep, pc.index, may);
            let name = recipe.name.clone();
            match r {
                Ok(emit::Committed::Published(e)) => {
                    self.ctx.shared.metrics.merge(
                        &name,
                        "ok",
                        Some(p.since.elapsed().as_secs_f64() + p.part.duration.as_secs_f64()),
                    );
                    info!(
                        event = "partition.committed",
                        recipe = %name,
                        step = e.step,
                        out = %e.path.display(),
                        by = if pc.index == 0 { "committer" } else { "takeover" },
                        parts = p.part.plan.count,
                        waited = %secs(waited),
                        plan = %p.part.plan.hash,
                    );
                    let step = e.step;
                    self.published(ri, e, None);
                    self.sweep_staging(ri, Some(step));
                }
                Ok(emit::Committed::Already(path)) => {
                    let e = emit::Emitted {
                        path: path.clone(),
                        step: p.part.step,
                        steps: p.part.steps.clone(),
                        bytes: p.part.record.bytes,
                        duration: waited,
                        removed: Vec::new(),
                    };
                    let step = e.step;
                    self.published(ri, e, Some(&path));
                    self.sweep_staging(ri, Some(step));
                }
                Ok(emit::Committed::Gone) => {
                    self.abandon(&p, "its staging directory was removed by another instance");
                }
                Ok(state @ (emit::Committed::Waiting(_) | emit::Committed::NotMine)) => {
                    let overtaken = out.latest().is_some_and(|l| l > p.part.step);
                    if overtaken {
                        self.abandon(&p, "a newer step was published first");
                        continue;
                    }
                    if waited >= pc.part_timeout {
                        self.abandon(&p, "partition.part_timeout passed");
                        continue;
                    }
                    let present = match &state {
                        emit::Committed::Waiting(m) => p.part.plan.count - m.len(),
                        _ => p.part.plan.count,
                    };
                    let e = oldest_wait.entry(ri).or_insert((present, 0.0));
                    if waited.as_secs_f64() >= e.1 {
                        *e = (present, waited.as_secs_f64());
                    }
                    let due = p
                        .logged
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                    if let (emit::Committed::Waiting(missing), true) = (&state, due) {
                        if p.logged.is_some() || waited >= Duration::from_secs(5) {
                            p.logged = Some(Instant::now());
                            let others = self.other_plans(&p);
                            info!(
                                event = "partition.waiting",
                                recipe = %name,
                                step = p.part.step,
                                missing = %fmt_list(missing),
                                present,
                                count = p.part.plan.count,
                                waited = %secs(waited),
                                other_plans = %if others.is_empty() { "-".to_string() } else { others.join(",") },
                                "waiting for the other instances' parts"
                            );
                            if !others.is_empty() {
                                self.ctx
                                    .shared
                                    .metrics
                                    .plan_mismatches
                                    .inc_by(others.len() as u64);
                                warn!(
                                    event = "partition.plan_mismatch",
                                    recipe = %name,
                                    step = p.part.step,
                                    plan = %p.part.plan.hash,
                                    other_plans = %others.join(","),
                                    "other instances wrote parts of this step under another plan: they disagree on the checkpoints, the recipe options or the pmad version; those parts are never mixed in"
                                );
                            }
                        }
                    }
                    keep.push(p);
                }
                Err(e) => {
                    self.ctx.shared.metrics.merge(&name, "failed", None);
                    error!(event = "merge.failed", recipe = %name, step = p.part.step, reason = e.reason(), error = %e, "commit failed; trying again");
                    if waited >= pc.part_timeout {
                        self.abandon(&p, "partition.part_timeout passed");
                    } else {
                        keep.push(p);
                    }
                }
            }
        }
        let m = &self.ctx.shared.metrics;
        for (ri, r) in self.cfg.recipes.iter().enumerate() {
            let l = vec![("recipe".to_string(), r.name.clone())];
            let (present, waited) = oldest_wait.get(&ri).copied().unwrap_or((0, 0.0));
            m.parts_present.get_or_create(&l).set(present as i64);
            m.commit_wait.get_or_create(&l).set(waited);
        }
        self.pending = keep;
    }

    /// Instance 0 removes staging directories of recipe `ri` that can no longer be
    /// published (steps at or below `published`, or untouched for `partition.part_timeout`:
    /// left by a crash); the outputs still waiting are kept.
    fn sweep_staging(&self, ri: usize, published: Option<u64>) {
        let Some(pc) = self
            .cfg
            .partition
            .as_ref()
            .filter(|p| p.count > 1 && p.index == 0)
        else {
            return;
        };
        let out = &self.outputs[ri];
        let n = partition::sweep(
            out.path(),
            |name| {
                let name = name.strip_prefix("verdicts-").unwrap_or(name);
                out.step_of(name)
                    .is_some_and(|s| published.is_some_and(|p| s <= p))
            },
            pc.part_timeout,
        );
        if n > 0 {
            info!(event = "startup.swept", dir = %out.path().join(partition::STAGING_DIR).display(), removed = n, "removed staging directories that can no longer be published");
        }
        if out.is_in_place() {
            let n = out.sweep_uncommitted(|s| published.is_some_and(|p| s <= p), pc.part_timeout);
            if n > 0 {
                info!(event = "startup.swept", dir = %out.path().display(), removed = n, "removed uncommitted outputs that can no longer be published");
            }
        }
    }

    /// Hashes of other plans staged for the same step as `p` (instances that disagree).
    fn other_plans(&self, p: &Pending) -> Vec<String> {
        if self.outputs[p.ri].is_in_place() {
            return partition::foreign_plans(&p.part.dir, &p.part.plan.hash);
        }
        let Some(root) = p.part.dir.parent() else {
            return Vec::new();
        };
        let prefix = format!("{}.", self.outputs[p.ri].step_name(p.part.step));
        std::fs::read_dir(root)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        let hash = n.strip_prefix(&prefix)?.to_string();
                        (hash != p.part.plan.hash).then_some(hash)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The manifest describing the current state (`None` before the first checkpoint).
    fn manifest(&self) -> Option<Manifest> {
        let layout = self.window.layout()?.clone();
        Some(Manifest {
            format: super::state::FORMAT,
            generation: 0,
            accumulator: self.window.accumulator(),
            recipes_signature: recipes_signature(&self.cfg.recipes),
            layout,
            window: self
                .window
                .pinned_all()
                .map(|(step, c)| SavedCheckpoint {
                    step,
                    path: c.path.clone(),
                    files: c
                        .files
                        .iter()
                        .map(|f| (f.path.clone(), f.fingerprint))
                        .collect(),
                })
                .collect(),
            recipes: (0..self.window.recipe_count())
                .map(|ri| {
                    let (since_emit, last_emitted_step) = self.schedule.saved(ri);
                    let held = self.window.held(ri).to_vec();
                    let running = self.window.is_running(ri);
                    SavedRecipe {
                        name: self.cfg.recipes[ri].name.clone(),
                        members: if running { Vec::new() } else { held.clone() },
                        absorbed: if running { held } else { Vec::new() },
                        since_emit,
                        last_emitted_step,
                    }
                })
                .collect(),
            newest_step: self.intake.considered_upto.max(self.intake.restored_upto),
            paths: self.accepted.iter().map(|(s, p)| (*s, p.clone())).collect(),
        })
    }

    /// Persist the state: with the accumulators when `sums` is set. Without them (after an
    /// emission) only when the saved sums are current: otherwise the bookkeeping waits for
    /// the sums' own save, as a manifest must describe the sums on disk.
    fn save(&mut self, sums: bool) {
        self.save_because(sums, if sums { "changed" } else { "published" });
    }

    fn save_because(&mut self, sums: bool, reason: &'static str) {
        if !sums && self.persist.as_ref().is_some_and(|p| p.acc_unsaved) {
            return;
        }
        let Some(m) = self.manifest() else { return };
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        let t0 = Instant::now();
        let acc = if sums {
            self.window.acc().map(AccBytes::of)
        } else {
            None
        };
        let result = p.dir.save(m, acc);
        if sums {
            // On failure the sums stay unsaved and are tried again after the interval, or when
            // another absorbed checkpoint is deleted: not every cycle against a full disk.
            p.acc_unsaved = result.is_err();
            p.urgent = false;
            p.saved_at = t0;
            match &result {
                Ok(_) => {
                    p.unsaved.clear();
                    p.journaled = 0;
                }
                Err(_) => p.unsaved.retain(|_, path| path.exists()),
            }
        }
        let dir = p.dir.path().display().to_string();
        match result {
            Ok(n) => {
                // A file-backed store must keep the generation the manifest now names.
                let g = p.dir.generation();
                self.window.persisted(g);
                info!(event = "state.saved", dir = %dir, size = %bytes(n), took = %secs(t0.elapsed()), accumulators = sums, reason)
            }
            // Keep running: the previous generation stays valid on disk.
            Err(e) => save_failed(&e, "state not saved; the previous one stays valid"),
        }
    }
}

/// Log a failed write of the state (`state.saved ok=false`, with the errno when there is one).
fn save_failed(e: &Error, msg: &str) {
    match e.errno() {
        Some(errno) => {
            error!(event = "state.saved", ok = false, reason = e.reason(), errno, error = %e, "{msg}")
        }
        None => error!(event = "state.saved", ok = false, reason = e.reason(), error = %e, "{msg}"),
    }
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

/// A recipe's output directory as this instance uses it: shared with the other instances
/// under `[partition]` (and in marker mode where the commit mode resolves so).
pub(super) fn recipe_out_dir(cfg: &Config, r: &crate::config::Recipe) -> OutDir {
    let naming = match cfg.watch.layout {
        crate::config::Layout::Megatron => crate::output::outdir::Naming::Megatron,
        crate::config::Layout::OlmoCore => crate::output::outdir::Naming::Step,
        _ => crate::output::outdir::Naming::StepDash,
    };
    let out = OutDir::new(&r.out_dir).named(naming);
    match cfg.partition.as_ref().filter(|p| p.count > 1) {
        Some(p) if p.commit.resolve(&r.out_dir) == CommitMode::Marker => out.in_place(),
        Some(_) => out.shared(),
        None => out,
    }
}
