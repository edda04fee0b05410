//! What the integration tests share.
//!
//! - [`TestEnv`]: a private temp directory per test (kept on failure when `PMAD_TEST_KEEP=1`).
//! - [`pmad`] / [`TestEnv::pmad`] / [`pmad_cmd`]: run the real binary (`CARGO_BIN_EXE_pmad`),
//!   capturing stdout, stderr and the exit code ([`Run`]).
//! - [`Daemon`] ([`daemon`]): the one way to run `pmad run` as a process: environment
//!   (`PMAD_FAULT`), log captured to a file, wait for events, SIGTERM / SIGKILL / restart.
//! - [`Config`] and [`Recipe`] ([`config`]): the one writer of `pmad run` configs.
//! - [`Event`] ([`log`]): the one parser of pmad's log, text and JSON formats, and
//!   [`wait_for_event`].
//! - [`python`]: the venv python of `tests/py/setup_venv.sh`, set up once per test process;
//!   [`TestEnv::make`], [`TestEnv::hostile`], [`TestEnv::oracle`] wrap `tests/py/fixtures.py`
//!   and `tests/py/oracle.py`; [`py_script_batch_parallel`] runs many calls in few processes.
//! - [`load_tensors`]: read a checkpoint with the reference `safetensors` crate (never pmad).
//! - [`tree`]: snapshots of a directory tree, and what a process has mapped.

pub mod config;
pub mod daemon;
pub mod log;
pub mod tree;

pub use config::{Config, Recipe};
pub use daemon::Daemon;
pub use log::{wait_for_event, Event};

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::SystemTime;

/// The repository root (where Cargo.toml and tests/py live).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The pmad binary built for this test run.
pub fn pmad_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pmad"))
}

/// A finished process: exit code (-1 if killed by a signal), stdout and stderr.
#[derive(Debug, Clone)]
pub struct Run {
    /// What was run, for messages.
    pub cmdline: String,
    /// Exit code, or -1 when the process died from a signal.
    pub code: i32,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
}

impl Run {
    /// A readable dump for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "$ {}\n-- exit code: {}\n-- stdout:\n{}\n-- stderr:\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }

    /// Panic (with the full dump) unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit code\n{}", self.describe());
        self
    }

    /// Panic unless the process succeeded.
    #[track_caller]
    pub fn expect_ok(&self) -> &Self {
        self.expect_code(0)
    }
}

/// Run a command with stdin closed, capturing everything.
pub fn run(cmd: &mut Command) -> Run {
    let cmdline = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
    let code = match out.status.code() {
        Some(c) => c,
        None => {
            use std::os::unix::process::ExitStatusExt;
            eprintln!("{cmdline}: killed by signal {:?}", out.status.signal());
            -1
        }
    };
    Run {
        cmdline,
        code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run pmad with `args` in `cwd`.
pub fn pmad<I, S>(cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = pmad_cmd(cwd);
    cmd.args(args);
    run(&mut cmd)
}

/// A `Command` for the pmad binary in `cwd`, without the test's own `RUST_LOG` and
/// `PMAD_FAULT` (a test sets what it wants).
pub fn pmad_cmd(cwd: &Path) -> Command {
    let mut cmd = Command::new(pmad_bin());
    cmd.current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("PMAD_FAULT");
    cmd
}

/// The venv python (numpy, safetensors, ml_dtypes), created by `tests/py/setup_venv.sh` once
/// per test process. Panics with the script's output if the setup fails.
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let r = run(Command::new("bash")
            .arg("tests/py/setup_venv.sh")
            .current_dir(repo_root()));
        assert_eq!(r.code, 0, "setup_venv.sh failed\n{}", r.describe());
        let line = r
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("setup_venv.sh printed no path\n{}", r.describe()));
        let py = PathBuf::from(line.trim());
        assert!(
            py.exists(),
            "setup_venv.sh printed {py:?}, which does not exist"
        );
        py
    })
}

/// Run one of the scripts in tests/py with the venv python.
pub fn py_script<I, S>(script: &str, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/py").join(script))
        .args(args)
        .current_dir(cwd);
    run(&mut cmd)
}

