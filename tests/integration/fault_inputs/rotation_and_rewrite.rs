//! Sources that change under pmad (test T5 of `docs/reliability.md`):
//!
//! - `rotation_and_rewrite`: rotation (save_total_limit = 2 < window) and in-place rewrites,
//!   one shorter than before, one at the moment pmad maps the file; every emission is copied
//!   as soon as it is logged and checked against the float64 oracle on pristine copies of the
//!   versions it must contain.
//! - `truncated_while_being_read_does_not_kill_pmad`: the SIGBUS danger proper: a large
//!   checkpoint truncated and rewritten in place while pmad reads it.

use super::{
    expect_accepted, expect_emitted, fixtures, latest, lines_for, make_args, merge_steps, pt_meta,
    reserialize, run_oracle, strays, write_ckpt, write_config, OracleCheck, Pace, Rec, FAST, POLL,
    SMA2, WAIT,
};
use crate::harness::log::LogFollower;
use crate::harness::tree::maps_contain;
use crate::harness::{copy_tree, list_dir, ms_since, s, step_span, Daemon, Event, TestEnv};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// One version of one checkpoint and when it was written into the watch dir.
#[derive(Debug, Clone)]
struct Version {
    step: u64,
    gen: u32,
    pristine: PathBuf,
    written: Option<(SystemTime, SystemTime)>,
}

/// The version pmad must have read for `step` when it logged `checkpoint.accepted` at `t`:
/// the newest one completely written before `t` (pmad can only ever validate a complete
/// version; one being rewritten at `t` is not complete yet).
fn version_at(versions: &[Version], step: u64, t: SystemTime) -> Option<&Version> {
    versions
        .iter()
        .filter(|v| v.step == step && v.written.is_some_and(|(_, end)| end <= t))
        .max_by_key(|v| v.written.unwrap().1)
}

/// A copy of one emission, taken as soon as its `merge.emitted` line appeared (a later
/// emission of the same step replaces the directory, so checking only the final outputs
/// would miss what was published in between).
#[derive(Debug, Clone)]
struct Snap {
    recipe: String,
    copy: PathBuf,
    /// The `merge.emitted` line.
    line: Event,
}

/// Follows pmad's log and copies every emitted output into `dest` right away.
struct Snapshotter {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Snap>>,
}

