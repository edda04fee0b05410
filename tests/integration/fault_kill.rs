//! Fault tests of reliability.md against the real `pmad run` binary:
//!
//! - T1 [`kill_loop_recovers`]: SIGKILL the daemon 100+ times at random moments (timed from
//!   start, or just after a `window.updated` / `merge.started` line) while checkpoints arrive;
//!   after every kill assert promise 2 (only complete outputs under final names, an intact
//!   LATEST, temp dirs removed by the next start); finally assert promise 3 (every output is
//!   byte-identical to an uninterrupted reference run, and no output was ever replaced by
//!   different content).
//! - T2 [`injected_failures_never_publish_garbage`]: `PMAD_FAULT=op:N` for every op and N up to
//!   [`T2_MAX_N`] (the first state save and the first emissions), then a restart without the
//!   fault plus one more checkpoint; and the same fault points in `pmad merge`.
//!   [`failed_accumulator_save_keeps_resume_exact`] aims a fault at the accumulator file of a
//!   later save and checks that a restart still resumes exactly.
//! - T6 [`sigterm_during_emission_is_clean`]: SIGTERM while an emission runs, with a short
//!   grace (the emission is aborted) and a long one (it finishes; nothing new is started).
//!
//! Checkpoints are generated here with the reference `safetensors` crate: fixtures.py writes
//! fixed tiny shapes, these tests need sizes that make emissions and state saves take time.
//! `PMAD_TEST_KEEP=1` keeps a failing test's temp directory; `PMAD_KILL_SEED=N` changes the
//! kill loop's seed.

use crate::harness::{self, list_dir, pmad_cmd, Config, Daemon, Event, TestEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TMP_PREFIX: &str = ".pmad-tmp-";

// ------------------------------------------------------------------ checkpoint generator

/// Shape of a generated checkpoint: `tensors` bf16 matrices `rows` x `cols`, plus an I64
/// `position_ids` (copied from the newest input by a merge).
#[derive(Debug, Clone, Copy)]
struct Spec {
    tensors: usize,
    rows: usize,
    cols: usize,
}

impl Spec {
    fn bytes(&self) -> usize {
        self.tensors * self.rows * self.cols * 2
    }
}

/// A cheap deterministic generator (splitmix64).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// bf16 bits of a small finite value from 16 random bits: random sign and mantissa, exponent
/// in [2^-10, 2^-3].
fn bf16_bits(r: u16) -> u16 {
    let sign = r & 0x8000;
    let exp = 117 + ((r >> 7) & 0x7);
    sign | (exp << 7) | (r & 0x7f)
}

fn gen_bf16(seed: u64, n_elems: usize) -> Vec<u8> {
    let mut m = Mix(seed);
    let mut out = vec![0u8; n_elems * 2];
    for chunk in out.chunks_mut(8) {
        let v = m.next();
        for (i, pair) in chunk.chunks_mut(2).enumerate() {
            pair.copy_from_slice(&bf16_bits((v >> (16 * i)) as u16).to_le_bytes());
        }
    }
    out
}

fn ckpt_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Files of a generated checkpoint in the order a trainer writes them (marker last).
const CKPT_FILES: [&str; 3] = ["model.safetensors", "config.json", "trainer_state.json"];

/// Write an HF-style checkpoint directory: model.safetensors, config.json, trainer_state.json.
fn write_ckpt(dir: &Path, step: u64, seed: u64, spec: Spec) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let datas: Vec<(String, Vec<u8>)> = (0..spec.tensors)
        .map(|i| {
            (
                format!("model.layers.{i}.weight"),
                gen_bf16(seed * 1000 + i as u64, spec.rows * spec.cols),
            )
        })
        .collect();
    let pos: Vec<u8> = (0..8i64)
        .flat_map(|x| (x + step as i64).to_le_bytes())
        .collect();
    let mut views = Vec::new();
    for (name, d) in &datas {
        let v = safetensors::tensor::TensorView::new(
            safetensors::Dtype::BF16,
            vec![spec.rows, spec.cols],
            d,
        )
        .expect("tensor view");
        views.push((name.clone(), v));
    }
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 8], &pos)
        .expect("tensor view");
    views.push(("position_ids".to_string(), v));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(meta)).expect("serialize");
    std::fs::write(dir.join("model.safetensors"), bytes).expect("write model");
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"model_type\": \"llama\", \"fixture_step\": {step}}}\n"),
    )
    .expect("write config");
    std::fs::write(
        dir.join("trainer_state.json"),
        format!("{{\"global_step\": {step}, \"log_history\": []}}\n"),
    )
    .expect("write marker");
}

