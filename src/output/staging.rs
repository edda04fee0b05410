//! Staging and the durable atomic publish: an output appears under its final name only when
//! complete.
//!
//! Everything is written into `<parent>/.pmad-tmp-<tag>-<random>/`, every file is fsynced (a
//! failed fsync abandons the output: it is never retried), then the temp dir is fsynced,
//! renamed into place and the parent fsynced. A [`Staging`] that is dropped without
//! [`Staging::commit`] removes its temp dir; temp dirs left by a crash are removed by
//! [`sweep_temps`] at start.

use crate::error::{Error, IoContext, Result};
use crate::fsio;
use std::path::{Path, PathBuf};

/// Prefix of pmad's temp dirs; swept at start and never ingested.
pub const TMP_PREFIX: &str = ".pmad-tmp-";

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
        fsio::sync_tree(&self.tmp)?;
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
        if name.starts_with(TMP_PREFIX) {
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
        std::fs::create_dir(d.path().join(format!("{TMP_PREFIX}9-abc"))).unwrap();
        assert_eq!(sweep_temps(d.path()).unwrap(), 1);
    }
}
