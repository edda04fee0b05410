//! One output made by several pmad instances: the plan that splits it, the parts each
//! instance writes, and the commit that publishes the parts as one output.
//!
//! **The plan** ([`PartitionPlan`]) is computed from headers alone, so every instance computes
//! the same one without talking to the others. By shard: the output's shard files are exactly
//! those a single instance would write (same names, same bytes), dealt to instances by bytes.
//! By tensor: when there are too few shards to balance, each instance gets a set of tensors
//! balanced by bytes and writes them as one shard file of its own. Both deal with the
//! longest-processing-time rule (largest first, to the least loaded instance, ties to the
//! lowest index), which keeps the largest part within `total / count + largest item` and
//! within 4/3 of the best possible split. The plan's hash covers everything that decides the
//! bytes (pmad version, inputs, method, dtypes, the split); parts with another hash are never
//! mixed in.
//!
//! **A part** is the plan's files for one instance written into the shared staging directory
//! `<parent>/.pmad-staging/<name>.<hash>/`, each fsynced, then a marker
//! `part-<i>-of-<n>.json` (file names, sizes, XXH3 checksums) written atomically last. A part
//! whose marker exists is complete; files without a marker are ignored and rewritten.
//!
//! **The commit** checks that every instance's marker is there with the plan's hash and that
//! every file it lists has that size and the plan's header, writes the HF index, then the
//! caller's `merge.json` and aux files, removes the markers (their contents go into
//! `merge.json`), fsyncs and renames the staging directory to `<parent>/<name>`, and fsyncs
//! the parent. Invariants: nothing partial ever appears under `<name>`; committing an output
//! that is already published with the same hash does nothing.

use super::plan::{self, OutTensor, ShardPlan};
use super::write::WrittenFile;
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use crate::names::named_enum;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

named_enum! {
    /// How an output is split between the instances.
    pub enum PartitionBy {
        /// By shard file unless splitting by tensor makes the largest part more than 10%
        /// smaller.
        Auto = "auto",
        /// Whole output shard files per instance, balanced by bytes.
        Shard = "shard",
        /// Tensors per instance, balanced by bytes; each instance writes one shard file.
        Tensor = "tensor",
    }
}

named_enum! {
    /// How the parts of an output become one published output.
    pub enum CommitMode {
        /// `rename` on POSIX filesystems, `marker` on object-store mounts.
        Auto = "auto",
        /// Parts in a staging directory, renamed to `step-N` by the committer.
        Rename = "rename",
        /// Parts written in place under `step-N/`, a `COMMIT` file last (no atomic rename).
        Marker = "marker",
    }
}

/// Directory under an output's parent that holds the parts being written.
pub const STAGING_DIR: &str = ".pmad-staging";

/// In marker mode, the file whose presence makes `step-N/` a published output.
pub const COMMIT: &str = "COMMIT";

/// `statfs` magic of FUSE filesystems (gcsfuse, s3fs, mountpoint-s3, ...).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

impl CommitMode {
    /// The mode to use for outputs under `dir`: `auto` is `marker` on a FUSE mount (where
    /// object-store adapters live, none of which renames a directory atomically) and
    /// `rename` elsewhere. `dir` or its nearest existing ancestor is asked.
    pub fn resolve(self, dir: &Path) -> CommitMode {
        match self {
            CommitMode::Auto => {
                let probe = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
                // `f_type` is a C long: i64 here, i32 on 32-bit targets.
                #[allow(clippy::unnecessary_cast)]
                match rustix::fs::statfs(probe) {
                    Ok(st) if st.f_type as i64 == FUSE_SUPER_MAGIC => CommitMode::Marker,
                    _ => CommitMode::Rename,
                }
            }
            other => other,
        }
    }
}

/// This instance's place among the instances: `index` in `0..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// This instance, from 0.
    pub index: usize,
    /// How many instances share the output.
    pub count: usize,
}

impl FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Part, String> {
        let bad = || format!("{s:?} is not INDEX/COUNT with INDEX below COUNT (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Part { index, count })
    }
}

/// This instance's share of every output, when several instances split them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This instance and how many there are.
    pub part: Part,
    /// How outputs are split.
    pub by: PartitionBy,
}

