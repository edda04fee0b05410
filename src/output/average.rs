//! The producer that averages pinned checkpoints element by element: used by `pmad merge`
//! and by the daemon's `weights` recipes.
//!
//! Owns the memory bound of averaging: peak RSS stays under a budget (256 MB by default)
//! whatever the number of inputs K and of threads. The budget, less a reserve for everything
//! else, is split between the writer's output buffers (`4 x threads x chunk`, the chunk shrunk
//! when needed) and the inputs. Inputs are read in one of two ways, chosen per merge:
//! - **mapped** (zero-copy) when `threads x K x` [`MAPPED_INPUT_COST`] fits: a task merges its
//!   inputs in steps of 256 KiB per input and releases the whole folios behind each step from
//!   this process's mappings at once (they stay in the page cache). What stays mapped per
//!   input is about one page-cache folio (up to 2 MiB), so this costs K x ~3 MiB per thread.
//! - **read** otherwise: each step's bytes of every input are copied with `pread` into a
//!   per-thread buffer of `K x step` bytes, the step sized to fit (16-256 KiB); nothing is
//!   mapped. Same values, same order of operations, so the output is bit-identical.

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

/// The default bound on peak RSS of an average (`pmad merge --memory-budget`).
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

/// What one mapped input costs per thread at most: the page-cache folio around the read
/// position (up to 2 MiB on current kernels) plus a step (measured: ~3 MiB per input per
/// thread at K = 8..32).
pub const MAPPED_INPUT_COST: u64 = 3 << 20;

/// Part of the budget kept for everything but the write path: the binary, the heap, the
/// inputs' tensor catalogs.
const RESERVE: u64 = 40 << 20;

/// Smallest step of a read-mode merge.
const MIN_READ_STEP: usize = 16 << 10;

/// How a merge fits its budget (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Output bytes per unit of work.
    pub chunk_bytes: usize,
    /// `None`: inputs are mapped; `Some(step)`: read in steps of this many bytes per input.
    pub read_step: Option<usize>,
}

impl MemoryPlan {
    /// Fit `k` inputs on `threads` threads into `budget` bytes, with chunks of at most
    /// `max_chunk`.
    pub fn new(budget: u64, k: usize, threads: usize, max_chunk: usize) -> MemoryPlan {
        let (k, threads) = (k.max(1) as u64, threads.max(1) as u64);
        let half = budget.saturating_sub(RESERVE) / 2;
        let chunk = (half / (4 * threads)).clamp(64 << 10, max_chunk.max(64 << 10) as u64);
        let per_thread = half / threads;
        let read_step = if k * MAPPED_INPUT_COST <= per_thread {
            None
        } else {
            let step = (per_thread / k) as usize / 4096 * 4096;
            Some(step.clamp(MIN_READ_STEP, RELEASE_STEP))
        };
        MemoryPlan {
            chunk_bytes: chunk as usize,
            read_step,
        }
    }
}

thread_local! {
    /// A read-mode merge's per-thread input buffer (K x step bytes), kept between tasks.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

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
    /// Output bytes per unit of work, at most (less when the budget needs it).
    pub chunk_bytes: usize,
    /// Bound on peak RSS.
    pub memory_budget: u64,
}

