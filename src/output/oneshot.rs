//! The one-shot merge behind `pmad merge`: open and validate the inputs, average them,
//! copy the aux files, write `merge.json` and publish atomically at `--out`.
//!
//! Invariant: nothing appears at `--out` unless the whole merge succeeded, and an existing
//! output is only ever replaced with `force`, atomically, and never when it holds an input.

use super::average::{write_average, Averaging};
use super::plan;
use super::record::{unix_now, MergeRecord};
use super::staging::Staging;
use super::write::Progress;
use crate::error::{Error, Result};
use crate::format::Checkpoint;
use crate::math::kinds::{Accumulator, FloatKind, OutDtype};
use crate::math::{Method, MethodKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Everything that decides a merge's result.
#[derive(Debug, Clone)]
pub struct MergeSpec {
    /// Weighting method.
    pub method: Method,
    /// Output dtype of float tensors.
    pub dtype: OutDtype,
    /// Accumulator precision; `None` chooses: f64 when float tensors are written as f32 or
    /// f64 (see [`OutDtype::writes_wide`]), else f32.
    pub accumulator: Option<Accumulator>,
    /// Maximum bytes per output shard.
    pub shard_size: u64,
    /// Merge even if inputs hold NaN/Inf.
    pub allow_nonfinite: bool,
    /// Output bytes per unit of work.
    pub chunk_bytes: usize,
}

/// Summary of a finished one-shot merge.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Where the output was published.
    pub out: PathBuf,
    /// Weights applied, oldest first.
    pub weights: Vec<f64>,
    /// Accumulator precision used.
    pub accumulator: Accumulator,
    /// Tensor data bytes written.
    pub bytes_written: u64,
    /// Tensor data bytes read from the inputs.
    pub bytes_read: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of shards.
    pub shards: usize,
    /// Non-finite values merged (only with `allow_nonfinite`).
    pub nonfinite: u64,
    /// Wall time.
    pub duration: Duration,
}

/// Refuse outputs that would overwrite something we must not: an existing output without
/// `force`, anything that is not a directory, or one of the inputs (or a directory holding one).
fn check_out(inputs: &[PathBuf], out: &Path, force: bool) -> Result<()> {
    let Ok(meta) = out.symlink_metadata() else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "output {} exists and is not a directory; refusing to replace it",
            out.display()
        )));
    }
    if !force {
        return Err(Error::Usage(format!(
            "output {} already exists; pass --force to replace it",
            out.display()
        )));
    }
    let canon_out = std::fs::canonicalize(out).map_err(|e| Error::io("resolve", out, e))?;
    for p in inputs {
        let cp = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        if cp.starts_with(&canon_out) {
            return Err(Error::Usage(format!(
                "output {} holds input {}; --force would delete it",
                out.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

/// One-shot merge: open and validate the inputs, merge, copy aux files, write merge.json and
/// publish atomically at `out`.
pub fn merge_checkpoints(
    paths: &[PathBuf],
    spec: &MergeSpec,
    out: &Path,
    force: bool,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<MergeSummary> {
    let started = Instant::now();
    check_out(paths, out, force)?;
    let weights = spec.method.weights(paths.len()).map_err(|e| {
        let flag = match spec.method.kind() {
            MethodKind::Ema => "--alpha",
            MethodKind::Schedule => "--final-lr-ratio",
            _ => "--weights",
        };
        Error::Usage(format!("{flag}: {e}"))
    })?;
    let inputs = paths
        .iter()
        .map(|p| Checkpoint::open(p))
        .collect::<Result<Vec<_>>>()?;
    for c in &inputs[1..] {
        inputs[0].check_compatible(c)?;
    }
    let newest = &inputs[inputs.len() - 1];
    let kinds = || newest.tensors.iter().filter_map(|t| FloatKind::of(t.dtype));
    let accumulator = spec
        .accumulator
        .unwrap_or(if spec.dtype.writes_wide(kinds()) {
            Accumulator::F64
        } else {
            Accumulator::F32
        });
    let tensors = plan::output_tensors(newest, spec.dtype)?;
    let steps: Vec<Option<u64>> = inputs.iter().map(|c| c.step).collect();
    let meta = plan::header_metadata(&spec.method, &steps);
    let plan = plan::plan_shards(tensors, spec.shard_size, &meta)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Usage(format!("--out {}: not a usable name", out.display())))?;
    let staging = Staging::new(parent, name)?;
    let refs: Vec<&Checkpoint> = inputs.iter().collect();
    let how = Averaging {
        weights: &weights,
        accumulator,
        fix_nonfinite: spec.allow_nonfinite,
        chunk_bytes: spec.chunk_bytes,
    };
    let nf = write_average(&refs, &how, staging.path(), &plan, progress, cancel)?;
    if nf.count > 0 && !spec.allow_nonfinite {
        let (tensor, first) = nf.tensors[0].clone();
        let more = if nf.tensors.len() > 1 {
            format!(" (also in {} other tensor(s))", nf.tensors.len() - 1)
        } else {
            String::new()
        };
        return Err(Error::NonFinite {
            path: first
                .map(|i| inputs[i].path.clone())
                .unwrap_or_else(|| newest.path.clone()),
            tensor,
            count: nf.count,
            more,
            allow: "--allow-nonfinite",
        });
    }
    // Nothing may have changed under us while we read.
    for c in &inputs {
        c.verify()?;
    }
    plan::write_index(staging.path(), &plan)?;
    plan::write_aux(newest, staging.path())?;
    let bytes_written: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    let record = MergeRecord {
        pmad_version: env!("CARGO_PKG_VERSION").into(),
        recipe: None,
        method: spec.method.kind(),
        alpha: spec.method.alpha(),
        shape: spec.method.schedule().map(|s| s.0),
        final_lr_ratio: spec.method.schedule().map(|s| s.1),
        weights: weights.clone(),
        steps,
        inputs: inputs
            .iter()
            .map(|c| {
                std::fs::canonicalize(&c.path)
                    .unwrap_or_else(|_| c.path.clone())
                    .display()
                    .to_string()
            })
            .collect(),
        dtype: spec.dtype,
        accumulator,
        tensors: newest.tensors.len(),
        bytes: bytes_written,
        nonfinite: nf.count,
        created_unix: unix_now(),
    };
    record.write(staging.path())?;
    let out = staging.commit(name, force)?;
    Ok(MergeSummary {
        out,
        weights,
        accumulator,
        bytes_written,
        bytes_read: inputs.iter().map(|c| c.data_bytes()).sum(),
        tensors: newest.tensors.len(),
        shards: plan.len(),
        nonfinite: nf.count,
        duration: started.elapsed(),
    })
}
