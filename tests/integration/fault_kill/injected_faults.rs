//! Injected I/O failures (test T2 of `docs/reliability.md`): `PMAD_FAULT=op:N` fails the
//! N-th create, write, fsync, rename or mkdir with EIO, for every op and N up to
//! [`T2_MAX_N`] (the first state save and the first emissions), then pmad restarts without
//! the fault and one more checkpoint arrives; the same fault points in `pmad merge`. A fault
//! aimed at the accumulator file of a later save must still let a restart resume exactly.

use super::{
    add_by_rename, ckpt_name, compare_with_reference, config, copy_ckpt, emission_ended, emitted,
    failures, ms, recipe_of, reference_run, scan_out, stage_ckpts, state_tmps, OutCache, OutScan,
    Recipe, RefOutputs, Spec,
};
use crate::harness::{self, list_dir, pmad_cmd, Daemon, Event, TestEnv};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const T2_RECIPES: [Recipe; 2] = [
    Recipe {
        name: "sma2",
        method: "sma",
        window: 2,
        alpha: 0.0,
    },
    Recipe {
        name: "ema",
        method: "ema",
        window: 1,
        alpha: 0.3,
    },
];
const OPS: [&str; 5] = ["create", "write", "fsync", "rename", "mkdir"];
/// Fault points tried per op (the first state save and the first two checkpoints' emissions
/// fit in 12 calls of every op); an op stops earlier after two runs the fault did not hit.
const T2_MAX_N: u64 = 12;
const T2_SPEC: Spec = Spec {
    tensors: 3,
    rows: 32,
    cols: 256,
};
const T2_STEPS: [u64; 4] = [100, 200, 300, 400];

/// What one fault run showed.
#[derive(Debug, Default)]
struct Case {
    /// The failure line the fault produced (None: the fault was not hit).
    hit: Option<String>,
    problems: Vec<String>,
    notes: Vec<String>,
}

/// Run pmad until every recipe ended its emission of `step` (emitted or failed), then SIGTERM.
/// Returns the events; problems are appended.
fn run_until_step(
    root: &Path,
    cfg: &Path,
    log: &str,
    fault: Option<&str>,
    step: u64,
    problems: &mut Vec<String>,
) -> Vec<Event> {
    let what = format!("{} run", fault.unwrap_or("clean"));
    let mut d = Daemon::builder(cfg).cwd(root).tag(log).fault(fault).start();
    let done = d.wait_until(Duration::from_secs(40), |evs| {
        T2_RECIPES.iter().all(|r| emission_ended(evs, r.name, step))
    });
    if !done {
        problems.push(format!(
            "{what}: step {step} was not processed by every recipe\n{}",
            d.dump(25)
        ));
    }
    let code = d.terminate(Duration::from_secs(20));
    if code != Some(0) {
        problems.push(format!(
            "{what}: exit code {code:?} after SIGTERM (want 0)\n{}",
            d.dump(25)
        ));
    }
    let evs = d.log();
    if !evs.iter().any(|e| e.event() == "shutdown.completed") {
        problems.push(format!("{what}: no shutdown.completed\n{}", d.dump(25)));
    }
    evs
}

/// Promise 2 after a clean shutdown, plus equality with the reference outputs.
fn check_outputs(
    when: &str,
    out_root: &Path,
    state: &Path,
    reference: &RefOutputs,
    problems: &mut Vec<String>,
) -> BTreeMap<String, OutScan> {
    let mut cache = OutCache::new();
    let mut scans = BTreeMap::new();
    for r in &T2_RECIPES {
        let scan = scan_out(&out_root.join(r.name), T2_SPEC, &mut cache);
        problems.extend(scan.problems.iter().map(|p| format!("{when}: {p}")));
        if !scan.temps.is_empty() {
            problems.push(format!(
                "{when}: temp entries left after a clean shutdown: {:?}",
                scan.temps
            ));
        }
        problems.extend(
            compare_with_reference(r.name, &scan, reference)
                .into_iter()
                .map(|p| format!("{when}: {p}")),
        );
        scans.insert(r.name.to_string(), scan);
    }
    let t = state_tmps(state);
    if !t.is_empty() {
        problems.push(format!(
            "{when}: state.dir holds {t:?} after a clean shutdown"
        ));
    }
    scans
}

