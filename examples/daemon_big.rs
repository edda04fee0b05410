//! The daemon's incremental SMA over a window larger than RAM, with file-backed accumulators
//! (issue "Prove the speed", item 3; bench/PROFILE.md has the numbers).
//!
//! ```text
//! cargo run --release --example gen_ckpts -- --dir /tmp/pmad-bench-big --count 10 --size 3GB
//! cargo run --release --example daemon_big -- --window 9 --memory-budget 64MB \
//!     --state-dir /tmp/pmad-bench-big/state /tmp/pmad-bench-big/checkpoint-*
//! ```
//!
//! Feeds the checkpoints (oldest first) to the daemon's [`Window`] exactly as `pmad run` does,
//! with one SMA recipe over `--window` and `state.memory_budget = --memory-budget`: when the
//! accumulators (4 bytes per parameter) exceed the budget they live in
//! `<state-dir>/acc-<generation>.bin` (fallocated, mapped, double-buffered). Nothing is pre-warmed: with `--cold`
//! each checkpoint is evicted from the page cache (posix_fadvise DONTNEED) before it arrives,
//! as a checkpoint written long ago or on a machine with less RAM than the window would be.
//! After the last arrival the SMA is emitted once (to `<state-dir>/out`, removed afterwards
//! unless `--keep`).
//!
//! With `--snapshot`, every arrival is followed by what `pmad run` does next with a state
//! directory: `StateDir::save` in `<state-dir>` of the manifest and the accumulators (an fsync
//! of the current generation file when file-backed; a full copy written from RAM, fsynced and
//! renamed otherwise), timed apart.
//!
//! A sampler thread reads /proc/self/status every 50 ms; the output gives per arrival the
//! update time, bytes read and GB/s, and at the end the peak of VmRSS, RssAnon and RssFile
//! (file-backed pages of the checkpoint and accumulator maps: reclaimable page cache that the
//! kernel writes back and drops under pressure, unlike anonymous memory) and VmHWM.

