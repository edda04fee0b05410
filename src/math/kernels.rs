//! The merge kernels: decode → accumulate → encode over blocks of elements.
//!
//! This module owns the numerics and does no I/O. Invariants:
//! - A merged element is computed as `x_ref + Σ_{i≠ref} w_i (x_i − x_ref)` where `x_ref` is the
//!   newest input. This equals `Σ w_i x_i` because the weights sum to 1 (see
//!   [`crate::math::method`]), but it is far more accurate in a short accumulator: checkpoints
//!   of one run differ little, the differences are exact or nearly so, and N identical inputs
//!   give back exactly the input, bit for bit.
//! - Work is done on small stack blocks ([`BLOCK`] elements) so decode, accumulate and encode
//!   stay in L1; the caller splits tensors into chunks any way it likes (results do not depend on
//!   chunk boundaries or on thread count: every element is computed independently, in a fixed
//!   input order).
//! - Rounding to the output dtype is round-to-nearest-even; NaN stays NaN.

use crate::math::kinds::FloatKind;
use crate::names::named_enum;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// Elements per inner block: three f64 blocks fit in a 48 KiB L1 cache.
pub const BLOCK: usize = 2048;

/// An accumulator element type (f32 or f64).
pub trait Acc:
    Copy
    + Send
    + Sync
    + Default
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + PartialEq
    + 'static
{
    /// Convert an exactly decoded f32 input value.
    fn from_f32(x: f32) -> Self;
    /// Convert an f64 input value (rounds when `Self` is f32).
    fn from_f64(x: f64) -> Self;
    /// Whether the value is finite.
    fn finite(self) -> bool;
    /// Decode one block of `kind` elements from little-endian bytes.
    fn decode(kind: FloatKind, src: &[u8], dst: &mut [Self]);
    /// Encode one block into `kind` little-endian bytes, rounding to nearest even.
    fn encode(kind: FloatKind, src: &[Self], dst: &mut [u8]);
}

impl Acc for f32 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn decode(kind: FloatKind, src: &[u8], dst: &mut [f32]) {
        decode_f32(kind, src, dst)
    }
    #[inline(always)]
    fn encode(kind: FloatKind, src: &[f32], dst: &mut [u8]) {
        encode_f32(kind, src, dst)
    }
}

impl Acc for f64 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn decode(kind: FloatKind, src: &[u8], dst: &mut [f64]) {
        if kind == FloatKind::F64 {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
                *d = f64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            }
            return;
        }
        let mut tmp = [0f32; BLOCK];
        for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK * kind.size())) {
            let t = &mut tmp[..d.len()];
            decode_f32(kind, s, t);
            for (x, y) in d.iter_mut().zip(t.iter()) {
                *x = *y as f64;
            }
        }
    }
    #[inline(always)]
    fn encode(kind: FloatKind, src: &[f64], dst: &mut [u8]) {
        match kind {
            FloatKind::F64 => {
                for (c, x) in dst.chunks_exact_mut(8).zip(src) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
            FloatKind::F32 => {
                for (c, x) in dst.chunks_exact_mut(4).zip(src) {
                    c.copy_from_slice(&(*x as f32).to_le_bytes());
                }
            }
            // Direct f64 -> 16-bit rounding (no double rounding through f32).
            FloatKind::F16 => {
                for (c, x) in dst.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&f16::from_f64(*x).to_bits().to_le_bytes());
                }
            }
            FloatKind::BF16 => {
                for (c, x) in dst.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&bf16::from_f64(*x).to_bits().to_le_bytes());
                }
            }
            FloatKind::F8E4M3 | FloatKind::F8E5M2 => {
                for (c, x) in dst.iter_mut().zip(src) {
                    *c = f8_encode(kind, *x);
                }
            }
        }
    }
}

/// Decode little-endian `kind` bytes into f32 (exact for every kind but F64).
///
/// Inputs may be unaligned (third-party files), so values are assembled with `from_le_bytes`;
/// these loops auto-vectorise.
#[inline(always)]
pub fn decode_f32(kind: FloatKind, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * kind.size());
    match kind {
        FloatKind::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        FloatKind::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        FloatKind::F16 => {
            // Gather into an aligned u16 block, then use half's (F16C where available)
            // slice conversion.
            let mut bits = [0u16; BLOCK];
            for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK * 2)) {
                let b = &mut bits[..d.len()];
                for (x, c) in b.iter_mut().zip(s.chunks_exact(2)) {
                    *x = u16::from_le_bytes([c[0], c[1]]);
                }
                let h: &[f16] = b.reinterpret_cast();
                h.convert_to_f32_slice(d);
            }
        }
        FloatKind::F64 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                *d = f64::from_le_bytes(b) as f32;
            }
        }
        FloatKind::F8E4M3 | FloatKind::F8E5M2 => {
            let table = f8_table(kind);
            for (d, c) in dst.iter_mut().zip(src) {
                *d = table[*c as usize];
            }
        }
    }
}

