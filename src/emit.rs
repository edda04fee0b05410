//! Publishing a recipe's current average: plan, stream from the accumulators (or, for
//! `weights`, from the pinned members), aux files, merge.json, atomic rename, LATEST, retention.
//!
//! Invariants (reliability.md): `step-<N>/` appears only complete; LATEST is replaced only after
//! that and always names a complete output; retention deletes old outputs only after the new
//! one is published and never the one LATEST names.

use crate::checkpoint::Checkpoint;
use crate::engine::{self, MergeRecord, MergeSpec, Progress};
use crate::error::{Error, Result};
use crate::fsio;
use crate::merge::{Accumulator, FloatKind, Method};
use crate::publish::{self, Staging};
use crate::window::Window;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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

/// Output directory name for a step.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// The step of an output directory name (`step-<N>`): the inverse of [`step_dir_name`].
pub fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The step `<out_dir>/LATEST` names, if any.
pub fn latest_step(out_dir: &Path) -> Option<u64> {
    step_of(&publish::read_latest(out_dir)?)
}

/// Whether `<out_dir>/step-<step>` is an output whose merge.json records exactly `steps`.
pub fn published_as(out_dir: &Path, step: u64, steps: &[u64]) -> bool {
    std::fs::read(out_dir.join(step_dir_name(step)).join("merge.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<MergeRecord>(&b).ok())
        .is_some_and(|m| m.steps.iter().copied().eq(steps.iter().map(|x| Some(*x))))
}

/// Publish recipe `ri`'s current output. `paths` maps accepted steps to their directories (for
/// merge.json; EMA inputs may have been rotated away).
pub fn emit(
    window: &Window,
    ri: usize,
    paths: &BTreeMap<u64, PathBuf>,
    accumulator: Accumulator,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Emitted> {
    let started = Instant::now();
    let r = &window.recipes[ri];
    let steps = r.steps().to_vec();
    let step = *steps
        .last()
        .ok_or_else(|| Error::Usage(format!("recipe {}: nothing to publish", r.recipe.name)))?;
    let newest = window
        .ckpts
        .get(&step)
        .cloned()
        .ok_or_else(|| Error::Usage(format!("internal: step {step} is not pinned")))?;
    newest.verify()?;
    let tensors = engine::output_tensors(&newest, r.recipe.dtype)?;
    let opt_steps: Vec<Option<u64>> = steps.iter().map(|s| Some(*s)).collect();
    let mut meta = engine::header_metadata(&r.recipe.method, &opt_steps);
    meta.insert("pmad_recipe".into(), r.recipe.name.clone());
    let plan = publish::plan_shards(tensors, r.recipe.shard_size, &meta)?;
    let out_dir = &r.recipe.out_dir;
    let staging = Staging::new(out_dir, &step.to_string())?;
    let weights = r.weights();
    let nf = match &r.recipe.method {
        Method::Weights(_) => {
            let members: Vec<&Checkpoint> =
                steps
                    .iter()
                    .map(|s| {
                        window.ckpts.get(s).map(|c| c.as_ref()).ok_or_else(|| {
                            Error::Usage(format!("internal: step {s} is not pinned"))
                        })
                    })
                    .collect::<Result<_>>()?;
            let spec = MergeSpec {
                method: r.recipe.method.clone(),
                dtype: r.recipe.dtype,
                accumulator,
                shard_size: r.recipe.shard_size,
                allow_nonfinite: true,
                chunk_bytes: engine::DEFAULT_CHUNK_BYTES,
            };
            engine::merge_into(
                &members,
                &spec,
                &weights,
                staging.path(),
                &plan,
                progress,
                cancel,
            )?
        }
        method => {
            let acc = window
                .acc
                .as_ref()
                .ok_or_else(|| Error::Usage("internal: no accumulators".into()))?;
            // The sums are kept pre-scaled (RecipeState::sum_scale): they are the output.
            let (slot, divisor) = match method {
                Method::Wma => (r.slots.second, 1.0),
                _ => (r.slots.first, 1.0),
            };
            let slot = slot.ok_or_else(|| Error::Usage("internal: recipe has no slot".into()))?;
            let layout = acc.layout();
            let produce = |u: &engine::Unit, out: &mut [u8]| -> Result<engine::ChunkStat> {
                let t = &plan[u.shard].tensors[u.tensor];
                match FloatKind::of(t.dtype) {
                    Some(kind) => {
                        let i = layout
                            .tensors
                            .binary_search_by(|x| x.name.as_str().cmp(&t.name))
                            .map_err(|_| {
                                Error::Usage(format!("internal: {} not accumulated", t.name))
                            })?;
                        let ft = &layout.tensors[i];
                        acc.emit_into(
                            slot,
                            divisor,
                            ft.start + u.elems.start..ft.start + u.elems.end,
                            kind,
                            out,
                        );
                    }
                    None => {
                        let src = newest
                            .tensor(&t.name)
                            .ok_or_else(|| Error::Usage(format!("internal: {} missing", t.name)))?;
                        let sz = out.len() / u.elems.len().max(1);
                        let r = src.range.start + u.elems.start * sz
                            ..src.range.start + u.elems.end * sz;
                        out.copy_from_slice(newest.files[src.file].slice(r));
                    }
                }
                Ok(engine::ChunkStat::default())
            };
            let check = || newest.files.iter().try_for_each(|f| f.check_fd());
            engine::write_output(
                staging.path(),
                &plan,
                engine::DEFAULT_CHUNK_BYTES,
                produce,
                check,
                progress,
                cancel,
            )?
        }
    };
    publish::write_index(staging.path(), &plan)?;
    publish::write_aux(&newest, staging.path())?;
    // The bytes we read must still be what was validated (a truncation while reading shows
    // up here as a poisoned map or a changed descriptor). Accumulator-based outputs read only
    // the newest checkpoint (non-float tensors); `weights` outputs read every member.
    if matches!(r.recipe.method, Method::Weights(_)) {
        for s in &steps {
            if let Some(c) = window.ckpts.get(s) {
                c.check_fds()?;
            }
        }
    } else {
        newest.check_fds()?;
    }
    let bytes: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    let record = MergeRecord {
        pmad_version: env!("CARGO_PKG_VERSION").into(),
        recipe: Some(r.recipe.name.clone()),
        method: r.recipe.method.name().into(),
        alpha: match r.recipe.method {
            Method::Ema { alpha } => Some(alpha),
            _ => None,
        },
        weights,
        steps: opt_steps,
        inputs: steps
            .iter()
            .map(|s| {
                paths
                    .get(s)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            })
            .collect(),
        dtype: r.recipe.dtype.name().into(),
        accumulator: accumulator.name().into(),
        tensors: newest.tensors.len(),
        bytes,
        nonfinite: nf.count,
        created_unix: engine::unix_now(),
    };
    record.write(staging.path())?;
    let name = step_dir_name(step);
    let path = staging.commit(&name, true)?;
    if let Err(e) = publish::write_latest(out_dir, &name) {
        // LATEST still names the previous complete output. Do not leave a newer output that
        // nothing points at: abandon it, so a retry publishes it properly.
        let _ = std::fs::remove_dir_all(&path);
        let _ = fsio::sync_dir(out_dir);
        return Err(e);
    }
    let removed = retain(out_dir, r.recipe.keep, &name);
    Ok(Emitted {
        path,
        step,
        steps,
        bytes,
        duration: started.elapsed(),
        removed,
    })
}

/// Published outputs in `out_dir`, oldest step first.
pub fn outputs(out_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out_dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name();
                    let s = step_of(n.to_str()?)?;
                    e.path().is_dir().then(|| (s, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Delete the oldest outputs beyond `keep` (0 = keep all), never `latest`.
fn retain(out_dir: &Path, keep: usize, latest: &str) -> Vec<PathBuf> {
    if keep == 0 {
        return Vec::new();
    }
    let all = outputs(out_dir);
    let excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, p) in all.into_iter().take(excess) {
        if p.file_name().and_then(|n| n.to_str()) == Some(latest) {
            continue;
        }
        if std::fs::remove_dir_all(&p).is_ok() {
            removed.push(p);
        }
    }
    removed
}
