//! The tracker: what the daemon knows about each checkpoint directory it has seen, and the
//! rules that move a directory from one state to the next.
//!
//! ```text
//!             ┌──────────── files change ─────────────┐
//!             ▼                                        │
//! new dir ─▶ Pending ── marker + quiet for `settle` ─▶ (gate, select) ─▶ Accepted
//!                                                        ├─▶ Skipped   (outside the phase)
//!                                                        └─▶ Rejected  (corrupt; logged once)
//! Accepted ── weight files change ─▶ Pending, and every later Accepted ─▶ Abandoned (rollback)
//! ```
//!
//! Rules: a directory is offered to the gate only when its layout's marker says it is complete
//! and its files (name, size, mtime, inode) have not changed for `settle`. A rejected, skipped
//! or abandoned directory is looked at again only if its files change. An accepted directory
//! whose weight files change was rewritten (the run went back to an earlier step): it is
//! pending again and every later accepted step is abandoned. Weight files that only disappear
//! are a deletion in progress (rotation): the pinned copy stays valid, nothing is abandoned.
//! After a restart, directories at or below the restored step are not processed again.
//!
//! Pure state machine: the scan's results and the marker test come in as arguments, so it is
//! unit-tested without a file system.

use super::watch::Signature;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A directory's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for its marker, quiescence or validity.
    Pending,
    /// In the window.
    Accepted,
    /// Outside the phase or interval.
    Skipped,
    /// Corrupt or incompatible; logged once.
    Rejected,
    /// A later step dropped by a rollback.
    Abandoned,
}

#[derive(Debug)]
struct Entry {
    step: u64,
    sig: Signature,
    /// When its files last changed (as far as the scans saw).
    since: Instant,
    phase: Phase,
    /// Its completion marker was seen: it was complete, only waiting to settle.
    marker_seen: bool,
}

/// One directory a scan found.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Step parsed from its name.
    pub step: u64,
    /// Its path.
    pub path: PathBuf,
    /// Its files now, or `None` when it vanished while being listed.
    pub sig: Option<Signature>,
}

/// A directory ready for the gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    /// Its step.
    pub step: u64,
    /// Its path.
    pub path: PathBuf,
    /// The step of the directory before it in the scan, if any (for the LR plateau test).
    pub lookback: Option<u64>,
}

/// What one scan changed.
#[derive(Debug, Default)]
pub struct Observation {
    /// Directories seen for the first time (not restored ones).
    pub discovered: Vec<(u64, PathBuf)>,
    /// Pending directories that disappeared, and whether their marker had been seen (then a
    /// complete checkpoint was lost before it could be used: rotated away too fast).
    pub gone: Vec<(u64, PathBuf, bool)>,
    /// An accepted step whose weight files changed: it and every later step are abandoned.
    pub rewritten: Option<u64>,
    /// Directories ready for the gate, in step order.
    pub ready: Vec<Ready>,
    /// Pending directories whose completion marker is there (ready or still settling): what
    /// they hold now is worth pinning.
    pub complete: Vec<PathBuf>,
    /// The earliest time a waiting directory's settle period ends.
    pub next_settle: Option<Instant>,
}

