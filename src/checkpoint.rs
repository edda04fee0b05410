//! Opening a checkpoint: validated, pinned, memory-mapped safetensors files and their catalog.
//!
//! Owns the invariant "once you hold a [`Checkpoint`], it is valid and pinned": every file
//! passed [`crate::header`]'s checks and the reference reader, the index (if any) names only
//! plain files inside the directory and agrees with the shard headers, each file is open and
//! mapped read-only, and its (dev, ino, size, mtime) fingerprint was recorded. Before reading,
//! callers re-check with [`Checkpoint::verify`] (path and descriptor) and, per chunk batch,
//! [`SourceFile::check_fd`] (descriptor only, one `fstat`): a file that shrank is never read
//! through its map, since touching a truncated map raises SIGBUS.

use crate::error::{Error, IoContext, Result};
use crate::header::{self, dtype_name, HeaderError};
use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Single-file weights name in an HF checkpoint directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Shard index name in an HF checkpoint directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files copied from the newest input into a merged output (formats.md). Optimizer, scheduler,
/// RNG and trainer state are never copied.
pub const AUX_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "preprocessor_config.json",
];

/// Identity of a file's contents as far as the filesystem tells: if any field changes, the
/// file is not the one that was validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl Fingerprint {
    /// Fingerprint from file metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }

    /// Which field differs from `other`, for messages.
    pub fn diff(&self, other: &Fingerprint) -> Option<String> {
        if self.dev != other.dev || self.ino != other.ino {
            Some("replaced by another file".into())
        } else if self.size != other.size {
            Some(format!("size {} -> {}", self.size, other.size))
        } else if self.mtime_ns != other.mtime_ns {
            Some("modified".into())
        } else {
            None
        }
    }
}

/// One validated safetensors file, open and mapped read-only.
#[derive(Debug)]
pub struct SourceFile {
    /// Where it was opened.
    pub path: PathBuf,
    /// Its fingerprint when validated.
    pub fingerprint: Fingerprint,
    /// The header's `__metadata__`.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Where the data section starts (8 + N).
    pub data_start: usize,
    /// Keeps the inode alive (unlinking by the trainer cannot pull the data away).
    file: File,
    /// SIGBUS protection of the map (declared before `map`: unregistered before unmapping).
    guard: Option<crate::sigbus::Guard>,
    /// `None` for a file whose data section is empty (mapping zero bytes is an error).
    map: Option<Mmap>,
}

/// What [`SourceFile::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Path and descriptor still match the fingerprint.
    Same,
    /// The path is gone (deleted or rotated away) but the pinned descriptor is intact.
    Unlinked,
}

