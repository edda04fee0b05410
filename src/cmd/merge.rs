//! `pmad merge`: a one-shot merge of checkpoints given oldest first, with a progress bar on a
//! terminal.

use anyhow::Context;
use pmad::math::{Accumulator, Method, MethodKind, OutDtype, Shape};
use pmad::output::oneshot::{self, MergeSpec};
use pmad::output::partition::{Part, PartitionBy};
use pmad::output::Progress;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `pmad merge` arguments.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Averaging method.
    #[arg(long, value_enum)]
    method: MethodKind,
    /// EMA weight of the newest checkpoint (method ema), in (0, 1].
    #[arg(long)]
    alpha: Option<f64>,
    /// Comma-separated weights, oldest first (method weights); renormalised to sum to 1.
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// The learning-rate decay the weights emulate (method schedule).
    #[arg(long, value_enum)]
    shape: Option<Shape>,
    /// The decay's final LR as a fraction of the constant LR (method schedule), in [0, 1].
    #[arg(long)]
    final_lr_ratio: Option<f64>,
    /// Output dtype of float tensors.
    #[arg(long, value_enum, default_value_t = OutDtype::Source)]
    dtype: OutDtype,
    /// Accumulator precision [default: f32, or f64 when float tensors are written as f32/f64].
    #[arg(long, value_enum)]
    accumulator: Option<Accumulator>,
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
    /// Output bytes per unit of work, at most (hidden: --memory-budget decides).
    #[arg(long, default_value = "4MiB", hide = true)]
    chunk_size: String,
    /// Peak memory to stay under, whatever the number of checkpoints and threads: past what
    /// zero-copy maps allow, inputs are read through small buffers instead.
    #[arg(long, default_value = "256MB")]
    memory_budget: String,
    /// Write only part INDEX/COUNT of the output (e.g. 0/4), for a merge split between
    /// processes or nodes; `--commit` publishes it once every part is written.
    #[arg(long, value_name = "INDEX/COUNT", conflicts_with = "commit")]
    partition: Option<Part>,
    /// How `--partition` splits the output: by shard file, by tensor, or auto (by shard unless
    /// that leaves the largest part more than 10% bigger).
    #[arg(
        long,
        value_name = "auto|shard|tensor",
        default_value = "auto",
        requires = "partition"
    )]
    partition_by: PartitionBy,
    /// Publish an output whose parts were written with `--partition` (same checkpoints and
    /// options); fails, naming them, while parts are missing.
    #[arg(long)]
    commit: bool,
    /// Average only tensors whose key matches one of these regular expressions (repeatable;
    /// replaces the format's own rule, e.g. DCP's "not optimizer state").
    #[arg(long, value_name = "REGEX")]
    include: Vec<String>,
    /// Never average tensors whose key matches this regular expression (repeatable): they are
    /// copied from the newest checkpoint.
    #[arg(long, value_name = "REGEX")]
    exclude: Vec<String>,
    /// Checkpoints (directories or .safetensors files), oldest first.
    #[arg(required = true, num_args = 1..)]
    checkpoints: Vec<PathBuf>,
}

/// A size like `5GB` or `512MiB` given for option `key`.
fn parse_size(key: &str, s: &str) -> Result<u64, pmad::Error> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| pmad::Error::Usage(format!("{key}: {s:?} is not a size like 5GB or 512MiB")))
}

/// Merge the checkpoints and print a one-line summary.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let method = match args.method {
        MethodKind::Sma => Method::Sma,
        MethodKind::Wma => Method::Wma,
        MethodKind::Ema => Method::Ema {
            alpha: args
                .alpha
                .ok_or_else(|| pmad::Error::Usage("--method ema needs --alpha".into()))?,
        },
        MethodKind::Weights => Method::Weights(
            args.weights
                .clone()
                .ok_or_else(|| pmad::Error::Usage("--method weights needs --weights".into()))?,
        ),
        MethodKind::Schedule => Method::Schedule {
            shape: args.shape.ok_or_else(|| {
                pmad::Error::Usage(format!(
                    "--method schedule needs --shape ({})",
                    Shape::one_of()
                ))
            })?,
            final_lr_ratio: args.final_lr_ratio.unwrap_or(0.0),
        },
    };
    if (args.shape.is_some() || args.final_lr_ratio.is_some())
        && !matches!(method, Method::Schedule { .. })
    {
        return Err(pmad::Error::Usage(
            "--shape and --final-lr-ratio are only used with --method schedule".into(),
        )
        .into());
    }
    if args.alpha.is_some() && !matches!(method, Method::Ema { .. }) {
        return Err(pmad::Error::Usage("--alpha is only used with --method ema".into()).into());
    }
    if args.weights.is_some() && !matches!(method, Method::Weights(_)) {
        return Err(
            pmad::Error::Usage("--weights is only used with --method weights".into()).into(),
        );
    }
    let spec = MergeSpec {
        method,
        dtype: args.dtype,
        accumulator: args.accumulator,
        shard_size: parse_size("--shard-size", &args.shard_size)?,
        allow_nonfinite: args.allow_nonfinite,
        chunk_bytes: parse_size("--chunk-size", &args.chunk_size)? as usize,
        memory_budget: parse_size("--memory-budget", &args.memory_budget)?,
        select: pmad::format::Select::new(&args.include, &args.exclude)
            .map_err(|e| pmad::Error::Usage(format!("--{e}")))?,
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
        if args.commit {
            oneshot::commit_parts(&args.checkpoints, &spec, &args.out, args.force)
        } else if let Some(part) = args.partition {
            oneshot::merge_part(
                &args.checkpoints,
                &spec,
                &args.out,
                part,
                args.partition_by,
                &progress,
                &cancel,
            )
        } else {
            oneshot::merge_checkpoints(
                &args.checkpoints,
                &spec,
                &args.out,
                args.force,
                &progress,
                &cancel,
            )
        }
    });
    done.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.join();
    }
    let s = result?;
    let secs = s.duration.as_secs_f64().max(1e-9);
    if let (Some(part), Some(plan)) = (args.partition, &s.plan) {
        println!(
            "wrote part {}/{} of {} (plan {plan}) -> {}: {} tensors, {} file(s), {} in {:.2}s \
             ({} read); publish with --commit once every part is written",
            part.index,
            part.count,
            args.out.display(),
            s.out.display(),
            s.tensors,
            s.shards,
            bytesize::ByteSize(s.bytes_written).display().si(),
            secs,
            bytesize::ByteSize(s.bytes_read).display().si(),
        );
        return Ok(());
    }
    if let (true, Some(plan)) = (args.commit, &s.plan) {
        println!(
            "committed the parts of plan {plan} -> {}: {} tensors, {} shard(s), {} in {:.2}s",
            s.out.display(),
            s.tensors,
            s.shards,
            bytesize::ByteSize(s.bytes_written).display().si(),
            secs,
        );
        return Ok(());
    }
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