/// Every directory seen, by path.
#[derive(Debug, Default)]
pub struct Tracker {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Tracker {
    /// Nothing seen yet.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Take in a scan (`seen`, sorted by step) at `now`. Directories at or below
    /// `restored_upto` were handled before a restart: they start as accepted when `pinned`
    /// says the window holds them, else as skipped. `marker_ok` tells whether a pending
    /// directory's completion marker is there.
    pub fn observe(
        &mut self,
        seen: &[Seen],
        now: Instant,
        settle: Duration,
        restored_upto: Option<u64>,
        pinned: impl Fn(u64) -> bool,
        mut marker_ok: impl FnMut(&Path, u64) -> bool,
    ) -> Observation {
        let mut obs = Observation::default();
        let present: BTreeSet<&PathBuf> = seen.iter().map(|s| &s.path).collect();
        self.entries.retain(|p, e| {
            let keep = present.contains(p);
            if !keep && e.phase == Phase::Pending {
                obs.gone.push((e.step, p.clone(), e.marker_seen));
            }
            keep
        });
        for (i, s) in seen.iter().enumerate() {
            let Some(sig) = &s.sig else {
                continue; // vanished mid-scan: gone next time
            };
            let lookback = i.checked_sub(1).map(|j| seen[j].step);
            let entry = self.entries.entry(s.path.clone()).or_insert_with(|| {
                let phase = if restored_upto.is_some_and(|u| s.step <= u) {
                    // Handled before the restart (a rollback found in this scan has already
                    // dropped its step and every later one from the window).
                    let in_window = pinned(s.step) && obs.rewritten.is_none_or(|r| s.step < r);
                    if in_window {
                        Phase::Accepted
                    } else {
                        Phase::Skipped
                    }
                } else {
                    obs.discovered.push((s.step, s.path.clone()));
                    Phase::Pending
                };
                Entry {
                    step: s.step,
                    sig: sig.clone(),
                    since: now,
                    phase,
                    marker_seen: false,
                }
            });
            if entry.sig != *sig {
                // Weight files only disappearing is a deletion in progress (rotation), not a
                // rewrite: the pinned maps stay valid. Other files changing (an eval job
                // writing results into the directory, the trainer adding files) do not touch
                // the weights we pinned either.
                // A decided (skipped, rejected, abandoned) directory being deleted stays
                // decided: it is not a checkpoint to wait for, so its disappearance is not a
                // loss (the trainer rotating away a warmup checkpoint pmad skipped).
                let decided = matches!(
                    entry.phase,
                    Phase::Skipped | Phase::Rejected | Phase::Abandoned
                );
                if (entry.phase == Phase::Accepted && sig.only_weights_removed(&entry.sig))
                    || (decided && sig.only_removed(&entry.sig))
                {
                    entry.sig = sig.clone();
                } else {
                    let was = entry.phase;
                    entry.sig = sig.clone();
                    entry.since = now;
                    entry.phase = Phase::Pending;
                    // Its marker is looked at again below: complete only if it still is.
                    entry.marker_seen = false;
                    if was == Phase::Accepted && obs.rewritten.is_none() {
                        obs.rewritten = Some(s.step);
                        self.abandon_after(s.step);
                    }
                }
            }
            let Some(entry) = self.entries.get_mut(&s.path) else {
                continue;
            };
            if entry.phase != Phase::Pending || !marker_ok(&s.path, s.step) {
                continue;
            }
            entry.marker_seen = true;
            obs.complete.push(s.path.clone());
            let settle_at = entry.since + settle;
            if now < settle_at {
                obs.next_settle = Some(obs.next_settle.map_or(settle_at, |n| n.min(settle_at)));
                continue;
            }
            obs.ready.push(Ready {
                step: s.step,
                path: s.path.clone(),
                lookback,
            });
        }
        obs
    }

    /// Record the gate's or the selection's decision on `path`.
    pub fn set(&mut self, path: &Path, phase: Phase) {
        if let Some(e) = self.entries.get_mut(path) {
            e.phase = phase;
        }
    }

    /// `path` changed while it was being checked: pending again, its settle period restarted
    /// from `now` with its files as they are now (`sig`, when it could be read).
    pub fn unsettled(&mut self, path: &Path, sig: Option<Signature>, now: Instant) {
        if let Some(e) = self.entries.get_mut(path) {
            e.phase = Phase::Pending;
            e.since = now;
            if let Some(sig) = sig {
                e.sig = sig;
            }
        }
    }

    /// Forget `path` (it was deleted while being checked).
    pub fn forget(&mut self, path: &Path) {
        self.entries.remove(path);
    }

    /// The files of `path` as last seen.
    pub fn signature(&self, path: &Path) -> Option<&Signature> {
        self.entries.get(path).map(|e| &e.sig)
    }