impl SourceFile {
    /// Open, validate and map one safetensors file.
    pub fn open(path: &Path) -> Result<SourceFile> {
        let file = File::open(path).ctx("open", path)?;
        let meta = file.metadata().ctx("stat", path)?;
        if !meta.is_file() {
            return Err(Error::invalid(path, "not a regular file"));
        }
        let fingerprint = Fingerprint::of(&meta);
        let len = fingerprint.size;
        // Read the header with pread, not through a map: the file may still be shrinking.
        let mut prefix = vec![0u8; 8.min(len as usize)];
        file.read_exact_at(&mut prefix, 0).ctx("read", path)?;
        let parsed = loop {
            match header::parse_header(&prefix, len) {
                Ok(h) => break h,
                Err(HeaderError::NeedMore(n)) if n > prefix.len() => {
                    let old = prefix.len();
                    prefix.resize(n, 0);
                    file.read_exact_at(&mut prefix[old..], old as u64)
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::UnexpectedEof => {
                                Error::not_ready(path, "file shrank while its header was read")
                            }
                            _ => Error::io("read", path, e),
                        })?;
                }
                Err(HeaderError::NeedMore(_)) => {
                    return Err(Error::invalid(path, "header parse did not converge"))
                }
                Err(HeaderError::Truncated(d)) => return Err(Error::not_ready(path, d)),
                Err(HeaderError::Invalid(d)) => return Err(Error::invalid(path, d)),
            }
        };
        let map = if len > 0 {
            // SAFETY: the map is read-only and private to this process. A mapped file that is
            // truncated by another process raises SIGBUS on access, so (1) we only map files
            // whose length matched their header exactly a moment ago, (2) every reader
            // re-checks the descriptor (`check_fd`) before touching the map and after using
            // the bytes, and (3) the map is registered with `sigbus`, whose handler turns a
            // fault into zero bytes plus a "poisoned" flag that `check_fd` reports. Bytes
            // changed in place are only ever read as plain numbers, never trusted as
            // references or lengths.
            let m = unsafe { MmapOptions::new().len(len as usize).map(&file) }.ctx("mmap", path)?;
            // Streaming passes read each file front to back once.
            let _ = m.advise(Advice::Sequential);
            Some(m)
        } else {
            None
        };
        let guard = map
            .as_ref()
            .map(|m| crate::sigbus::register(m.as_ptr() as usize, m.len()));
        let src = SourceFile {
            path: path.to_path_buf(),
            fingerprint,
            metadata: parsed.metadata.clone(),
            data_start: parsed.data_start,
            file,
            guard,
            map,
        };
        // The reference reader is the final authority; it reads only the header bytes of
        // the map (the file's length was checked against the fingerprint above).
        src.check_fd()?;
        header::reference_check(src.bytes()).map_err(|e| Error::invalid(path, e.to_string()))?;
        Ok(src)
    }

    /// The whole file's bytes (empty when the file has no data section and no map).
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Cheap check before touching the map: the open descriptor's size and mtime are
    /// unchanged (one `fstat`).
    pub fn check_fd(&self) -> Result<()> {
        if self.guard.as_ref().is_some_and(|g| g.poisoned()) {
            return Err(Error::SourceChanged {
                path: self.path.clone(),
                detail: "truncated while being read".into(),
            });
        }
        let now = Fingerprint::of(&self.file.metadata().ctx("fstat", &self.path)?);
        match self.fingerprint.diff(&now) {
            None => Ok(()),
            Some(detail) => Err(Error::SourceChanged {
                path: self.path.clone(),
                detail,
            }),
        }
    }

    /// Full check: the descriptor is unchanged, and the path still names the same file
    /// (or is gone, which is harmless on a local filesystem while the descriptor is pinned).
    pub fn verify(&self) -> Result<SourceState> {
        self.check_fd()?;
        match std::fs::metadata(&self.path) {
            Ok(m) => match self.fingerprint.diff(&Fingerprint::of(&m)) {
                None => Ok(SourceState::Same),
                Some(detail) => Err(Error::SourceChanged {
                    path: self.path.clone(),
                    detail,
                }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SourceState::Unlinked),
            Err(e) => Err(Error::io("stat", &self.path, e)),
        }
    }

    /// Bytes at an absolute range of the file. The caller must have called
    /// [`SourceFile::check_fd`] recently (see the module docs).
    pub fn slice(&self, range: Range<usize>) -> &[u8] {
        &self.bytes()[range]
    }

    /// Drop this process's mappings of a consumed range so they stop counting towards RSS.
    /// The page cache keeps the data (a warm re-read stays warm).
    ///
    /// The range is widened to whole [`FOLIO`] windows of the mapping's addresses: a fault on
    /// a file map maps the whole page-cache folio around it (up to 2 MiB on current kernels),
    /// so the first read of the next range re-maps the tail of the previous one; without the
    /// widening those pages stayed mapped for good. Pages of a neighbouring range still in
    /// use by another thread are simply faulted in again.
    pub fn release(&self, range: Range<usize>) {
        self.release_exact(self.folio_floor(range.start)..self.folio_ceil(range.end));
    }

    /// `off` rounded down to a [`FOLIO`] boundary of the mapping's addresses.
    pub fn folio_floor(&self, off: usize) -> usize {
        match &self.map {
            Some(m) => {
                let base = m.as_ptr() as usize;
                ((base + off) / FOLIO * FOLIO).saturating_sub(base)
            }
            None => off,
        }
    }

    /// `off` rounded up to a [`FOLIO`] boundary of the mapping's addresses (at most the
    /// file length).
    pub fn folio_ceil(&self, off: usize) -> usize {
        match &self.map {
            Some(m) => {
                let base = m.as_ptr() as usize;
                ((base + off).div_ceil(FOLIO) * FOLIO - base).min(m.len())
            }
            None => off,
        }
    }

    /// Drop the mappings of the whole pages inside `range`.
    pub fn release_exact(&self, range: Range<usize>) {
        if let Some(m) = &self.map {
            let end = range.end.min(m.len());
            if end > range.start {
                // SAFETY: MADV_DONTNEED on a read-only, file-backed shared-or-private map that
                // was never written: the next access re-reads the same bytes from the page
                // cache/file, so no slice we hand out observes different contents.
                let _ = unsafe {
                    m.unchecked_advise_range(
                        UncheckedAdvice::DontNeed,
                        range.start,
                        end - range.start,
                    )
                };
            }
        }
    }
}

