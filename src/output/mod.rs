//! Producing merged checkpoints: from a plan to durable, atomically published files.
//!
//! Pipeline order inside this layer:
//! - [`plan`]: each output tensor's dtype, the shard files and their headers, the index.
//! - [`mod@write`]: the streaming writer with bounded memory, fed by a producer of unit bytes.
//! - [`average`]: the producer that averages pinned checkpoints (`pmad merge`, `weights`).
//! - [`staging`]: temp dir → fsync → rename → fsync parent; sweeping a crash's leftovers.
//! - [`record`]: `merge.json`, the provenance of every output.
//! - [`outdir`]: a recipe's output directory — `step-<N>`, `LATEST`, retention.
//! - [`partition`]: one output split between instances: the plan, parts, the commit.
//! - [`oneshot`]: `pmad merge` end to end (whole, or one part, or the commit of the parts).
//!
//! Architecture invariant: this layer depends on [`crate::format`], [`crate::math`] and
//! [`crate::fsio`] (and [`crate::names`]), never on the config or the daemon. Everything durable goes through
//! [`crate::fsio`] (so fault injection reaches it); nothing is written through a writable map.

pub mod average;
pub mod oneshot;
pub mod outdir;
pub mod partition;
pub mod plan;
pub mod record;
pub mod staging;
pub mod write;

pub use outdir::OutDir;
pub use record::MergeRecord;
pub use write::Progress;
