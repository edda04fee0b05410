//! Every durable filesystem step pmad takes when publishing, in one place.
//!
//! Owns: create / write / fsync / rename / remove for outputs and state, each returning errors
//! with the path. Invariant: a failed `fsync` is never retried (the kernel may have dropped the
//! dirty pages and cleared the error; retrying would report success for lost data), so callers
//! abandon the output instead.
//!
//! Fault injection for the fault tests (docs/reliability.md, T2): when the environment variable
//! `PMAD_FAULT` is set to `OP:N` (OP one of `create`, `write`, `fsync`, `rename`, `mkdir`), the
//! N-th call (1-based) of that operation in this process fails with EIO; `OP:N:TEXT` counts
//! only calls on paths containing TEXT (e.g. `create:1:acc-` fails the first accumulator
//! snapshot). It is read once at start; unset in production, the cost is one check per call.

use crate::error::{Error, IoContext, Result};
use crate::names::named_enum;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

named_enum! {
    /// The kinds of operation a fault can be injected into.
    pub enum Op {
        /// Creating a file.
        Create = "create",
        /// Writing bytes.
        Write = "write",
        /// fsync of a file or directory.
        Fsync = "fsync",
        /// rename.
        Rename = "rename",
        /// Creating a directory.
        Mkdir = "mkdir",
    }
}

static COUNTERS: [AtomicU64; Op::ALL.len()] = [const { AtomicU64::new(0) }; Op::ALL.len()];

struct Plan {
    op: Op,
    n: u64,
    /// Only operations on paths containing this are counted (empty: all).
    filter: String,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let v = std::env::var("PMAD_FAULT").ok()?;
        let mut it = v.splitn(3, ':');
        let op = it.next()?;
        let op = Op::from_name(op)?;
        let n = it.next()?.parse().ok()?;
        let filter = it.next().unwrap_or_default().to_string();
        Some(Plan { op, n, filter })
    })
    .as_ref()
}

/// Count an operation and fail it if the fault plan says so.
fn gate(op: Op, path: &Path) -> io::Result<()> {
    let Some(p) = plan() else { return Ok(()) };
    if p.op != op || !path.to_string_lossy().contains(p.filter.as_str()) {
        return Ok(());
    }
    let i = Op::ALL.iter().position(|(o, _)| *o == op).unwrap_or(0);
    let n = COUNTERS[i].fetch_add(1, Ordering::Relaxed) + 1;
    if n == p.n {
        return Err(io::Error::from_raw_os_error(5));
    }
    Ok(())
}

/// Create a new file (failing if it exists), mode 0644.
pub fn create(path: &Path) -> Result<File> {
    gate(Op::Create, path).ctx("create", path)?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .ctx("create", path)
}

/// Write all bytes.
pub fn write_all(f: &mut File, path: &Path, buf: &[u8]) -> Result<()> {
    gate(Op::Write, path).ctx("write", path)?;
    f.write_all(buf).ctx("write", path)
}

/// fsync a file (data and metadata). Never retry on failure.
pub fn sync_file(f: &File, path: &Path) -> Result<()> {
    gate(Op::Fsync, path).ctx("fsync", path)?;
    f.sync_all().ctx("fsync", path)
}

/// fsync a directory so that entries created or renamed in it are durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    gate(Op::Fsync, path).ctx("fsync", path)?;
    File::open(path)
        .ctx("open", path)?
        .sync_all()
        .ctx("fsync", path)
}

/// Ask the kernel to start writing back `len` bytes at `offset` now, without waiting
/// (`posix_fadvise(DONTNEED)` queues writeback of dirty pages in the range; pages still being
/// written stay cached). Advisory only: errors are ignored and durability still comes from
/// [`sync_file`]. Called after each streamed write so the final fsync has little left to do.
pub fn start_writeback(f: &File, offset: u64, len: usize) {
    if let Some(n) = std::num::NonZeroU64::new(len as u64) {
        let _ = rustix::fs::fadvise(f, offset, Some(n), rustix::fs::Advice::DontNeed);
    }
}

/// Rename `from` to `to` (atomic within a filesystem).
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    gate(Op::Rename, from).ctx("rename", from)?;
    std::fs::rename(from, to).map_err(|e| Error::io("rename", to, e))
}

/// Atomically swap two existing paths (renameat2 RENAME_EXCHANGE).
pub fn exchange(a: &Path, b: &Path) -> Result<()> {
    gate(Op::Rename, a).ctx("rename", a)?;
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|e| Error::io("rename (exchange)", b, io::Error::from(e)))
}

/// Create a directory (not its parents).
pub fn mkdir(path: &Path) -> Result<()> {
    gate(Op::Mkdir, path).ctx("mkdir", path)?;
    std::fs::create_dir(path).ctx("mkdir", path)
}

/// Create the directories between `dir` and the file `name` (a relative name such as
/// `model_and_optim/__0_0.distcp`) that do not exist yet; `dir` itself must exist.
pub fn create_parents(dir: &Path, name: &str) -> Result<()> {
    let mut at = dir.to_path_buf();
    let parts: Vec<&str> = name.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        if !at.is_dir() {
            mkdir(&at)?;
        }
    }
    Ok(())
}

/// fsync every directory below `dir` (depth first), then `dir`: the entries of files written
/// into subdirectories become durable with it.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).ctx("list", dir)? {
        let e = e.ctx("list", dir)?;
        if e.file_type().ctx("stat", &e.path())?.is_dir() {
            sync_tree(&e.path())?;
        }
    }
    sync_dir(dir)
}

/// Write a small file completely and durably: create, write, fsync.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = create(path)?;
    write_all(&mut f, path, bytes)?;
    sync_file(&f, path)
}

/// Write `bytes` to `path`, replacing what is there (no rename: for object-store mounts, which
/// replace an object whole when it is closed), and fsync it.
pub fn overwrite_file(path: &Path, bytes: &[u8]) -> Result<()> {
    gate(Op::Create, path).ctx("create", path)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .ctx("create", path)?;
    write_all(&mut f, path, bytes)?;
    sync_file(&f, path)
}

/// Copy a file's bytes into a new file durably.
pub fn copy_file(src: &Path, dst: &Path) -> Result<u64> {
    let bytes = std::fs::read(src).ctx("read", src)?;
    write_file(dst, &bytes)?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_full_reports_enospc() {
        // /dev/full accepts open and fails every write with ENOSPC.
        let p = Path::new("/dev/full");
        if !p.exists() {
            eprintln!("skipping: /dev/full not present");
            return;
        }
        let mut f = OpenOptions::new().write(true).open(p).unwrap();
        let err = write_all(&mut f, p, &[0u8; 1 << 16])
            .and_then(|_| f.flush().ctx("flush", p))
            .unwrap_err();
        assert_eq!(err.errno(), Some(28));
        assert_eq!(err.reason(), "no_space");
        assert!(err.to_string().contains("/dev/full"));
    }

    #[test]
    fn write_file_is_complete_and_fails_if_present() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        write_file(&p, b"hello").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        assert!(write_file(&p, b"x").is_err());
    }
}