/// Granularity of [`SourceFile::release`]: the largest page-cache folio a fault maps at
/// once (PMD size on x86-64 and arm64 with 4 KiB pages).
pub const FOLIO: usize = 2 << 20;

/// A tensor in a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte range in that file.
    pub range: Range<usize>,
}

impl Tensor {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensor names, shapes and dtypes every checkpoint of a run must share. Holds no file
/// handles or maps (keeping a schema must not pin a checkpoint the trainer deleted).
#[derive(Debug, Clone)]
pub struct Schema {
    /// Where it was taken from (for messages).
    pub path: PathBuf,
    /// (name, dtype, shape), sorted by name.
    pub tensors: Vec<(String, Dtype, Vec<usize>)>,
}

impl Schema {
    /// The schema of a checkpoint.
    pub fn of(c: &Checkpoint) -> Schema {
        Schema {
            path: c.path.clone(),
            tensors: c
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect(),
        }
    }

    /// Refuse `other` unless names, shapes and dtypes all agree; the error names the first
    /// difference and is reported against `other`.
    pub fn check(&self, other: &Checkpoint) -> Result<()> {
        let mismatch = |detail: String| Error::Mismatch {
            path: other.path.clone(),
            detail,
        };
        let here = self.path.display();
        let mut a = self.tensors.iter().peekable();
        let mut b = other.tensors.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => return Ok(()),
                (Some(x), y) if y.is_none_or(|y| x.0 < y.name) => {
                    return Err(mismatch(format!(
                        "tensor {} is missing (present in {here})",
                        x.0
                    )))
                }
                (x, Some(y)) if x.is_none_or(|x| y.name < x.0) => {
                    return Err(mismatch(format!(
                        "has tensor {} that {here} does not have",
                        y.name
                    )))
                }
                (Some(x), Some(y)) => {
                    if x.2 != y.shape {
                        return Err(mismatch(format!(
                            "tensor {}: shape {:?} differs from {:?} in {here}",
                            y.name, y.shape, x.2
                        )));
                    }
                    if x.1 != y.dtype {
                        return Err(mismatch(format!(
                            "tensor {}: dtype {} differs from {} in {here}",
                            y.name,
                            dtype_name(y.dtype),
                            dtype_name(x.1)
                        )));
                    }
                    a.next();
                    b.next();
                }
                _ => return Ok(()),
            }
        }
    }
}

/// A validated, pinned checkpoint: one or more safetensors files and their tensor catalog.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path it was opened from (directory or bare file).
    pub path: PathBuf,
    /// Training step, parsed from the name when it ends in digits.
    pub step: Option<u64>,
    /// The weight files, in shard order.
    pub files: Vec<SourceFile>,
    /// Tensors sorted by name.
    pub tensors: Vec<Tensor>,
    /// Directory holding config/tokenizer files, when the checkpoint is a directory.
    pub dir: Option<PathBuf>,
    /// Config and tokenizer files (formats.md list), read when the checkpoint was opened so
    /// an output always carries the files of the weights it was made from, even if the
    /// directory is rotated away or rewritten before the emission.
    pub aux: Vec<(String, Vec<u8>)>,
}