impl Snapshotter {
    fn start(stdout: PathBuf, dest: PathBuf) -> Snapshotter {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut snaps: Vec<Snap> = Vec::new();
            let mut log = LogFollower::new(&stdout);
            loop {
                // Read the flag first: one more pass after it is set catches the last lines.
                let last = stop2.load(Ordering::Relaxed);
                let emitted: Vec<Event> = log
                    .poll()
                    .events
                    .iter()
                    .filter(|e| e.event() == "merge.emitted")
                    .skip(snaps.len())
                    .cloned()
                    .collect();
                for e in emitted {
                    let out = PathBuf::from(e.s("out").unwrap_or_default());
                    let recipe = e.s("recipe").unwrap_or_default().to_string();
                    let copy = dest.join(format!(
                        "{:03}-{recipe}-{}",
                        snaps.len(),
                        out.file_name().unwrap_or_default().to_string_lossy()
                    ));
                    copy_tree(&out, &copy);
                    snaps.push(Snap {
                        recipe,
                        copy,
                        line: e,
                    });
                }
                if last {
                    return snaps;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Snapshotter { stop, handle }
    }

    fn finish(self) -> Vec<Snap> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("snapshotter")
    }
}

/// Check every emission against the oracle with the versions its merge.json steps had when
/// it was emitted (judged from pmad's log and the producer's timeline).
fn check_emissions(
    env: &TestEnv,
    log: &[Event],
    snaps: &[Snap],
    recipes: &[Rec],
    versions: &[Version],
) -> Vec<String> {
    let mut fails = Vec::new();
    let mut checks = Vec::new();
    for snap in snaps {
        let rec = *recipes
            .iter()
            .find(|r| r.name == snap.recipe)
            .expect("recipe of an emission");
        let te = snap.line.t;
        let label = format!(
            "{} emitted {} at {}",
            snap.recipe,
            snap.line.s("out").unwrap_or_default(),
            snap.line.s("timestamp").unwrap_or_default()
        );
        let steps = merge_steps(&snap.copy);
        // The copy must be the emission the line reports (not a later replacement).
        let span = step_span(&steps);
        if snap.line.s("steps") != Some(span.as_str())
            || snap.line.u("n") != Some(steps.len() as u64)
        {
            fails.push(format!(
                "{label}: the copy's merge.json steps {steps:?} do not match the log line {} \
                 (copied too late?)",
                snap.line.line()
            ));
            continue;
        }
        let mut inputs = Vec::new();
        let mut gens = Vec::new();
        for st in steps {
            let acc = log
                .iter()
                .rev()
                .find(|e| e.is("checkpoint.accepted", st) && e.t <= te)
                .map(|e| e.t);
            match acc.and_then(|t| version_at(versions, st, t)) {
                Some(v) => {
                    inputs.push(v.pristine.clone());
                    gens.push(format!("{st}/g{}", v.gen));
                }
                None => fails.push(format!(
                    "{label}: merge.json lists step {st}, which pmad had not accepted \
                     (complete) before emitting it"
                )),
            }
        }
        // Name the version the copied config.json came from when it is not the weights'.
        if let (Some(newest), Some(st)) = (inputs.last(), merge_steps(&snap.copy).last()) {
            let got = std::fs::read(snap.copy.join("config.json")).ok();
            let want = std::fs::read(newest.join("config.json")).ok();
            if got != want {
                let from = versions
                    .iter()
                    .filter(|v| v.step == *st)
                    .find(|v| std::fs::read(v.pristine.join("config.json")).ok() == got)
                    .map(|v| format!("gen {} of step {st}", v.gen))
                    .unwrap_or_else(|| "no version (missing or partial)".into());
                fails.push(format!(
                    "{label}: weights from {} but config.json from {from}: aux files are read \
                     from the live checkpoint dir at emission time, not pinned with the weights",
                    gens.last().map(String::as_str).unwrap_or("?")
                ));
            }
        }
        checks.push(OracleCheck {
            label: format!("{label} [{}]", gens.join(" ")),
            rec,
            out: snap.copy.clone(),
            inputs,
        });
    }
    fails.extend(run_oracle(env, &checks));
    fails
}

#[test]
fn rotation_and_rewrite() {
    const SAVE_TOTAL_LIMIT: usize = 2;
    let recipes = [
        Rec {
            name: "sma4",
            method: "sma",
            window: 4,
        },
        Rec {
            name: "ema",
            method: "ema",
            window: 0,
        },
    ];
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let pristine = env.mkdir("pristine");
    // gen 0: 100..500; gen 1 (restart from 300): 400 (shorter file), 500, 600;
    // gen 2 (600 rewritten while pmad maps it): 600, 700, 800.
    let plan: [(u64, u32, u64); 11] = [
        (100, 0, 1),
        (200, 0, 2),
        (300, 0, 3),
        (400, 0, 4),
        (500, 0, 5),
        (400, 1, 14),
        (500, 1, 15),
        (600, 1, 16),
        (600, 2, 26),
        (700, 2, 27),
        (800, 2, 28),
    ];
    let mut versions: Vec<Version> = plan
        .iter()
        .map(|&(step, gen, _)| Version {
            step,
            gen,
            pristine: pristine.join(format!("checkpoint-{step}-g{gen}")),
            written: None,
        })
        .collect();
    let jobs: Vec<Vec<String>> = plan
        .iter()
        .zip(&versions)
        .map(|(&(step, _, seed), v)| make_args(&v.pristine, "bf16", seed, step, &["--no-edge"]))
        .collect();
    fixtures(&env, &jobs);
    // 400 gen 1 is shorter than gen 0: no __metadata__ in its header.
    let v400 = &versions[5].pristine;
    let before = std::fs::metadata(versions[3].pristine.join("model.safetensors"))
        .unwrap()
        .len();
    reserialize(&v400.join("model.safetensors"), |_| {}, None);
    let after = std::fs::metadata(v400.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        after < before,
        "gen-1 400 should be shorter ({after} vs {before})"
    );

    let cfg = write_config(&env, &watch, &recipes, &out_root, None);
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let snapshotter = Snapshotter::start(d.stdout.clone(), env.mkdir("emitted"));
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let pid = d.pid();
    let dir = |step: u64| watch.join(format!("checkpoint-{step}"));
    let slow = Pace {
        chunk: 1024,
        pause: Duration::from_millis(30),
    };
    let mut deleted_while_pinned = Vec::new();
    // save_total_limit: rm -rf the oldest checkpoints beyond the limit.
    let rotate = |deleted: &mut Vec<u64>| {
        let mut present: Vec<u64> = list_dir(&watch)
            .iter()
            .filter_map(|n| n.strip_prefix("checkpoint-")?.parse().ok())
            .collect();
        present.sort();
        while present.len() > SAVE_TOTAL_LIMIT {
            let old = present.remove(0);
            std::fs::remove_dir_all(dir(old)).expect("rotate");
            deleted.push(old);
        }
    };
    let write = |versions: &mut Vec<Version>, i: usize, pace: Pace| {
        let v = &versions[i];
        let w = write_ckpt(&v.pristine, &dir(v.step), pace);
        versions[i].written = Some(w);
        w
    };

    // gen 0, with rotation: 100 and 200 are deleted while in the SMA-4 window.
    for i in 0..5 {
        let (_, end) = write(&mut versions, i, FAST);
        rotate(&mut deleted_while_pinned);
        expect_accepted(&mut d, versions[i].step, end);
    }
    let t = versions[4].written.unwrap().1;
    expect_emitted(&mut d, &out_root, "sma4", 500, t);
    expect_emitted(&mut d, &out_root, "ema", 500, t);

    // R1: training restarts from 300: 400 rewritten in place, shorter, slowly.
    let (r1_start, r1_end) = write(&mut versions, 5, slow);
    let changed = d.expect("source.changed for step 400", WAIT, |e| {
        e.is("source.changed", 400) && e.t >= r1_start
    });
    expect_accepted(&mut d, 400, r1_end);
    let (_, end) = write(&mut versions, 6, slow);
    expect_accepted(&mut d, 500, end);

    // R2: 600 (gen 1) is written; the moment pmad maps it, it is truncated and rewritten
    // (gen 2), HF order (config.json first), slowly.
    let (_, g1_end) = write(&mut versions, 7, FAST);
    rotate(&mut deleted_while_pinned);
    let until = Instant::now() + WAIT;
    let needle = format!("{}/model.safetensors", s(&dir(600)));
    while Instant::now() < until && !maps_contain(pid, &needle) && d.alive() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mapped = maps_contain(pid, &needle);
    let (r2_start, r2_end) = write(&mut versions, 8, slow);
    eprintln!(
        "rotation_and_rewrite: R2 rewrite of 600 started {} ms after gen 1 was complete \
         (pmad had {}mapped it)",
        ms_since(r2_start, g1_end),
        if mapped { "" } else { "NOT " }
    );
    assert!(
        d.alive(),
        "pmad died at R2: {}\n{}",
        d.status_text(),
        d.dump(40)
    );
    expect_accepted(&mut d, 600, r2_end);
    for i in 9..11 {
        let (_, end) = write(&mut versions, i, FAST);
        rotate(&mut deleted_while_pinned);
        expect_accepted(&mut d, versions[i].step, end);
    }
    let t = versions[10].written.unwrap().1;
    expect_emitted(&mut d, &out_root, "sma4", 800, t);
    expect_emitted(&mut d, &out_root, "ema", 800, t);
    std::thread::sleep(POLL * 3);
    let alive = d.alive();
    let status = d.status_text();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();

    let mut fails = Vec::new();
    if !alive || code != Some(0) {
        fails.push(format!(
            "daemon: {status} before shutdown, shutdown code {code:?}"
        ));
    }
    // Rotation: the deleted checkpoints that were pinned are reported once each, not errors.
    for st in [100u64, 200, 300] {
        let n = lines_for(&log, "source.vanished", st).len();
        if n != 1 {
            fails.push(format!(
                "{n} source.vanished lines for step {st} (deleted in window)"
            ));
        }
    }
    // R1: source.changed names the rollback; the window drops 400 and 500.
    let abandoned = changed.s("abandoned").unwrap_or("");
    if !(abandoned.contains("400") && abandoned.contains("500")) {
        fails.push(format!(
            "source.changed for 400 should drop 400 and the later 500: {}",
            changed.line()
        ));
    }
    let next_window = log
        .iter()
        .find(|e| e.event() == "window.updated" && e.t >= changed.t && e.step().is_none());
    match next_window.and_then(|e| e.s("window")) {
        Some(w) if !w.contains("400") && !w.contains("500") => {}
        other => fails.push(format!(
            "after the rollback the window should end before 400, window.updated says {other:?}"
        )),
    }
    for rec in &recipes {
        let o = out_root.join(rec.name);
        if latest(&o).as_deref() != Some("step-800") {
            fails.push(format!("{}: LATEST {:?}", rec.name, latest(&o)));
        }
        let st = strays(&o);
        if !st.is_empty() {
            fails.push(format!("{}: leftovers {st:?}", rec.name));
        }
    }
    // An emission that finds its source rewritten under it fails (and says so); any other
    // ERROR is a failure of the test.
    for e in log.iter().filter(|e| e.level() == "ERROR") {
        if !(e.event() == "merge.failed" && e.s("reason") == Some("source_changed")) {
            fails.push(format!("ERROR line: {}", e.line()));
        }
    }
    let snaps = snapshotter.finish();
    let n = snaps.len();
    fails.extend(check_emissions(&env, &log, &snaps, &recipes, &versions));
    eprintln!(
        "rotation_and_rewrite: {n} emissions checked; deleted while pinned \
         {deleted_while_pinned:?}; merge.failed: {:?}; source.changed lines: {}",
        log.iter()
            .filter(|e| e.event() == "merge.failed")
            .map(|e| e.line())
            .collect::<Vec<_>>(),
        log.iter()
            .filter(|e| e.event() == "source.changed")
            .map(|e| e.line())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(
        fails.is_empty(),
        "rotation and rewrite:\n{}\n{}",
        fails.join("\n"),
        d.dump(80)
    );
}

/// A large single-file F32 checkpoint (`rows` x 1024 + 1024 x 1024) with a valid marker.
fn big_checkpoint(dir: &Path, seed: u64, step: u64, metadata: bool, rows: usize) {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensor = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
            .collect()
    };
    let a = tensor(rows * 1024);
    let b = tensor(1024 * 1024);
    let views = vec![
        (
            "a.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, 1024], &a)
                .unwrap(),
        ),
        (
            "b.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1024, 1024], &b)
                .unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(views, if metadata { pt_meta() } else { None }).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"model_type\": \"llama\", \"seed\": {seed}}}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("trainer_state.json"),
        format!("{{\"global_step\": {step}, \"log_history\": []}}\n"),
    )
    .unwrap();
}

#[test]
fn truncated_while_being_read_does_not_kill_pmad() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let pristine = env.mkdir("pristine");
    let rows = 2048; // 8 MiB + 4 MiB of F32: pmad (debug build) reads it for a few 100 ms
    let mk = |name: &str, seed, step, meta| {
        let p = pristine.join(name);
        big_checkpoint(&p, seed, step, meta, rows);
        p
    };
    let a = mk("checkpoint-100", 1, 100, true);
    let b0 = mk("checkpoint-200-g0", 2, 200, true);
    let b1 = mk("checkpoint-200-g1", 3, 200, false); // shorter: no __metadata__
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    let snapshotter = Snapshotter::start(d.stdout.clone(), env.mkdir("emitted"));
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let pid = d.pid();
    let (_, a_end) = write_ckpt(&a, &watch.join("checkpoint-100"), FAST);
    let a_acc = expect_accepted(&mut d, 100, a_end);

    // B gen 0 lands; as soon as pmad maps its weights, the "trainer" rewrites the checkpoint
    // in place: O_TRUNC (the file is now 0 bytes under pmad's map), then the new data.
    let dst = watch.join("checkpoint-200");
    let (_, b0_end) = write_ckpt(&b0, &dst, FAST);
    let needle = format!("{}/model.safetensors", s(&dst));
    let until = Instant::now() + WAIT;
    while Instant::now() < until && !maps_contain(pid, &needle) && d.alive() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mapped_at = SystemTime::now();
    let mapped = maps_contain(pid, &needle);
    let trunc = std::fs::File::options()
        .write(true)
        .truncate(true)
        .open(dst.join("model.safetensors"))
        .expect("truncate");
    let truncated_at = SystemTime::now();
    drop(trunc);
    std::thread::sleep(Duration::from_millis(50));
    let (_, b1_end) = write_ckpt(
        &b1,
        &dst,
        Pace {
            chunk: 1 << 20,
            pause: Duration::from_millis(10),
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    let died = !d.alive();
    let status = d.status_text();
    let log = d.log();
    let after = |t: SystemTime| log.iter().filter(move |e| e.t >= t);
    let since: Vec<&str> = after(b0_end).map(|e| e.line()).collect();
    assert!(
        !died,
        "pmad {status} after checkpoint-200/model.safetensors was truncated in place while \
         mapped (pmad mapped it {} ms after the file was complete; truncated {} ms later). \
         A trainer rewriting a checkpoint in place (safetensors <= 0.7 truncates and rewrites) \
         at that moment kills the daemon. Log since the checkpoint landed:\n{}\n{}",
        ms_since(mapped_at, b0_end),
        ms_since(truncated_at, mapped_at),
        since.join("\n"),
        d.dump(5)
    );
    assert!(mapped, "pmad never mapped checkpoint-200\n{}", d.dump(40));
    let acc = expect_accepted(&mut d, 200, b1_end);
    expect_emitted(&mut d, &out_root, "sma2", 200, acc.t);
    std::thread::sleep(POLL * 3);
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();
    let mut fails = Vec::new();
    if code != Some(0) {
        fails.push(format!("shutdown code {code:?} ({})", d.status_text()));
    }
    let versions = vec![
        Version {
            step: 100,
            gen: 0,
            pristine: a,
            written: Some((a_end, a_end)),
        },
        Version {
            step: 200,
            gen: 0,
            pristine: b0,
            written: Some((b0_end, b0_end)),
        },
        Version {
            step: 200,
            gen: 1,
            pristine: b1,
            written: Some((truncated_at, b1_end)),
        },
    ];
    let snaps = snapshotter.finish();
    let n = snaps.len();
    fails.extend(check_emissions(&env, &log, &snaps, &[SMA2], &versions));
    eprintln!(
        "truncated while read: A accepted at +{} ms; {n} emission(s) checked; log after the \
         truncation:\n  {}",
        ms_since(a_acc.t, a_end),
        log.iter()
            .filter(|e| e.t >= truncated_at)
            .map(|e| e.line())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(fails.is_empty(), "{}\n{}", fails.join("\n"), d.dump(40));
}

/// A trainer that rotates checkpoints away faster than `watch.settle` (keeps 2, saves every
/// 300 ms, settle 1 s): pmad pins a checkpoint's files as soon as its marker appears, so every
/// checkpoint is used although none of them settles on disk, and every output equals the
/// float64 oracle of the checkpoints it names.
#[test]
fn checkpoints_rotated_away_before_they_settle_are_not_lost() {
    use crate::harness::{outputs, Config, Daemon, Recipe};
    let env = TestEnv::new();
    let stage = env.mkdir("stage");
    let watch = env.mkdir("ckpt");
    let steps: Vec<u32> = (1..=8).map(|i| i * 100).collect();
    let staged: Vec<PathBuf> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            env.make(
                &format!("stage/checkpoint-{s}"),
                "bf16",
                i as u32 + 1,
                *s,
                &[],
            )
        })
        .collect();
    let out = env.join("out/sma2");
    let cfg = Config::new(&watch)
        .poll("100ms")
        .settle("1s")
        .recipe(Recipe::sma("sma2", 2).set("keep", 0usize).out_dir(&out))
        .no_server()
        .json_log("")
        .write(&env.join("pmad.toml"));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    for (i, src) in staged.iter().enumerate() {
        let dst = watch.join(src.file_name().unwrap());
        copy_tree(src, &dst);
        if i >= 2 {
            std::fs::remove_dir_all(watch.join(staged[i - 2].file_name().unwrap())).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let last = *steps.last().unwrap() as u64;
    d.expect("the last output", Duration::from_secs(30), |e| {
        e.event() == "merge.emitted" && e.s("steps").is_some_and(|s| s.ends_with(&last.to_string()))
    });
    assert_eq!(
        d.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        d.dump(40)
    );
    let log = d.log();
    let accepted: Vec<u64> = log
        .iter()
        .filter(|e| e.event() == "checkpoint.accepted")
        .filter_map(|e| e.step())
        .collect();
    assert_eq!(
        accepted,
        steps.iter().map(|s| *s as u64).collect::<Vec<_>>(),
        "{}",
        d.dump(60)
    );
    assert!(
        log.iter().all(|e| e.event() != "checkpoint.lost"),
        "{}",
        d.dump(60)
    );
    // Most of them were used from their pinned files: their directory was already gone.
    let from_pins = log
        .iter()
        .filter(|e| e.event() == "source.vanished" && e.line().contains("pinned when its marker"))
        .count();
    assert!(
        from_pins >= 3,
        "only {from_pins} used from pins\n{}",
        d.dump(60)
    );
    for (step, dir) in outputs(&out) {
        let ins: Vec<PathBuf> = merge_steps(&dir)
            .iter()
            .map(|s| stage.join(format!("checkpoint-{s}")))
            .collect();
        let o = env.oracle(&["--method", "sma"], &dir, &ins);
        assert_eq!(o.code, 0, "step-{step}: {}", o.describe());
    }
}
