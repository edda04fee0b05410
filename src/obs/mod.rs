//! Observability: what operators see of a running pmad.
//!
//! - [`log`]: one line per event with a stable `event` field (text or JSON).
//! - [`metrics`]: the Prometheus registry.
//! - [`status`]: the state shared with the endpoints (heartbeat, readiness, `/status`).
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! Architecture invariant: the daemon pushes facts here; nothing here reaches back into the
//! daemon, and no handler blocks the async runtime on file-system calls.

pub mod http;
pub mod log;
pub mod metrics;
pub mod status;

pub use status::Shared;
