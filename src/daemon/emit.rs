//! Publishing a recipe's current average: plan the output, stream it from the running sums
//! (or, for `weights`, from the pinned members), add the aux files and `merge.json`, and hand
//! it to the recipe's [`OutDir`] to publish atomically.
//!
//! Invariant: the bytes read must still be the validated ones when the output is published
//! (the newest checkpoint's descriptors, or every member's for `weights`, are re-checked after
//! the write); otherwise nothing is published.

use super::spike::Onset;
use super::window::{Source, Window};
use crate::config::Recipe;
use crate::error::IoContext;
use crate::error::{Error, Result};
use crate::format::Checkpoint;
use crate::math::kinds::{Accumulator, FloatKind, OutDtype};
use crate::math::Method;
use crate::output::average::{write_average, Averaging, DEFAULT_MEMORY_BUDGET};
use crate::output::partition::{self, PartMarker, PartitionPlan, PartsState, Share};
use crate::output::record::PartitionRecord;
use crate::output::record::{unix_now, MergeRecord};
use crate::output::write::{self, ChunkStat, Progress, Unit, WriteReport, DEFAULT_CHUNK_BYTES};
use crate::output::{plan, OutDir};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A published output.
#[derive(Debug, Clone)]
pub struct Emitted {
    /// Final path (`<out_dir>/step-<N>`).
    pub path: PathBuf,
    /// Newest step in it.
    pub step: u64,
    /// Steps averaged, oldest first.
    pub steps: Vec<u64>,
    /// Tensor data bytes written.
    pub bytes: u64,
    /// Wall time.
    pub duration: Duration,
    /// Old outputs removed by retention.
    pub removed: Vec<PathBuf>,
}

/// Publish recipe `ri` (configured as `recipe`, publishing into `out`). `paths` maps accepted
/// steps to their directories (for merge.json; an EMA's inputs may have been rotated away).
/// Runs on the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    window: &Window,
    ri: usize,
    recipe: &Recipe,
    out: &OutDir,
    paths: &BTreeMap<u64, PathBuf>,
    share: Option<Share>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Emission> {
    let step = *window.held(ri).last().ok_or_else(|| {
        Error::Internal(format!(
            "recipe {}: emission with nothing held",
            recipe.name
        ))
    })?;
    let o = window.output(ri).ok_or_else(|| Error::SourceChanged {
        path: paths
            .get(&step)
            .cloned()
            .unwrap_or_else(|| out.path().into()),
        detail: format!(
            "checkpoint of step {step} was deleted before its average was published; \
             publishing resumes with the next checkpoint"
        ),
    })?;
    publish(
        Average {
            label: &recipe.name,
            method: &recipe.method,
            dtype: recipe.dtype,
            shard_size: recipe.shard_size,
            keep: recipe.keep,
            accumulator: window.accumulator(),
            steps: o.steps,
            weights: &o.weights,
            newest: o.newest,
            source: o.source,
            extra: None,
        },
        out,
        paths,
        share,
        progress,
        cancel,
    )
}

/// One output to publish: which checkpoints, how they are averaged, and where the values
/// come from.
struct Average<'a> {
    /// The recipe name (`merge.json`, `pmad_recipe`).
    label: &'a str,
    method: &'a Method,
    dtype: OutDtype,
    shard_size: u64,
    keep: usize,
    accumulator: Accumulator,
    /// Steps averaged, oldest first, and their weights.
    steps: &'a [u64],
    weights: &'a [f64],
    /// The newest input: non-float tensors and aux files come from it.
    newest: &'a Arc<Checkpoint>,
    source: Source<'a>,
    /// One more file to write into the output (name, bytes).
    extra: Option<(&'a str, Vec<u8>)>,
}

/// What an emission did.
pub enum Emission {
    /// The whole output was published.
    Published(Emitted),
    /// This instance's part was written into the shared staging directory; the output is
    /// published once every part is there (see [`commit`]).
    Part(Box<PartWritten>),
}

/// A part written (or found already written) for an output that is not published yet.
pub struct PartWritten {
    /// Newest step averaged (the output's `step-<N>`).
    pub step: u64,
    /// Steps averaged, oldest first.
    pub steps: Vec<u64>,
    /// The shared staging directory.
    pub dir: PathBuf,
    /// The plan the part belongs to.
    pub plan: PartitionPlan,
    /// `merge.json` without its `partition` record (the committer adds it).
    pub record: MergeRecord,
    /// The newest input: its aux files go into the output.
    pub newest: Arc<Checkpoint>,
    /// Tensor data bytes this instance wrote.
    pub bytes: u64,
    /// Whether the part was already there (written before a restart).
    pub reused: bool,
    /// Wall time.
    pub duration: Duration,
}

