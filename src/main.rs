//! The `pmad` binary: argument parsing, output and exit codes. Logic lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pmad::config::Config;
use pmad::engine::{self, MergeSpec, OutDtype, Progress};
use pmad::merge::{Accumulator, Method};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pmad",
    version,
    about = "Pre-trained Model Averaging daemon: running averages of LLM checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge checkpoints (given oldest first) into one, once.
    Merge(MergeArgs),
    /// Show a checkpoint's tensors, sizes and validity.
    Inspect(InspectArgs),
    /// Run the daemon: watch a training run and publish running averages.
    Run(RunArgs),
    /// Validate a config file and print the resolved settings.
    CheckConfig(CheckConfigArgs),
    /// A self-contained demonstration: a simulated training run merged live.
    Demo(pmad::demo::DemoArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(clap::Args)]
struct CheckConfigArgs {
    /// TOML config file.
    config: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Sma,
    Wma,
    Ema,
    Weights,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Source,
    Bf16,
    F16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccArg {
    F32,
    F64,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Averaging method.
    #[arg(long, value_enum)]
    method: MethodArg,
    /// EMA weight of the newest checkpoint (method ema), in (0, 1].
    #[arg(long)]
    alpha: Option<f64>,
    /// Comma-separated weights, oldest first (method weights); renormalised to sum to 1.
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// Output dtype of float tensors.
    #[arg(long, value_enum, default_value = "source")]
    dtype: DtypeArg,
    /// Accumulator precision.
    #[arg(long, value_enum, default_value = "f32")]
    accumulator: AccArg,
    /// Maximum size of one output shard (e.g. 5GB, 500MiB).
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Output directory (must not exist unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory (atomically).
    #[arg(long)]
    force: bool,
    /// Merge even if inputs contain NaN or Inf.
    #[arg(long)]
    allow_nonfinite: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Output bytes per unit of work (peak RSS is about threads x this x (inputs + 4)).
    #[arg(long, default_value = "4MiB", hide = true)]
    chunk_size: String,
    /// Checkpoints (directories or .safetensors files), oldest first.
    #[arg(required = true, num_args = 1..)]
    checkpoints: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Checkpoint directory or .safetensors file.
    checkpoint: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_size(key: &str, s: &str) -> Result<u64, pmad::Error> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| pmad::Error::Usage(format!("{key}: {s:?} is not a size like 5GB or 512MiB")))
}

fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let method = match args.method {
        MethodArg::Sma => Method::Sma,
        MethodArg::Wma => Method::Wma,
        MethodArg::Ema => Method::Ema {
            alpha: args
                .alpha
                .ok_or_else(|| pmad::Error::Usage("--method ema needs --alpha".into()))?,
        },
        MethodArg::Weights => Method::Weights(
            args.weights
                .clone()
                .ok_or_else(|| pmad::Error::Usage("--method weights needs --weights".into()))?,
        ),
    };
    if args.alpha.is_some() && !matches!(method, Method::Ema { .. }) {
        return Err(pmad::Error::Usage("--alpha is only used with --method ema".into()).into());
    }
    if args.weights.is_some() && !matches!(method, Method::Weights(_)) {
        return Err(
            pmad::Error::Usage("--weights is only used with --method weights".into()).into(),
        );
    }
    let dtype = OutDtype::parse(match args.dtype {
        DtypeArg::Source => "source",
        DtypeArg::Bf16 => "bf16",
        DtypeArg::F16 => "f16",
        DtypeArg::F32 => "f32",
    })
    .unwrap_or(OutDtype::Source);
    let spec = MergeSpec {
        method,
        dtype,
        accumulator: match args.accumulator {
            AccArg::F32 => Accumulator::F32,
            AccArg::F64 => Accumulator::F64,
        },
        shard_size: parse_size("--shard-size", &args.shard_size)?,
        allow_nonfinite: args.allow_nonfinite,
        chunk_bytes: parse_size("--chunk-size", &args.chunk_size)? as usize,
    };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = args.threads {
        if t == 0 {
            return Err(pmad::Error::Usage("--threads must be at least 1".into()).into());
        }
        pool = pool.num_threads(t);
    }
    let pool = pool.build().context("cannot start worker threads")?;
    let progress = Arc::new(Progress::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let bar = std::io::stderr().is_terminal().then(|| {
        let (p, d) = (progress.clone(), done.clone());
        std::thread::spawn(move || draw_progress(&p, &d))
    });
    let result = pool.install(|| {
        engine::merge_checkpoints(
            &args.checkpoints,
            &spec,
            &args.out,
            args.force,
            &progress,
            &cancel,
        )
    });
    done.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.join();
    }
    let s = result?;
    let secs = s.duration.as_secs_f64().max(1e-9);
    println!(
        "merged {} checkpoints ({}) -> {}: {} tensors, {} shard(s), {} in {:.2}s ({}/s read){}",
        args.checkpoints.len(),
        spec.method.name(),
        s.out.display(),
        s.tensors,
        s.shards,
        bytesize::ByteSize(s.bytes_written).display().si(),
        secs,
        bytesize::ByteSize((s.bytes_read as f64 / secs) as u64)
            .display()
            .si(),
        if s.nonfinite > 0 {
            format!(
                "; {} non-finite input values merged (--allow-nonfinite)",
                s.nonfinite
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Progress bar on stderr (only started when stderr is a terminal).
fn draw_progress(p: &Progress, done: &AtomicBool) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while !done.load(Ordering::Relaxed) {
        bar.set_length(p.total.load(Ordering::Relaxed));
        bar.set_position(p.written.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

fn inspect(args: InspectArgs) -> anyhow::Result<bool> {
    let i = pmad::inspect::inspect(&args.checkpoint);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print!("{}", pmad::inspect::render(&i));
    }
    Ok(i.valid)
}

fn check_config(args: CheckConfigArgs) -> anyhow::Result<bool> {
    let cfg = Config::load(&args.config).map_err(|e| pmad::Error::Usage(e.to_string()))?;
    print!("{}", cfg.describe());
    Ok(true)
}

fn run(args: RunArgs) -> anyhow::Result<bool> {
    let cfg = Config::load(&args.config).map_err(|e| pmad::Error::Usage(e.to_string()))?;
    pmad::telemetry::init(cfg.log_format, &cfg.log_level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("pmad-io")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        install_signals(shutdown.clone())?;
        pmad::daemon::run(cfg, shutdown).await
    })?;
    Ok(true)
}

/// SIGTERM/SIGINT: the first stops gracefully, a second one exits at once.
fn install_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                shutdown.cancel();
            } else {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Merge(a) => merge(a).map(|_| true),
        Command::Inspect(a) => inspect(a),
        Command::Run(a) => run(a),
        Command::CheckConfig(a) => check_config(a),
        Command::Demo(a) => pmad::demo::run(a).map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<pmad::Error>() {
                Some(pmad::Error::Usage(_)) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}
