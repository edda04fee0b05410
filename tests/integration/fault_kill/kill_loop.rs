//! SIGKILL loop (test T1 of `docs/reliability.md`): the daemon is killed 100+ times at random
//! moments (timed from start, or just after a `window.updated` / `merge.started` line) while
//! checkpoints arrive. After every kill: only complete outputs under final names, an intact
//! `LATEST`, and temp dirs removed by the next start (promise 2). At the end: every output
//! byte-identical to an uninterrupted reference run, and no output ever replaced by different
//! content (promise 3). Once with the accumulators in RAM and saved at most every 300 ms,
//! once file-backed with the default `state.save_interval` (no save before a kill).
//! `PMAD_KILL_SEED=N` changes the seed.

use super::{
    add_by_rename, ckpt_name, compare_with_reference, config, copy_ckpt, failures, ms,
    reference_run, scan_out, stage_ckpts, state_tmps, OutCache, Recipe, Spec, TMP_PREFIX,
};
use crate::harness::{Daemon, TestEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const T1_RECIPES: [Recipe; 3] = [
    Recipe {
        name: "sma3",
        method: "sma",
        window: 3,
        alpha: 0.0,
    },
    Recipe {
        name: "wma3",
        method: "wma",
        window: 3,
        alpha: 0.0,
    },
    Recipe {
        name: "ema",
        method: "ema",
        window: 1,
        alpha: 0.3,
    },
];
/// Minimum number of SIGKILLs.
const T1_KILLS: u32 = 100;
/// At least one new checkpoint arrives every this many kills (16 over the first ~60).
const T1_ADD_EVERY: usize = 4;

#[test]
fn kill_loop_recovers() {
    kill_loop(None, T1_KILLS);
}

/// T1 with the accumulators file-backed (double-buffered generation files, saved by fsync
/// and named by the manifest): the same promises after every kill.
#[test]
fn kill_loop_recovers_file_backed() {
    kill_loop(Some("4KB"), T1_KILLS / 2);
}

/// The kill loop; `memory_budget` set (far below the sums' size) makes the accumulators
/// file-backed.
fn kill_loop(memory_budget: Option<&str>, want_kills: u32) {
    let file_backed = memory_budget.is_some();
    let t_start = Instant::now();
    let env = TestEnv::new();
    // 2 MiB of bf16 per checkpoint: in a debug build an emission takes a few hundred ms and
    // an accumulator save (16 MiB) tens of ms.
    let spec = Spec {
        tensors: 8,
        rows: 512,
        cols: 256,
    };
    let steps: Vec<u64> = (1..=16).map(|i| 100 * i).collect();
    let last = *steps.last().unwrap();
    let stage = env.mkdir("stage");
    stage_ckpts(&stage, &steps, spec);
    let t_ref = Instant::now();
    let reference = reference_run(&env, "ref", &stage, &steps, &T1_RECIPES, spec);
    let ref_took = t_ref.elapsed();

    let root = env.mkdir("kill");
    let watch = env.mkdir("kill/watch");
    let scratch = env.mkdir("kill/incoming");
    let logs = env.mkdir("kill/logs");
    let state = root.join("state");
    let out_root = root.join("out");
    let cfg = root.join("pmad.toml");
    let mut c = config(&watch, &out_root, Some(&state), &T1_RECIPES, "20s");
    match memory_budget {
        Some(m) => c = c.state("memory_budget", m),
        // Sums saved at most every 300 ms: kills land in saves, and between them, where a
        // restart reads again what was absorbed since the last save. (The file-backed run
        // keeps the default interval: after a kill, everything since the start is read again.)
        None => c = c.state("save_interval", "300ms"),
    }
    c.write(&cfg);
    // Every run of the loop logs to logs/run-NNN.*.log.
    let run = Daemon::builder(&cfg).cwd(&root).log_dir(&logs);

    let seed = std::env::var("PMAD_KILL_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x5EED_0001);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut problems: Vec<String> = Vec::new();
    let mut cache = OutCache::new();
    // (recipe, step) -> (dir inode, bytes) when first seen.
    let mut first_seen: BTreeMap<(String, u64), (u64, Vec<u8>)> = BTreeMap::new();
    let mut republished: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut republish_count = 0u32;
    // Temp entries seen after a kill, which the next start must sweep.
    let mut unswept: Vec<PathBuf> = Vec::new();
    let (mut kills, mut in_emission, mut in_save, mut latest_tmp) = (0u32, 0u32, 0u32, 0u32);
    let mut added = 0usize;
    let mut swept = 0u32;
    let mut last_event: BTreeMap<String, u32> = BTreeMap::new();
    let mut modes: BTreeMap<&str, u32> = BTreeMap::new();
    let t_loop = Instant::now();
    while kills < want_kills || added < steps.len() {
        if t_loop.elapsed() > Duration::from_secs(300) {
            problems.push(format!(
                "kill loop took too long: stopped after {kills} kills"
            ));
            break;
        }
        let i = kills as usize;
        // Keep pmad busy: a backlog of two unprocessed checkpoints (ema publishes last for
        // each checkpoint, so its LATEST tells how far pmad got), and at least one new
        // checkpoint every T1_ADD_EVERY kills.
        let processed = std::fs::read_to_string(out_root.join("ema/LATEST"))
            .ok()
            .and_then(|l| l.trim().strip_prefix("step-")?.parse::<u64>().ok())
            .and_then(|s| steps.iter().position(|x| *x == s))
            .map_or(0, |p| p + 1);
        let mut to_add = Vec::new();
        while added + to_add.len() < steps.len()
            && (added + to_add.len() < processed + 2
                || (to_add.is_empty() && i >= added * T1_ADD_EVERY))
        {
            to_add.push(steps[added + to_add.len()]);
        }
        // Even ones appear by rename before the start, odd ones are written in place under
        // their final name (marker last) while pmad runs.
        let (renamed, in_place): (Vec<u64>, Vec<u64>) = to_add
            .iter()
            .partition(|s| steps.iter().position(|x| x == *s).unwrap() % 2 == 0);
        for s in &renamed {
            add_by_rename(&stage, &scratch, &watch, *s);
        }
        let busy = processed < added + to_add.len();
        added += to_add.len();
        let mut d = run.clone().tag(&format!("run-{i:03}")).start();
        for s in &in_place {
            copy_ckpt(&stage.join(ckpt_name(*s)), &watch.join(ckpt_name(*s)));
        }
        let mode = rng.random_range(0..100u32);
        let r = rng.random_range(0..=1000u64);
        let mode = match mode {
            _ if !busy => {
                // Nothing to do: kill during start-up and restore.
                std::thread::sleep(Duration::from_millis(r * 150 / 1000));
                "idle: time 0-150ms"
            }
            0..30 => {
                std::thread::sleep(Duration::from_millis(r * 4 / 10));
                "time 0-400ms"
            }
            30..65 => {
                // The accumulator save follows window.updated at once.
                d.wait_until(Duration::from_millis(1000), |evs| {
                    evs.iter()
                        .any(|e| e.event() == "window.updated" && e.u("step").is_some())
                });
                std::thread::sleep(Duration::from_millis(r * 60 / 1000));
                "window.updated + 0-60ms"
            }
            _ => {
                d.wait_until(Duration::from_millis(1000), |evs| {
                    evs.iter().any(|e| e.event() == "merge.started")
                });
                std::thread::sleep(Duration::from_millis(r / 5));
                "merge.started + 0-200ms"
            }
        };
        d.kill9();
        kills += 1;
        *modes.entry(mode).or_default() += 1;
        let evs = d.log();
        let lastev = evs.last().map(|e| e.event().to_string());
        *last_event
            .entry(lastev.unwrap_or_else(|| "(nothing logged)".into()))
            .or_default() += 1;
        // In a save: a snapshot .tmp (RAM store), or a generation being written (file-backed:
        // more generation files than the persisted one and the current one).
        if !state_tmps(&state).is_empty() || pmad::math::accum::generations(&state).len() > 2 {
            in_save += 1;
        }
        let started = evs.iter().any(|e| e.event() == "daemon.started");
        if started {
            for p in unswept.drain(..) {
                swept += 1;
                if p.symlink_metadata().is_ok() {
                    problems.push(format!(
                        "kill {kills}: {} (left by an earlier crash) survived a restart that \
                         logged daemon.started",
                        p.display()
                    ));
                }
            }
        }
        let mut emission_tmp = false;
        for rec in &T1_RECIPES {
            let scan = scan_out(&out_root.join(rec.name), spec, &mut cache);
            for p in &scan.problems {
                problems.push(format!("kill {kills} ({mode}): {p}"));
            }
            for p in &scan.temps {
                if p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(TMP_PREFIX)
                {
                    emission_tmp = true;
                    unswept.push(p.clone());
                } else {
                    latest_tmp += 1;
                }
            }
            for p in compare_with_reference(rec.name, &scan, &reference) {
                problems.push(format!("kill {kills} ({mode}): {p}"));
            }
            for (step, (ino, bytes)) in scan.steps {
                let key = (rec.name.to_string(), step);
                match first_seen.get(&key) {
                    None => {
                        first_seen.insert(key, (ino, bytes));
                    }
                    Some((ino0, b0)) => {
                        if *b0 != bytes {
                            problems.push(format!(
                                "kill {kills}: {}/step-{step} was replaced by different content",
                                rec.name
                            ));
                        }
                        if *ino0 != ino {
                            republish_count += 1;
                            republished.insert(key.clone());
                            first_seen.insert(key, (ino, b0.clone()));
                        }
                    }
                }
            }
        }
        if emission_tmp {
            in_emission += 1;
        }
        if problems.len() > 30 {
            break;
        }
    }
    let loop_took = t_loop.elapsed();

    // Let pmad finish without being killed.
    let t_final = Instant::now();
    let mut d = run.tag("final").start();
    let caught_up = d.wait_until(Duration::from_secs(180), |_| {
        T1_RECIPES.iter().all(|r| {
            let od = out_root.join(r.name);
            std::fs::read_to_string(od.join("LATEST")).ok().as_deref()
                == Some(&format!("step-{last}\n"))
                && r.publishes(&steps)
                    .iter()
                    .all(|s| od.join(format!("step-{s}")).is_dir())
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let code = d.terminate(Duration::from_secs(30));
    let final_took = t_final.elapsed();
    if !caught_up {
        problems.push(format!(
            "the final run did not publish every step up to {last}\n{}",
            d.dump(25)
        ));
    }
    if code != Some(0) {
        problems.push(format!("final run: exit code {code:?}\n{}", d.dump(25)));
    }
    let fevs = d.log();
    if !fevs.iter().any(|e| e.event() == "shutdown.completed") {
        problems.push("final run: no shutdown.completed".into());
    }
    for f in failures(&fevs) {
        problems.push(format!("final run logged a failure: {}", f.short()));
    }
    for p in unswept.drain(..) {
        if p.symlink_metadata().is_ok() {
            problems.push(format!("{} survived the final run", p.display()));
        }
    }
    for rec in &T1_RECIPES {
        let scan = scan_out(&out_root.join(rec.name), spec, &mut cache);
        problems.extend(scan.problems.iter().map(|p| format!("final: {p}")));
        if !scan.temps.is_empty() {
            problems.push(format!("final: temp entries left: {:?}", scan.temps));
        }
        problems.extend(
            compare_with_reference(rec.name, &scan, &reference)
                .into_iter()
                .map(|p| format!("final: {p}")),
        );
        let got: Vec<u64> = scan.steps.keys().copied().collect();
        if got != rec.publishes(&steps) {
            problems.push(format!(
                "final: {} holds steps {got:?}, the reference run published {:?}",
                rec.name,
                rec.publishes(&steps)
            ));
        }
        if scan.latest.as_deref() != Some(&format!("step-{last}\n")) {
            problems.push(format!("final: {}/LATEST = {:?}", rec.name, scan.latest));
        }
        for (step, (ino, bytes)) in &scan.steps {
            if let Some((ino0, b0)) = first_seen.get(&(rec.name.to_string(), *step)) {
                if b0 != bytes {
                    problems.push(format!(
                        "final: {}/step-{step} was replaced by different content",
                        rec.name
                    ));
                }
                if ino0 != ino {
                    republish_count += 1;
                    republished.insert((rec.name.to_string(), *step));
                }
            }
        }
    }
    let leftovers = state_tmps(&state);
    if !leftovers.is_empty() {
        problems.push(format!("final: state.dir holds {leftovers:?}"));
    }

    let summary = format!(
        "T1 kill loop (seed {seed:#x}): {kills} SIGKILLs, {in_emission} while an emission temp \
         dir existed (in-emission), {in_save} while a state *.tmp existed (in-save), {latest_tmp} \
         with LATEST.tmp present; {swept} crash temp dir(s) checked gone after the next start; \
         {republish_count} re-publication(s) of an existing step \
         (same content) {republished:?}\n  kill timing modes: {modes:?}\n  last event logged \
         before the kill: {last_event:?}\n  runtime: reference {}, kill loop {}, final {}, \
         total {}",
        ms(ref_took),
        ms(loop_took),
        ms(final_took),
        ms(t_start.elapsed())
    );
    if problems.is_empty() {
        eprintln!("{summary}");
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}\n\n{summary}",
        problems.len(),
        problems.join("\n")
    );
    assert!(kills >= want_kills, "{summary}");
    assert!(
        in_emission > 0,
        "no kill landed during an emission\n{summary}"
    );
    if !file_backed {
        assert!(in_save > 0, "no kill landed during a state save\n{summary}");
    }
}
