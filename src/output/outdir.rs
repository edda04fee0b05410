//! A recipe's output directory: the one owner of its layout.
//!
//! ```text
//! <out_dir>/step-<N>/          one published output (shards, index, aux files, merge.json)
//! <out_dir>/LATEST             the name of the newest complete output, replaced atomically
//! <out_dir>/.pmad-tmp-*        an output being written (removed at start if left by a crash)
//! <out_dir>/.pmad-lock         held (flock) while a step-<N> name or LATEST changes
//! ```
//!
//! Invariants: `step-<N>/` appears only complete (written in a [`Staging`] dir, renamed into
//! place); `LATEST` is replaced only after that and always names a complete output; if
//! `LATEST` cannot be updated the new output is removed again, so nothing newer than `LATEST`
//! stays behind; retention deletes old outputs only after the new one is published and never
//! the one `LATEST` names.
//!
//! Several processes may share one output directory (`[partition]`: every instance may
//! commit). Each change of a `step-<N>` name, of `LATEST` and each retention pass happens
//! under an exclusive `flock` of `.pmad-lock`, so a read of `LATEST` followed by its
//! replacement is never interleaved with another process's: `LATEST` only moves forward and
//! always names an output that exists. The lock is released by the kernel when its holder
//! dies; it works on local filesystems, NFSv4 and Lustre/GPFS mounted with flock support.
//! Where the filesystem has no locks (ENOLCK, ENOSYS, EOPNOTSUPP) pmad goes on without one,
//! which is safe for a single process.

use super::record::MergeRecord;
use super::staging::{self, Staging};
use crate::error::{IoContext, Result};
use crate::fsio;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the lock file serialising changes of output names and `LATEST`.
pub const LOCK: &str = ".pmad-lock";
/// How long to wait for the lock before giving up (the holder keeps it for milliseconds).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Name of the pointer file to the newest complete output.
pub const LATEST: &str = "LATEST";
/// The temp name `LATEST` is written under before its rename.
const LATEST_TMP: &str = "LATEST.tmp";

/// A recipe's output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutDir {
    path: PathBuf,
}

/// An output that was published.
#[derive(Debug, Clone)]
pub struct Published {
    /// `<out_dir>/step-<N>`.
    pub path: PathBuf,
    /// Older outputs deleted by retention.
    pub removed: Vec<PathBuf>,
}

impl OutDir {
    /// The output directory at `path` (nothing is created yet).
    pub fn new(path: impl Into<PathBuf>) -> OutDir {
        OutDir { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory name of the output for `step`.
    pub fn step_name(step: u64) -> String {
        format!("step-{step}")
    }

    /// The step of an output directory name: the inverse of [`OutDir::step_name`].
    pub fn step_of(name: &str) -> Option<u64> {
        name.strip_prefix("step-")?.parse().ok()
    }

    /// Where the output for `step` is (or would be) published.
    pub fn step_path(&self, step: u64) -> PathBuf {
        self.path.join(Self::step_name(step))
    }

    /// Create the directory if needed and remove what a crash left: temp dirs and a
    /// `LATEST.tmp`; returns how many were removed.
    pub fn prepare(&self) -> Result<usize> {
        std::fs::create_dir_all(&self.path).ctx("create directory", &self.path)?;
        // Under the lock: another instance sharing the directory may be writing LATEST
        // through a temp name right now; while we hold the lock, every temp is a dead one's.
        let _lock = self.lock()?;
        let tmp = self.path.join(LATEST_TMP);
        let latest_tmp = match std::fs::remove_file(&tmp) {
            Ok(()) => 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(crate::Error::io("remove", &tmp, e)),
        };
        Ok(staging::sweep_temps(&self.path)? + latest_tmp)
    }

    /// Take the directory's lock ([`LOCK`]), waiting up to 10 s; `None` where the
    /// filesystem has no locks. Released when the returned file is dropped.
    fn lock(&self) -> Result<Option<std::fs::File>> {
        let p = self.path.join(LOCK);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .ctx("open", &p)?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(Some(f)),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(crate::Error::io(
                        "lock",
                        &p,
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "held by another process for {} s (a stalled pmad instance sharing this out_dir?)",
                                LOCK_WAIT.as_secs()
                            ),
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(e))
                    if e.kind() == std::io::ErrorKind::Unsupported
                        || matches!(
                            e.raw_os_error(),
                            Some(libc::ENOLCK | libc::ENOSYS | libc::EOPNOTSUPP)
                        ) =>
                {
                    return Ok(None);
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(crate::Error::io("lock", &p, e));
                }
            }
        }
    }

    /// The step `LATEST` names, if any.
    pub fn latest(&self) -> Option<u64> {
        let s = std::fs::read_to_string(self.path.join(LATEST)).ok()?;
        Self::step_of(s.trim())
    }