/// How one output is split between `count` instances.
#[derive(Debug, Clone)]
pub struct PartitionPlan {
    /// Instances.
    pub count: usize,
    /// The split used ([`PartitionBy::Shard`] or [`PartitionBy::Tensor`], never auto).
    pub by: PartitionBy,
    /// Every file of the output, in output order.
    pub shards: Vec<ShardPlan>,
    /// The instance that writes each of `shards`.
    pub owner: Vec<usize>,
    /// 16 hex digits naming this plan: equal plans, equal hashes.
    pub hash: String,
}

/// Deal items (by size) to `count` bins: largest first, each to the least loaded bin (lowest
/// index on ties); items of equal size in index order. Returns each item's bin and each bin's
/// load.
fn deal(sizes: &[u64], count: usize) -> (Vec<usize>, Vec<u64>) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0u64; count];
    let mut bin = vec![0usize; sizes.len()];
    for i in order {
        let (b, _) = load
            .iter()
            .enumerate()
            .min_by(|x, y| x.1.cmp(y.1).then(x.0.cmp(&y.0)))
            .unwrap_or((0, &0));
        bin[i] = b;
        load[b] += sizes[i];
    }
    (bin, load)
}

impl PartitionPlan {
    /// Split the output of `tensors` (shards of at most `shard_size` bytes when by shard)
    /// between `count` instances. `identity` holds what else decides the output's bytes
    /// (inputs, method, weights, accumulator): it goes into the hash only.
    pub fn new(
        tensors: Vec<OutTensor>,
        shard_size: u64,
        metadata: &BTreeMap<String, String>,
        count: usize,
        by: PartitionBy,
        identity: &[u8],
    ) -> Result<PartitionPlan> {
        if count == 0 {
            return Err(Error::Internal("a partition of 0 instances".into()));
        }
        let mut tensors = tensors;
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let whole = plan::plan_shards(tensors.clone(), shard_size, metadata)?;
        let shard_sizes: Vec<u64> = whole.iter().map(|s| s.data_len as u64).collect();
        let (shard_owner, shard_load) = deal(&shard_sizes, count);
        let tensor_sizes: Vec<u64> = tensors.iter().map(|t| t.bytes() as u64).collect();
        let (tensor_owner, tensor_load) = deal(&tensor_sizes, count);
        let max = |l: &[u64]| l.iter().copied().max().unwrap_or(0);
        let by = match by {
            PartitionBy::Auto => {
                // Prefer the single-instance layout unless it is clearly worse balanced.
                if max(&shard_load) as f64 <= 1.1 * max(&tensor_load) as f64 {
                    PartitionBy::Shard
                } else {
                    PartitionBy::Tensor
                }
            }
            other => other,
        };
        let (shards, owner) = if by == PartitionBy::Shard {
            (whole, shard_owner)
        } else {
            let mut groups: Vec<Vec<OutTensor>> = vec![Vec::new(); count];
            for (t, o) in tensors.into_iter().zip(tensor_owner) {
                groups[o].push(t);
            }
            let used: Vec<(usize, Vec<OutTensor>)> = groups
                .into_iter()
                .enumerate()
                .filter(|(_, g)| !g.is_empty())
                .collect();
            let k = used.len();
            let mut shards = Vec::with_capacity(k);
            let mut owner = Vec::with_capacity(k);
            for (i, (o, g)) in used.into_iter().enumerate() {
                shards.push(plan::shard_plan(g, plan::shard_file_name(i, k), metadata)?);
                owner.push(o);
            }
            (shards, owner)
        };
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut put = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(env!("CARGO_PKG_VERSION").as_bytes());
        put(&(count as u64).to_le_bytes());
        put(by.name().as_bytes());
        for (s, o) in shards.iter().zip(&owner) {
            put(s.file_name.as_bytes());
            put(&s.header);
            put(&(*o as u64).to_le_bytes());
        }
        put(identity);
        let hash = format!("{:016x}", h.digest());
        Ok(PartitionPlan {
            count,
            by,
            shards,
            owner,
            hash,
        })
    }

