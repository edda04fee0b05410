//! The HTTP endpoints: `/healthz`, `/readyz`, `/metrics`, `/status` (axum, on the daemon's
//! tokio runtime).
//!
//! Bound before the first scan (so a startup probe can see the port) and shut down with the
//! daemon. Liveness is the main loop's heartbeat, never "a checkpoint arrived" (training may
//! not save for hours). Readiness is: first scan done, discovery running, outputs writable.

use super::status::Shared;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Server state: the shared status plus the liveness limit.
#[derive(Clone)]
pub struct AppState {
    /// Shared with the daemon loop.
    pub shared: Arc<Shared>,
    /// `/healthz` fails when the heartbeat is older than this.
    pub stale_after: Duration,
}

/// Serve on an already-bound listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let age = s.shared.heartbeat_age_ms();
    if age <= s.stale_after.as_millis() as u64 {
        (
            StatusCode::OK,
            format!("ok: main loop alive {age} ms ago\n"),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stale: main loop silent for {age} ms\n"),
        )
    }
}

/// Why pmad is not ready (empty when it is): first scan, watcher, writable outputs.
async fn not_ready(s: &AppState) -> Vec<String> {
    let mut problems = Vec::new();
    if !s.shared.scanned.load(Ordering::Relaxed) {
        problems.push("first scan not finished".to_string());
    }
    if !s.shared.watching.load(Ordering::Relaxed) {
        problems.push("watcher not running".to_string());
    }
    let dirs = s
        .shared
        .out_dirs
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    // access(2) is a file-system call (it can hang on a dead network mount): never on the
    // async runtime.
    let unwritable = tokio::task::spawn_blocking(move || {
        dirs.into_iter()
            .filter(|d| rustix::fs::access(d, rustix::fs::Access::WRITE_OK).is_err())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for d in unwritable {
        problems.push(format!("{} is not writable", d.display()));
    }
    problems
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let problems = not_ready(&s).await;
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    // pmad_ready: what /readyz would answer now (alerting cannot probe /readyz itself).
    let ready = not_ready(&s).await.is_empty();
    s.shared.metrics.ready.set(ready as i64);
    // Rendering reads the process metrics from /proc: off the async runtime.
    let shared = s.shared.clone();
    let text = tokio::task::spawn_blocking(move || shared.metrics.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    let snap = s
        .shared
        .status
        .lock()
        .map(|x| x.clone())
        .unwrap_or_default();
    axum::Json(snap)
}
