//! Throughput of the merge kernels in `pmad::merge` (no I/O).
//!
//! Run: `cargo bench --bench kernels` (about a minute on 2 cores). Filter with a substring,
//! e.g. `cargo bench --bench kernels -- merge_chunk`.
//!
//! Every benchmark reports `Throughput::Bytes` = bytes of *input* read per iteration, so the
//! GB/s figures compare directly with memory and disk bandwidth:
//! - `decode_f32/<kind>/4MiB`: 4 MiB of `kind` bytes -> f32.
//! - `decode_f32/<kind>/block`: one [`BLOCK`] of elements (the size `merge_chunk` uses
//!   internally, L1-resident): the compute ceiling of the decode loop.
//! - `encode_f32/<kind>/4MiB` and `/block`: f32 -> `kind` (input bytes = 4 x elements).
//! - `merge_chunk_f32/<kind>x8`: SMA of 8 inputs of 4 MiB each (one engine unit at the default
//!   `--chunk-size 4MiB`), output in the input dtype; 32 MiB read per iteration.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pmad::math::kernels::{decode_f32, encode_f32, merge_chunk, BLOCK};
use pmad::math::{FloatKind, Method};
use std::hint::black_box;
use std::time::Duration;

/// Bytes of each input in the 4 MiB cases.
const CHUNK_BYTES: usize = 4 << 20;
/// Inputs merged per chunk.
const INPUTS: usize = 8;

const KINDS: [(FloatKind, &str); 3] = [
    (FloatKind::BF16, "bf16"),
    (FloatKind::F16, "f16"),
    (FloatKind::F32, "f32"),
];

/// xorshift64* : deterministic, dependency-free noise.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // Uniform in [-1, 1).
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` weight-like values (|x| ~ 0.02).
fn base_values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    (0..n).map(|_| 0.02 * r.next_f32()).collect()
}

fn encoded(kind: FloatKind, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * kind.size()];
    encode_f32(kind, v, &mut out);
    out
}

/// `INPUTS` encoded inputs close to each other, like consecutive checkpoints of one run.
fn checkpoints(kind: FloatKind, elems: usize) -> Vec<Vec<u8>> {
    let base = base_values(elems, 42);
    (0..INPUTS)
        .map(|i| {
            let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            let v: Vec<f32> = base.iter().map(|b| b + b * 0.01 * r.next_f32()).collect();
            encoded(kind, &v)
        })
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_f32");
    for (kind, name) in KINDS {
        for (label, elems) in [("4MiB", CHUNK_BYTES / kind.size()), ("block", BLOCK)] {
            let src = encoded(kind, &base_values(elems, 7));
            let mut dst = vec![0f32; elems];
            g.throughput(Throughput::Bytes(src.len() as u64));
            g.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| decode_f32(kind, black_box(&src), black_box(&mut dst)))
            });
        }
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_f32");
    for (kind, name) in KINDS {
        // Same element count as the decode case of this kind, so the *output* is 4 MiB.
        for (label, elems) in [("4MiB", CHUNK_BYTES / kind.size()), ("block", BLOCK)] {
            let src = base_values(elems, 11);
            let mut dst = vec![0u8; elems * kind.size()];
            g.throughput(Throughput::Bytes((elems * 4) as u64));
            g.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| encode_f32(kind, black_box(&src), black_box(&mut dst)))
            });
        }
    }
    g.finish();
}

fn bench_merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge_chunk_f32");
    let weights = Method::Sma.weights(INPUTS).expect("weights");
    for (kind, name) in KINDS {
        let elems = CHUNK_BYTES / kind.size();
        let inputs = checkpoints(kind, elems);
        let srcs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0u8; elems * kind.size()];
        g.throughput(Throughput::Bytes((INPUTS * CHUNK_BYTES) as u64));
        g.bench_function(format!("{name}x{INPUTS}"), |b| {
            b.iter(|| {
                merge_chunk::<f32>(
                    black_box(&srcs),
                    kind,
                    &weights,
                    kind,
                    black_box(&mut out),
                    false,
                )
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = kernels;
    config = config();
    targets = bench_decode, bench_encode, bench_merge
}
criterion_main!(kernels);