fn fault_case(env: &TestEnv, stage: &Path, reference: &RefOutputs, op: &str, n: u64) -> Case {
    let mut c = Case::default();
    let fault = format!("{op}:{n}");
    let root = env.mkdir(format!("t2/{op}-{n}"));
    let watch = root.join("watch");
    for s in &T2_STEPS[..3] {
        copy_ckpt(&stage.join(ckpt_name(*s)), &watch.join(ckpt_name(*s)));
    }
    let out_root = root.join("out");
    let state = root.join("state");
    let cfg = root.join("pmad.toml");
    config(&watch, &out_root, Some(&state), &T2_RECIPES, "10s").write(&cfg);

    // 1. With the fault, on checkpoints 100..300.
    let mut problems = Vec::new();
    let evs = run_until_step(&root, &cfg, "fault", Some(&fault), 300, &mut problems);
    let fails = failures(&evs);
    for f in &fails {
        let err = f.s("error").unwrap_or("");
        if f.u("errno") != Some(5) || f.s("reason") != Some("io") {
            problems.push(format!(
                "failure line without errno 5 / reason io: {}",
                f.short()
            ));
        }
        if !err.contains(op) || !err.contains('/') {
            problems.push(format!(
                "failure line does not name the {op} and its path: {}",
                f.short()
            ));
        }
    }
    if fails.len() > 1 {
        problems.push(format!(
            "one injected fault, {} failure lines:\n{}",
            fails.len(),
            fails
                .iter()
                .map(|f| f.short())
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    c.hit = fails.first().map(|f| f.short());
    let scans = check_outputs(
        "after the fault run",
        &out_root,
        &state,
        reference,
        &mut problems,
    );
    for f in fails.iter().filter(|f| f.event() == "merge.failed") {
        let (r, s) = (recipe_of(f), f.u("step").unwrap_or(0));
        // Never retried within the run: the failed emission is not also reported emitted.
        if emitted(&evs, r, s) {
            problems.push(format!(
                "{r} step {s}: merge.failed and merge.emitted in the same run (retried?)"
            ));
        }
        if scans.get(r).is_some_and(|sc| sc.steps.contains_key(&s)) {
            let latest = scans.get(r).and_then(|sc| sc.latest.clone());
            c.notes.push(format!(
                "{r}/step-{s} is published (complete) although its emission was reported \
                 failed; LATEST = {latest:?}; failure: {}",
                f.short()
            ));
        }
    }
    if c.hit.is_none() {
        // Not hit: everything must have been published.
        for r in &T2_RECIPES {
            let want = r.publishes(&T2_STEPS[..3]);
            let got: Vec<u64> = scans[r.name].steps.keys().copied().collect();
            if got != want {
                problems.push(format!(
                    "no failure was logged, yet {} published {got:?} (want {want:?})",
                    r.name
                ));
            }
        }
    }
    c.problems
        .extend(problems.into_iter().map(|p| format!("[{fault}] {p}")));

    // 2. Restart without the fault; one more checkpoint arrives.
    let mut problems = Vec::new();
    add_by_rename(stage, &root, &watch, 400);
    let evs = run_until_step(&root, &cfg, "restart", None, 400, &mut problems);
    for f in failures(&evs) {
        problems.push(format!("restart without the fault logged: {}", f.short()));
    }
    let scans = check_outputs(
        "after the restart",
        &out_root,
        &state,
        reference,
        &mut problems,
    );
    for r in &T2_RECIPES {
        if !scans[r.name].steps.contains_key(&400) {
            problems.push(format!("after the restart: {}/step-400 missing", r.name));
        }
        let latest = scans[r.name].latest.as_deref();
        if latest != Some("step-400\n") {
            problems.push(format!("after the restart: {}/LATEST = {latest:?}", r.name));
        }
    }
    c.problems.extend(
        problems
            .into_iter()
            .map(|p| format!("[{fault}, then restarted] {p}")),
    );
    c
}

#[test]
fn injected_failures_never_publish_garbage() {
    let t_start = Instant::now();
    let env = TestEnv::new();
    let stage = env.mkdir("stage");
    stage_ckpts(&stage, &T2_STEPS, T2_SPEC);
    let reference = reference_run(&env, "ref", &stage, &T2_STEPS, &T2_RECIPES, T2_SPEC);

    // One thread per op; within an op, N = 1, 2, ... until two runs in a row miss.
    let results: Vec<(&str, u64, Case)> = std::thread::scope(|s| {
        let handles: Vec<_> = OPS
            .iter()
            .map(|op| {
                let (env, stage, reference) = (&env, &stage, &reference);
                s.spawn(move || {
                    let mut v = Vec::new();
                    let mut misses = 0;
                    for n in 1..=T2_MAX_N {
                        let c = fault_case(env, stage, reference, op, n);
                        misses = if c.hit.is_some() { 0 } else { misses + 1 };
                        v.push((*op, n, c));
                        if misses >= 2 {
                            break;
                        }
                    }
                    v
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("fault thread panicked"))
            .collect()
    });
    let mut problems = Vec::new();
    let mut table = Vec::new();
    let mut notes = Vec::new();
    for op in OPS {
        let mine: Vec<&(&str, u64, Case)> = results.iter().filter(|r| r.0 == op).collect();
        // A fault at N not reported while a later one is: a failure was swallowed (a retried
        // fsync, an ignored error).
        let mut missed: Option<u64> = None;
        for (_, n, c) in &mine {
            match (&c.hit, missed) {
                (None, None) => missed = Some(*n),
                (Some(h), Some(m)) => problems.push(format!(
                    "{op}:{m} produced no failure line, but {op}:{n} did ({h}): the fault at \
                     {op}:{m} was swallowed"
                )),
                _ => {}
            }
            table.push(format!(
                "  {op}:{n}: {}",
                c.hit.as_deref().unwrap_or("not hit (run completed)")
            ));
            problems.extend(c.problems.iter().cloned());
            notes.extend(c.notes.iter().map(|x| format!("{op}:{n}: {x}")));
        }
        if mine.iter().all(|(_, _, c)| c.hit.is_none()) {
            problems.push(format!("no {op} fault was ever hit"));
        }
    }
    let daemon_took = t_start.elapsed();

    // pmad merge with the same fault points.
    let merge_problems = merge_cli_faults(&env, &stage);
    problems.extend(merge_problems.0);
    let summary = format!(
        "T2 fault points (daemon):\n{}\nNotes (not failures):\n{}\nT2 merge CLI: {}\nruntime: \
         daemon cases {}, total {}",
        table.join("\n"),
        if notes.is_empty() {
            "  -".to_string()
        } else {
            notes.join("\n")
        },
        merge_problems.1,
        ms(daemon_took),
        ms(t_start.elapsed())
    );
    if problems.is_empty() {
        eprintln!("{summary}");
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}\n\n{summary}",
        problems.len(),
        problems.join("\n\n")
    );
}

/// `pmad merge` with `PMAD_FAULT=op:N`, N = 1..=8: exit 1 naming the path and leaving nothing
/// in the --out parent, or (fault not reached) a complete output equal to the clean merge.
fn merge_cli_faults(env: &TestEnv, stage: &Path) -> (Vec<String>, String) {
    let inputs = [stage.join(ckpt_name(100)), stage.join(ckpt_name(200))];
    let merge = |parent: &Path, fault: Option<&str>| {
        let mut cmd = pmad_cmd(env.path());
        cmd.args(["merge", "--method", "sma", "--out"])
            .arg(parent.join("out"))
            .args(&inputs);
        if let Some(f) = fault {
            cmd.env("PMAD_FAULT", f);
        }
        harness::run(&mut cmd)
    };
    let clean_parent = env.mkdir("t2m/clean");
    merge(&clean_parent, None).expect_ok();
    let clean = std::fs::read(clean_parent.join("out/model.safetensors")).expect("clean merge");
    let mut problems = Vec::new();
    let mut hits = BTreeMap::<&str, Vec<u64>>::new();
    for op in OPS {
        for n in 1..=8u64 {
            let fault = format!("{op}:{n}");
            let parent = env.mkdir(format!("t2m/{op}-{n}"));
            let r = merge(&parent, Some(&fault));
            match r.code {
                0 => {
                    let got = std::fs::read(parent.join("out/model.safetensors")).ok();
                    if got.as_deref() != Some(&clean[..]) {
                        problems.push(format!(
                            "merge [{fault}]: exit 0 but the output differs from a clean merge"
                        ));
                    }
                    if list_dir(&parent) != ["out"] {
                        problems.push(format!(
                            "merge [{fault}]: exit 0, parent holds {:?}",
                            list_dir(&parent)
                        ));
                    }
                }
                1 => {
                    hits.entry(op).or_default().push(n);
                    let p = parent.display().to_string();
                    if !r.stderr.contains(&p) || !r.stderr.contains("os error 5") {
                        problems.push(format!(
                            "merge [{fault}]: the message does not name the path and the error\n{}",
                            r.describe()
                        ));
                    }
                    let left = list_dir(&parent);
                    if !left.is_empty() {
                        problems.push(format!(
                            "merge [{fault}]: exit 1 but the --out parent holds {left:?}\n{}",
                            r.stderr.trim()
                        ));
                    }
                }
                _ => problems.push(format!(
                    "merge [{fault}]: exit {}\n{}",
                    r.code,
                    r.describe()
                )),
            }
        }
    }
    (problems, format!("exit 1 at {hits:?}"))
}

/// A fault in the accumulator file of a save (`PMAD_FAULT=op:1:acc-`: the first operation on
/// an `acc-*` path, i.e. the snapshot after the checkpoint the restarted process accepts),
/// followed by successful emissions and manifest-only saves, then a restart and one more
/// checkpoint: the resumed averages must still equal an uninterrupted run's (promise 3).
#[test]
fn failed_accumulator_save_keeps_resume_exact() {
    let env = TestEnv::new();
    let stage = env.mkdir("stage");
    stage_ckpts(&stage, &T2_STEPS, T2_SPEC);
    let reference = reference_run(&env, "ref", &stage, &T2_STEPS, &T2_RECIPES, T2_SPEC);
    let results: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = ["create", "write", "fsync", "rename"]
            .iter()
            .map(|op| {
                let (env, stage, reference) = (&env, &stage, &reference);
                s.spawn(move || {
                    let mut problems = Vec::new();
                    let root = env.mkdir(format!("acc/{op}"));
                    let watch = root.join("watch");
                    for st in [100, 200] {
                        copy_ckpt(&stage.join(ckpt_name(st)), &watch.join(ckpt_name(st)));
                    }
                    let (out_root, state) = (root.join("out"), root.join("state"));
                    let cfg = root.join("pmad.toml");
                    config(&watch, &out_root, Some(&state), &T2_RECIPES, "10s").write(&cfg);
                    run_until_step(&root, &cfg, "a", None, 200, &mut problems);
                    add_by_rename(stage, &root, &watch, 300);
                    let fault = format!("{op}:1:acc-");
                    let evs = run_until_step(&root, &cfg, "b", Some(&fault), 300, &mut problems);
                    let fails = failures(&evs);
                    let acc_hit = fails.len() == 1
                        && fails[0].event() == "state.saved"
                        && fails[0].s("error").is_some_and(|e| e.contains("acc-"));
                    if !acc_hit {
                        problems.push(format!(
                            "[{fault}] expected one state.saved ok=false on the accumulator \
                             file, got {:?}",
                            fails.iter().map(|f| f.short()).collect::<Vec<_>>()
                        ));
                    }
                    check_outputs(
                        "after the fault run",
                        &out_root,
                        &state,
                        reference,
                        &mut problems,
                    );
                    add_by_rename(stage, &root, &watch, 400);
                    let evs = run_until_step(&root, &cfg, "c", None, 400, &mut problems);
                    let restored: Vec<String> = evs
                        .iter()
                        .filter(|e| e.event() == "state.restored")
                        .map(Event::short)
                        .collect();
                    let scans = check_outputs(
                        "after the restart",
                        &out_root,
                        &state,
                        reference,
                        &mut problems,
                    );
                    for r in &T2_RECIPES {
                        if !scans[r.name].steps.contains_key(&400) {
                            problems
                                .push(format!("after the restart: {}/step-400 missing", r.name));
                        }
                    }
                    problems
                        .into_iter()
                        .map(|p| {
                            format!(
                                "[{fault} on the save of step 300] {p}\n  restart: {restored:?}"
                            )
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let problems: Vec<String> = results.into_iter().flatten().collect();
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
