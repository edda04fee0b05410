//! The merge pipeline: turns an output plan plus a per-chunk producer into published bytes,
//! and the one-shot `pmad merge` built on it.
//!
//! Owns the memory bound. Tensors are cut into units of at most `chunk_bytes` of output; a
//! batch of `2 x threads` units is computed in parallel on rayon while the previous batch is
//! written, so at most two batches of output buffers exist at once (`4 x threads x
//! chunk_bytes`). A unit merges its inputs in steps of 256 KiB per input and releases each
//! step's input pages from this process's mappings at once (they stay in the page cache), so
//! the inputs add only `threads x K x 256 KiB`. Peak RSS is therefore about
//! `threads x (4 x chunk_bytes + K x 256 KiB)` plus ~20 MB, whatever the model size
//! (measured in README "Performance"). Results do not depend on the batching: every element
//! is computed from the same inputs in the same order.

use crate::checkpoint::{Checkpoint, Tensor};
use crate::error::{Error, Result};
use crate::fsio;
use crate::header::dtype_name;
use crate::merge::{self, Accumulator, FloatKind, Method};
use crate::publish::{self, OutTensor, ShardPlan, ShardWriter, Staging};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default output bytes per unit of work.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// Input bytes per checkpoint merged between two checks for whole folios to release.
const RELEASE_STEP: usize = 256 << 10;

/// Output dtype for float tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// Keep each tensor's input dtype.
    Source,
    /// Convert every float tensor to this kind.
    Float(FloatKind),
}

impl OutDtype {
    /// Parse `source|bf16|f16|f32`.
    pub fn parse(s: &str) -> Option<OutDtype> {
        Some(match s {
            "source" => OutDtype::Source,
            "bf16" => OutDtype::Float(FloatKind::BF16),
            "f16" => OutDtype::Float(FloatKind::F16),
            "f32" => OutDtype::Float(FloatKind::F32),
            _ => return None,
        })
    }

    /// Name as written in merge.json.
    pub fn name(self) -> &'static str {
        match self {
            OutDtype::Source => "source",
            OutDtype::Float(FloatKind::BF16) => "bf16",
            OutDtype::Float(FloatKind::F16) => "f16",
            OutDtype::Float(FloatKind::F32) => "f32",
            OutDtype::Float(FloatKind::F64) => "f64",
            OutDtype::Float(_) => "f8",
        }
    }
}

/// Everything that decides a merge's result.
#[derive(Debug, Clone)]
pub struct MergeSpec {
    /// Weighting method.
    pub method: Method,
    /// Output dtype of float tensors.
    pub dtype: OutDtype,
    /// Accumulator precision.
    pub accumulator: Accumulator,
    /// Maximum bytes per output shard.
    pub shard_size: u64,
    /// Merge even if inputs hold NaN/Inf.
    pub allow_nonfinite: bool,
    /// Output bytes per unit of work.
    pub chunk_bytes: usize,
}

/// Progress counters shared with whoever displays them.
#[derive(Debug, Default)]
pub struct Progress {
    /// Output bytes written so far.
    pub written: AtomicU64,
    /// Output bytes in total.
    pub total: AtomicU64,
}

/// What a unit of work produced besides its bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChunkStat {
    /// Non-finite input values found.
    pub nonfinite: u64,
    /// The first input (index, oldest = 0) holding one.
    pub first_input: Option<usize>,
}

/// A unit of work: a range of elements of one output tensor.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Index of the shard.
    pub shard: usize,
    /// Index of the tensor within the shard's plan.
    pub tensor: usize,
    /// Element range within the tensor.
    pub elems: Range<usize>,
}

/// Non-finite values seen during a write, by first tensor.
#[derive(Debug, Default, Clone)]
pub struct NonFiniteReport {
    /// Total count.
    pub count: u64,
    /// Tensors affected, in output order (first one first), with the first input index.
    pub tensors: Vec<(String, Option<usize>)>,
}