    /// The files instance `index` writes.
    pub fn shards_of(&self, index: usize) -> Vec<ShardPlan> {
        self.shards
            .iter()
            .zip(&self.owner)
            .filter(|(_, o)| **o == index)
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Tensor bytes each instance writes.
    pub fn loads(&self) -> Vec<u64> {
        let mut load = vec![0u64; self.count];
        for (s, o) in self.shards.iter().zip(&self.owner) {
            load[*o] += s.data_len as u64;
        }
        load
    }

    /// The staging directory of output `name` under `parent`.
    pub fn staging_dir(&self, parent: &Path, name: &str) -> PathBuf {
        parent
            .join(STAGING_DIR)
            .join(format!("{name}.{}", self.hash))
    }
}

/// The tensors instance `index` writes in the output of `tensors`. A daemon keeps sums for
/// these only. The header metadata (steps, recipe) never moves a tensor between files, so the
/// set is the same for every output of a recipe as long as the tensors, their output dtypes,
/// the shard size, the count and the split stay the same.
pub fn owned_tensors(
    tensors: Vec<OutTensor>,
    shard_size: u64,
    count: usize,
    by: PartitionBy,
    index: usize,
) -> Result<BTreeSet<String>> {
    let plan = PartitionPlan::new(tensors, shard_size, &BTreeMap::new(), count, by, &[])?;
    Ok(plan
        .shards_of(index)
        .into_iter()
        .flat_map(|s| s.tensors.into_iter().map(|t| t.name))
        .collect())
}

impl Share {
    /// The tensors this instance writes in the output of `tensors` ([`owned_tensors`]).
    pub fn owned(&self, tensors: Vec<OutTensor>, shard_size: u64) -> Result<BTreeSet<String>> {
        owned_tensors(
            tensors,
            shard_size,
            self.part.count,
            self.by,
            self.part.index,
        )
    }
}

/// Remove staging directories under `<parent>/.pmad-staging/` that can no longer be
/// published: those named `<name>.<hash>[.commit-<i>]` for which `dead(name)` holds (e.g. a
/// step at or below the published one), and any not modified for `older_than` (left by a
/// crash). Returns how many were removed. Only one instance (the committer) should sweep.
pub fn sweep(parent: &Path, dead: impl Fn(&str) -> bool, older_than: std::time::Duration) -> usize {
    let root = parent.join(STAGING_DIR);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let name = n.split('.').next().unwrap_or_default();
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= older_than);
        if (dead(name) || stale) && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    let _ = std::fs::remove_dir(&root);
    removed
}

/// Build, for instance `index`, a private directory beside `staging` holding what the
/// published output will: a hard link to every planned file (no data is copied), plus what
/// `finish` writes (index, aux files, `merge.json`). Several instances may commit the same
/// staging directory at once (a takeover racing a slow committer): each works in its own
/// directory, nothing any of them writes is touched by another, and the first rename into
/// place wins. Returns the private directory, fsynced.
pub fn assemble(
    staging: &Path,
    plan: &PartitionPlan,
    index: usize,
    finish: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let name = staging
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = staging.with_file_name(format!("{name}.commit-{index}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).ctx("remove", &dir)?;
    }
    fsio::mkdir(&dir)?;
    let built = (|| {
        for s in &plan.shards {
            let from = staging.join(&s.file_name);
            let to = dir.join(&s.file_name);
            std::fs::hard_link(&from, &to).ctx("link", &from)?;
        }
        finish(&dir)?;
        fsio::sync_dir(&dir)
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

/// The marker that says a part is complete: written last, atomically.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartMarker {
    /// The plan's hash.
    pub plan: String,
    /// The instance that wrote it.
    pub index: usize,
    /// How many instances share the output.
    pub count: usize,
    /// The split of the plan (so a committer can recompute it).
    pub by: PartitionBy,
    /// pmad version that wrote it.
    pub pmad_version: String,
    /// Non-finite values merged into this part (only when allowed).
    pub nonfinite: u64,
    /// The part's files.
    pub files: Vec<WrittenFile>,
}

/// File name of instance `index`'s marker.
pub fn marker_name(index: usize, count: usize) -> String {
    format!("part-{:05}-of-{:05}.json", index + 1, count)
}

/// Write `marker` into `dir` atomically and durably (temp file, fsync, rename, fsync dir):
/// a marker is either absent or whole. With `in_place` (marker mode: no renames) it is
/// written under its name directly; readers take a marker without its final newline for
/// one still being written.
pub fn write_marker(dir: &Path, marker: &PartMarker, in_place: bool) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(marker).unwrap_or_default();
    json.push(b'\n');
    let name = marker_name(marker.index, marker.count);
    if in_place {
        let path = dir.join(&name);
        remove_if_there(&path)?;
        fsio::write_file(&path, &json)?;
        return fsio::sync_dir(dir);
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    fsio::write_file(&tmp, &json)?;
    fsio::rename(&tmp, &dir.join(&name))?;
    fsio::sync_dir(dir)
}

/// Remove what a failed run of part `index` may have left in `dir` (its own files, whole or
/// not, and its marker's temp file), so that running the part again starts clean. Files of
/// other parts are not touched: each file of a plan has exactly one owner.
pub fn clear_part(dir: &Path, plan: &PartitionPlan, index: usize) -> Result<()> {
    let tmp = format!(".{}.tmp", marker_name(index, plan.count));
    let names = plan.shards_of(index).into_iter().map(|s| s.file_name);
    for name in names.chain(std::iter::once(tmp)) {
        remove_if_there(&dir.join(name))?;
    }
    Ok(())
}

/// Remove what a failed commit may have left in `dir`: everything that is neither a planned
/// part file nor a marker (the index, aux files, `merge.json`, temp files), so that the
/// commit writes them again from scratch.
pub fn clear_commit(dir: &Path, plan: &PartitionPlan) -> Result<()> {
    let planned: std::collections::HashSet<&str> =
        plan.shards.iter().map(|s| s.file_name.as_str()).collect();
    for e in std::fs::read_dir(dir).ctx("list", dir)?.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let keep = n.starts_with("part-") && n.ends_with(".json");
        if !keep && !planned.contains(n.as_ref()) {
            remove_if_there(&e.path())?;
        }
    }
    Ok(())
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// Some marker in `dir`, if there is one (to learn the count and split a plan was made for).
pub fn any_marker(dir: &Path) -> Result<Option<PartMarker>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut names: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".json"))
        })
        .collect();
    names.sort();
    let Some(path) = names.first() else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).ctx("read", path)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::invalid(path, format!("unreadable part marker: {e}")))
}

