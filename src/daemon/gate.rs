//! The gate: may a complete-looking checkpoint be used?
//!
//! The tracker offers a directory once its marker is there and its files were quiet for
//! `settle`; the gate then opens it (full validation by its format), checks it against the
//! window's tensor names, shapes and dtypes, scans it for NaN/Inf (unless
//! `watch.allow_nonfinite`), and finally checks that the directory still looks exactly as it
//! did when it was offered: otherwise it is being deleted (rotation) or rewritten, and what was
//! read (weights, config files) may not belong together.
//!
//! With `[partition]` the scan covers only the tensors this instance owns ([`Scan::Owned`]);
//! the cycle then shares the verdict with the other instances, so all of them accept or
//! reject each checkpoint alike.

use super::watch::{Scanner, Signature};
use super::window::Window;
use crate::error::Error;
use crate::format::{Checkpoint, Snapshot};
use crate::math::kernels;
use crate::math::kinds::FloatKind;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;

/// The setting that lets the daemon accept NaN/Inf, as its errors name it.
const ALLOW_NONFINITE: &str = "watch.allow_nonfinite = true";

/// Which tensors the NaN/Inf scan reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// None (`watch.allow_nonfinite`, or this instance's part was scanned already).
    Skip,
    /// Every float tensor.
    All,
    /// The float tensors this instance owns with `[partition]` (the others are scanned by
    /// their owners; the instances share their verdicts before accepting).
    Owned,
}

/// The gate's decision on one directory.
#[derive(Debug)]
pub enum Verdict {
    /// Complete, valid and compatible with the window.
    Pass(Checkpoint),
    /// Its files changed while it was checked: pending again (with its files as they are now,
    /// when they could be read).
    Unsettled(Option<Signature>),
    /// Deleted while it was checked: not bad input, just gone.
    Gone,
    /// Corrupt or incompatible; `reason` is the log and metric label.
    Reject {
        /// Stable reason label.
        reason: &'static str,
        /// What is wrong, naming the file and tensor.
        error: Error,
    },
}

/// Check the directory at `path`, whose files looked like `before` when the tracker offered
/// it. Runs its scans on the current rayon pool.
pub fn check(
    path: &Path,
    before: Option<&Signature>,
    scanner: &Scanner,
    window: &Window,
    scan: Scan,
) -> Verdict {
    let opened = validate(
        crate::format::open_with(path, window.select()),
        window,
        scan,
    );
    let after = scanner.signature(path).ok();
    if opened.is_ok() && (after.is_none() || after.as_ref() != before) {
        return Verdict::Unsettled(after);
    }
    match opened {
        Ok(c) => Verdict::Pass(c),
        Err(_) if !path.exists() => Verdict::Gone,
        Err(error) => reject(error),
    }
}

/// Check a checkpoint from the snapshot of its files taken when its marker appeared (the
/// directory was deleted since: what it held then is all there is, and it cannot change).
pub fn check_snapshot(snapshot: &Snapshot, window: &Window, scan: Scan) -> Verdict {
    match validate(
        crate::format::open_snapshot(snapshot, window.select()),
        window,
        scan,
    ) {
        Ok(c) => Verdict::Pass(c),
        Err(error) => reject(error),
    }
}

/// Schema and NaN/Inf checks of an opened checkpoint.
fn validate(
    opened: crate::Result<Checkpoint>,
    window: &Window,
    scan: Scan,
) -> crate::Result<Checkpoint> {
    let c = opened?;
    window.check_schema(&c)?;
    let owned = match scan {
        Scan::Skip => return Ok(c),
        Scan::All => None,
        Scan::Owned => window.owned_names(&c)?,
    };
    nonfinite(&c, owned.as_ref())?;
    // The scan read these bytes: make sure they were the validated ones.
    c.check_fds()?;
    Ok(c)
}

fn reject(error: Error) -> Verdict {
    Verdict::Reject {
        reason: match &error {
            // Marker present and files quiet for `settle`, yet still short: the writer died
            // or the file is corrupt. Retried if its files change.
            Error::NotReady { .. } => "incomplete",
            other => other.reason(),
        },
        error,
    }
}

/// Refuse checkpoints holding NaN/Inf (in the `owned` tensors, when given), naming the
/// first tensor and the count.
fn nonfinite(c: &Checkpoint, owned: Option<&BTreeSet<String>>) -> crate::Result<()> {
    let counts: Vec<(usize, u64)> = c
        .tensors
        .par_iter()
        .enumerate()
        .filter(|(_, t)| owned.is_none_or(|o| o.contains(&t.name)))
        .filter_map(|(i, t)| {
            let kind = FloatKind::of_tensor(t)?;
            let f = &c.files[t.file];
            let n = kernels::count_nonfinite(kind, f.slice(t.range.clone()));
            f.release(t.range.clone());
            (n > 0).then_some((i, n))
        })
        .collect();
    if let Some(&(first, _)) = counts.first() {
        let total: u64 = counts.iter().map(|x| x.1).sum();
        let t = &c.tensors[first];
        return Err(Error::NonFinite {
            path: c.files[t.file].path.clone(),
            tensor: t.name.clone(),
            count: total,
            more: if counts.len() > 1 {
                format!(" (in {} tensors)", counts.len())
            } else {
                String::new()
            },
            allow: ALLOW_NONFINITE,
        });
    }
    Ok(())
}
