//! A pinned source file: open, fingerprinted and mapped read-only, whatever its format.
//!
//! Owns the invariant "a mapped byte is only read while the file is the one that was
//! validated". A [`SourceFile`] is created only by a format's opener after that format's own
//! validation passed (a file that has not passed the gate is never mapped: a mapped file that
//! shrinks raises SIGBUS). Readers call [`SourceFile::check_fd`] (one `fstat`) before touching
//! the map and after using the bytes, and [`SourceFile::verify`] (path and descriptor) before a
//! pass. The map is registered with [`crate::format::sigbus`], so a truncation that lands
//! between a check and a read yields zeros and a poisoned flag instead of killing the process.
//! The open descriptor keeps the inode alive: a trainer deleting the file cannot pull the data
//! away.

use crate::error::{Error, IoContext, Result};
use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Identity of a file's contents as far as the filesystem tells: if any field changes, the
/// file is not the one that was validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl Fingerprint {
    /// Fingerprint from file metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }

    /// Which field differs from `other`, for messages.
    pub fn diff(&self, other: &Fingerprint) -> Option<String> {
        if self.dev != other.dev || self.ino != other.ino {
            Some("replaced by another file".into())
        } else if self.size != other.size {
            Some(format!("size {} -> {}", self.size, other.size))
        } else if self.mtime_ns != other.mtime_ns {
            Some("modified".into())
        } else {
            None
        }
    }
}

/// One validated file, open and mapped read-only.
#[derive(Debug)]
pub struct SourceFile {
    /// Where it was opened.
    pub path: PathBuf,
    /// Its fingerprint when validated.
    pub fingerprint: Fingerprint,
    /// Keeps the inode alive (unlinking by the trainer cannot pull the data away).
    file: File,
    /// SIGBUS protection of the map (declared before `map`: unregistered before unmapping).
    guard: Option<super::sigbus::Guard>,
    /// `None` for a file whose data section is empty (mapping zero bytes is an error).
    map: Option<Mmap>,
}

/// What [`SourceFile::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Path and descriptor still match the fingerprint.
    Same,
    /// The path is gone (deleted or rotated away) but the pinned descriptor is intact.
    Unlinked,
}

impl SourceFile {
    /// Map `file` (already opened at `path`, with `fingerprint` taken from its descriptor, and
    /// validated by its format's opener) read-only and register the map with the SIGBUS guard.
    pub fn map(file: File, path: &Path, fingerprint: Fingerprint) -> Result<SourceFile> {
        let len = fingerprint.size;
        let map = if len > 0 {
            // SAFETY: the map is read-only and private to this process. A mapped file that is
            // truncated by another process raises SIGBUS on access, so (1) formats map only
            // files whose length matched what their headers declare a moment ago, (2) every
            // reader re-checks the descriptor (`check_fd`) before touching the map and after
            // using the bytes, and (3) the map is registered with `sigbus`, whose handler
            // turns a fault into zero bytes plus a "poisoned" flag that `check_fd` reports.
            // Bytes changed in place are only ever read as plain numbers, never trusted as
            // references or lengths.
            let m = unsafe { MmapOptions::new().len(len as usize).map(&file) }.ctx("mmap", path)?;
            // Streaming passes read each file front to back once.
            let _ = m.advise(Advice::Sequential);
            Some(m)
        } else {
            None
        };
        let guard = map
            .as_ref()
            .map(|m| super::sigbus::register(m.as_ptr() as usize, m.len()));
        let src = SourceFile {
            path: path.to_path_buf(),
            fingerprint,
            file,
            guard,
            map,
        };
        src.check_fd()?;
        Ok(src)
    }

    /// The whole file's bytes (empty for an empty file, which has no map). The caller must
    /// have called [`SourceFile::check_fd`] recently (see the module docs).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Cheap check before touching the map: the open descriptor's size and mtime are
    /// unchanged (one `fstat`).
    pub fn check_fd(&self) -> Result<()> {
        if self.guard.as_ref().is_some_and(|g| g.poisoned()) {
            return Err(Error::SourceChanged {
                path: self.path.clone(),
                detail: "truncated while being read".into(),
            });
        }
        let now = Fingerprint::of(&self.file.metadata().ctx("fstat", &self.path)?);
        match self.fingerprint.diff(&now) {
            None => Ok(()),
            Some(detail) => Err(Error::SourceChanged {
                path: self.path.clone(),
                detail,
            }),
        }
    }

