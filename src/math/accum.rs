//! Running accumulators for the daemon's recipes, and the single pass that updates them.
//!
//! Owns the store of running sums and the pass that applies an update to it. Every update is
//! a short list of [`Op`]s (which ops each method needs is [`crate::math::incremental`]'s
//! business) applied in one pass over the new (and evicted) checkpoints, so one read of each
//! input feeds every recipe.
//!
//! Layout invariant: all float elements of the model, tensors sorted by name, form one flat
//! index space cut into pages of [`PAGE`] elements. The store holds, page after page, one
//! [`PAGE`]-long run per slot (a slot is one recipe sum), so a page's slots are one contiguous
//! `&mut` region: pages are updated in parallel with no shared mutable state. The store lives
//! in RAM, or — past `state.memory_budget` — in files `acc-<generation>.bin` under `state.dir`
//! whose blocks are reserved with `fallocate` first (a full disk fails at creation, never as
//! SIGBUS).
//!
//! A file-backed store is double-buffered: a pass reads the current generation and writes the
//! next one into a new file, region by region (copy, then apply the ops), and only then makes
//! it current. An existing generation file is never written again, so the current file is
//! itself a complete snapshot: a state save is an fsync of it plus the manifest, with no copy.
//! The generation the saved manifest names ([`AccStore::persisted`]) is kept until the next
//! save; other superseded generations are deleted after each pass. A failed pass leaves the
//! current generation untouched. The store drops its own mappings of each region once a pass
//! or an emission read is done with it (`MADV_DONTNEED` on a shared file map keeps the data in
//! the page cache and the file), so resident memory stays bounded by what is being worked on,
//! not the store's size.

use crate::error::{Error, IoContext, Result};
use crate::format::Checkpoint;
use crate::math::kernels::{Acc, BLOCK};
use crate::math::kinds::FloatKind;
use memmap2::{MmapMut, MmapOptions};
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Elements per page.
pub const PAGE: usize = 1 << 18;

/// One float tensor in the flat index space.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlatTensor {
    /// Tensor name.
    pub name: String,
    /// Element encoding in the checkpoints.
    pub kind: FloatKind,
    /// First flat element.
    pub start: usize,
    /// Number of elements.
    pub len: usize,
}

/// The float tensors of a model laid out flat.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlatLayout {
    /// Tensors sorted by name.
    pub tensors: Vec<FlatTensor>,
    /// Total float elements.
    pub total: usize,
}

impl FlatLayout {
    /// Layout of a checkpoint's float tensors (others are copied at emission, not accumulated).
    pub fn of(c: &Checkpoint) -> FlatLayout {
        Self::of_only(c, |_| true)
    }

    /// Layout of the float tensors of `c` whose names `keep` accepts (an instance's part).
    pub fn of_only(c: &Checkpoint, keep: impl Fn(&str) -> bool) -> FlatLayout {
        let mut tensors = Vec::new();
        let mut start = 0;
        for t in c.tensors.iter().filter(|t| keep(&t.name)) {
            if let Some(kind) = FloatKind::of_tensor(t) {
                let len = t.elements();
                tensors.push(FlatTensor {
                    name: t.name.clone(),
                    kind,
                    start,
                    len,
                });
                start += len;
            }
        }
        FlatLayout {
            tensors,
            total: start,
        }
    }

    /// Index of the first tensor overlapping flat element `pos`.
    fn find(&self, pos: usize) -> usize {
        self.tensors
            .partition_point(|t| t.start + t.len <= pos)
            .min(self.tensors.len().saturating_sub(1))
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.total.div_ceil(PAGE)
    }
}

/// One step of an update, applied element-wise, in order, to every page.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// slot = 0.
    Zero(usize),
    /// slot += coef · input.
    Axpy {
        /// Target slot.
        slot: usize,
        /// Index into the pass's inputs.
        input: usize,
        /// Coefficient.
        coef: f64,
    },
    /// slot -= other (WMA position shift: T −= S).
    Sub {
        /// Target slot.
        slot: usize,
        /// Slot subtracted.
        other: usize,
    },
    /// slot = alpha · input + (1 − alpha) · slot.
    Ema {
        /// Target slot.
        slot: usize,
        /// Index into the pass's inputs.
        input: usize,
        /// EMA alpha.
        alpha: f64,
    },
}