/// Hashes of other plans whose markers are in `dir` (marker mode: instances that disagree
/// write into the same `step-N/`).
pub fn foreign_plans(dir: &Path, hash: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.starts_with("part-") && n.ends_with(".json")
                })
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice::<PartMarker>(&b).ok())
                .map(|m| m.plan)
                .filter(|p| p != hash)
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.dedup();
    v
}

/// What a staging directory holds against a plan.
#[derive(Debug)]
pub enum PartsState {
    /// Every part is there and checks out (markers in instance order).
    Complete(Vec<PartMarker>),
    /// These instances' parts are not there yet.
    Missing(Vec<usize>),
}

/// Check the parts in `dir` against `plan`: every marker present, with the plan's hash, and
/// every file it lists there, of its size, starting with the plan's header. An error names
/// the first file that does not check out. With `in_place` (marker mode: every plan's parts
/// land in `step-N/` itself) a marker still being written or of another plan counts as
/// missing: that instance's part of this plan is not there.
pub fn check_parts(dir: &Path, plan: &PartitionPlan, in_place: bool) -> Result<PartsState> {
    let mut markers = Vec::with_capacity(plan.count);
    let mut missing = Vec::new();
    for index in 0..plan.count {
        let path = dir.join(marker_name(index, plan.count));
        let bytes = match std::fs::read(&path) {
            Ok(b) if in_place && !b.ends_with(b"\n") => {
                missing.push(index);
                continue;
            }
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(index);
                continue;
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let m: PartMarker = serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(&path, format!("unreadable part marker: {e}")))?;
        if in_place && m.plan != plan.hash {
            missing.push(index);
            continue;
        }
        if m.plan != plan.hash || m.index != index || m.count != plan.count {
            return Err(Error::invalid(
                &path,
                format!(
                    "part {}/{} of plan {} where plan {} expects part {index}/{}: the instances \
                     disagree on the inputs, the options or the pmad version",
                    m.index, m.count, m.plan, plan.hash, plan.count
                ),
            ));
        }
        let expected = plan.shards_of(index);
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|s| s.file_name.as_str()).collect();
        if names != want {
            return Err(Error::invalid(
                &path,
                format!("lists files {names:?}, the plan gives this part {want:?}"),
            ));
        }
        for (f, s) in m.files.iter().zip(&expected) {
            check_file(dir, s, Some(f.bytes))?;
        }
        markers.push(m);
    }
    if missing.is_empty() {
        Ok(PartsState::Complete(markers))
    } else {
        Ok(PartsState::Missing(missing))
    }
}

