//! The producer that averages pinned checkpoints element by element: used by `pmad merge`
//! and by the daemon's `weights` recipes.
//!
//! Owns the input side of the memory bound: a task merges its inputs in steps of 256 KiB per
//! input and releases the whole folios behind each step from this process's mappings at once
//! (they stay in the page cache), so the inputs add only `threads x K x 256 KiB` to the writer's
//! `4 x threads x chunk_bytes`. Peak RSS is about `threads x (4 x chunk_bytes + K x 256 KiB)`
//! plus ~20 MB, whatever the model size (docs/performance.md).

use super::plan::ShardPlan;
use super::write::{split, write_output, ChunkStat, Progress, Unit, WriteReport};
use crate::error::{Error, Result};
use crate::format::{Checkpoint, SourceFile, Tensor};
use crate::math::kernels;
use crate::math::kinds::{Accumulator, FloatKind};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// Input bytes per checkpoint merged between two checks for whole folios to release.
const RELEASE_STEP: usize = 256 << 10;

/// A stretch of one input file a task has read: `[lo, hi)`, of which `[lo, freed)` is
/// already released from the mapping.
struct Span<'f> {
    file: &'f SourceFile,
    freed: usize,
    hi: usize,
}

impl<'f> Span<'f> {
    /// The task has just read `r` of `file`: extend the span (releasing the whole folios it
    /// has left behind), or, when `r` is elsewhere, finish the span and start a new one.
    fn advance(span: &mut Option<Span<'f>>, file: &'f SourceFile, r: Range<usize>) {
        match span {
            Some(s) if std::ptr::eq(s.file, file) && r.start >= s.freed && r.start <= s.hi => {
                s.hi = s.hi.max(r.end);
                let cut = file.folio_floor(s.hi);
                if cut > s.freed {
                    file.release_exact(s.freed..cut);
                    s.freed = cut;
                }
            }
            _ => {
                if let Some(old) = span.take() {
                    old.finish();
                }
                *span = Some(Span {
                    file,
                    freed: file.folio_floor(r.start),
                    hi: r.end,
                });
            }
        }
    }

    /// Release what is left, up to the end of the folio of the last byte read.
    fn finish(self) {
        let end = self.file.folio_ceil(self.hi);
        if end > self.freed {
            self.file.release_exact(self.freed..end);
        }
    }
}

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
    let produce = |task: &[Unit], out: &mut [u8]| -> Result<ChunkStat> {
        let shard = &plan[task[0].shard];
        let mut stat = ChunkStat::default();
        // Per input: the span of one file this task has read and not yet released. Input
        // pages are released in whole folios behind the read position as it advances, and
        // the rest when the task ends, so a task of thousands of small tensors makes a few
        // madvise calls, not one per tensor per input.
        let mut spans: Vec<Option<Span<'_>>> = (0..inputs.len()).map(|_| None).collect();
        for (ui, (u, out)) in split(shard, task, out).enumerate() {
            let (job, srcs) = &jobs[u.shard][u.tensor];
            match job {
                Job::Copy => {
                    let i = srcs.len() - 1;
                    let t = srcs[i];
                    let sz = out.len() / u.elems.len().max(1);
                    let r = t.range.start + u.elems.start * sz..t.range.start + u.elems.end * sz;
                    let f = &newest.files[t.file];
                    out.copy_from_slice(f.slice(r.clone()));
                    Span::advance(&mut spans[i], f, r);
                }
                Job::Average { kind, out: ok } => {
                    // In steps of RELEASE_STEP input bytes, releasing whole folios behind each
                    // step: what a task keeps mapped is K x RELEASE_STEP, not K x the task, so
                    // memory does not grow with the number of inputs.
                    let (isz, osz) = (kind.size(), ok.size());
                    let step = (RELEASE_STEP / isz).max(1);
                    let files: Vec<&SourceFile> = inputs
                        .iter()
                        .zip(srcs)
                        .map(|(c, t)| &c.files[t.file])
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
                            let mut first = None;
                            let mut count = 0;
                            for (i, s) in slices.iter().enumerate() {
                                let c = kernels::count_nonfinite(*kind, s);
                                if c > 0 && first.is_none() {
                                    first = Some(i);
                                }
                                count += c;
                            }
                            stat.add(ui, count, first);
                        }
                        for ((span, f), r) in spans.iter_mut().zip(&files).zip(ranges) {
                            Span::advance(span, f, r);
                        }
                        e0 = e1;
                    }
                }
            }
        }
        for span in spans.into_iter().flatten() {
            span.finish();
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