/// A test's private temp directory plus helpers that run pmad and the Python tools in it.
pub struct TestEnv {
    tmp: Option<tempfile::TempDir>,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// A fresh temp directory.
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("pmad-cli-test-")
            .tempdir()
            .expect("create temp dir");
        TestEnv { tmp: Some(tmp) }
    }

    /// The temp directory.
    pub fn path(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir").path()
    }

    /// `path()/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path().join(rel)
    }

    /// Create (and return) an empty directory `rel`.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Run pmad in the temp dir.
    pub fn pmad<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        pmad(self.path(), args)
    }

    /// `pmad merge <opts> --out OUT INPUTS...`.
    pub fn merge(&self, opts: &[&str], out: &Path, inputs: &[PathBuf]) -> Run {
        let mut args: Vec<&OsStr> = vec![OsStr::new("merge")];
        args.extend(opts.iter().map(OsStr::new));
        args.push(OsStr::new("--out"));
        args.push(out.as_os_str());
        args.extend(inputs.iter().map(|p| p.as_os_str()));
        self.pmad(args)
    }

    /// `fixtures.py make --out rel --dtype D --seed S --step N EXTRA...`; panics on failure.
    pub fn make(&self, rel: &str, dtype: &str, seed: u32, step: u32, extra: &[&str]) -> PathBuf {
        let out = self.join(rel);
        let (seed, step) = (seed.to_string(), step.to_string());
        let head = ["make", "--dtype", dtype, "--seed", &seed, "--step", &step];
        let mut args: Vec<&OsStr> = head.iter().map(OsStr::new).collect();
        args.push(OsStr::new("--out"));
        args.push(out.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        py_script("fixtures.py", self.path(), args).expect_ok();
        out
    }

    /// `n` checkpoints `<dir>/checkpoint-100, -200, ...` (seeds 1..=n), oldest first.
    pub fn make_series(&self, dir: &str, dtype: &str, n: u32, extra: &[&str]) -> Vec<PathBuf> {
        (1..=n)
            .map(|i| {
                self.make(
                    &format!("{dir}/checkpoint-{}", 100 * i),
                    dtype,
                    i,
                    100 * i,
                    extra,
                )
            })
            .collect()
    }

    /// `fixtures.py hostile --kind K --out rel --from good`; returns the dir and the
    /// description fixtures.py printed.
    pub fn hostile(&self, kind: &str, rel: &str, from: &Path) -> (PathBuf, String) {
        let out = self.join(rel);
        let r = py_script(
            "fixtures.py",
            self.path(),
            [
                OsStr::new("hostile"),
                OsStr::new("--kind"),
                OsStr::new(kind),
                OsStr::new("--out"),
                out.as_os_str(),
                OsStr::new("--from"),
                from.as_os_str(),
            ],
        );
        r.expect_ok();
        (out, r.stdout.trim().to_string())
    }

    /// `oracle.py check OPTS OUT INPUTS...` (not asserted).
    pub fn oracle(&self, opts: &[&str], out: &Path, inputs: &[PathBuf]) -> Run {
        let mut args: Vec<&OsStr> = vec![OsStr::new("check")];
        args.extend(opts.iter().map(OsStr::new));
        args.push(out.as_os_str());
        args.extend(inputs.iter().map(|p| p.as_os_str()));
        py_script("oracle.py", self.path(), args)
    }

    /// Run a Python snippet with the venv python (`sys.argv[1:]` = args).
    pub fn python<I, S>(&self, code: &str, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(python());
        cmd.arg("-c").arg(code).args(args).current_dir(self.path());
        run(&mut cmd)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("PMAD_TEST_KEEP").is_some() {
            if let Some(t) = self.tmp.take() {
                eprintln!("PMAD_TEST_KEEP: kept {}", t.keep().display());
            }
        }
    }
}

/// Tensors every fixture checkpoint holds (fixtures.py FLOAT_TENSORS + integer/bool ones).
pub const FIXTURE_TENSORS: [&str; 8] = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.norm.weight",
    "scale",
    "empty",
    "position_ids",
    "mask",
];
/// Panic with every collected failure at once (tests that check many cases report all of
/// them, not just the first).
#[track_caller]
pub fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Names of the entries of `dir`, sorted (empty if it does not exist).
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("read_dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// One tensor as read by the reference reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefTensor {
    /// Dtype as written in the header ("BF16", "F32", "I64", "BOOL", ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Raw little-endian data bytes.
    pub data: Vec<u8>,
    /// File it came from (file name only).
    pub file: String,
}

/// Safetensors files of a checkpoint: a bare file, `model.safetensors`, or the shards named
/// by `model.safetensors.index.json`.
pub fn weight_files(ckpt: &Path) -> Vec<PathBuf> {
    if ckpt.is_file() {
        return vec![ckpt.to_path_buf()];
    }
    let index = ckpt.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).expect("read index"))
                .expect("index JSON");
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .expect("weight_map")
            .values()
            .map(|f| f.as_str().expect("shard name").to_string())
            .collect();
        files.sort();
        files.dedup();
        return files.iter().map(|f| ckpt.join(f)).collect();
    }
    vec![ckpt.join("model.safetensors")]
}

