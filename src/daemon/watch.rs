//! Discovery: find checkpoint directories in the watched tree, fingerprint their files, read
//! their completion markers, and wake the daemon early on inotify events.
//!
//! The periodic full scan is the source of truth; inotify (notify crate) only wakes it early
//! (a new directory, a marker written, a queue overflow all just trigger a scan). On network
//! filesystems inotify sees nothing written by other hosts, so `mode = auto` polls only there
//! (detected with fstatfs). pmad only reads here: it never writes, renames, locks or deletes
//! anything in the watched tree. Temp names and pmad's own directories are never candidates.

use crate::config::{Marker, WatchConfig, WatchMode};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory whose name matches the pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Step parsed from the name.
    pub step: u64,
    /// Full path.
    pub path: PathBuf,
}

/// One regular file of a checkpoint directory as the scan saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileSig {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Inode number.
    pub ino: u64,
}

impl FileSig {
    fn of(name: String, m: &std::fs::Metadata) -> FileSig {
        FileSig {
            name,
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ino: m.ino(),
        }
    }
}

/// What the files of a checkpoint directory look like right now, sorted by name. Equal
/// signatures `settle` apart mean the writer is done with it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature(pub Vec<FileSig>);

impl Signature {
    /// Whether this signature differs from `before` only by weight files that disappeared
    /// (a deletion in progress: rotation), with no weight file added or changed.
    pub fn only_weights_removed(&self, before: &Signature) -> bool {
        self.0
            .iter()
            .filter(|f| crate::format::is_weight_file(&f.name))
            .all(|f| before.0.contains(f))
    }

    /// Whether this signature only lacks files of `before` (every file it has is there
    /// unchanged): a deletion in progress.
    pub fn only_removed(&self, before: &Signature) -> bool {
        self.0.iter().all(|f| before.0.contains(f))
    }
}

/// Whether a name is a temp name some writer (or pmad) uses while writing.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with("tmp-")
        || name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with("-tmp")
        || name.contains(".orbax-checkpoint-tmp")
        || name.ends_with("-unfinished")
}

/// Scans the watched directory.
#[derive(Debug, Clone)]
pub struct Scanner {
    cfg: WatchConfig,
    /// Canonical paths pmad owns (out_dirs, state dir): never candidates.
    exclude: Vec<PathBuf>,
}

impl Scanner {
    /// A scanner over `cfg.dir` that ignores `exclude` (pmad's own directories).
    pub fn new(cfg: WatchConfig, exclude: &[PathBuf]) -> Scanner {
        let exclude = exclude.iter().map(|p| absolute(p)).collect();
        Scanner { cfg, exclude }
    }

    /// Whether `path` is (inside) one of pmad's own directories, or contains one.
    pub fn excluded(&self, path: &Path) -> bool {
        let p = absolute(path);
        self.exclude
            .iter()
            .any(|e| p.starts_with(e) || e.starts_with(&p))
    }

    /// List candidate directories, sorted by step.
    pub fn scan(&self) -> std::io::Result<Vec<Candidate>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.cfg.dir)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_temp_name(name) {
                continue;
            }
            let Some(step) = self.cfg.pattern.step(name) else {
                continue;
            };
            let path = entry.path();
            // Follow links for the type: a checkpoint dir may be a symlink.
            if !path.is_dir() || self.excluded(&path) {
                continue;
            }
            out.push(Candidate { step, path });
        }
        out.sort_by_key(|c| c.step);
        Ok(out)
    }

    /// Signature of a candidate directory's regular files, and of those one subdirectory
    /// down (OLMo-core keeps its DCP files in `model_and_optim/`), named `sub/file`.
    pub fn signature(&self, dir: &Path) -> std::io::Result<Signature> {
        let mut v = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let Ok(entry) = entry else { continue };
            let Ok(m) = entry.metadata() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if m.is_dir() {
                let Ok(rd) = std::fs::read_dir(entry.path()) else {
                    continue;
                };
                for sub in rd.flatten() {
                    if let Ok(sm) = sub.metadata() {
                        if sm.is_file() {
                            let sub_name = sub.file_name().to_string_lossy().into_owned();
                            v.push(FileSig::of(format!("{name}/{sub_name}"), &sm));
                        }
                    }
                }
                continue;
            }
            if m.is_file() {
                v.push(FileSig::of(name, &m));
            }
        }
        v.sort();
        Ok(Signature(v))
    }

    /// Whether the layout's marker says the checkpoint at `step` in `dir` is complete.
    /// An empty or unparsable marker means "not yet".
    pub fn marker_ok(&self, dir: &Path, step: u64) -> bool {
        match &self.cfg.marker {
            Marker::None => true,
            Marker::InDir(name) => {
                let p = dir.join(name);
                match std::fs::read(&p) {
                    Ok(b) if b.iter().all(|c| c.is_ascii_whitespace()) => false,
                    Ok(b) if name.ends_with(".json") => {
                        // Python writes NaN/Infinity (a diverged loss) as bare tokens.
                        crate::format::hf::parse_python_json(&b).is_ok()
                    }
                    Ok(_) => true,
                    Err(_) => false,
                }
            }
            Marker::Tracker(name) => read_tracker(&self.cfg.dir.join(name))
                .map(|n| n >= step)
                .unwrap_or(false),
        }
    }
}