enum Store<A> {
    Ram(Vec<A>),
    Files(FileStore),
}

/// The file-backed store: the current generation's map (see the module doc).
struct FileStore {
    dir: PathBuf,
    generation: u64,
    path: PathBuf,
    map: MmapMut,
    /// The generation a saved manifest names: never deleted by the store.
    persisted: Option<u64>,
}

/// `<dir>/acc-<generation>.bin`.
pub fn generation_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("acc-{generation}.bin"))
}

/// Generations of the `acc-<N>.bin` files in `dir`.
pub fn generations(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name();
                    n.to_str()?
                        .strip_prefix("acc-")?
                        .strip_suffix(".bin")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Check that a saved accumulator file holds exactly the `want` bytes a store needs.
pub fn check_len(f: &std::fs::File, path: &Path, want: u64) -> Result<()> {
    let have = f.metadata().ctx("stat", path)?.len();
    if have != want {
        return Err(Error::invalid(
            path,
            format!("holds {have} bytes, the accumulators need {want}"),
        ));
    }
    Ok(())
}

/// Copy an accumulator file into a store's bytes, checking its size.
pub fn read_into(path: &Path, dst: &mut [u8]) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ctx("open", path)?;
    check_len(&f, path, dst.len() as u64)?;
    for chunk in dst.chunks_mut(64 << 20) {
        f.read_exact(chunk).ctx("read", path)?;
    }
    Ok(())
}

/// Create `path` with `bytes` allocated and map it read-write.
fn create_mapped(path: &Path, bytes: u64) -> Result<MmapMut> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .ctx("create", path)?;
    if bytes > 0 {
        // Reserve every block now: a full disk fails here with ENOSPC instead of raising
        // SIGBUS later when a page of the map is first written.
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, bytes)
            .map_err(|e| Error::io("fallocate", path, e.into()))?;
    }
    map_generation(&f, path, bytes)
}

/// Map a generation file of exactly `bytes` read-write.
fn map_generation(f: &std::fs::File, path: &Path, bytes: u64) -> Result<MmapMut> {
    // SAFETY: `f` is an `acc-<N>.bin` in pmad's own state directory (one pmad per directory,
    // under its lock) whose length is `bytes`: just created with its blocks allocated (so
    // accesses cannot fault for lack of space), or a saved snapshot whose size was checked.
    // Nothing else writes or truncates it while mapped.
    unsafe { MmapOptions::new().len(bytes as usize).map_mut(f) }.ctx("mmap", path)
}

/// Accumulator slots for all recipes over one model.
pub struct Accumulators<A: Acc> {
    layout: FlatLayout,
    slots: usize,
    store: Store<A>,
    /// The last pass failed after changing sums in place (RAM only).
    damaged: bool,
}

/// Test hook: the next pass reading an input under this directory fails at this page (once
/// per entry), after the pages before it were applied, as if a source changed in the middle
/// of the pass.
#[cfg(test)]
pub(crate) static FAIL_AT_PAGE: std::sync::Mutex<Vec<(PathBuf, usize)>> =
    std::sync::Mutex::new(Vec::new());

/// Bytes a store for `slots` slots over `layout` needs.
pub fn store_bytes(layout: &FlatLayout, slots: usize, acc_size: usize) -> u64 {
    (layout.pages() * PAGE * slots * acc_size) as u64
}