    /// A rollback to `step`: every accepted step after it is abandoned.
    pub fn abandon_after(&mut self, step: u64) {
        for e in self.entries.values_mut() {
            if e.step > step && e.phase == Phase::Accepted {
                e.phase = Phase::Abandoned;
            }
        }
    }

    /// Steps of the directories still pending, in path order.
    pub fn pending(&self) -> Vec<u64> {
        self.entries
            .values()
            .filter(|e| e.phase == Phase::Pending)
            .map(|e| e.step)
            .collect()
    }

    /// The newest tracked step before `step` (for the LR plateau test of a checkpoint whose
    /// directory is gone from the scan).
    pub fn previous_step(&self, step: u64) -> Option<u64> {
        self.entries
            .values()
            .map(|e| e.step)
            .filter(|s| *s < step)
            .max()
    }

    /// The phase of `path`, if it is tracked.
    pub fn phase(&self, path: &Path) -> Option<Phase> {
        self.entries.get(path).map(|e| e.phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::watch::FileSig;

    const SETTLE: Duration = Duration::from_secs(5);

    fn sig(files: &[(&str, u64)]) -> Signature {
        Signature(
            files
                .iter()
                .map(|(n, size)| FileSig {
                    name: n.to_string(),
                    size: *size,
                    mtime_ns: 1,
                    ino: *size,
                })
                .collect(),
        )
    }

    fn ckpt(step: u64, size: u64) -> Seen {
        Seen {
            step,
            path: PathBuf::from(format!("/w/checkpoint-{step}")),
            sig: Some(sig(&[
                ("model.safetensors", size),
                ("trainer_state.json", 10),
            ])),
        }
    }

    fn observe(t: &mut Tracker, seen: &[Seen], now: Instant) -> Observation {
        t.observe(seen, now, SETTLE, None, |_| false, |_, _| true)
    }

    fn ready_steps(o: &Observation) -> Vec<u64> {
        o.ready.iter().map(|r| r.step).collect()
    }

    #[test]
    fn a_new_directory_is_ready_once_quiet_for_settle() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        let o = observe(&mut t, &[ckpt(100, 1)], t0);
        assert_eq!(o.discovered, [(100, PathBuf::from("/w/checkpoint-100"))]);
        assert!(o.ready.is_empty());
        assert_eq!(o.next_settle, Some(t0 + SETTLE));
        // Still being written: the settle period restarts.
        let o = observe(&mut t, &[ckpt(100, 2)], t0 + Duration::from_secs(4));
        assert!(o.ready.is_empty() && o.discovered.is_empty());
        let o = observe(&mut t, &[ckpt(100, 2)], t0 + Duration::from_secs(8));
        assert!(o.ready.is_empty(), "quiet for only 4 s");
        let o = observe(
            &mut t,
            &[ckpt(100, 2), ckpt(200, 1)],
            t0 + Duration::from_secs(9),
        );
        assert_eq!(ready_steps(&o), [100]);
        assert_eq!(t.pending(), [100, 200]);
        assert_eq!(o.complete.len(), 2, "both have their marker");
        assert_eq!(t.previous_step(200), Some(100));
        // Accepted: never offered again while its files stay the same.
        t.set(Path::new("/w/checkpoint-100"), Phase::Accepted);
        let o = observe(
            &mut t,
            &[ckpt(100, 2), ckpt(200, 1)],
            t0 + Duration::from_secs(30),
        );
        assert_eq!(
            o.ready,
            [Ready {
                step: 200,
                path: PathBuf::from("/w/checkpoint-200"),
                lookback: Some(100),
            }]
        );
    }

    #[test]
    fn no_marker_no_gate() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        let o = t.observe(&[ckpt(1, 1)], t0, SETTLE, None, |_| false, |_, _| false);
        assert!(o.ready.is_empty());
        let later = t0 + Duration::from_secs(3);
        let o = t.observe(&[ckpt(1, 1)], later, SETTLE, None, |_| false, |_, _| false);
        assert!(
            o.ready.is_empty() && o.next_settle.is_none(),
            "no marker: not waiting"
        );
        let later = t0 + Duration::from_secs(4);
        let o = t.observe(&[ckpt(1, 1)], later, SETTLE, None, |_| false, |_, _| true);
        assert!(o.ready.is_empty(), "settle counts from the first sight");
        let o = t.observe(
            &[ckpt(1, 1)],
            t0 + SETTLE,
            SETTLE,
            None,
            |_| false,
            |_, _| true,
        );
        assert_eq!(ready_steps(&o), [1]);
    }