/// Round an f32 to bfloat16 bits, nearest-even; NaN stays a (quiet) NaN.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// Encode f32 values into little-endian `kind` bytes, rounding to nearest even.
#[inline(always)]
pub fn encode_f32(kind: FloatKind, src: &[f32], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * kind.size());
    match kind {
        FloatKind::BF16 => {
            for (c, x) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
            }
        }
        FloatKind::F32 => {
            for (c, x) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        FloatKind::F16 => {
            let mut h = [f16::ZERO; BLOCK];
            for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK * 2)) {
                let hb = &mut h[..s.len()];
                hb.convert_from_f32_slice(s);
                for (c, v) in d.chunks_exact_mut(2).zip(hb.iter()) {
                    c.copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
        }
        FloatKind::F64 => {
            for (c, x) in dst.chunks_exact_mut(8).zip(src) {
                c.copy_from_slice(&(*x as f64).to_le_bytes());
            }
        }
        FloatKind::F8E4M3 | FloatKind::F8E5M2 => {
            for (c, x) in dst.iter_mut().zip(src) {
                *c = f8_encode(kind, *x as f64);
            }
        }
    }
}

/// Value of every FP8 code (the formats are small enough to tabulate exactly).
fn f8_table(kind: FloatKind) -> &'static [f32; 256] {
    use std::sync::OnceLock;
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    match kind {
        FloatKind::F8E5M2 => E5M2.get_or_init(|| {
            // E5M2 is the top byte of an IEEE binary16.
            std::array::from_fn(|c| f16::from_bits((c as u16) << 8).to_f32())
        }),
        _ => E4M3.get_or_init(|| {
            std::array::from_fn(|c| {
                let sign = if c & 0x80 != 0 { -1.0f32 } else { 1.0 };
                let exp = ((c >> 3) & 0xf) as i32;
                let man = (c & 7) as f32;
                if exp == 15 && c & 7 == 7 {
                    f32::NAN
                } else if exp == 0 {
                    sign * man / 8.0 * 2f32.powi(-6)
                } else {
                    sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
                }
            })
        }),
    }
}

