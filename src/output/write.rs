//! The writing pipeline: streams every shard of a plan into a directory with bounded memory.
//!
//! Owns the memory bound of writing. Work is batched by bytes, not by tensors: tensors are cut
//! into units of at most `chunk_bytes` of output, and consecutive small units of a shard are
//! packed into one task of at most `chunk_bytes` (a model of thousands of few-KB expert
//! tensors costs one task, one write and one check per 4 MiB, not per tensor). A batch of
//! `2 x threads` tasks is computed in parallel on rayon (by a producer the caller passes: an
//! average of pinned inputs, or the daemon's running sums) while the previous batch is
//! written, so at most two batches of output buffers exist at once
//! (`4 x threads x chunk_bytes`). Results do not depend on the batching: every element is
//! computed from the same inputs in the same order.
//!
//! Data is written with ordinary buffered writes, never through a writable map (a full disk
//! would be SIGBUS instead of ENOSPC), and each shard is fsynced when complete; writeback of
//! each batch is started as soon as it is written, so the final fsync finds little to do.

use super::plan::{OutTensor, ShardPlan};
use crate::error::{Error, Result};
use crate::fsio;
use rayon::prelude::*;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Default output bytes per unit of work.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// Progress counters shared with whoever displays them.
#[derive(Debug, Default)]
pub struct Progress {
    /// Output bytes written so far.
    pub written: AtomicU64,
    /// Output bytes in total.
    pub total: AtomicU64,
}

/// What a task produced besides its bytes: non-finite input values, per unit that held some.
#[derive(Debug, Default, Clone)]
pub struct ChunkStat {
    /// (index of the unit in the task, values found, the first input holding one (oldest = 0)).
    pub nonfinite: Vec<(usize, u64, Option<usize>)>,
}

impl ChunkStat {
    /// Record `count` non-finite values in unit `unit`, the first in input `first`.
    pub fn add(&mut self, unit: usize, count: u64, first: Option<usize>) {
        if count > 0 {
            self.nonfinite.push((unit, count, first));
        }
    }
}

/// A unit of work: a range of elements of one output tensor. A task is a run of units of one
/// shard whose output bytes follow each other.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Index of the shard.
    pub shard: usize,
    /// Index of the tensor within the shard's plan.
    pub tensor: usize,
    /// Element range within the tensor.
    pub elems: Range<usize>,
}

/// What a write produced: the files, and the non-finite values seen, by first tensor.
#[derive(Debug, Default, Clone)]
pub struct WriteReport {
    /// Total count of non-finite values.
    pub count: u64,
    /// Tensors holding non-finite values, in output order (first one first), with the first
    /// input index.
    pub tensors: Vec<(String, Option<usize>)>,
    /// Every file written, in plan order.
    pub files: Vec<WrittenFile>,
}

