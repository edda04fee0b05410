//! A checkpoint as the rest of pmad sees it, whatever its format on disk: pinned files and a
//! catalog of tensors (name, dtype, shape, file, byte range), sorted by name.
//!
//! Invariant: once you hold a [`Checkpoint`], every file passed its format's validation and
//! is pinned ([`SourceFile`]), every tensor's byte range lies inside its file's data, and tensor
//! names are unique. [`Schema`] is the part two checkpoints of one run must share.

use super::source::{SourceFile, SourceState};
use crate::error::{Error, Result};
use crate::format::safetensors::header::dtype_name;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

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
    /// How the elements are laid out when that is not row-major (DCP keeps a transposed
    /// tensor's strides: `strides (1, 8)`). Averaging is element by element over the bytes, so
    /// every checkpoint of a window must share it.
    pub view: Option<String>,
    /// Whether it is selected for averaging by the format's rule and the user's `[select]`
    /// ([`super::Select`]). A selected floating-point tensor is averaged; every other tensor
    /// is copied byte for byte from the newest input.
    pub average: bool,
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
    /// (name, dtype, shape, view), sorted by name.
    pub tensors: Vec<(String, Dtype, Vec<usize>, Option<String>)>,
}

impl Schema {
    /// The schema of a checkpoint.
    pub fn of(c: &Checkpoint) -> Schema {
        Schema {
            path: c.path.clone(),
            tensors: c
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.view.clone()))
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
                        "tensor {} is missing (present in {here}){}",
                        x.0,
                        chunk_hint(&x.0)
                    )))
                }
                (x, Some(y)) if x.is_none_or(|x| y.name < x.0) => {
                    return Err(mismatch(format!(
                        "has tensor {} that {here} does not have{}",
                        y.name,
                        chunk_hint(&y.name)
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
                    if x.3 != y.view {
                        let show = |v: &Option<String>| {
                            v.clone().unwrap_or_else(|| "row-major".to_string())
                        };
                        return Err(mismatch(format!(
                            "tensor {}: its layout ({}) differs from {} in {here}",
                            y.name,
                            show(&y.view),
                            show(&x.3)
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

/// What an output of a DCP checkpoint needs besides the catalog.
#[derive(Debug, Clone, Default)]
pub struct DcpLayout {
    /// For each catalog tensor (by name): absolute offsets, in its file, of the 4-byte CRC32
    /// fields that record its payload's checksum (central directory and data descriptor). All
    /// lie after the payload.
    pub crc_fields: BTreeMap<String, Vec<usize>>,
    /// Every key of the checkpoint, in `.metadata` order, for `pmad inspect`.
    pub keys: Vec<DcpKey>,
    /// The input has Megatron's `integrity.json` (SHA-256 of every file): an output gets its
    /// own, computed from the files as written, instead of a copy.
    pub integrity: bool,
}

/// One key of a DCP checkpoint as `pmad inspect` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DcpKey {
    /// The key.
    pub fqn: String,
    /// `bytes`, or the torch dtype of a tensor.
    pub kind: String,
    /// The global shape of a tensor.
    pub size: Vec<u64>,
    /// Saved chunks (1 for a bytes object).
    pub chunks: usize,
    /// Whether it is averaged (else copied byte for byte from the newest checkpoint).
    pub averaged: bool,
}

/// What a schema difference in a chunk's name (`key@offsets`, a DCP chunk) means.
fn chunk_hint(name: &str) -> &'static str {
    if name.contains('@') {
        "; the tensor is saved in other chunks: a run restarted on a different number of \
         ranks or another sharding changes the chunking, and checkpoints of one window must \
         share it"
    } else {
        ""
    }
}

/// A validated, pinned checkpoint: its files and their tensor catalog.
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
    /// Config and tokenizer files (see the format's list), read when the checkpoint was opened so
    /// an output always carries the files of the weights it was made from, even if the
    /// directory is rotated away or rewritten before the emission.
    pub aux: Vec<(String, Vec<u8>)>,
    /// For a DCP checkpoint: where each averaged payload's CRC32 is recorded and every key
    /// with what is done with it. `None` for safetensors.
    pub dcp: Option<Box<DcpLayout>>,
}

impl Checkpoint {
    /// Open and validate a checkpoint, whatever its format (see [`crate::format::open`]).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        super::open(path)
    }

    /// Look a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.position(name).map(|i| &self.tensors[i])
    }

    /// Where the tensor `name` is in [`Checkpoint::tensors`].
    pub fn position(&self, name: &str) -> Option<usize> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
    }

    /// Look a tensor up by name, trying position `hint` first: checkpoints of one run list
    /// the same names, so the position of a name in one is its position in the others, and
    /// resolving thousands of tensors across K inputs costs one comparison each, not a search.
    pub fn tensor_near(&self, hint: usize, name: &str) -> Option<&Tensor> {
        match self.tensors.get(hint) {
            Some(t) if t.name == name => Some(t),
            _ => self.tensor(name),
        }
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
