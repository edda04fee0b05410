//! Fault tests of `pmad run` against bad or moving inputs, one file per fault (tests T3, T4
//! and T5 and promise 5 of `docs/reliability.md`):
//!
//! - [`disk_full`]: the out_dir's filesystem fills up, then frees space again.
//! - [`hostile_inputs`]: corrupt, mismatched and unfinished checkpoints among good ones.
//! - [`writers_and_vanishing_dirs`]: slow in-place writers; directories that vanish mid-scan.
//! - [`rotation_and_rewrite`]: rotation under the window, in-place rewrites, a checkpoint
//!   truncated while pmad reads it.
//! - [`watched_tree`]: pmad never changes anything in the watched tree.
//!
//! This module holds what they share: the daemon config, a trainer-like checkpoint writer,
//! fixture and oracle batches, and waits for pmad's acceptance and emission events.
//! Set `PMAD_TEST_KEEP=1` to keep a failing test's temp directory.

mod disk_full;
mod hostile_inputs;
mod rotation_and_rewrite;
mod watched_tree;
mod writers_and_vanishing_dirs;

use crate::harness::{
    list_dir, py_script_batch_parallel, read_json, s, Config, Daemon, Event, Recipe, TestEnv,
};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const POLL: Duration = Duration::from_millis(100);
const SETTLE: Duration = Duration::from_millis(200);
const EMA_ALPHA: f64 = 0.3;
/// Generous upper bound for anything pmad should do within a few scans.
const WAIT: Duration = Duration::from_secs(15);

// ------------------------------------------------------------------------------- helpers

/// A recipe of the daemon under test.
#[derive(Debug, Clone, Copy)]
struct Rec {
    name: &'static str,
    method: &'static str,
    window: usize,
}

const SMA2: Rec = Rec {
    name: "sma2",
    method: "sma",
    window: 2,
};

/// Write the daemon config: poll 100ms, settle 200ms, JSON log, no server, keep every output.
fn write_config(
    env: &TestEnv,
    watch: &Path,
    recipes: &[Rec],
    out_root: &Path,
    state: Option<&Path>,
) -> PathBuf {
    let mut c = Config::new(watch)
        .hf_auto()
        .poll(&format!("{}ms", POLL.as_millis()))
        .settle(&format!("{}ms", SETTLE.as_millis()));
    if let Some(st) = state {
        c = c.state("dir", st);
    }
    for r in recipes {
        c = c.recipe(Recipe::sized(r.name, r.method, r.window, EMA_ALPHA).all_outputs(out_root));
    }
    c.no_server()
        .json_log("info")
        .grace("5s")
        .write(&env.join("pmad.toml"))
}

/// `fixtures.py make` arguments.
fn make_args(out: &Path, dtype: &str, seed: u64, step: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "make",
        "--dtype",
        dtype,
        "--seed",
        &seed.to_string(),
        "--step",
        &step.to_string(),
        "--out",
        &s(out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// `fixtures.py hostile` arguments.
fn hostile_args(kind: &str, out: &Path, from: &Path) -> Vec<String> {
    vec![
        "hostile".into(),
        "--kind".into(),
        kind.into(),
        "--out".into(),
        s(out),
        "--from".into(),
        s(from),
    ]
}

/// Run fixtures.py jobs in two python processes; panics if any fails.
fn fixtures(env: &TestEnv, jobs: &[Vec<String>]) {
    for r in py_script_batch_parallel("fixtures.py", env.path(), jobs, 2) {
        r.expect_ok();
    }
}

/// Rank of a checkpoint file in the order the HF Trainer writes them: config, weights, index,
/// tokenizer, training files, and trainer_state.json (the marker pmad waits for) last.
fn trainer_rank(name: &str) -> u32 {
    match name {
        "config.json" => 0,
        "generation_config.json" => 1,
        n if n.ends_with(".safetensors") => 2,
        "model.safetensors.index.json" => 3,
        "training_args.bin" => 5,
        "optimizer.pt" => 6,
        "trainer_state.json" => 9,
        _ => 4,
    }
}

/// How fast a producer writes.
#[derive(Debug, Clone, Copy)]
struct Pace {
    chunk: usize,
    pause: Duration,
}
const FAST: Pace = Pace {
    chunk: usize::MAX,
    pause: Duration::ZERO,
};

/// Write `bytes` to `path` in place like safetensors/torch do: open with O_TRUNC on the final
/// name, then write chunk by chunk.
fn write_in_place(path: &Path, bytes: &[u8], pace: Pace) {
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    for c in bytes.chunks(pace.chunk.max(1)) {
        f.write_all(c)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        if !pace.pause.is_zero() {
            std::thread::sleep(pace.pause);
        }
    }
}

/// Regular files of a checkpoint dir, in trainer order.
fn ckpt_files(src: &Path) -> Vec<String> {
    let mut names: Vec<String> = list_dir(src)
        .into_iter()
        .filter(|n| src.join(n).is_file())
        .collect();
    names.sort_by_key(|n| (trainer_rank(n), n.clone()));
    names
}

/// Write every file of `src` into `dst` (created if missing), in place and in trainer order.
/// Returns (first byte, last file closed).
fn write_ckpt(src: &Path, dst: &Path, pace: Pace) -> (SystemTime, SystemTime) {
    let start = SystemTime::now();
    std::fs::create_dir_all(dst).expect("create checkpoint dir");
    for n in ckpt_files(src) {
        let bytes = std::fs::read(src.join(&n)).expect("read pristine file");
        write_in_place(&dst.join(&n), &bytes, pace);
    }
    (start, SystemTime::now())
}

/// Rewrite a safetensors file through the reference crate: `edit` may change the tensor list;
/// `metadata` None writes no `__metadata__` (a shorter header than the fixtures').
fn reserialize(
    path: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
    metadata: Option<HashMap<String, String>>,
) {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference reader");
    let mut ts: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, safetensors::tensor::TensorView)> = ts
        .iter()
        .map(|(n, d, sh, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, sh.clone(), data).expect("view"),
            )
        })
        .collect();
    let out = safetensors::serialize(views, metadata).expect("serialize");
    std::fs::write(path, out).expect("write safetensors");
}