/// Round a value to the nearest FP8 code (ties to the even code), saturating at the largest
/// finite value for E4M3 (which has no infinity). Averages of in-range inputs never overflow.
fn f8_encode(kind: FloatKind, x: f64) -> u8 {
    let table = f8_table(kind);
    let (max_code, nan_code, inf_code) = match kind {
        FloatKind::F8E5M2 => (0x7bu8, 0x7eu8, Some(0x7cu8)),
        _ => (0x7eu8, 0x7fu8, None),
    };
    if x.is_nan() {
        return nan_code;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let m = x.abs();
    if m.is_infinite() {
        return sign | inf_code.unwrap_or(max_code);
    }
    // Positive codes 0..=max_code are in increasing order of value.
    let pos = &table[..=max_code as usize];
    let i = pos.partition_point(|v| (*v as f64) < m);
    let code = if i == 0 {
        0
    } else if i > max_code as usize {
        match inf_code {
            // Beyond the largest finite value by at least half an ulp: IEEE rounds to inf.
            Some(inf) if m >= pos[max_code as usize] as f64 * (1.0 + 1.0 / 8.0) => inf,
            _ => max_code,
        }
    } else {
        let (lo, hi) = (pos[i - 1] as f64, pos[i] as f64);
        if m - lo < hi - m {
            (i - 1) as u8
        } else if m - lo > hi - m {
            i as u8
        } else if (i - 1) % 2 == 0 {
            (i - 1) as u8
        } else {
            i as u8
        }
    };
    sign | code
}

/// Merge one chunk of a float tensor.
///
/// `srcs[i]` holds the chunk's bytes from input `i` (oldest first, all `in_kind`), `weights[i]`
/// its weight (summing to 1); the result is encoded as `out_kind` into `out`. Returns the
/// number of non-finite results. With `fix_nonfinite`, elements whose result is non-finite are
/// recomputed as the plain weighted sum (so N identical infinities give infinity, not NaN).
pub fn merge_chunk<A: Acc>(
    srcs: &[&[u8]],
    in_kind: FloatKind,
    weights: &[f64],
    out_kind: FloatKind,
    out: &mut [u8],
    fix_nonfinite: bool,
) -> u64 {
    merge_chunk_with::<A>(
        Kernel::best(),
        srcs,
        in_kind,
        weights,
        out_kind,
        out,
        fix_nonfinite,
    )
}

named_enum! {
    /// A build of the kernels for an instruction set. Every kernel computes the same
    /// operations in the same order per element (no fused multiply-add, no reassociation:
    /// only wider vectors), so results are bit-identical across kernels.
    pub enum Kernel {
        /// The baseline of the target (SSE2 on x86-64).
        Portable = "portable",
        /// x86-64 with AVX2: 256-bit vectors for decode, weighting and encode.
        Avx2 = "avx2",
    }
}

impl Kernel {
    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
        }
    }

    /// Every kernel this CPU can run.
    pub fn all_available() -> Vec<Kernel> {
        [Kernel::Portable, Kernel::Avx2]
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }

    /// The fastest kernel this CPU can run, decided once; `PMAD_KERNEL=portable` forces the
    /// baseline (benchmarks, or to rule the vector code out).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let forced = std::env::var("PMAD_KERNEL")
                .ok()
                .and_then(|v| v.parse::<Kernel>().ok())
                .filter(|k| k.available());
            forced.unwrap_or(if Kernel::Avx2.available() {
                Kernel::Avx2
            } else {
                Kernel::Portable
            })
        })
    }
}

/// [`merge_chunk`] with a chosen kernel (which must be [`Kernel::available`]; an unavailable
/// one runs the portable code).
pub fn merge_chunk_with<A: Acc>(
    kernel: Kernel,
    srcs: &[&[u8]],
    in_kind: FloatKind,
    weights: &[f64],
    out_kind: FloatKind,
    out: &mut [u8],
    fix_nonfinite: bool,
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 && kernel.available() {
        // SAFETY: the CPU supports AVX2 (checked at run time just above), the only
        // requirement of a `target_feature(enable = "avx2")` function.
        return unsafe {
            merge_chunk_avx2::<A>(srcs, in_kind, weights, out_kind, out, fix_nonfinite)
        };
    }
    let _ = kernel;
    merge_chunk_impl::<A>(srcs, in_kind, weights, out_kind, out, fix_nonfinite)
}

/// The kernel body compiled for AVX2: the same code, inlined into a function the compiler
/// may vectorise with 256-bit instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn merge_chunk_avx2<A: Acc>(
    srcs: &[&[u8]],
    in_kind: FloatKind,
    weights: &[f64],
    out_kind: FloatKind,
    out: &mut [u8],
    fix_nonfinite: bool,
) -> u64 {
    merge_chunk_impl::<A>(srcs, in_kind, weights, out_kind, out, fix_nonfinite)
}

#[inline(always)]
fn merge_chunk_impl<A: Acc>(
    srcs: &[&[u8]],
    in_kind: FloatKind,
    weights: &[f64],
    out_kind: FloatKind,
    out: &mut [u8],
    fix_nonfinite: bool,
) -> u64 {
    let n = srcs.len();
    debug_assert_eq!(weights.len(), n);
    let elems = out.len() / out_kind.size();
    let (isz, osz) = (in_kind.size(), out_kind.size());
    let reference = n - 1;
    let w: Vec<A> = weights.iter().map(|w| A::from_f64(*w)).collect();
    let mut xref = [A::default(); BLOCK];
    let mut tmp = [A::default(); BLOCK];
    let mut acc = [A::default(); BLOCK];
    let mut nonfinite = 0u64;
    let mut start = 0;
    while start < elems {
        let len = BLOCK.min(elems - start);
        let (xr, t, a) = (&mut xref[..len], &mut tmp[..len], &mut acc[..len]);
        A::decode(
            in_kind,
            &srcs[reference][start * isz..(start + len) * isz],
            xr,
        );
        a.fill(A::default());
        for i in 0..reference {
            A::decode(in_kind, &srcs[i][start * isz..(start + len) * isz], t);
            let wi = w[i];
            for ((a, x), r) in a.iter_mut().zip(t.iter()).zip(xr.iter()) {
                *a = *a + wi * (*x - *r);
            }
        }
        // An exactly zero correction keeps x_ref as it is (so -0.0 stays -0.0).
        for (a, r) in a.iter_mut().zip(xr.iter()) {
            *a = if *a == A::default() { *r } else { *r + *a };
        }
        let bad = a.iter().filter(|v| !v.finite()).count();
        if bad > 0 {
            nonfinite += bad as u64;
            if fix_nonfinite {
                direct_sum(srcs, in_kind, &w, start, a, t);
            }
        }
        A::encode(out_kind, a, &mut out[start * osz..(start + len) * osz]);
        start += len;
    }
    nonfinite
}

