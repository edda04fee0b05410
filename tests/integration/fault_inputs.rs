//! Fault tests of `pmad run` driven as a real process (reliability.md T3, T4, T5; promise 5).
//!
//! - `disk_full_then_recovers` (T3): the out_dir is a small tmpfs (root only; skipped with a
//!   printed reason otherwise) that a filler file fills after the first emission.
//! - `hostile_inputs_*` (T4): every corrupt kind of `fixtures.py hostile`, dtype/shape/name
//!   mismatches, NaN/Inf, unfinished markers, and rejected checkpoints that are later fixed,
//!   all among good checkpoints in one watched directory; reported kind by kind.
//! - `slow_in_place_writer_is_never_accepted_early`, `vanishing_dirs_mid_scan_are_not_errors`
//!   (T4): a producer writing in place slowly; directories created and removed under the scan.
//! - `rotation_and_rewrite` (T5): rotation (save_total_limit = 2 < window) and in-place
//!   rewrites, one shorter than before, one at the moment pmad maps the file; every output is
//!   checked against the float64 oracle on pristine copies of the versions it must contain.
//! - `truncated_while_being_read_does_not_kill_pmad` (T5): the SIGBUS danger proper: a large
//!   checkpoint truncated and rewritten in place while pmad reads it.
//! - `watched_tree_is_never_modified` (promise 5): pmad's out and state dirs inside the watched
//!   tree; every other path keeps its bytes, mode, inode, mtime and ctime, nothing is created.
//!
//! Set `PMAD_TEST_KEEP=1` to keep a failing test's temp directory.

use crate::harness::log::LogFollower;
use crate::harness::tree::{diff_snapshots, maps_contain, path_state, tree_snapshot};
use crate::harness::{
    copy_tree, list_dir, load_tensors, ms_since, outputs, py_script_batch_parallel, read_json, s,
    step_span, Config, Daemon, Event, Recipe, TestEnv,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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

/// Rank of a checkpoint file in the order the HF Trainer writes them (formats.md): config,
/// weights, index, tokenizer, training files, trainer_state.json last.
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

// ===================================================================== T3: disk full

/// A tmpfs mounted for the test; unmounted on drop (also when the test panics).
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    fn mount(dir: &Path, size: &str) -> Result<TmpfsMount, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not running as root (mount -t tmpfs needs it)".into());
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Fill the filesystem of `path` with a file until ENOSPC; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("create filler");
    let block = vec![0xa5u8; 4096];
    let mut n = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => panic!("filler: write returned 0"),
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => return n,
            Err(e) => panic!("filler: unexpected error {e}"),
        }
    }
}

