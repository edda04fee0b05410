//! The one-shot merge behind `pmad merge`: open and validate the inputs, average them,
//! copy the aux files, write `merge.json` and publish atomically at `--out` — in one process
//! ([`merge_checkpoints`]), or split between processes ([`merge_part`] on each, then
//! [`commit_parts`] once; see [`super::partition`]).
//!
//! Invariant: nothing appears at `--out` unless the whole merge succeeded, and an existing
//! output is only ever replaced with `force`, atomically, and never when it holds an input.

use super::average::{write_average, Averaging};
use super::partition::{self, Part, PartMarker, PartitionBy, PartitionPlan, PartsState};
use super::plan;
use super::record::{unix_now, MergeRecord, PartitionRecord};
use super::staging::Staging;
use super::write::{Progress, WriteReport};
use crate::error::{Error, IoContext, Result};
use crate::format::Checkpoint;
use crate::math::kinds::{Accumulator, FloatKind, OutDtype};
use crate::math::{Method, MethodKind};
use rayon::prelude::*;
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
    /// Bound on peak RSS (see [`super::average`]).
    pub memory_budget: u64,
    /// Which tensors are averaged (the format's rule when empty).
    pub select: crate::format::Select,
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
    /// The partition plan's hash, for a part or a commit.
    pub plan: Option<String>,
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

/// The inputs of a merge, opened and checked, and what follows from them.
struct Prepared {
    inputs: Vec<Checkpoint>,
    weights: Vec<f64>,
    accumulator: Accumulator,
    tensors: Vec<plan::OutTensor>,
    steps: Vec<Option<u64>>,
    meta: std::collections::BTreeMap<String, String>,
    parent: PathBuf,
    name: String,
}

fn prepare(paths: &[PathBuf], spec: &MergeSpec, out: &Path) -> Result<Prepared> {
    let weights = spec.method.weights(paths.len()).map_err(|e| {
        let flag = match spec.method.kind() {
            MethodKind::Ema => "--alpha",
            MethodKind::Schedule => "--final-lr-ratio",
            _ => "--weights",
        };
        Error::Usage(format!("{flag}: {e}"))
    })?;
    // Opened in parallel (parsing the headers of a model of many small tensors is most of the
    // work of opening); the first error in input order is the one reported.
    let inputs = paths
        .par_iter()
        .map(|p| crate::format::open_with(p, &spec.select))
        .collect::<Vec<Result<Checkpoint>>>()
        .into_iter()
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
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Usage(format!("--out {}: not a usable name", out.display())))?
        .to_string();
    Ok(Prepared {
        inputs,
        weights,
        accumulator,
        tensors,
        steps,
        meta,
        parent,
        name,
    })
}

impl Prepared {
    /// Average into `dir` the shards of `plan`, refuse non-finite values unless allowed, and
    /// re-check that no input changed while it was read.
    fn write(
        &self,
        spec: &MergeSpec,
        dir: &Path,
        plan: &[plan::ShardPlan],
        progress: &Progress,
        cancel: &AtomicBool,
    ) -> Result<WriteReport> {
        let refs: Vec<&Checkpoint> = self.inputs.iter().collect();
        let how = Averaging {
            weights: &self.weights,
            accumulator: self.accumulator,
            fix_nonfinite: spec.allow_nonfinite,
            chunk_bytes: spec.chunk_bytes,
            memory_budget: spec.memory_budget,
        };
        let report = write_average(&refs, &how, dir, plan, progress, cancel)?;
        if report.count > 0 && !spec.allow_nonfinite {
            let (tensor, first) = report.tensors[0].clone();
            let more = if report.tensors.len() > 1 {
                format!(" (also in {} other tensor(s))", report.tensors.len() - 1)
            } else {
                String::new()
            };
            return Err(Error::NonFinite {
                path: first
                    .map(|i| self.inputs[i].path.clone())
                    .unwrap_or_else(|| self.newest().path.clone()),
                tensor,
                count: report.count,
                more,
                allow: "--allow-nonfinite",
            });
        }
        // Nothing may have changed under us while we read.
        for c in &self.inputs {
            c.verify()?;
        }
        Ok(report)
    }

    fn newest(&self) -> &Checkpoint {
        &self.inputs[self.inputs.len() - 1]
    }

    fn record(&self, spec: &MergeSpec, bytes: u64, nonfinite: u64) -> MergeRecord {
        MergeRecord {
            pmad_version: env!("CARGO_PKG_VERSION").into(),
            recipe: None,
            method: spec.method.kind(),
            alpha: spec.method.alpha(),
            shape: spec.method.schedule().map(|s| s.0),
            final_lr_ratio: spec.method.schedule().map(|s| s.1),
            weights: self.weights.clone(),
            steps: self.steps.clone(),
            inputs: self
                .inputs
                .iter()
                .map(|c| {
                    std::fs::canonicalize(&c.path)
                        .unwrap_or_else(|_| c.path.clone())
                        .display()
                        .to_string()
                })
                .collect(),
            dtype: spec.dtype,
            accumulator: self.accumulator,
            tensors: self.newest().tensors.len(),
            bytes,
            nonfinite,
            created_unix: unix_now(),
            partition: None,
        }
    }