/// Every tensor of a checkpoint, read with the reference `safetensors` crate.
pub fn load_tensors(ckpt: &Path) -> BTreeMap<String, RefTensor> {
    let mut out = BTreeMap::new();
    for f in weight_files(ckpt) {
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: reference reader: {e:?}", f.display()));
        for (name, view) in st.tensors() {
            let t = RefTensor {
                dtype: format!("{:?}", view.dtype()),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
                file: f.file_name().unwrap().to_string_lossy().into_owned(),
            };
            assert!(
                out.insert(name.clone(), t).is_none(),
                "{name} twice in {}",
                ckpt.display()
            );
        }
    }
    out
}

/// The `__metadata__` of one safetensors file.
pub fn file_metadata(file: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("{}: reference reader: {e:?}", file.display()));
    meta.metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Parse a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: bad JSON: {e}", path.display()))
}

/// Python driver for [`py_script_batch`]: loads the script as a module and calls its `main()`
/// once per argv, capturing stdout/stderr and the exit code of each call.
const BATCH_DRIVER: &str = r#"
import contextlib, importlib.util, io, json, sys, traceback
script, jobs_file = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("pmad_batch_target", script)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with open(jobs_file) as f:
    jobs = json.load(f)
results = []
for argv in jobs:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script] + argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            mod.main()
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 3
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, sys.stdout)
"#;

/// Run `tests/py/<script>`'s `main()` once per argv in ONE venv python process (saving the
/// interpreter and numpy start-up of each call), as if each were `script argv...`. Returns one
/// [`Run`] per argv, in order; the exit code is the one `main()` raised with `SystemExit`
/// (0 when it returned, 3 when it raised anything else). Panics if the driver itself fails.
pub fn py_script_batch(script: &str, cwd: &Path, argvs: &[Vec<String>]) -> Vec<Run> {
    if argvs.is_empty() {
        return Vec::new();
    }
    let script_path = repo_root().join("tests/py").join(script);
    let mut jobs = tempfile::Builder::new()
        .prefix(".py-batch-")
        .suffix(".json")
        .tempfile_in(cwd)
        .expect("create batch job file");
    serde_json::to_writer(&mut jobs, argvs).expect("write batch job file");
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(BATCH_DRIVER)
        .arg(&script_path)
        .arg(jobs.path())
        .current_dir(cwd);
    let r = run(&mut cmd);
    assert_eq!(r.code, 0, "python batch driver failed\n{}", r.describe());
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("batch driver output is not JSON: {e}\n{}", r.describe()));
    assert_eq!(v.len(), argvs.len(), "batch driver returned a wrong count");
    v.into_iter()
        .zip(argvs)
        .map(|(res, argv)| Run {
            cmdline: format!("{} {}", script_path.display(), argv.join(" ")),
            code: res["code"].as_i64().unwrap_or(-1) as i32,
            stdout: res["stdout"].as_str().unwrap_or_default().to_string(),
            stderr: res["stderr"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// [`py_script_batch`] split over `parallel` python processes (results stay in order).
pub fn py_script_batch_parallel(
    script: &str,
    cwd: &Path,
    argvs: &[Vec<String>],
    parallel: usize,
) -> Vec<Run> {
    let parallel = parallel.max(1).min(argvs.len().max(1));
    let per = argvs.len().div_ceil(parallel).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = argvs
            .chunks(per)
            .map(|chunk| s.spawn(move || py_script_batch(script, cwd, chunk)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("batch thread panicked"))
            .collect()
    })
}

/// A path as a string (for messages, TOML and comparisons with log fields).
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Milliseconds from `base` to `t` (negative when `t` is earlier).
pub fn ms_since(t: SystemTime, base: SystemTime) -> i64 {
    match t.duration_since(base) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Steps as pmad's `merge.emitted` line writes them: `100..300`, `200`, or `-` for none.
pub fn step_span(steps: &[u64]) -> String {
    match (steps.first(), steps.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}..{b}"),
        (Some(a), _) => a.to_string(),
        _ => "-".into(),
    }
}

/// The step of a `<prefix><step>` name (`checkpoint-300`, `step-300`).
pub fn step_of(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// Published outputs `step-N` of an out_dir, by step.
pub fn outputs(out_dir: &Path) -> BTreeMap<u64, PathBuf> {
    list_dir(out_dir)
        .into_iter()
        .filter_map(|n| Some((step_of(&n, "step-")?, out_dir.join(n))))
        .collect()
}

/// Copy a directory tree (files, dirs, and symlinks as links).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for n in list_dir(src) {
        let (a, b) = (src.join(&n), dst.join(&n));
        let m = std::fs::symlink_metadata(&a).expect("stat");
        if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&a).unwrap(), &b).expect("symlink");
        } else if m.is_dir() {
            copy_tree(&a, &b);
        } else {
            std::fs::copy(&a, &b).expect("copy");
        }
    }
}