/// A file as written: what a reader on another node checks it against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrittenFile {
    /// File name inside the output directory.
    pub name: String,
    /// Size in bytes (header included).
    pub bytes: u64,
    /// XXH3-64 of the whole file, 16 lowercase hex digits.
    pub xxh3: String,
    /// SHA-256 of the whole file, lowercase hex, when the plan asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
) -> Result<WriteReport>
where
    P: Fn(&[Unit], &mut [u8]) -> Result<ChunkStat> + Sync,
    C: Fn() -> Result<()>,
{
    let total: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    progress.total.store(total, Ordering::Relaxed);
    let batch = (2 * rayon::current_num_threads()).max(2);
    let mut report = WriteReport::default();
    for (si, shard) in plan.iter().enumerate() {
        let mut writer = ShardWriter::create(dir, shard)?;
        let tasks = tasks_of(si, shard, chunk_bytes);
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut pending_tasks: &[Vec<Unit>] = &[];
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let flush =
            |bufs: &mut Vec<Vec<u8>>, done: &[Vec<Unit>], w: &mut ShardWriter| -> Result<()> {
                for (b, task) in bufs.iter_mut().zip(done) {
                    w.write_task(shard, task, b)?;
                    progress
                        .written
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            };
        for group in tasks.chunks(batch) {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            check()?;
            let mut bufs: Vec<Vec<u8>> = group
                .iter()
                .map(|task| {
                    let mut b = spare.pop().unwrap_or_default();
                    b.resize(task_bytes(shard, task), 0);
                    b
                })
                .collect();
            let (written, stats) = rayon::join(
                || flush(&mut pending, pending_tasks, &mut writer),
                || {
                    group
                        .par_iter()
                        .zip(bufs.par_iter_mut())
                        .map(|(task, b)| produce(task, b))
                        .collect::<Vec<Result<ChunkStat>>>()
                },
            );
            written?;
            for (task, s) in group.iter().zip(stats) {
                for (ui, count, first) in s?.nonfinite {
                    report.count += count;
                    let name = &shard.tensors[task[ui].tensor].name;
                    if report.tensors.last().map(|(n, _)| n) != Some(name) {
                        report.tensors.push((name.clone(), first));
                    }
                }
            }
            spare.append(&mut pending);
            pending = bufs;
            pending_tasks = group;
        }
        flush(&mut pending, pending_tasks, &mut writer)?;
        report.files.push(writer.finish()?);
    }
    Ok(report)
}

fn elem_size(t: &OutTensor) -> usize {
    (t.dtype.bitsize() / 8).max(1)
}

fn unit_bytes(shard: &ShardPlan, u: &Unit) -> usize {
    u.elems.len() * elem_size(&shard.tensors[u.tensor])
}

fn task_bytes(shard: &ShardPlan, task: &[Unit]) -> usize {
    task.iter().map(|u| unit_bytes(shard, u)).sum()
}

/// The shard's tasks in output order: each tensor cut into units of at most `chunk_bytes`,
/// consecutive units packed into tasks of at most `chunk_bytes` (a unit of that size is a task
/// of its own).
fn tasks_of(si: usize, shard: &ShardPlan, chunk_bytes: usize) -> Vec<Vec<Unit>> {
    let mut tasks: Vec<Vec<Unit>> = Vec::new();
    let mut cur: Vec<Unit> = Vec::new();
    let mut cur_bytes = 0;
    for (ti, t) in shard.tensors.iter().enumerate() {
        let n: usize = t.shape.iter().product();
        let per = (chunk_bytes / elem_size(t)).max(1);
        let mut s = 0;
        while s < n {
            let e = (s + per).min(n);
            let bytes = (e - s) * elem_size(t);
            if !cur.is_empty() && cur_bytes + bytes > chunk_bytes {
                tasks.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            cur.push(Unit {
                shard: si,
                tensor: ti,
                elems: s..e,
            });
            cur_bytes += bytes;
            s = e;
        }
    }
    if !cur.is_empty() {
        tasks.push(cur);
    }
    tasks
}

/// Each unit of `task` with its part of the task's output buffer.
pub fn split<'t, 'b>(
    shard: &'t ShardPlan,
    task: &'t [Unit],
    mut buf: &'b mut [u8],
) -> impl Iterator<Item = (&'t Unit, &'b mut [u8])> + use<'t, 'b> {
    task.iter().map(move |u| {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(unit_bytes(shard, u));
        buf = rest;
        (u, head)
    })
}

/// Streams one output file: the header first, then tensor bytes in plan order, filling in
/// the plan's CRC32 fields on the way.
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    expected: usize,
    written: usize,
    header_len: usize,
    hash: xxhash_rust::xxh3::Xxh3,
    sha256: Option<sha2::Sha256>,
    crc: CrcState,
}

/// The CRC32s of a shard's checked tensors as their bytes go by.
#[derive(Default)]
struct CrcState {
    /// Per tensor of the shard: its running CRC while its bytes are written, `None` for a
    /// tensor no field checks.
    running: Vec<Option<crc32fast::Hasher>>,
    /// Per tensor: its CRC once its last byte was written.
    done: Vec<Option<u32>>,
    /// The fields, sorted by offset, and the first not yet written.
    fields: Vec<super::plan::CrcField>,
    next: usize,
}

impl ShardWriter {
    /// Create the file and write its header.
    pub fn create(dir: &Path, plan: &ShardPlan) -> Result<ShardWriter> {
        let path = dir.join(&plan.file_name);
        fsio::create_parents(dir, &plan.file_name)?;
        let mut file = fsio::create(&path)?;
        fsio::write_all(&mut file, &path, &plan.header)?;
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        hash.update(&plan.header);
        let mut crc = CrcState::default();
        if !plan.crc.is_empty() {
            crc.running = vec![None; plan.tensors.len()];
            crc.done = vec![None; plan.tensors.len()];
            for f in &plan.crc {
                crc.running[f.tensor] = Some(crc32fast::Hasher::new());
                if plan.tensors[f.tensor].bytes() == 0 {
                    // No unit will carry its (no) bytes.
                    crc.done[f.tensor] = Some(crc32fast::Hasher::new().finalize());
                }
            }
            crc.fields = plan.crc.clone();
        }
        let sha256 = plan.sha256.then(|| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(&plan.header);
            h
        });
        Ok(ShardWriter {
            sha256,
            hash,
            header_len: plan.header.len(),
            path,
            file,
            expected: plan.data_len,
            written: 0,
            crc,
        })
    }

    /// Append the bytes of `task` (a run of units of `plan`, in order), first updating the
    /// CRC32s of checked tensors and filling in the CRC32 fields that fall inside `buf` (each
    /// comes after the tensor it checks, so its value is known by then).
    pub fn write_task(&mut self, plan: &ShardPlan, task: &[Unit], buf: &mut [u8]) -> Result<()> {
        if self.crc.fields.is_empty() {
            return self.write(buf);
        }
        let start = self.header_len + self.written;
        for (u, bytes) in split(plan, task, buf) {
            if let Some(h) = self.crc.running[u.tensor].as_mut() {
                h.update(bytes);
                if u.elems.end == plan.tensors[u.tensor].shape.iter().product::<usize>() {
                    let h = self.crc.running[u.tensor].take().unwrap_or_default();
                    self.crc.done[u.tensor] = Some(h.finalize());
                }
            }
        }
        let end = start + buf.len();
        while let Some(f) = self.crc.fields.get(self.crc.next) {
            if f.at >= end {
                break;
            }
            let crc = self.crc.done[f.tensor].ok_or_else(|| {
                Error::Internal(format!(
                    "{}: the CRC32 field at {} precedes the end of the bytes it checks",
                    self.path.display(),
                    f.at
                ))
            })?;
            // The field may straddle two writes: fill in the bytes that fall in this one.
            for (i, b) in crc.to_le_bytes().into_iter().enumerate() {
                let at = f.at + i;
                if at >= start && at < end {
                    buf[at - start] = b;
                }
            }
            if f.at + 4 <= end {
                self.crc.next += 1;
            } else {
                break;
            }
        }
        self.write(buf)
    }

    /// Append tensor bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.written + bytes.len() > self.expected {
            return Err(Error::Internal(format!(
                "{}: more tensor bytes than the header declares",
                self.path.display()
            )));
        }
        fsio::write_all(&mut self.file, &self.path, bytes)?;
        self.hash.update(bytes);
        if let Some(h) = self.sha256.as_mut() {
            sha2::Digest::update(h, bytes);
        }
        // Start writeback of what was just written, so the fsync in `finish` finds little
        // left to do: the disk writes batch N while batch N+1 is computed.
        fsio::start_writeback(
            &self.file,
            (self.header_len + self.written) as u64,
            bytes.len(),
        );
        self.written += bytes.len();
        Ok(())
    }

    /// Check the byte count against the header and fsync.
    pub fn finish(self) -> Result<WrittenFile> {
        if self.crc.next != self.crc.fields.len() {
            return Err(Error::Internal(format!(
                "{}: {} CRC32 field(s) were not written",
                self.path.display(),
                self.crc.fields.len() - self.crc.next
            )));
        }
        if self.written != self.expected {
            return Err(Error::Internal(format!(
                "{}: wrote {} tensor bytes, header declares {}",
                self.path.display(),
                self.written,
                self.expected
            )));
        }
        fsio::sync_file(&self.file, &self.path)?;
        Ok(WrittenFile {
            name: self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: (self.header_len + self.written) as u64,
            xxh3: format!("{:016x}", self.hash.digest()),
            sha256: self.sha256.map(|h| {
                sha2::Digest::finalize(h)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }),
        })
    }
}

