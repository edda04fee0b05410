//! pmad: Pre-trained Model Averaging as a daemon.
//!
//! The library holds all logic; the `pmad` binary (`src/main.rs`, `src/cmd/`) only parses
//! arguments, sets up logging and signals, and calls in. The layers, in pipeline order (each
//! depends only on the ones before it; docs/architecture.md is the map):
//!
//! ```text
//! format ─▶ math ─▶ output ─▶ daemon
//!  read      average  write     watch, decide, keep up to date, publish on schedule
//! ```
//! - [`mod@format`]: checkpoint formats on disk → validated, pinned checkpoints.
//! - [`math`]: kinds, weights, kernels, running sums.
//! - [`output`]: output plan, the streaming writer, atomic publish, output directories.
//! - [`daemon`]: `pmad run`: discovery, gate, selection, window, schedule, state, resume.
//! - [`obs`]: logs, metrics, the HTTP endpoints.
//! - [`config`]: the daemon's TOML configuration, resolved and validated.
//! - [`error`], [`fsio`] (every durable file-system step, with fault injection), [`sys`]
//!   (facts about the machine), [`names`] (one name table per closed set of names).

pub mod config;
pub mod daemon;
pub mod error;
pub mod format;
pub mod fsio;
pub mod math;
pub mod names;
pub mod obs;
pub mod output;
pub mod sys;

#[cfg(test)]
mod layers;

pub use error::{Error, Result};