impl<A: Acc + bytemuck::Pod> Accumulators<A> {
    /// Zeroed accumulators: in RAM, or file-backed in directory `dir` when given (as a new
    /// generation numbered after every `acc-<N>.bin` already there).
    pub fn new(layout: FlatLayout, slots: usize, dir: Option<&Path>) -> Result<Self> {
        let elems = layout.pages() * PAGE * slots;
        let store = match dir {
            None => Store::Ram(vec![A::default(); elems]),
            Some(dir) => {
                let bytes = (elems * std::mem::size_of::<A>()) as u64;
                let generation = generations(dir).last().map_or(1, |g| g + 1);
                let path = generation_path(dir, generation);
                let map = create_mapped(&path, bytes)?;
                Store::Files(FileStore {
                    dir: dir.to_path_buf(),
                    generation,
                    path,
                    map,
                    persisted: None,
                })
            }
        };
        Ok(Accumulators {
            layout,
            slots,
            store,
            damaged: false,
        })
    }

    /// File-backed accumulators that adopt an existing generation file (a saved snapshot)
    /// as their current generation, without copying it. It is never written: the next pass
    /// writes a new generation. Its size must match.
    pub fn adopt(layout: FlatLayout, slots: usize, dir: &Path, generation: u64) -> Result<Self> {
        let bytes = store_bytes(&layout, slots, std::mem::size_of::<A>());
        let path = generation_path(dir, generation);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        check_len(&f, &path, bytes)?;
        let map = map_generation(&f, &path, bytes)?;
        Ok(Accumulators {
            layout,
            slots,
            store: Store::Files(FileStore {
                dir: dir.to_path_buf(),
                generation,
                path,
                map,
                persisted: Some(generation),
            }),
            damaged: false,
        })
    }

    /// The layout accumulated over.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// Whether the store is file-backed: the current generation and its file.
    pub fn file(&self) -> Option<(u64, &Path)> {
        match &self.store {
            Store::Ram(_) => None,
            Store::Files(f) => Some((f.generation, &f.path)),
        }
    }

    fn data(&self) -> &[A] {
        match &self.store {
            Store::Ram(v) => v,
            Store::Files(f) => bytemuck::cast_slice(&f.map[..]),
        }
    }

