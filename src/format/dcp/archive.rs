//! The zip archive of one DCP item: which entries it holds and where each entry's stored
//! bytes are, relative to the item's first byte; and the CRC32 bookkeeping for an entry whose
//! bytes are replaced.
//!
//! The archive is parsed by the `zip` crate (maintained and fuzzed upstream; no compression
//! features are compiled in) over a cursor on exactly the item's bytes, so every offset it
//! reports is relative to the item. On top of it this module enforces what pmad relies on:
//! every entry is stored, not encrypted, its compressed and uncompressed sizes agree, its
//! bytes lie inside the item, names are unique, and there are at most [`MAX_ENTRIES`]
//! entries (torch writes 7). Its own reads outside the crate — the local header's flags and
//! the data descriptor's place — are bounds-checked.
//!
//! Invariant: an [`Entry`] returned by [`entries`] describes a byte range inside the item it
//! was read from, and [`patch_crc`] only writes the 4-byte CRC fields the archive already
//! has (central directory, then the data descriptor if the entry has one, else the local
//! header), so the archive's layout never changes.

use std::io::Cursor;
use std::ops::Range;

/// More entries than any `torch.save` archive has (7: data.pkl, data/0, version, byteorder,
/// .format_version, .storage_alignment, .data/serialization_id).
pub const MAX_ENTRIES: usize = 64;

/// General-purpose flag bit 3: sizes and CRC follow the data in a data descriptor.
const FLAG_DESCRIPTOR: u16 = 0x0008;
/// Optional signature in front of a data descriptor.
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;

/// One entry of an item's archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name (`archive/data.pkl`, `archive/data/0`, ...).
    pub name: String,
    /// Its stored bytes, relative to the item's first byte.
    pub data: Range<usize>,
    /// The CRC32 the central directory records.
    pub crc32: u32,
    /// Offset of its local file header.
    pub local_header: usize,
    /// Offset of its central directory header.
    pub central_header: usize,
    /// Offset of the CRC field of its data descriptor, when it has one.
    pub descriptor_crc: Option<usize>,
}

/// The entries of the archive that is exactly `item`, in central directory order. The error
/// says what is wrong (the caller adds the file and the item's key and offset).
pub fn entries(item: &[u8]) -> Result<Vec<Entry>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(item))
        .map_err(|e| format!("not a readable zip archive ({e})"))?;
    if zip.len() > MAX_ENTRIES {
        return Err(format!(
            "{} entries in the archive; torch.save writes 7 (at most {MAX_ENTRIES} accepted)",
            zip.len()
        ));
    }
    let mut out: Vec<Entry> = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| format!("archive entry {i}: {e}"))?;
        let name = f.name().to_string();
        let bad = |what: String| format!("archive entry {name:?}: {what}");
        if f.encrypted() {
            return Err(bad("encrypted".into()));
        }
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(bad(format!(
                "compressed ({:?}); torch.save stores entries uncompressed",
                f.compression()
            )));
        }
        if f.compressed_size() != f.size() {
            return Err(bad(format!(
                "stored size {} differs from its size {}",
                f.compressed_size(),
                f.size()
            )));
        }
        let to_usize = |v: u64, what: &str| {
            usize::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in memory")))
        };
        let start = to_usize(
            f.data_start().ok_or_else(|| bad("no data offset".into()))?,
            "data offset",
        )?;
        let len = to_usize(f.size(), "size")?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= item.len())
            .ok_or_else(|| {
                bad(format!(
                    "bytes {start}..{} lie outside the item's {} bytes",
                    start as u128 + len as u128,
                    item.len()
                ))
            })?;
        let local_header = to_usize(f.header_start(), "local header offset")?;
        let central_header = to_usize(f.central_header_start(), "central header offset")?;
        let flags = read_u16(item, local_header + 6)
            .ok_or_else(|| bad("local header outside the item".into()))?;
        let descriptor_crc = if flags & FLAG_DESCRIPTOR != 0 {
            let at = if read_u32(item, end) == Some(DESCRIPTOR_SIG) {
                end + 4
            } else {
                end
            };
            read_u32(item, at).ok_or_else(|| bad("data descriptor outside the item".into()))?;
            Some(at)
        } else {
            None
        };
        if read_u32(item, central_header + 16).is_none() {
            return Err(bad("central directory header outside the item".into()));
        }
        if out.iter().any(|e| e.name == name) {
            return Err(bad("appears twice".into()));
        }
        out.push(Entry {
            name,
            data: start..end,
            crc32: f.crc32(),
            local_header,
            central_header,
            descriptor_crc,
        });
    }
    Ok(out)
}

