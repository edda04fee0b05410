//! A CPU-, memory- and I/O-bound stand-in for a training job, for the interference benchmark
//! (`bench/interference.sh`): how much does a pmad running beside the trainer slow it down?
//!
//! ```text
//! cargo run --release --example stand_in_trainer -- --out /tmp/run/ckpt --steps 400 \
//!     --ckpt-size 128MB --save-every 50 --keep 6 --step-log /tmp/run/steps.jsonl
//! ```
//!
//! **A step** runs the same fixed work on `--threads` persistent threads (default: every core
//! this process may use; like a trainer's intra-op pool they are woken at the start of every
//! step and sleep, without spinning, once done), each over its own slice of a `--work-mb` working set (default 64 MB, far
//! larger than the caches): `--passes` times, a matmul-like pass `Y = X · W` (`X` rows of 32
//! f32, `W` 32 x 32, 32 multiply-adds per element of `X`) followed by `X = (X + Y) / 2 + 1/2`,
//! so it is both compute- and memory-bandwidth-bound, like the host side of a trainer that is
//! busy. (The `+ 1/2` keeps `X` near 1. A first version without it let `X` decay towards zero
//! and become subnormal after ~35 steps of 4 passes: on Intel CPUs each step then took up to
//! 30 times as long for a stretch of steps, so the step time depended on the step number.)
//! Then an "optimizer" updates a `1/save_every` slice of the parameters (bf16, `--ckpt-size`
//! bytes in all, `1/100` without saves), so every parameter has changed by the next save. The
//! threads meet at the end of the step (like ranks at a collective), so one slow thread slows
//! the step. (A first version spawned its threads afresh every step: then even a `SCHED_IDLE`
//! busy loop beside it slowed its steps by 40-75 %, because new threads are placed by the
//! fork-time balancer, which does not treat a CPU running only idle-class work as free. Real
//! trainers keep their threads, so this one does.)
//!
//! **Every `--save-every` steps** the parameters are saved as a Hugging Face checkpoint the way
//! a trainer with `save_safetensors=True` does, but through a temp dir renamed into place (a
//! directory pmad sees is always complete): `.tmp-checkpoint-<step>/` gets `config.json`,
//! `model.safetensors` (bf16 tensors of 16 MB or less, `model.layers.NNNN.mlp.weight`) and
//! `trainer_state.json` (`global_step`, a `log_history` with a constant `learning_rate` every
//! 10 steps, so pmad's `[phase] lr_from_trainer_state` plateau accepts it); every file and the
//! directory are fsynced, the directory is renamed to `checkpoint-<step>/` and the output
//! directory fsynced. Then checkpoints beyond the newest `--keep` are deleted (like
//! `save_total_limit`).
//!
//! **What it reports.** The compute time of every step and, separately, the time of every save
//! (a save step's compute is in the compute times; its save is not). `--step-log FILE` gets one
//! JSON line per step (`{"step", "compute_ms", "save_ms"}`, `save_ms` on save steps only). At
//! the end one JSON line on stdout: steps, saves, `compute_ms` {median, p95, mean}, `save_ms`
//! {median, p95, mean}, `wall_s` (the whole run, saves included) and `wall_per_step_ms`
//! (`wall_s / steps`: the honest throughput figure, what a user waits for) and `cpu_s` (user
//! and system CPU of the whole process, set-up included). Percentiles are nearest-rank.
//! Buffers are allocated and touched before the first step, so page faults are not timed.

