//! What an output will hold, decided before a byte is written: each tensor's output dtype,
//! the split into shard files named like `save_pretrained` does, each shard's header bytes
//! (with provenance in `__metadata__`), the HF index, and the aux files copied from the newest
//! input.
//!
//! Invariant: a [`ShardPlan`]'s header declares exactly the bytes the writer will stream
//! after it (`data_len`), in the plan's tensor order; the writer checks the count.

use crate::error::{Error, Result};
use crate::format::hf::{INDEX_FILE, SINGLE_FILE};
use crate::format::safetensors::header::{self, byte_size, dtype_name};
use crate::format::Checkpoint;
use crate::fsio;
use crate::math::kinds::{is_unsupported_float, FloatKind, OutDtype};
use crate::math::Method;
use safetensors::Dtype;
use std::collections::BTreeMap;
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
}

impl OutTensor {
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
    })
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
    if shards.len() > 1 {
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
            let out = match FloatKind::of(t.dtype) {
                Some(k) => dtype.output_kind(k).dtype(),
                None if is_unsupported_float(t.dtype) => {
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

/// Write the config/tokenizer files captured when `c` was opened into `dir`.
pub fn write_aux(c: &Checkpoint, dir: &Path) -> Result<()> {
    for (name, bytes) in &c.aux {
        fsio::write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: Dtype, shape: &[usize]) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
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
