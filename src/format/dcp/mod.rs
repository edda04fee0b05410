//! PyTorch Distributed Checkpoint (DCP) directories: torchtitan, torch FSDP2, and the DCP
//! that Megatron's `torch_dist` and OLMo-core write.
//!
//! A DCP checkpoint is a directory of `__<rank>_<n>.distcp` data files and a `.metadata`
//! pickle written last. With torch's default serialization every item in a `.distcp` file —
//! a tensor chunk, or a non-tensor object — is a complete `torch.save` zip archive of its own,
//! stored (not compressed), at the `(file, offset, length)` that `.metadata` gives for it.
//!
//! - [`archive`]: the zip archive of one item — its entries and where their stored bytes are.
//! - [`pickle`]: a pickle reader that never executes anything (a stack machine whose only
//!   output is a tree of values, classes kept as names).
//! - [`meta`]: what `.metadata` and an item's `data.pkl` say, decoded from those values.
//! - this module: [`open_dir`], a DCP directory as a [`Checkpoint`].
//!
//! What the catalog holds: one [`Tensor`] per saved chunk of each *averaged* key — a
//! floating-point, dense tensor whose key the default rule ([`averaged_key`]) and the user's
//! [`Select`] choose — named
//! `fqn` when its only chunk is the whole tensor and `fqn@o0,o1,..` (the chunk's offsets)
//! otherwise, with the chunk's shape, and as byte range the payload of the item's `data/0`
//! entry (the storage, in its saved strides: averaging is element by element over the
//! storage, so any dense view works as long as every checkpoint shares it). Every other byte of
//! the data files (zip headers, optimizer state, RNG, dataloader state) is not in the catalog:
//! an output copies it from the newest input ([`Layout`] says where the CRC32 of each averaged
//! payload is recorded, for the writer to patch).
//!
//! Refused, naming the file: per-rank metadata (`__<rank>.metadata`), items with transforms
//! (compression), items that are not zip archives (SAFETENSORS serialization, legacy
//! `torch.save`), averaged keys that are quantized, sparse, subclasses or non-dense views,
//! item ranges outside their file or overlapping, and data files that are links leaving the
//! directory.
//!
//! Invariant: the data files are mapped only after their sizes were checked against every
//! item's range, and are parsed through the map with bounds-checked reads only; a file changed
//! while it is parsed is caught by the descriptor check that ends [`open_dir`] (the same
//! fingerprint rule as safetensors shards).

pub mod archive;
pub mod meta;
pub mod pickle;

