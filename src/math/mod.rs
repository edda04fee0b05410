//! The math of averaging: kinds, weights, kernels and running sums.
//!
//! - [`kinds`]: element encodings, accumulator precision, output dtype (one name table each).
//! - [`method`]: averaging methods and their weights — a recipe kind's math.
//! - [`kernels`]: decode → accumulate → encode over blocks; no I/O, property-tested.
//! - [`accum`]: the store of running sums (in RAM or in generation files) and the one pass
//!   that applies a list of [`accum::Op`]s to it while reading checkpoints.
//! - [`incremental`]: which ops keep each method's sums up to date as checkpoints come and go.
//!
//! Architecture invariant: this layer reads checkpoints ([`crate::format`]) but knows nothing
//! of configs, outputs or the daemon. Results never depend on chunking or thread count.

pub mod accum;
pub mod incremental;
pub mod kernels;
pub mod kinds;
pub mod method;

pub use kinds::{Accumulator, FloatKind, OutDtype};
pub use method::{Method, MethodKind, Shape};
