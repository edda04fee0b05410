//! A recipe's output directory: the one owner of its layout.
//!
//! ```text
//! <out_dir>/step-<N>/          one published output (shards, index, aux files, merge.json)
//! <out_dir>/LATEST             the name of the newest complete output, replaced atomically
//! <out_dir>/latest_checkpointed_iteration.txt   Megatron naming only: N of the newest output
//! <out_dir>/.pmad-tmp-*        an output being written (removed at start if left by a crash)
//! <out_dir>/.pmad-lock         shared dirs only: held (flock) while a name or LATEST changes
//! ```
//!
//! **Marker mode** ([`OutDir::in_place`], for object-store mounts that cannot rename a
//! directory atomically, or at all): nothing under `out_dir` is ever renamed. An output is
//! written in place under `step-<N>/` and counts as published only once its `COMMIT` file
//! (written last) is there; `LATEST` is overwritten in place; retention removes `COMMIT`
//! first. Every reader in pmad ([`OutDir::outputs`], [`OutDir::published_as`]) counts only
//! committed steps, and so must other readers of such a directory.
//!
//! Outputs are named like the trainer names its checkpoints ([`Naming`]): `step-<N>` by
//! default, `step<N>` (OLMo-core), `iter_<N:07>` (Megatron, whose `--load <out_dir>` then
//! reads the tracker `latest_checkpointed_iteration.txt`, written with `LATEST`). Only names of
//! the directory's own naming are outputs; anything else in it is left alone.
//!
//! Invariants: `step-<N>/` appears only complete (written in a [`Staging`] dir, renamed into
//! place); `LATEST` is replaced only after that and always names a complete output; if
//! `LATEST` cannot be updated the new output is removed again, so nothing newer than `LATEST`
//! stays behind; retention deletes old outputs only after the new one is published and never
//! the one `LATEST` names.
//!
//! Several processes may share one output directory (`[partition]`: every instance may
//! commit; [`OutDir::shared`]). Then each change of a `step-<N>` name, of `LATEST` and each retention pass happens
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

/// Megatron's tracker: the iteration of the newest complete checkpoint, as decimal text.
pub const MEGATRON_TRACKER: &str = "latest_checkpointed_iteration.txt";

/// How output directories are named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Naming {
    /// `step-<N>` (HF, torchtitan, generic DCP).
    #[default]
    StepDash,
    /// `step<N>` (OLMo-core).
    Step,
    /// `iter_<N:07>` plus the tracker file (Megatron).
    Megatron,
}

impl Naming {
    /// The directory name of the output for `step`.
    pub fn name(self, step: u64) -> String {
        match self {
            Naming::StepDash => format!("step-{step}"),
            Naming::Step => format!("step{step}"),
            Naming::Megatron => format!("iter_{step:07}"),
        }
    }

