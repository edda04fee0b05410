//! `pmad demo`: a simulated training run merged live, with nothing to download.
//!
//! A producer thread runs SGD with gradient noise on a known quadratic loss
//! `L(w) = mean_j h_j (w_j − w*_j)² / 2`, so the loss of any checkpoint is exact. At a constant
//! learning rate the weights bounce around the minimum (stationary variance ∝ lr·σ²), which is
//! exactly the situation PMA exploits: averaging checkpoints cancels the noise. The producer
//! writes bf16 HF-layout checkpoints in place like the HF Trainer (weights first, in pieces,
//! `trainer_state.json` last), the real daemon watches the directory with an SMA and an EMA
//! recipe, and for every output it publishes the demo prints the loss of the latest checkpoint
//! next to the loss of the merged one, then a summary table.

use anyhow::Context;
use pmad::config::Config;
use pmad::format::safetensors::header::build_header;
use pmad::format::Checkpoint;
use pmad::math::kernels::{decode_f32, f32_to_bf16_bits};
use pmad::math::FloatKind;
use pmad::output::OutDir;
use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `pmad demo` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Checkpoints the simulated run writes.
    #[arg(long, default_value_t = 36)]
    pub checkpoints: u64,
    /// SGD steps between checkpoints.
    #[arg(long, default_value_t = 100)]
    pub save_steps: u64,
    /// Pause between checkpoints (simulated training time).
    #[arg(long, default_value = "300ms")]
    pub every: String,
    /// Model size in parameters (rounded to whole layers).
    #[arg(long, default_value_t = 1 << 20)]
    pub params: usize,
    /// Keep the temp directory (printed at the end) instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Make the simulated run diverge (its learning rate jumps 20x) two thirds of the way
    /// through: pmad's loss-spike sentinel stops the averages at the onset and publishes a
    /// rescue to restart from.
    #[arg(long)]
    pub diverge: bool,
}

/// Steps between two logged losses (HF `logging_steps`).
const LOGGING_STEPS: u64 = 10;
/// The learning rate multiplier of a diverging run.
const DIVERGE_LR: f32 = 20.0;

const LR: f32 = 0.05;
const NOISE: f32 = 1.0;
const LAYER: (usize, usize) = (256, 512);

/// The simulated model: tensors, curvature h, optimum w*.
struct Problem {
    names: Vec<String>,
    shape: (usize, usize),
    h: Vec<f32>,
    opt: Vec<f32>,
}

impl Problem {
    fn new(params: usize, rng: &mut rand::rngs::StdRng) -> Problem {
        let per = LAYER.0 * LAYER.1;
        let layers = (params / per).max(1);
        let names = (0..layers)
            .map(|i| format!("model.layers.{i}.mlp.weight"))
            .collect();
        let n = layers * per;
        // Curvatures log-uniform in [0.2, 5]: some directions stiff, some flat.
        let h = (0..n)
            .map(|_| (rng.random_range(0.2f32.ln()..5f32.ln())).exp())
            .collect();
        let opt = (0..n)
            .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * 0.05)
            .collect();
        Problem {
            names,
            shape: LAYER,
            h,
            opt,
        }
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

    /// Loss of the weights stored in a checkpoint (as written: bf16 rounding included).
    fn loss_of(&self, dir: &Path) -> anyhow::Result<f64> {
        let c = Checkpoint::open(dir)?;
        let per = self.shape.0 * self.shape.1;
        let mut w = vec![0f32; self.names.len() * per];
        for (i, name) in self.names.iter().enumerate() {
            let t = c.tensor(name).with_context(|| format!("{name} missing"))?;
            let kind = FloatKind::of(t.dtype).context("not a float tensor")?;
            let f = &c.files[t.file];
            f.check_fd()?;
            decode_f32(
                kind,
                f.slice(t.range.clone()),
                &mut w[i * per..(i + 1) * per],
            );
        }
        Ok(self.loss(&w))
    }
}