    /// Full check: the descriptor is unchanged, and the path still names the same file
    /// (or is gone, which is harmless on a local filesystem while the descriptor is pinned).
    pub fn verify(&self) -> Result<SourceState> {
        self.check_fd()?;
        match std::fs::metadata(&self.path) {
            Ok(m) => match self.fingerprint.diff(&Fingerprint::of(&m)) {
                None => Ok(SourceState::Same),
                Some(detail) => Err(Error::SourceChanged {
                    path: self.path.clone(),
                    detail,
                }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SourceState::Unlinked),
            Err(e) => Err(Error::io("stat", &self.path, e)),
        }
    }

    /// Copy the bytes at an absolute range of the file into `buf` with `pread` on the pinned
    /// descriptor (nothing is mapped, so nothing counts towards RSS). A file that has become
    /// shorter is reported as changed.
    pub fn read_at(&self, range: Range<usize>, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        debug_assert_eq!(range.len(), buf.len());
        self.file
            .read_exact_at(buf, range.start as u64)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::SourceChanged {
                    path: self.path.clone(),
                    detail: format!("shorter than byte {} it held when validated", range.end),
                },
                _ => Error::io("read", &self.path, e),
            })
    }

    /// Bytes at an absolute range of the file. The caller must have called
    /// [`SourceFile::check_fd`] recently (see the module docs).
    pub fn slice(&self, range: Range<usize>) -> &[u8] {
        &self.bytes()[range]
    }

    /// Drop this process's mappings of a consumed range so they stop counting towards RSS.
    /// The page cache keeps the data (a warm re-read stays warm).
    ///
    /// The range is widened to whole [`FOLIO`] windows of the mapping's addresses: a fault on
    /// a file map maps the whole page-cache folio around it (up to 2 MiB on current kernels),
    /// so the first read of the next range re-maps the tail of the previous one; without the
    /// widening those pages stayed mapped for good. Pages of a neighbouring range still in
    /// use by another thread are simply faulted in again.
    pub fn release(&self, range: Range<usize>) {
        self.release_exact(self.folio_floor(range.start)..self.folio_ceil(range.end));
    }

    /// `off` rounded down to a [`FOLIO`] boundary of the mapping's addresses.
    pub fn folio_floor(&self, off: usize) -> usize {
        match &self.map {
            Some(m) => {
                let base = m.as_ptr() as usize;
                ((base + off) / FOLIO * FOLIO).saturating_sub(base)
            }
            None => off,
        }
    }

    /// `off` rounded up to a [`FOLIO`] boundary of the mapping's addresses (at most the
    /// file length).
    pub fn folio_ceil(&self, off: usize) -> usize {
        match &self.map {
            Some(m) => {
                let base = m.as_ptr() as usize;
                ((base + off).div_ceil(FOLIO) * FOLIO - base).min(m.len())
            }
            None => off,
        }
    }

    /// Drop the mappings of the whole pages inside `range`.
    pub fn release_exact(&self, range: Range<usize>) {
        if let Some(m) = &self.map {
            let end = range.end.min(m.len());
            if end > range.start {
                // SAFETY: MADV_DONTNEED on a read-only, file-backed shared-or-private map that
                // was never written: the next access re-reads the same bytes from the page
                // cache/file, so no slice we hand out observes different contents.
                let _ = unsafe {
                    m.unchecked_advise_range(
                        UncheckedAdvice::DontNeed,
                        range.start,
                        end - range.start,
                    )
                };
            }
        }
    }
}

/// Granularity of [`SourceFile::release`]: the largest page-cache folio a fault maps at
/// once (PMD size on x86-64 and arm64 with 4 KiB pages).
pub const FOLIO: usize = 2 << 20;
