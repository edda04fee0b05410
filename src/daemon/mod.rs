//! `pmad run`: the long-running service.
//!
//! The async side only moves events: it waits for a wake (inotify), a deadline (poll interval,
//! a checkpoint's settle time, an emission interval) or shutdown, then runs one *cycle* on the
//! blocking pool ([`cycle`]). Every file-system call — preparing the output directories, the
//! cycle itself, starting the inotify watcher (which walks the tree) — runs on the blocking
//! pool, never on the async runtime. Shutdown stops intake at once and lets an in-flight
//! emission finish within `daemon.shutdown_grace`, then cancels it (its temp dir is removed)
//! and exits cleanly.
//!
//! The parts, in pipeline order:
//! - [`watch`]: scanning `watch.dir`, file signatures, markers, inotify wake-ups;
//! - [`tracker`]: each directory's state (pending, accepted, skipped, rejected, abandoned);
//! - [`gate`]: validation, schema, NaN/Inf, "did it change while we looked";
//! - [`select`]: the constant-LR phase rules; [`spike`]: the loss-spike sentinel;
//! - [`window`]: pinned checkpoints and every recipe's sums, with their invariants;
//! - [`schedule`]: when each recipe publishes;
//! - [`emit`]: publishing a recipe's average;
//! - [`state`] and [`resume`]: what is saved, and how a restart picks up from it;
//! - [`hooks`]: `on_emit` commands; [`status`]: the `/status` snapshot.

pub mod cycle;
pub mod emit;
pub mod gate;
pub mod hooks;
pub mod resume;
pub mod schedule;
pub mod select;
pub mod spike;
pub mod state;
pub mod status;
pub mod tracker;
pub mod watch;
pub mod window;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::obs::log::secs;
use crate::obs::Shared;
use crate::output::OutDir;
use cycle::{Ctx, Daemon};
use hooks::HookJob;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A blocking closure on tokio's blocking pool; a panic in it is a bug.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a daemon task failed: {e}")))
}

