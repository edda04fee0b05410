//! Writing merged checkpoints: the output plan, the streaming safetensors writer, and the
//! durable atomic publish of reliability.md.
//!
//! Owns the invariant "an output appears under its final name only when complete": everything
//! is written into `<parent>/.pmad-tmp-<tag>-<random>/`, every file is fsynced (a failed fsync
//! abandons the output), then the temp dir is fsynced, renamed into place and the parent
//! fsynced. A [`Staging`] that is dropped without [`Staging::commit`] removes its temp dir.
//! Data is written with ordinary buffered writes, never through a writable map (a full disk
//! would be SIGBUS instead of ENOSPC).

use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::header::{self, byte_size};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Prefix of pmad's temp dirs; swept at start and never ingested.
pub const TMP_PREFIX: &str = ".pmad-tmp-";
/// Name of the pointer file to the newest complete output.
pub const LATEST: &str = "LATEST";

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
/// alignment (largest first) then name, per the writer rules of formats.md.
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
        .map(|(i, mut g)| {
            g.sort_by(|a, b| {
                b.dtype
                    .bitsize()
                    .cmp(&a.dtype.bitsize())
                    .then_with(|| a.name.cmp(&b.name))
            });
            let spec: Vec<_> = g
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
                .collect();
            let (header, data_len) = header::build_header(metadata, &spec)
                .map_err(|e| Error::Usage(format!("cannot build output header: {e}")))?;
            let file_name = if k == 1 {
                crate::checkpoint::SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, k)
            };
            Ok(ShardPlan {
                file_name,
                tensors: g,
                header,
                data_len,
            })
        })
        .collect()
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
        fsio::write_file(
            &dir.join(crate::checkpoint::INDEX_FILE),
            &index_json(shards),
        )?;
    }
    Ok(())
}

/// Streams one safetensors file: the header first, then tensor bytes in plan order.
pub struct ShardWriter {
    path: PathBuf,
    file: File,
    expected: usize,
    written: usize,
    header_len: usize,
}

impl ShardWriter {
    /// Create the file and write its header.
    pub fn create(dir: &Path, plan: &ShardPlan) -> Result<ShardWriter> {
        let path = dir.join(&plan.file_name);
        let mut file = fsio::create(&path)?;
        fsio::write_all(&mut file, &path, &plan.header)?;
        Ok(ShardWriter {
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
            return Err(Error::invalid(
                &self.path,
                "internal error: more tensor bytes than the header declares",
            ));
        }
        fsio::write_all(&mut self.file, &self.path, bytes)?;
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
    pub fn finish(self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "internal error: wrote {} tensor bytes, header declares {}",
                    self.written, self.expected
                ),
            ));
        }
        fsio::sync_file(&self.file, &self.path)
    }
}

/// A temp directory that becomes a published output on [`Staging::commit`], or disappears.
pub struct Staging {
    parent: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl Staging {
    /// Create `<parent>/.pmad-tmp-<tag>-<random>/` (creating `parent` if needed).
    pub fn new(parent: &Path, tag: &str) -> Result<Staging> {
        std::fs::create_dir_all(parent).ctx("create directory", parent)?;
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd)
            .map_err(|e| Error::io("getrandom", parent, std::io::Error::other(e.to_string())))?;
        let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = parent.join(format!("{TMP_PREFIX}{tag}-{suffix}"));
        fsio::mkdir(&tmp)?;
        Ok(Staging {
            parent: parent.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// The temp directory being filled.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// fsync the temp dir, rename it to `<parent>/<name>` and fsync the parent. With
    /// `replace`, an existing output of that name is swapped out atomically and then removed.
    pub fn commit(mut self, name: &str, replace: bool) -> Result<PathBuf> {
        let dest = self.parent.join(name);
        fsio::sync_dir(&self.tmp)?;
        let exchanged = if dest.exists() {
            if !replace {
                return Err(Error::Usage(format!(
                    "{} already exists; pass --force to replace it",
                    dest.display()
                )));
            }
            fsio::exchange(&self.tmp, &dest)?;
            // The old output now sits at the temp name; the Drop below removes it.
            true
        } else {
            fsio::rename(&self.tmp, &dest)?;
            false
        };
        if let Err(e) = fsio::sync_dir(&self.parent) {
            // The rename may not be durable and a failed fsync is never retried: abandon the
            // output. Put things back as they were (the old output, if any, returns to its
            // name) and let Drop remove the new one.
            let undo = if exchanged {
                fsio::exchange(&self.tmp, &dest)
            } else {
                std::fs::rename(&dest, &self.tmp).map_err(|e| Error::io("rename", &dest, e))
            };
            if undo.is_err() {
                let _ = std::fs::remove_dir_all(&dest);
            }
            return Err(e);
        }
        self.committed = !exchanged;
        Ok(dest)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // After an exchange the replaced output sits here; it may be a file.
            let _ = match self.tmp.symlink_metadata() {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&self.tmp),
                Ok(_) => std::fs::remove_file(&self.tmp),
                Err(_) => Ok(()),
            };
        }
    }
}

/// Write the config/tokenizer files captured when `c` was opened into `dir`.
pub fn write_aux(c: &crate::checkpoint::Checkpoint, dir: &Path) -> Result<()> {
    for (name, bytes) in &c.aux {
        fsio::write_file(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Point `<out_dir>/LATEST` at `name`: write `LATEST.tmp`, fsync, rename, fsync the dir.
pub fn write_latest(out_dir: &Path, name: &str) -> Result<()> {
    let tmp = out_dir.join("LATEST.tmp");
    let _ = std::fs::remove_file(&tmp);
    fsio::write_file(&tmp, format!("{name}\n").as_bytes())?;
    fsio::rename(&tmp, &out_dir.join(LATEST))?;
    fsio::sync_dir(out_dir)
}

/// Read `<out_dir>/LATEST`, if present.
pub fn read_latest(out_dir: &Path) -> Option<String> {
    std::fs::read_to_string(out_dir.join(LATEST))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Remove leftover temp dirs (from a crash) under `dir`. Returns how many were removed.
pub fn sweep_temps(dir: &Path) -> Result<usize> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) || name == "LATEST.tmp" {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.ctx("remove", &p)?;
            n += 1;
        }
    }
    Ok(n)
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

    #[test]
    fn staging_commits_atomically_or_vanishes() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Staging::new(d.path(), "x").unwrap();
            fsio::write_file(&s.path().join("f"), b"1").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let s = Staging::new(d.path(), "x").unwrap();
        fsio::write_file(&s.path().join("f"), b"1").unwrap();
        let out = s.commit("out", false).unwrap();
        assert_eq!(std::fs::read(out.join("f")).unwrap(), b"1");
        let s = Staging::new(d.path(), "x").unwrap();
        fsio::write_file(&s.path().join("f"), b"2").unwrap();
        assert!(matches!(s.commit("out", false), Err(Error::Usage(_))));
        let s = Staging::new(d.path(), "x").unwrap();
        fsio::write_file(&s.path().join("f"), b"3").unwrap();
        s.commit("out", true).unwrap();
        assert_eq!(std::fs::read(d.path().join("out/f")).unwrap(), b"3");
        // only `out` remains: no temp dirs, no old copy
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out"]);
        write_latest(d.path(), "out").unwrap();
        assert_eq!(read_latest(d.path()).as_deref(), Some("out"));
        std::fs::create_dir(d.path().join(".pmad-tmp-9-abc")).unwrap();
        assert_eq!(sweep_temps(d.path()).unwrap(), 1);
    }
}