/// Generate `steps` (seeds 1, 2, ...) under `stage`, two at a time.
fn stage_ckpts(stage: &Path, steps: &[u64], spec: Spec) {
    std::thread::scope(|sc| {
        for part in [0, 1] {
            sc.spawn(move || {
                for (i, s) in steps.iter().enumerate().filter(|(i, _)| i % 2 == part) {
                    write_ckpt(&stage.join(ckpt_name(*s)), *s, i as u64 + 1, spec);
                }
            });
        }
    });
}

/// Hard-link a staged checkpoint into `dst` (pmad only reads it).
fn link_ckpt(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("mkdir {}: {e}", dst.display()));
    for f in CKPT_FILES {
        std::fs::hard_link(src.join(f), dst.join(f))
            .unwrap_or_else(|e| panic!("link {}: {e}", src.join(f).display()));
    }
}

/// Copy a checkpoint file by file, marker last (like a trainer writing in place).
fn copy_ckpt(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("mkdir {}: {e}", dst.display()));
    for f in CKPT_FILES {
        std::fs::copy(src.join(f), dst.join(f))
            .unwrap_or_else(|e| panic!("copy {}: {e}", src.join(f).display()));
    }
}

/// Make a staged checkpoint appear atomically in `watch`: copy it next to it, then rename.
fn add_by_rename(stage: &Path, scratch: &Path, watch: &Path, step: u64) {
    let tmp = scratch.join(format!("incoming-{}", ckpt_name(step)));
    copy_ckpt(&stage.join(ckpt_name(step)), &tmp);
    std::fs::rename(&tmp, watch.join(ckpt_name(step))).expect("rename checkpoint into watch");
}

// ------------------------------------------------------------------ config

#[derive(Debug, Clone, Copy)]
struct Recipe {
    name: &'static str,
    method: &'static str,
    window: usize,
    alpha: f64,
}

impl Recipe {
    /// Steps the recipe publishes when every one of `steps` is accepted and emit_every = 1.
    fn publishes(&self, steps: &[u64]) -> Vec<u64> {
        if self.method == "ema" {
            steps.to_vec()
        } else {
            steps.iter().skip(self.window - 1).copied().collect()
        }
    }
}

/// The config of these tests: poll and settle 50ms, state in `state` (if any), every recipe
/// publishing every step into `<out_root>/<name>`, debug log, shutdown grace `grace`.
fn config(
    watch: &Path,
    out_root: &Path,
    state: Option<&Path>,
    recipes: &[Recipe],
    grace: &str,
) -> Config {
    let mut c = Config::new(watch).hf_auto().poll("50ms").settle("50ms");
    if let Some(s) = state {
        c = c.state("dir", s);
    }
    for r in recipes {
        c = c.recipe(
            harness::Recipe::sized(r.name, r.method, r.window, r.alpha).all_outputs(out_root),
        );
    }
    c.no_server().json_log("info,pmad=debug").grace(grace)
}

// ------------------------------------------------------------------ log events