/// Run the daemon until `shutdown` is cancelled. Signal handling is the caller's.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<()> {
    let dir = cfg.watch.dir.clone();
    let not_a_dir = blocking(move || dir.exists() && !dir.is_dir()).await?;
    if not_a_dir {
        return Err(Error::invalid(
            &cfg.watch.dir,
            "watch.dir is not a directory",
        ));
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
                .map_err(|e| Error::io("bind", format!("server.listen {addr}"), e))?;
            info!(event = "server.started", listen = %listener.local_addr().unwrap_or(addr));
            let state = crate::obs::http::AppState {
                shared: shared.clone(),
                stale_after: cfg.watch.poll_interval * 3 + Duration::from_secs(60),
            };
            Some(tokio::spawn(crate::obs::http::serve(
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
    info!(event = "shutdown.completed");
    result
}

/// The inotify watcher, started once `watch.dir` exists (unless polling was chosen).
struct Inotify {
    wanted: bool,
    watcher: Arc<Mutex<Option<notify::RecommendedWatcher>>>,
}

impl Inotify {
    /// Start the watcher if it is wanted, not running, and the directory exists; returns
    /// whether it was started now. Runs on the blocking pool: a recursive watch walks the
    /// whole tree.
    async fn ensure(
        &mut self,
        dir_present: bool,
        cfg: &Config,
        scanner: &Arc<watch::Scanner>,
        wake: &Arc<tokio::sync::Notify>,
        shared: &Shared,
    ) -> Result<bool> {
        if !dir_present {
            shared.watching.store(false, Ordering::Relaxed);
            return Ok(false);
        }
        let running = self.watcher.lock().map(|w| w.is_some()).unwrap_or(false);
        let mut started = false;
        if self.wanted && !running {
            let (dir, sc, wk) = (cfg.watch.dir.clone(), scanner.clone(), wake.clone());
            match blocking(move || watch::start_notify(&dir, sc, wk)).await? {
                Ok(w) => {
                    if let Ok(mut slot) = self.watcher.lock() {
                        *slot = Some(w);
                    }
                    started = true;
                }
                Err(e) => {
                    warn!(event = "watch.mode", mode = "poll", reason = %e, "inotify unavailable; polling only");
                    self.wanted = false;
                }
            }
        }
        shared.watching.store(true, Ordering::Relaxed);
        Ok(started)
    }
}

async fn run_loop(cfg: Config, shutdown: CancellationToken, shared: Arc<Shared>) -> Result<()> {
    let outputs: Vec<(String, OutDir)> = cfg
        .recipes
        .iter()
        .map(|r| (r.name.clone(), cycle::recipe_out_dir(&cfg, r)))
        .collect();
    for (name, out) in outputs {
        let swept = blocking(move || out.prepare().map(|n| (n, out))).await?;
        let (n, out) = swept.map_err(|e| match e {
            Error::Io { op, path, cause } => Error::Io {
                op,
                path: format!("recipe {name}: out_dir {}", path.display()).into(),
                cause,
            },
            other => other,
        })?;
        if n > 0 {
            info!(event = "startup.swept", dir = %out.path().display(), removed = n, "removed temp dirs left by an earlier crash");
        }
    }
    let grace = cfg.shutdown_grace;
    let cancel = Arc::new(AtomicBool::new(false));
    let (hook_tx, mut hook_rx) = tokio::sync::mpsc::unbounded_channel::<HookJob>();
    let hooks = tokio_util::task::TaskTracker::new();
    let hooks2 = hooks.clone();
    let hook_loop = tokio::spawn(async move {
        while let Some(job) = hook_rx.recv().await {
            hooks2.spawn(hooks::run_hook(job));
        }
    });
    let wake = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    let ctx = Ctx {
        hooks: hook_tx,
        cancel: cancel.clone(),
        stopping: stopping.clone(),
        shared: shared.clone(),
    };
    let c = cfg.clone();
    let daemon = blocking(move || Daemon::new(c, ctx)).await??;
    let scanner = daemon.scanner();
    // inotify needs the directory to exist: until it does, the periodic scan waits for it,
    // and the watcher is installed as soon as a cycle sees it.
    let c = cfg.watch.clone();
    let wanted = match blocking(move || watch::use_inotify(&c)).await? {
        Ok(()) => true,
        Err(why) => {
            info!(event = "watch.mode", mode = "poll", reason = %why);
            false
        }
    };
    let mut inotify = Inotify {
        wanted,
        watcher: Arc::new(Mutex::new(None)),
    };
    let d = cfg.watch.dir.clone();
    let present = blocking(move || d.is_dir()).await?;
    inotify
        .ensure(present, &cfg, &scanner, &wake, &shared)
        .await?;
    info!(
        event = "daemon.started",
        version = env!("CARGO_PKG_VERSION"),
        watch = %cfg.watch.dir.display(),
        recipes = %cfg.recipes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        poll = %secs(cfg.watch.poll_interval),
        settle = %secs(cfg.watch.settle),
        threads = cfg.threads,
        priority = %cfg.priority,
    );
    let mut daemon = daemon;
    let daemon = blocking(move || {
        daemon.restore();
        daemon
    })
    .await?;
    let daemon = Arc::new(Mutex::new(daemon));
    let mut done = false;
    while !done {
        let d = daemon.clone();
        let mut job = tokio::task::spawn_blocking(move || match d.lock() {
            Ok(mut daemon) => Some(daemon.cycle()),
            Err(_) => None,
        });
        let cycled = tokio::select! {
            r = &mut job => r.map_err(|e| Error::Internal(format!("a cycle failed: {e}")))?,
            _ = shutdown.cancelled() => {
                stopping.store(true, Ordering::Relaxed);
                info!(event = "shutdown.started", grace = %secs(grace), "stopping intake; finishing the current work");
                match tokio::time::timeout(grace, &mut job).await {
                    Ok(r) => {
                        r.map_err(|e| Error::Internal(format!("a cycle failed: {e}")))?;
                    }
                    Err(_) => {
                        cancel.store(true, Ordering::Relaxed);
                        warn!(event = "shutdown.started", "grace period over; aborting the in-flight emission");
                        job.await.map_err(|e| Error::Internal(format!("a cycle failed: {e}")))?;
                    }
                }
                break;
            }
        };
        // A poisoned lock means an earlier cycle panicked: the state is not trustworthy.
        let cycled = cycled.ok_or_else(|| Error::Internal("a cycle panicked earlier".into()))?;
        let started = inotify
            .ensure(cycled.watch_dir_present, &cfg, &scanner, &wake, &shared)
            .await?;
        if started {
            // The directory appeared after the last scan began: anything created before the
            // watch existed is only seen by a scan, so run one now.
            wake.notify_one();
        }
        let deadline = tokio::time::Instant::from_std(cycled.next.max(Instant::now()));
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
    // Sums still waiting for their save (state.save_interval) are saved now, unless the
    // grace period is already over.
    if !cancel.load(Ordering::Relaxed) {
        let d = daemon.clone();
        blocking(move || {
            if let Ok(mut daemon) = d.lock() {
                daemon.flush_state();
            }
        })
        .await?;
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
    // The watcher's thread stops when it is dropped; do that off the runtime too.
    let w = inotify.watcher.clone();
    let _ = blocking(move || drop(w.lock().map(|mut w| w.take()))).await;
    Ok(())
}
