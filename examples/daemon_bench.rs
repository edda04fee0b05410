//! Per-arrival update and emission cost of the daemon's incremental averages, against their
//! own I/O floor, measured side by side in one run (issue: "The daemon", item 12).
//!
//! ```text
//! cargo run --release --example gen_ckpts -- --dir /tmp/pmad-bench --count 14 --size 500MB
//! cargo run --release --example daemon_bench -- /tmp/pmad-bench/checkpoint-*
//! ```
//!
//! Feeds the checkpoints (oldest first) to the daemon's [`Window`] exactly as `pmad run` does
//! (recipes: SMA over `--window`, WMA over `--window`, EMA 0.2: one pass updates all four
//! sums), after warming the page cache. For every arrival once the window is full it times:
//! - `update`: opening the new checkpoint (validating its headers) and `Window::arrive` (read
//!   the new checkpoint and the evicted one, decode, update every recipe's sums);
//! - `floor`: reading the same two checkpoints' tensor bytes once with large `read`s plus one
//!   read-modify-write pass over a buffer the size of the accumulators — the least any
//!   incremental update has to move. The buffer is allocated and touched once before the
//!   first arrival (like the daemon's accumulators, which are resident after the first
//!   pass), so the floor does not pay first-touch page faults inside the timed region;
//! - `emit`: publishing the SMA (stream from the accumulators, encode, write, fsync, rename),
//!   against `write floor`: writing and fsyncing the same number of bytes (median of three).
//!
//! Prints the per-arrival table and medians with ratios.

use pmad::config::Config;
use pmad::daemon::window::Window;
use pmad::output::{OutDir, Progress};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn read_all(paths: &[PathBuf], buf: &mut [u8]) -> u64 {
    let mut n = 0u64;
    let mut x = 0u8;
    for p in paths {
        let mut f = std::fs::File::open(p).expect("open");
        loop {
            let k = f.read(buf).expect("read");
            if k == 0 {
                break;
            }
            x ^= buf[k - 1];
            n += k as u64;
        }
    }
    std::hint::black_box(x);
    n
}

fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    v.sort();
    v
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut window = 10usize;
    if let Some(i) = args.iter().position(|a| a == "--window") {
        window = args[i + 1].parse()?;
        args.drain(i..i + 2);
    }
    let dirs: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    anyhow::ensure!(
        dirs.len() > window,
        "need more than --window ({window}) checkpoints, got {}",
        dirs.len()
    );
    let out = std::env::temp_dir().join(format!("pmad-daemon-bench-{}", std::process::id()));
    let cfg = Config::parse(&format!(
        r#"[watch]
dir = "/unused"
[[recipe]]
name = "sma"
method = "sma"
window = {window}
out_dir = {sma:?}
keep = 1
[[recipe]]
name = "wma"
method = "wma"
window = {window}
out_dir = {wma:?}
[[recipe]]
name = "ema"
method = "ema"
alpha = 0.2
out_dir = {ema:?}
"#,
        sma = out.join("sma"),
        wma = out.join("wma"),
        ema = out.join("ema"),
    ))
    .map_err(anyhow::Error::msg)?;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let mut w = Window::new(&cfg.recipes, cfg.state.accumulator, None, u64::MAX);
    let mut buf = vec![0u8; 8 << 20];
    // Warm the page cache (the daemon reads checkpoints the trainer just wrote).
    for d in &dirs {
        read_all(&weight_files(d), &mut buf);
    }
    let mut paths = BTreeMap::new();
    let mut acc: Vec<f32> = Vec::new();
    let (mut upd, mut flo, mut emi, mut wfl) = (vec![], vec![], vec![], vec![]);
    println!(
        "{:>5} {:>10} {:>10} {:>7} {:>10} {:>11} {:>7}",
        "step", "update", "floor", "ratio", "emit", "write floor", "ratio"
    );
    for (i, d) in dirs.iter().enumerate() {
        let step = (i as u64 + 1) * 1000;
        // Opening (validating every header) is part of each arrival's cost in `pmad run`.
        let t0 = Instant::now();
        let c = Arc::new(pmad::format::Checkpoint::open(d)?);
        paths.insert(step, d.clone());
        let evicted = (i >= window).then(|| dirs[i - window].clone());
        pool.install(|| w.arrive(step, c.clone()))?;
        let update = t0.elapsed();
        if evicted.is_none() {
            continue;
        }
        // Floor: the same bytes read once, plus one read-modify-write pass over accumulators.
        let mut files = weight_files(d);
        files.extend(weight_files(evicted.as_ref().expect("evicted")));
        let acc_bytes = w.acc().map(|a| a.raw().len()).unwrap_or(0);
        if acc.len() != acc_bytes / 4 {
            // Allocate and touch outside the timed region.
            acc = vec![1f32; acc_bytes / 4];
            std::hint::black_box(&acc);
        }
        let t1 = Instant::now();
        read_all(&files, &mut buf);
        for x in acc.iter_mut() {
            *x += 1.0;
        }
        std::hint::black_box(&acc);
        let floor = t1.elapsed();
        // Emission of the SMA against writing + fsyncing as many bytes.
        let progress = Progress::default();
        let cancel = AtomicBool::new(false);
        let t2 = Instant::now();
        let e = pool.install(|| {
            pmad::daemon::emit::emit(
                &w,
                0,
                &cfg.recipes[0],
                &OutDir::new(&cfg.recipes[0].out_dir),
                &paths,
                None,
                &progress,
                &cancel,
            )
        })?;
        let pmad::daemon::emit::Emission::Published(e) = e else {
            anyhow::bail!("an emission without [partition] wrote a part");
        };
        let emit = t2.elapsed();
        // The write floor swings by 5x from one fsync to the next on a shared virtual disk:
        // the median of three writes of the same bytes.
        let wf = out.join("write-floor.bin");
        let mut samples = Vec::with_capacity(3);
        for _ in 0..3 {
            let t3 = Instant::now();
            {
                let mut f = std::fs::File::create(&wf)?;
                let mut left = e.bytes as usize;
                while left > 0 {
                    let k = left.min(buf.len());
                    f.write_all(&buf[..k])?;
                    left -= k;
                }
                f.sync_all()?;
            }
            samples.push(t3.elapsed());
            std::fs::remove_file(&wf)?;
        }
        let write_floor = median(&mut samples);
        println!(
            "{:>5} {:>9.3}s {:>9.3}s {:>6.2}x {:>9.3}s {:>10.3}s {:>6.2}x",
            step,
            update.as_secs_f64(),
            floor.as_secs_f64(),
            update.as_secs_f64() / floor.as_secs_f64(),
            emit.as_secs_f64(),
            write_floor.as_secs_f64(),
            emit.as_secs_f64() / write_floor.as_secs_f64()
        );
        upd.push(update);
        flo.push(floor);
        emi.push(emit);
        wfl.push(write_floor);
    }
    let (u, f, e, x) = (
        median(&mut upd),
        median(&mut flo),
        median(&mut emi),
        median(&mut wfl),
    );
    println!(
        "median update {:.3}s vs floor {:.3}s: {:.2}x | median emit {:.3}s vs write floor {:.3}s: {:.2}x | {} arrivals, window {window}, accumulators {}",
        u.as_secs_f64(),
        f.as_secs_f64(),
        u.as_secs_f64() / f.as_secs_f64(),
        e.as_secs_f64(),
        x.as_secs_f64(),
        e.as_secs_f64() / x.as_secs_f64(),
        upd.len(),
        pmad::obs::log::bytes(w.acc().map(|a| a.raw().len() as u64).unwrap_or(0)),
    );
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
