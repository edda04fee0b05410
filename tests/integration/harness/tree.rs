//! Snapshots of a directory tree (to prove pmad left it untouched) and a look at what a
//! process has mapped.

use std::collections::BTreeMap;
use std::path::Path;

/// Whether `/proc/<pid>/maps` shows a mapping of a live (not deleted) file whose path
/// contains `needle`.
pub fn maps_contain(pid: u32, needle: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| {
            m.lines()
                .any(|l| l.contains(needle) && !l.ends_with("(deleted)"))
        })
        .unwrap_or(false)
}

/// What a tree snapshot records about one path (no atime: reading is allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// "file", "dir", "symlink" or "other".
    pub kind: &'static str,
    /// st_mode (type and permission bits).
    pub mode: u32,
    /// Inode number (a replaced file has another).
    pub ino: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// mtime, ns since the epoch.
    pub mtime_ns: i128,
    /// ctime, ns since the epoch (changes on any write or metadata change).
    pub ctime_ns: i128,
    /// Content hash (files) or link target (symlinks).
    pub content: String,
}

/// Stat (and hash) one path without following a final symlink.
pub fn path_state(p: &Path) -> std::io::Result<PathState> {
    use std::hash::Hasher;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p)?;
    let ft = m.file_type();
    let (kind, content) = if ft.is_symlink() {
        (
            "symlink",
            std::fs::read_link(p)?.to_string_lossy().into_owned(),
        )
    } else if ft.is_dir() {
        ("dir", String::new())
    } else if ft.is_file() {
        let bytes = std::fs::read(p)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(&bytes);
        ("file", format!("{:016x}:{}", h.finish(), bytes.len()))
    } else {
        ("other", String::new())
    };
    Ok(PathState {
        kind,
        mode: m.mode(),
        ino: m.ino(),
        nlink: m.nlink(),
        size: if ft.is_dir() { 0 } else { m.size() },
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        content,
    })
}

/// Every path under `root` (relative; `""` is the root itself) with its state, not descending
/// into or listing `exclude`d directories (given relative to `root`).
pub fn tree_snapshot(root: &Path, exclude: &[&str]) -> BTreeMap<String, PathState> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        if exclude.iter().any(|e| rel == *e) {
            continue;
        }
        let st = path_state(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        if st.kind == "dir" {
            for e in std::fs::read_dir(&p).unwrap_or_else(|e| panic!("list {}: {e}", p.display())) {
                stack.push(e.expect("read_dir entry").path());
            }
        }
        out.insert(rel, st);
    }
    out
}

/// Differences between two snapshots, one line each (empty when equal).
pub fn diff_snapshots(
    want: &BTreeMap<String, PathState>,
    got: &BTreeMap<String, PathState>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => d.push(format!("{k:?}: missing (was {w:?})")),
            Some(g) if g != w => d.push(format!("{k:?}: changed\n    was {w:?}\n    now {g:?}")),
            _ => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            d.push(format!("{k:?}: created ({g:?})"));
        }
    }
    d
}