#[test]
fn disk_full_then_recovers() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let src = env.join("src");
    // Declared before the daemon: dropped (unmounted) after it is killed.
    let _mount = match TmpfsMount::mount(&out_root, "1m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED disk_full_then_recovers: {why}");
            return;
        }
    };
    let jobs: Vec<Vec<String>> = (1..=5)
        .map(|i| {
            make_args(
                &src.join(format!("checkpoint-{}", 100 * i)),
                "bf16",
                i,
                100 * i,
                &["--no-edge"],
            )
        })
        .collect();
    fixtures(&env, &jobs);
    let ck = |step: u64| src.join(format!("checkpoint-{step}"));
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let out = out_root.join("sma2");
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");

    // 1. Two checkpoints: the first output fits.
    let t0 = SystemTime::now();
    write_ckpt(&ck(100), &watch.join("checkpoint-100"), FAST);
    write_ckpt(&ck(200), &watch.join("checkpoint-200"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 200, t0);
    assert_eq!(latest(&out).as_deref(), Some("step-200"));

    // 2. Fill the tmpfs; the next emission must fail cleanly with ENOSPC.
    let filler = out_root.join("filler");
    let filled = fill(&filler);
    eprintln!("disk_full: filler took {filled} bytes");
    let t1 = SystemTime::now();
    write_ckpt(&ck(300), &watch.join("checkpoint-300"), FAST);
    let failed = d.expect("merge.failed for step 300", WAIT, |e| {
        e.event() == "merge.failed" && e.step() == Some(300) && e.t >= t1
    });
    eprintln!("disk_full: {}", failed.line());
    let mut fails = Vec::new();
    if failed.u("errno") != Some(28) {
        fails.push(format!(
            "merge.failed errno is not 28 (ENOSPC): {}",
            failed.line()
        ));
    }
    if failed.s("reason") != Some("no_space") {
        fails.push(format!(
            "merge.failed reason is not no_space: {}",
            failed.line()
        ));
    }
    if failed.s("recipe") != Some("sma2") || failed.s("error").is_none_or(|e| e.is_empty()) {
        fails.push(format!(
            "merge.failed without recipe/error: {}",
            failed.line()
        ));
    }
    let check_out_dir = |fails: &mut Vec<String>, when: &str, want_latest: &str| {
        let st = strays(&out);
        if !st.is_empty() {
            fails.push(format!("{when}: leftovers in {}: {st:?}", out.display()));
        }
        match latest(&out) {
            Some(l) if l == want_latest => {}
            other => fails.push(format!(
                "{when}: LATEST is {other:?}, expected {want_latest}"
            )),
        }
        let dir = out.join(want_latest);
        let mj = dir.join("merge.json");
        if !mj.is_file() || !dir.join("model.safetensors").is_file() {
            fails.push(format!(
                "{when}: {} is not a complete output",
                dir.display()
            ));
        } else {
            let t = load_tensors(&dir);
            if t.len() != 8 {
                fails.push(format!("{when}: {} has {} tensors", dir.display(), t.len()));
            }
        }
    };
    check_out_dir(&mut fails, "after ENOSPC", "step-200");
    let published: Vec<u64> = outputs(&out).keys().copied().collect();
    if published != [200] {
        fails.push(format!(
            "after ENOSPC: outputs {published:?}, expected [200] only"
        ));
    }
    assert!(
        d.alive(),
        "pmad died after ENOSPC: {}\n{}",
        d.status_text(),
        d.dump(30)
    );

    // 3. Still full: the daemon keeps processing (a later checkpoint is accepted, its
    //    emission fails the same way).
    let t2 = SystemTime::now();
    write_ckpt(&ck(400), &watch.join("checkpoint-400"), FAST);
    expect_accepted(&mut d, 400, t2);
    let again = d.expect("second merge.failed (step 400)", WAIT, |e| {
        e.event() == "merge.failed" && e.step() == Some(400)
    });
    if again.u("errno") != Some(28) {
        fails.push(format!("second merge.failed: {}", again.line()));
    }
    check_out_dir(&mut fails, "after the second ENOSPC", "step-200");

    // 4. Space freed: the next emission succeeds.
    std::fs::remove_file(&filler).expect("remove filler");
    let t3 = SystemTime::now();
    write_ckpt(&ck(500), &watch.join("checkpoint-500"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 500, t3);
    check_out_dir(&mut fails, "after space was freed", "step-500");
    let published: Vec<u64> = outputs(&out).keys().copied().collect();
    if published != [200, 500] {
        fails.push(format!("outputs {published:?}, expected [200, 500]"));
    }
    let code = d.terminate(Duration::from_secs(10));
    if code != Some(0) {
        fails.push(format!("shutdown: {} (code {code:?})", d.status_text()));
    }
    let log = d.log();
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(st, dir)| OracleCheck {
            label: format!("sma2 step-{st}"),
            rec: SMA2,
            inputs: merge_steps(&dir).iter().map(|x| ck(*x)).collect(),
            out: dir,
        })
        .collect();
    for (c, want) in checks.iter().zip([vec![100, 200], vec![400, 500]]) {
        let got = merge_steps(&c.out);
        if got != want {
            fails.push(format!(
                "{}: merge.json steps {got:?}, expected {want:?}",
                c.label
            ));
        }
    }
    fails.extend(run_oracle(&env, &checks));
    let n_failed = log.iter().filter(|e| e.event() == "merge.failed").count();
    if n_failed != 2 {
        fails.push(format!(
            "{n_failed} merge.failed lines, expected 2 (steps 300, 400)"
        ));
    }
    assert!(
        fails.is_empty(),
        "disk full:\n{}\n{}",
        fails.join("\n"),
        d.dump(40)
    );
}

// ===================================================================== T4: hostile inputs