/// How one output tensor is computed from the inputs.
enum Job {
    /// Weighted average of float inputs of `kind`, written as `out`.
    Average { kind: FloatKind, out: FloatKind },
    /// Bytes copied from the newest input (integers, bool).
    Copy,
    /// Bytes of the newest input's file `file` from byte `start` (a DCP file's non-averaged
    /// parts).
    Raw { file: usize, start: usize },
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
            if let Some(raw) = &t.raw {
                let job = Job::Raw {
                    file: raw.file,
                    start: raw.range.start,
                };
                v.push((job, Vec::new()));
                continue;
            }
            let hint = newest.position(&t.name).unwrap_or(0);
            let srcs: Vec<&Tensor> = inputs
                .iter()
                .map(|c| {
                    c.tensor_near(hint, &t.name).ok_or_else(|| Error::Mismatch {
                        path: c.path.clone(),
                        detail: format!("tensor {} is missing", t.name),
                    })
                })
                .collect::<Result<_>>()?;
            let job = match (FloatKind::of_tensor(srcs[0]), FloatKind::of(t.dtype)) {
                (Some(kind), Some(out)) => Job::Average { kind, out },
                _ => Job::Copy,
            };
            v.push((job, srcs));
        }
        jobs.push(v);
    }
    let (weights, fix) = (how.weights, how.fix_nonfinite);
    let mem = MemoryPlan::new(
        how.memory_budget,
        inputs.len(),
        rayon::current_num_threads(),
        how.chunk_bytes,
    );
    let produce = |task: &[Unit], out: &mut [u8]| -> Result<ChunkStat> {
        let shard = &plan[task[0].shard];
        let mut stat = ChunkStat::default();
        // Per input: the span of one file this task has read and not yet released. Input
        // pages are released in whole folios behind the read position as it advances, and
        // the rest when the task ends, so a task of thousands of small tensors makes a few
        // madvise calls, not one per tensor per input.
        let mut spans: Vec<Option<Span<'_>>> = (0..inputs.len()).map(|_| None).collect();
        // Reused by every step of every tensor of the task (thousands of small tensors: no
        // allocation per tensor).
        let mut files: Vec<&SourceFile> = Vec::with_capacity(inputs.len());
        let mut ranges: Vec<Range<usize>> = Vec::with_capacity(inputs.len());
        let mut slices: Vec<&[u8]> = Vec::with_capacity(inputs.len());
        for (ui, (u, out)) in split(shard, task, out).enumerate() {
            let (job, srcs) = &jobs[u.shard][u.tensor];
            match job {
                Job::Raw { file, start } => {
                    let i = inputs.len() - 1;
                    let f = &newest.files[*file];
                    let r = start + u.elems.start..start + u.elems.end;
                    if mem.read_step.is_some() {
                        f.read_at(r, out)?;
                    } else {
                        out.copy_from_slice(f.slice(r.clone()));
                        Span::advance(&mut spans[i], f, r);
                    }
                }
                Job::Copy => {
                    let i = srcs.len() - 1;
                    let t = srcs[i];
                    let sz = out.len() / u.elems.len().max(1);
                    let r = t.range.start + u.elems.start * sz..t.range.start + u.elems.end * sz;
                    let f = &newest.files[t.file];
                    if mem.read_step.is_some() {
                        f.read_at(r, out)?;
                    } else {
                        out.copy_from_slice(f.slice(r.clone()));
                        Span::advance(&mut spans[i], f, r);
                    }
                }
                Job::Average { kind, out: ok } => {
                    // In steps of RELEASE_STEP input bytes, releasing whole folios behind each
                    // step: what a task keeps mapped is K x RELEASE_STEP, not K x the task, so
                    // memory does not grow with the number of inputs.
                    let (isz, osz) = (kind.size(), ok.size());
                    let step = (mem.read_step.unwrap_or(RELEASE_STEP) / isz).max(1);
                    files.clear();
                    files.extend(inputs.iter().zip(srcs).map(|(c, t)| &c.files[t.file]));
                    let mut e0 = u.elems.start;
                    while e0 < u.elems.end {
                        let e1 = (e0 + step).min(u.elems.end);
                        ranges.clear();
                        ranges.extend(
                            srcs.iter()
                                .map(|t| t.range.start + e0 * isz..t.range.start + e1 * isz),
                        );
                        let o = &mut out[(e0 - u.elems.start) * osz..(e1 - u.elems.start) * osz];
                        let mut merge = |slices: &[&[u8]]| -> (u64, Option<usize>) {
                            let bad = match how.accumulator {
                                Accumulator::F32 => {
                                    kernels::merge_chunk::<f32>(slices, *kind, weights, *ok, o, fix)
                                }
                                Accumulator::F64 => {
                                    kernels::merge_chunk::<f64>(slices, *kind, weights, *ok, o, fix)
                                }
                            };
                            let (mut count, mut first) = (0, None);
                            if bad > 0 {
                                for (i, s) in slices.iter().enumerate() {
                                    let c = kernels::count_nonfinite(*kind, s);
                                    if c > 0 && first.is_none() {
                                        first = Some(i);
                                    }
                                    count += c;
                                }
                            }
                            (count, first)
                        };
                        let (count, first) = if mem.read_step.is_some() {
                            SCRATCH.with(|scratch| -> Result<(u64, Option<usize>)> {
                                let mut scratch = scratch.borrow_mut();
                                let len = (e1 - e0) * isz;
                                if scratch.len() < len * files.len() {
                                    scratch.resize(len * files.len(), 0);
                                }
                                let mut parts = scratch.chunks_mut(len);
                                let mut slices: Vec<&[u8]> = Vec::with_capacity(files.len());
                                for (f, r) in files.iter().zip(&ranges) {
                                    let b = parts.next().ok_or_else(|| {
                                        Error::Internal("read buffer too small".into())
                                    })?;
                                    f.read_at(r.clone(), b)?;
                                    slices.push(b);
                                }
                                Ok(merge(&slices))
                            })?
                        } else {
                            slices.clear();
                            slices
                                .extend(files.iter().zip(&ranges).map(|(f, r)| f.slice(r.clone())));
                            let found = merge(&slices);
                            for ((span, f), r) in spans.iter_mut().zip(&files).zip(ranges.drain(..))
                            {
                                Span::advance(span, f, r);
                            }
                            found
                        };
                        stat.add(ui, count, first);
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
    write_output(dir, plan, mem.chunk_bytes, produce, check, progress, cancel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_plan_maps_while_it_fits_and_reads_in_small_steps_beyond() {
        let mib = 1u64 << 20;
        // The dense default: 8 inputs, 2 threads, 256 MB: mapped, full chunks.
        let p = MemoryPlan::new(DEFAULT_MEMORY_BUDGET, 8, 2, 4 << 20);
        assert_eq!(
            p,
            MemoryPlan {
                chunk_bytes: 4 << 20,
                read_step: None
            }
        );
        for k in [8, 32, 64, 1000] {
            for threads in [1, 2, 8, 64] {
                let p = MemoryPlan::new(DEFAULT_MEMORY_BUDGET, k, threads, 4 << 20);
                let (t, k) = (threads as u64, k as u64);
                let inputs = match p.read_step {
                    None => t * k * MAPPED_INPUT_COST,
                    Some(step) => {
                        assert!(step % 4096 == 0 && (MIN_READ_STEP..=RELEASE_STEP).contains(&step));
                        t * k * step as u64
                    }
                };
                let writer = 4 * t * p.chunk_bytes as u64;
                // Within the budget, except where even the smallest steps and chunks are
                // over it (a thousand inputs on 64 threads).
                if k * t <= 64 * 8 {
                    assert!(
                        RESERVE + writer + inputs <= DEFAULT_MEMORY_BUDGET,
                        "k {k} threads {t}: {p:?}"
                    );
                }
                assert!(p.chunk_bytes >= 64 << 10 && p.chunk_bytes <= 4 << 20);
            }
        }
        // A bigger budget maps more.
        assert_eq!(MemoryPlan::new(4096 * mib, 64, 8, 4 << 20).read_step, None);
    }
}
