//! A checkpoint directory as a format reads it: live on disk, or a [`Snapshot`] of the files it
//! held at one moment, kept open.
//!
//! The daemon takes a snapshot as soon as a checkpoint's completion marker appears. If the
//! trainer then rotates the directory away (deletes it) before pmad has used it, the open
//! descriptors still reach the data, so the checkpoint can be validated and used as it was
//! when it was complete instead of being lost.
//!
//! Invariant: a snapshot holds only regular files directly inside the directory or one
//! subdirectory down, or links to files inside the same directory (a link leaving the directory is not pinned, exactly as an index naming it
//! is refused). Reading a snapshot's files never moves a shared file offset (`pread` only), so
//! each read sees the file from its start.

use crate::error::{Error, IoContext, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The files of a checkpoint directory, open, as they were when it was taken.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    /// Name → descriptor, and whether the name was a link (to a file inside the directory).
    files: BTreeMap<String, (File, bool)>,
}

impl Snapshot {
    /// Open every regular file of `dir` (and every link to a file inside it), and those of its
    /// subdirectories one level down (named `sub/file`: OLMo-core keeps its DCP files in
    /// `model_and_optim/`).
    pub fn take(dir: &Path) -> Result<Snapshot> {
        let mut files = BTreeMap::new();
        for sub in take_files(dir, "", &mut files)? {
            let path = dir.join(&sub);
            match take_files(&path, &format!("{sub}/"), &mut files) {
                Ok(_) => {}
                // A subdirectory deleted while listed: not part of what the snapshot holds.
                Err(Error::Io { .. }) if !path.exists() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Snapshot {
            path: dir.to_path_buf(),
            files,
        })
    }

    /// The directory it was taken of (the files are named relative to it).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Open the regular files of `dir` (and links to files inside it) into `files`, named
/// `prefix` + file name; returns the names of its real subdirectories (not links).
fn take_files(
    dir: &Path,
    prefix: &str,
    files: &mut BTreeMap<String, (File, bool)>,
) -> Result<Vec<String>> {
    let canon = std::fs::canonicalize(dir).ctx("canonicalize", dir)?;
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).ctx("list", dir)? {
        let Ok(entry) = entry else { continue };
        let Some(name) = entry.file_name().to_str().map(String::from) else {
            continue;
        };
        let path = entry.path();
        let Ok(meta) = path.symlink_metadata() else {
            continue; // deleted while listed
        };
        let link = meta.file_type().is_symlink();
        if meta.is_dir() {
            subdirs.push(name);
            continue;
        }
        let inside = if link {
            std::fs::canonicalize(&path)
                .ok()
                .is_some_and(|t| t.parent() == Some(canon.as_path()) && t.is_file())
        } else {
            meta.is_file()
        };
        if !inside {
            continue;
        }
        match File::open(&path) {
            Ok(f) => {
                files.insert(format!("{prefix}{name}"), (f, link));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("open", &path, e)),
        }
    }
    Ok(subdirs)
}

/// A checkpoint directory to read.
#[derive(Debug, Clone, Copy)]
pub enum Dir<'a> {
    /// The directory as it is on disk now.
    Live(&'a Path),
    /// Its files as they were when the snapshot was taken.
    Snapshot(&'a Snapshot),
}

impl Dir<'_> {
    /// The directory's path (for messages and provenance).
    pub fn path(&self) -> &Path {
        match self {
            Dir::Live(p) => p,
            Dir::Snapshot(s) => &s.path,
        }
    }

    /// The path of a file of the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// Whether the directory has a regular file `name` (not a link).
    pub fn has_file(&self, name: &str) -> bool {
        match self {
            Dir::Live(p) => p
                .join(name)
                .symlink_metadata()
                .map(|m| m.is_file())
                .unwrap_or(false),
            Dir::Snapshot(s) => s.files.get(name).is_some_and(|(_, link)| !link),
        }
    }

    /// A new descriptor of file `name`, or `None` when there is none.
    pub fn open(&self, name: &str) -> Result<Option<File>> {
        let path = self.join(name);
        match self {
            Dir::Live(_) => match File::open(&path) {
                Ok(f) => Ok(Some(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("open", &path, e)),
            },
            Dir::Snapshot(s) => s
                .files
                .get(name)
                .map(|(f, _)| f.try_clone().ctx("dup", &path))
                .transpose(),
        }
    }

    /// The bytes of file `name`, or `None` when there is none.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.join(name);
        let Some(f) = self.open(name)? else {
            return Ok(None);
        };
        let len = f.metadata().ctx("stat", &path)?.len() as usize;
        let mut buf = vec![0u8; len];
        // pread: a snapshot's descriptors share their offset with every clone.
        let mut at = 0;
        while at < len {
            match f.read_at(&mut buf[at..], at as u64) {
                Ok(0) => break, // shrank while read: the caller validates what it got
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", &path, e)),
            }
        }
        buf.truncate(at);
        Ok(Some(buf))
    }

    /// The names of the directory's files (for messages saying what is there instead).
    pub fn names(&self) -> Vec<String> {
        match self {
            Dir::Live(p) => std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter_map(|e| e.file_name().to_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            Dir::Snapshot(s) => s.files.keys().cloned().collect(),
        }
    }

    /// The names of its regular files and of those one subdirectory down (`sub/file`), as a
    /// [`Snapshot`] holds them.
    pub fn files(&self) -> Vec<String> {
        match self {
            Dir::Snapshot(s) => s.files.keys().cloned().collect(),
            Dir::Live(p) => {
                let list = |d: &Path| -> Vec<(String, bool)> {
                    std::fs::read_dir(d)
                        .map(|rd| {
                            rd.filter_map(|e| e.ok())
                                .filter_map(|e| {
                                    let t = e.file_type().ok()?;
                                    let n = e.file_name().to_str()?.to_string();
                                    (t.is_file() || t.is_dir()).then_some((n, t.is_dir()))
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let mut out = Vec::new();
                for (n, is_dir) in list(p) {
                    if is_dir {
                        for (m, sub_dir) in list(&p.join(&n)) {
                            if !sub_dir {
                                out.push(format!("{n}/{m}"));
                            }
                        }
                    } else {
                        out.push(n);
                    }
                }
                out.sort();
                out
            }
        }
    }

    /// Refuse a file named by `referrer` (an index) that is a link leaving the directory.
    /// A snapshot holds no such link.
    pub fn confine(&self, name: &str, referrer: &Path) -> Result<()> {
        let Dir::Live(dir) = self else {
            return Ok(());
        };
        let file = dir.join(name);
        let meta = match file.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_ready(
                    referrer,
                    format!("names shard {} which does not exist (yet)", file.display()),
                ))
            }
            Err(e) => return Err(Error::io("stat", &file, e)),
        };
        if meta.file_type().is_symlink() {
            let canon = std::fs::canonicalize(dir).ctx("canonicalize", dir)?;
            let target = std::fs::canonicalize(&file).ctx("resolve link", &file)?;
            if target.parent() != Some(canon.as_path()) {
                return Err(Error::invalid(
                    referrer,
                    format!(
                        "shard {} is a link to {}, outside the checkpoint directory",
                        file.display(),
                        target.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_outlives_the_directory_and_pins_only_what_is_inside() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("checkpoint-1");
        std::fs::create_dir(&ck).unwrap();
        std::fs::write(ck.join("a"), b"hello").unwrap();
        std::fs::write(d.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), ck.join("leak")).unwrap();
        std::os::unix::fs::symlink(ck.join("a"), ck.join("alias")).unwrap();
        std::fs::create_dir(ck.join("sub")).unwrap();
        std::fs::create_dir_all(ck.join("deep/deeper")).unwrap();
        std::fs::write(ck.join("sub/x"), b"in sub").unwrap();
        std::fs::write(ck.join("deep/deeper/y"), b"too deep").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), ck.join("sub/leak")).unwrap();
        let s = Snapshot::take(&ck).unwrap();
        assert_eq!(Dir::Snapshot(&s).names(), ["a", "alias", "sub/x"]);
        std::fs::remove_dir_all(&ck).unwrap();
        let dir = Dir::Snapshot(&s);
        assert_eq!(dir.read("a").unwrap().as_deref(), Some(&b"hello"[..]));
        // Twice: reading does not move a shared offset.
        assert_eq!(dir.read("alias").unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(dir.read("a").unwrap().as_deref(), Some(&b"hello"[..]));
        assert!(dir.read("leak").unwrap().is_none());
        assert!(!dir.has_file("leak") && dir.has_file("a") && !dir.has_file("alias"));
        assert_eq!(dir.read("sub/x").unwrap().as_deref(), Some(&b"in sub"[..]));
        assert!(dir.has_file("sub/x") && !dir.has_file("sub/leak"));
        assert!(Dir::Live(&ck).read("a").unwrap().is_none());
    }
}
