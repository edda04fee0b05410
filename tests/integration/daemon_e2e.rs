//! End-to-end tests of `pmad run`: the real binary watches a temp directory while a producer
//! thread in the test writes HF-Trainer-like checkpoints slowly, in place, rotates them like
//! `save_total_limit = 4`, and once restarts training from an earlier step (rewriting
//! checkpoints in place with different data). Every published output is then checked against
//! the independent float64 oracle (`tests/py/oracle.py`) on pristine copies of exactly the
//! checkpoint versions its merge.json lists. Also checked: only complete checkpoints are
//! accepted, a rewrite is seen as `source.changed`, one `merge.emitted` per output, `LATEST`
//! always names a complete output, no temp dir is left, rotated checkpoints are not held
//! open, the watched directory keeps exactly what the producer wrote, and SIGTERM ends the
//! daemon cleanly (promises 1, 4 and 5 of `docs/reliability.md`).
//!
//! Set `PMAD_TEST_KEEP=1` to keep a failing test's temp directory.

use crate::harness::{
    list_dir, ms_since, py_script_batch_parallel, s, step_of, step_span, wait_for_event, Config,
    Daemon, Event, Recipe, Run, TestEnv,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Bytes per in-place write of the producer.
const CHUNK: usize = 2048;
/// Pause after every chunk (well below `settle`: the writer is visibly busy).
const PAUSE: Duration = Duration::from_millis(20);
/// "Training time" between two checkpoints.
const GAP: Duration = Duration::from_millis(400);
/// Checkpoints the producer keeps (HF `save_total_limit`).
const SAVE_TOTAL_LIMIT: usize = 4;
const POLL_INTERVAL: &str = "200ms";
const SETTLE: &str = "300ms";
const EMA_ALPHA: f64 = 0.3;
/// Files of a fixture checkpoint (`fixtures.py make --sharded 2`), in the order the HF
/// Trainer writes them: config first, weights shard by shard, the index after the shards,
/// tokenizer/training files, optimizer, and trainer_state.json last.
const FILE_ORDER: [&str; 8] = [
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer_config.json",
    "training_args.bin",
    "optimizer.pt",
    "trainer_state.json",
];

/// The recipes of the daemon under test.
struct RecipeSpec {
    name: &'static str,
    method: &'static str,
    window: usize,
}
const RECIPES: [RecipeSpec; 3] = [
    RecipeSpec {
        name: "sma3",
        method: "sma",
        window: 3,
    },
    RecipeSpec {
        name: "wma3",
        method: "wma",
        window: 3,
    },
    RecipeSpec {
        name: "ema",
        method: "ema",
        window: 1,
    },
];

// ------------------------------------------------------------------------------- helpers

/// One version of one checkpoint: what the producer writes into `checkpoint-<step>/`.
/// `gen` 0 is the original run; `gen` 1 the run restarted from an earlier step, which
/// rewrites some steps with different data (another seed).
#[derive(Debug, Clone)]
struct Version {
    step: u64,
    gen: u32,
    seed: u32,
    /// Pristine copy outside the watch dir (the oracle reads this).
    pristine: PathBuf,
    /// File name -> bytes, in FILE_ORDER.
    files: Vec<(String, Vec<u8>)>,
}

/// What the producer did and when (wall clock, comparable with pmad's log timestamps).
#[derive(Debug, Default)]
struct Timeline {
    /// (step, gen) -> (first byte written, trainer_state.json closed).
    written: BTreeMap<(u64, u32), (SystemTime, SystemTime)>,
    /// step -> when its directory removal started (rotation).
    deleted: BTreeMap<u64, SystemTime>,
    /// Problems the producer ran into (reported as failures).
    notes: Vec<String>,
}

/// Write `bytes` to `path` in place like a trainer: open (create/truncate) the final name and
/// write it in chunks, pausing after each.
fn write_slowly(path: &Path, bytes: &[u8]) {
    let mut f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    if bytes.is_empty() {
        std::thread::sleep(PAUSE);
    }
    for chunk in bytes.chunks(CHUNK) {
        f.write_all(chunk)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        f.flush().expect("flush");
        std::thread::sleep(PAUSE);
    }
}

/// The producer's plan.
enum Action {
    /// Write version i (in place).
    Write(usize),
    /// Wait (up to 20 s) until pmad logs `checkpoint.accepted` for this step.
    WaitAccepted(u64),
}

fn producer(
    watch: PathBuf,
    log: PathBuf,
    versions: Arc<Vec<Version>>,
    actions: Vec<Action>,
    tl: Arc<Mutex<Timeline>>,
    slow_delete: bool,
) {
    for a in actions {
        match a {
            Action::WaitAccepted(step) => {
                let got = wait_for_event(&log, Duration::from_secs(20), |e| {
                    e.is("checkpoint.accepted", step)
                });
                if got.is_none() {
                    tl.lock().unwrap().notes.push(format!(
                        "producer: pmad did not accept step {step} within 20 s; restarting anyway"
                    ));
                }
            }
            Action::Write(i) => {
                let v = &versions[i];
                let dir = watch.join(format!("checkpoint-{}", v.step));
                let start = SystemTime::now();
                std::fs::create_dir_all(&dir).expect("create checkpoint dir");
                for (name, bytes) in &v.files {
                    write_slowly(&dir.join(name), bytes);
                }
                let end = SystemTime::now();
                tl.lock()
                    .unwrap()
                    .written
                    .insert((v.step, v.gen), (start, end));
                // save_total_limit: remove the oldest checkpoints beyond the limit.
                let mut present: Vec<u64> = list_dir(&watch)
                    .iter()
                    .filter_map(|n| step_of(n, "checkpoint-"))
                    .collect();
                present.sort();
                while present.len() > SAVE_TOTAL_LIMIT {
                    let old = present.remove(0);
                    tl.lock().unwrap().deleted.insert(old, SystemTime::now());
                    let dir = watch.join(format!("checkpoint-{old}"));
                    if slow_delete {
                        // Like shutil.rmtree of a big checkpoint (or on a network
                        // filesystem): one file at a time, taking a while.
                        for e in std::fs::read_dir(&dir)
                            .expect("list old checkpoint")
                            .flatten()
                        {
                            std::fs::remove_file(e.path()).expect("remove old file");
                            std::thread::sleep(PAUSE);
                        }
                        std::fs::remove_dir(&dir).expect("remove old checkpoint dir");
                    } else {
                        std::fs::remove_dir_all(&dir).expect("rotate old checkpoint");
                    }
                }
                std::thread::sleep(GAP);
            }
        }
    }
}

/// Quick check that a published output looks complete (for the LATEST poller).
fn quick_complete(dir: &Path) -> Result<(), String> {
    let mj = dir.join("merge.json");
    let bytes = std::fs::read(&mj).map_err(|e| format!("{}: {e}", mj.display()))?;
    serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("{}: {e}", mj.display()))?;
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_slice(
            &std::fs::read(&index).map_err(|e| format!("{}: {e}", index.display()))?,
        )
        .map_err(|e| format!("{}: {e}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{}: no weight_map", index.display()))?;
        for f in map.values().filter_map(|x| x.as_str()) {
            if !dir.join(f).is_file() {
                return Err(format!("{}: shard {f} missing", dir.display()));
            }
        }
        Ok(())
    } else if dir.join("model.safetensors").is_file() {
        Ok(())
    } else {
        Err(format!(
            "{}: neither model.safetensors nor an index",
            dir.display()
        ))
    }
}