    /// Input bytes behind the tensors of `shards`.
    fn bytes_read(&self, shards: &[plan::ShardPlan]) -> u64 {
        let wanted: std::collections::HashSet<&str> = shards
            .iter()
            .flat_map(|s| s.tensors.iter().map(|t| t.name.as_str()))
            .collect();
        self.inputs
            .iter()
            .flat_map(|c| c.tensors.iter())
            .filter(|t| wanted.contains(t.name.as_str()))
            .map(|t| t.range.len() as u64)
            .sum()
    }

    /// What decides the output's bytes besides the tensors and the split: the inputs (by
    /// directory name, step and data files, not by path, which differs between nodes), the
    /// method's weights, the accumulator and the non-finite policy.
    fn identity(&self, spec: &MergeSpec) -> Vec<u8> {
        let mut id = Vec::new();
        for c in &self.inputs {
            let name = c.path.file_name().map(|n| n.to_string_lossy().into_owned());
            id.extend(format!("{name:?} {:?}\n", c.step).bytes());
            for f in &c.files {
                let fname = f.path.file_name().map(|n| n.to_string_lossy().into_owned());
                id.extend(format!(" {fname:?} {}\n", f.fingerprint.size).bytes());
            }
        }
        for w in &self.weights {
            id.extend(w.to_bits().to_le_bytes());
        }
        id.extend(self.accumulator.name().bytes());
        id.push(spec.allow_nonfinite as u8);
        id
    }

    fn partition_plan(
        &self,
        spec: &MergeSpec,
        count: usize,
        by: PartitionBy,
    ) -> Result<PartitionPlan> {
        if self.newest().dcp.is_some() {
            return Err(Error::Usage(
                "--partition/--commit: splitting a DCP output is not supported yet; merge DCP \
                 checkpoints whole"
                    .into(),
            ));
        }
        PartitionPlan::new(
            self.tensors.clone(),
            spec.shard_size,
            &self.meta,
            count,
            by,
            &self.identity(spec),
        )
    }
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
    let p = prepare(paths, spec, out)?;
    let plan = plan::plan_output(p.newest(), p.tensors.clone(), spec.shard_size, &p.meta)?;
    let staging = Staging::new(&p.parent, &p.name)?;
    let report = p.write(spec, staging.path(), &plan, progress, cancel)?;
    plan::write_index(staging.path(), &plan)?;
    plan::write_aux(p.newest(), staging.path())?;
    super::write::write_integrity(p.newest(), staging.path(), &report.files)?;
    let bytes_written: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    p.record(spec, bytes_written, report.count)
        .write(staging.path())?;
    let out = staging.commit(&p.name, force)?;
    Ok(MergeSummary {
        out,
        weights: p.weights.clone(),
        accumulator: p.accumulator,
        bytes_written,
        // Every input's averaged tensors, and what is copied from the newest: its other
        // tensors (already counted) and, for DCP, the rest of its data files.
        bytes_read: p.inputs.iter().map(|c| c.data_bytes()).sum::<u64>()
            + if p.newest().dcp.is_some() {
                p.newest().file_bytes() - p.newest().data_bytes()
            } else {
                0
            },
        tensors: p.newest().tensors.len(),
        shards: plan.len(),
        nonfinite: report.count,
        duration: started.elapsed(),
        plan: None,
    })
}

