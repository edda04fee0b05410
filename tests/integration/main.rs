//! pmad's integration tests, in one test binary: the real `pmad` binary driven as a process.
//!
//! Each `tests/*.rs` file is its own binary that links pmad and every dependency again, so
//! the integration tests live in one crate (`cargo test --test integration`) with one module
//! per subject; `harness` holds what they share. Run one subject with a name filter, e.g.
//! `cargo test --test integration merge_cli::`.
//!
//! - `check_config`: `pmad check-config`.
//! - `daemon_e2e`: `pmad run` against an HF-Trainer-like producer (rotation, restart), every
//!   output checked by the float64 oracle.
//! - `daemon_features`: hooks, retention, `emit_interval`, text log, resume from `state.dir`,
//!   a watch.dir that appears late.
//! - `dcp`: PyTorch DCP checkpoints (torch-written fixtures): `merge`, `run`, `inspect` and
//!   hostile variants, checked by an independent Python reader.
//! - `demo`: `pmad demo`.
//! - `fault_inputs`: disk full, hostile inputs, racing writers and vanishing dirs, rotation and
//!   rewrites, the watched tree left untouched (one file each).
//! - `fault_kill`: SIGKILL loop, injected I/O failures, SIGTERM mid-emission (one file each).
//! - `inspect`: `pmad inspect`.
//! - `merge_cli`: `pmad merge`.
//! - `monitoring`: the alert rules and dashboard of `deploy/` against a real scrape, and a
//!   real Prometheus scraping `pmad run`.
//! - `partition`: `pmad merge --partition I/N` and `--commit`.
//! - `server`: the HTTP endpoints of `pmad run`.
//! - `spike`: the loss-spike sentinel and its rescue output.
//!
//! `tests/fuzz_corpus.rs` stays a binary of its own: it replays the fuzz corpora through the
//! library (no process, no harness) and `fuzz/` refers to it by that name.

mod harness;

mod check_config;
mod daemon_e2e;
mod daemon_features;
mod dcp;
mod demo;
mod fault_inputs;
mod fault_kill;
mod inspect;
mod merge_cli;
mod monitoring;
mod partition;
mod server;
mod spike;
