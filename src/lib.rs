//! pmad: Pre-trained Model Averaging as a daemon.
//!
//! The library holds all logic; `src/main.rs` only parses arguments, sets up logging and
//! signals, and calls in. Pipeline stages, one module each:
//! - [`header`]: safetensors header and HF index validation over plain bytes (fuzzable).
//! - [`checkpoint`]: open a checkpoint: validated, pinned, mapped files and a tensor catalog.
//! - [`merge`]: the math: weights per method and the decode/accumulate/encode kernels.
//! - [`engine`]: the chunked parallel pipeline with bounded memory, and one-shot merges.
//! - [`publish`]: output plan, streaming safetensors writer, durable atomic publish.
//! - [`fsio`]: every durable filesystem step (and the fault-injection hook for tests).
//! - [`inspect`]: the `pmad inspect` report.

pub mod accum;
pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod emit;
pub mod engine;
pub mod error;
pub mod fsio;
pub mod header;
pub mod inspect;
pub mod merge;
pub mod metrics;
pub mod publish;
pub mod select;
pub mod server;
pub mod sigbus;
pub mod state;
pub mod telemetry;
pub mod watch;
pub mod window;

pub use error::{Error, Result};