use pmad::config::Config;
use pmad::daemon::window::Window;
use pmad::output::{OutDir, Progress};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn evict(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) == Some("safetensors") {
            if let Ok(f) = std::fs::File::open(&p) {
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            }
        }
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let window: usize = take("--window")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(9);
    let budget = take("--memory-budget").unwrap_or_else(|| "64MB".into());
    let state_dir =
        PathBuf::from(take("--state-dir").unwrap_or_else(|| "/tmp/pmad-bench-big/state".into()));
    let mut flag = |name: &str| -> bool {
        if let Some(i) = args.iter().position(|a| a == name) {
            args.remove(i);
            true
        } else {
            false
        }
    };
    let cold = flag("--cold");
    let keep = flag("--keep");
    let snapshot = flag("--snapshot");
    let dirs: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    anyhow::ensure!(!dirs.is_empty(), "no checkpoints given");
    let out = state_dir.join("out");
    let cfg = Config::parse(&format!(
        r#"[watch]
dir = "/unused"
[state]
dir = {state:?}
memory_budget = {budget:?}
[[recipe]]
name = "sma"
method = "sma"
window = {window}
out_dir = {out:?}
keep = 1
"#,
        state = state_dir,
    ))
    .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&state_dir)?;
    let budget_bytes = cfg.state.memory_budget;
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let mut w = Window::new(
        &cfg.recipes,
        cfg.state.accumulator,
        Some(state_dir.clone()),
        budget_bytes,
    );

    // RSS sampler.
    let stop = Arc::new(AtomicBool::new(false));
    let peaks: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let sampler = {
        let (stop, peaks) = (stop.clone(), peaks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (i, f) in ["VmRSS:", "RssAnon:", "RssFile:"].iter().enumerate() {
                    peaks[i].fetch_max(status_kb(f), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    println!(
        "daemon_big: {} checkpoints, SMA window {window}, memory_budget {} ({} bytes), state {}, {} cache",
        dirs.len(),
        budget,
        budget_bytes,
        state_dir.display(),
        if cold { "cold" } else { "as found" }
    );
    let mut sd = if snapshot {
        Some(pmad::daemon::state::StateDir::open(&state_dir)?)
    } else {
        None
    };
    let mut snaps = Vec::new();
    println!(
        "{:>7} {:>7} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "arrival", "kind", "update_s", "read_GB", "GB/s", "rss_MB", "anon_MB", "file_MB", "save_s"
    );
    let mut paths = BTreeMap::new();
    let t_all = Instant::now();
    let mut total_read = 0u64;
    let mut fills = Vec::new();
    let mut slides = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let step = (i as u64 + 1) * 1000;
        if cold {
            evict(d);
        }
        let c = Arc::new(pmad::format::Checkpoint::open(d)?);
        paths.insert(step, d.clone());
        let t0 = Instant::now();
        let rep = pool.install(|| w.arrive(step, c))?;
        let dt = t0.elapsed().as_secs_f64();
        total_read += rep.bytes_read;
        let gbs = rep.bytes_read as f64 / dt / 1e9;
        let kind = if rep.rebuilt {
            "rebuilt"
        } else if rep.evicted.is_empty() {
            "fill"
        } else {
            "slide"
        };
        if kind == "slide" {
            slides.push((dt, rep.bytes_read));
        } else {
            fills.push((dt, rep.bytes_read));
        }
        let save = match (&mut sd, w.acc()) {
            (Some(sd), Some(acc)) => {
                let m = pmad::daemon::state::Manifest {
                    format: pmad::daemon::state::FORMAT,
                    generation: 0,
                    accumulator: w.accumulator(),
                    recipes_signature: String::new(),
                    layout: acc.layout().clone(),
                    window: Vec::new(),
                    recipes: Vec::new(),
                    newest_step: Some(step),
                    paths: Vec::new(),
                };
                let t = Instant::now();
                sd.save(m, Some(pmad::daemon::state::AccBytes::of(acc)))?;
                // As `pmad run` does: the store keeps the generation the manifest names.
                w.persisted(sd.generation());
                let s = t.elapsed().as_secs_f64();
                snaps.push(s);
                s
            }
            _ => 0.0,
        };
        println!(
            "{:>7} {:>7} {:>10.2} {:>10.2} {:>9.2} {:>10.0} {:>10.0} {:>10.0} {:>10.2}",
            i + 1,
            kind,
            dt,
            rep.bytes_read as f64 / 1e9,
            gbs,
            mb(status_kb("VmRSS:")),
            mb(status_kb("RssAnon:")),
            mb(status_kb("RssFile:")),
            save,
        );
    }
    let updates = t_all.elapsed().as_secs_f64() - snaps.iter().sum::<f64>();
    if !snaps.is_empty() {
        let mut v = snaps.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        println!(
            "state saves (full accumulator copy + fsync): median {:.2}s, total {:.1}s over {} arrivals (not included in the update times below)",
            v[v.len() / 2],
            v.iter().sum::<f64>(),
            v.len()
        );
    }
    let acc_file = w.acc().and_then(|a| a.file().map(|(_, p)| p.to_path_buf()));
    let acc_bytes = w.acc().map(|a| a.raw().len() as u64).unwrap_or(0);
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
    let emit = t2.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let agg = |v: &[(f64, u64)]| -> (f64, f64) {
        let t: f64 = v.iter().map(|x| x.0).sum();
        let b: u64 = v.iter().map(|x| x.1).sum();
        (t, if t > 0.0 { b as f64 / t / 1e9 } else { 0.0 })
    };
    let (ft, fg) = agg(&fills);
    let (st, sg) = agg(&slides);
    println!(
        "accumulators: {:.2} GB {}",
        acc_bytes as f64 / 1e9,
        match &acc_file {
            Some(p) => format!("file-backed at {}", p.display()),
            None => "in RAM".into(),
        }
    );
    println!(
        "updates: {} arrivals in {updates:.1}s, {:.1} GB read, {:.2} GB/s overall | fill {:.2} GB/s over {} | slide {:.2} GB/s over {} ({:.1}s median)",
        dirs.len(),
        total_read as f64 / 1e9,
        total_read as f64 / updates / 1e9,
        fg,
        fills.len(),
        sg,
        slides.len(),
        {
            let mut v: Vec<f64> = slides.iter().map(|x| x.0).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        }
    );
    let _ = ft;
    let _ = st;
    println!(
        "emit: {:.2} GB in {emit:.1}s ({:.2} GB/s)",
        e.bytes as f64 / 1e9,
        e.bytes as f64 / emit / 1e9
    );
    println!(
        "peak RSS (sampled 50 ms): VmRSS {:.0} MB, RssAnon {:.0} MB, RssFile {:.0} MB; VmHWM {:.0} MB",
        mb(peaks[0].load(Ordering::Relaxed)),
        mb(peaks[1].load(Ordering::Relaxed)),
        mb(peaks[2].load(Ordering::Relaxed)),
        mb(status_kb("VmHWM:")),
    );
    drop(w);
    if keep {
        println!("kept the emitted output under {}", out.display());
    } else {
        let _ = std::fs::remove_dir_all(&out);
    }
    drop(sd);
    for g in pmad::math::accum::generations(&state_dir) {
        let _ = std::fs::remove_file(pmad::math::accum::generation_path(&state_dir, g));
    }
    let _ = std::fs::remove_file(state_dir.join("manifest.json"));
    Ok(())
}
