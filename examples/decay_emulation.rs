//! How much of a real learning-rate decay's gain do pmad's recipes recover? Measured on a run
//! whose loss is exact.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example decay_emulation                  # ~30 s on 2 cores
//! cargo run --release --example decay_emulation -- --seeds 9 --windows 10 --save-steps 20
//! ```
//!
//! The run is `pmad demo`'s: SGD with Gaussian gradient noise (lr 0.05, noise 1.0) on
//! `L(w) = mean_j h_j (w_j − w*_j)² / 2`, curvatures h log-uniform in [0.2, 5], optimum
//! w* ~ N(0, 0.05²), started at w* + 0.1. It trains at constant LR for `--warmup` steps plus
//! the longest window, writing a checkpoint (HF safetensors, f32 or `--dtype bf16`) every
//! `--save-steps`; call the last one T. Then, for every window length N in `--windows`:
//!
//! * the recipes: the built `pmad merge` binary (`--pmad`, default `target/release/pmad`) merges
//!   the last N checkpoints (T − (N−1)·s .. T) with `sma`, `wma`, `ema` (alpha 2/(N+1)) and
//!   `schedule` for each shape (`--final-lr-ratio`, default 0);
//! * the real decays: from the checkpoint at T − N·s (the one just before the window), the
//!   same run trains the same N·s steps again with its LR decayed as lr·f(t/(N·s)),
//!   t = 0..N·s−1, for each shape f (linear 1−x, cosine (1+cos πx)/2, minus_sqrt 1−√x, floored
//!   at `--final-lr-ratio`). It sees the same gradient noise, step for step, as the constant-LR
//!   run did over those steps (the noise is a function of (seed, step)), as a decay fork of a
//!   real run resumed from a checkpoint sees the same batches. Every fork ends at step T, so
//!   it spends exactly the compute the latest checkpoint did.
//!
//! Every model is written as a checkpoint and its exact loss is computed from the file (read
//! with the `safetensors` crate, not with pmad's reader). gain(x) = loss(latest) − loss(x);
//! the table gives, per recipe, the median over seeds of gain(x) / gain(real decay) for each
//! real decay shape, with the range over seeds. Seeds differ in the problem (h, w*) and in the
//! noise. Prints markdown.

use clap::Parser;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The demo's constants (src/cmd/demo.rs).
const LR: f32 = 0.05;
const NOISE: f32 = 1.0;
/// Elements per tensor; the model is `params / PER` tensors.
const SHAPE: [usize; 2] = [128, 256];

const SHAPES: [&str; 3] = ["linear", "cosine", "minus_sqrt"];

#[derive(Parser)]
#[command(about = "Measure how much of a real LR decay's gain pmad's recipes recover")]
struct Args {
    /// The pmad binary that does the merges.
    #[arg(long, default_value = "target/release/pmad")]
    pmad: PathBuf,
    /// Number of seeds (problems and noise sequences).
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Window lengths N (checkpoints averaged; the decay forks last N·save_steps steps).
    #[arg(long, value_delimiter = ',', default_value = "5,10,20")]
    windows: Vec<usize>,
    /// SGD steps between checkpoints.
    #[arg(long, default_value_t = 100)]
    save_steps: u64,
    /// Constant-LR steps before the first window (the slowest mode relaxes in 100 steps).
    #[arg(long, default_value_t = 1000)]
    warmup: u64,
    /// Model size in parameters (rounded to whole 128x256 tensors).
    #[arg(long, default_value_t = 32768)]
    params: usize,
    /// Checkpoint dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Final LR of the real decays and of the schedule merges, as a fraction of the constant LR.
    #[arg(long, default_value_t = 0.0)]
    final_lr_ratio: f64,
    /// Keep the checkpoints and merges in this directory instead of a temp dir.
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// The decay multiplier at fraction x of the decay.
fn decay(shape: &str, x: f64, r: f64) -> f64 {
    let f = match shape {
        "linear" => 1.0 - x,
        "cosine" => 0.5 * (1.0 + (std::f64::consts::PI * x).cos()),
        "minus_sqrt" => 1.0 - x.sqrt(),
        _ => unreachable!(),
    };
    r + (1.0 - r) * f
}

struct Problem {
    h: Vec<f32>,
    opt: Vec<f32>,
}

impl Problem {
    fn new(params: usize, seed: u64) -> Problem {
        let per = SHAPE[0] * SHAPE[1];
        let n = (params / per).max(1) * per;
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5);
        let h = (0..n)
            .map(|_| rng.random_range(0.2f32.ln()..5f32.ln()).exp())
            .collect();
        let opt = (0..n)
            .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * 0.05)
            .collect();
        Problem { h, opt }
    }

    fn loss(&self, w: &[f32]) -> f64 {
        let s: f64 = w
            .iter()
            .zip(&self.opt)
            .zip(&self.h)
            .map(|((w, o), h)| {
                let d = (*w - *o) as f64;
                0.5 * *h as f64 * d * d
            })
            .sum();
        s / w.len() as f64
    }

    /// One SGD step at learning rate `lr`; the gradient noise depends only on (seed, step).
    fn step(&self, w: &mut [f32], lr: f32, seed: u64, step: u64) {
        let mut rng = StdRng::seed_from_u64((seed << 32) ^ step);
        for ((w, o), h) in w.iter_mut().zip(&self.opt).zip(&self.h) {
            let g = h * (*w - o) + NOISE * rng.sample::<f32, _>(rand_distr::StandardNormal);
            *w -= lr * g;
        }
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n / (SHAPE[0] * SHAPE[1]))
        .map(|i| format!("model.layers.{i}.mlp.weight"))
        .collect()
}

