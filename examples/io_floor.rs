//! The I/O floor of a merge: the least any tool that reads K checkpoints and writes one merged
//! checkpoint has to do on this machine (bench/run.sh).
//!
//! ```text
//! cargo run --release --example io_floor -- --out /tmp/pmad-bench/floor.bin --out-bytes 500000000 \
//!     /tmp/pmad-bench/checkpoint-*/
//! ```
//!
//! 1. reads every byte of every `*.safetensors` file under the given checkpoint directories (or
//!    the given files) once, front to back, with 8 MiB `read`s (no computation: one byte per
//!    buffer is touched so the reads are not elided). With `--jobs N` (default 1), N threads
//!    read whole files concurrently, taking the next file from a shared queue: on a cold cache
//!    several streams keep a virtual disk busier than one (pmad reads all inputs at once);
//! 2. writes `--out-bytes` bytes to `--out` with 8 MiB `write`s, then `fsync`s it. The bytes
//!    are copied from `--data FILE` (default: the last input file, which step 1 just read, so
//!    it comes from the page cache), cycled if short: realistic checkpoint bytes, not zeros
//!    (some virtual disks store zero blocks for free) and not a pattern.
//!
//! Prints one line: `read_s=.. write_s=.. total_s=.. in_bytes=.. out_bytes=.. jobs=..`. The
//! output file is removed afterwards unless `--keep`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

const BUF: usize = 8 << 20;

fn inputs(args: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for a in args {
        if a.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(a)
                .unwrap_or_else(|e| panic!("{}: {e}", a.display()))
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(a.clone());
        }
    }
    files
}

fn main() {
    let mut out: Option<PathBuf> = None;
    let mut out_bytes: u64 = 0;
    let mut keep = false;
    let mut jobs = 1usize;
    let mut data: Option<PathBuf> = None;
    let mut rest = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = it.next().map(PathBuf::from),
            "--out-bytes" => {
                out_bytes = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--out-bytes N")
            }
            "--keep" => keep = true,
            "--jobs" => jobs = it.next().and_then(|s| s.parse().ok()).expect("--jobs N"),
            "--data" => data = it.next().map(PathBuf::from),
            "-h" | "--help" => {
                eprintln!(
                    "usage: io_floor --out FILE --out-bytes N [--jobs N] [--data FILE] [--keep] CKPT_DIR_OR_FILE..."
                );
                return;
            }
            _ => rest.push(PathBuf::from(a)),
        }
    }
    let out = out.expect("--out FILE is required");
    let files = inputs(&rest);
    assert!(!files.is_empty(), "no input files");

    let data = data.unwrap_or_else(|| files[files.len() - 1].clone());
    let jobs = jobs.clamp(1, files.len());

    let t0 = Instant::now();
    let next = AtomicUsize::new(0);
    let total = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let mut buf = vec![0u8; BUF];
                let mut x = 0u8;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = files.get(i) else { break };
                    let mut f = File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    loop {
                        let k = f.read(&mut buf).expect("read");
                        if k == 0 {
                            break;
                        }
                        x ^= buf[k - 1];
                        total.fetch_add(k as u64, Ordering::Relaxed);
                    }
                }
                std::hint::black_box(x);
            });
        }
    });
    let in_bytes = total.load(Ordering::Relaxed);
    let t1 = Instant::now();
    {
        let src = File::open(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
        let src_len = src.metadata().expect("stat").len();
        assert!(src_len > 0, "{}: empty", data.display());
        let mut buf = vec![0u8; BUF];
        let mut f = File::create(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        let mut left = out_bytes;
        let mut pos = 0u64;
        while left > 0 {
            let want = left.min(BUF as u64).min(src_len - pos) as usize;
            let k = src.read_at(&mut buf[..want], pos).expect("read --data");
            assert!(k > 0, "short read of --data");
            f.write_all(&buf[..k]).expect("write");
            left -= k as u64;
            pos = (pos + k as u64) % src_len;
        }
        f.sync_all().expect("fsync");
    }
    let t2 = Instant::now();
    if !keep {
        let _ = std::fs::remove_file(&out);
    }
    let (r, w) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    println!(
        "read_s={r:.3} write_s={w:.3} total_s={:.3} in_bytes={in_bytes} out_bytes={out_bytes} jobs={jobs}",
        r + w
    );
}