/// Check that every file of `plan` is in `dir` with its planned size and header (what a
/// commit resumed from its record relies on; the markers may be gone).
pub fn check_files(dir: &Path, plan: &PartitionPlan) -> Result<()> {
    for s in &plan.shards {
        check_file(dir, s, None)?;
    }
    Ok(())
}

/// One planned file in `dir`: its size (and the marker's, if given) and its header.
fn check_file(dir: &Path, s: &ShardPlan, marker_bytes: Option<u64>) -> Result<()> {
    let fp = dir.join(&s.file_name);
    let len = fp.metadata().ctx("stat", &fp)?.len();
    let planned = (s.header.len() + s.data_len) as u64;
    if len != planned || marker_bytes.is_some_and(|b| b != len) {
        return Err(Error::invalid(
            &fp,
            format!(
                "{len} bytes, the plan says {planned}{}",
                marker_bytes
                    .map(|b| format!(" and its marker {b}"))
                    .unwrap_or_default()
            ),
        ));
    }
    let mut head = vec![0u8; s.header.len()];
    let mut file = std::fs::File::open(&fp).ctx("open", &fp)?;
    std::io::Read::read_exact(&mut file, &mut head).ctx("read", &fp)?;
    if head != s.header {
        return Err(Error::invalid(&fp, "its header is not the plan's"));
    }
    Ok(())
}