/// Write `w` as an HF-layout checkpoint directory (`model.safetensors` + `config.json`).
fn write_checkpoint(w: &[f32], dir: &Path, bf: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "pmad-demo", "architectures": ["Quadratic"]}"#,
    )?;
    let per = SHAPE[0] * SHAPE[1];
    let bytes: Vec<Vec<u8>> = w
        .chunks(per)
        .map(|c| {
            if bf {
                c.iter()
                    .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                c.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    let dtype = if bf { Dtype::BF16 } else { Dtype::F32 };
    let views: Vec<(String, TensorView)> = names(w.len())
        .into_iter()
        .zip(&bytes)
        .map(|(n, b)| Ok((n, TensorView::new(dtype, SHAPE.to_vec(), b)?)))
        .collect::<anyhow::Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let buf = safetensors::tensor::serialize(views, Some(meta))?;
    std::fs::write(dir.join("model.safetensors"), buf)?;
    Ok(())
}

/// The weights stored in a checkpoint directory, decoded to f32.
fn read_checkpoint(dir: &Path, n: usize) -> anyhow::Result<Vec<f32>> {
    let buf = std::fs::read(dir.join("model.safetensors"))?;
    let st = SafeTensors::deserialize(&buf)?;
    let mut w = Vec::with_capacity(n);
    for name in names(n) {
        let t = st.tensor(&name)?;
        anyhow::ensure!(t.shape() == SHAPE, "{name}: shape {:?}", t.shape());
        match t.dtype() {
            Dtype::F32 => w.extend(
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
            ),
            Dtype::BF16 => w.extend(
                t.data()
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f32()),
            ),
            d => anyhow::bail!("{name}: unexpected dtype {d:?}"),
        }
    }
    Ok(w)
}

/// The recipes, as `pmad merge` arguments, for a window of `n` checkpoints.
fn recipes(n: usize, r: f64) -> Vec<(String, Vec<String>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut out = vec![
        ("sma".to_string(), s(&["--method", "sma"])),
        ("wma".to_string(), s(&["--method", "wma"])),
    ];
    let alpha = 2.0 / (n as f64 + 1.0);
    out.push((
        format!("ema (alpha {alpha:.3})"),
        vec![
            "--method".into(),
            "ema".into(),
            "--alpha".into(),
            format!("{alpha}"),
        ],
    ));
    for shape in SHAPES {
        out.push((
            format!("schedule {shape}"),
            vec![
                "--method".into(),
                "schedule".into(),
                "--shape".into(),
                shape.into(),
                "--final-lr-ratio".into(),
                format!("{r}"),
            ],
        ));
    }
    out
}

/// Losses of every model for one seed: window -> (model name -> loss).
type SeedResult = BTreeMap<usize, Rows>;
/// (model name, loss), `latest` first.
type Rows = Vec<(String, f64)>;

fn run_seed(args: &Args, root: &Path, seed: u64) -> anyhow::Result<SeedResult> {
    let p = Problem::new(args.params, seed);
    let bf = args.dtype == "bf16";
    let s = args.save_steps;
    let max_n = *args.windows.iter().max().unwrap() as u64;
    let total = args.warmup + max_n * s;
    let dir = root.join(format!("seed-{seed}"));
    let ckpt = |step: u64| dir.join(format!("run/checkpoint-{step}"));
    let n = p.h.len();

    // The constant-LR run; keep the states at the fork points in memory.
    let mut w: Vec<f32> = p.opt.iter().map(|o| o + 0.1).collect();
    let mut states: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    for step in 1..=total {
        p.step(&mut w, LR, seed, step);
        if step % s == 0 && total - step <= max_n * s {
            write_checkpoint(&w, &ckpt(step), bf)?;
            states.insert(step, read_checkpoint(&ckpt(step), n)?);
        }
    }

    let loss_of = |d: &Path| -> anyhow::Result<f64> { Ok(p.loss(&read_checkpoint(d, n)?)) };
    let mut out = SeedResult::new();
    for &wn in &args.windows {
        let mut rows = vec![("latest".to_string(), loss_of(&ckpt(total))?)];
        // Recipes: pmad merge over the last wn checkpoints, oldest first.
        let inputs: Vec<PathBuf> = (0..wn as u64).rev().map(|k| ckpt(total - k * s)).collect();
        for (i, (name, margs)) in recipes(wn, args.final_lr_ratio).into_iter().enumerate() {
            let o = dir.join(format!("merged/n{wn}/{i}"));
            let res = Command::new(&args.pmad)
                .arg("merge")
                .args(&margs)
                .args(["--threads", "1", "--out"])
                .arg(&o)
                .args(&inputs)
                .output()?;
            anyhow::ensure!(
                res.status.success(),
                "pmad merge {margs:?} failed: {}",
                String::from_utf8_lossy(&res.stderr)
            );
            rows.push((name, loss_of(&o)?));
        }
        // Real decays: from the checkpoint before the window, the same steps with a decayed LR.
        let len = wn as u64 * s;
        let start = total - len;
        for shape in SHAPES {
            let mut w = states[&start].clone();
            for t in 0..len {
                let lr = LR * decay(shape, t as f64 / len as f64, args.final_lr_ratio) as f32;
                p.step(&mut w, lr, seed, start + t + 1);
            }
            let o = dir.join(format!("decay/n{wn}/{shape}"));
            write_checkpoint(&w, &o, bf)?;
            rows.push((format!("REAL decay {shape}"), loss_of(&o)?));
        }
        out.insert(wn, rows);
    }
    Ok(out)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.dtype == "f32" || args.dtype == "bf16",
        "--dtype is f32 or bf16"
    );
    anyhow::ensure!(
        !args.windows.is_empty() && args.windows.iter().all(|n| *n >= 2),
        "--windows: lengths >= 2"
    );
    anyhow::ensure!(
        args.pmad.exists(),
        "{} not found: run `cargo build --release` first, or pass --pmad",
        args.pmad.display()
    );
    let tmp = tempfile::Builder::new().prefix("pmad-decay-").tempdir()?;
    let root = args
        .keep
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let t0 = Instant::now();
    let results: Vec<SeedResult> = (1..=args.seeds)
        .into_par_iter()
        .map(|seed| run_seed(&args, &root, seed))
        .collect::<anyhow::Result<_>>()?;

    let per = SHAPE[0] * SHAPE[1];
    println!(
        "SGD (lr {LR}, gradient noise {NOISE}) on the demo's quadratic, {} parameters, {} \
         checkpoints, a checkpoint every {} steps after {} constant-LR steps; {} seeds; \
         final_lr_ratio {}; {:.1} s",
        (args.params / per).max(1) * per,
        args.dtype,
        args.save_steps,
        args.warmup,
        args.seeds,
        args.final_lr_ratio,
        t0.elapsed().as_secs_f64()
    );
    for &wn in &args.windows {
        println!();
        println!(
            "### N = {wn} checkpoints (the decay forks: the last {} steps)",
            wn as u64 * args.save_steps
        );
        println!();
        println!(
            "| model | loss (median) | gain over latest | % of REAL linear decay's gain | % of REAL cosine's | % of REAL minus_sqrt's |"
        );
        println!("|---|---|---|---|---|---|");
        let rows = &results[0][&wn];
        for (i, (name, _)) in rows.iter().enumerate() {
            let col = |f: &dyn Fn(&Rows) -> f64| -> Vec<f64> {
                results.iter().map(|r| f(&r[&wn])).collect()
            };
            let mut loss = col(&|r| r[i].1);
            let mut gain = col(&|r| r[0].1 - r[i].1);
            let mut line = format!(
                "| {name} | {:.6} | {:.6} |",
                median(&mut loss),
                median(&mut gain)
            );
            for shape in SHAPES {
                if i == 0 {
                    line.push_str(" — |");
                    continue;
                }
                let j = rows
                    .iter()
                    .position(|(n, _)| *n == format!("REAL decay {shape}"))
                    .unwrap();
                let mut frac = col(&|r| 100.0 * (r[0].1 - r[i].1) / (r[0].1 - r[j].1));
                let (lo, hi) = frac
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                        (a.min(*x), b.max(*x))
                    });
                line.push_str(&format!(" {:.0}% ({lo:.0}–{hi:.0}) |", median(&mut frac)));
            }
            println!("{line}");
        }
    }
    if let Some(k) = &args.keep {
        println!("\nfiles kept in {}", k.display());
    }
    Ok(())
}