/// Write part `part` of a merge split between instances: this instance's files of the
/// [`PartitionPlan`] into the shared staging directory next to `out`, then its marker.
/// Idempotent: a part whose marker is already there is not written again. Whether `out` may
/// be replaced is decided by [`commit_parts`].
pub fn merge_part(
    paths: &[PathBuf],
    spec: &MergeSpec,
    out: &Path,
    part: Part,
    by: PartitionBy,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<MergeSummary> {
    let started = Instant::now();
    let p = prepare(paths, spec, out)?;
    let plan = p.partition_plan(spec, part.count, by)?;
    let dir = plan.staging_dir(&p.parent, &p.name);
    std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
    let mine = plan.shards_of(part.index);
    let marker = dir.join(partition::marker_name(part.index, part.count));
    let bytes_written: u64 = mine.iter().map(|s| s.data_len as u64).sum();
    let summary = |nonfinite| MergeSummary {
        out: dir.clone(),
        weights: p.weights.clone(),
        accumulator: p.accumulator,
        bytes_written,
        bytes_read: p.bytes_read(&mine),
        tensors: mine.iter().map(|s| s.tensors.len()).sum(),
        shards: mine.len(),
        nonfinite,
        duration: started.elapsed(),
        plan: Some(plan.hash.clone()),
    };
    if marker.exists() {
        return Ok(summary(0));
    }
    partition::clear_part(&dir, &plan, part.index)?;
    let report = p.write(spec, &dir, &mine, progress, cancel)?;
    partition::write_marker(
        &dir,
        &PartMarker {
            plan: plan.hash.clone(),
            index: part.index,
            count: part.count,
            by: plan.by,
            pmad_version: env!("CARGO_PKG_VERSION").into(),
            nonfinite: report.count,
            files: report.files,
        },
        false,
    )?;
    Ok(summary(report.count))
}

/// Publish a merge whose parts were written by [`merge_part`] (with the same inputs and
/// options): find its staging directory, check every part, write the index, aux files and
/// `merge.json`, and rename it to `out`. Committing an output already published from the
/// same plan does nothing.
pub fn commit_parts(
    paths: &[PathBuf],
    spec: &MergeSpec,
    out: &Path,
    force: bool,
) -> Result<MergeSummary> {
    let started = Instant::now();
    let p = prepare(paths, spec, out)?;
    let root = p.parent.join(partition::STAGING_DIR);
    let prefix = format!("{}.", p.name);
    let mut candidates: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("list", &root, e)),
    };
    candidates.sort();
    // The plan each staging directory was written for, recomputed from this merge's inputs
    // and options with the count and split its markers name.
    let mut others = Vec::new();
    let mut found = None;
    for dir in &candidates {
        // The count and split from a marker, or from the record of a commit that stopped
        // after removing them.
        let (count, by) = match partition::any_marker(dir)? {
            Some(m) => (m.count, m.by),
            None => match MergeRecord::read(dir) {
                Ok(Some(MergeRecord {
                    partition: Some(r), ..
                })) => (r.count, r.by),
                _ => continue,
            },
        };
        let plan = p.partition_plan(spec, count, by)?;
        if plan.staging_dir(&p.parent, &p.name) == *dir {
            found = Some((dir.clone(), plan));
            break;
        }
        others.push(dir.display().to_string());
    }
    let summary = |out: PathBuf, plan: &PartitionPlan, nonfinite| MergeSummary {
        out,
        weights: p.weights.clone(),
        accumulator: p.accumulator,
        bytes_written: plan.shards.iter().map(|s| s.data_len as u64).sum(),
        bytes_read: 0,
        tensors: p.newest().tensors.len(),
        shards: plan.shards.len(),
        nonfinite,
        duration: started.elapsed(),
        plan: Some(plan.hash.clone()),
    };
    let Some((dir, plan)) = found else {
        // Already published from these inputs and options: nothing to do.
        if let Ok(Some(rec)) = MergeRecord::read(out) {
            if let Some(part) = &rec.partition {
                let plan = p.partition_plan(spec, part.count, part.by)?;
                if plan.hash == part.plan {
                    return Ok(summary(out.to_path_buf(), &plan, rec.nonfinite));
                }
            }
        }
        return Err(Error::Usage(format!(
            "no parts of {} to commit under {}{}: run `pmad merge --partition I/N` with the same \
             checkpoints and options first",
            out.display(),
            root.display(),
            if others.is_empty() {
                String::new()
            } else {
                format!(
                    " (parts of other merges, different inputs or options: {})",
                    others.join(", ")
                )
            }
        )));
    };
    // A commit that stopped after writing its record (and perhaps removing the markers) is
    // finished from the record: every file of the plan must be there, whole.
    if let Ok(Some(rec)) = MergeRecord::read(&dir) {
        if rec.partition.as_ref().is_some_and(|r| r.plan == plan.hash) {
            check_out(paths, out, force)?;
            partition::check_files(&dir, &plan)?;
            let out = partition::publish(&dir, &p.parent, &p.name, force)?;
            return Ok(summary(out, &plan, rec.nonfinite));
        }
    }
    let markers = match partition::check_parts(&dir, &plan, false)? {
        PartsState::Complete(m) => m,
        PartsState::Missing(missing) => {
            let list: Vec<String> = missing
                .iter()
                .map(|i| format!("{i}/{}", plan.count))
                .collect();
            return Err(Error::Usage(format!(
                "{}: parts {} of {} are not written yet; nothing published",
                dir.display(),
                list.join(", "),
                plan.count
            )));
        }
    };
    check_out(paths, out, force)?;
    partition::clear_commit(&dir, &plan)?;
    plan::write_index(&dir, &plan.shards)?;
    plan::write_aux(p.newest(), &dir)?;
    let nonfinite = markers.iter().map(|m| m.nonfinite).sum();
    let bytes = plan.shards.iter().map(|s| s.data_len as u64).sum();
    let mut record = p.record(spec, bytes, nonfinite);
    record.partition = Some(PartitionRecord::new(&plan, markers));
    record.write(&dir)?;
    let out = partition::publish(&dir, &p.parent, &p.name, force)?;
    Ok(summary(out, &plan, nonfinite))
}
