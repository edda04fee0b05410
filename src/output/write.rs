//! The writing pipeline: streams every shard of a plan into a directory with bounded memory.
//!
//! Owns the memory bound of writing. Tensors are cut into units of at most `chunk_bytes` of
//! output; a batch of `2 x threads` units is computed in parallel on rayon (by a producer the
//! caller passes: an average of pinned inputs, or the daemon's running sums) while the previous
//! batch is written, so at most two batches of output buffers exist at once
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
    P: Fn(&Unit, &mut [u8]) -> Result<ChunkStat> + Sync,
    C: Fn() -> Result<()>,
{
    let total: u64 = plan.iter().map(|s| s.data_len as u64).sum();
    progress.total.store(total, Ordering::Relaxed);
    let batch = (2 * rayon::current_num_threads()).max(2);
    let mut report = WriteReport::default();
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
        report.files.push(writer.finish()?);
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

/// Streams one safetensors file: the header first, then tensor bytes in plan order.
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    expected: usize,
    written: usize,
    header_len: usize,
    hash: xxhash_rust::xxh3::Xxh3,
}

impl ShardWriter {
    /// Create the file and write its header.
    pub fn create(dir: &Path, plan: &ShardPlan) -> Result<ShardWriter> {
        let path = dir.join(&plan.file_name);
        let mut file = fsio::create(&path)?;
        fsio::write_all(&mut file, &path, &plan.header)?;
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        hash.update(&plan.header);
        Ok(ShardWriter {
            hash,
            header_len: plan.header.len(),
            path,
            file,
            expected: plan.data_len,
            written: 0,
        })
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
        })
    }
}
