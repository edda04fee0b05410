//! Crash and failure tests of `pmad run`, one file per fault (tests T1, T2 and T6 of
//! `docs/reliability.md`):
//!
//! - [`kill_loop`]: SIGKILL at random moments, over and over, while checkpoints arrive.
//! - [`injected_faults`]: `PMAD_FAULT=op:N` makes the N-th file operation fail with EIO, in
//!   the daemon and in `pmad merge`.
//! - [`sigterm`]: SIGTERM while an emission runs.
//!
//! This module holds what they share. Checkpoints are generated with the reference
//! `safetensors` crate: fixtures.py writes fixed tiny shapes, these tests need sizes that make
//! emissions and state saves take time. Outputs are compared byte for byte with an
//! uninterrupted reference run. `PMAD_TEST_KEEP=1` keeps a failing test's temp directory.

mod injected_faults;
mod kill_loop;
mod sigterm;

use crate::harness::{self, list_dir, Config, Daemon, Event, TestEnv};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
