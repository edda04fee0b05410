//! pmad's integration tests, in one test binary: the real `pmad` binary driven as a process.
//!
//! Each `tests/*.rs` file is its own binary that links pmad and every dependency again, so
//! the integration tests live in one crate (`cargo test --test integration`) with one module
//! per subject; `harness` holds what they share. Run one subject with a name filter, e.g.
//! `cargo test --test integration merge_cli::`.

mod harness;

mod daemon_e2e;
mod daemon_features;
mod demo;
mod fault_inputs;
mod fault_kill;
mod merge_cli;
mod server;