    #[test]
    fn rejected_is_looked_at_again_only_when_its_files_change() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        observe(&mut t, &[ckpt(1, 1)], t0);
        let p = Path::new("/w/checkpoint-1");
        assert_eq!(
            ready_steps(&observe(&mut t, &[ckpt(1, 1)], t0 + SETTLE)),
            [1]
        );
        t.set(p, Phase::Rejected);
        for k in 2..10 {
            assert!(observe(&mut t, &[ckpt(1, 1)], t0 + SETTLE * k)
                .ready
                .is_empty());
        }
        observe(&mut t, &[ckpt(1, 3)], t0 + SETTLE * 10);
        assert_eq!(t.phase(p), Some(Phase::Pending));
        assert_eq!(
            ready_steps(&observe(&mut t, &[ckpt(1, 3)], t0 + SETTLE * 11)),
            [1]
        );
    }

    #[test]
    fn a_rewritten_accepted_step_abandons_every_later_one() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        let all = [ckpt(100, 1), ckpt(200, 1), ckpt(300, 1)];
        observe(&mut t, &all, t0);
        for s in &all {
            t.set(&s.path, Phase::Accepted);
        }
        // The run restarted from 100: 200 is written again with other bytes.
        let o = observe(
            &mut t,
            &[ckpt(100, 1), ckpt(200, 9), ckpt(300, 1)],
            t0 + SETTLE,
        );
        assert_eq!(o.rewritten, Some(200));
        assert_eq!(t.phase(&all[0].path), Some(Phase::Accepted));
        assert_eq!(t.phase(&all[1].path), Some(Phase::Pending));
        assert_eq!(t.phase(&all[2].path), Some(Phase::Abandoned));
        // 300 being rewritten too is part of the same rollback, not a second one.
        let o = observe(
            &mut t,
            &[ckpt(100, 1), ckpt(200, 9), ckpt(300, 8)],
            t0 + SETTLE * 2,
        );
        assert_eq!(o.rewritten, None);
        assert_eq!(t.phase(&all[2].path), Some(Phase::Pending));
    }

    #[test]
    fn weights_only_disappearing_is_rotation_not_a_rewrite() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        let full = Seen {
            step: 5,
            path: PathBuf::from("/w/checkpoint-5"),
            sig: Some(sig(&[
                ("model-00001-of-00002.safetensors", 4),
                ("model-00002-of-00002.safetensors", 5),
                ("trainer_state.json", 10),
            ])),
        };
        observe(&mut t, std::slice::from_ref(&full), t0);
        t.set(&full.path, Phase::Accepted);
        let mut half = full.clone();
        half.sig = Some(sig(&[("model-00002-of-00002.safetensors", 5)]));
        let o = observe(&mut t, &[half.clone()], t0 + SETTLE);
        assert_eq!(o.rewritten, None);
        assert_eq!(t.phase(&full.path), Some(Phase::Accepted));
        // A directory that vanished is forgotten; a pending one is reported gone.
        let o = observe(&mut t, &[ckpt(6, 1)], t0 + SETTLE * 2);
        assert!(o.gone.is_empty(), "accepted, not pending");
        assert_eq!(t.phase(&full.path), None);
        let o = observe(&mut t, &[], t0 + SETTLE * 3);
        assert_eq!(o.gone, [(6, PathBuf::from("/w/checkpoint-6"), true)]);
    }

    /// A checkpoint pmad skipped (warmup) that the trainer rotates away later is not a lost
    /// checkpoint, even when a scan catches the deletion half done.
    #[test]
    fn a_skipped_checkpoint_deleted_later_is_not_lost() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        observe(&mut t, &[ckpt(50, 1)], t0);
        let o = observe(&mut t, &[ckpt(50, 1)], t0 + SETTLE);
        assert_eq!(ready_steps(&o), [50]);
        t.set(Path::new("/w/checkpoint-50"), Phase::Skipped);
        // The trainer's rm -r: the weights go first, the marker is still there.
        let half = Seen {
            step: 50,
            path: PathBuf::from("/w/checkpoint-50"),
            sig: Some(sig(&[("trainer_state.json", 10)])),
        };
        let o = observe(&mut t, &[half], t0 + SETTLE * 2);
        assert!(o.ready.is_empty(), "still decided");
        assert_eq!(t.phase(Path::new("/w/checkpoint-50")), Some(Phase::Skipped));
        let o = observe(&mut t, &[], t0 + SETTLE * 3);
        assert!(o.gone.is_empty(), "skipped, not lost: {:?}", o.gone);
        // A file added (the trainer writing it again) makes it a checkpoint to look at.
        let o = observe(&mut t, &[ckpt(60, 1)], t0 + SETTLE * 4);
        t.set(Path::new("/w/checkpoint-60"), Phase::Skipped);
        assert!(o.gone.is_empty());
        let more = Seen {
            step: 60,
            path: PathBuf::from("/w/checkpoint-60"),
            sig: Some(sig(&[
                ("model.safetensors", 1),
                ("trainer_state.json", 10),
                ("extra.bin", 3),
            ])),
        };
        observe(&mut t, &[more], t0 + SETTLE * 5);
        assert_eq!(t.phase(Path::new("/w/checkpoint-60")), Some(Phase::Pending));
    }

    #[test]
    fn a_complete_checkpoint_rotated_away_before_it_settled_is_lost() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        // Seen without its marker, then gone: a directory being written and removed.
        t.observe(&[ckpt(1, 1)], t0, SETTLE, None, |_| false, |_, _| false);
        let o = t.observe(&[], t0 + SETTLE, SETTLE, None, |_| false, |_, _| false);
        assert_eq!(o.gone, [(1, PathBuf::from("/w/checkpoint-1"), false)]);
        // Marker seen (complete), then deleted while settling: lost.
        t.observe(&[ckpt(2, 1)], t0, SETTLE, None, |_| false, |_, _| true);
        let o = t.observe(
            &[],
            t0 + Duration::from_secs(1),
            SETTLE,
            None,
            |_| false,
            |_, _| true,
        );
        assert_eq!(o.gone, [(2, PathBuf::from("/w/checkpoint-2"), true)]);
    }

    #[test]
    fn restored_steps_are_not_processed_again() {
        let mut t = Tracker::new();
        let t0 = Instant::now();
        let o = t.observe(
            &[ckpt(100, 1), ckpt(200, 1), ckpt(300, 1)],
            t0 + SETTLE,
            SETTLE,
            Some(200),
            |s| s == 200,
            |_, _| true,
        );
        assert_eq!(o.discovered, [(300, PathBuf::from("/w/checkpoint-300"))]);
        assert_eq!(
            t.phase(Path::new("/w/checkpoint-100")),
            Some(Phase::Skipped)
        );
        assert_eq!(
            t.phase(Path::new("/w/checkpoint-200")),
            Some(Phase::Accepted)
        );
        assert!(o.ready.is_empty(), "300 only just appeared");
        // A directory that vanishes mid-scan is skipped but still counts for the lookback.
        let o = t.observe(
            &[
                ckpt(200, 1),
                Seen {
                    step: 250,
                    path: PathBuf::from("/w/checkpoint-250"),
                    sig: None,
                },
                ckpt(300, 1),
            ],
            t0 + SETTLE * 2,
            SETTLE,
            Some(200),
            |_| true,
            |_, _| true,
        );
        assert_eq!(o.ready[0].lookback, Some(250));
    }
}