/// How a hostile checkpoint of the table is made.
#[derive(Debug, Clone, Copy)]
enum Make {
    /// `fixtures.py hostile --kind K` from a good checkpoint of the same step.
    Fixture(&'static str),
    /// `fixtures.py make` with other options (another dtype, NaN/Inf).
    Variant(&'static str, &'static [&'static str]),
    /// A good checkpoint whose weights are re-serialised with a schema change.
    Schema(SchemaEdit),
    /// A good checkpoint whose `trainer_state.json` is replaced by these bytes.
    Marker(&'static [u8]),
}

#[derive(Debug, Clone, Copy)]
enum SchemaEdit {
    /// `model.norm.weight` [24] -> [12].
    Shape,
    /// `mask` removed.
    MissingTensor,
    /// `extra.weight` added.
    ExtraTensor,
}

/// How a rejected checkpoint is repaired in phase C.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fix {
    None,
    /// Marker replaced by the good trainer_state.json (written in place).
    Marker,
    /// model.safetensors replaced by the good one (temp file + rename, like a copy tool).
    Weights,
    /// The index rewritten in place from the shards' actual contents.
    Index,
}

struct Kind {
    name: &'static str,
    step: u64,
    make: Make,
    /// Acceptable `reason` values (empty: must not be rejected at all).
    reasons: &'static [&'static str],
    /// The `error` must contain one of these (the file or tensor).
    names: &'static [&'static str],
    fix: Fix,
}

const SINGLE: &[&str] = &["model.safetensors"];
const INDEXED: &[&str] = &[
    "model.safetensors.index.json",
    "model-00002-of-00002.safetensors",
];
const TENSORS: &[&str] = &[
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.norm.weight",
    "tensor scale",
    "tensor empty",
    "position_ids",
    "tensor mask",
];

fn kinds() -> Vec<Kind> {
    use Make::*;
    let k = |name, step, make, reasons, names, fix| Kind {
        name,
        step,
        make,
        reasons,
        names,
        fix,
    };
    let inv: &'static [&'static str] = &["invalid"];
    vec![
        k(
            "truncated",
            300,
            Fixture("truncated"),
            &["incomplete", "invalid"],
            SINGLE,
            Fix::None,
        ),
        k(
            "corrupt-header",
            310,
            Fixture("corrupt-header"),
            inv,
            SINGLE,
            Fix::None,
        ),
        k(
            "header-too-large",
            320,
            Fixture("header-too-large"),
            inv,
            SINGLE,
            Fix::None,
        ),
        k("overlap", 330, Fixture("overlap"), inv, SINGLE, Fix::None),
        k("gap", 340, Fixture("gap"), inv, SINGLE, Fix::None),
        k("bad-size", 350, Fixture("bad-size"), inv, SINGLE, Fix::None),
        k("not-utf8", 360, Fixture("not-utf8"), inv, SINGLE, Fix::None),
        k(
            "duplicate-name",
            370,
            Fixture("duplicate-name"),
            inv,
            SINGLE,
            Fix::None,
        ),
        k(
            "index-missing-shard",
            380,
            Fixture("index-missing-shard"),
            &["incomplete", "invalid", "io"],
            &["model-00002-of-00002.safetensors"],
            Fix::None,
        ),
        k(
            "index-dotdot",
            390,
            Fixture("index-dotdot"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "index-absolute",
            400,
            Fixture("index-absolute"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "index-symlink-out",
            410,
            Fixture("index-symlink-out"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "index-disagree",
            420,
            Fixture("index-disagree"),
            inv,
            INDEXED,
            Fix::None,
        ),
        k(
            "dtype-f32",
            430,
            Variant("f32", &[]),
            &["mismatch"],
            TENSORS,
            Fix::None,
        ),
        k(
            "nan",
            440,
            Variant("bf16", &["--nonfinite", "nan"]),
            &["non_finite"],
            &["model.layers.0.self_attn.q_proj.weight"],
            Fix::None,
        ),
        k(
            "inf",
            450,
            Variant("bf16", &["--nonfinite", "inf"]),
            &["non_finite"],
            &["model.layers.0.self_attn.q_proj.weight"],
            Fix::None,
        ),
        k(
            "shape",
            460,
            Schema(SchemaEdit::Shape),
            &["mismatch"],
            &["model.norm.weight"],
            Fix::None,
        ),
        k(
            "missing-tensor",
            470,
            Schema(SchemaEdit::MissingTensor),
            &["mismatch"],
            &["mask"],
            Fix::None,
        ),
        k(
            "extra-tensor",
            480,
            Schema(SchemaEdit::ExtraTensor),
            &["mismatch"],
            &["extra.weight"],
            Fix::None,
        ),
        k("marker-empty", 600, Marker(b""), &[], &[], Fix::Marker),
        k(
            "marker-garbage",
            610,
            Marker(b"{not json"),
            &[],
            &[],
            Fix::Marker,
        ),
        k(
            "truncated-then-fixed",
            620,
            Fixture("truncated"),
            &["incomplete", "invalid"],
            SINGLE,
            Fix::Weights,
        ),
        k(
            "index-absolute-then-fixed",
            630,
            Fixture("index-absolute"),
            inv,
            INDEXED,
            Fix::Index,
        ),
    ]
}

/// Rewrite `<dir>/model.safetensors.index.json` in place from the shards' headers.
fn repair_index(dir: &Path) {
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut shards: Vec<String> = list_dir(dir)
        .into_iter()
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    shards.sort();
    let mut entries = BTreeMap::new();
    for sh in &shards {
        let bytes = std::fs::read(dir.join(sh)).expect("read shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("shard");
        for (n, v) in st.tensors() {
            total += v.data().len() as u64;
            entries.insert(n, sh.clone());
        }
    }
    for (n, sh) in entries {
        weight_map.insert(n, serde_json::Value::String(sh));
    }
    let v = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_vec_pretty(&v).unwrap();
    write_in_place(&dir.join("model.safetensors.index.json"), &text, FAST);
}

#[test]
fn hostile_inputs_rejected_once_and_daemon_keeps_going() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let good = env.join("good");
    let stage = env.mkdir("stage");
    let pristine = env.mkdir("pristine");
    let kinds = kinds();
    let g = |step: u64| good.join(format!("checkpoint-{step}"));
    let st = |step: u64| stage.join(format!("checkpoint-{step}"));

    // Good checkpoints (also the sources of the hostile ones, same step) and variants.
    let mut jobs = Vec::new();
    let mut good_steps: Vec<u64> = vec![100, 200, 700];
    good_steps.extend(kinds.iter().map(|k| k.step));
    for &step in &good_steps {
        jobs.push(make_args(&g(step), "bf16", step / 10, step, &["--no-edge"]));
    }
    for k in &kinds {
        if let Make::Variant(dtype, extra) = k.make {
            let mut e = vec!["--no-edge"];
            e.extend_from_slice(extra);
            jobs.push(make_args(&st(k.step), dtype, k.step / 10, k.step, &e));
        }
    }
    fixtures(&env, &jobs);
    let hostile: Vec<Vec<String>> = kinds
        .iter()
        .filter_map(|k| match k.make {
            Make::Fixture(kind) => Some(hostile_args(kind, &st(k.step), &g(k.step))),
            _ => None,
        })
        .collect();
    fixtures(&env, &hostile);
    for k in &kinds {
        match k.make {
            Make::Schema(edit) => {
                copy_tree(&g(k.step), &st(k.step));
                reserialize(
                    &st(k.step).join("model.safetensors"),
                    |ts| match edit {
                        SchemaEdit::Shape => {
                            let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
                            t.2 = vec![12];
                            t.3.truncate(24);
                        }
                        SchemaEdit::MissingTensor => ts.retain(|t| t.0 != "mask"),
                        SchemaEdit::ExtraTensor => ts.push((
                            "extra.weight".into(),
                            safetensors::Dtype::BF16,
                            vec![4],
                            vec![0; 8],
                        )),
                    },
                    pt_meta(),
                );
            }
            Make::Marker(bytes) => {
                copy_tree(&g(k.step), &st(k.step));
                std::fs::write(st(k.step).join("trainer_state.json"), bytes).unwrap();
            }
            _ => {}
        }
    }

    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let out = out_root.join("sma2");
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");

    // Phase A: the window is set by good checkpoints.
    let t_a = SystemTime::now();
    write_ckpt(&g(100), &watch.join("checkpoint-100"), FAST);
    write_ckpt(&g(200), &watch.join("checkpoint-200"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 200, t_a);

    // Phase B: every hostile checkpoint appears (renamed in whole, marker and all).
    let t_b = SystemTime::now();
    for k in &kinds {
        std::fs::rename(st(k.step), watch.join(format!("checkpoint-{}", k.step)))
            .expect("move hostile checkpoint into the watch dir");
    }
    let rejecting: Vec<&Kind> = kinds.iter().filter(|k| !k.reasons.is_empty()).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let log = d.log();
        let missing: Vec<&str> = rejecting
            .iter()
            .filter(|k| lines_for(&log, "checkpoint.rejected", k.step).is_empty())
            .map(|k| k.name)
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(d.alive(), "pmad died: {}\n{}", d.status_text(), d.dump(40));
        assert!(
            Instant::now() < deadline,
            "no checkpoint.rejected within {WAIT:?} for: {missing:?}\n{}",
            d.dump(60)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // At least 12 more scans: a rejection must not be logged again, a bad marker must not
    // turn into a rejection or an acceptance.
    std::thread::sleep(POLL * 12 + SETTLE);
    assert!(d.alive(), "pmad died: {}\n{}", d.status_text(), d.dump(40));
    let log_b = d.log();

    // Phase C: repair the fixable ones.
    let t_c = SystemTime::now();
    for k in &kinds {
        let dir = watch.join(format!("checkpoint-{}", k.step));
        match k.fix {
            Fix::None => {}
            Fix::Marker => {
                let b = std::fs::read(g(k.step).join("trainer_state.json")).unwrap();
                write_in_place(&dir.join("trainer_state.json"), &b, FAST);
            }
            Fix::Weights => {
                let tmp = dir.join("model.safetensors.partial");
                std::fs::copy(g(k.step).join("model.safetensors"), &tmp).unwrap();
                std::fs::rename(&tmp, dir.join("model.safetensors")).unwrap();
            }
            Fix::Index => repair_index(&dir),
        }
        if k.fix != Fix::None {
            copy_tree(&dir, &pristine.join(format!("checkpoint-{}", k.step)));
        }
    }
    for k in kinds.iter().filter(|k| k.fix != Fix::None) {
        expect_accepted(&mut d, k.step, t_c);
    }

    // Phase D: a good checkpoint after all of it is published.
    let t_d = SystemTime::now();
    write_ckpt(&g(700), &watch.join("checkpoint-700"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 700, t_d);
    std::thread::sleep(POLL * 12);
    let alive_at_end = d.alive();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();

    // Verdicts, kind by kind.
    let mut steps_in_outputs = BTreeSet::new();
    for dir in outputs(&out).values() {
        steps_in_outputs.extend(merge_steps(dir));
    }
    let mut report = Vec::new();
    let mut failed_kinds = Vec::new();
    for k in &kinds {
        let mut why = Vec::new();
        let rej = lines_for(&log, "checkpoint.rejected", k.step);
        let acc = lines_for(&log, "checkpoint.accepted", k.step);
        let acc_b = lines_for(&log_b, "checkpoint.accepted", k.step);
        if k.reasons.is_empty() {
            if !rej.is_empty() {
                why.push(format!(
                    "an unfinished marker is \"not yet\", but got {} checkpoint.rejected: {}",
                    rej.len(),
                    rej[0].line()
                ));
            }
        } else {
            if rej.len() != 1 {
                why.push(format!(
                    "{} checkpoint.rejected lines, expected exactly 1{}",
                    rej.len(),
                    rej.iter()
                        .map(|e| format!("\n      {}", e.line()))
                        .collect::<String>()
                ));
            }
            if let Some(r) = rej.first() {
                let reason = r.s("reason").unwrap_or("");
                if !k.reasons.contains(&reason) {
                    why.push(format!(
                        "reason {reason:?}, expected one of {:?}",
                        k.reasons
                    ));
                }
                let err = r.s("error").unwrap_or("");
                if !k.names.iter().any(|n| err.contains(n)) {
                    why.push(format!("error {err:?} names none of {:?}", k.names));
                }
            }
        }
        if !acc_b.is_empty() {
            why.push(format!("accepted before it was fixed: {}", acc_b[0].line()));
        }
        match k.fix {
            Fix::None => {
                if !acc.is_empty() {
                    why.push(format!("accepted: {}", acc[0].line()));
                }
                if steps_in_outputs.contains(&k.step) {
                    why.push("an output's merge.json lists its step".into());
                }
            }
            _ => match acc.as_slice() {
                [a] if a.t >= t_c => {}
                [] => why.push("not accepted after it was fixed".into()),
                many => why.push(format!(
                    "{} checkpoint.accepted lines, expected 1 after the fix",
                    many.len()
                )),
            },
        }
        let verdict = if why.is_empty() { "ok" } else { "FAIL" };
        report.push(format!(
            "  {:<26} step {:<4} rejected x{} reason {:<12} accepted x{}  {verdict}",
            k.name,
            k.step,
            rej.len(),
            rej.first().and_then(|r| r.s("reason")).unwrap_or("-"),
            acc.len()
        ));
        if !why.is_empty() {
            failed_kinds.push(format!(
                "{} (step {}):\n    {}",
                k.name,
                k.step,
                why.join("\n    ")
            ));
        }
    }
    eprintln!("hostile inputs, kind by kind:\n{}", report.join("\n"));

    let mut fails = failed_kinds;
    if !alive_at_end || code != Some(0) {
        fails.push(format!(
            "daemon: alive at end {alive_at_end}, shutdown {code:?}"
        ));
    }
    let errs = err_lines(&log);
    if !errs.is_empty() {
        fails.push(format!("ERROR lines in the log:\n{}", errs.join("\n")));
    }
    let bad = d.non_json_lines();
    if !bad.is_empty() {
        fails.push(format!("stdout lines that are not JSON events: {bad:?}"));
    }
    if latest(&out).as_deref() != Some("step-700") {
        fails.push(format!("LATEST is {:?}, expected step-700", latest(&out)));
    }
    // Every output is right, with the fixed checkpoints' final contents.
    let src_of = |step: u64| {
        let p = pristine.join(format!("checkpoint-{step}"));
        if p.exists() {
            p
        } else {
            g(step)
        }
    };
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(step, dir)| OracleCheck {
            label: format!("sma2 step-{step}"),
            rec: SMA2,
            inputs: merge_steps(&dir).iter().map(|x| src_of(*x)).collect(),
            out: dir,
        })
        .collect();
    fails.extend(run_oracle(&env, &checks));
    assert!(
        fails.is_empty(),
        "hostile inputs ({} kinds, phase B started at {t_b:?}):\n{}\n\nper kind:\n{}\n{}",
        kinds.len(),
        fails.join("\n"),
        report.join("\n"),
        d.dump(80)
    );
}

// ============================================================ T4: slow writer, vanishing dirs

#[test]
fn slow_in_place_writer_is_never_accepted_early() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let src = env.join("src");
    let ck = |step: u64| src.join(format!("checkpoint-{step}"));
    let jobs: Vec<Vec<String>> = [100u64, 200, 300]
        .iter()
        .map(|&st| make_args(&ck(st), "bf16", st / 100, st, &["--no-edge"]))
        .collect();
    fixtures(&env, &jobs);
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let t0 = SystemTime::now();
    write_ckpt(&ck(100), &watch.join("checkpoint-100"), FAST);
    expect_accepted(&mut d, 100, t0);

    // A (step 200): HF order, marker last, weights in 12 pieces 100 ms apart (~1.3 s).
    // B (step 300): a valid marker and every other file FIRST (like a checkpoint rewritten in
    // place, whose old trainer_state.json is still there), then the weights in 4 pieces with
    // pauses longer than settle: the directory looks finished and quiet while the weights
    // file is still short. Only its length can tell.
    let a = {
        let (src, dst) = (ck(200), watch.join("checkpoint-200"));
        std::thread::spawn(move || {
            let size = std::fs::metadata(src.join("model.safetensors"))
                .unwrap()
                .len() as usize;
            write_ckpt(
                &src,
                &dst,
                Pace {
                    chunk: size.div_ceil(12),
                    pause: Duration::from_millis(100),
                },
            )
        })
    };
    let b = {
        let (src, dst) = (ck(300), watch.join("checkpoint-300"));
        std::thread::spawn(move || {
            let start = SystemTime::now();
            std::fs::create_dir_all(&dst).unwrap();
            let mut names = ckpt_files(&src);
            names.retain(|n| n != "model.safetensors");
            names.sort_by_key(|n| n != "trainer_state.json");
            for n in names {
                let bytes = std::fs::read(src.join(&n)).unwrap();
                write_in_place(&dst.join(&n), &bytes, FAST);
            }
            let w = std::fs::read(src.join("model.safetensors")).unwrap();
            let chunk = w.len().div_ceil(4);
            let mut f = std::fs::File::create(dst.join("model.safetensors")).unwrap();
            for (k, c) in w.chunks(chunk).enumerate() {
                if k > 0 {
                    std::thread::sleep(SETTLE * 2 + POLL);
                }
                f.write_all(c).unwrap();
            }
            drop(f);
            (start, SystemTime::now())
        })
    };
    let (a_start, a_end) = a.join().expect("writer A");
    let (b_start, b_end) = b.join().expect("writer B");
    let acc_a = expect_accepted(&mut d, 200, a_start);
    let acc_b = expect_accepted(&mut d, 300, b_start);
    std::thread::sleep(POLL * 5);
    let alive = d.alive();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();

    let mut fails = Vec::new();
    for (name, step, end, acc) in [("A", 200, a_end, &acc_a), ("B", 300, b_end, &acc_b)] {
        if acc.t < end {
            fails.push(format!(
                "writer {name}: step {step} accepted {} ms BEFORE the writer finished: {}",
                ms_since(end, acc.t),
                acc.line()
            ));
        }
        let n = lines_for(&log, "checkpoint.accepted", step).len();
        if n != 1 {
            fails.push(format!(
                "writer {name}: {n} checkpoint.accepted lines for step {step}"
            ));
        }
    }
    let rej_a = lines_for(&log, "checkpoint.rejected", 200);
    if !rej_a.is_empty() {
        fails.push(format!(
            "writer A (marker last) was rejected while being written: {}",
            rej_a[0].line()
        ));
    }
    let rej_b = lines_for(&log, "checkpoint.rejected", 300);
    for r in &rej_b {
        if r.s("reason") != Some("incomplete") {
            fails.push(format!(
                "writer B: rejection that is not \"incomplete\": {}",
                r.line()
            ));
        }
    }
    eprintln!(
        "slow writer: A accepted {} ms after it finished; B accepted {} ms after it finished \
         ({} \"incomplete\" rejection(s) while it paused with its marker present)",
        ms_since(acc_a.t, a_end),
        ms_since(acc_b.t, b_end),
        rej_b.len()
    );
    if !alive || code != Some(0) {
        fails.push(format!("daemon: alive {alive}, shutdown {code:?}"));
    }
    fails.extend(err_lines(&log));
    let out = out_root.join("sma2");
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(st, dir)| OracleCheck {
            label: format!("sma2 step-{st}"),
            rec: SMA2,
            inputs: merge_steps(&dir).iter().map(|x| ck(*x)).collect(),
            out: dir,
        })
        .collect();
    // 200 and 300 land in either order; the newest output averages both.
    match latest(&out) {
        Some(l) if l == "step-300" && merge_steps(&out.join(&l)) == [200, 300] => {}
        other => fails.push(format!(
            "LATEST {other:?} is not step-300 over steps [200, 300]"
        )),
    }
    fails.extend(run_oracle(&env, &checks));
    assert!(
        fails.is_empty(),
        "slow writer:\n{}\n{}",
        fails.join("\n"),
        d.dump(50)
    );
}

#[test]
fn vanishing_dirs_mid_scan_are_not_errors() {
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let out_root = env.mkdir("out");
    let src = env.join("src");
    let ck = |name: &str| src.join(name);
    fixtures(
        &env,
        &[
            make_args(&ck("checkpoint-100"), "bf16", 1, 100, &["--no-edge"]),
            make_args(&ck("checkpoint-200"), "bf16", 2, 200, &["--no-edge"]),
            make_args(&ck("checkpoint-150"), "bf16", 15, 150, &["--no-edge"]),
            // Same tensors, two shards: more files to open, so more room for a race.
            make_args(
                &ck("sharded-150"),
                "bf16",
                15,
                150,
                &["--no-edge", "--sharded", "2"],
            ),
        ],
    );
    let cfg = write_config(&env, &watch, &[SMA2], &out_root, None);
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let t0 = SystemTime::now();
    write_ckpt(&ck("checkpoint-100"), &watch.join("checkpoint-100"), FAST);
    expect_accepted(&mut d, 100, t0);

    // ~3 s of churn: checkpoint-101, -102, ... each created and removed with rm -rf:
    // (0) before it can settle, (1) around the time pmad may open it, (2) the moment pmad
    // maps one of its files. (Fresh names: a name deleted and re-created between two scans
    // is a rewrite, not a vanished directory; rotation_and_rewrite covers that.)
    let pid = d.pid();
    let (single, sharded) = (ck("checkpoint-150"), ck("sharded-150"));
    let churn_end = Instant::now() + Duration::from_secs(3);
    let mut rounds = [0u32; 3];
    let mut hit_mapped = 0;
    let mut i = 0u64;
    while Instant::now() < churn_end {
        let mode = (i % 3) as usize;
        let from = if i % 2 == 0 { &single } else { &sharded };
        let name = format!("checkpoint-{}", 101 + i);
        let churn = watch.join(&name);
        write_ckpt(from, &churn, FAST);
        match mode {
            0 => std::thread::sleep(Duration::from_millis(i * 37 % 150)),
            1 => std::thread::sleep(SETTLE + Duration::from_millis(i * 53 % 200)),
            _ => {
                let needle = format!("/{name}/");
                let until = Instant::now() + Duration::from_millis(800);
                while Instant::now() < until && !maps_contain(pid, &needle) {
                    std::thread::sleep(Duration::from_micros(300));
                }
                if maps_contain(pid, &needle) {
                    hit_mapped += 1;
                }
            }
        }
        std::fs::remove_dir_all(&churn).expect("rm -rf the churn dir");
        rounds[mode] += 1;
        i += 1;
    }
    let churned = |st: u64| (101..101 + i).contains(&st);
    assert!(
        d.alive(),
        "pmad died during the churn: {}\n{}",
        d.status_text(),
        d.dump(40)
    );
    let t1 = SystemTime::now();
    write_ckpt(&ck("checkpoint-200"), &watch.join("checkpoint-200"), FAST);
    expect_emitted(&mut d, &out_root, "sma2", 200, t1);
    std::thread::sleep(POLL * 3);
    let alive = d.alive();
    let code = d.terminate(Duration::from_secs(10));
    let log = d.log();
    let count = |ev: &str| {
        log.iter()
            .filter(|e| e.event() == ev && e.step().is_some_and(churned))
            .count()
    };
    eprintln!(
        "vanishing dirs: {i} rounds (quick {}, around settle {}, at mapping {} of which {} \
         caught mapped); discovered {}, accepted {}, source.vanished {}",
        rounds[0],
        rounds[1],
        rounds[2],
        hit_mapped,
        count("checkpoint.discovered"),
        count("checkpoint.accepted"),
        count("source.vanished")
    );
    let mut fails = Vec::new();
    if !alive || code != Some(0) {
        fails.push(format!("daemon: alive {alive}, shutdown {code:?}"));
    }
    for e in &log {
        let noisy = matches!(e.level(), "WARN" | "ERROR");
        if noisy && e.step().is_some_and(churned) {
            fails.push(format!(
                "warning/error for a directory that was deleted: {}",
                e.line()
            ));
        } else if e.level() == "ERROR" {
            fails.push(format!("ERROR line: {}", e.line()));
        }
    }
    for st in (101..101 + i).filter(|st| lines_for(&log, "source.vanished", *st).len() > 1) {
        fails.push(format!(
            "source.vanished logged more than once for step {st}"
        ));
    }
    for (st, dir) in outputs(&out_root.join("sma2")) {
        for aux in ["config.json", "tokenizer_config.json"] {
            if !dir.join(aux).is_file() {
                fails.push(format!(
                    "output step-{st} was published without {aux} (its newest input \
                     checkpoint-{st} was deleted after it was accepted; aux files are read from \
                     the directory at emission time, not pinned)"
                ));
            }
        }
    }
    // Whatever pmad took from the churn dirs, every output is right (all of them hold the
    // tensors of checkpoint-150, in one file or two shards).
    let out = out_root.join("sma2");
    let checks: Vec<OracleCheck> = outputs(&out)
        .into_iter()
        .map(|(st, dir)| OracleCheck {
            label: format!("sma2 step-{st}"),
            rec: SMA2,
            inputs: merge_steps(&dir)
                .iter()
                .map(|x| {
                    if churned(*x) {
                        single.clone()
                    } else {
                        ck(&format!("checkpoint-{x}"))
                    }
                })
                .collect(),
            out: dir,
        })
        .collect();
    // Missing aux files are reported above; the oracle's "not a copy" lines for them would
    // only repeat it. Everything else it finds counts.
    for f in run_oracle(&env, &checks) {
        let repeats = |l: &str| {
            l.strip_prefix("oracle: MISMATCH ")
                .and_then(|r| r.split_once(": not a copy of "))
                .is_some_and(|(p, _)| !Path::new(p).exists())
        };
        let mism: Vec<&str> = f
            .lines()
            .filter(|l| l.starts_with("oracle: MISMATCH"))
            .collect();
        if mism.is_empty() || !mism.iter().all(|l| repeats(l)) {
            fails.push(f);
        }
    }
    assert!(
        fails.is_empty(),
        "vanishing dirs:\n{}\n{}",
        fails.join("\n"),
        d.dump(60)
    );
}

// ===================================================================== T5: rotation, rewrite

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

// ===================================================================== promise 5

/// Inode numbers of everything under `dir` (best effort: pmad is writing there).
fn inodes_under(dir: &Path) -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                out.insert(m.ino());
                if m.is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// Fds of `pid` open for writing on paths under `watch` (outside `own`), and POSIX/flock
/// locks it holds.
fn write_fds_and_locks(pid: u32, watch: &Path, own: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let (w, o) = (s(watch), s(own));
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = s(&target);
            if !t.starts_with(&w) || t.starts_with(&o) {
                continue;
            }
            let fd = e.file_name().to_string_lossy().into_owned();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            if flags & 3 != 0 {
                found.push(format!("fd {fd} open for writing (flags {flags:o}) on {t}"));
            }
        }
    }
    if let Ok(locks) = std::fs::read_to_string("/proc/locks") {
        // pmad may lock its own files (the state dir's `lock`): match locks by inode.
        let own_inodes = inodes_under(own);
        for l in locks.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(4) != Some(&pid.to_string().as_str()) {
                continue;
            }
            let ino = f
                .get(5)
                .and_then(|x| x.rsplit(':').next())
                .and_then(|x| x.parse::<u64>().ok());
            if !ino.is_some_and(|i| own_inodes.contains(&i)) {
                found.push(format!("lock held outside pmad's own dirs: {l}"));
            }
        }
    }
    found
}