/// The `pt` metadata every fixture file carries.
fn pt_meta() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// merge.json `steps` of an output.
fn merge_steps(out: &Path) -> Vec<u64> {
    read_json(&out.join("merge.json"))["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: merge.json without steps", out.display()))
        .iter()
        .map(|v| v.as_u64().expect("step"))
        .collect()
}

fn latest(out_dir: &Path) -> Option<String> {
    std::fs::read_to_string(out_dir.join("LATEST"))
        .ok()
        .map(|t| t.trim().to_string())
}

/// Entries of an out_dir that are neither published outputs nor LATEST.
fn strays(out_dir: &Path) -> Vec<String> {
    list_dir(out_dir)
        .into_iter()
        .filter(|n| n != "LATEST" && !n.starts_with("step-"))
        .collect()
}

/// One oracle check: `label` for messages; `inputs` oldest first.
struct OracleCheck {
    label: String,
    rec: Rec,
    out: PathBuf,
    inputs: Vec<PathBuf>,
}

/// Run oracle checks (two python processes); returns the failures with the oracle's output.
fn run_oracle(env: &TestEnv, checks: &[OracleCheck]) -> Vec<String> {
    let argvs: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            let mut a: Vec<String> = vec!["check".into(), "--method".into(), c.rec.method.into()];
            if c.rec.method == "ema" {
                a.push("--alpha".into());
                a.push(EMA_ALPHA.to_string());
            }
            a.push("--dtype".into());
            a.push("source".into());
            a.push(s(&c.out));
            a.extend(c.inputs.iter().map(|p| s(p)));
            a
        })
        .collect();
    let runs = py_script_batch_parallel("oracle.py", env.path(), &argvs, 2);
    checks
        .iter()
        .zip(runs)
        .filter(|(_, r)| r.code != 0)
        .map(|(c, r)| {
            format!(
                "oracle: {} ({}) failed (code {}):\n{}{}",
                c.label,
                c.out.display(),
                r.code,
                r.stdout,
                r.stderr
            )
        })
        .collect()
}

/// Lines of `log` with this event and step.
fn lines_for<'a>(log: &'a [Event], event: &str, step: u64) -> Vec<&'a Event> {
    log.iter().filter(|e| e.is(event, step)).collect()
}

fn err_lines(log: &[Event]) -> Vec<String> {
    log.iter()
        .filter(|e| e.level() == "ERROR")
        .map(|e| e.line().to_string())
        .collect()
}

/// Wait for `merge.emitted` of `<recipe>/step-<step>` logged after `after`.
#[track_caller]
fn expect_emitted(d: &mut Daemon, out_root: &Path, rec: &str, step: u64, after: SystemTime) {
    let path = s(&out_root.join(rec).join(format!("step-{step}")));
    d.expect(&format!("merge.emitted {path}"), WAIT, |e| {
        e.event() == "merge.emitted" && e.s("out") == Some(&path) && e.t >= after
    });
}

/// Wait for `checkpoint.accepted` of `step` logged after `after`.
#[track_caller]
fn expect_accepted(d: &mut Daemon, step: u64, after: SystemTime) -> Event {
    d.expect(&format!("checkpoint.accepted step {step}"), WAIT, |e| {
        e.is("checkpoint.accepted", step) && e.t >= after
    })
}