/// Recompute the non-finite entries of `a` as the plain weighted sum Σ w_i x_i.
fn direct_sum<A: Acc>(
    srcs: &[&[u8]],
    kind: FloatKind,
    w: &[A],
    start: usize,
    a: &mut [A],
    tmp: &mut [A],
) {
    let isz = kind.size();
    let len = a.len();
    let mut sums = vec![A::default(); len];
    for (src, wi) in srcs.iter().zip(w) {
        A::decode(kind, &src[start * isz..(start + len) * isz], tmp);
        for (s, x) in sums.iter_mut().zip(tmp.iter()) {
            *s = *s + *wi * *x;
        }
    }
    for (v, s) in a.iter_mut().zip(sums) {
        if !v.finite() {
            *v = s;
        }
    }
}

/// Count the non-finite values in a block of `kind` bytes (used to find which input holds
/// the NaN/Inf once a merged result came out non-finite).
pub fn count_nonfinite(kind: FloatKind, src: &[u8]) -> u64 {
    // Non-finite means "exponent all ones" for the IEEE-like encodings; E4M3 has only NaN
    // (S.1111.111). Testing bits avoids decoding and vectorises.
    match kind {
        FloatKind::BF16 => count_where(src, |c: [u8; 2]| u16::from_le_bytes(c) & 0x7f80 == 0x7f80),
        FloatKind::F16 => count_where(src, |c: [u8; 2]| u16::from_le_bytes(c) & 0x7c00 == 0x7c00),
        FloatKind::F32 => count_where(src, |c: [u8; 4]| {
            u32::from_le_bytes(c) & 0x7f80_0000 == 0x7f80_0000
        }),
        FloatKind::F64 => count_where(src, |c: [u8; 8]| {
            u64::from_le_bytes(c) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
        }),
        FloatKind::F8E5M2 => count_where(src, |c: [u8; 1]| c[0] & 0x7c == 0x7c),
        FloatKind::F8E4M3 => count_where(src, |c: [u8; 1]| c[0] & 0x7f == 0x7f),
    }
}