impl Checkpoint {
    /// Open and validate a checkpoint directory or bare `.safetensors` file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).ctx("stat", path)?;
        let step = step_from_name(path);
        if meta.is_file() {
            let (tensors, files) = catalog_owned(vec![SourceFile::open(path)?], None)?;
            return Ok(Checkpoint {
                path: path.to_path_buf(),
                step,
                files,
                tensors,
                dir: None,
                aux: Vec::new(),
            });
        }
        if !meta.is_dir() {
            return Err(Error::invalid(
                path,
                "neither a directory nor a regular file",
            ));
        }
        let index_path = path.join(INDEX_FILE);
        let single = path.join(SINGLE_FILE);
        let (files, index) = if index_path.exists() {
            let bytes = std::fs::read(&index_path).ctx("read", &index_path)?;
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                return Err(Error::not_ready(&index_path, "index file is empty"));
            }
            let index = header::parse_index(&bytes).map_err(|d| Error::invalid(&index_path, d))?;
            let canon_dir = std::fs::canonicalize(path).ctx("canonicalize", path)?;
            let mut files = Vec::new();
            for name in index.shards() {
                let shard = path.join(&name);
                confine(&canon_dir, &shard, &index_path)?;
                files.push(SourceFile::open(&shard)?);
            }
            (files, Some((index_path, index)))
        } else if single.exists() {
            (vec![SourceFile::open(&single)?], None)
        } else {
            return Err(no_weights(path));
        };
        let (tensors, files) = catalog_owned(files, index)?;
        let mut aux = Vec::new();
        for name in AUX_FILES {
            let p = path.join(name);
            if p.symlink_metadata().map(|m| m.is_file()).unwrap_or(false) {
                aux.push((name.to_string(), std::fs::read(&p).ctx("read", &p)?));
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            step,
            files,
            tensors,
            dir: Some(path.to_path_buf()),
            aux,
        })
    }

    /// Look a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.range.len() as u64).sum()
    }

    /// Total bytes of the weight files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.fingerprint.size).sum()
    }

    /// Re-check every file (path and descriptor) before a pass.
    pub fn verify(&self) -> Result<SourceState> {
        let mut state = SourceState::Same;
        for f in &self.files {
            if f.verify()? == SourceState::Unlinked {
                state = SourceState::Unlinked;
            }
        }
        Ok(state)
    }

    /// Cheap re-check of every file's descriptor (and SIGBUS poisoning) after reading.
    pub fn check_fds(&self) -> Result<()> {
        self.files.iter().try_for_each(|f| f.check_fd())
    }

    /// Refuse to merge with `other` unless names, shapes and dtypes all agree; the error
    /// names the first difference and is reported against `other`.
    pub fn check_compatible(&self, other: &Checkpoint) -> Result<()> {
        Schema::of(self).check(other)
    }
}