/// Poll every out_dir's LATEST every ~20 ms until `stop`; every name read must be a complete
/// output. Returns (reads, distinct names seen, violations).
fn latest_poller(
    out_dirs: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
) -> (usize, BTreeSet<String>, Vec<String>) {
    let mut reads = 0;
    let mut seen = BTreeSet::new();
    let mut bad = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for d in &out_dirs {
            let Ok(text) = std::fs::read_to_string(d.join("LATEST")) else {
                continue;
            };
            reads += 1;
            let name = text.trim();
            if name.is_empty() || name.contains('/') || !name.starts_with("step-") {
                bad.push(format!("{}/LATEST reads {text:?}", d.display()));
                continue;
            }
            seen.insert(format!("{}/{name}", d.display()));
            if let Err(e) = quick_complete(&d.join(name)) {
                bad.push(format!(
                    "{}/LATEST names {name}, which is not a complete output: {e}",
                    d.display()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (reads, seen, bad)
}

/// Full validity check of a published output with the reference safetensors crate; returns
/// its merge.json.
fn validate_output(dir: &Path) -> Result<Value, String> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let v: Value = serde_json::from_slice(&std::fs::read(&index).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", index.display()))?;
        let mut f: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or("index without weight_map")?
            .values()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        f.sort();
        f.dedup();
        f.iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| format!("{}: reference reader: {e:?}", f.display()))?;
        if st.is_empty() {
            return Err(format!("{}: no tensors", f.display()));
        }
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| format!("{}: {e:?}", f.display()))?;
        let fmt = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned());
        if fmt.as_deref() != Some("pt") {
            return Err(format!(
                "{}: __metadata__.format is {fmt:?}, not \"pt\"",
                f.display()
            ));
        }
    }
    let mj = dir.join("merge.json");
    serde_json::from_slice(&std::fs::read(&mj).map_err(|e| format!("{}: {e}", mj.display()))?)
        .map_err(|e| format!("{}: {e}", mj.display()))
}

/// Files of pmad's process that live under `watch` and were deleted (fds and mappings).
fn deleted_watch_files(pid: u32, watch: &Path) -> BTreeSet<String> {
    let watch = std::fs::canonicalize(watch).unwrap_or_else(|_| watch.to_path_buf());
    let w = s(&watch);
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy().into_owned();
                if t.starts_with(&w) && t.ends_with("(deleted)") {
                    out.insert(format!("fd {t}"));
                }
            }
        }
    }
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        for line in maps.lines() {
            if let Some(i) = line.find(&w) {
                let path = &line[i..];
                if path.ends_with("(deleted)") {
                    out.insert(format!("map {path}"));
                }
            }
        }
    }
    out
}

/// Check that every file under `dir` is exactly what `expected` says (relative name -> bytes),
/// with nothing extra.
fn compare_tree(dir: &Path, expected: &BTreeMap<String, Vec<u8>>, what: &str) -> Vec<String> {
    let mut fails = Vec::new();
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            found.insert(rel.clone());
            match expected.get(&rel) {
                None => fails.push(format!("{what}: unexpected file {}", p.display())),
                Some(want) => {
                    let got = std::fs::read(&p).unwrap_or_default();
                    if &got != want {
                        fails.push(format!(
                            "{what}: {} differs from what the producer wrote ({} bytes, expected {})",
                            p.display(),
                            got.len(),
                            want.len()
                        ));
                    }
                }
            }
        }
    }
    for rel in expected.keys() {
        if !found.contains(rel) {
            fails.push(format!("{what}: {rel} is missing"));
        }
    }
    fails
}

// ------------------------------------------------------------------------------ scenario

struct Scenario {
    name: &'static str,
    dtype: &'static str,
    /// fixtures.py edge values (subnormals, ties, values near max/2).
    edge: bool,
    /// Original run: steps 100, 200, ..., gen0_last.
    gen0_last: u64,
    /// Restart: after gen0_last is accepted, rewrite from `.0` (in place, new data) and go on
    /// to `.1`.
    restart: Option<(u64, u64)>,
    /// Rotation deletes the old checkpoint's files one by one with pauses (instead of an
    /// instant `rm -rf`).
    slow_delete: bool,
}

fn write_config(env: &TestEnv, watch: &Path, out_root: &Path) -> PathBuf {
    let mut c = Config::new(watch)
        .hf_auto()
        .poll(POLL_INTERVAL)
        .settle(SETTLE)
        .phase("lr_from_trainer_state", true)
        .phase("lr_tolerance", 0.01)
        .state("accumulator", "f32");
    for r in &RECIPES {
        c = c.recipe(Recipe::sized(r.name, r.method, r.window, EMA_ALPHA).all_outputs(out_root));
    }
    c.no_server()
        .json_log("info")
        .grace("5s")
        .write(&env.join("pmad.toml"))
}