/// Plan, stream, record and publish an average as `<out>/step-<newest step>`; or, with a
/// `share`, write this instance's part of it into the shared staging directory.
fn publish(
    a: Average<'_>,
    out: &OutDir,
    paths: &BTreeMap<u64, PathBuf>,
    share: Option<Share>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Emission> {
    let started = Instant::now();
    let step = *a
        .steps
        .last()
        .ok_or_else(|| Error::Internal(format!("{}: an average of nothing", a.label)))?;
    let newest = a.newest;
    newest.verify()?;
    let tensors = plan::output_tensors(newest, a.dtype)?;
    let opt_steps: Vec<Option<u64>> = a.steps.iter().map(|s| Some(*s)).collect();
    let mut meta = plan::header_metadata(a.method, &opt_steps);
    meta.insert("pmad_recipe".into(), a.label.to_string());
    let record = |bytes: u64, nonfinite: u64| MergeRecord {
        pmad_version: env!("CARGO_PKG_VERSION").into(),
        recipe: Some(a.label.to_string()),
        method: a.method.kind(),
        alpha: a.method.alpha(),
        shape: a.method.schedule().map(|s| s.0),
        final_lr_ratio: a.method.schedule().map(|s| s.1),
        weights: a.weights.to_vec(),
        steps: opt_steps.clone(),
        inputs: input_paths(a.steps, paths),
        dtype: a.dtype,
        accumulator: a.accumulator,
        tensors: newest.tensors.len(),
        bytes,
        nonfinite,
        created_unix: unix_now(),
        partition: None,
    };
    if let Some(share) = share {
        if newest.dcp.is_some() {
            return Err(Error::Usage(format!(
                "{}: splitting a DCP output between instances is not supported yet; run one \
                 pmad for DCP checkpoints (partition.count = 1)",
                a.label
            )));
        }
        // Everything that decides the bytes beyond the headers: which inputs, their weights,
        // the accumulator. Instances that disagree on any of it get different plans.
        let mut identity = Vec::new();
        for (s, w) in a.steps.iter().zip(a.weights) {
            identity.extend_from_slice(&s.to_le_bytes());
            identity.extend_from_slice(&w.to_bits().to_le_bytes());
        }
        identity.extend_from_slice(a.accumulator.name().as_bytes());
        let plan = PartitionPlan::new(
            tensors,
            a.shard_size,
            &meta,
            share.part.count,
            share.by,
            &identity,
        )?;
        // Marker mode writes the part in place, under the output's own name.
        let in_place = out.is_in_place();
        let dir = if in_place {
            out.step_path(step)
        } else {
            plan.staging_dir(out.path(), &out.step_name(step))
        };
        let mine = plan.shards_of(share.part.index);
        let bytes: u64 = mine.iter().map(|s| s.data_len as u64).sum();
        let marker = dir.join(partition::marker_name(share.part.index, share.part.count));
        let total: u64 = plan.shards.iter().map(|s| s.data_len as u64).sum();
        let written = |reused| PartWritten {
            step,
            steps: a.steps.to_vec(),
            dir: dir.clone(),
            plan: plan.clone(),
            record: record(total, 0),
            newest: a.newest.clone(),
            bytes,
            reused,
            duration: started.elapsed(),
        };
        if in_place && out.is_committed(&dir) {
            if same_plan(&dir, &plan.hash) {
                return Ok(Emission::Part(Box::new(written(true))));
            }
            // Replacing it would mean unpublishing it first; decided: never in marker mode.
            return Err(Error::invalid(
                &dir,
                "already published under another plan (an earlier run with other inputs, \
                 options or pmad version); marker mode never rewrites a published output: \
                 remove it to have it made again",
            ));
        }
        if marker.exists() && (!in_place || same_marker(&marker, &plan.hash)) {
            return Ok(Emission::Part(Box::new(written(true))));
        }
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        partition::clear_part(&dir, &plan, share.part.index)?;
        let report = write_values(&a, &dir, &mine, progress, cancel)?;
        partition::write_marker(
            &dir,
            &PartMarker {
                plan: plan.hash.clone(),
                index: share.part.index,
                count: share.part.count,
                by: plan.by,
                pmad_version: env!("CARGO_PKG_VERSION").into(),
                nonfinite: report.count,
                files: report.files,
            },
            in_place,
        )?;
        return Ok(Emission::Part(Box::new(written(false))));
    }
    let shards = plan::plan_output(newest, tensors, a.shard_size, &meta)?;
    let staging = out.stage(step)?;
    let nf = write_values(&a, staging.path(), &shards, progress, cancel)?;
    plan::write_index(staging.path(), &shards)?;
    plan::write_aux(newest, staging.path())?;
    crate::output::write::write_integrity(newest, staging.path(), &nf.files)?;
    let bytes: u64 = shards.iter().map(|s| s.data_len as u64).sum();
    record(bytes, nf.count).write(staging.path())?;
    if let Some((name, bytes)) = &a.extra {
        crate::fsio::write_file(&staging.path().join(name), bytes)?;
    }
    let published = out.publish(staging, step, a.keep)?;
    Ok(Emission::Published(Emitted {
        path: published.path,
        step,
        steps: a.steps.to_vec(),
        bytes,
        duration: started.elapsed(),
        removed: published.removed,
    }))
}

/// What the committer found for a part's output.
pub enum Committed {
    /// Published now, by this instance.
    Published(Emitted),
    /// Already published with this plan (by another instance, or before a restart).
    Already(PathBuf),
    /// Not every part is there yet: these instances' parts are missing.
    Waiting(Vec<usize>),
    /// Every part is there, but this instance may not commit yet (`takeover_after`).
    NotMine,
    /// The staging directory is gone and the output was not published with this plan:
    /// another instance abandoned the step.
    Gone,
}

/// Look at the output a part belongs to and, if every part is there and `may_commit`,
/// publish it: assemble it in a directory of this instance's own (hard links to the parts,
/// the index, the aux files of the newest input and `merge.json` with every part's files and
/// checksums), rename that to `step-<N>` — if two instances commit at once, the first rename
/// wins and the other fails harmlessly — move `LATEST` if `N` is newer, and apply `keep`.
/// Any failure leaves the staging directory for a retry; nothing partial is published.
pub fn commit(
    part: &PartWritten,
    out: &OutDir,
    keep: usize,
    index: usize,
    may_commit: bool,
) -> Result<Committed> {
    let started = Instant::now();
    let published = out.step_path(part.step);
    let in_place = out.is_in_place();
    let same = |dir: &std::path::Path| same_plan(dir, &part.plan.hash);
    if out.is_committed(&published) && same(&published) {
        // Published by another instance; if it died before moving LATEST, move it now.
        out.advance_latest(part.step)?;
        return Ok(Committed::Already(published));
    }
    if !part.dir.is_dir() {
        return Ok(Committed::Gone);
    }
    let markers = match partition::check_parts(&part.dir, &part.plan, in_place)? {
        PartsState::Missing(m) => return Ok(Committed::Waiting(m)),
        PartsState::Complete(m) => m,
    };
    if !may_commit {
        return Ok(Committed::NotMine);
    }
    let mut record = part.record.clone();
    record.nonfinite = markers.iter().map(|m| m.nonfinite).sum();
    record.created_unix = unix_now();
    record.partition = Some(PartitionRecord::new(&part.plan, markers));
    let finish = |dir: &std::path::Path| {
        plan::write_index(dir, &part.plan.shards)?;
        plan::write_aux(&part.newest, dir)?;
        record.write(dir)
    };
    if in_place {
        let p = out.publish_in_place(
            part.step,
            keep,
            |dir| {
                // What an interrupted commit left (index, aux, merge.json) is written again.
                partition::clear_commit(dir, &part.plan)?;
                finish(dir)
            },
            |dir| {
                partition::check_files(dir, &part.plan)?;
                if same(dir) {
                    Ok(())
                } else {
                    Err(Error::invalid(
                        &dir.join(crate::output::record::RECORD_FILE),
                        "changed while the output was being committed",
                    ))
                }
            },
        )?;
        let Some(p) = p else {
            return Ok(Committed::Already(published));
        };
        // The markers stay: an instance restarted just now may be deciding whether its part
        // of this step is written, and finds it by its marker (without it, it would write
        // the part again inside the published output).
        return Ok(Committed::Published(Emitted {
            path: p.path,
            step: part.step,
            steps: part.steps.clone(),
            bytes: record.bytes,
            duration: started.elapsed(),
            removed: p.removed,
        }));
    }
    let built = partition::assemble(&part.dir, &part.plan, index, finish)?;
    let p = match out.publish_parts(&built, part.step, keep, same) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Committed::Already(published)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&built);
            return Err(e);
        }
    };
    // The parts are published (linked); their staging directory goes.
    let _ = std::fs::remove_dir_all(&part.dir);
    Ok(Committed::Published(Emitted {
        path: p.path,
        step: part.step,
        steps: part.steps.clone(),
        bytes: record.bytes,
        duration: started.elapsed(),
        removed: p.removed,
    }))
}