    /// The step of a directory name of this naming: the inverse of [`Naming::name`].
    pub fn step_of(self, name: &str) -> Option<u64> {
        let digits = match self {
            Naming::StepDash => name.strip_prefix("step-")?,
            Naming::Step => name.strip_prefix("step")?,
            Naming::Megatron => name.strip_prefix("iter_")?,
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let step = digits.parse().ok()?;
        (self.name(step) == name).then_some(step)
    }
}

/// A recipe's output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutDir {
    path: PathBuf,
    in_place: bool,
    shared: bool,
    naming: Naming,
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
        OutDir {
            path: path.into(),
            in_place: false,
            shared: false,
            naming: Naming::default(),
        }
    }

    /// The same directory with outputs named by `naming`.
    pub fn named(self, naming: Naming) -> OutDir {
        OutDir { naming, ..self }
    }

    /// How its outputs are named.
    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// The same directory shared by several processes (`[partition]`): changes of names and
    /// `LATEST` are made under its lock (see the module doc). A directory only one process
    /// writes needs no lock and gets no lock file.
    pub fn shared(self) -> OutDir {
        OutDir {
            shared: true,
            ..self
        }
    }

    /// The same directory in marker mode (see the module doc): outputs are written in place
    /// and published by their `COMMIT` file.
    pub fn in_place(self) -> OutDir {
        OutDir {
            in_place: true,
            shared: true,
            ..self
        }
    }

    /// Whether this directory is in marker mode.
    pub fn is_in_place(&self) -> bool {
        self.in_place
    }

    /// Whether the output directory `dir` is published: always, unless in marker mode,
    /// where its `COMMIT` file decides.
    pub fn is_committed(&self, dir: &Path) -> bool {
        !self.in_place || dir.join(super::partition::COMMIT).is_file()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory name of the output for `step`.
    pub fn step_name(&self, step: u64) -> String {
        self.naming.name(step)
    }

    /// The step of an output directory name: the inverse of [`OutDir::step_name`].
    pub fn step_of(&self, name: &str) -> Option<u64> {
        self.naming.step_of(name)
    }

    /// Where the output for `step` is (or would be) published.
    pub fn step_path(&self, step: u64) -> PathBuf {
        self.path.join(self.step_name(step))
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

    /// Take the directory's lock ([`LOCK`]), waiting up to 10 s; `None` when the directory
    /// is not [`OutDir::shared`] or the filesystem has no locks. Released when the returned
    /// file is dropped.
    fn lock(&self) -> Result<Option<std::fs::File>> {
        if !self.shared {
            return Ok(None);
        }
        let p = self.path.join(LOCK);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .ctx("open", &p)?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Some(f)),
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
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
                Err(
                    rustix::io::Errno::NOLCK
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP,
                ) => {
                    return Ok(None);
                }
                Err(e) => return Err(crate::Error::io("lock", &p, e.into())),
            }
        }
    }

    /// The step `LATEST` names, if any.
    pub fn latest(&self) -> Option<u64> {
        let s = std::fs::read_to_string(self.path.join(LATEST)).ok()?;
        self.step_of(s.trim())
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
        if self.in_place {
            // No rename: an object store replaces the object whole when it is closed.
            let latest = self.path.join(LATEST);
            fsio::overwrite_file(&latest, format!("{}\n", self.step_name(step)).as_bytes())?;
            if self.naming == Naming::Megatron {
                fsio::overwrite_file(
                    &self.path.join(MEGATRON_TRACKER),
                    step.to_string().as_bytes(),
                )?;
            }
            return fsio::sync_dir(&self.path);
        }
        let tmp = self
            .path
            .join(format!("{}{LATEST_TMP}-{suffix}", staging::TMP_PREFIX));
        let written = fsio::write_file(&tmp, format!("{}\n", self.step_name(step)).as_bytes())
            .and_then(|()| fsio::rename(&tmp, &self.path.join(LATEST)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        if self.naming == Naming::Megatron {
            // Megatron's --load reads the tracker; it follows LATEST (never ahead of it).
            let tmp = self.path.join(format!(
                "{}{MEGATRON_TRACKER}-{suffix}",
                staging::TMP_PREFIX
            ));
            let written = fsio::write_file(&tmp, step.to_string().as_bytes())
                .and_then(|()| fsio::rename(&tmp, &self.path.join(MEGATRON_TRACKER)));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written?;
        }
        fsio::sync_dir(&self.path)
    }

    /// Whether the output for `step` exists and its `merge.json` records exactly `steps`.
    pub fn published_as(&self, step: u64, steps: &[u64]) -> bool {
        self.is_committed(&self.step_path(step))
            && matches!(
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
                        let s = self.step_of(n.to_str()?)?;
                        let p = e.path();
                        (p.is_dir() && self.is_committed(&p)).then_some((s, p))
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
        let name = self.step_name(step);
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
        let name = self.step_name(step);
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
        let latest = self.step_name(self.latest().map_or(step, |l| l.max(step)));
        let removed = self.retain(keep, &latest);
        Ok(Some(Published { path, removed }))
    }

    /// Marker mode: publish the output of `step` whose parts are in place under `step-<N>/`.
    /// `finish` writes the rest of it (index, aux files, `merge.json`) into that directory and
    /// `check` confirms it is whole; then `COMMIT` is written, `LATEST` moved forward and
    /// retention applied. `None` when the output was already committed (by another
    /// instance): nothing is written.
    pub fn publish_in_place(
        &self,
        step: u64,
        keep: usize,
        finish: impl FnOnce(&Path) -> Result<()>,
        check: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Option<Published>> {
        let path = self.step_path(step);
        let commit = path.join(super::partition::COMMIT);
        let _lock = self.lock()?;
        if commit.is_file() {
            self.forward_latest(step)?;
            return Ok(None);
        }
        finish(&path)?;
        fsio::sync_dir(&path)?;
        // Where there are no locks (object stores) another committer may have been at the
        // same output meanwhile: check it is whole before it becomes visible.
        check(&path)?;
        fsio::overwrite_file(&commit, format!("{}\n", self.step_name(step)).as_bytes())?;
        fsio::sync_dir(&path)?;
        self.forward_latest(step)?;
        let latest = self.step_name(self.latest().map_or(step, |l| l.max(step)));
        let removed = self.retain(keep, &latest);
        Ok(Some(Published { path, removed }))
    }

    /// Move `LATEST` to the published output of `step` if that is newer than what it names
    /// (a committer that died between publishing and moving `LATEST` leaves this to whoever
    /// sees the output next).
    pub fn advance_latest(&self, step: u64) -> Result<()> {
        let _lock = self.lock()?;
        let dir = self.step_path(step);
        if dir.is_dir() && self.is_committed(&dir) {
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

    /// Marker mode: remove the uncommitted `step-<N>/` directories that can no longer be
    /// published (`dead(N)`, e.g. at or below the published step) or that were not touched
    /// for `older_than` (left by a crash). Each under the lock, so never one being
    /// committed. Returns how many were removed.
    pub fn sweep_uncommitted(&self, dead: impl Fn(u64) -> bool, older_than: Duration) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        let mut removed = 0;
        for e in rd.flatten() {
            let Some(step) = e.file_name().to_str().and_then(|n| self.step_of(n)) else {
                continue;
            };
            let p = e.path();
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= older_than);
            if !(dead(step) || stale) || !p.is_dir() {
                continue;
            }
            let Ok(_lock) = self.lock() else { continue };
            if !self.is_committed(&p) && std::fs::remove_dir_all(&p).is_ok() {
                removed += 1;
            }
        }
        removed
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
            if self.in_place {
                // Unpublished first: a reader never takes a half-deleted output for one.
                let _ = std::fs::remove_file(p.join(super::partition::COMMIT));
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
        assert_eq!(out.step_of("step-42"), Some(42));
        assert_eq!(out.step_of("step-x"), None);
        // No temp dirs or LATEST.tmp are left; a crash's leftovers are swept.
        std::fs::create_dir(out.path().join(format!("{}9-abc", staging::TMP_PREFIX))).unwrap();
        std::fs::write(out.path().join(LATEST_TMP), b"x").unwrap();
        assert_eq!(out.prepare().unwrap(), 2);
    }

    #[test]
    fn megatron_naming_writes_iter_dirs_and_the_tracker() {
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::new(d.path().join("m")).named(Naming::Megatron);
        out.prepare().unwrap();
        std::fs::create_dir(out.path().join("step-5")).unwrap(); // not an output of this naming
        for step in [1000, 2000, 3000] {
            let p = out.publish(staged(&out, step, 1), step, 2).unwrap();
            assert_eq!(p.path, out.path().join(format!("iter_{step:07}")));
            assert_eq!(
                std::fs::read_to_string(out.path().join(MEGATRON_TRACKER)).unwrap(),
                step.to_string()
            );
            assert_eq!(out.latest(), Some(step));
        }
        let steps: Vec<u64> = out.outputs().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [2000, 3000]);
        assert!(out.path().join("step-5").is_dir());
        for (n, name, step) in [
            (Naming::Megatron, "iter_0000300", Some(300)),
            (Naming::Megatron, "iter_300", None),
            (Naming::Megatron, "iter_12345678", Some(12345678)),
            (Naming::Step, "step300", Some(300)),
            (Naming::Step, "step-300", None),
            (Naming::Step, "step0300", None),
            (Naming::StepDash, "step-300", Some(300)),
            (Naming::StepDash, "step-", None),
        ] {
            assert_eq!(n.step_of(name), step, "{n:?} {name}");
        }
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
        let out = OutDir::new(d.path().join("o")).shared();
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
                        // LATEST only moves forward, so if it still names l after the check,
                        // it named l throughout: step l must have existed. (Without the
                        // re-read, a reader descheduled between the two reads would see a
                        // step retention removed after LATEST had moved on.)
                        if !out.step_path(l).is_dir() && out.latest() == Some(l) {
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
        assert!(!out.path().join(LOCK).exists(), "one writer, no lock file");
    }

    /// Marker mode: an output counts once its COMMIT is there; publishing writes it last and
    /// nothing is renamed; a second commit of the same step does nothing; retention removes
    /// COMMIT first and never the output LATEST names.
    #[test]
    fn marker_mode_counts_committed_outputs_only() {
        let d = tempfile::tempdir().unwrap();
        let out = OutDir::new(d.path()).in_place();
        out.prepare().unwrap();
        for step in [10, 20, 30] {
            let dir = out.step_path(step);
            std::fs::create_dir(&dir).unwrap();
            fsio::write_file(&dir.join("model.safetensors"), b"x").unwrap();
            assert!(out.outputs().is_empty() || out.latest() == Some(step - 10));
            assert!(!out.is_committed(&dir));
            let p = out
                .publish_in_place(
                    step,
                    2,
                    |dir| fsio::write_file(&dir.join("merge.json"), b"{}"),
                    |dir| {
                        assert!(dir.join("merge.json").is_file(), "checked after finish");
                        Ok(())
                    },
                )
                .unwrap()
                .unwrap();
            assert_eq!(p.path, dir);
            assert!(out.is_committed(&dir));
            assert_eq!(out.latest(), Some(step));
        }
        let steps: Vec<u64> = out.outputs().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [20, 30], "keep = 2; step-10 removed");
        assert!(!out.step_path(10).exists());
        // No temp files, no renames: only the outputs, LATEST and the lock are there.
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [LOCK, LATEST, "step-20", "step-30"]);
        // An uncommitted step is not an output, and is swept once dead.
        std::fs::create_dir(out.step_path(25)).unwrap();
        assert_eq!(out.outputs().len(), 2);
        assert!(!out.published_as(25, &[25]));
        assert_eq!(
            out.sweep_uncommitted(|s| s <= 30, Duration::from_secs(3600)),
            1
        );
        assert!(!out.step_path(25).exists());
        // Committing again writes nothing.
        let again = out
            .publish_in_place(30, 2, |_| panic!("finish called again"), |_| Ok(()))
            .unwrap();
        assert!(again.is_none());
    }
}