/// Generate every version's pristine copy with fixtures.py (one python process per core).
fn generate(env: &TestEnv, versions: &mut [Version], dtype: &str, edge: bool) {
    let argvs: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            let mut a: Vec<String> = [
                "make",
                "--out",
                &s(&v.pristine),
                "--dtype",
                dtype,
                "--seed",
                &v.seed.to_string(),
                "--step",
                &v.step.to_string(),
                "--sharded",
                "2",
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            if !edge {
                a.push("--no-edge".into());
            }
            a
        })
        .collect();
    let runs = py_script_batch_parallel("fixtures.py", env.path(), &argvs, 2);
    for (r, v) in runs.iter().zip(versions.iter_mut()) {
        r.expect_ok();
        let names = list_dir(&v.pristine);
        let mut want: Vec<String> = FILE_ORDER.iter().map(|x| x.to_string()).collect();
        want.sort();
        assert_eq!(
            names,
            want,
            "fixtures.py wrote unexpected files into {}",
            v.pristine.display()
        );
        // fixtures.py logs only the last few steps; the HF Trainer's log_history holds the
        // whole run (pmad's plateau test looks back to the previous checkpoint's step).
        std::fs::write(v.pristine.join("trainer_state.json"), trainer_state(v.step))
            .expect("write trainer_state.json");
        v.files = FILE_ORDER
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    std::fs::read(v.pristine.join(n)).expect("read pristine"),
                )
            })
            .collect();
    }
}

/// An HF `trainer_state.json` for `step`: the whole log history (every 10 steps) at a
/// constant learning rate.
fn trainer_state(step: u64) -> Vec<u8> {
    let hist: Vec<Value> = (10..=step)
        .step_by(10)
        .map(|s| {
            serde_json::json!({
                "epoch": s as f64 / 1000.0,
                "grad_norm": 0.4,
                "learning_rate": 0.003,
                "loss": 2.0 - s as f64 * 1e-4,
                "step": s,
            })
        })
        .collect();
    let v = serde_json::json!({
        "best_metric": null,
        "epoch": step as f64 / 1000.0,
        "global_step": step,
        "log_history": hist,
        "logging_steps": 10,
        "max_steps": 100000,
        "num_input_tokens_seen": step * 4096,
        "save_steps": 100,
    });
    let mut b = serde_json::to_vec_pretty(&v).unwrap();
    b.push(b'\n');
    b
}

/// One oracle invocation planned for an output.
struct OracleJob {
    /// Index into `outputs`.
    out: usize,
    /// Index into the output's candidates.
    cand: usize,
    /// "ema" / "weights" / "sma" / "wma".
    kind: String,
    argv: Vec<String>,
}

/// One published output and what we know about it.
struct Output {
    recipe: &'static RecipeSpec,
    dir: PathBuf,
    step: u64,
    steps: Vec<u64>,
    weights: Vec<f64>,
    /// When its last merge.emitted was logged.
    emitted_at: Option<SystemTime>,
    /// Which generation its data must be from, judged by time (None: either).
    expected_gen: Option<u32>,
    /// Consistent version assignments: (generations giving it, versions oldest first).
    candidates: Vec<(Vec<u32>, Vec<usize>)>,
}

