//! What an output will hold, decided before a byte is written: each tensor's output dtype,
//! the split into shard files named like `save_pretrained` does, each shard's header bytes
//! (with provenance in `__metadata__`), the HF index, and the aux files copied from the newest
//! input. A DCP input gives a DCP output instead ([`dcp_shards`]): the newest input's data
//! files, byte for byte, with each averaged payload replaced and its CRC32s patched.
//!
//! Invariant: a [`ShardPlan`]'s header declares exactly the bytes the writer will stream
//! after it (`data_len`), in the plan's tensor order; the writer checks the count. Every
//! [`CrcField`] of a plan lies after the bytes of the tensor it checks.

use crate::error::{Error, Result};
use crate::format::hf::{INDEX_FILE, SINGLE_FILE};
use crate::format::safetensors::header::{self, byte_size, dtype_name};
use crate::format::Checkpoint;
use crate::fsio;
use crate::math::kinds::{is_unsupported_float, FloatKind, OutDtype};
use crate::math::Method;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

/// One tensor of an output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    /// Name.
    pub name: String,
    /// Output dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes copied verbatim from the newest input instead of a tensor's values (the parts of
    /// a DCP data file that are not averaged); dtype `U8`, shape `[len]`.
    pub raw: Option<RawBytes>,
}

/// A byte range of one of the newest input's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBytes {
    /// Index into the newest input's `files`.
    pub file: usize,
    /// Absolute byte range in that file.
    pub range: Range<usize>,
}

/// A 4-byte little-endian CRC32 field of an output file, holding the CRC32 of the output
/// bytes of one tensor of the same shard (zip archives record their entries' checksums).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrcField {
    /// Index of the tensor in the shard's plan.
    pub tensor: usize,
    /// Absolute offset of the field in the file.
    pub at: usize,
}

impl OutTensor {
    /// A tensor computed (averaged or copied) by name.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype,
            shape,
            raw: None,
        }
    }

    /// Bytes of data.
    pub fn bytes(&self) -> usize {
        byte_size(self.dtype, &self.shape).unwrap_or(0)
    }
}

/// One output file: its name, tensors in write order, and its header bytes.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    /// File name inside the output directory.
    pub file_name: String,
    /// Tensors in the order their bytes follow the header.
    pub tensors: Vec<OutTensor>,
    /// 8-byte length + padded JSON header.
    pub header: Vec<u8>,
    /// Bytes of tensor data after the header.
    pub data_len: usize,
    /// CRC32 fields to fill in as the file is written, sorted by offset.
    pub crc: Vec<CrcField>,
    /// Also compute the file's SHA-256 as it is written (for Megatron's `integrity.json`).
    pub sha256: bool,
}

/// Split tensors into shards of at most `shard_size` bytes (a tensor larger than that gets a
/// shard of its own), named like `save_pretrained`: `model.safetensors` for one shard,
/// `model-0000i-of-0000K.safetensors` otherwise. Within a shard, tensors are ordered by dtype
/// alignment (largest first) then name (the writer rules of docs/formats.md).
pub fn plan_shards(
    mut tensors: Vec<OutTensor>,
    shard_size: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<ShardPlan>> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut groups: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut cur = 0u64;
    for t in tensors {
        let size = t.bytes() as u64;
        let last = groups.last_mut().map(|g| !g.is_empty()).unwrap_or(false);
        if last && cur + size > shard_size {
            groups.push(Vec::new());
            cur = 0;
        }
        cur += size;
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let k = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| shard_plan(g, shard_file_name(i, k), metadata))
        .collect()
}

/// The name `save_pretrained` gives shard `i` (from 0) of `k`.
pub fn shard_file_name(i: usize, k: usize) -> String {
    if k == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, k)
    }
}

