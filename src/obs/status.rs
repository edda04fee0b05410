//! What the daemon shares with the HTTP endpoints: liveness (a heartbeat), readiness facts,
//! the `/status` snapshot, and the metrics registry.
//!
//! The daemon writes, the endpoints read; nothing here blocks on I/O.

use super::metrics::Metrics;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// One recipe in `/status`.
#[derive(Debug, Clone, serde::Serialize, Default)]
pub struct RecipeStatus {
    /// Recipe name.
    pub name: String,
    /// sma | wma | ema | weights.
    pub method: String,
    /// Steps the next output would average.
    pub steps: Vec<u64>,
    /// Last published step.
    pub last_emitted_step: Option<u64>,
    /// Last published output directory.
    pub last_output: Option<String>,
    /// Unix time of the last emission.
    pub last_emit_unix: Option<u64>,
    /// When the next emission is due, in words.
    pub next_due: String,
}

/// What `/status` returns.
#[derive(Debug, Clone, serde::Serialize, Default)]
pub struct StatusSnapshot {
    /// pmad version.
    pub version: String,
    /// Watched directory.
    pub watch_dir: String,
    /// Pinned window steps.
    pub window: Vec<u64>,
    /// Newest accepted step.
    pub newest_checkpoint_step: Option<u64>,
    /// Per-recipe state.
    pub recipes: Vec<RecipeStatus>,
    /// Persistent state directory.
    pub state_dir: Option<String>,
    /// Accumulator precision in use.
    pub accumulator: String,
    /// Checkpoints being waited on (seen, not yet complete).
    pub pending: Vec<u64>,
    /// The onset step of a loss spike in progress (checkpoints from it on are not absorbed).
    pub spike_onset: Option<u64>,
}

/// State shared between the daemon loop and the HTTP server.
#[derive(Default)]
pub struct Shared {
    /// Metrics registry.
    pub metrics: Metrics,
    /// Unix milliseconds of the main loop's last sign of life.
    pub heartbeat_ms: AtomicU64,
    /// The first scan finished.
    pub scanned: AtomicBool,
    /// Discovery is running (inotify started, or polling by choice).
    pub watching: AtomicBool,
    /// Latest status snapshot.
    pub status: Mutex<StatusSnapshot>,
    /// Output directories that must be writable for readiness.
    pub out_dirs: Mutex<Vec<std::path::PathBuf>>,
}

impl Shared {
    /// Record a sign of life of the main loop.
    pub fn beat(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.heartbeat_ms.store(now, Ordering::Relaxed);
    }

    /// Milliseconds since the last sign of life.
    pub fn heartbeat_age_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed))
    }
}
