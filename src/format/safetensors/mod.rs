//! safetensors files: validating one file from disk ([`open_file`]) on top of the pure
//! parsers in [`header`].
//!
//! A file is mapped only after its header passed every check of [`header::parse_header`]
//! (which include "the file is exactly as long as the header says"), and the reference
//! `safetensors` crate then reads the same bytes as the final authority. The header is read
//! with `pread`, not through a map, because the file may still be shrinking.

pub mod header;

use crate::error::{Error, IoContext, Result};
use crate::format::source::{Fingerprint, SourceFile};
use header::{Header, HeaderError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Open, validate and map one safetensors file; returns it with its validated header.
pub fn open_file(path: &Path) -> Result<(SourceFile, Header)> {
    let file = File::open(path).ctx("open", path)?;
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
    // The reference reader is the final authority; it reads only the header bytes of the map
    // (the file's length was checked against the fingerprint above).
    header::reference_check(src.bytes()).map_err(|e| Error::invalid(path, e.to_string()))?;
    Ok((src, parsed))
}