use clap::Parser;
use serde_json::json;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(about = "A CPU-, memory- and I/O-bound trainer stand-in writing HF checkpoints")]
struct Args {
    /// Output directory (TrainingArguments.output_dir); created if missing.
    #[arg(long)]
    out: PathBuf,
    /// Steps to run.
    #[arg(long, default_value_t = 400)]
    steps: u64,
    /// Compute threads (0 = every core this process may use).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Working set of a step in MB (X and Y, split between the threads).
    #[arg(long, default_value_t = 64)]
    work_mb: usize,
    /// Passes over the working set per step.
    #[arg(long, default_value_t = 1)]
    passes: usize,
    /// Bytes of bf16 parameters, i.e. of tensor data per checkpoint (e.g. 128MB).
    #[arg(long, default_value = "128MB")]
    ckpt_size: String,
    /// Save a checkpoint every this many steps (0 = never).
    #[arg(long, default_value_t = 50)]
    save_every: u64,
    /// Checkpoints kept on disk (older ones are deleted after each save; 0 = all).
    #[arg(long, default_value_t = 6)]
    keep: usize,
    /// The constant learning rate logged in trainer_state.json.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Write one JSON line per step to this file.
    #[arg(long)]
    step_log: Option<PathBuf>,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Columns of a row of X (and the side of W).
const K: usize = 32;
/// Largest tensor in a checkpoint, in bytes.
const TENSOR_BYTES: usize = 16 << 20;
/// Columns of every tensor (bf16 elements).
const COLS: usize = 2048;
/// log_history gets an entry every this many steps.
const LOG_EVERY: u64 = 10;

#[inline]
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [-1, 1).
#[inline]
fn unit(z: u64) -> f32 {
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

#[inline]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline]
fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// What one compute thread owns: its part of the working set and of the parameters.
struct Shard {
    x: Vec<f32>,
    y: Vec<f32>,
    /// bf16 bits; the checkpoint is the shards' parameters one after the other.
    params: Vec<u16>,
    /// Index of `params[0]` in the whole parameter vector (keys the optimizer's noise).
    first: u64,
}

/// One thread's share of a step: `passes` x (Y = X W; X = (X + Y) / 2 + 1/2), then the optimizer
/// update of the `1/save_every` slice of its parameters this step is due to change.
fn work(s: &mut Shard, w: &[[f32; K]; K], passes: usize, save_every: u64, step: u64) {
    for _ in 0..passes {
        for (xr, yr) in s.x.chunks_exact(K).zip(s.y.chunks_exact_mut(K)) {
            let mut acc = [0f32; K];
            for (xi, wi) in xr.iter().zip(w.iter()) {
                for (a, wij) in acc.iter_mut().zip(wi.iter()) {
                    *a += xi * wij;
                }
            }
            yr.copy_from_slice(&acc);
        }
        for (a, b) in s.x.iter_mut().zip(s.y.iter()) {
            // The offset keeps X near 1 (see the module docs): without it X halves every
            // pass, turns subnormal and every multiply slows down ~100x on x86.
            *a = 0.5 * (*a + b) + 0.5;
        }
    }
    let n = s.params.len();
    if n == 0 {
        return;
    }
    // Without saves, as with a save every 100 steps.
    let every = if save_every == 0 { 100 } else { save_every };
    let per = n.div_ceil(every as usize).max(1);
    let off = ((step as usize - 1) * per) % n;
    let key = splitmix(step);
    let first = s.first + off as u64;
    for (i, p) in s.params[off..(off + per).min(n)].iter_mut().enumerate() {
        let g = unit(splitmix(key ^ (first + i as u64)));
        *p = f32_to_bf16(bf16_to_f32(*p) * 0.9999 + 1e-4 * g);
    }
}

/// Tensors of a checkpoint of `params` bf16 elements: (name, rows), each `COLS` wide except
/// possibly a last one-row remainder tensor. Names sort in data order.
fn tensor_table(params: usize) -> Vec<(String, Vec<usize>)> {
    let per = TENSOR_BYTES / 2 / COLS;
    let full_rows = params / COLS;
    let mut out = Vec::new();
    let mut r = 0;
    let mut i = 0;
    while r < full_rows {
        let n = per.min(full_rows - r);
        out.push((format!("model.layers.{i:04}.mlp.weight"), vec![n, COLS]));
        r += n;
        i += 1;
    }
    let rest = params - full_rows * COLS;
    if rest > 0 {
        out.push(("model.norm.weight".to_string(), vec![rest]));
    }
    out
}

fn safetensors_header(table: &[(String, Vec<usize>)]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, shape) in table {
        let n = shape.iter().product::<usize>() * 2;
        map.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(map))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Save the parameters as `<out>/checkpoint-<step>/` through a temp dir, then rotate.
fn save(args: &Args, shards: &[Mutex<Shard>], header: &[u8], step: u64) -> Result<()> {
    let tmp = args.out.join(format!(".tmp-checkpoint-{step}"));
    let dst = args.out.join(format!("checkpoint-{step}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "stand_in_trainer": true,
    });
    write_synced(
        &tmp.join("config.json"),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    {
        let mut f = File::create(tmp.join("model.safetensors"))?;
        f.write_all(header)?;
        for shard in shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let bytes: &[u8] = bytemuck::cast_slice(&shard.params);
            for chunk in bytes.chunks(8 << 20) {
                f.write_all(chunk)?;
            }
        }
        f.sync_all()?;
    }
    let history: Vec<_> = (1..=step / LOG_EVERY)
        .map(|i| {
            let s = i * LOG_EVERY;
            json!({"step": s, "learning_rate": args.lr, "loss": 2.0 + 8.0 / (1.0 + s as f64 / 100.0)})
        })
        .collect();
    let state = json!({"global_step": step, "max_steps": args.steps, "log_history": history});
    write_synced(
        &tmp.join("trainer_state.json"),
        &serde_json::to_vec(&state)?,
    )?;
    sync_dir(&tmp)?;
    fs::rename(&tmp, &dst)?;
    sync_dir(&args.out)?;
    if args.keep > 0 {
        let mut steps: Vec<u64> = fs::read_dir(&args.out)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("checkpoint-"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        steps.sort_unstable();
        let excess = steps.len().saturating_sub(args.keep);
        for s in &steps[..excess] {
            fs::remove_dir_all(args.out.join(format!("checkpoint-{s}")))?;
        }
    }
    Ok(())
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`.
fn cpu_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

fn stats(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = if s.is_empty() {
        f64::NAN
    } else {
        s.iter().sum::<f64>() / s.len() as f64
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"median": r(pct(&s, 0.5)), "p95": r(pct(&s, 0.95)), "mean": r(mean), "max": r(s.last().copied().unwrap_or(f64::NAN))})
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size = args
        .ckpt_size
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("--ckpt-size {}: {e}", args.ckpt_size))?
        .as_u64() as usize;
    let threads = match args.threads {
        0 => std::thread::available_parallelism()?.get(),
        n => n,
    };
    fs::create_dir_all(&args.out)?;

    // Working set: X and Y per thread, rows of K f32 each.
    let rows = (args.work_mb << 20) / 2 / 4 / K / threads;
    if rows == 0 {
        return Err("--work-mb too small for the thread count".into());
    }
    // W scaled so that X stays bounded: |Y| <= |X| on average.
    let mut w = [[0f32; K]; K];
    for (i, row) in w.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = unit(splitmix(args.seed.wrapping_mul(31) ^ (i * K + j) as u64)) / K as f32;
        }
    }
    let n_params = size / 2;
    let per_shard = n_params.div_ceil(threads);
    let shards: Vec<Mutex<Shard>> = (0..threads)
        .map(|t| {
            let first = (t * per_shard).min(n_params);
            let last = ((t + 1) * per_shard).min(n_params);
            Mutex::new(Shard {
                x: (0..rows * K)
                    .map(|i| unit(splitmix(args.seed ^ ((t as u64) << 40) ^ i as u64)))
                    .collect(),
                y: vec![0f32; rows * K],
                params: (first..last)
                    .map(|i| f32_to_bf16(0.02 * unit(splitmix(args.seed ^ 0xabcd ^ i as u64))))
                    .collect(),
                first: first as u64,
            })
        })
        .collect();
    let table = tensor_table(n_params);
    let header = safetensors_header(&table)?;
    let mut log = match &args.step_log {
        Some(p) => Some(std::io::BufWriter::new(File::create(p)?)),
        None => None,
    };
    eprintln!(
        "stand_in_trainer: {} steps on {threads} threads, working set {} MB x {} passes, \
         checkpoint {} MB every {} steps (keep {}) in {}",
        args.steps,
        args.work_mb,
        args.passes,
        size >> 20,
        args.save_every,
        args.keep,
        args.out.display()
    );

    // Persistent compute threads, like a trainer's intra-op pool: woken at the start of a
    // step, met at its end (they sleep in between, they do not spin).
    let start = Barrier::new(threads + 1);
    let end = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let current = AtomicU64::new(0);
    let mut compute = Vec::with_capacity(args.steps as usize);
    let mut saves = Vec::new();
    let mut wall = 0.0;
    std::thread::scope(|s| -> Result<()> {
        for shard in &shards {
            let (start, end, stop, current, w) = (&start, &end, &stop, &current, &w);
            let (passes, save_every) = (args.passes, args.save_every);
            s.spawn(move || loop {
                start.wait();
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let step = current.load(Ordering::Acquire);
                work(
                    &mut shard.lock().unwrap_or_else(|e| e.into_inner()),
                    w,
                    passes,
                    save_every,
                    step,
                );
                end.wait();
            });
        }
        let mut run = || -> Result<()> {
            let started = Instant::now();
            for step in 1..=args.steps {
                let t0 = Instant::now();
                current.store(step, Ordering::Release);
                start.wait();
                end.wait();
                let c = t0.elapsed().as_secs_f64() * 1000.0;
                compute.push(c);
                let mut save_ms = None;
                if args.save_every > 0 && step % args.save_every == 0 {
                    let t1 = Instant::now();
                    save(&args, &shards, &header, step)?;
                    let sm = t1.elapsed().as_secs_f64() * 1000.0;
                    saves.push(sm);
                    save_ms = Some(sm);
                }
                if let Some(l) = log.as_mut() {
                    let mut line =
                        json!({"step": step, "compute_ms": (c * 1000.0).round() / 1000.0});
                    if let Some(sm) = save_ms {
                        line["save_ms"] = json!((sm * 1000.0).round() / 1000.0);
                    }
                    writeln!(l, "{line}")?;
                }
            }
            wall = started.elapsed().as_secs_f64();
            Ok(())
        };
        let result = run();
        // Release the threads whatever happened, or the scope would wait for them forever.
        stop.store(true, Ordering::Release);
        start.wait();
        result
    })?;
    if let Some(mut l) = log {
        l.flush()?;
    }
    let checksum: f32 = shards
        .iter()
        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).x[0])
        .sum();
    std::hint::black_box(checksum);
    let summary = json!({
        "steps": args.steps,
        "saves": saves.len(),
        "threads": threads,
        "compute_ms": stats(&compute),
        "save_ms": stats(&saves),
        "wall_s": (wall * 1000.0).round() / 1000.0,
        "wall_per_step_ms": (wall / args.steps as f64 * 1e6).round() / 1000.0,
        "cpu_s": cpu_seconds().map(|c| (c * 100.0).round() / 100.0),
    });
    println!("{summary}");
    Ok(())
}