use super::checkpoint::{Checkpoint, Tensor};
use super::dir::Dir;
use super::select::Select;
use super::source::{Fingerprint, SourceFile};
use crate::error::{Error, IoContext, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The file DCP writes last: its presence means the checkpoint is complete.
pub const METADATA: &str = ".metadata";

/// Total bytes of the small files beside the data (`.metadata`, Megatron's `metadata.json`,
/// `common.pt`, ...) that an output copies; more is refused rather than held in memory.
const MAX_AUX_BYTES: usize = 256 << 20;

pub use super::checkpoint::{DcpKey as KeyInfo, DcpLayout as Layout};

/// The subdirectory where OLMo-core keeps the DCP part of a checkpoint (`stepN/` holds it,
/// `train/` and `.metadata.json`).
pub const OLMO_CORE_DIR: &str = "model_and_optim";

/// Megatron's optional manifest of its checkpoint files' SHA-256 digests
/// (`{"algorithm": "sha256", "files": {name: hex}}`, written last when saved with
/// `save_integrity`); an output gets one of its own.
pub const INTEGRITY: &str = "integrity.json";

/// OLMo-core's completion marker in `stepN/`, written after everything else.
pub const OLMO_CORE_MARKER: &str = ".metadata.json";

/// Whether `name` (a file directly in a DCP root) is one of DCP's own files.
fn is_dcp_file(name: &str) -> bool {
    is_data_file(name) || name == METADATA || per_rank_metadata(name)
}

/// Whether a directory holds a DCP checkpoint (or the start of one): its `.metadata`, data
/// files or per-rank metadata, directly or in OLMo-core's `model_and_optim/`.
pub fn is_dcp(dir: &Dir<'_>) -> bool {
    let sub = format!("{OLMO_CORE_DIR}/");
    dir.files().iter().any(|n| {
        let n = n.strip_prefix(&sub).unwrap_or(n);
        !n.contains('/') && is_dcp_file(n)
    })
}

/// Where the DCP files of `dir` are: the directory itself (`""`), or OLMo-core's
/// subdirectory (`"model_and_optim/"`).
fn root_of(dir: &Dir<'_>) -> String {
    if dir.names().iter().any(|n| is_dcp_file(n)) {
        String::new()
    } else {
        format!("{OLMO_CORE_DIR}/")
    }
}

/// Whether `name` is a DCP data file (`__0_0.distcp`) or the metadata: files that must not
/// change while the checkpoint is in use.
pub fn is_weight_file(name: &str) -> bool {
    // Also in OLMo-core's `model_and_optim/`.
    let name = name.rsplit('/').next().unwrap_or(name);
    is_data_file(name) || name == METADATA
}

fn is_data_file(name: &str) -> bool {
    name.ends_with(".distcp")
}

/// `__<rank>.metadata`, written by `use_collectives=False` saves.
fn per_rank_metadata(name: &str) -> bool {
    name.strip_prefix("__")
        .and_then(|r| r.strip_suffix(".metadata"))
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
}

/// Key prefixes that are never averaged by default: training state rather than weights
/// (torchtitan, FSDP2 examples, OLMo-core, Megatron).
pub const NOT_WEIGHTS: &[&str] = &[
    "optimizer.",
    "optim.",
    "lr_scheduler.",
    "dataloader.",
    "train_state",
    "train.",
    "rng_state",
    "rerun_state_machine",
    "common_state",
];

/// The default rule for which keys are weights: everything except training state
/// ([`NOT_WEIGHTS`]), but Megatron's fp32 master weights `optimizer.state.fp32_param.*` are
/// weights (Megatron copies them over the model weights when it resumes with optimizer state,
/// so an average that left them out would be undone on restart).
pub fn averaged_key(fqn: &str) -> bool {
    fqn.starts_with("optimizer.state.fp32_param.")
        || !NOT_WEIGHTS.iter().any(|p| fqn.starts_with(p))
}

/// The catalog name of a chunk: the key when the chunk is the whole tensor, else the key and
/// the chunk's offsets.
pub fn chunk_name(fqn: &str, offsets: &[u64], sizes: &[u64], size: &[u64]) -> String {
    if sizes == size {
        fqn.to_string()
    } else {
        let o: Vec<String> = offsets.iter().map(|x| x.to_string()).collect();
        format!("{fqn}@{}", o.join(","))
    }
}

/// Open and validate a DCP checkpoint directory, live or from a snapshot of its files.
pub fn open_dir(dir: Dir<'_>, select: &Select) -> Result<Checkpoint> {
    let path = dir.path();
    let base = root_of(&dir);
    let files_here = dir.files();
    let names: Vec<&str> = files_here
        .iter()
        .filter_map(|n| n.strip_prefix(base.as_str()))
        .filter(|n| !n.contains('/'))
        .collect();
    let rel = |n: &str| format!("{base}{n}");
    let meta_path = dir.join(&rel(METADATA));
    let Some(meta_bytes) = dir.read(&rel(METADATA))? else {
        if let Some(n) = names.iter().find(|n| per_rank_metadata(n)) {
            return Err(Error::invalid(
                &dir.join(&rel(n)),
                "per-rank DCP metadata (saved with use_collectives=False); pmad reads \
                 checkpoints with one .metadata (the default)",
            ));
        }
        return Err(Error::not_ready(
            &meta_path,
            "not written yet (DCP writes .metadata after every data file)",
        ));
    };
    if meta_bytes.is_empty() {
        return Err(Error::not_ready(&meta_path, "is empty"));
    }
    // Read in place: the pickle's values are decoded without being copied into a tree.
    let parsed =
        pickle::parse(&meta_bytes).map_err(|e| Error::invalid(&meta_path, e.to_string()))?;
    let md = meta::metadata(parsed.root()).map_err(|e| Error::invalid(&meta_path, e))?;
    drop(parsed);

    // The data files the items name, opened and sized.
    let mut file_ix: BTreeMap<&str, usize> = BTreeMap::new();
    for it in &md.items {
        if !it.transforms.is_empty() {
            return Err(Error::invalid(
                &meta_path,
                format!(
                    "item {} is stored with transforms {:?} (compression); pmad reads plain \
                     items only",
                    it.fqn, it.transforms
                ),
            ));
        }
        let ok_name = is_data_file(&it.file) && !it.file.contains('/') && it.file != "..";
        if !ok_name {
            return Err(Error::invalid(
                &meta_path,
                format!(
                    "item {} is stored in {:?}, which is not a .distcp file of this directory",
                    it.fqn, it.file
                ),
            ));
        }
        let n = file_ix.len();
        file_ix.entry(it.file.as_str()).or_insert(n);
    }
    // Files in name order, so the catalog and outputs do not depend on pickle order.
    let mut file_names: Vec<&str> = file_ix.keys().copied().collect();
    file_names.sort();
    let index_of: BTreeMap<&str, usize> = file_names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i))
        .collect();
    let mut sizes = Vec::with_capacity(file_names.len());
    let mut opened = Vec::with_capacity(file_names.len());
    for name in &file_names {
        let name = rel(name);
        dir.confine(&name, &meta_path)?;
        let fpath = dir.join(&name);
        let Some(f) = dir.open(&name)? else {
            return Err(Error::invalid(
                &meta_path,
                format!("names data file {} which does not exist", fpath.display()),
            ));
        };
        let m = f.metadata().ctx("stat", &fpath)?;
        if !m.is_file() {
            return Err(Error::invalid(&fpath, "not a regular file"));
        }
        sizes.push(m.len());
        opened.push((f, fpath, Fingerprint::of(&m)));
    }
    // Every item inside its file, and no two overlapping.
    let mut spans: Vec<(usize, u64, u64, &str)> = Vec::with_capacity(md.items.len());
    for it in &md.items {
        let fi = index_of[it.file.as_str()];
        let end = it.at.saturating_add(it.len);
        if end > sizes[fi] {
            return Err(Error::invalid(
                &opened[fi].1,
                format!(
                    "item {} lies at bytes {}..{end}, past the file's end ({} bytes): the file \
                     is truncated or .metadata belongs to another save",
                    it.fqn, it.at, sizes[fi]
                ),
            ));
        }
        spans.push((fi, it.at, end, it.fqn.as_str()));
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[0].0 == w[1].0 && w[1].1 < w[0].2 {
            return Err(Error::invalid(
                &opened[w[1].0].1,
                format!("items {} and {} overlap", w[0].3, w[1].3),
            ));
        }
    }
    let mut files = Vec::with_capacity(opened.len());
    for (f, fpath, fp) in opened {
        files.push(SourceFile::map(f, &fpath, fp)?);
    }

    // The averaged keys' chunks.
    let mut by_key: BTreeMap<(&str, Option<&[u64]>), &meta::Stored> = BTreeMap::new();
    for it in &md.items {
        if by_key
            .insert((it.fqn.as_str(), it.offset.as_deref()), it)
            .is_some()
        {
            return Err(Error::invalid(
                &meta_path,
                format!("item {} at {:?} is stored twice", it.fqn, it.offset),
            ));
        }
    }
    let mut tensors = Vec::new();
    let mut layout = Layout {
        integrity: dir.has_file(&rel(INTEGRITY)),
        ..Layout::default()
    };
    for key in &md.keys {
        let (kind, size, chunks, averaged) = match &key.tensor {
            None => ("bytes".to_string(), Vec::new(), 1, false),
            Some(t) => {
                let float = t.dtype.is_some_and(super::hf::is_float);
                let averaged = float && select.averages(&key.fqn, averaged_key(&key.fqn));
                (
                    t.torch_dtype.clone(),
                    t.size.clone(),
                    t.chunks.len(),
                    averaged,
                )
            }
        };
        layout.keys.push(KeyInfo {
            fqn: key.fqn.clone(),
            kind,
            size,
            chunks,
            averaged,
        });
        let (Some(t), true) = (&key.tensor, averaged) else {
            continue;
        };
        if !t.strided {
            return Err(Error::invalid(
                &meta_path,
                format!(
                    "tensor {} has a sparse layout; pmad averages dense tensors",
                    key.fqn
                ),
            ));
        }
        for ch in &t.chunks {
            let it = by_key
                .get(&(key.fqn.as_str(), Some(ch.offsets.as_slice())))
                .ok_or_else(|| {
                    Error::invalid(
                        &meta_path,
                        format!(
                            "the chunk of {} at {:?} has no storage entry",
                            key.fqn, ch.offsets
                        ),
                    )
                })?;
            let fi = index_of[it.file.as_str()];
            let name = chunk_name(&key.fqn, &ch.offsets, &ch.sizes, &t.size);
            let (tensor, crc) = chunk_tensor(&files[fi], fi, it, &name, t, ch)?;
            layout.crc_fields.insert(name, crc);
            tensors.push(tensor);
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));

    // The other files of the checkpoint (and one subdirectory down: OLMo-core's `train/`),
    // copied into every output; `.metadata`, then OLMo-core's marker, are written last.
    let mut aux = Vec::new();
    let mut aux_bytes = 0usize;
    let small: Vec<&String> = files_here
        .iter()
        .filter(|n| {
            let in_root = n.strip_prefix(base.as_str()).filter(|m| !m.contains('/'));
            !in_root.is_some_and(|m| is_data_file(m) || m == METADATA || m == INTEGRITY)
                && n.as_str() != OLMO_CORE_MARKER
                && dir.has_file(n)
        })
        .collect();
    for n in small {
        if let Some(b) = dir.read(n)? {
            aux_bytes += b.len();
            aux.push((n.clone(), b));
        }
    }
    let olmo_marker = if base.is_empty() {
        None
    } else {
        dir.read(OLMO_CORE_MARKER)?
    };
    aux_bytes += meta_bytes.len() + olmo_marker.as_ref().map_or(0, |b| b.len());
    if aux_bytes > MAX_AUX_BYTES {
        return Err(Error::invalid(
            path,
            format!(
                "{aux_bytes} bytes of files besides the .distcp data; pmad copies at most \
                 {MAX_AUX_BYTES} (are other files stored in the checkpoint directory?)"
            ),
        ));
    }
    aux.push((rel(METADATA), meta_bytes));
    if let Some(b) = olmo_marker {
        aux.push((OLMO_CORE_MARKER.to_string(), b));
    }

    for f in &files {
        f.check_fd()?;
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        step: path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(super::hf::step_in_name),
        files,
        tensors,
        aux,
        dcp: Some(Box::new(layout)),
    })
}