/// Step of a `merge.emitted` (from its `out` path).
fn emitted_step(e: &Event) -> Option<u64> {
    let out = e.s("out")?;
    Path::new(out)
        .file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

fn recipe_of(e: &Event) -> &str {
    e.s("recipe").unwrap_or("")
}

/// Whether `recipe` logged the end (emitted or failed) of an emission of `step`.
fn emission_ended(evs: &[Event], recipe: &str, step: u64) -> bool {
    evs.iter().any(|e| {
        recipe_of(e) == recipe
            && ((e.event() == "merge.emitted" && emitted_step(e) == Some(step))
                || (e.event() == "merge.failed" && e.u("step") == Some(step)))
    })
}

fn emitted(evs: &[Event], recipe: &str, step: u64) -> bool {
    evs.iter().any(|e| {
        e.event() == "merge.emitted" && recipe_of(e) == recipe && emitted_step(e) == Some(step)
    })
}

/// `merge.failed` (other than a shutdown cancel) and `state.saved ok=false` lines.
fn failures(evs: &[Event]) -> Vec<&Event> {
    evs.iter()
        .filter(|e| {
            (e.event() == "merge.failed" && e.s("reason") != Some("cancelled"))
                || (e.event() == "state.saved" && e.b("ok") == Some(false))
        })
        .collect()
}

// ------------------------------------------------------------------ outputs

/// Load one published output; Err says why it is not complete. Returns the bytes of
/// model.safetensors.
fn load_output(dir: &Path, step: u64, spec: Spec) -> Result<Vec<u8>, String> {
    let d = dir.display();
    let files = list_dir(dir);
    let want = ["config.json", "merge.json", "model.safetensors"];
    if files != want {
        return Err(format!(
            "{d}: holds {files:?}, a complete output holds {want:?}"
        ));
    }
    let bytes =
        std::fs::read(dir.join("model.safetensors")).map_err(|e| format!("{d}: read: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{d}/model.safetensors: reference reader: {e:?}"))?;
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    let mut want: Vec<String> = (0..spec.tensors)
        .map(|i| format!("model.layers.{i}.weight"))
        .chain(["position_ids".to_string()])
        .collect();
    want.sort();
    if names != want {
        return Err(format!(
            "{d}/model.safetensors: tensors {names:?}, want {want:?}"
        ));
    }
    for (n, t) in st.tensors() {
        let ok = if n == "position_ids" {
            t.dtype() == safetensors::Dtype::I64 && t.shape() == [1, 8]
        } else {
            t.dtype() == safetensors::Dtype::BF16 && t.shape() == [spec.rows, spec.cols]
        };
        if !ok {
            return Err(format!(
                "{d}/model.safetensors: {n} is {:?} {:?}",
                t.dtype(),
                t.shape()
            ));
        }
    }
    let mj: Value = std::fs::read(dir.join("merge.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| format!("{d}/merge.json: missing or not JSON"))?;
    let last = mj["steps"]
        .as_array()
        .and_then(|a| a.last())
        .and_then(|s| s.as_u64());
    if last != Some(step) {
        return Err(format!(
            "{d}/merge.json: steps {} do not end at {step}",
            mj["steps"]
        ));
    }
    Ok(bytes)
}

/// What an out_dir holds.
#[derive(Debug, Default)]
struct OutScan {
    /// Complete `step-N` outputs: step -> (dir inode, model.safetensors bytes).
    steps: BTreeMap<u64, (u64, Vec<u8>)>,
    /// `.pmad-tmp-*` entries and `LATEST.tmp`.
    temps: Vec<PathBuf>,
    latest: Option<String>,
    /// Violations of promise 2.
    problems: Vec<String>,
}

/// Output cache: a step dir is re-read only when its dir or model file changed.
type OutCache = HashMap<PathBuf, ((u64, u64, u64, i64, i64), Vec<u8>)>;

fn scan_out(dir: &Path, spec: Spec, cache: &mut OutCache) -> OutScan {
    let mut s = OutScan::default();
    for n in list_dir(dir) {
        let p = dir.join(&n);
        if n.starts_with(TMP_PREFIX) || n == "LATEST.tmp" {
            s.temps.push(p);
        } else if n == "LATEST" {
            match std::fs::read_to_string(&p) {
                Ok(t) => s.latest = Some(t),
                Err(e) => s.problems.push(format!("{}: unreadable: {e}", p.display())),
            }
        } else if let Some(step) = n.strip_prefix("step-").and_then(|x| x.parse::<u64>().ok()) {
            let key = std::fs::metadata(&p).ok().and_then(|dm| {
                let fm = std::fs::metadata(p.join("model.safetensors")).ok()?;
                Some((dm.ino(), fm.ino(), fm.size(), fm.mtime(), fm.mtime_nsec()))
            });
            if let (Some(k), Some((ck, bytes))) = (key, cache.get(&p)) {
                if *ck == k {
                    s.steps.insert(step, (k.0, bytes.clone()));
                    continue;
                }
            }
            match load_output(&p, step, spec) {
                Ok(bytes) => {
                    if let Some(k) = key {
                        cache.insert(p.clone(), (k, bytes.clone()));
                    }
                    s.steps.insert(step, (key.map(|k| k.0).unwrap_or(0), bytes));
                }
                Err(why) => s
                    .problems
                    .push(format!("incomplete output under a final name: {why}")),
            }
        } else {
            s.problems
                .push(format!("{}: unexpected entry in out_dir", p.display()));
        }
    }
    if let Some(l) = &s.latest {
        let target = l.trim();
        let ok = target
            .strip_prefix("step-")
            .and_then(|x| x.parse::<u64>().ok())
            .is_some_and(|st| s.steps.contains_key(&st));
        if !ok {
            s.problems.push(format!(
                "{}/LATEST = {l:?} does not name a complete output (have {:?})",
                dir.display(),
                s.steps.keys().collect::<Vec<_>>()
            ));
        }
    }
    s
}

fn state_tmps(state: &Path) -> Vec<String> {
    list_dir(state)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Reference outputs of `recipe` by step (model.safetensors bytes).
type RefOutputs = BTreeMap<(String, u64), Vec<u8>>;

/// An uninterrupted run over all `steps` (present from the start): its outputs.
fn reference_run(
    env: &TestEnv,
    tag: &str,
    stage: &Path,
    steps: &[u64],
    recipes: &[Recipe],
    spec: Spec,
) -> RefOutputs {
    let root = env.mkdir(tag);
    let watch = root.join("watch");
    for s in steps {
        copy_ckpt(&stage.join(ckpt_name(*s)), &watch.join(ckpt_name(*s)));
    }
    let out_root = root.join("out");
    let cfg = root.join("pmad.toml");
    config(&watch, &out_root, Some(&root.join("state")), recipes, "20s").write(&cfg);
    let last = *steps.last().expect("steps");
    let mut d = Daemon::builder(&cfg).tag("run").start();
    let done = d.wait_until(Duration::from_secs(180), |evs| {
        recipes.iter().all(|r| emitted(evs, r.name, last))
    });
    assert!(
        done,
        "reference run did not publish step {last}\n{}",
        d.dump(25)
    );
    let code = d.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "reference run exit\n{}", d.dump(25));
    let evs = d.log();
    assert!(
        failures(&evs).is_empty(),
        "reference run logged failures\n{}",
        d.dump(25)
    );
    let mut out = RefOutputs::new();
    let mut cache = OutCache::new();
    for r in recipes {
        let scan = scan_out(&out_root.join(r.name), spec, &mut cache);
        assert!(scan.problems.is_empty(), "reference: {:?}", scan.problems);
        assert!(scan.temps.is_empty(), "reference: temps {:?}", scan.temps);
        let got: Vec<u64> = scan.steps.keys().copied().collect();
        assert_eq!(
            got,
            r.publishes(steps),
            "reference run: steps of {}",
            r.name
        );
        for (s, (_, b)) in scan.steps {
            out.insert((r.name.to_string(), s), b);
        }
    }
    out
}

/// Compare every output in `scan` with the reference; mismatches are returned.
fn compare_with_reference(recipe: &str, scan: &OutScan, reference: &RefOutputs) -> Vec<String> {
    let mut bad = Vec::new();
    for (step, (_, bytes)) in &scan.steps {
        match reference.get(&(recipe.to_string(), *step)) {
            None => bad.push(format!(
                "{recipe}/step-{step} was published but the reference run has no such output"
            )),
            Some(r) if r != bytes => {
                let first = r.iter().zip(bytes).position(|(a, b)| a != b);
                bad.push(format!(
                    "{recipe}/step-{step}: model.safetensors differs from the reference run \
                     ({} vs {} bytes, first difference at byte {first:?})",
                    bytes.len(),
                    r.len()
                ))
            }
            Some(_) => {}
        }
    }
    bad
}

fn ms(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

// ================================================================== T1: kill -9 loop

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
    if let Some(m) = memory_budget {
        c = c.state("memory_budget", m);
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
        if !state_tmps(&state).is_empty() || pmad::accum::generations(&state).len() > 2 {
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

// ================================================================== T2: injected failures

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

// ================================================================== T6: SIGTERM mid-emission

#[test]
fn sigterm_during_emission_is_clean() {
    let t_start = Instant::now();
    let env = TestEnv::new();
    // 32 MiB of bf16 in 256 KiB tensors: an SMA emission takes over a second in a debug
    // build, and pmad checks for cancellation between small groups of tensors.
    let spec = Spec {
        tensors: 128,
        rows: 256,
        cols: 512,
    };
    let steps = [100u64, 200, 300];
    let stage = env.mkdir("stage");
    stage_ckpts(&stage, &steps, spec);
    let recipes = [Recipe {
        name: "sma2",
        method: "sma",
        window: 2,
        alpha: 0.0,
    }];
    let mut problems = Vec::new();
    let mut report = Vec::new();

    // Both cases: checkpoints 100..300 present from the start, so one cycle accepts them one
    // after the other; sma2 publishes step-200, then step-300.
    let setup = |tag: &str, grace: &str| {
        let root = env.mkdir(tag);
        let watch = root.join("watch");
        for s in steps {
            link_ckpt(&stage.join(ckpt_name(s)), &watch.join(ckpt_name(s)));
        }
        let cfg = root.join("pmad.toml");
        config(&watch, &root.join("out"), None, &recipes, grace).write(&cfg);
        let d = Daemon::builder(&cfg).tag("run").start();
        (root, d)
    };
    let started = |step: u64| {
        move |evs: &[Event]| {
            evs.iter()
                .any(|e| e.event() == "merge.started" && e.u("step") == Some(step))
        }
    };

    // Case 1: grace 200ms, SIGTERM during the emission of step-300 (step-200 published).
    {
        let grace = Duration::from_millis(200);
        let (root, mut d) = setup("short", "200ms");
        let out = root.join("out/sma2");
        assert!(
            d.wait_until(Duration::from_secs(90), started(300)),
            "step-300's emission did not start\n{}",
            d.dump(25)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !emitted(&d.log(), "sma2", 300),
            "the emission finished within 100 ms: make the checkpoints bigger\n{}",
            d.dump(25)
        );
        let tmp_before = list_dir(&out)
            .iter()
            .filter(|n| n.starts_with(TMP_PREFIX))
            .count();
        let t = Instant::now();
        d.sigterm();
        let code = d.wait_exit(grace + Duration::from_secs(20));
        let took = t.elapsed();
        let evs = d.log();
        report.push(format!(
            "grace 200ms: exit {code:?} {} after SIGTERM (temp dirs at SIGTERM: {tmp_before})",
            ms(took)
        ));
        if code != Some(0) {
            problems.push(format!("grace 200ms: exit code {code:?}\n{}", d.dump(25)));
        }
        if took > grace + Duration::from_secs(3) {
            problems.push(format!(
                "grace 200ms: exit took {} after SIGTERM (grace + 3 s allowed)\n{}",
                ms(took),
                d.dump(25)
            ));
        }
        for ev in ["shutdown.started", "shutdown.completed"] {
            if !evs.iter().any(|e| e.event() == ev) {
                problems.push(format!("grace 200ms: no {ev}\n{}", d.dump(25)));
            }
        }
        let finished = emitted(&evs, "sma2", 300);
        let cancelled = evs.iter().any(|e| {
            e.event() == "merge.failed"
                && e.u("step") == Some(300)
                && e.s("reason") == Some("cancelled")
        });
        if !finished && !cancelled {
            problems.push(format!(
                "grace 200ms: step-300's emission neither finished nor was cancelled\n{}",
                d.dump(25)
            ));
        }
        let mut cache = OutCache::new();
        let scan = scan_out(&out, spec, &mut cache);
        problems.extend(scan.problems.iter().map(|p| format!("grace 200ms: {p}")));
        if !scan.temps.is_empty() {
            problems.push(format!("grace 200ms: temp entries left: {:?}", scan.temps));
        }
        let want: Vec<u64> = if finished { vec![200, 300] } else { vec![200] };
        let got: Vec<u64> = scan.steps.keys().copied().collect();
        if got != want {
            problems.push(format!("grace 200ms: outputs {got:?}, want {want:?}"));
        }
        let want_latest = format!("step-{}\n", want.last().unwrap());
        if scan.latest.as_deref() != Some(&want_latest) {
            problems.push(format!("grace 200ms: LATEST = {:?}", scan.latest));
        }
    }

    // Case 2: grace 60s, SIGTERM during the emission of step-200 while step-300 waits in the
    // same cycle: the emission finishes, nothing new is started, exit 0.
    {
        let (root, mut d) = setup("long", "60s");
        let out = root.join("out/sma2");
        assert!(
            d.wait_until(Duration::from_secs(90), started(200)),
            "step-200's emission did not start\n{}",
            d.dump(25)
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !emitted(&d.log(), "sma2", 200),
            "the emission finished within 100 ms: make the checkpoints bigger\n{}",
            d.dump(25)
        );
        let t = Instant::now();
        d.sigterm();
        let code = d.wait_exit(Duration::from_secs(90));
        let took = t.elapsed();
        let evs = d.log();
        report.push(format!(
            "grace 60s: exit {code:?} {} after SIGTERM",
            ms(took)
        ));
        if code != Some(0) {
            problems.push(format!("grace 60s: exit code {code:?}\n{}", d.dump(25)));
        }
        let stop = evs.iter().position(|e| e.event() == "shutdown.started");
        let done = evs.iter().position(|e| e.event() == "shutdown.completed");
        let em = evs
            .iter()
            .position(|e| e.event() == "merge.emitted" && emitted_step(e) == Some(200));
        match (stop, em, done) {
            (Some(s), Some(m), Some(c)) if s < m && m < c => {
                let after: Vec<String> = evs[s + 1..]
                    .iter()
                    .filter(|e| {
                        e.event() == "checkpoint.accepted"
                            || e.event() == "merge.started"
                            || (e.event() == "window.updated" && e.u("step").is_some())
                    })
                    .map(Event::short)
                    .collect();
                if !after.is_empty() {
                    problems.push(format!(
                        "grace 60s: intake went on after SIGTERM (shutdown.started): \n{}\n{}",
                        after.join("\n"),
                        d.dump(25)
                    ));
                }
                {
                    let gap = evs[c].t.duration_since(evs[m].t).unwrap_or_default();
                    report.push(format!(
                        "grace 60s: shutdown.completed {} after step-200's merge.emitted",
                        ms(gap)
                    ));
                    if gap > Duration::from_secs(2) {
                        problems.push(format!(
                            "grace 60s: shutdown.completed came {} after the in-flight \
                             emission finished",
                            ms(gap)
                        ));
                    }
                }
            }
            _ => problems.push(format!(
                "grace 60s: want shutdown.started, then step-200's merge.emitted, then \
                 shutdown.completed\n{}",
                d.dump(25)
            )),
        }
        let mut cache = OutCache::new();
        let scan = scan_out(&out, spec, &mut cache);
        problems.extend(scan.problems.iter().map(|p| format!("grace 60s: {p}")));
        if !scan.temps.is_empty() {
            problems.push(format!("grace 60s: temp entries left: {:?}", scan.temps));
        }
        if !scan.steps.contains_key(&200) || scan.latest.is_none() {
            problems.push(format!(
                "grace 60s: outputs {:?}, LATEST {:?}: step-200 must be published",
                scan.steps.keys().collect::<Vec<_>>(),
                scan.latest
            ));
        }
    }
    let summary = format!(
        "T6 ({} MB per checkpoint): {}; total {}",
        spec.bytes() >> 20,
        report.join("; "),
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