/// One shard file holding `tensors`, ordered by dtype alignment (largest first) then name.
pub fn shard_plan(
    mut tensors: Vec<OutTensor>,
    file_name: String,
    metadata: &BTreeMap<String, String>,
) -> Result<ShardPlan> {
    tensors.sort_by(|a, b| {
        b.dtype
            .bitsize()
            .cmp(&a.dtype.bitsize())
            .then_with(|| a.name.cmp(&b.name))
    });
    let spec: Vec<_> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let (header, data_len) = header::build_header(metadata, &spec)
        .map_err(|e| Error::Internal(format!("cannot build output header: {e}")))?;
    Ok(ShardPlan {
        file_name,
        tensors,
        header,
        data_len,
        crc: Vec::new(),
        sha256: false,
    })
}

/// The plan of an output made from `newest` with output `tensors`: safetensors shards of at
/// most `shard_size` bytes, or for a DCP input the newest input's own files ([`dcp_shards`]).
pub fn plan_output(
    newest: &Checkpoint,
    tensors: Vec<OutTensor>,
    shard_size: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<ShardPlan>> {
    if newest.dcp.is_some() {
        dcp_shards(newest, &tensors)
    } else {
        plan_shards(tensors, shard_size, metadata)
    }
}

/// A DCP output: one file per data file of the newest input, named like it, holding its bytes
/// in order — the averaged payloads as tensors, everything else as raw copies — and the CRC32
/// fields of every averaged payload. `tensors` (from [`output_tensors`]) must keep each
/// tensor's dtype: the framework's loader expects exactly what `.metadata` declares.
pub fn dcp_shards(newest: &Checkpoint, tensors: &[OutTensor]) -> Result<Vec<ShardPlan>> {
    let Some(layout) = &newest.dcp else {
        return Err(Error::Internal(
            "dcp_shards of a safetensors checkpoint".into(),
        ));
    };
    for (t, o) in newest.tensors.iter().zip(tensors) {
        if t.dtype != o.dtype {
            return Err(Error::Usage(format!(
                "dtype: a DCP output keeps each tensor's dtype (the framework's loader expects \
                 what .metadata declares), but {} would change from {} to {}; use dtype = \
                 \"source\"",
                t.name,
                dtype_name(t.dtype),
                dtype_name(o.dtype)
            )));
        }
    }
    let mut shards = Vec::with_capacity(newest.files.len());
    for (fi, f) in newest.files.iter().enumerate() {
        let mut mine: Vec<&crate::format::Tensor> =
            newest.tensors.iter().filter(|t| t.file == fi).collect();
        mine.sort_by_key(|t| t.range.start);
        let size = usize::try_from(f.fingerprint.size)
            .map_err(|_| Error::Internal(format!("{}: too large", f.path.display())))?;
        let mut out: Vec<OutTensor> = Vec::new();
        let mut crc: Vec<CrcField> = Vec::new();
        let mut pos = 0usize;
        let raw = |out: &mut Vec<OutTensor>, range: Range<usize>| {
            if !range.is_empty() {
                out.push(OutTensor {
                    name: format!(
                        "{}[{}..{}]",
                        relative_name(newest, f),
                        range.start,
                        range.end
                    ),
                    dtype: Dtype::U8,
                    shape: vec![range.len()],
                    raw: Some(RawBytes { file: fi, range }),
                });
            }
        };
        for t in mine {
            if t.range.start < pos || t.range.end > size {
                return Err(Error::Internal(format!(
                    "{}: tensor {} overlaps another or the file's end",
                    f.path.display(),
                    t.name
                )));
            }
            raw(&mut out, pos..t.range.start);
            let ti = out.len();
            out.push(OutTensor::new(t.name.clone(), t.dtype, t.shape.clone()));
            for &at in layout.crc_fields.get(&t.name).into_iter().flatten() {
                if at < t.range.end || at + 4 > size {
                    return Err(Error::Internal(format!(
                        "{}: a CRC32 field of {} at {at} is not after its data",
                        f.path.display(),
                        t.name
                    )));
                }
                crc.push(CrcField { tensor: ti, at });
            }
            pos = t.range.end;
        }
        raw(&mut out, pos..size);
        crc.sort_by_key(|c| c.at);
        let data_len = out.iter().map(|t| t.bytes()).sum();
        shards.push(ShardPlan {
            file_name: relative_name(newest, f),
            tensors: out,
            header: Vec::new(),
            data_len,
            crc,
            sha256: layout.integrity,
        });
    }
    Ok(shards)
}

/// A file's name relative to its checkpoint directory (`__0_0.distcp`, or
/// `model_and_optim/__0_0.distcp` for OLMo-core).
fn relative_name(c: &Checkpoint, f: &crate::format::SourceFile) -> String {
    f.path
        .strip_prefix(&c.path)
        .ok()
        .and_then(|p| p.to_str())
        .map(String::from)
        .or_else(|| f.path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// The HF index for a sharded output: sorted keys, `total_size` in bytes of tensor data.
pub fn index_json(shards: &[ShardPlan]) -> Vec<u8> {
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for s in shards {
        total += s.data_len as u64;
        for t in &s.tensors {
            weight_map.insert(t.name.clone(), s.file_name.clone());
        }
    }
    let v = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Write the index into `dir` when the output has more than one shard (a single
/// `model.safetensors` has none, as with `save_pretrained`).
pub fn write_index(dir: &Path, shards: &[ShardPlan]) -> Result<()> {
    let safetensors = shards.iter().all(|s| s.file_name.ends_with(".safetensors"));
    if shards.len() > 1 && safetensors {
        fsio::write_file(&dir.join(INDEX_FILE), &index_json(shards))?;
    }
    Ok(())
}

/// Refuse dtypes we cannot average and decide each tensor's output dtype.
pub fn output_tensors(newest: &Checkpoint, dtype: OutDtype) -> Result<Vec<OutTensor>> {
    newest
        .tensors
        .iter()
        .map(|t| {
            let out = match FloatKind::of_tensor(t) {
                Some(k) => dtype.output_kind(k).dtype(),
                None if t.average && is_unsupported_float(t.dtype) => {
                    return Err(Error::Unsupported {
                        path: newest.files[t.file].path.clone(),
                        tensor: t.name.clone(),
                        dtype: dtype_name(t.dtype),
                        hint: "pmad averages F64, F32, F16, BF16, F8_E4M3 and F8_E5M2; \
                               dequantize or save this tensor in one of those",
                    })
                }
                None => t.dtype,
            };
            Ok(OutTensor::new(t.name.clone(), out, t.shape.clone()))
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

/// Write the config/tokenizer files captured when `c` was opened into `dir`.
pub fn write_aux(c: &Checkpoint, dir: &Path) -> Result<()> {
    for (name, bytes) in &c.aux {
        fsio::create_parents(dir, name)?;
        fsio::write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: Dtype, shape: &[usize]) -> OutTensor {
        OutTensor::new(name, dtype, shape.to_vec())
    }

    #[test]
    fn shards_split_by_size_with_hf_names() {
        let ts = vec![
            t("a", Dtype::F32, &[100]),
            t("b", Dtype::BF16, &[100]),
            t("c", Dtype::F32, &[300]),
            t("d", Dtype::I64, &[10]),
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let one = plan_shards(ts.clone(), 1 << 30, &meta).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].file_name, "model.safetensors");
        // alignment first (I64/F32... by bitsize), then name
        let order: Vec<_> = one[0].tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, ["d", "a", "c", "b"]);
        let many = plan_shards(ts, 600, &meta).unwrap();
        let names: Vec<_> = many.iter().map(|s| s.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors",
                "model-00003-of-00003.safetensors"
            ]
        );
        let idx: serde_json::Value = serde_json::from_slice(&index_json(&many)).unwrap();
        assert_eq!(idx["metadata"]["total_size"], 400 + 200 + 1200 + 80);
        assert_eq!(idx["weight_map"]["c"], "model-00002-of-00003.safetensors");
    }
}
