//! safetensors files: validating one file from disk ([`open_file`]) on top of the pure
//! parsers in [`header`].
//!
//! A file is mapped only after its header passed every check of [`header::parse_header`]
//! (which include "the file is exactly as long as the header says" and every rule of the
//! reference `safetensors` reader, held to it by fuzzing). The header is read with `pread`,
//! not through a map, because the file may still be shrinking.

pub mod header;

use crate::error::{Error, IoContext, Result};
use crate::format::source::{Fingerprint, SourceFile};
use header::{Header, HeaderError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Open, validate and map one safetensors file; returns it with its validated header.
pub fn open_file(path: &Path) -> Result<(SourceFile, Header)> {
    open_fd(File::open(path).ctx("open", path)?, path)
}

/// Validate and map an open safetensors file (`path` names it in messages).
pub fn open_fd(file: File, path: &Path) -> Result<(SourceFile, Header)> {
    let meta = file.metadata().ctx("stat", path)?;
    if !meta.is_file() {
        return Err(Error::invalid(path, "not a regular file"));
    }
    let fingerprint = Fingerprint::of(&meta);
    let len = fingerprint.size;
    let mut prefix = vec![0u8; 8.min(len as usize)];
    file.read_exact_at(&mut prefix, 0).ctx("read", path)?;
    let parsed = loop {
        match header::parse_header(&prefix, len) {
            Ok(h) => break h,
            Err(HeaderError::NeedMore(n)) if n > prefix.len() => {
                let old = prefix.len();
                prefix.resize(n, 0);
                file.read_exact_at(&mut prefix[old..], old as u64)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => {
                            Error::not_ready(path, "file shrank while its header was read")
                        }
                        _ => Error::io("read", path, e),
                    })?;
            }
            Err(HeaderError::NeedMore(_)) => {
                return Err(Error::invalid(path, "header parse did not converge"))
            }
            Err(HeaderError::Truncated(d)) => return Err(Error::not_ready(path, d)),
            Err(HeaderError::Invalid(d)) => return Err(Error::invalid(path, d)),
        }
    };
    let src = SourceFile::map(file, path, fingerprint)?;
    Ok((src, parsed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::source::FOLIO;
    use std::ops::Range;
    use std::path::Path;

    /// Resident KiB of this process's mappings of `path` (from /proc/self/smaps).
    fn mapped_kib(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_string_lossy();
        let mut inside = false;
        let mut total = 0;
        for l in smaps.lines() {
            if l.split_whitespace()
                .next()
                .is_some_and(|a| a.contains('-') && !a.ends_with(':'))
            {
                inside = l.ends_with(name.as_ref());
            } else if inside && l.starts_with("Rss:") {
                total += l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
            }
        }
        total
    }

    #[test]
    fn release_unmaps_whole_folios_and_keeps_the_bytes() {
        let d = tempfile::tempdir().unwrap();
        let (mut bytes, _) = header::build_header(
            &Default::default(),
            &[("w".to_string(), safetensors::Dtype::U8, vec![9 << 20])],
        )
        .unwrap();
        let data_start = bytes.len();
        bytes.extend((0..9u32 << 20).map(|i| (i % 251) as u8));
        let path = d.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let (f, _) = open_file(&path).unwrap();
        let len = bytes.len();
        for off in [0, 1, data_start, FOLIO - 1, FOLIO, len - 1, len] {
            let (lo, hi) = (f.folio_floor(off), f.folio_ceil(off));
            assert!(lo <= off && off <= hi && hi <= len, "{off}: {lo}..{hi}");
        }
        let sum = |r: Range<usize>| f.slice(r).iter().map(|b| *b as u64).sum::<u64>();
        // Consecutive units: read a piece, release it, read the next one (whose first fault
        // maps the whole folio it shares with the previous piece), release it.
        let mid = data_start + (4 << 20) + 12_345;
        let a = sum(data_start..mid);
        assert!(mapped_kib(&path) >= 4 << 10, "reading 4 MiB mapped it");
        f.release(data_start..mid);
        let b = sum(mid..len);
        f.release(mid..len);
        assert_eq!(
            mapped_kib(&path),
            0,
            "pages left mapped after both releases"
        );
        assert_eq!(sum(data_start..len), a + b, "same bytes after release");
    }
}
