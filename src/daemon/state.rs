//! Persisted daemon state under `state.dir`: the accumulators plus a manifest, written
//! crash-consistently, and the exclusive lock on the directory.
//!
//! Layout: `lock` (flock: one pmad per state dir), `acc-<generation>.bin` (the raw accumulator
//! store), `manifest.json` (which generation is current, the window's steps with file
//! fingerprints, per-recipe bookkeeping). A save writes the next generation's accumulators to
//! a temp file, fsyncs, renames; then the manifest the same way; then fsyncs the directory and
//! deletes older generations. A crash at any point leaves the previous manifest pointing at a
//! complete generation, so a restart never sees a torn state. A failed fsync abandons the save.
//! A file-backed accumulator store already keeps each generation in `acc-<generation>.bin`
//! and never writes one again ([`crate::math::accum`]), so its save is an fsync of the current
//! file plus the manifest ([`AccBytes::Current`]), and a restore maps the saved file as it is:
//! no copy of a larger-than-RAM store either way.
//!
//! This module owns the files and their format; what a restart does with a manifest is
//! [`super::resume`]'s.

use crate::error::{Error, IoContext, Result};
use crate::format::Fingerprint;
use crate::fsio;
use crate::math::accum::{self, AccStore, FlatLayout};
use crate::math::kinds::Accumulator;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Bumped when the format changes; older states are ignored (and rebuilt).
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
const JOURNAL: &str = "journal.json";

/// The checkpoints absorbed into the sums after the saved generation `generation`, while
/// their save waits (`state.save_interval`). A restart reads them again from the training
/// directory; the journal says which of them it can no longer find.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Journal {
    /// The generation of the saved state these checkpoints came after (0: none saved yet).
    pub generation: u64,
    /// Step and path of each checkpoint absorbed since, oldest first.
    pub absorbed: Vec<(u64, PathBuf)>,
}

/// One pinned checkpoint as saved.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedCheckpoint {
    /// Step.
    pub step: u64,
    /// Directory (or file) it was opened from.
    pub path: PathBuf,
    /// Each weight file and its fingerprint when it was accepted.
    pub files: Vec<(PathBuf, Fingerprint)>,
}

/// The recipe configuration a state's sums belong to (name, method with its parameters,
/// window), as saved in the manifest: a state saved under other recipes is not resumed.
pub fn recipes_signature(recipes: &[crate::config::Recipe]) -> String {
    recipes
        .iter()
        .map(|r| format!("{}:{:?}:{}", r.name, r.method, r.window))
        .collect::<Vec<_>>()
        .join(";")
}

/// A recipe's bookkeeping as saved in the manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedRecipe {
    /// Recipe name.
    pub name: String,
    /// Steps in the sums (SMA/WMA/weights).
    pub members: Vec<u64>,
    /// Steps absorbed (EMA).
    pub absorbed: Vec<u64>,
    /// Accepted since the last emission.
    pub since_emit: u64,
    /// Last published step.
    pub last_emitted_step: Option<u64>,
}

/// The manifest: everything except the accumulator bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Generation of the accumulator file this manifest goes with.
    pub generation: u64,
    /// Precision of the saved accumulators (written as "f32" or "f64"; anything else makes
    /// the manifest unreadable, never silently f32).
    pub accumulator: Accumulator,
    /// Recipe configuration the sums belong to (name, method, window, alpha).
    pub recipes_signature: String,
    /// Layout of the accumulators.
    pub layout: FlatLayout,
    /// Pinned window.
    pub window: Vec<SavedCheckpoint>,
    /// Per-recipe bookkeeping.
    pub recipes: Vec<SavedRecipe>,
    /// Newest step pmad had considered (checkpoints at or below it are not re-processed).
    pub newest_step: Option<u64>,
    /// Accepted step → path, for merge.json of EMA outputs.
    pub paths: Vec<(u64, PathBuf)>,
}

/// Where a snapshot's accumulator bytes come from.
#[derive(Debug, Clone, Copy)]
pub enum AccBytes<'a> {
    /// An in-RAM store.
    Memory(&'a [u8]),
    /// A file-backed store's current generation: its file `acc-<generation>.bin` is already
    /// in the state directory and never written again, so the save fsyncs it and points the
    /// manifest at it (no copy).
    Current(u64),
}