/// A number as Python's `json` writes it (`NaN`, `Infinity`: a diverged loss).
fn py_number(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{x}")
    }
}

/// Write one checkpoint in place, HF Trainer order, marker last. `log` is the run's whole
/// log history so far: (step, learning rate, loss).
fn write_checkpoint(
    p: &Problem,
    w: &[f32],
    dir: &Path,
    step: u64,
    log: &[(u64, f32, f64)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "pmad-demo", "architectures": ["Quadratic"]}"#,
    )?;
    let shape = vec![p.shape.0, p.shape.1];
    let tensors: Vec<(String, Dtype, Vec<usize>)> = p
        .names
        .iter()
        .map(|n| (n.clone(), Dtype::BF16, shape.clone()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let (header, _) = build_header(&meta, &tensors).map_err(anyhow::Error::msg)?;
    let mut f = std::fs::File::create(dir.join("model.safetensors"))?;
    f.write_all(&header)?;
    let per = p.shape.0 * p.shape.1;
    for i in 0..p.names.len() {
        let bytes: Vec<u8> = w[i * per..(i + 1) * per]
            .iter()
            .flat_map(|x| f32_to_bf16_bits(*x).to_le_bytes())
            .collect();
        f.write_all(&bytes)?;
        f.flush()?;
    }
    drop(f);
    std::fs::write(dir.join("optimizer.pt"), b"not copied into merged outputs")?;
    // Written as the HF Trainer does, with Python's json: a diverged loss is a bare NaN.
    let history: Vec<String> = log
        .iter()
        .map(|(s, lr, loss)| {
            format!(
                "{{\"step\": {s}, \"learning_rate\": {lr}, \"loss\": {}}}",
                py_number(*loss)
            )
        })
        .collect();
    let state = format!(
        "{{\"global_step\": {step}, \"log_history\": [{}]}}",
        history.join(", ")
    );
    std::fs::write(dir.join("trainer_state.json"), state)?;
    Ok(())
}

/// Run the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let every = humantime::parse_duration(&args.every)
        .map_err(|e| pmad::Error::Usage(format!("--every {:?}: {e}", args.every)))?;
    let tmp = tempfile::Builder::new().prefix("pmad-demo-").tempdir()?;
    let root = tmp.path().to_path_buf();
    let run_dir = root.join("run");
    std::fs::create_dir_all(&run_dir)?;
    let sma_dir = root.join("merged/sma8");
    let ema_dir = root.join("merged/ema0.2");
    let rescue_dir = root.join("merged/rescue");
    // With --diverge, the sentinel watches the logged loss.
    let spike = if args.diverge {
        format!(
            "[spike]\nenabled = true\nseries = [\"loss\"]\nwindow = 32\nout_dir = {rescue_dir:?}\n"
        )
    } else {
        String::new()
    };
    let cfg_text = format!(
        r#"
[watch]
dir = {run:?}
layout = "hf"
poll_interval = "500ms"
settle = "100ms"

[phase]
start_step = {start}

[[recipe]]
name = "sma8"
method = "sma"
window = 8
out_dir = {sma:?}
keep = 2

[[recipe]]
name = "ema0.2"
method = "ema"
alpha = 0.2
emit_every = 2
out_dir = {ema:?}
keep = 2

[server]
listen = ""

[daemon]
shutdown_grace = "5s"

{spike}
"#,
        run = run_dir,
        sma = sma_dir,
        ema = ema_dir,
        start = args.save_steps * 4,
    );
    let cfg = Config::parse(&cfg_text).context("demo config")?;
    pmad::obs::log::init(cfg.log_format, "info");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2025);
    let problem = std::sync::Arc::new(Problem::new(args.params, &mut rng));
    println!(
        "pmad demo: SGD (lr {LR}, gradient noise {NOISE}) on a quadratic with {} parameters; \
         a bf16 checkpoint every {} steps into {}",
        problem.h.len(),
        args.save_steps,
        run_dir.display()
    );
    println!(
        "           the daemon keeps SMA over 8 and EMA (alpha 0.2) and publishes into {}; \
         steps before {} are warm-up and skipped",
        root.join("merged").display(),
        args.save_steps * 4
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let shutdown = CancellationToken::new();
    let daemon = rt.spawn(pmad::daemon::run(cfg, shutdown.clone()));

    // Producer: SGD with noise, checkpoint every save_steps.
    let p2 = problem.clone();
    let dir2 = run_dir.clone();
    let (n_ckpt, save) = (args.checkpoints, args.save_steps);
    // A diverging run's learning rate jumps after two thirds of its checkpoints.
    let diverge_at = args.diverge.then_some((n_ckpt * 2 / 3) * save);
    let producer = std::thread::spawn(move || -> anyhow::Result<BTreeMap<u64, f64>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut w: Vec<f32> = p2.opt.iter().map(|o| o + 0.1).collect();
        let mut losses = BTreeMap::new();
        let mut log = Vec::new();
        for k in 1..=n_ckpt {
            let t0 = Instant::now();
            for i in 1..=save {
                let step = (k - 1) * save + i;
                let lr = match diverge_at {
                    Some(d) if step > d => LR * DIVERGE_LR,
                    _ => LR,
                };
                for ((w, o), h) in w.iter_mut().zip(&p2.opt).zip(&p2.h) {
                    let g = h * (*w - o) + NOISE * rng.sample::<f32, _>(rand_distr::StandardNormal);
                    *w -= lr * g;
                }
                if step % LOGGING_STEPS == 0 {
                    log.push((step, lr, p2.loss(&w)));
                }
            }
            let step = k * save;
            let dir = dir2.join(format!("checkpoint-{step}"));
            write_checkpoint(&p2, &w, &dir, step, &log)?;
            losses.insert(step, p2.loss_of(&dir)?);
            std::thread::sleep(every.saturating_sub(t0.elapsed()));
        }
        Ok(losses)
    });

    // Monitor: print a loss line for every output the daemon publishes.
    let started = Instant::now();
    let mut seen: BTreeMap<(String, u64), f64> = BTreeMap::new();
    let recipes = [("sma8", sma_dir), ("ema0.2", ema_dir)];
    let last_step = args.checkpoints * args.save_steps;
    let mut producer = Some(producer);
    let mut latest_losses = BTreeMap::new();
    // Once the producer is done, stop when every recipe has published the last step, or when
    // nothing new has appeared for a few seconds (e.g. too few checkpoints to fill a window).
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if producer.as_ref().is_some_and(|p| p.is_finished()) {
            if let Some(p) = producer.take() {
                latest_losses = p
                    .join()
                    .map_err(|_| anyhow::anyhow!("producer panicked"))??;
                last_change = Instant::now();
            }
        }
        for (name, dir) in &recipes {
            let out = OutDir::new(dir);
            let Some(step) = out.latest() else {
                continue;
            };
            if seen.contains_key(&(name.to_string(), step)) {
                continue;
            }
            let merged = problem.loss_of(&out.step_path(step))?;
            let latest_loss = problem.loss_of(&run_dir.join(format!("checkpoint-{step}")))?;
            println!(
                "demo: {name:<6} step {step:>5}: loss(latest) = {latest_loss:.5}  loss(merged) = {merged:.5}  ({:+.0}%)",
                100.0 * (merged / latest_loss - 1.0)
            );
            seen.insert((name.to_string(), step), merged);
            last_change = Instant::now();
        }
        if args.diverge && !seen.keys().any(|(r, _)| r == "rescue") {
            let rescue = OutDir::new(&rescue_dir);
            if let Some(step) = rescue.latest() {
                let loss = problem.loss_of(&rescue.step_path(step))?;
                println!(
                    "demo: loss spike detected: rescue = average of the checkpoints up to step {step}, \
                     loss(rescue) = {loss:.5}: restart training from here"
                );
                seen.insert(("rescue".into(), step), loss);
                last_change = Instant::now();
            }
        }
        // The EMA publishes every 2nd checkpoint, so its last output may be one step early.
        let done = recipes.iter().all(|(n, _)| {
            let slack = if *n == "ema0.2" { args.save_steps } else { 0 };
            seen.keys().any(|(r, s)| r == n && *s + slack >= last_step)
        });
        let quiet = last_change.elapsed() > Duration::from_secs(3);
        if (producer.is_none() && (done || quiet)) || started.elapsed() > Duration::from_secs(90) {
            break;
        }
    }
    shutdown.cancel();
    rt.block_on(daemon)??;
    if let Some(p) = producer.take() {
        latest_losses = p
            .join()
            .map_err(|_| anyhow::anyhow!("producer panicked"))??;
    }

    println!();
    println!("summary over the outputs published (loss = mean (h/2)(w - w*)^2, lower is better):");
    println!(
        "{:<22} {:>8} {:>12} {:>12}",
        "model", "outputs", "mean loss", "final loss"
    );
    let stable: Vec<f64> = latest_losses
        .iter()
        .filter(|(s, _)| **s >= args.save_steps * 4)
        .map(|(_, l)| *l)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{:<22} {:>8} {:>12.5} {:>12.5}",
        "latest checkpoint",
        stable.len(),
        mean(&stable),
        latest_losses.values().last().copied().unwrap_or(f64::NAN)
    );
    for (name, _) in &recipes {
        let v: Vec<f64> = seen
            .iter()
            .filter(|((r, _), _)| r == name)
            .map(|(_, l)| *l)
            .collect();
        if v.is_empty() {
            println!(
                "{:<22} {:>8} {:>12} {:>12}",
                format!("pmad {name}"),
                0,
                "-",
                "-"
            );
            continue;
        }
        println!(
            "{:<22} {:>8} {:>12.5} {:>12.5}",
            format!("pmad {name}"),
            v.len(),
            mean(&v),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    if args.diverge {
        diverged_summary(&problem, &rescue_dir, &latest_losses, &seen)?;
    }
    if args.keep {
        let kept: PathBuf = tmp.keep();
        println!("files kept in {}", kept.display());
    }
    Ok(())
}

/// After a diverging run: the diverged latest checkpoint next to the rescue, and the averages
/// that stopped absorbing at the spike.
fn diverged_summary(
    problem: &Problem,
    rescue_dir: &Path,
    latest: &BTreeMap<u64, f64>,
    seen: &BTreeMap<(String, u64), f64>,
) -> anyhow::Result<()> {
    println!();
    let rescue = OutDir::new(rescue_dir);
    let Some(step) = rescue.latest() else {
        println!("no rescue was published: the sentinel saw no spike");
        return Ok(());
    };
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rescue.step_path(step).join("rescue.json"))?)?;
    let onset = record["onset_step"].as_u64().unwrap_or(0);
    println!(
        "the run diverged: the loss spiked at step {onset} (spike.detected); no average absorbed \
         a checkpoint from then on"
    );
    println!("{:<34} {:>6} {:>14}", "model", "step", "loss");
    if let Some((s, l)) = latest.iter().next_back() {
        println!("{:<34} {s:>6} {l:>14.5}", "latest checkpoint (diverged)");
    }
    let r = problem.loss_of(&rescue.step_path(step))?;
    println!(
        "{:<34} {step:>6} {r:>14.5}",
        "pmad rescue (restart from here)"
    );
    for name in ["sma8", "ema0.2"] {
        if let Some(((_, s), l)) = seen.iter().rfind(|((n, _), _)| n == name) {
            println!(
                "{:<34} {s:>6} {l:>14.5}",
                format!("pmad {name} (its last output)")
            );
        }
    }
    Ok(())
}