    /// Point `LATEST` at the output for `step`: write a temp file, fsync, rename, fsync the
    /// directory. Callers hold the lock.
    fn set_latest(&self, step: u64) -> Result<()> {
        // A temp name of this call's own: instances sharing the directory ([partition]) may
        // move LATEST at the same moment, and must not take each other's temp file.
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd).map_err(|e| {
            crate::Error::io(
                "getrandom",
                &self.path,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let suffix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = self
            .path
            .join(format!("{}{LATEST_TMP}-{suffix}", staging::TMP_PREFIX));
        let written = fsio::write_file(&tmp, format!("{}\n", Self::step_name(step)).as_bytes())
            .and_then(|()| fsio::rename(&tmp, &self.path.join(LATEST)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        fsio::sync_dir(&self.path)
    }

    /// Whether the output for `step` exists and its `merge.json` records exactly `steps`.
    pub fn published_as(&self, step: u64, steps: &[u64]) -> bool {
        matches!(
            MergeRecord::read(&self.step_path(step)),
            Ok(Some(m)) if m.steps.iter().copied().eq(steps.iter().map(|x| Some(*x)))
        )
    }

    /// Published outputs, oldest step first.
    pub fn outputs(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.path)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name();
                        let s = Self::step_of(n.to_str()?)?;
                        e.path().is_dir().then(|| (s, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A temp dir to write the output for `step` into.
    pub fn stage(&self, step: u64) -> Result<Staging> {
        Staging::new(&self.path, &step.to_string())
    }

    /// Publish a complete staged output as `step-<step>` (replacing one of that name
    /// atomically), point `LATEST` at it, then delete the oldest outputs beyond `keep`
    /// (0 = keep all).
    pub fn publish(&self, staged: Staging, step: u64, keep: usize) -> Result<Published> {
        let name = Self::step_name(step);
        let _lock = self.lock()?;
        let path = staged.commit(&name, true)?;
        if let Err(e) = self.set_latest(step) {
            // LATEST still names the previous complete output. Do not leave a newer output
            // that nothing points at: abandon it, so a retry publishes it properly.
            let _ = std::fs::remove_dir_all(&path);
            let _ = fsio::sync_dir(&self.path);
            return Err(e);
        }
        let removed = self.retain(keep, &name);
        Ok(Published { path, removed })
    }

    /// Publish a directory assembled from checked parts ([`super::partition::assemble`]) as
    /// `step-<step>`, unless `same` says the output already there is this one (another
    /// instance committed it first: `staging` is removed and `None` returned). Move `LATEST`
    /// to it only if `step` is newer than what `LATEST` names (parts of an older step may
    /// complete late, and `LATEST` never moves back); then apply retention. All of it under
    /// the directory's lock, so committers of other steps never interleave.
    pub fn publish_parts(
        &self,
        staging: &Path,
        step: u64,
        keep: usize,
        same: impl Fn(&Path) -> bool,
    ) -> Result<Option<Published>> {
        let name = Self::step_name(step);
        let path = self.path.join(&name);
        let _lock = self.lock()?;
        if path.exists() {
            if same(&path) {
                std::fs::remove_dir_all(staging).ctx("remove", staging)?;
                self.forward_latest(step)?;
                return Ok(None);
            }
            // An output of another plan (an earlier run): swapped out atomically, removed.
            fsio::exchange(staging, &path)?;
            fsio::sync_dir(&self.path)?;
            std::fs::remove_dir_all(staging).ctx("remove", staging)?;
        } else {
            fsio::rename(staging, &path)?;
            fsio::sync_dir(&self.path)?;
        }
        if let Err(e) = self.forward_latest(step) {
            // As in `publish`: nothing newer than LATEST stays behind.
            if self.latest().is_none_or(|l| l < step) {
                let _ = std::fs::remove_dir_all(&path);
                let _ = fsio::sync_dir(&self.path);
            }
            return Err(e);
        }
        let latest = Self::step_name(self.latest().map_or(step, |l| l.max(step)));
        let removed = self.retain(keep, &latest);
        Ok(Some(Published { path, removed }))
    }

    /// Move `LATEST` to the published output of `step` if that is newer than what it names
    /// (a committer that died between publishing and moving `LATEST` leaves this to whoever
    /// sees the output next).
    pub fn advance_latest(&self, step: u64) -> Result<()> {
        let _lock = self.lock()?;
        if self.step_path(step).is_dir() {
            self.forward_latest(step)?;
        }
        Ok(())
    }

    /// With the lock held: point `LATEST` at `step` if it names an older step or nothing.
    fn forward_latest(&self, step: u64) -> Result<()> {
        if self.latest().is_none_or(|l| step > l) {
            self.set_latest(step)?;
        }
        Ok(())
    }

    /// Delete the oldest outputs beyond `keep` (0 = keep all), never `latest`.
    fn retain(&self, keep: usize, latest: &str) -> Vec<PathBuf> {
        if keep == 0 {
            return Vec::new();
        }
        let all = self.outputs();
        let excess = all.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for (_, p) in all.into_iter().take(excess) {
            if p.file_name().and_then(|n| n.to_str()) == Some(latest) {
                continue;
            }
            if std::fs::remove_dir_all(&p).is_ok() {
                removed.push(p);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(out: &OutDir, step: u64, byte: u8) -> Staging {
        let s = out.stage(step).unwrap();
        fsio::write_file(&s.path().join("f"), &[byte]).unwrap();
        s
    }

    #[test]
    fn publish_names_latest_and_retains() {
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::new(d.path().join("sma"));
        assert_eq!(out.prepare().unwrap(), 0);
        assert_eq!(out.latest(), None);
        for step in [100, 200, 300] {
            let p = out
                .publish(staged(&out, step, step as u8), step, 2)
                .unwrap();
            assert_eq!(p.path, out.step_path(step));
            assert_eq!(out.latest(), Some(step));
        }
        let steps: Vec<u64> = out.outputs().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [200, 300]);
        // Publishing the same step again replaces it atomically.
        out.publish(staged(&out, 300, 7), 300, 2).unwrap();
        assert_eq!(std::fs::read(out.step_path(300).join("f")).unwrap(), [7]);
        assert_eq!(OutDir::step_of("step-42"), Some(42));
        assert_eq!(OutDir::step_of("step-x"), None);
        // No temp dirs or LATEST.tmp are left; a crash's leftovers are swept.
        std::fs::create_dir(out.path().join(format!("{}9-abc", staging::TMP_PREFIX))).unwrap();
        std::fs::write(out.path().join(LATEST_TMP), b"x").unwrap();
        assert_eq!(out.prepare().unwrap(), 2);
    }

    #[test]
    fn published_as_reads_the_record() {
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::new(d.path());
        let s = out.stage(20).unwrap();
        let rec = MergeRecord {
            pmad_version: "t".into(),
            recipe: Some("r".into()),
            method: crate::math::MethodKind::Sma,
            alpha: None,
            shape: None,
            final_lr_ratio: None,
            weights: vec![0.5, 0.5],
            steps: vec![Some(10), Some(20)],
            inputs: vec![],
            dtype: crate::math::OutDtype::Source,
            accumulator: crate::math::Accumulator::F32,
            tensors: 0,
            bytes: 0,
            nonfinite: 0,
            created_unix: 0,
            partition: None,
        };
        rec.write(s.path()).unwrap();
        out.publish(s, 20, 0).unwrap();
        assert!(out.published_as(20, &[10, 20]));
        assert!(!out.published_as(20, &[20]));
        assert!(!out.published_as(30, &[10, 20]));
    }

    /// Committers of different steps in parallel (threads stand in for processes: a flock
    /// belongs to the open file, so each call's lock excludes the others'): LATEST never
    /// moves back, always names an output that exists, and ends at the newest step.
    #[test]
    fn concurrent_committers_move_latest_forward_only() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::new(d.path().join("o"));
        out.prepare().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (out, stop) = (out.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut last = 0;
                let mut problems = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(l) = out.latest() {
                        if l < last {
                            problems.push(format!("LATEST from {last} to {l}"));
                        }
                        if !out.step_path(l).is_dir() {
                            problems.push(format!("LATEST names missing step-{l}"));
                        }
                        last = l;
                    }
                }
                problems
            })
        };
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let out = out.clone();
                std::thread::spawn(move || {
                    // Thread t commits steps t+1, t+5, ...: interleaved, some late.
                    for k in 0..25u64 {
                        let step = 1 + t + 4 * k;
                        let dir = out.path().join(format!(".c-{step}"));
                        std::fs::create_dir(&dir).unwrap();
                        fsio::write_file(&dir.join("f"), &step.to_le_bytes()).unwrap();
                        let p = out.publish_parts(&dir, step, 5, |_| false).unwrap();
                        assert!(p.is_some());
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let problems = reader.join().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(out.latest(), Some(100));
        assert!(out.outputs().len() <= 5, "retention ran");
        // Committing the same output again is a no-op that only moves LATEST forward.
        let dir = out.path().join(".c-again");
        std::fs::create_dir(&dir).unwrap();
        assert!(out.publish_parts(&dir, 100, 5, |_| true).unwrap().is_none());
        assert!(!dir.exists());
    }

    #[test]
    fn advance_latest_moves_forward_to_existing_outputs_only() {
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::new(d.path());
        out.publish(staged(&out, 10, 1), 10, 0).unwrap();
        out.advance_latest(30).unwrap();
        assert_eq!(out.latest(), Some(10), "step-30 does not exist");
        std::fs::create_dir(out.step_path(20)).unwrap();
        out.advance_latest(20).unwrap();
        assert_eq!(out.latest(), Some(20));
        std::fs::create_dir(out.step_path(5)).unwrap();
        out.advance_latest(5).unwrap();
        assert_eq!(out.latest(), Some(20), "never back");
        assert!(out.path().join(LOCK).is_file());
    }
}