#[test]
fn watched_tree_is_never_modified() {
    const SAVE_TOTAL_LIMIT: usize = 3;
    let recipes = [
        Rec {
            name: "sma3",
            method: "sma",
            window: 3,
        },
        Rec {
            name: "ema",
            method: "ema",
            window: 0,
        },
    ];
    let env = TestEnv::new();
    let watch = env.mkdir("watch");
    let src = env.join("src");
    let ck = |step: u64| src.join(format!("checkpoint-{step}"));
    let mut jobs: Vec<Vec<String>> = [100u64, 200, 300, 400, 500, 600]
        .iter()
        .map(|&st| make_args(&ck(st), "bf16", st / 100, st, &["--no-edge"]))
        .collect();
    jobs.push(make_args(&ck(250), "bf16", 25, 250, &["--no-edge"]));
    fixtures(&env, &jobs);
    fixtures(
        &env,
        &[hostile_args(
            "truncated",
            &env.join("hostile-250"),
            &ck(250),
        )],
    );

    // pmad's own directories live inside the watched tree.
    let own = env.mkdir("watch/pmad-own");
    let out_root = own.join("out");
    let state = own.join("state");
    // The tree before pmad starts: checkpoints, a rejected one, a trainer temp dir, logs, a
    // link, a file with a checkpoint-like name.
    copy_tree(&ck(100), &watch.join("checkpoint-100"));
    copy_tree(&ck(200), &watch.join("checkpoint-200"));
    copy_tree(&env.join("hostile-250"), &watch.join("checkpoint-250"));
    let tmp = env.mkdir("watch/tmp-checkpoint-999");
    let w = std::fs::read(ck(300).join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    env.mkdir("watch/runs/Nov27");
    std::fs::write(
        watch.join("runs/Nov27/events.out.tfevents.1.host"),
        b"\x00\x01tf",
    )
    .unwrap();
    std::fs::write(watch.join("README.md"), b"# run\n").unwrap();
    std::fs::write(watch.join("checkpoint-777"), b"not a directory\n").unwrap();
    std::os::unix::fs::symlink("checkpoint-200", watch.join("last-checkpoint")).unwrap();
    std::fs::set_permissions(
        watch.join("README.md"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    // Settle the tree's timestamps in the past so any touch shows.
    std::thread::sleep(Duration::from_millis(20));
    let mut model = tree_snapshot(&watch, &["pmad-own"]);

    let cfg = write_config(&env, &watch, &recipes, &out_root, Some(&state));
    let mut d = Daemon::start(env.path(), &cfg, "pmad");
    d.expect("daemon.started", WAIT, |e| e.event() == "daemon.started");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, watch, own, pid) = (stop.clone(), watch.clone(), own.clone(), d.pid());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                seen.extend(write_fds_and_locks(pid, &watch, &own));
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (samples, seen)
        })
    };
    let t0 = SystemTime::now();
    expect_accepted(&mut d, 200, t0);

    // The producer: each new checkpoint is written under a temp name (which pmad ignores),
    // recorded, renamed into place; then the oldest are removed (save_total_limit = 3).
    for step in [300u64, 400, 500, 600] {
        let staged = format!("tmp-checkpoint-{step}");
        let final_name = format!("checkpoint-{step}");
        write_ckpt(&ck(step), &watch.join(&staged), FAST);
        let snap = tree_snapshot(&watch.join(&staged), &[]);
        std::fs::rename(watch.join(&staged), watch.join(&final_name)).unwrap();
        for (rel, st) in snap {
            let key = if rel.is_empty() {
                final_name.clone()
            } else {
                format!("{final_name}/{rel}")
            };
            model.insert(key, st);
        }
        // The rename changed the directory's ctime (and nothing else).
        model.insert(
            final_name.clone(),
            path_state(&watch.join(&final_name)).unwrap(),
        );
        let mut present: Vec<u64> = list_dir(&watch)
            .iter()
            .filter(|n| watch.join(n).is_dir() && !watch.join(n).is_symlink())
            .filter_map(|n| n.strip_prefix("checkpoint-")?.parse().ok())
            .collect();
        present.sort();
        while present.len() > SAVE_TOTAL_LIMIT {
            let old = present.remove(0);
            let name = format!("checkpoint-{old}");
            std::fs::remove_dir_all(watch.join(&name)).unwrap();
            model.retain(|k, _| k != &name && !k.starts_with(&format!("{name}/")));
        }
        model.insert(String::new(), path_state(&watch).unwrap());
        let acc = expect_accepted(&mut d, step, t0);
        expect_emitted(&mut d, &out_root, "sma3", step, acc.t);
    }
    expect_emitted(&mut d, &out_root, "ema", 600, t0);
    std::thread::sleep(POLL * 5);
    let code = d.terminate(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let (samples, writes) = sampler.join().unwrap();
    let after = tree_snapshot(&watch, &["pmad-own"]);
    let mut fails = diff_snapshots(&model, &after);
    if code != Some(0) {
        fails.push(format!("shutdown code {code:?}"));
    }
    fails.extend(writes.iter().map(|w| format!("while running: {w}")));
    let published = outputs(&out_root.join("sma3")).len() + outputs(&out_root.join("ema")).len();
    if published < 5 || !state.is_dir() {
        fails.push(format!(
            "the run did too little to count: {published} outputs, state dir exists: {}",
            state.is_dir()
        ));
    }
    eprintln!(
        "watched tree: {} paths compared, {samples} fd/lock samples, {published} outputs",
        after.len()
    );
    assert!(
        fails.is_empty(),
        "the watched tree changed (pmad-own/ excluded):\n{}\n{}",
        fails.join("\n"),
        d.dump(40)
    );
}