    /// Apply `ops` to every element, reading `inputs` (all compatible with the layout).
    /// Each input's files are re-checked before each page is read. On error a file-backed
    /// store keeps its current generation, exactly; an in-RAM store may be partially updated,
    /// which [`AccStore::damaged`] tells.
    pub fn pass(&mut self, inputs: &[&Checkpoint], ops: &[Op]) -> Result<()> {
        self.damaged = false;
        if ops.is_empty() || self.slots == 0 {
            // Nothing to update (e.g. only `weights` recipes, which keep no sums).
            return Ok(());
        }
        // Resolve each input's tensors to (file, absolute byte start) once.
        let mut locs: Vec<Vec<(usize, usize)>> = Vec::with_capacity(inputs.len());
        for c in inputs {
            let mut v = Vec::with_capacity(self.layout.tensors.len());
            for t in &self.layout.tensors {
                let ct = c.tensor(&t.name).ok_or_else(|| Error::Mismatch {
                    path: c.path.clone(),
                    detail: format!("tensor {} is missing", t.name),
                })?;
                v.push((ct.file, ct.range.start));
            }
            locs.push(v);
        }
        let slots = self.slots;
        let layout = self.layout.clone();
        let used: Vec<usize> = (0..inputs.len())
            .filter(|i| {
                ops.iter().any(
                    |o| matches!(o, Op::Axpy { input, .. } | Op::Ema { input, .. } if input == i),
                )
            })
            .collect();
        // Set once a page's sums are about to change: a failure before that leaves them intact.
        let touched = std::sync::atomic::AtomicBool::new(false);
        // Update one page's region of every slot in place.
        let update = |p: usize, region: &mut [A]| -> Result<()> {
            let lo = p * PAGE;
            let hi = ((p + 1) * PAGE).min(layout.total);
            if lo >= hi {
                return Ok(());
            }
            for &i in &used {
                for f in &inputs[i].files {
                    f.check_fd()?;
                }
            }
            #[cfg(test)]
            if let Some((dir, _)) = FAIL_AT_PAGE.lock().ok().and_then(|mut v| {
                let i = v.iter().position(|(d, page)| {
                    *page == p && inputs.iter().any(|c| c.path.starts_with(d))
                })?;
                Some(v.remove(i))
            }) {
                return Err(Error::SourceChanged {
                    path: dir,
                    detail: format!("injected at page {p}"),
                });
            }
            touched.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut scratch = vec![A::default(); inputs.len() * BLOCK];
            // Per used input: (file, start, end) of the bytes read and not yet released.
            let mut spans: Vec<Option<(usize, usize, usize)>> = vec![None; used.len()];
            let mut ti = layout.find(lo);
            let mut pos = lo;
            while pos < hi {
                let t = &layout.tensors[ti];
                let seg_end = (t.start + t.len).min(hi);
                let mut b = pos;
                while b < seg_end {
                    let e = (b + BLOCK).min(seg_end);
                    let len = e - b;
                    let isz = t.kind.size();
                    let in_t = b - t.start;
                    for &i in &used {
                        let (fi, start) = locs[i][ti];
                        let r = start + in_t * isz..start + (in_t + len) * isz;
                        A::decode(
                            t.kind,
                            inputs[i].files[fi].slice(r),
                            &mut scratch[i * BLOCK..i * BLOCK + len],
                        );
                    }
                    let off = b - lo;
                    apply(region, ops, &scratch, off, len);
                    b = e;
                }
                // Release what this page read once per stretch of each input file, not per
                // tensor: a page of thousands of small tensors makes a few madvise calls.
                for (&i, span) in used.iter().zip(spans.iter_mut()) {
                    let (fi, start) = locs[i][ti];
                    let isz = t.kind.size();
                    let r = start + (pos - t.start) * isz..start + (seg_end - t.start) * isz;
                    match span {
                        Some((f, _, hi)) if *f == fi && r.start == *hi => *hi = r.end,
                        _ => {
                            if let Some((f, lo, hi)) = span.take() {
                                inputs[i].files[f].release(lo..hi);
                            }
                            *span = Some((fi, r.start, r.end));
                        }
                    }
                }
                pos = seg_end;
                ti += 1;
            }
            for (&i, span) in used.iter().zip(spans) {
                if let Some((f, lo, hi)) = span {
                    inputs[i].files[f].release(lo..hi);
                }
            }
            Ok(())
        };
        match &mut self.store {
            Store::Ram(data) => {
                let r = data
                    .par_chunks_mut(PAGE * slots)
                    .enumerate()
                    .try_for_each(|(p, region)| update(p, region));
                self.damaged = r.is_err() && touched.load(std::sync::atomic::Ordering::Relaxed);
                r
            }
            Store::Files(fs) => {
                // Out of place: the next generation, region by region, from the current one.
                let next = fs.generation + 1;
                let path = generation_path(&fs.dir, next);
                let mut map = create_mapped(&path, fs.map.len() as u64)?;
                let src: &[A] = bytemuck::cast_slice(&fs.map[..]);
                let dst: &mut [A] = bytemuck::cast_slice_mut(&mut map[..]);
                let r = dst
                    .par_chunks_mut(PAGE * slots)
                    .zip(src.par_chunks(PAGE * slots))
                    .enumerate()
                    .try_for_each(|(p, (d, s))| {
                        d.copy_from_slice(s);
                        let r = update(p, d);
                        release_range(s.as_ptr() as usize, std::mem::size_of_val(s));
                        release_range(d.as_ptr() as usize, std::mem::size_of_val(d));
                        r
                    });
                if let Err(e) = r {
                    drop(map);
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                fs.map = map;
                let old_path = std::mem::replace(&mut fs.path, path);
                let old_gen = std::mem::replace(&mut fs.generation, next);
                if fs.persisted != Some(old_gen) {
                    let _ = std::fs::remove_file(old_path);
                }
                Ok(())
            }
        }
    }

    /// Write `slot / divisor` for flat elements `range` of tensor `ti`, encoded as `out_kind`.
    pub fn emit_into(
        &self,
        slot: usize,
        divisor: f64,
        flat: Range<usize>,
        out_kind: FloatKind,
        out: &mut [u8],
    ) {
        let release = matches!(self.store, Store::Files(_));
        let data = self.data();
        let d = A::from_f64(divisor);
        let one = divisor == 1.0;
        let mut tmp = [A::default(); BLOCK];
        let osz = out_kind.size();
        let mut pos = flat.start;
        let mut o = 0;
        while pos < flat.end {
            let p = pos / PAGE;
            let page_end = ((p + 1) * PAGE).min(flat.end);
            let e = page_end.min(pos + BLOCK);
            let len = e - pos;
            let base = p * PAGE * self.slots + slot * PAGE + (pos - p * PAGE);
            let src = &data[base..base + len];
            let t = &mut tmp[..len];
            if one {
                t.copy_from_slice(src);
            } else {
                for (x, s) in t.iter_mut().zip(src) {
                    *x = div(*s, d);
                }
            }
            A::encode(out_kind, t, &mut out[o..o + len * osz]);
            if release && e == page_end {
                // This page's run of the slot has been read: drop it from our mappings.
                let run = base - (pos - flat.start.max(p * PAGE));
                let lo = data[run..].as_ptr() as usize;
                let hi = src.as_ptr() as usize + std::mem::size_of_val(src);
                release_range(lo, hi - lo);
            }
            o += len * osz;
            pos = e;
        }
    }

    /// Copy of one slot's values (for tests and state snapshots).
    pub fn slot_values(&self, slot: usize) -> Vec<A> {
        let data = self.data();
        let mut v = Vec::with_capacity(self.layout.total);
        for p in 0..self.layout.pages() {
            let lo = p * PAGE;
            let hi = ((p + 1) * PAGE).min(self.layout.total);
            let base = p * PAGE * self.slots + slot * PAGE;
            v.extend_from_slice(&data[base..base + (hi - lo)]);
        }
        v
    }
}

/// Drop this process's page-table entries for the whole system pages inside
/// `[addr, addr + len)` of a file-backed accumulator map, so they stop counting towards RSS
/// (and the OOM score). Data is kept: the map is `MAP_SHARED`, so dirty pages stay in the
/// page cache, are written back by the kernel, and are faulted in again on the next access.
fn release_range(addr: usize, len: usize) {
    let page = crate::sys::page_size();
    let a = addr.div_ceil(page) * page;
    let b = (addr + len) / page * page;
    if b > a {
        // SAFETY: [a, b) lies inside a live MAP_SHARED file mapping owned by the caller;
        // MADV_DONTNEED on such a mapping never discards data (unlike on private or anonymous
        // memory), so later reads see the same bytes.
        let _ = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }
}

#[inline]
fn div<A: Acc>(a: A, d: A) -> A {
    // Acc has no Div bound: f32/f64 division via the f64 path is exact enough for f32 and
    // exact for f64 (one rounding each way).
    A::from_f64(to_f64(a) / to_f64(d))
}

#[inline]
fn to_f64<A: Acc>(a: A) -> f64 {
    let mut b = [0u8; 8];
    A::encode(FloatKind::F64, std::slice::from_ref(&a), &mut b);
    f64::from_le_bytes(b)
}

/// Apply ops to `len` elements at offset `off` of each slot run in a page region.
fn apply<A: Acc>(region: &mut [A], ops: &[Op], scratch: &[A], off: usize, len: usize) {
    for op in ops {
        match *op {
            Op::Zero(s) => region[s * PAGE + off..s * PAGE + off + len].fill(A::default()),
            Op::Axpy { slot, input, coef } => {
                let c = A::from_f64(coef);
                let x = &scratch[input * BLOCK..input * BLOCK + len];
                let dst = &mut region[slot * PAGE + off..slot * PAGE + off + len];
                if coef == 1.0 {
                    for (d, x) in dst.iter_mut().zip(x) {
                        *d = *d + *x;
                    }
                } else if coef == -1.0 {
                    for (d, x) in dst.iter_mut().zip(x) {
                        *d = *d - *x;
                    }
                } else {
                    for (d, x) in dst.iter_mut().zip(x) {
                        *d = *d + c * *x;
                    }
                }
            }
            Op::Sub { slot, other } => {
                let (a, b) = if slot < other {
                    let (lo, hi) = region.split_at_mut(other * PAGE);
                    (
                        &mut lo[slot * PAGE + off..slot * PAGE + off + len],
                        &hi[off..off + len],
                    )
                } else {
                    let (lo, hi) = region.split_at_mut(slot * PAGE);
                    (
                        &mut hi[off..off + len],
                        &lo[other * PAGE + off..other * PAGE + off + len],
                    )
                };
                for (d, s) in a.iter_mut().zip(b.iter()) {
                    *d = *d - *s;
                }
            }
            Op::Ema { slot, input, alpha } => {
                let a = A::from_f64(alpha);
                let x = &scratch[input * BLOCK..input * BLOCK + len];
                let dst = &mut region[slot * PAGE + off..slot * PAGE + off + len];
                // e + a (x − e): one multiply, and exact when x == e.
                for (d, x) in dst.iter_mut().zip(x) {
                    *d = *d + a * (*x - *d);
                }
            }
        }
    }
}

/// Type-erased accumulators (f32 or f64), as the daemon holds them.
pub trait AccStore: Send + Sync {
    /// See [`Accumulators::pass`].
    fn pass(&mut self, inputs: &[&Checkpoint], ops: &[Op]) -> Result<()>;
    /// Whether the last pass failed after changing sums in place (an in-RAM store whose
    /// failure came after some pages were updated): they hold nothing meaningful until
    /// recomputed. Always false for a file-backed store, which a failed pass leaves exactly
    /// as it was.
    fn damaged(&self) -> bool;
    /// See [`Accumulators::emit_into`].
    fn emit_into(
        &self,
        slot: usize,
        divisor: f64,
        flat: Range<usize>,
        out: FloatKind,
        buf: &mut [u8],
    );
    /// The layout.
    fn layout(&self) -> &FlatLayout;
    /// Current generation and its file, if file-backed.
    fn file(&self) -> Option<(u64, &Path)>;
    /// A saved manifest now names generation `generation` of a file-backed store: keep that
    /// file until a later call names another (no-op in RAM).
    fn persisted(&mut self, generation: u64);
    /// One slot's values widened to f64 (tests, snapshots).
    fn slot_f64(&self, slot: usize) -> Vec<f64>;
    /// The whole store as bytes (for state snapshots).
    fn raw(&self) -> &[u8];
    /// Replace an in-RAM store's bytes with a snapshot's (its size must match).
    fn load(&mut self, snapshot: &Path) -> Result<()>;
}

impl<A: Acc + bytemuck::Pod> AccStore for Accumulators<A> {
    fn pass(&mut self, inputs: &[&Checkpoint], ops: &[Op]) -> Result<()> {
        Accumulators::pass(self, inputs, ops)
    }
    fn damaged(&self) -> bool {
        self.damaged
    }
    fn emit_into(
        &self,
        slot: usize,
        divisor: f64,
        flat: Range<usize>,
        out: FloatKind,
        buf: &mut [u8],
    ) {
        Accumulators::emit_into(self, slot, divisor, flat, out, buf)
    }
    fn layout(&self) -> &FlatLayout {
        &self.layout
    }
    fn file(&self) -> Option<(u64, &Path)> {
        Accumulators::file(self)
    }
    fn persisted(&mut self, generation: u64) {
        if let Store::Files(f) = &mut self.store {
            f.persisted = Some(generation);
        }
    }
    fn slot_f64(&self, slot: usize) -> Vec<f64> {
        self.slot_values(slot).into_iter().map(to_f64).collect()
    }
    fn raw(&self) -> &[u8] {
        bytemuck::cast_slice(self.data())
    }
    fn load(&mut self, snapshot: &Path) -> Result<()> {
        match &mut self.store {
            Store::Ram(v) => read_into(snapshot, bytemuck::cast_slice_mut(v)),
            Store::Files(f) => Err(Error::Internal(format!(
                "{}: a file-backed store adopts its snapshot instead of loading it",
                f.path.display()
            ))),
        }
    }
}