impl<'a> AccBytes<'a> {
    /// How to snapshot `acc`: its current generation file when file-backed, else a copy of
    /// its bytes.
    pub fn of(acc: &'a dyn AccStore) -> AccBytes<'a> {
        match acc.file() {
            Some((generation, _)) => AccBytes::Current(generation),
            None => AccBytes::Memory(acc.raw()),
        }
    }
}

/// The open state directory (holds the lock for the daemon's lifetime).
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
    generation: u64,
}

impl StateDir {
    /// Create/open `dir` and take its exclusive lock; fails clearly if another pmad holds it.
    pub fn open(dir: &Path) -> Result<StateDir> {
        std::fs::create_dir_all(dir).ctx("create directory", dir)?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        rustix::fs::flock(
            lock.as_fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .map_err(|_| {
            Error::Usage(format!(
                "state.dir {} is in use by another pmad (lock {})",
                dir.display(),
                lock_path.display()
            ))
        })?;
        // Leftovers of a save interrupted by a crash.
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(StateDir {
            dir: dir.to_path_buf(),
            _lock: lock,
            generation: 0,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Generation of the accumulators the saved manifest names.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Load the manifest, if a state exists: `Ok(None)` when there is none, an error when
    /// one exists but cannot be used (unreadable, another format, its accumulator file
    /// `acc-<generation>.bin` missing).
    pub fn load(&mut self) -> Result<Option<Manifest>> {
        let p = self.dir.join(MANIFEST);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &p, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(&p, format!("unreadable ({e})")))?;
        if m.format != FORMAT {
            return Err(Error::invalid(
                &p,
                format!("format {} (this pmad writes {FORMAT})", m.format),
            ));
        }
        self.generation = m.generation;
        let acc = self.acc_path(m.generation);
        if !acc.exists() {
            return Err(Error::invalid(&acc, "is missing"));
        }
        Ok(Some(m))
    }

    fn acc_path(&self, generation: u64) -> PathBuf {
        accum::generation_path(&self.dir, generation)
    }

    /// Record the checkpoints absorbed since the saved generation (small: written after every
    /// such arrival, atomically).
    pub fn write_journal(&self, absorbed: Vec<(u64, PathBuf)>) -> Result<()> {
        let j = Journal {
            generation: self.generation,
            absorbed,
        };
        let json = serde_json::to_vec(&j).unwrap_or_default();
        let tmp = self.dir.join("journal.json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let r = fsio::write_file(&tmp, &json)
            .and_then(|_| fsio::rename(&tmp, &self.dir.join(JOURNAL)))
            .and_then(|_| fsio::sync_dir(&self.dir));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// The journal written after the generation loaded last (see [`StateDir::load`]), if any.
    pub fn journal(&self) -> Option<Journal> {
        let bytes = std::fs::read(self.dir.join(JOURNAL)).ok()?;
        let j: Journal = serde_json::from_slice(&bytes).ok()?;
        (j.generation == self.generation).then_some(j)
    }

    /// Save a new generation: accumulator bytes (when `acc` is given; otherwise the current
    /// generation's bytes are still valid) and the manifest. Returns bytes written.
    pub fn save(&mut self, mut m: Manifest, acc: Option<AccBytes<'_>>) -> Result<u64> {
        let mut written = 0u64;
        match acc {
            None => {}
            Some(AccBytes::Current(generation)) => {
                let path = self.acc_path(generation);
                let f = File::open(&path).ctx("open", &path)?;
                fsio::sync_file(&f, &path)?;
                written += f.metadata().ctx("stat", &path)?.len();
                self.generation = generation;
            }
            Some(AccBytes::Memory(bytes)) => {
                let next = self.generation + 1;
                let tmp = self.dir.join(format!("acc-{next}.bin.tmp"));
                let _ = std::fs::remove_file(&tmp);
                let mut f = fsio::create(&tmp)?;
                let r = (|| {
                    for chunk in bytes.chunks(64 << 20) {
                        fsio::write_all(&mut f, &tmp, chunk)?;
                    }
                    fsio::sync_file(&f, &tmp)?;
                    fsio::rename(&tmp, &self.acc_path(next))
                })();
                if let Err(e) = r {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                written += bytes.len() as u64;
                self.generation = next;
            }
        }
        m.generation = self.generation;
        let json = serde_json::to_vec_pretty(&m).unwrap_or_default();
        let tmp = self.dir.join("manifest.json.tmp");
        let _ = std::fs::remove_file(&tmp);
        let r = fsio::write_file(&tmp, &json)
            .and_then(|_| fsio::rename(&tmp, &self.dir.join(MANIFEST)))
            .and_then(|_| fsio::sync_dir(&self.dir));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        written += json.len() as u64;
        // A journal names an older generation now: it is ignored, and removed.
        let _ = std::fs::remove_file(self.dir.join(JOURNAL));
        // Older generations are unreachable now.
        for g in accum::generations(&self.dir) {
            if g != self.generation {
                let _ = std::fs::remove_file(self.acc_path(g));
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            generation: 0,
            accumulator: Accumulator::F32,
            recipes_signature: "sma:4".into(),
            layout: FlatLayout {
                tensors: vec![],
                total: 0,
            },
            window: vec![],
            recipes: vec![],
            newest_step: Some(7),
            paths: vec![],
        }
    }

    #[test]
    fn save_and_load_generations() {
        let d = tempfile::tempdir().unwrap();
        let mut s = StateDir::open(d.path()).unwrap();
        assert_eq!(s.load().unwrap(), None);
        s.save(manifest(), Some(AccBytes::Memory(&[1, 2, 3, 4])))
            .unwrap();
        // A file-backed store's own generation file: fsynced and named, not copied.
        std::fs::write(d.path().join("acc-2.bin"), [5, 6, 7, 8]).unwrap();
        s.save(manifest(), Some(AccBytes::Current(2))).unwrap();
        // Manifest-only save keeps the generation.
        let mut m = manifest();
        m.newest_step = Some(9);
        s.save(m, None).unwrap();
        drop(s);
        let mut s = StateDir::open(d.path()).unwrap();
        let m = s.load().unwrap().unwrap();
        let acc = accum::generation_path(d.path(), m.generation);
        assert_eq!(m.generation, 2);
        assert_eq!(m.newest_step, Some(9));
        let mut buf = [0u8; 4];
        accum::read_into(&acc, &mut buf).unwrap();
        assert_eq!(buf, [5, 6, 7, 8]);
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("acc-"))
            .collect();
        assert_eq!(names, ["acc-2.bin"]);
        assert!(accum::read_into(&acc, &mut [0u8; 3]).is_err());
    }

    #[test]
    fn a_journal_counts_only_after_the_generation_it_names() {
        let d = tempfile::tempdir().unwrap();
        let mut sd = StateDir::open(d.path()).unwrap();
        assert_eq!(sd.journal(), None);
        let absorbed = vec![(100, PathBuf::from("/w/checkpoint-100"))];
        sd.write_journal(absorbed.clone()).unwrap();
        let j = sd.journal().unwrap();
        assert_eq!((j.generation, j.absorbed), (0, absorbed.clone()));
        // Saving the sums supersedes it.
        sd.save(manifest(), Some(AccBytes::Memory(&[0u8; 8])))
            .unwrap();
        assert_eq!(sd.generation(), 1);
        assert_eq!(sd.journal(), None);
        assert!(!d.path().join(JOURNAL).exists());
        // A journal after generation 1, read by a restart that loads generation 1.
        sd.write_journal(absorbed.clone()).unwrap();
        drop(sd);
        let mut sd = StateDir::open(d.path()).unwrap();
        assert!(sd.load().unwrap().is_some());
        assert_eq!(sd.journal().unwrap().absorbed, absorbed);
    }

    #[test]
    fn second_instance_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _a = StateDir::open(d.path()).unwrap();
        let e = StateDir::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("in use"), "{e}");
    }

    #[test]
    fn torn_leftovers_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let mut s = StateDir::open(d.path()).unwrap();
        s.save(manifest(), Some(AccBytes::Memory(&[1, 2]))).unwrap();
        drop(s);
        std::fs::write(d.path().join("acc-2.bin.tmp"), b"torn").unwrap();
        std::fs::write(d.path().join("manifest.json.tmp"), b"{\"torn").unwrap();
        let mut s = StateDir::open(d.path()).unwrap();
        assert_eq!(s.load().unwrap().unwrap().generation, 1);
        assert!(!d.path().join("acc-2.bin.tmp").exists());
    }
}