/// Whether `dir/merge.json` records an output of the plan `hash`.
fn same_plan(dir: &std::path::Path, hash: &str) -> bool {
    matches!(MergeRecord::read(dir), Ok(Some(r))
        if r.partition.as_ref().is_some_and(|p| p.plan == hash))
}

/// Whether the marker at `path` is whole and of the plan `hash` (marker mode, where markers
/// of other plans may sit under the same name).
fn same_marker(path: &std::path::Path, hash: &str) -> bool {
    std::fs::read(path).is_ok_and(|b| {
        b.ends_with(b"\n") && serde_json::from_slice::<PartMarker>(&b).is_ok_and(|m| m.plan == hash)
    })
}

/// Stream the averaged values of `shards` into `dir`, then check that the bytes read were
/// still the validated ones (a truncation while reading shows up as a poisoned map or a
/// changed descriptor). Sums-based outputs read only the newest checkpoint (non-float
/// tensors); averages of members read every member.
fn write_values(
    a: &Average<'_>,
    dir: &std::path::Path,
    shards: &[plan::ShardPlan],
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<WriteReport> {
    let newest = a.newest;
    let report = match &a.source {
        Source::Members(members) => {
            let how = Averaging {
                weights: a.weights,
                accumulator: a.accumulator,
                fix_nonfinite: true,
                chunk_bytes: DEFAULT_CHUNK_BYTES,
                memory_budget: DEFAULT_MEMORY_BUDGET,
            };
            write_average(members, &how, dir, shards, progress, cancel)?
        }
        Source::Sums { acc, slot } => {
            // The sums are kept pre-scaled: they are the output.
            let (acc, slot) = (*acc, *slot);
            let layout = acc.layout();
            // Where each output tensor's bytes come from, resolved once (not per unit): raw
            // bytes of the newest input's file, the sums, or the newest input's tensor.
            enum From<'c> {
                Raw(&'c crate::format::SourceFile, usize),
                Sums(usize, FloatKind),
                Copy(&'c crate::format::Tensor),
            }
            let from: Vec<Vec<From<'_>>> = shards
                .iter()
                .map(|s| {
                    s.tensors
                        .iter()
                        .map(|t| {
                            if let Some(raw) = &t.raw {
                                return Ok(From::Raw(&newest.files[raw.file], raw.range.start));
                            }
                            let src = newest.tensor(&t.name);
                            let averaged = src.is_some_and(|s| FloatKind::of_tensor(s).is_some());
                            if let Some(kind) = FloatKind::of(t.dtype).filter(|_| averaged) {
                                let i = layout
                                    .tensors
                                    .binary_search_by(|x| x.name.as_str().cmp(&t.name))
                                    .map_err(|_| {
                                        Error::Internal(format!(
                                            "tensor {} is not accumulated",
                                            t.name
                                        ))
                                    })?;
                                return Ok(From::Sums(i, kind));
                            }
                            src.map(From::Copy).ok_or_else(|| {
                                Error::Internal(format!(
                                    "tensor {} is not in the newest input",
                                    t.name
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?;
            let produce_unit = |u: &Unit, buf: &mut [u8]| -> Result<()> {
                match &from[u.shard][u.tensor] {
                    From::Raw(f, start) => {
                        buf.copy_from_slice(f.slice(start + u.elems.start..start + u.elems.end));
                    }
                    From::Sums(i, kind) => {
                        let ft = &layout.tensors[*i];
                        acc.emit_into(
                            slot,
                            1.0,
                            ft.start + u.elems.start..ft.start + u.elems.end,
                            *kind,
                            buf,
                        );
                    }
                    From::Copy(src) => {
                        let sz = buf.len() / u.elems.len().max(1);
                        let r = src.range.start + u.elems.start * sz
                            ..src.range.start + u.elems.end * sz;
                        buf.copy_from_slice(newest.files[src.file].slice(r));
                    }
                }
                Ok(())
            };
            let produce = |task: &[Unit], buf: &mut [u8]| -> Result<ChunkStat> {
                let shard = &shards[task[0].shard];
                for (u, b) in write::split(shard, task, buf) {
                    produce_unit(u, b)?;
                }
                Ok(ChunkStat::default())
            };
            let check = || newest.files.iter().try_for_each(|f| f.check_fd());
            write::write_output(
                dir,
                shards,
                DEFAULT_CHUNK_BYTES,
                produce,
                check,
                progress,
                cancel,
            )?
        }
    };
    match &a.source {
        Source::Members(members) => members.iter().try_for_each(|c| c.check_fds())?,
        Source::Sums { .. } => newest.check_fds()?,
    }
    Ok(report)
}

/// File name of the rescue record inside a rescue output.
pub const RESCUE_FILE: &str = "rescue.json";

/// `rescue.json`: why a rescue output exists and how to use it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RescueRecord {
    /// pmad version that wrote it.
    pub pmad_version: String,
    /// The step of the first spiking value.
    pub onset_step: u64,
    /// The series it was seen in.
    pub series: String,
    /// That value (null when not finite).
    pub value: f64,
    /// Its robust z-score (null when infinite).
    pub z: f64,
    /// The median of the healthy values it was judged against.
    pub median: f64,
    /// Their robust scale (1.4826 · MAD).
    pub scale: f64,
    /// The checkpoint whose `trainer_state.json` showed the spike.
    pub detected_at_step: u64,
    /// The checkpoints averaged (steps before the onset), oldest first.
    pub steps: Vec<u64>,
    /// Their directories.
    pub inputs: Vec<String>,
    /// The step to restart training from: the newest checkpoint averaged (its optimizer
    /// and data-loader state go with these weights).
    pub restart_from: u64,
    /// The series' last values up to the spike: (step, value), oldest first.
    pub values: Vec<(u64, f64)>,
    /// Seconds since the epoch when published.
    pub created_unix: u64,
}

/// Publish a rescue: the SMA of the pinned checkpoints `steps` (the last ones before the
/// spike), as `<out>/step-<newest>` with `merge.json` and `rescue.json`. Runs on the current
/// rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn emit_rescue(
    window: &Window,
    steps: &[u64],
    out: &OutDir,
    paths: &BTreeMap<u64, PathBuf>,
    onset: &Onset,
    detected_at: u64,
    values: Vec<(u64, f64)>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Emitted> {
    let members: Vec<&crate::format::Checkpoint> = steps
        .iter()
        .map(|s| {
            window
                .pinned(*s)
                .map(|c| c.as_ref())
                .ok_or_else(|| Error::Internal(format!("rescue step {s} is not pinned")))
        })
        .collect::<Result<_>>()?;
    let (Some(&step), Some(newest)) = (steps.last(), steps.last().and_then(|s| window.pinned(*s)))
    else {
        return Err(Error::Internal("a rescue of no checkpoints".into()));
    };
    let method = Method::Sma;
    let weights = method
        .weights(members.len())
        .map_err(|e| Error::Internal(format!("rescue weights: {e}")))?;
    let dtype = OutDtype::Source;
    let kinds = || newest.tensors.iter().filter_map(|t| FloatKind::of(t.dtype));
    let record = RescueRecord {
        pmad_version: env!("CARGO_PKG_VERSION").into(),
        onset_step: onset.step,
        series: onset.series.clone(),
        value: onset.value,
        z: onset.z,
        median: onset.median,
        scale: onset.scale,
        detected_at_step: detected_at,
        steps: steps.to_vec(),
        inputs: input_paths(steps, paths),
        restart_from: step,
        values,
        created_unix: unix_now(),
    };
    let mut json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    json.push(b'\n');
    publish(
        Average {
            label: "rescue",
            method: &method,
            dtype,
            // The recipes' default shard size (a rescue has no recipe); every rescue is kept.
            shard_size: 5_000_000_000,
            keep: 0,
            accumulator: if dtype.writes_wide(kinds()) {
                Accumulator::F64
            } else {
                Accumulator::F32
            },
            steps,
            weights: &weights,
            newest,
            source: Source::Members(members),
            extra: Some((RESCUE_FILE, json)),
        },
        out,
        paths,
        None,
        progress,
        cancel,
    )
    .and_then(|e| match e {
        Emission::Published(e) => Ok(e),
        Emission::Part(_) => Err(Error::Internal("a rescue written as a part".into())),
    })
}

/// The directories of `steps` as recorded in `merge.json` and `rescue.json` (empty for a step
/// whose directory is no longer known).
fn input_paths(steps: &[u64], paths: &BTreeMap<u64, PathBuf>) -> Vec<String> {
    steps
        .iter()
        .map(|s| {
            paths
                .get(s)
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect()
}