/// Stream every shard of `plan` into `dir`, asking `produce` for each unit's bytes.
/// Runs on the current rayon pool. `check` is called before each batch (re-verify sources).
pub fn write_output<P, C>(
    dir: &Path,
    plan: &[ShardPlan],
    chunk_bytes: usize,
    produce: P,
    check: C,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<NonFiniteReport>
where
    P: Fn(&Unit, &mut [u8]) -> Result<ChunkStat> + Sync,
    C: Fn() -> Result<()>,
{
    let total: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    progress.total.store(total, Ordering::Relaxed);
    let batch = (2 * rayon::current_num_threads()).max(2);
    let mut report = NonFiniteReport::default();
    for (si, shard) in plan.iter().enumerate() {
        let mut writer = ShardWriter::create(dir, shard)?;
        let units = units_of(si, shard, chunk_bytes);
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let flush = |bufs: &mut Vec<Vec<u8>>, w: &mut ShardWriter| -> Result<()> {
            for b in bufs.iter() {
                w.write(b)?;
                progress
                    .written
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        };
        for group in units.chunks(batch) {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            check()?;
            let mut bufs: Vec<Vec<u8>> = group
                .iter()
                .map(|u| {
                    let mut b = spare.pop().unwrap_or_default();
                    b.resize(u.elems.len() * elem_size(&shard.tensors[u.tensor]), 0);
                    b
                })
                .collect();
            let (written, stats) = rayon::join(
                || flush(&mut pending, &mut writer),
                || {
                    group
                        .par_iter()
                        .zip(bufs.par_iter_mut())
                        .map(|(u, b)| produce(u, b))
                        .collect::<Vec<Result<ChunkStat>>>()
                },
            );
            written?;
            for (u, s) in group.iter().zip(stats) {
                let s = s?;
                if s.nonfinite > 0 {
                    report.count += s.nonfinite;
                    let name = &shard.tensors[u.tensor].name;
                    if report.tensors.last().map(|(n, _)| n) != Some(name) {
                        report.tensors.push((name.clone(), s.first_input));
                    }
                }
            }
            spare.append(&mut pending);
            pending = bufs;
        }
        flush(&mut pending, &mut writer)?;
        writer.finish()?;
    }
    Ok(report)
}

fn elem_size(t: &OutTensor) -> usize {
    (t.dtype.bitsize() / 8).max(1)
}

fn units_of(si: usize, shard: &ShardPlan, chunk_bytes: usize) -> Vec<Unit> {
    let mut units = Vec::new();
    for (ti, t) in shard.tensors.iter().enumerate() {
        let n: usize = t.shape.iter().product();
        let per = (chunk_bytes / elem_size(t)).max(1);
        let mut s = 0;
        while s < n {
            let e = (s + per).min(n);
            units.push(Unit {
                shard: si,
                tensor: ti,
                elems: s..e,
            });
            s = e;
        }
    }
    units
}

/// Summary of a finished one-shot merge.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// Where the output was published.
    pub out: PathBuf,
    /// Weights applied, oldest first.
    pub weights: Vec<f64>,
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

/// How one output tensor is computed from the inputs.
enum Job {
    /// Weighted average of float inputs of `kind`, written as `out`.
    Average { kind: FloatKind, out: FloatKind },
    /// Bytes copied from the newest input (integers, bool).
    Copy,
}

/// Refuse dtypes we cannot average and decide each tensor's output dtype.
pub fn output_tensors(newest: &Checkpoint, dtype: OutDtype) -> Result<Vec<OutTensor>> {
    newest
        .tensors
        .iter()
        .map(|t| {
            let out = match (FloatKind::of(t.dtype), dtype) {
                (Some(k), OutDtype::Source) => k.dtype(),
                (Some(_), OutDtype::Float(k)) => k.dtype(),
                (None, _) if merge::is_unsupported_float(t.dtype) => {
                    return Err(Error::Unsupported {
                        path: newest.files[t.file].path.clone(),
                        tensor: t.name.clone(),
                        dtype: dtype_name(t.dtype),
                        hint: "pmad averages F64, F32, F16, BF16, F8_E4M3 and F8_E5M2; \
                               dequantize or save this tensor in one of those",
                    })
                }
                (None, _) => t.dtype,
            };
            Ok(OutTensor {
                name: t.name.clone(),
                dtype: out,
                shape: t.shape.clone(),
            })
        })
        .collect()
}

/// Provenance strings for safetensors `__metadata__` (always with `"format": "pt"`).
pub fn header_metadata(method: &Method, steps: &[Option<u64>]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), "pt".into());
    m.insert("pmad_version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("pmad_method".into(), method.name().into());
    if steps.iter().all(|s| s.is_some()) {
        let s: Vec<String> = steps.iter().flatten().map(|s| s.to_string()).collect();
        m.insert("pmad_steps".into(), s.join(","));
    }
    m
}

/// Merge `inputs` (oldest first, already checked compatible) into `dir`'s shards.
/// Returns non-finite findings; the caller decides whether they are fatal.
pub fn merge_into(
    inputs: &[&Checkpoint],
    spec: &MergeSpec,
    weights: &[f64],
    dir: &Path,
    plan: &[ShardPlan],
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<NonFiniteReport> {
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
    let fix = spec.allow_nonfinite;
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
                let files: Vec<&crate::checkpoint::SourceFile> = inputs
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
                    let bad = match spec.accumulator {
                        Accumulator::F32 => {
                            merge::merge_chunk::<f32>(&slices, *kind, weights, *ok, o, fix)
                        }
                        Accumulator::F64 => {
                            merge::merge_chunk::<f64>(&slices, *kind, weights, *ok, o, fix)
                        }
                    };
                    if bad > 0 {
                        for (i, s) in slices.iter().enumerate() {
                            let c = merge::count_nonfinite(*kind, s);
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
    write_output(
        dir,
        plan,
        spec.chunk_bytes,
        produce,
        check,
        progress,
        cancel,
    )
}

/// The provenance record written as `merge.json` next to every output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MergeRecord {
    /// pmad version that wrote it.
    pub pmad_version: String,
    /// Daemon recipe name, absent for `pmad merge`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recipe: Option<String>,
    /// sma | wma | ema | weights.
    pub method: String,
    /// EMA alpha, if any.
    pub alpha: Option<f64>,
    /// Weights applied, oldest first, summing to 1.
    pub weights: Vec<f64>,
    /// Training steps of the inputs, oldest first (null where unknown).
    pub steps: Vec<Option<u64>>,
    /// Input paths, oldest first.
    pub inputs: Vec<String>,
    /// Output dtype setting.
    pub dtype: String,
    /// Accumulator precision.
    pub accumulator: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensor data bytes.
    pub bytes: u64,
    /// Non-finite input values merged (allowed explicitly).
    pub nonfinite: u64,
    /// Seconds since the epoch when published.
    pub created_unix: u64,
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

impl MergeRecord {
    /// Write it as `<dir>/merge.json` (durably, like every output file).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self).unwrap_or_default();
        json.push(b'\n');
        fsio::write_file(&dir.join("merge.json"), &json)
    }
}

/// Seconds since the epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    let weights = spec
        .method
        .weights(paths.len())
        .map_err(|e| Error::Usage(format!("--weights/--alpha: {e}")))?;
    let inputs = paths
        .iter()
        .map(|p| Checkpoint::open(p))
        .collect::<Result<Vec<_>>>()?;
    for c in &inputs[1..] {
        inputs[0].check_compatible(c)?;
    }
    let newest = &inputs[inputs.len() - 1];
    let tensors = output_tensors(newest, spec.dtype)?;
    let steps: Vec<Option<u64>> = inputs.iter().map(|c| c.step).collect();
    let meta = header_metadata(&spec.method, &steps);
    let plan = publish::plan_shards(tensors, spec.shard_size, &meta)?;
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
    let nf = merge_into(
        &refs,
        spec,
        &weights,
        staging.path(),
        &plan,
        progress,
        cancel,
    )?;
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
        });
    }
    // Nothing may have changed under us while we read.
    for c in &inputs {
        c.verify()?;
    }
    publish::write_index(staging.path(), &plan)?;
    publish::write_aux(newest, staging.path())?;
    let bytes_written: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    let record = MergeRecord {
        pmad_version: env!("CARGO_PKG_VERSION").into(),
        recipe: None,
        method: spec.method.name().into(),
        alpha: match spec.method {
            Method::Ema { alpha } => Some(alpha),
            _ => None,
        },
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
        dtype: spec.dtype.name().into(),
        accumulator: spec.accumulator.name().into(),
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
        bytes_written,
        bytes_read: inputs.iter().map(|c| c.data_bytes()).sum(),
        tensors: newest.tensors.len(),
        shards: plan.len(),
        nonfinite: nf.count,
        duration: started.elapsed(),
    })
}