/// The CRC32 of `bytes` (what an entry's CRC field must hold).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Record `crc` as `entry`'s CRC32 in `item` (an entry whose bytes were replaced), everywhere
/// the archive keeps it: the central directory, and the data descriptor if the entry has one,
/// else its local header. Python's `zipfile` checks these; torch's loaders do not.
pub fn patch_crc(item: &mut [u8], entry: &Entry, crc: u32) {
    put_u32(item, entry.central_header + 16, crc);
    match entry.descriptor_crc {
        Some(at) => put_u32(item, at, crc),
        None => put_u32(item, entry.local_header + 14, crc),
    }
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = at.checked_add(4).and_then(|e| b.get_mut(at..e)) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dcp")
    }

    /// Every item of every fixture checkpoint, as (label, bytes), from the item lists torch
    /// wrote beside them.
    fn items() -> Vec<(String, Vec<u8>)> {
        let mut v = Vec::new();
        for set in ["torchtitan", "fsdp2-2rank"] {
            for step in [100, 200, 300] {
                let dir = fixtures().join(set);
                let list: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(dir.join(format!("items-step-{step}.json"))).unwrap(),
                )
                .unwrap();
                for it in list.as_array().unwrap() {
                    let file = dir
                        .join(format!("step-{step}"))
                        .join(it["file"].as_str().unwrap());
                    let bytes = std::fs::read(&file).unwrap();
                    let (off, len) = (
                        it["offset"].as_u64().unwrap() as usize,
                        it["length"].as_u64().unwrap() as usize,
                    );
                    v.push((
                        format!("{set}/step-{step}/{}", it["fqn"]),
                        bytes[off..off + len].to_vec(),
                    ));
                }
            }
        }
        v
    }

    #[test]
    fn reads_every_item_torch_wrote() {
        let all = items();
        assert!(all.len() > 100, "{} items", all.len());
        for (label, item) in &all {
            let es = entries(item).unwrap_or_else(|e| panic!("{label}: {e}"));
            let names: Vec<&str> = es.iter().map(|e| e.name.as_str()).collect();
            assert!(
                names.iter().any(|n| n.ends_with("/data.pkl")),
                "{label}: {names:?}"
            );
            for e in &es {
                assert_eq!(crc32(&item[e.data.clone()]), e.crc32, "{label} {}", e.name);
            }
        }
    }

    #[test]
    fn a_patched_crc_is_what_python_zipfile_checks() {
        let (label, mut item) = items()
            .into_iter()
            .find(|(l, _)| l.contains("output.weight"))
            .unwrap();
        let es = entries(&item).unwrap();
        let payload = es.iter().find(|e| e.name.ends_with("/data/0")).unwrap();
        assert!(payload.descriptor_crc.is_some(), "torch writes descriptors");
        for b in &mut item[payload.data.clone()] {
            *b ^= 0x5a;
        }
        let crc = crc32(&item[payload.data.clone()]);
        assert_ne!(crc, payload.crc32, "the recorded CRC is stale now");
        patch_crc(&mut item, payload, crc);
        let after = entries(&item).unwrap();
        let p = after.iter().find(|e| e.name == payload.name).unwrap();
        assert_eq!(p.crc32, crc, "{label}");
        assert_eq!(p.data, payload.data, "layout unchanged");
        // The independent check: Python's zipfile verifies every entry's CRC32.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("item.zip");
        std::fs::write(&path, &item).unwrap();
        let check = |p: &Path| {
            std::process::Command::new("python3")
                .args([
                    "-c",
                    "import sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).testzip())",
                ])
                .arg(p)
                .output()
                .expect("python3")
        };
        let out = check(&path);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "None",
            "{out:?}"
        );
        // Without the patch zipfile names the entry whose bytes changed.
        let mut unpatched = item.clone();
        patch_crc(&mut unpatched, payload, payload.crc32);
        std::fs::write(&path, &unpatched).unwrap();
        let out = check(&path);
        assert!(
            !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("data/0"),
            "{out:?}"
        );
    }

    #[test]
    fn hostile_items_are_refused_with_a_reason() {
        let (_, item) = items().into_iter().next().unwrap();
        // Truncated anywhere: refused, never a panic.
        for cut in [0, 1, 30, item.len() / 2, item.len() - 1] {
            assert!(entries(&item[..cut]).is_err(), "cut at {cut}");
        }
        let es = entries(&item).unwrap();
        let e = &es[0];
        // A compressed entry (method 8 in the central directory).
        let mut c = item.clone();
        c[e.central_header + 10] = 8;
        let err = entries(&c).unwrap_err();
        assert!(err.contains("compress") || err.contains("zip"), "{err}");
        // A local header offset past the end.
        let mut o = item.clone();
        o[e.central_header + 42..e.central_header + 46].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(entries(&o).is_err());
        // A size that runs past the item.
        let mut s = item.clone();
        s[e.central_header + 20..e.central_header + 28].fill(0xee);
        assert!(entries(&s).is_err());
    }
}