#[inline]
fn count_where<const N: usize>(src: &[u8], pred: impl Fn([u8; N]) -> bool) -> u64 {
    src.chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            pred(a) as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::method::Method;
    use proptest::prelude::*;

    fn enc<A: Acc>(kind: FloatKind, v: &[A]) -> Vec<u8> {
        let mut out = vec![0u8; v.len() * kind.size()];
        A::encode(kind, v, &mut out);
        out
    }

    fn dec(kind: FloatKind, b: &[u8]) -> Vec<f64> {
        let mut out = vec![0f64; b.len() / kind.size()];
        f64::decode(kind, b, &mut out);
        out
    }

    fn merge_all<A: Acc>(
        inputs: &[Vec<u8>],
        kind: FloatKind,
        w: &[f64],
        out_kind: FloatKind,
        chunk: usize,
    ) -> Vec<u8> {
        let elems = inputs[0].len() / kind.size();
        let mut out = vec![0u8; elems * out_kind.size()];
        let mut start = 0;
        while start < elems {
            let len = chunk.min(elems - start);
            let srcs: Vec<&[u8]> = inputs
                .iter()
                .map(|b| &b[start * kind.size()..(start + len) * kind.size()])
                .collect();
            merge_chunk::<A>(
                &srcs,
                kind,
                w,
                out_kind,
                &mut out[start * out_kind.size()..(start + len) * out_kind.size()],
                false,
            );
            start += len;
        }
        out
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(
            f32_to_bf16_bits(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            0x3f81
        );
        // 1 + 3 * 2^-8 is halfway between 0x3f81 and 0x3f82: ties to even (0x3f82).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert!(f32::from_bits((f32_to_bf16_bits(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80); // rounds to inf, like IEEE
        for bits in [0x0001u32, 0x3f80_8000, 0x3f81_8000, 0xc2f7_0123] {
            let x = f32::from_bits(bits);
            assert_eq!(
                f32_to_bf16_bits(x),
                bf16::from_f32(x).to_bits(),
                "{bits:#x}"
            );
        }
    }

    #[test]
    fn f8_tables_and_round_trip() {
        let e4 = f8_table(FloatKind::F8E4M3);
        assert_eq!(e4[0x7e], 448.0);
        assert_eq!(e4[0x01], 2f32.powi(-9));
        assert!(e4[0x7f].is_nan());
        let e5 = f8_table(FloatKind::F8E5M2);
        assert_eq!(e5[0x7b], 57344.0);
        assert!(e5[0x7c].is_infinite());
        for kind in [FloatKind::F8E4M3, FloatKind::F8E5M2] {
            let t = f8_table(kind);
            for c in 0..=255u8 {
                if t[c as usize].is_finite() {
                    assert_eq!(f8_encode(kind, t[c as usize] as f64), c, "{kind:?} {c:#x}");
                }
            }
        }
        // Halfway between 1.0 (code 0x38) and 1.125 (0x39) in E4M3: ties to even 0x38.
        assert_eq!(f8_encode(FloatKind::F8E4M3, 1.0625), 0x38);
        assert_eq!(f8_encode(FloatKind::F8E4M3, 1.07), 0x39);
        assert_eq!(f8_encode(FloatKind::F8E4M3, 1000.0), 0x7e);
    }

    #[test]
    fn nonfinite_is_counted_and_fixed() {
        let k = FloatKind::F32;
        let a = enc(k, &[1.0f32, f32::INFINITY, 2.0]);
        let b = enc(k, &[1.0f32, f32::INFINITY, f32::NAN]);
        let mut out = vec![0u8; 12];
        let n = merge_chunk::<f32>(&[&a, &b], k, &[0.5, 0.5], k, &mut out, true);
        assert_eq!(n, 2);
        let v = dec(k, &out);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], f64::INFINITY);
        assert!(v[2].is_nan());
        assert_eq!(count_nonfinite(k, &b), 2);
    }

    fn kind_strategy() -> impl Strategy<Value = FloatKind> {
        prop_oneof![
            Just(FloatKind::BF16),
            Just(FloatKind::F16),
            Just(FloatKind::F32),
            Just(FloatKind::F64)
        ]
    }

    /// Finite values of a given kind, encoded, for `n` inputs of `len` elements, close to each
    /// other like checkpoints of one run (base + small noise), with some arbitrary values mixed in.
    fn inputs_strategy() -> impl Strategy<Value = (FloatKind, Vec<Vec<u8>>)> {
        (kind_strategy(), 1usize..6, 0usize..5000).prop_flat_map(|(kind, n, len)| {
            let base = proptest::collection::vec(-100.0f32..100.0, len);
            let noise = proptest::collection::vec(proptest::collection::vec(-0.1f32..0.1, len), n);
            (Just(kind), base, noise).prop_map(|(kind, base, noise)| {
                let inputs = noise
                    .iter()
                    .map(|nz| {
                        let v: Vec<f32> = base.iter().zip(nz).map(|(b, e)| b + b * e).collect();
                        enc(kind, &v)
                    })
                    .collect();
                (kind, inputs)
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn identical_inputs_come_back_bit_exact(
            kind in kind_strategy(),
            vals in proptest::collection::vec(-1e4f32..1e4, 0..3000),
            n in 1usize..12,
            method in 0usize..3,
            f64acc in any::<bool>(),
        ) {
            let mut vals = vals;
            vals.push(-0.0);
            let x = enc(kind, &vals);
            let inputs = vec![x.clone(); n];
            let m = [Method::Sma, Method::Wma, Method::Ema { alpha: 0.2 }][method].clone();
            let w = m.weights(n).unwrap();
            let out = if f64acc {
                merge_all::<f64>(&inputs, kind, &w, kind, 777)
            } else {
                merge_all::<f32>(&inputs, kind, &w, kind, 777)
            };
            prop_assert_eq!(out, x);
        }

        /// Every kernel this CPU runs gives the same bits, for every input kind, output kind,
        /// accumulator, and with non-finite values being fixed.
        #[test]
        fn kernels_agree_bit_for_bit((kind, inputs) in inputs_strategy(),
                                     out_kind in kind_strategy(),
                                     alpha in 0.05f64..0.9, fix in any::<bool>()) {
            let w = Method::Ema { alpha }.weights(inputs.len()).unwrap();
            let srcs: Vec<&[u8]> = inputs.iter().map(|b| b.as_slice()).collect();
            let elems = inputs[0].len() / kind.size();
            let run = |k: Kernel, wide: bool| {
                let mut out = vec![0u8; elems * out_kind.size()];
                let bad = if wide {
                    merge_chunk_with::<f64>(k, &srcs, kind, &w, out_kind, &mut out, fix)
                } else {
                    merge_chunk_with::<f32>(k, &srcs, kind, &w, out_kind, &mut out, fix)
                };
                (bad, out)
            };
            for wide in [false, true] {
                let reference = run(Kernel::Portable, wide);
                for k in Kernel::all_available() {
                    prop_assert_eq!(&run(k, wide), &reference, "kernel {}", k);
                }
            }
        }

        #[test]
        fn result_independent_of_chunking((kind, inputs) in inputs_strategy(),
                                          c1 in 1usize..5000, c2 in 1usize..5000) {
            let w = Method::Wma.weights(inputs.len()).unwrap();
            let a = merge_all::<f32>(&inputs, kind, &w, FloatKind::BF16, c1);
            let b = merge_all::<f32>(&inputs, kind, &w, FloatKind::BF16, c2);
            prop_assert_eq!(a, b);
        }

        #[test]
        fn sma_ignores_input_order_within_one_ulp((kind, inputs) in inputs_strategy(),
                                                  seed in any::<u64>()) {
            // Reordering changes which input is the reference, so results may differ by
            // rounding; they must agree within 1 ulp of the output dtype, like the oracle.
            let n = inputs.len();
            let w = Method::Sma.weights(n).unwrap();
            let mut perm = inputs.clone();
            let k = (seed as usize) % n;
            perm.rotate_left(k);
            perm.reverse();
            let a = merge_all::<f32>(&inputs, kind, &w, kind, 4096);
            let b = merge_all::<f32>(&perm, kind, &w, kind, 4096);
            let (da, db) = (dec(kind, &a), dec(kind, &b));
            let ulp = |x: f64| match kind {
                FloatKind::BF16 => x.abs().max(1e-30) * 2f64.powi(-7),
                FloatKind::F16 => x.abs().max(6e-5) * 2f64.powi(-10),
                FloatKind::F32 => x.abs().max(1e-30) * 2f64.powi(-23),
                _ => x.abs().max(1e-30) * 2f64.powi(-23), // f32 accumulator bounds F64 output
            };
            for (x, y) in da.iter().zip(&db) {
                prop_assert!((x - y).abs() <= ulp(*x) * 1.0001, "{} vs {}", x, y);
            }
        }

        #[test]
        fn matches_f64_reference((kind, inputs) in inputs_strategy(), alpha in 0.05f64..0.9) {
            let n = inputs.len();
            let w = Method::Ema { alpha }.weights(n).unwrap();
            let decoded: Vec<Vec<f64>> = inputs.iter().map(|b| dec(kind, b)).collect();
            for out_kind in [FloatKind::BF16, FloatKind::F16, FloatKind::F32] {
                let out = dec(out_kind, &merge_all::<f32>(&inputs, kind, &w, out_kind, 1000));
                for (j, got) in out.iter().enumerate() {
                    let exact: f64 = decoded.iter().zip(&w).map(|(x, w)| x[j] * w).sum();
                    let scale = decoded.iter().map(|x| x[j].abs()).fold(exact.abs(), f64::max);
                    let tol = match out_kind {
                        // One ulp of the output, with the subnormal floor of f16.
                        FloatKind::BF16 => scale * 2f64.powi(-7),
                        FloatKind::F16 => scale.max(6.1e-5) * 2f64.powi(-10),
                        _ => scale * 1e-6,
                    };
                    let exact_rounded = dec(out_kind, &enc::<f64>(out_kind, &[exact]))[0];
                    prop_assert!(
                        (got - exact_rounded).abs() <= tol.max(f64::MIN_POSITIVE),
                        "{:?}->{:?} elem {}: got {} want {}", kind, out_kind, j, got, exact
                    );
                }
            }
        }
    }
}