fn oracle_argv(rec: &RecipeSpec, out: &Output, ckpts: &[PathBuf], kind: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["check".into(), "--method".into()];
    match kind {
        "weights" => {
            a.push("weights".into());
            a.push("--weights".into());
            a.push(
                out.weights
                    .iter()
                    .map(|w| format!("{w:?}"))
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        "ema" => {
            a.push("ema".into());
            a.push("--alpha".into());
            a.push(format!("{EMA_ALPHA}"));
        }
        m => {
            assert_eq!(m, rec.method);
            a.push(m.into());
        }
    }
    a.push("--dtype".into());
    a.push("source".into());
    // The daemon's outputs come from running sums: where inputs cancel, allow the f32 sum's
    // absolute rounding bound (README "Merge semantics").
    a.push("--accumulator-tolerance".into());
    a.push("f32".into());
    a.push(s(&out.dir));
    a.extend(ckpts.iter().map(|p| s(p)));
    a
}

/// Parse an oracle element mismatch line:
/// `oracle: MISMATCH NAME[i, j]: got G, expected E (float64 mean M; inputs [X1, X2, ...])`.
fn parse_element_mismatch(line: &str) -> Option<(f64, f64, Vec<f64>)> {
    let rest = line.strip_prefix("oracle: MISMATCH ")?;
    let g = rest.split_once(": got ")?.1;
    let (got, rest) = g.split_once(", expected ")?;
    let (_, rest) = rest.split_once(" (float64 mean ")?;
    let (mean, rest) = rest.split_once("; inputs [")?;
    let inputs = rest.strip_suffix("])")?;
    let xs: Option<Vec<f64>> = inputs
        .split(',')
        .map(|x| x.trim().parse::<f64>().ok())
        .collect();
    Some((got.parse().ok()?, mean.parse().ok()?, xs?))
}

/// An element mismatch that is an artefact of the oracle itself: its "float64 mean" is
/// computed as sum(w_i * x_i) with inexact weights (1/3, ...), so where the inputs cancel
/// exactly it is float64 rounding noise (e.g. 2.7e-20 for inputs of 1e-3 whose exact sum is
/// 0), and the 1-ulp bf16/f16 test then rejects pmad's exact 0. Accept an element only when
/// pmad's value lies within the oracle's own float64 error bound of its mean.
fn oracle_artefact(line: &str) -> bool {
    let Some((got, mean, xs)) = parse_element_mismatch(line) else {
        return false;
    };
    if !(got.is_finite() && mean.is_finite()) || xs.is_empty() {
        return false;
    }
    let scale = xs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let bound = 8.0 * xs.len() as f64 * f64::EPSILON * scale;
    (got - mean).abs() <= bound
}

/// Did an oracle run pass? Ignored mismatch lines: for `--method weights` on an EMA output
/// the merge.json check necessarily says "method 'ema', expected 'weights'"; and element
/// mismatches that are oracle rounding artefacts ([`oracle_artefact`], counted in
/// `artefacts`). A run whose mismatches were cut short ("... more", "in all") never passes.
fn oracle_passed(kind: &str, r: &Run, artefacts: &mut Vec<String>) -> bool {
    if r.code == 0 {
        return true;
    }
    if r.code != 1 {
        return false;
    }
    let lines: Vec<&str> = r.stdout.lines().collect();
    if lines
        .iter()
        .any(|l| l.starts_with("oracle: ...") || l.contains("mismatching elements in all"))
    {
        return false;
    }
    let mism: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("oracle: MISMATCH"))
        .collect();
    if mism.is_empty() {
        return false;
    }
    let mut found = Vec::new();
    for l in &mism {
        if kind == "weights" && l.contains("merge.json: method 'ema', expected 'weights'") {
            continue;
        }
        if oracle_artefact(l) {
            found.push(l.to_string());
            continue;
        }
        return false;
    }
    artefacts.extend(found);
    true
}

fn run_scenario(sc: Scenario) {
    let t_start = Instant::now();
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let pristine_root = env.mkdir("pristine");
    let out_root = env.mkdir("out");
    let mut failures: Vec<String> = Vec::new();

    // ---- plan and pristine data
    let mut versions: Vec<Version> = Vec::new();
    let mut actions = Vec::new();
    for step in (100..=sc.gen0_last).step_by(100) {
        actions.push(Action::Write(versions.len()));
        versions.push(Version {
            step,
            gen: 0,
            seed: (step / 100) as u32,
            pristine: pristine_root.join(format!("gen0/checkpoint-{step}")),
            files: Vec::new(),
        });
    }
    if let Some((from, last)) = sc.restart {
        actions.push(Action::WaitAccepted(sc.gen0_last));
        for step in (from..=last).step_by(100) {
            actions.push(Action::Write(versions.len()));
            versions.push(Version {
                step,
                gen: 1,
                seed: 100 + (step / 100) as u32,
                pristine: pristine_root.join(format!("gen1/checkpoint-{step}")),
                files: Vec::new(),
            });
        }
    }
    generate(&env, &mut versions, sc.dtype, sc.edge);
    let t_generated = t_start.elapsed();
    let versions = Arc::new(versions);
    let last_step = versions.iter().map(|v| v.step).max().unwrap();
    let max_gen = versions.iter().map(|v| v.gen).max().unwrap();
    // step -> indices of its versions, by generation
    let mut by_step: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, v) in versions.iter().enumerate() {
        by_step.entry(v.step).or_default().push(i);
    }

    // ---- daemon
    let config = write_config(&env, &watch, &out_root);
    let mut daemon = Daemon::start(env.path(), &config, "pmad");
    let log = daemon.stdout.clone();
    let started = daemon.wait_for(Duration::from_secs(10), |e| e.event() == "daemon.started");
    assert!(
        started.is_some(),
        "pmad did not log daemon.started within 10 s\n{}",
        daemon.dump(usize::MAX)
    );
    let t0 = SystemTime::now();

    let stop = Arc::new(AtomicBool::new(false));
    let out_dirs: Vec<PathBuf> = RECIPES.iter().map(|r| out_root.join(r.name)).collect();
    let poller = {
        let (d, st) = (out_dirs.clone(), stop.clone());
        std::thread::spawn(move || latest_poller(d, st))
    };
    let tl = Arc::new(Mutex::new(Timeline::default()));
    let prod = {
        let (w, l, v, t) = (watch.clone(), log.clone(), versions.clone(), tl.clone());
        let slow = sc.slow_delete;
        std::thread::spawn(move || producer(w, l, v, actions, t, slow))
    };
    if prod.join().is_err() {
        failures.push("the producer thread panicked".into());
    }
    let t_produced = t_start.elapsed();
    let produced_at = SystemTime::now();

    // ---- wait until pmad has published the last step for every recipe
    let done = daemon.wait_until(Duration::from_secs(10), |evs| {
        RECIPES.iter().all(|r| {
            let want = s(&out_root.join(r.name).join(format!("step-{last_step}")));
            evs.iter()
                .any(|e| e.event() == "merge.emitted" && e.s("out") == Some(want.as_str()))
        })
    });
    if !done {
        failures.push(format!(
            "pmad did not publish step-{last_step} for every recipe within 10 s of the last checkpoint"
        ));
    }
    // Let a few more scans pass: nothing new may happen.
    std::thread::sleep(Duration::from_millis(600));
    let t_caught_up = t_start.elapsed();

    // ---- rotated checkpoints must not stay pinned (their disk space would never be freed)
    let leaked = deleted_watch_files(daemon.pid(), &watch);

    // ---- SIGTERM
    let code = daemon.terminate(Duration::from_secs(15));
    stop.store(true, Ordering::Relaxed);
    let (latest_reads, latest_seen, latest_bad) = poller.join().expect("LATEST poller panicked");
    let stderr = daemon.stderr_text();
    match code {
        Some(0) => {}
        Some(c) => failures.push(format!("pmad exited with code {c} after SIGTERM")),
        None => failures.push(format!(
            "pmad did not exit cleanly within 15 s of SIGTERM ({})",
            daemon.status_text()
        )),
    }
    let (evs, bad_lines) = daemon.with_log(|l| (l.events.clone(), l.non_json_lines()));
    let mut tolerated: Vec<String> = Vec::new();
    let tl = Arc::try_unwrap(tl).unwrap().into_inner().unwrap();
    failures.extend(tl.notes.iter().cloned());
    if !bad_lines.is_empty() {
        failures.push(format!(
            "{} stdout line(s) are not JSON log events with a timestamp and an event field, e.g.:\n  {}",
            bad_lines.len(),
            bad_lines.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
        ));
    }
    if stderr.contains("panicked") || stderr.contains("SIGBUS") {
        failures.push(format!("pmad stderr:\n{stderr}"));
    }
    let completed = evs
        .iter()
        .filter(|e| e.event() == "shutdown.completed")
        .count();
    if completed != 1 {
        failures.push(format!(
            "{completed} shutdown.completed events, expected exactly one"
        ));
    }
    for e in &evs {
        if e.level() != "ERROR" {
            continue;
        }
        // Refusing to read a source that the producer was rewriting or deleting at that
        // moment is correct (the emission is retried with the next arrival).
        let step = e.u("step").unwrap_or(0);
        let touched = e.event() == "merge.failed"
            && e.s("reason") == Some("source_changed")
            && (tl.deleted.get(&step).map(|d| *d <= e.t).unwrap_or(false)
                || tl
                    .written
                    .iter()
                    .any(|((st, g), (a, _))| *st == step && *g > 0 && *a <= e.t));
        if touched {
            tolerated.push(e.line().to_string());
        } else {
            failures.push(format!("pmad logged an error: {}", e.line()));
        }
    }

    // ---- 2. acceptance only of complete checkpoints, every version accepted
    let accepted: Vec<&Event> = evs
        .iter()
        .filter(|e| e.event() == "checkpoint.accepted")
        .collect();
    for e in &accepted {
        let Some(step) = e.u("step") else {
            failures.push(format!("checkpoint.accepted without a step: {}", e.line()));
            continue;
        };
        let want_path = s(&watch.join(format!("checkpoint-{step}")));
        if e.s("path") != Some(want_path.as_str()) {
            failures.push(format!(
                "checkpoint.accepted path is not {want_path}: {}",
                e.line()
            ));
        }
        let vs = by_step.get(&step).cloned().unwrap_or_default();
        let spans: Vec<(SystemTime, SystemTime)> = vs
            .iter()
            .filter_map(|i| {
                tl.written
                    .get(&(versions[*i].step, versions[*i].gen))
                    .copied()
            })
            .collect();
        if !spans.iter().any(|(_, end)| *end <= e.t) {
            failures.push(format!(
                "step {step} accepted at +{}ms, before any version of it was complete (writes: {:?})",
                ms_since(e.t, t0),
                spans
                    .iter()
                    .map(|(a, b)| (ms_since(*a, t0), ms_since(*b, t0)))
                    .collect::<Vec<_>>()
            ));
        }
        for (a, b) in &spans {
            if *a <= e.t && e.t < *b {
                failures.push(format!(
                    "step {step} accepted at +{}ms while the producer was (re)writing it (+{}..+{}ms): {}",
                    ms_since(e.t, t0),
                    ms_since(*a, t0),
                    ms_since(*b, t0),
                    e.line()
                ));
            }
        }
        if let Some(d) = tl.deleted.get(&step) {
            if *d <= e.t {
                failures.push(format!(
                    "step {step} accepted at +{}ms, after the producer deleted it (+{}ms)",
                    ms_since(e.t, t0),
                    ms_since(*d, t0)
                ));
            }
        }
    }
    // Every version must have been accepted while it was the current one.
    let mut lags = Vec::new();
    for v in versions.iter() {
        let Some((_, end)) = tl.written.get(&(v.step, v.gen)).copied() else {
            failures.push(format!(
                "producer never wrote step {} gen {}",
                v.step, v.gen
            ));
            continue;
        };
        let until = versions
            .iter()
            .filter(|w| w.step == v.step && w.gen > v.gen)
            .filter_map(|w| tl.written.get(&(w.step, w.gen)).map(|x| x.0))
            .min();
        let hit = accepted.iter().find(|e| {
            e.u("step") == Some(v.step) && e.t >= end && until.map(|u| e.t < u).unwrap_or(true)
        });
        match hit {
            Some(e) => lags.push(format!(
                "{}{}:{}ms",
                v.step,
                if v.gen > 0 { "'" } else { "" },
                ms_since(e.t, end)
            )),
            None => failures.push(format!(
                "step {} (gen {}) completed at +{}ms was never accepted while current",
                v.step,
                v.gen,
                ms_since(end, t0)
            )),
        }
    }
    for e in evs.iter().filter(|e| e.event() == "checkpoint.rejected") {
        let step = e.u("step").unwrap_or(0);
        let gone = tl.deleted.get(&step).map(|d| *d <= e.t).unwrap_or(false);
        if !gone {
            failures.push(format!(
                "checkpoint.rejected for a checkpoint the producer wrote correctly (settle or validation let a checkpoint in mid-write?): {}",
                e.line()
            ));
        }
    }

    // ---- restart: source.changed, and when the rewritten data was accepted
    let mut rewrite_start: Option<SystemTime> = None;
    let mut new_accepted: Option<SystemTime> = None;
    if let Some((from, _)) = sc.restart {
        let (a, b) = tl.written.get(&(from, 1)).copied().unwrap_or((t0, t0));
        rewrite_start = Some(a);
        new_accepted = accepted
            .iter()
            .filter(|e| e.u("step") == Some(from) && e.t >= b)
            .map(|e| e.t)
            .min();
        let changed: Vec<&Event> = evs
            .iter()
            .filter(|e| e.event() == "source.changed")
            .collect();
        if !changed
            .iter()
            .any(|e| e.u("step") == Some(from) && e.t >= a)
        {
            failures.push(format!(
                "no source.changed event for step {from} after it was rewritten; source.changed events: {:?}",
                changed.iter().map(|e| e.line()).collect::<Vec<_>>()
            ));
        }
    }

    // Every source.changed must be a real rewrite: the producer rewrote that step (a restart),
    // not merely deleted it (rotation) or left it alone.
    for e in evs.iter().filter(|e| e.event() == "source.changed") {
        let step = e.u("step").unwrap_or(0);
        let rewritten = tl
            .written
            .iter()
            .any(|((st, g), (a, _))| *st == step && *g > 0 && *a <= e.t);
        if !rewritten {
            let what = match tl.deleted.get(&step) {
                Some(d) if *d <= e.t => format!(
                    "the producer was deleting it (rotation started at +{}ms, event at +{}ms)",
                    ms_since(*d, t0),
                    ms_since(e.t, t0)
                ),
                _ => "the producer never rewrote it".to_string(),
            };
            failures.push(format!(
                "source.changed for step {step}, but {what}; pmad treated it as a restart: {}",
                e.line()
            ));
        }
    }

    // ---- outputs on disk, merge.emitted events
    let mut outputs: Vec<Output> = Vec::new();
    for r in RECIPES.iter() {
        let od = out_root.join(r.name);
        let names = list_dir(&od);
        for n in &names {
            if n.starts_with(".pmad-tmp-") || n == "LATEST.tmp" {
                failures.push(format!("{}: leftover {n}", od.display()));
            } else if n != "LATEST" && step_of(n, "step-").is_none() {
                failures.push(format!("{}: unexpected entry {n}", od.display()));
            }
        }
        let dirs: BTreeSet<u64> = names.iter().filter_map(|n| step_of(n, "step-")).collect();
        // Expected: a full window is needed for sma/wma; ema publishes from the first step.
        let first = 100 * r.window as u64;
        let want: BTreeSet<u64> = (first..=last_step).step_by(100).collect();
        if dirs != want {
            failures.push(format!(
                "{}: outputs {:?}, expected {:?}",
                r.name, dirs, want
            ));
        }
        // LATEST names the newest output.
        let latest = std::fs::read_to_string(od.join("LATEST")).unwrap_or_default();
        if let Some(max) = dirs.iter().max() {
            if latest.trim() != format!("step-{max}") {
                failures.push(format!(
                    "{}/LATEST reads {latest:?}, the newest output is step-{max}",
                    od.display()
                ));
            }
        }
        // merge.emitted: one per published dir (two only for a step re-published after the
        // restart rewrote it).
        let mut by_out: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
        for e in evs
            .iter()
            .filter(|e| e.event() == "merge.emitted" && e.s("recipe") == Some(r.name))
        {
            for k in ["recipe", "steps", "n", "out", "size", "took"] {
                if !e.has(k) {
                    failures.push(format!("merge.emitted lacks {k}: {}", e.line()));
                }
            }
            by_out
                .entry(e.s("out").unwrap_or("").to_string())
                .or_default()
                .push(e);
        }
        let event_dirs: BTreeSet<String> = by_out.keys().cloned().collect();
        let disk_dirs: BTreeSet<String> = dirs
            .iter()
            .map(|st| s(&od.join(format!("step-{st}"))))
            .collect();
        if event_dirs != disk_dirs {
            failures.push(format!(
                "{}: merge.emitted outs {:?} differ from the dirs on disk {:?}",
                r.name, event_dirs, disk_dirs
            ));
        }
        for (out, es) in &by_out {
            if es.len() > 1 {
                let step = Path::new(out)
                    .file_name()
                    .and_then(|n| step_of(&n.to_string_lossy(), "step-"))
                    .unwrap_or(0);
                let rewritten = by_step.get(&step).map(|v| v.len() > 1).unwrap_or(false);
                let after = match (rewrite_start, es.last()) {
                    (Some(rs), Some(l)) => l.t > rs,
                    _ => false,
                };
                if !(es.len() == 2 && rewritten && after) {
                    failures.push(format!(
                        "{}: {} merge.emitted events for {out}:\n  {}",
                        r.name,
                        es.len(),
                        es.iter().map(|e| e.line()).collect::<Vec<_>>().join("\n  ")
                    ));
                }
            }
        }
        // Each output: valid, merge.json consistent, candidates for the oracle.
        for st in &dirs {
            let dir = od.join(format!("step-{st}"));
            let mj = match validate_output(&dir) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{}: invalid output: {e}", dir.display()));
                    continue;
                }
            };
            let steps: Option<Vec<u64>> = mj["steps"]
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64()).collect());
            let weights: Option<Vec<f64>> = mj["weights"]
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64()).collect());
            let (Some(steps), Some(weights)) = (steps, weights) else {
                failures.push(format!(
                    "{}/merge.json: steps/weights missing or not numbers: {mj}",
                    dir.display()
                ));
                continue;
            };
            let mut msg = Vec::new();
            if mj["recipe"].as_str() != Some(r.name) {
                msg.push(format!("recipe {}", mj["recipe"]));
            }
            if mj["method"].as_str() != Some(r.method) {
                msg.push(format!("method {}", mj["method"]));
            }
            if steps.last() != Some(st) {
                msg.push(format!("steps {steps:?} do not end at {st}"));
            }
            if steps.windows(2).any(|w| w[0] >= w[1]) {
                msg.push(format!("steps {steps:?} not increasing"));
            }
            if weights.len() != steps.len() {
                msg.push(format!(
                    "{} weights for {} steps",
                    weights.len(),
                    steps.len()
                ));
            }
            if r.method != "ema" {
                let want: Vec<u64> = (0..r.window as u64).rev().map(|k| st - 100 * k).collect();
                if steps != want {
                    msg.push(format!("steps {steps:?}, expected the window {want:?}"));
                }
            }
            let inputs: Vec<String> = mj["inputs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default();
            let want_inputs: Vec<String> = steps
                .iter()
                .map(|x| s(&watch.join(format!("checkpoint-{x}"))))
                .collect();
            if inputs != want_inputs {
                msg.push(format!("inputs {inputs:?}, expected {want_inputs:?}"));
            }
            if mj["dtype"].as_str() != Some("source") {
                msg.push(format!("dtype {}", mj["dtype"]));
            }
            let last_ev = by_out.get(&s(&dir)).and_then(|v| v.last().copied());
            if let Some(e) = last_ev {
                if e.s("steps") != Some(step_span(&steps).as_str())
                    || e.u("n") != Some(steps.len() as u64)
                {
                    msg.push(format!(
                        "its last merge.emitted says steps={:?} n={:?}, merge.json lists {steps:?}",
                        e.s("steps"),
                        e.u("n")
                    ));
                }
            }
            if !msg.is_empty() {
                failures.push(format!("{}/merge.json: {}", dir.display(), msg.join("; ")));
            }
            if steps.iter().any(|x| !by_step.contains_key(x)) {
                failures.push(format!(
                    "{}/merge.json lists steps {steps:?}, some of which the producer never wrote",
                    dir.display()
                ));
                continue;
            }
            // Consistent assignments: for generation g, each step's newest version of gen <= g.
            let mut candidates: Vec<(Vec<u32>, Vec<usize>)> = Vec::new();
            for g in 0..=max_gen {
                let assign: Option<Vec<usize>> = steps
                    .iter()
                    .map(|x| {
                        by_step[x]
                            .iter()
                            .copied()
                            .filter(|i| versions[*i].gen <= g)
                            .max_by_key(|i| versions[*i].gen)
                    })
                    .collect();
                if let Some(a) = assign {
                    match candidates.iter_mut().find(|c| c.1 == a) {
                        Some(c) => c.0.push(g),
                        None => candidates.push((vec![g], a)),
                    }
                }
            }
            let emitted_at = last_ev.map(|e| e.t);
            let expected_gen = match (emitted_at, rewrite_start) {
                (Some(t), Some(rs)) if t < rs => Some(0),
                (Some(t), Some(_)) if new_accepted.map(|na| t > na).unwrap_or(false) => {
                    Some(max_gen)
                }
                _ => None,
            };
            outputs.push(Output {
                recipe: r,
                dir,
                step: *st,
                steps,
                weights,
                emitted_at,
                expected_gen,
                candidates,
            });
        }
    }

    // ---- 1. every output equals the float64 oracle merge of one consistent version set
    let mut jobs: Vec<OracleJob> = Vec::new();
    for (oi, o) in outputs.iter().enumerate() {
        let kinds: Vec<&str> = if o.recipe.method == "ema" {
            vec!["ema", "weights"]
        } else {
            vec![o.recipe.method]
        };
        for (ci, (_, assign)) in o.candidates.iter().enumerate() {
            let ckpts: Vec<PathBuf> = assign
                .iter()
                .map(|i| versions[*i].pristine.clone())
                .collect();
            for k in &kinds {
                jobs.push(OracleJob {
                    out: oi,
                    cand: ci,
                    kind: k.to_string(),
                    argv: oracle_argv(o.recipe, o, &ckpts, k),
                });
            }
        }
    }
    let t_oracle = Instant::now();
    let argvs: Vec<Vec<String>> = jobs.iter().map(|j| j.argv.clone()).collect();
    let runs = py_script_batch_parallel("oracle.py", env.path(), &argvs, 2);
    // (output, candidate) -> all its runs passed; first failing run kept for the message
    let mut verdict: BTreeMap<(usize, usize), Result<(), String>> = BTreeMap::new();
    let mut artefacts: Vec<String> = Vec::new();
    for (j, r) in jobs.iter().zip(&runs) {
        let e = verdict.entry((j.out, j.cand)).or_insert(Ok(()));
        if e.is_ok() && !oracle_passed(&j.kind, r, &mut artefacts) {
            *e = Err(format!("[{}] {}", j.kind, r.describe()));
        }
    }
    let mut mix_probe: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut matched_gens: BTreeMap<String, usize> = BTreeMap::new();
    for (oi, o) in outputs.iter().enumerate() {
        let passing: Vec<usize> = (0..o.candidates.len())
            .filter(|ci| matches!(verdict.get(&(oi, *ci)), Some(Ok(()))))
            .collect();
        let label = |ci: usize| format!("gen {:?}", o.candidates[ci].0);
        if passing.is_empty() {
            let why: Vec<String> = (0..o.candidates.len())
                .map(|ci| {
                    format!(
                        "candidate {} ({}):\n{}",
                        label(ci),
                        o.candidates[ci]
                            .1
                            .iter()
                            .map(|i| s(&versions[*i].pristine))
                            .collect::<Vec<_>>()
                            .join(" "),
                        verdict
                            .get(&(oi, ci))
                            .and_then(|v| v.clone().err())
                            .unwrap_or_default()
                    )
                })
                .collect();
            failures.push(format!(
                "{} (steps {:?}, published at +{}ms) matches no consistent set of checkpoint versions:\n{}",
                o.dir.display(),
                o.steps,
                o.emitted_at.map(|t| ms_since(t, t0)).unwrap_or(-1),
                why.join("\n")
            ));
            // Probe the inconsistent mixes, to say what it does hold.
            let options: Vec<Vec<usize>> = o.steps.iter().map(|x| by_step[x].clone()).collect();
            let total: usize = options.iter().map(|v| v.len()).product();
            if total <= 16 {
                for k in 0..total {
                    let mut rem = k;
                    let assign: Vec<usize> = options
                        .iter()
                        .map(|v| {
                            let c = v[rem % v.len()];
                            rem /= v.len();
                            c
                        })
                        .collect();
                    if !o.candidates.iter().any(|c| c.1 == assign) {
                        mix_probe.push((oi, assign));
                    }
                }
            }
            continue;
        }
        let gens: Vec<u32> = passing
            .iter()
            .flat_map(|ci| o.candidates[*ci].0.clone())
            .collect();
        *matched_gens
            .entry(format!("{:?}", o.candidates[passing[0]].0))
            .or_default() += 1;
        if let Some(g) = o.expected_gen {
            if o.candidates.len() > 1 && !gens.contains(&g) {
                failures.push(format!(
                    "{} (steps {:?}) was published at +{}ms, so it must hold generation {g} data, but it matches generation(s) {gens:?}",
                    o.dir.display(),
                    o.steps,
                    o.emitted_at.map(|t| ms_since(t, t0)).unwrap_or(-1)
                ));
            }
        }
    }
    if !mix_probe.is_empty() {
        let argvs: Vec<Vec<String>> = mix_probe
            .iter()
            .map(|(oi, assign)| {
                let o = &outputs[*oi];
                let ckpts: Vec<PathBuf> = assign
                    .iter()
                    .map(|i| versions[*i].pristine.clone())
                    .collect();
                let kind = if o.recipe.method == "ema" {
                    "ema"
                } else {
                    o.recipe.method
                };
                oracle_argv(o.recipe, o, &ckpts, kind)
            })
            .collect();
        let runs = py_script_batch_parallel("oracle.py", env.path(), &argvs, 2);
        for ((oi, assign), r) in mix_probe.iter().zip(&runs) {
            if r.code == 0 {
                failures.push(format!(
                    "{} MIXES abandoned and new data: it matches the inconsistent versions {:?}",
                    outputs[*oi].dir.display(),
                    assign
                        .iter()
                        .map(|i| format!("{}@gen{}", versions[*i].step, versions[*i].gen))
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    let oracle_time = t_oracle.elapsed();

    // ---- 3. LATEST was always a complete output
    if latest_reads == 0 {
        failures.push("the LATEST poller never read a LATEST file".into());
    }
    for b in latest_bad.iter().take(10) {
        failures.push(format!("LATEST poller: {b}"));
    }

    // ---- 5. the watch dir holds exactly what the producer left; pristine copies untouched
    let mut expected_watch: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let remaining: Vec<u64> = by_step
        .keys()
        .copied()
        .filter(|st| !tl.deleted.contains_key(st))
        .collect();
    for st in &remaining {
        let v = by_step[st]
            .iter()
            .map(|i| &versions[*i])
            .max_by_key(|v| v.gen)
            .unwrap();
        for (n, b) in &v.files {
            expected_watch.insert(format!("checkpoint-{st}/{n}"), b.clone());
        }
    }
    failures.extend(compare_tree(&watch, &expected_watch, "watch dir"));
    let watch_dirs: Vec<String> = list_dir(&watch);
    let want_dirs: Vec<String> = {
        let mut v: Vec<String> = remaining
            .iter()
            .map(|x| format!("checkpoint-{x}"))
            .collect();
        v.sort();
        v
    };
    if watch_dirs != want_dirs {
        failures.push(format!(
            "watch dir holds {watch_dirs:?}, the producer left {want_dirs:?}"
        ));
    }
    let mut expected_pristine: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for v in versions.iter() {
        let rel = v
            .pristine
            .strip_prefix(&pristine_root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for (n, b) in &v.files {
            expected_pristine.insert(format!("{rel}/{n}"), b.clone());
        }
    }
    failures.extend(compare_tree(
        &pristine_root,
        &expected_pristine,
        "pristine store",
    ));

    // ---- rotated checkpoints still held open/mapped by pmad at the end
    if !leaked.is_empty() {
        failures.push(format!(
            "after catching up (window = the newest 3 of the 4 kept checkpoints), pmad still holds {} deleted file(s) of rotated checkpoints, so their disk space is never freed:\n  {}",
            leaked.len(),
            leaked.iter().cloned().collect::<Vec<_>>().join("\n  ")
        ));
    }

    // ---- summary
    let count = |n: &str| evs.iter().filter(|e| e.event() == n).count();
    let ema_last = outputs
        .iter()
        .filter(|o| o.recipe.method == "ema" && o.step == last_step)
        .map(|o| format!("{:?}", o.steps))
        .next()
        .unwrap_or_default();
    eprintln!(
        "[{}] {} checkpoint writes ({} dtype, edge values {}), {} outputs checked with {} oracle runs; \
         events: accepted {}, rejected {}, source.changed {}, source.vanished {}, merge.emitted {}, merge.failed {}; \
         LATEST reads {} ({} distinct); outputs by generation {:?}; EMA step-{last_step} steps {ema_last}; \
         acceptance lag after completion: {}; tolerated errors {:?}; oracle float64 artefacts ignored {:?}; \
         time: fixtures {:.1}s, production until {:.1}s, caught up at {:.1}s, oracle {:.1}s, total {:.1}s (produced at +{}ms)",
        sc.name,
        versions.len(),
        sc.dtype,
        sc.edge,
        outputs.len(),
        jobs.len(),
        count("checkpoint.accepted"),
        count("checkpoint.rejected"),
        count("source.changed"),
        count("source.vanished"),
        count("merge.emitted"),
        count("merge.failed"),
        latest_reads,
        latest_seen.len(),
        matched_gens,
        lags.join(" "),
        tolerated,
        artefacts,
        t_generated.as_secs_f64(),
        t_produced.as_secs_f64(),
        t_caught_up.as_secs_f64(),
        oracle_time.as_secs_f64(),
        t_start.elapsed().as_secs_f64(),
        ms_since(produced_at, t0),
    );
    if !failures.is_empty() {
        let logtext = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = logtext
            .lines()
            .filter(|l| !l.contains("\"checkpoint.discovered\""))
            .collect();
        panic!(
            "[{}] {} failure(s):\n\n{}\n\n-- pmad stderr:\n{}\n-- pmad log ({} lines, discovered events omitted):\n{}",
            sc.name,
            failures.len(),
            failures.join("\n\n"),
            stderr,
            tail.len(),
            tail.join("\n")
        );
    }
}

/// bf16 checkpoints 100..800, rotation (save_total_limit 4), restart from 600 (700 and 800
/// rewritten in place with new data), then 900..1400.
#[test]
fn daemon_bf16_rotation_and_restart() {
    run_scenario(Scenario {
        name: "bf16",
        dtype: "bf16",
        edge: false,
        gen0_last: 800,
        restart: Some((700, 1400)),
        slow_delete: false,
    });
}

/// The same with f32 checkpoints (f32 outputs: 1e-6 relative).
#[test]
fn daemon_f32_rotation_and_restart() {
    run_scenario(Scenario {
        name: "f32",
        dtype: "f32",
        edge: false,
        gen0_last: 800,
        restart: Some((700, 1400)),
        slow_delete: false,
    });
}

/// fixtures.py edge values (signed zeros, subnormals, rounding ties, +/- values just below
/// max/2) through the daemon's incremental sums: they must give the same result as a one-shot
/// merge of the window (bf16 within 1 ulp, as `pmad merge` promises in README "Merge
/// semantics").
#[test]
fn daemon_bf16_edge_values() {
    run_scenario(Scenario {
        name: "bf16-edge",
        dtype: "bf16",
        edge: true,
        gen0_last: 600,
        restart: None,
        slow_delete: false,
    });
}

/// Rotation as a big checkpoint's `rm -rf` looks to a scanner: the oldest checkpoint loses
/// its files one by one over ~200 ms. That is a deletion, not a restart: pmad must keep the
/// newer checkpoints in its window (source.vanished at most), and every output must still
/// match the oracle.
#[test]
fn daemon_bf16_slow_rotation() {
    run_scenario(Scenario {
        name: "bf16-slow-rm",
        dtype: "bf16",
        edge: false,
        gen0_last: 900,
        restart: None,
        slow_delete: true,
    });
}

/// The oracle-artefact filter accepts only values within float64 noise of the oracle's mean.
#[test]
fn oracle_artefact_filter() {
    // Seen in a run: the exact sum of the three bf16 inputs is 0 (165 - 113 - 52, in units of
    // 2^-17); pmad's 0.0 is exact, the oracle's float64 mean is rounding noise.
    let noise =
        "oracle: MISMATCH model.layers.0.self_attn.q_proj.weight[15, 14]: got 0.0, expected \
                 2.710505431213761e-20 (float64 mean 2.710505431213761e-20; inputs \
                 [-0.00086212158203125, 0.00125885009765625, -0.000396728515625])";
    assert!(oracle_artefact(noise));
    let real = "oracle: MISMATCH model.norm.weight[3]: got 1.0078125, expected 1.0 (float64 mean \
                1.0000001; inputs [1.0, 1.0, 1.0])";
    assert!(!oracle_artefact(real));
    let near_zero = "oracle: MISMATCH x[0]: got 1e-12, expected 2.7e-20 (float64 mean 2.7e-20; \
                     inputs [-0.0008, 0.0012, -0.0004])";
    assert!(!oracle_artefact(near_zero));
    assert!(!oracle_artefact(
        "oracle: MISMATCH x: 7 mismatching elements in all"
    ));
}