/// Step named by a tracker file (`latest_checkpointed_iteration.txt`: "1000";
/// DeepSpeed `latest`: "global_step1000"). Written in place: empty or garbage reads as None.
pub fn read_tracker(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let t = s.trim();
    let digits: String = t
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        }
    })
}

/// Filesystem magic numbers (statfs f_type) on which inotify misses remote writes.
const NETWORK_FS: &[(u64, &str)] = &[
    (0x6969, "nfs"),
    (0xff534d42, "cifs"),
    (0xfe534d42, "smb2"),
    (0x517b, "smb"),
    (0x65735546, "fuse"),
    (0x0bd00bd0, "lustre"),
    (0x00c36400, "ceph"),
    (0x01021997, "9p"),
    (0x47504653, "gpfs"),
    (0x5346414f, "afs"),
];

/// The network filesystem `path` is on, if any.
pub fn network_fs(path: &Path) -> Option<&'static str> {
    let s = rustix::fs::statfs(path).ok()?;
    let t = s.f_type as u64;
    NETWORK_FS.iter().find(|(m, _)| *m == t).map(|(_, n)| *n)
}

/// Whether to use inotify for this config (and why not, if not).
pub fn use_inotify(cfg: &WatchConfig) -> Result<(), String> {
    match cfg.mode {
        WatchMode::Poll => Err("watch.mode = \"poll\"".into()),
        WatchMode::Inotify => Ok(()),
        WatchMode::Auto => match network_fs(&cfg.dir) {
            Some(fs) => Err(format!(
                "{} is on {fs}, where inotify misses remote writes",
                cfg.dir.display()
            )),
            None => Ok(()),
        },
    }
}

/// Start an inotify watcher that calls `wake` on any change under `dir` outside `scanner`'s
/// excluded directories. The watcher stops when the returned handle is dropped.
pub fn start_notify(
    dir: &Path,
    scanner: Arc<Scanner>,
    wake: Arc<tokio::sync::Notify>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) => {
                use notify::event::{AccessKind, AccessMode, EventKind};
                // Reads (including pmad's own scans: opening a directory or a marker) are
                // reported as Access events; waking on them would make every scan trigger
                // the next one. A writer closing a file is the one access that matters.
                let read_only = matches!(ev.kind, EventKind::Access(a)
                    if a != AccessKind::Close(AccessMode::Write));
                let ours = !ev.paths.is_empty() && ev.paths.iter().all(|p| scanner.excluded(p));
                if ev.need_rescan() || !(ours || read_only) {
                    wake.notify_one();
                }
            }
            // An error (e.g. queue overflow) means we may have missed events: rescan.
            Err(_) => wake.notify_one(),
        }
    })?;
    w.watch(dir, RecursiveMode::Recursive)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn scanner(dir: &Path, extra: &str) -> Scanner {
        let text = format!(
            "[watch]\ndir = {:?}\n{extra}\n[[recipe]]\nname = \"a\"\nmethod = \"sma\"\nout_dir = {:?}\n",
            dir,
            dir.join("merged")
        );
        let c = Config::parse(&text).unwrap();
        Scanner::new(c.watch, &[dir.join("merged")])
    }

    #[test]
    fn scan_finds_steps_and_skips_temp_and_own_dirs() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "checkpoint-200",
            "checkpoint-100",
            "tmp-checkpoint-300",
            "checkpoint-x",
            "merged",
            "other",
        ] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        std::fs::write(d.path().join("checkpoint-400"), b"a file").unwrap();
        let s = scanner(d.path(), "");
        let steps: Vec<u64> = s.scan().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, [100, 200]);
        assert!(s.excluded(&d.path().join("merged/sma/step-1")));
    }

    #[test]
    fn markers() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("checkpoint-100");
        std::fs::create_dir(&c).unwrap();
        let s = scanner(d.path(), "");
        assert!(!s.marker_ok(&c, 100));
        std::fs::write(c.join("trainer_state.json"), b"").unwrap();
        assert!(!s.marker_ok(&c, 100));
        std::fs::write(c.join("trainer_state.json"), b"{\"global_").unwrap();
        assert!(!s.marker_ok(&c, 100));
        std::fs::write(c.join("trainer_state.json"), b"{}").unwrap();
        assert!(s.marker_ok(&c, 100));

        let m = scanner(d.path(), "layout = \"megatron\"");
        let t = d.path().join("latest_checkpointed_iteration.txt");
        assert!(!m.marker_ok(&c, 100));
        std::fs::write(&t, b"").unwrap();
        assert!(!m.marker_ok(&c, 100));
        std::fs::write(&t, b"100\n").unwrap();
        assert!(m.marker_ok(&c, 100));
        assert!(!m.marker_ok(&c, 200));
        std::fs::write(&t, b"global_step200").unwrap();
        assert_eq!(read_tracker(&t), Some(200));
    }

    #[test]
    fn signature_changes_with_writes() {
        let d = tempfile::tempdir().unwrap();
        let s = scanner(d.path(), "");
        std::fs::write(d.path().join("a"), b"1").unwrap();
        let s1 = s.signature(d.path()).unwrap();
        std::fs::write(d.path().join("a"), b"12").unwrap();
        let s2 = s.signature(d.path()).unwrap();
        assert_ne!(s1, s2);
        assert_eq!(s2, s.signature(d.path()).unwrap());
    }

    #[test]
    fn local_tmp_is_not_network() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(network_fs(d.path()), None);
    }
}