/// Parse one chunk's item and return its catalog entry and CRC field offsets.
fn chunk_tensor(
    file: &SourceFile,
    fi: usize,
    it: &meta::Stored,
    name: &str,
    t: &meta::TensorMeta,
    ch: &meta::Chunk,
) -> Result<(Tensor, Vec<usize>)> {
    let at = it.at as usize;
    let item = file.slice(at..at + it.len as usize);
    let bad = |what: String| {
        Error::invalid(
            &file.path,
            format!("item {name} at byte {at} ({} bytes): {what}", it.len),
        )
    };
    if !item.starts_with(b"PK") && item.starts_with(&[0x80]) {
        return Err(bad(
            "a legacy (non-zip) torch.save item; pmad reads the zip format torch writes by \
             default"
                .into(),
        ));
    }
    if !item.starts_with(b"PK") && item.len() >= 9 && item[8] == b'{' {
        return Err(bad(
            "not a torch.save archive but what looks like a safetensors blob \
             (SerializationFormat.SAFETENSORS); pmad reads DCP's default TORCH_SAVE items"
                .into(),
        ));
    }
    let entries = archive::entries(item).map_err(bad)?;
    let pkl = entries
        .iter()
        .find(|e| e.name.ends_with("data.pkl"))
        .ok_or_else(|| bad("no data.pkl entry".into()))?;
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    // The small entries are checked against their CRCs (cheap); the payload's is recomputed
    // by every output, and torch's loaders do not check it either.
    for e in &entries {
        if !e.name.starts_with(&format!("{prefix}data/")) {
            let got = archive::crc32(&item[e.data.clone()]);
            if got != e.crc32 {
                return Err(bad(format!(
                    "entry {} fails its CRC32 check (recorded {:08x}, computed {got:08x})",
                    e.name, e.crc32
                )));
            }
        }
    }
    if let Some(bo) = entries
        .iter()
        .find(|e| e.name == format!("{prefix}byteorder"))
    {
        if &item[bo.data.clone()] != b"little" {
            return Err(bad(
                "saved big-endian; pmad reads little-endian storages".into()
            ));
        }
    }
    let parsed =
        pickle::parse(&item[pkl.data.clone()]).map_err(|e| bad(format!("data.pkl: {e}")))?;
    let it_t = meta::item_tensor(parsed.root()).map_err(bad)?;
    drop(parsed);
    if it_t.torch_dtype != t.torch_dtype {
        return Err(bad(format!(
            "its storage is {} but .metadata says {}",
            it_t.torch_dtype, t.torch_dtype
        )));
    }
    if it_t.size != ch.sizes {
        return Err(bad(format!(
            "its shape {:?} differs from the chunk's {:?} in .metadata",
            it_t.size, ch.sizes
        )));
    }
    if it_t.storage_offset != 0 || !meta::dense(&it_t.size, &it_t.stride, it_t.numel) {
        return Err(bad(format!(
            "a view (offset {}, strides {:?}) that does not cover its storage of {} elements \
             exactly; pmad averages dense tensors",
            it_t.storage_offset, it_t.stride, it_t.numel
        )));
    }
    let storage = format!("{prefix}data/{}", it_t.key);
    let payload = entries
        .iter()
        .find(|e| e.name == storage)
        .ok_or_else(|| bad(format!("no entry {storage} for its storage")))?;
    let es = meta::elem_size(&it_t.torch_dtype).unwrap_or(0);
    if payload.data.len() as u64 != it_t.numel.saturating_mul(es) {
        return Err(bad(format!(
            "entry {storage} holds {} bytes, but {} {} elements need {}",
            payload.data.len(),
            it_t.numel,
            it_t.torch_dtype,
            it_t.numel.saturating_mul(es)
        )));
    }
    let mut crc = vec![at + payload.central_header + 16];
    match payload.descriptor_crc {
        Some(d) => crc.push(at + d),
        None => {
            return Err(bad(format!(
                "entry {storage} records its CRC32 in its local header (before the data), \
                 not in a data descriptor as torch.save does; pmad cannot stream such an item"
            )))
        }
    }
    let end = at + payload.data.end;
    if crc.iter().any(|&c| c < end) {
        return Err(bad(format!(
            "entry {storage}'s CRC32 fields precede its data"
        )));
    }
    let row_major = row_major_strides(&it_t.size);
    let view = (it_t.stride != row_major && it_t.numel > 1).then(|| {
        let s: Vec<String> = it_t.stride.iter().map(|x| x.to_string()).collect();
        format!("strides ({})", s.join(", "))
    });
    let dtype = t
        .dtype
        .ok_or_else(|| bad(format!("unknown dtype {}", t.torch_dtype)))?;
    Ok((
        Tensor {
            name: name.to_string(),
            dtype,
            shape: ch.sizes.iter().map(|&s| s as usize).collect(),
            file: fi,
            range: at + payload.data.start..end,
            view,
            average: true,
        },
        crc,
    ))
}

fn row_major_strides(size: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1].saturating_mul(size[d + 1]);
    }
    s
}

/// Open a DCP checkpoint directory at `path`.
pub fn open(path: &Path, select: &Select) -> Result<Checkpoint> {
    open_dir(Dir::Live(path), select)
}