/// For an input with Megatron's `integrity.json`: write the output's own into `dir`, after
/// every other file of the output (except `merge.json`) was written: the SHA-256 of each data
/// file as the writer streamed it (`files`) and of each copied file. Megatron lists every file
/// of the directory but the manifest itself.
pub fn write_integrity(
    c: &crate::format::Checkpoint,
    dir: &Path,
    files: &[WrittenFile],
) -> Result<()> {
    use sha2::Digest;
    if !c.dcp.as_ref().is_some_and(|d| d.integrity) {
        return Ok(());
    }
    let mut manifest = std::collections::BTreeMap::new();
    for f in files {
        let h = f
            .sha256
            .clone()
            .ok_or_else(|| Error::Internal(format!("{}: written without its SHA-256", f.name)))?;
        manifest.insert(f.name.clone(), h);
    }
    for (name, bytes) in &c.aux {
        if !name.contains('/') {
            let h = sha2::Sha256::digest(bytes);
            manifest.insert(name.clone(), h.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
    let v = serde_json::json!({ "algorithm": "sha256", "files": manifest });
    let mut out = serde_json::to_vec_pretty(&v)
        .map_err(|e| Error::Internal(format!("integrity.json: {e}")))?;
    out.push(b'\n');
    fsio::write_file(&dir.join(crate::format::dcp::INTEGRITY), &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::plan::{shard_plan, OutTensor};
    use safetensors::Dtype;
    use std::collections::BTreeMap;

    fn shard(sizes: &[usize]) -> ShardPlan {
        let ts = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| OutTensor {
                raw: None,
                name: format!("t{i:03}"),
                dtype: Dtype::BF16,
                shape: vec![*n],
            })
            .collect();
        shard_plan(ts, "s.safetensors".into(), &BTreeMap::new()).unwrap()
    }

    #[test]
    fn small_tensors_are_packed_and_large_ones_cut_by_bytes() {
        // 100 tensors of 2 KB, one of 10 KB, with 8 KB tasks.
        let mut sizes = vec![1000; 100];
        sizes.push(5000);
        let s = shard(&sizes);
        let tasks = tasks_of(0, &s, 8000);
        for t in &tasks {
            assert!(task_bytes(&s, t) <= 8000, "{t:?}");
        }
        // 2 KB units: four per task; the big tensor: 8 KB + 2 KB units.
        assert_eq!(tasks.len(), 25 + 2);
        // Every element of every tensor exactly once, in output order.
        let units: Vec<&Unit> = tasks.iter().flatten().collect();
        let mut next = vec![0usize; s.tensors.len()];
        let mut last = 0;
        for u in units {
            assert!(u.tensor >= last);
            last = u.tensor;
            assert_eq!(u.elems.start, next[u.tensor]);
            next[u.tensor] = u.elems.end;
        }
        let want: Vec<usize> = s.tensors.iter().map(|t| t.shape[0]).collect();
        assert_eq!(next, want);
        // split hands each unit its own bytes of the task buffer, in order.
        let t = &tasks[0];
        let mut buf = vec![0u8; task_bytes(&s, t)];
        for (k, (u, b)) in split(&s, t, &mut buf).enumerate() {
            assert_eq!(b.len(), u.elems.len() * 2);
            b.fill(k as u8 + 1);
        }
        assert_eq!(buf[0], 1);
        assert_eq!(buf[buf.len() - 1], t.len() as u8);
    }
}