/// Publish a checked staging directory as `<parent>/<name>`: remove the markers (the caller
/// has recorded them in `merge.json`), fsync the directory, rename it into place, fsync the
/// parent. With `replace`, an existing output is swapped out atomically and removed.
pub fn publish(staging: &Path, parent: &Path, name: &str, replace: bool) -> Result<PathBuf> {
    let dest = parent.join(name);
    for e in std::fs::read_dir(staging).ctx("list", staging)?.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("part-") && n.ends_with(".json") || n.starts_with(".part-") {
            let p = e.path();
            std::fs::remove_file(&p).ctx("remove", &p)?;
        }
    }
    fsio::sync_dir(staging)?;
    if dest.exists() {
        if !replace {
            return Err(Error::Usage(format!(
                "{} already exists; pass --force to replace it",
                dest.display()
            )));
        }
        fsio::exchange(staging, &dest)?;
        fsio::sync_dir(parent)?;
        std::fs::remove_dir_all(staging).ctx("remove", staging)?;
    } else {
        fsio::rename(staging, &dest)?;
        fsio::sync_dir(parent)?;
    }
    if let Some(root) = staging.parent() {
        // The shared staging root goes when it is empty; other outputs may still use it.
        let _ = std::fs::remove_dir(root);
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::Dtype;

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor {
            raw: None,
            name: name.into(),
            dtype: Dtype::BF16,
            shape: vec![n],
        }
    }

    fn meta() -> BTreeMap<String, String> {
        BTreeMap::from([("format".to_string(), "pt".to_string())])
    }

    #[test]
    fn parts_parse_as_index_over_count() {
        assert_eq!("1/4".parse::<Part>(), Ok(Part { index: 1, count: 4 }));
        for bad in ["4/4", "1", "a/2", "0/0", "-1/2", ""] {
            assert!(bad.parse::<Part>().is_err(), "{bad}");
        }
    }

    #[test]
    fn by_shard_keeps_the_single_instance_files_and_balances_them() {
        // 8 shards of 1000 bytes and one of 200: two instances get 4 and 4 + the small one.
        let ts: Vec<OutTensor> = (0..17).map(|i| t(&format!("t{i:02}"), 250)).collect();
        let single = plan::plan_shards(ts.clone(), 1000, &meta()).unwrap();
        let p = PartitionPlan::new(ts, 1000, &meta(), 2, PartitionBy::Auto, b"x").unwrap();
        assert_eq!(p.by, PartitionBy::Shard);
        let names = |s: &[ShardPlan]| s.iter().map(|s| s.file_name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&p.shards), names(&single));
        for (a, b) in p.shards.iter().zip(&single) {
            assert_eq!(a.header, b.header);
        }
        assert_eq!(p.loads(), vec![4500, 4000]);
        let mut all = names(&p.shards_of(0));
        all.extend(names(&p.shards_of(1)));
        all.sort();
        assert_eq!(all, names(&single));
    }

    #[test]
    fn too_few_shards_split_by_tensor_one_file_per_instance() {
        // One shard holding everything: by shard, one instance would do all the work.
        let ts: Vec<OutTensor> = (0..10)
            .map(|i| t(&format!("t{i}"), 100 * (i + 1)))
            .collect();
        let p =
            PartitionPlan::new(ts.clone(), u64::MAX, &meta(), 4, PartitionBy::Auto, b"").unwrap();
        assert_eq!(p.by, PartitionBy::Tensor);
        assert_eq!(p.shards.len(), 4);
        assert_eq!(p.shards[0].file_name, "model-00001-of-00004.safetensors");
        let total: u64 = ts.iter().map(|t| t.bytes() as u64).sum();
        let largest = ts.iter().map(|t| t.bytes() as u64).max().unwrap();
        let loads = p.loads();
        assert_eq!(loads.iter().sum::<u64>(), total);
        assert!(
            *loads.iter().max().unwrap() <= total / 4 + largest,
            "{loads:?}"
        );
        // Each tensor is in exactly one file.
        let mut names: Vec<String> = p
            .shards
            .iter()
            .flat_map(|s| s.tensors.iter().map(|t| t.name.clone()))
            .collect();
        names.sort();
        let mut want: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
        want.sort();
        assert_eq!(names, want);
        // More instances than tensors: some instances write nothing.
        let p = PartitionPlan::new(
            ts[..2].to_vec(),
            u64::MAX,
            &meta(),
            4,
            PartitionBy::Tensor,
            b"",
        )
        .unwrap();
        assert_eq!(p.shards.len(), 2);
        assert!(p.shards_of(3).is_empty());
    }

    #[test]
    fn the_hash_changes_with_anything_that_decides_the_bytes() {
        let ts: Vec<OutTensor> = (0..6).map(|i| t(&format!("t{i}"), 100)).collect();
        let h = |ts: Vec<OutTensor>, count, by, id: &[u8]| {
            PartitionPlan::new(ts, 400, &meta(), count, by, id)
                .unwrap()
                .hash
        };
        let base = h(ts.clone(), 2, PartitionBy::Shard, b"a");
        assert_eq!(base, h(ts.clone(), 2, PartitionBy::Shard, b"a"));
        assert_ne!(base, h(ts.clone(), 3, PartitionBy::Shard, b"a"));
        assert_ne!(base, h(ts.clone(), 2, PartitionBy::Tensor, b"a"));
        assert_ne!(base, h(ts.clone(), 2, PartitionBy::Shard, b"b"));
        assert_ne!(base, h(ts[1..].to_vec(), 2, PartitionBy::Shard, b"a"));
    }

    proptest! {
        /// Every instance computes the plan from its own directory listing: the order in
        /// which tensors are found must not matter, and the split stays within the bound.
        #[test]
        fn the_plan_does_not_depend_on_listing_order(
            sizes in proptest::collection::vec(1usize..5000, 1..60),
            count in 1usize..9,
            shard_size in 1000u64..40_000,
            seed in any::<u64>(),
            by in prop_oneof![Just(PartitionBy::Auto), Just(PartitionBy::Shard), Just(PartitionBy::Tensor)],
        ) {
            let ts: Vec<OutTensor> =
                sizes.iter().enumerate().map(|(i, n)| t(&format!("layer.{i}.w"), *n)).collect();
            let mut shuffled = ts.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let a = PartitionPlan::new(ts.clone(), shard_size, &meta(), count, by, b"id").unwrap();
            let b = PartitionPlan::new(shuffled, shard_size, &meta(), count, by, b"id").unwrap();
            prop_assert_eq!(&a.hash, &b.hash);
            prop_assert_eq!(&a.owner, &b.owner);
            for (x, y) in a.shards.iter().zip(&b.shards) {
                prop_assert_eq!(&x.file_name, &y.file_name);
                prop_assert_eq!(&x.header, &y.header);
            }
            // The list-scheduling bound: no part above an even share plus the largest item.
            let total: u64 = ts.iter().map(|t| t.bytes() as u64).sum();
            let items: Vec<u64> = if a.by == PartitionBy::Shard {
                a.shards.iter().map(|s| s.data_len as u64).collect()
            } else {
                ts.iter().map(|t| t.bytes() as u64).collect()
            };
            let largest = items.iter().copied().max().unwrap_or(0);
            let loads = a.loads();
            prop_assert_eq!(loads.iter().sum::<u64>(), total);
            prop_assert!(*loads.iter().max().unwrap() <= total.div_ceil(count as u64) + largest);
        }
    }
}
