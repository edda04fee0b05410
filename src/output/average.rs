//! The producer that averages pinned checkpoints element by element: used by `pmad merge`
//! and by the daemon's `weights` recipes.
//!
//! Owns the input side of the memory bound: a unit merges its inputs in steps of 256 KiB per
//! input and releases each step's input pages from this process's mappings at once (they stay
//! in the page cache), so the inputs add only `threads x K x 256 KiB` to the writer's
//! `4 x threads x chunk_bytes`. Peak RSS is about `threads x (4 x chunk_bytes + K x 256 KiB)`
//! plus ~20 MB, whatever the model size (docs/performance.md).

use super::plan::ShardPlan;
use super::write::{write_output, ChunkStat, Progress, Unit, WriteReport};
use crate::error::{Error, Result};
use crate::format::{Checkpoint, SourceFile, Tensor};
use crate::math::kernels;
use crate::math::kinds::{Accumulator, FloatKind};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Input bytes per checkpoint merged between two checks for whole folios to release.
const RELEASE_STEP: usize = 256 << 10;

/// How an average is computed.
#[derive(Debug, Clone, Copy)]
pub struct Averaging<'a> {
    /// One weight per input, oldest first, summing to 1.
    pub weights: &'a [f64],
    /// Accumulator precision.
    pub accumulator: Accumulator,
    /// Recompute non-finite results as the plain weighted sum (merging NaN/Inf on purpose)
    /// instead of only counting them.
    pub fix_nonfinite: bool,
    /// Output bytes per unit of work.
    pub chunk_bytes: usize,
}

/// How one output tensor is computed from the inputs.
enum Job {
    /// Weighted average of float inputs of `kind`, written as `out`.
    Average { kind: FloatKind, out: FloatKind },
    /// Bytes copied from the newest input (integers, bool).
    Copy,
}

/// Average `inputs` (oldest first, already checked compatible) into `dir`'s shards.
/// Returns non-finite findings; the caller decides whether they are fatal.
pub fn write_average(
    inputs: &[&Checkpoint],
    how: &Averaging<'_>,
    dir: &Path,
    plan: &[ShardPlan],
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<WriteReport> {
    let newest = inputs[inputs.len() - 1];
    // Resolve every output tensor to its source tensors once.
    let mut jobs: Vec<Vec<(Job, Vec<&Tensor>)>> = Vec::new();
    for shard in plan {
        let mut v = Vec::new();
        for t in &shard.tensors {
            let srcs: Vec<&Tensor> = inputs
                .iter()
                .map(|c| {
                    c.tensor(&t.name).ok_or_else(|| Error::Mismatch {
                        path: c.path.clone(),
                        detail: format!("tensor {} is missing", t.name),
                    })
                })
                .collect::<Result<_>>()?;
            let job = match (FloatKind::of(srcs[0].dtype), FloatKind::of(t.dtype)) {
                (Some(kind), Some(out)) => Job::Average { kind, out },
                _ => Job::Copy,
            };
            v.push((job, srcs));
        }
        jobs.push(v);
    }
    let (weights, fix) = (how.weights, how.fix_nonfinite);
    let produce = |u: &Unit, out: &mut [u8]| -> Result<ChunkStat> {
        let (job, srcs) = &jobs[u.shard][u.tensor];
        let mut stat = ChunkStat::default();
        match job {
            Job::Copy => {
                let t = srcs[srcs.len() - 1];
                let sz = out.len() / u.elems.len().max(1);
                let r = t.range.start + u.elems.start * sz..t.range.start + u.elems.end * sz;
                let f = &newest.files[t.file];
                out.copy_from_slice(f.slice(r.clone()));
                f.release(r);
            }
            Job::Average { kind, out: ok } => {
                // In steps of RELEASE_STEP input bytes, each step's input pages released as
                // soon as it is merged: what one unit keeps mapped is K x RELEASE_STEP, not
                // K x the unit, so memory does not grow with the number of inputs.
                let (isz, osz) = (kind.size(), ok.size());
                let step = (RELEASE_STEP / isz).max(1);
                let files: Vec<&SourceFile> = inputs
                    .iter()
                    .zip(srcs)
                    .map(|(c, t)| &c.files[t.file])
                    .collect();
                // Per input: the offset from which this unit has not released its pages yet.
                let mut freed: Vec<usize> = files
                    .iter()
                    .zip(srcs)
                    .map(|(f, t)| f.folio_floor(t.range.start + u.elems.start * isz))
                    .collect();
                let mut e0 = u.elems.start;
                while e0 < u.elems.end {
                    let e1 = (e0 + step).min(u.elems.end);
                    let ranges: Vec<Range<usize>> = srcs
                        .iter()
                        .map(|t| t.range.start + e0 * isz..t.range.start + e1 * isz)
                        .collect();
                    let slices: Vec<&[u8]> = files
                        .iter()
                        .zip(&ranges)
                        .map(|(f, r)| f.slice(r.clone()))
                        .collect();
                    let o = &mut out[(e0 - u.elems.start) * osz..(e1 - u.elems.start) * osz];
                    let bad = match how.accumulator {
                        Accumulator::F32 => {
                            kernels::merge_chunk::<f32>(&slices, *kind, weights, *ok, o, fix)
                        }
                        Accumulator::F64 => {
                            kernels::merge_chunk::<f64>(&slices, *kind, weights, *ok, o, fix)
                        }
                    };
                    if bad > 0 {
                        for (i, s) in slices.iter().enumerate() {
                            let c = kernels::count_nonfinite(*kind, s);
                            if c > 0 && stat.first_input.is_none_or(|f| i < f) {
                                stat.first_input = Some(i);
                            }
                            stat.nonfinite += c;
                        }
                    }
                    // Whole folios behind the read position are done with: drop them now
                    // (a partial one would be mapped whole again by the next read).
                    for ((f, r), fr) in files.iter().zip(&ranges).zip(freed.iter_mut()) {
                        let cut = if e1 == u.elems.end {
                            f.folio_ceil(r.end)
                        } else {
                            f.folio_floor(r.end)
                        };
                        if cut > *fr {
                            f.release_exact(*fr..cut);
                            *fr = cut;
                        }
                    }
                    e0 = e1;
                }
            }
        }
        Ok(stat)
    };
    let check = || -> Result<()> {
        for c in inputs {
            for f in &c.files {
                f.check_fd()?;
            }
        }
        Ok(())
    };
    write_output(dir, plan, how.chunk_bytes, produce, check, progress, cancel)
}
