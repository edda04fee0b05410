//! Surviving a mapped checkpoint file that is truncated while pmad reads it.
//!
//! Trainers (safetensors <= 0.7) rewrite files in place by truncating them. Touching a page of
//! a map past the new end of file raises SIGBUS, which would kill the daemon. pmad re-checks
//! every source before reading (fstat per chunk), but a truncation can still land between the
//! check and the read. This module closes that window: every read-only checkpoint map is
//! registered here, and a SIGBUS handler that finds the faulting address inside a registered
//! map replaces that page with a private zero page (`MAP_FIXED` anonymous mapping), marks the
//! map poisoned, and returns, so the interrupted read completes with zeros. Readers check
//! [`Guard::poisoned`] (via `SourceFile::check_fd`) after using the data and discard it as "source
//! changed". A SIGBUS anywhere else restores the default action and re-faults (a real crash).
//!
//! The handler only reads atomics and calls `mmap`, a plain system call on Linux.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY; SLOTS];
/// The system page size, read once before the handler is installed (the handler must not
/// call anything that is not async-signal-safe).
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// A registered map; unregisters on drop.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Whether a page of this map faulted and was replaced by zeros.
    pub fn poisoned(&self) -> bool {
        self.slot
            .map(|i| REGISTRY[i].poisoned.load(Ordering::Acquire))
            .unwrap_or(false)
    }

    /// Whether the map is protected (false only if all slots were taken).
    pub fn protected(&self) -> bool {
        self.slot.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let s = &REGISTRY[i];
            s.end.store(0, Ordering::Release);
            s.poisoned.store(false, Ordering::Release);
            s.start.store(0, Ordering::Release);
        }
    }
}

/// Register the read-only map `[start, start + len)`.
pub fn register(start: usize, len: usize) -> Guard {
    install();
    if len == 0 {
        return Guard { slot: None };
    }
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.start
            .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.poisoned.store(false, Ordering::Release);
            s.end.store(start + len, Ordering::Release);
            s.start.store(start, Ordering::Release);
            return Guard { slot: Some(i) };
        }
    }
    Guard { slot: None }
}

fn install() {
    INSTALL.call_once(|| {
        // The handler replaces whole pages: it must know the system's page size.
        PAGE.store(crate::sys::page_size(), Ordering::Relaxed);
        // SAFETY: sigaction installs a handler that only touches atomics and calls mmap (see
        // the module docs); the struct is fully initialised (zeroed, then the fields we use
        // set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in REGISTRY.iter() {
        let start = s.start.load(Ordering::Acquire);
        let end = s.end.load(Ordering::Acquire);
        if start != 0 && start != usize::MAX && addr >= start && addr < end {
            let base = addr & !(page - 1);
            // SAFETY: `base` is a page inside a live read-only file map owned by a
            // SourceFile (registered while the map exists). Replacing that page with an
            // anonymous zero page keeps the address range mapped (the map's own munmap
            // later releases it) and makes the interrupted read complete.
            let r = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                s.poisoned.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not one of ours: fall back to the default action; returning re-executes the faulting
    // instruction, which now terminates the process as it would have without us.
    // SAFETY: resetting a signal disposition has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn truncated_map_reads_zeros_and_is_poisoned() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&vec![7u8; 1 << 16]).unwrap();
        drop(f);
        let file = std::fs::File::open(&p).unwrap();
        // SAFETY: test map of a file this test owns; the truncation below is the point.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        let g = register(map.as_ptr() as usize, map.len());
        assert!(g.protected());
        assert_eq!(map[100], 7);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        // Past the new end of file: this would be SIGBUS without the guard.
        let x = std::hint::black_box(map[40_000]);
        assert_eq!(x, 0);
        assert!(g.poisoned());
        drop(g);
        drop(map);
    }
}
