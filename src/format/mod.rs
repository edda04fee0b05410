//! Checkpoint formats: everything that turns files on disk into a validated, pinned
//! [`Checkpoint`] — and nothing after that.
//!
//! - [`checkpoint`]: the format-agnostic result (tensor catalog, schema).
//! - [`source`]: a pinned, fingerprinted, read-only mapped file; [`sigbus`] guards its map.
//! - [`safetensors`]: the safetensors file format; its pure parsers in
//!   [`safetensors::header`] are the fuzz targets.
//! - [`dir`]: a checkpoint directory, live or as a [`Snapshot`] of its files kept open.
//! - [`hf`]: the Hugging Face directory layout (single file or index + shards, aux files).
//! - [`dcp`]: PyTorch Distributed Checkpoint directories (torchtitan, FSDP2, torch_dist).
//!
//! Architecture invariant: this layer depends only on [`crate::error`] (and the OS); it knows
//! nothing of averaging, outputs or the daemon. A new checkpoint format is a new module here
//! whose opener returns a [`Checkpoint`]; [`open`] recognises it by the files it finds.

pub mod checkpoint;
pub mod dcp;
pub mod dir;
pub mod hf;
pub mod safetensors;
pub mod select;
pub mod sigbus;
pub mod source;

pub use checkpoint::{Checkpoint, Schema, Tensor};
pub use dir::{Dir, Snapshot};
pub use select::Select;
pub use source::{Fingerprint, SourceFile, SourceState};

use crate::error::Result;
use std::path::Path;

/// Whether a file of a checkpoint directory holds weights (rather than a marker, config or
/// optimizer state): files that must not change while the checkpoint is in use.
pub fn is_weight_file(name: &str) -> bool {
    hf::is_weight_file(name) || dcp::is_weight_file(name)
}

/// Open and validate the checkpoint at `path` (a directory or a single weights file),
/// recognising its format from its files.
pub fn open(path: &Path) -> Result<Checkpoint> {
    open_with(path, &Select::default())
}

/// [`open`], averaging the tensors `select` chooses (the format's rule when it is empty).
pub fn open_with(path: &Path, select: &Select) -> Result<Checkpoint> {
    if path.is_dir() {
        return open_dir(Dir::Live(path), select);
    }
    // A bare `.safetensors` file (or an error naming what is there instead).
    hf::open(path).map(|c| selected(c, select))
}

/// Apply `select` to a safetensors checkpoint (every float tensor by the format's rule).
fn selected(mut c: Checkpoint, select: &Select) -> Checkpoint {
    if !select.is_default() {
        for t in &mut c.tensors {
            t.average = select.averages(&t.name, true);
        }
    }
    c
}

/// A directory is DCP when it has DCP files and no safetensors weights; otherwise the HF
/// layout reads it (and names the other formats it recognises but cannot read).
fn open_dir(dir: Dir<'_>, select: &Select) -> Result<Checkpoint> {
    let names = dir.names();
    let safetensors = names.iter().any(|n| hf::is_weight_file(n));
    if !safetensors && dcp::is_dcp(&dir) {
        dcp::open_dir(dir, select)
    } else {
        hf::open_dir(dir).map(|c| selected(c, select))
    }
}

/// Open and validate a checkpoint directory from a snapshot of its files (it may have been
/// deleted since).
pub fn open_snapshot(snapshot: &Snapshot, select: &Select) -> Result<Checkpoint> {
    open_dir(Dir::Snapshot(snapshot), select)
}