/// A shard path must be a regular file inside the checkpoint directory after resolving links.
fn confine(canon_dir: &Path, shard: &Path, index: &Path) -> Result<()> {
    let meta = match shard.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_ready(
                index,
                format!("names shard {} which does not exist (yet)", shard.display()),
            ))
        }
        Err(e) => return Err(Error::io("stat", shard, e)),
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(shard).ctx("resolve link", shard)?;
        if target.parent() != Some(canon_dir) {
            return Err(Error::invalid(
                index,
                format!(
                    "shard {} is a link to {}, outside the checkpoint directory",
                    shard.display(),
                    target.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Build the sorted tensor catalog over already-opened files, checking the index (if any)
/// against the shard headers.
fn catalog_owned(
    files: Vec<SourceFile>,
    index: Option<(PathBuf, header::Index)>,
) -> Result<(Vec<Tensor>, Vec<SourceFile>)> {
    let tensors = catalog_inner(&files, index.as_ref())?;
    Ok((tensors, files))
}

fn catalog_inner(
    files: &[SourceFile],
    index: Option<&(PathBuf, header::Index)>,
) -> Result<Vec<Tensor>> {
    let mut tensors = Vec::new();
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for (fi, f) in files.iter().enumerate() {
        // The header was validated in SourceFile::open; parse it again from the map (cheap,
        // header-only) to build the catalog.
        let h = header::parse_header(&f.bytes()[..f.data_start], f.fingerprint.size)
            .map_err(|e| Error::invalid(&f.path, e.to_string()))?;
        for t in h.tensors {
            if let Some(prev) = owner.insert(t.name.clone(), fi) {
                return Err(Error::invalid(
                    &f.path,
                    format!(
                        "tensor {} also appears in {}",
                        t.name,
                        files[prev].path.display()
                    ),
                ));
            }
            tensors.push(Tensor {
                range: f.data_start + t.begin..f.data_start + t.end,
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                file: fi,
            });
        }
    }
    if let Some((index_path, index)) = index {
        for (name, file) in &index.weight_map {
            match owner.get(name) {
                None => {
                    return Err(Error::invalid(
                        index_path,
                        format!("maps tensor {name} to {file}, which does not contain it"),
                    ))
                }
                Some(fi) if files[*fi].path.file_name().and_then(|s| s.to_str()) != Some(file) => {
                    return Err(Error::invalid(
                        index_path,
                        format!(
                            "maps tensor {name} to {file} but it is in {}",
                            files[*fi].path.display()
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(extra) = owner.keys().find(|n| !index.weight_map.contains_key(*n)) {
            return Err(Error::invalid(
                index_path,
                format!(
                    "does not list tensor {extra}, which is in {}",
                    files[owner[extra]].path.display()
                ),
            ));
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// The error for a directory without safetensors weights, saying what to do about it.
fn no_weights(dir: &Path) -> Error {
    let has = |pred: &dyn Fn(&str) -> bool| {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_str().map(pred).unwrap_or(false))
            })
            .unwrap_or(false)
    };
    let hint = if has(&|n| n == "pytorch_model.bin" || n.starts_with("pytorch_model-")) {
        "weights are in pytorch_model*.bin (pickle); save with safetensors (Trainer: save_safetensors=True)"
    } else if has(&|n| n.ends_with(".distcp") || n == ".metadata") {
        "this is a torch.distributed (DCP/torch_dist) checkpoint; convert it to HF safetensors first"
    } else if has(&|n| n.starts_with("zero_pp_rank_") || n.starts_with("mp_rank_")) {
        "this is a DeepSpeed checkpoint without gathered weights; enable stage3_gather_16bit_weights_on_model_save or run zero_to_fp32.py --safe_serialization"
    } else if has(&|n| n.ends_with(".safetensors")) {
        "it has .safetensors files but neither model.safetensors nor model.safetensors.index.json"
    } else {
        "no model.safetensors or model.safetensors.index.json found"
    };
    Error::invalid(dir, format!("no safetensors weights: {hint}"))
}

/// Training step of a checkpoint: `global_step` from its `trainer_state.json` when present,
/// else the number in a known directory name (`checkpoint-N`, `iter_N`, `global_stepN`,
/// `step-N`, `step_N`, `stepN`), else unknown.
pub fn step_from_name(path: &Path) -> Option<u64> {
    if path.is_dir() {
        if let Ok(bytes) = std::fs::read(path.join("trainer_state.json")) {
            if let Some(s) = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("global_step").and_then(|g| g.as_u64()))
            {
                return Some(s);
            }
        }
    }
    let name = if path.is_file() {
        path.file_stem()?.to_str()?
    } else {
        path.file_name()?.to_str()?
    };
    [
        "checkpoint-",
        "iter_",
        "global_step",
        "step-",
        "step_",
        "step",
    ]
    .iter()
    .find_map(|p| name.strip_prefix(p))
    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    .and_then(|d| d.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_come_from_trainer_state_or_known_names() {
        let d = tempfile::tempdir().unwrap();
        for (name, step) in [
            ("checkpoint-1200", Some(1200)),
            ("iter_0001000", Some(1000)),
            ("global_step300", Some(300)),
            ("step-7", Some(7)),
            ("bf1", None),
            ("checkpoint-12a", None),
        ] {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            assert_eq!(step_from_name(&p), step, "{name}");
        }
        let p = d.path().join("run");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("trainer_state.json"), br#"{"global_step": 42}"#).unwrap();
        assert_eq!(step_from_name(&p), Some(42));
    }

    /// Resident KiB of this process's mappings of `path` (from /proc/self/smaps).
    fn mapped_kib(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_string_lossy();
        let mut inside = false;
        let mut total = 0;
        for l in smaps.lines() {
            if l.split_whitespace()
                .next()
                .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
            {
                inside = l.ends_with(name.as_ref());
            } else if inside && l.starts_with("Rss:") {
                total += l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
            }
        }
        total
    }

    #[test]
    fn release_unmaps_whole_folios_and_keeps_the_bytes() {
        let d = tempfile::tempdir().unwrap();
        let (mut bytes, _) = crate::header::build_header(
            &Default::default(),
            &[("w".to_string(), safetensors::Dtype::U8, vec![9 << 20])],
        )
        .unwrap();
        let data_start = bytes.len();
        bytes.extend((0..9u32 << 20).map(|i| (i % 251) as u8));
        let path = d.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let f = SourceFile::open(&path).unwrap();
        let len = bytes.len();
        for off in [0, 1, data_start, FOLIO - 1, FOLIO, len - 1, len] {
            let (lo, hi) = (f.folio_floor(off), f.folio_ceil(off));
            assert!(lo <= off && off <= hi && hi <= len, "{off}: {lo}..{hi}");
        }
        let sum = |r: Range<usize>| f.slice(r).iter().map(|b| *b as u64).sum::<u64>();
        // Consecutive units: read a piece, release it, read the next one (whose first fault
        // maps the whole folio it shares with the previous piece), release it.
        let mid = data_start + (4 << 20) + 12_345;
        let a = sum(data_start..mid);
        assert!(mapped_kib(&path) >= 4 << 10, "reading 4 MiB mapped it");
        f.release(data_start..mid);
        let b = sum(mid..len);
        f.release(mid..len);
        assert_eq!(
            mapped_kib(&path),
            0,
            "pages left mapped after both releases"
        );
        assert_eq!(sum(data_start..len), a + b, "same bytes after release");
    }
}
