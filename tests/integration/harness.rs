//! Shared harness for pmad's CLI integration tests.
//!
//! - [`TestEnv`]: a private temp directory per test (kept on failure when `PMAD_TEST_KEEP=1`).
//! - [`pmad`] / [`TestEnv::pmad`]: run the real binary (`CARGO_BIN_EXE_pmad`), capturing
//!   stdout, stderr and the exit code.
//! - [`python`]: the venv python of `tests/py/setup_venv.sh`, set up once per test process.
//! - [`TestEnv::make`], [`TestEnv::hostile`], [`TestEnv::oracle`]: wrappers around
//!   `tests/py/fixtures.py` and `tests/py/oracle.py`.
//! - [`load_tensors`]: read a checkpoint with the reference `safetensors` crate (never pmad).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

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
    let mut cmd = Command::new(pmad_bin());
    cmd.args(args).current_dir(cwd).env_remove("RUST_LOG");
    run(&mut cmd)
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

// =============================================================================================
// Daemon-process harness (added for tests/fault_inputs.rs). Additive block: everything below
// is self-contained (fully qualified paths, no new imports above).
// =============================================================================================

/// One JSON log line of `pmad run` (`log.format = "json"`, fields flattened).
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The parsed line.
    pub v: serde_json::Value,
    /// Its `timestamp` (wall clock, comparable with `SystemTime::now()` in the test).
    pub t: std::time::SystemTime,
}

impl LogLine {
    /// The `event` field ("" when absent).
    pub fn event(&self) -> &str {
        self.v["event"].as_str().unwrap_or("")
    }
    /// The `level` field ("INFO", "WARN", "ERROR", ...).
    pub fn level(&self) -> &str {
        self.v["level"].as_str().unwrap_or("")
    }
    /// The `step` field.
    pub fn step(&self) -> Option<u64> {
        self.v["step"].as_u64()
    }
    /// A string field.
    pub fn s(&self, k: &str) -> Option<&str> {
        self.v[k].as_str()
    }
    /// An unsigned integer field.
    pub fn u(&self, k: &str) -> Option<u64> {
        self.v[k].as_u64()
    }
    /// `event` is `ev` and `step` is `step`.
    pub fn is(&self, ev: &str, step: u64) -> bool {
        self.event() == ev && self.step() == Some(step)
    }
    /// The line as JSON text.
    pub fn line(&self) -> String {
        self.v.to_string()
    }
}

/// Parse the complete lines of pmad's JSON stdout. Returns the events and the lines that are
/// not JSON events (which a JSON log must not have).
pub fn parse_log(text: &str) -> (Vec<LogLine>, Vec<String>) {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut evs = Vec::new();
    let mut bad = Vec::new();
    for line in complete.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                let t = humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()?;
                v["event"].as_str()?;
                Some(LogLine { v, t })
            });
        match parsed {
            Some(e) => evs.push(e),
            None => bad.push(line.to_string()),
        }
    }
    (evs, bad)
}

/// `pmad run --config F` as a child process, stdout/stderr captured to files in its dir.
/// SIGKILLed on drop if still running (a failing test never leaks a daemon).
pub struct PmadDaemon {
    child: std::process::Child,
    /// stdout (the JSON log).
    pub stdout: PathBuf,
    /// stderr.
    pub stderr: PathBuf,
    exit: Option<std::process::ExitStatus>,
}

impl PmadDaemon {
    /// Start `pmad run --config config` in `cwd`; logs go to `cwd/<tag>.stdout.log` and
    /// `cwd/<tag>.stderr.log`.
    pub fn start(cwd: &Path, config: &Path, tag: &str) -> PmadDaemon {
        let stdout = cwd.join(format!("{tag}.stdout.log"));
        let stderr = cwd.join(format!("{tag}.stderr.log"));
        let child = Command::new(pmad_bin())
            .args(["run", "--config"])
            .arg(config)
            .current_dir(cwd)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("create stdout log"))
            .stderr(std::fs::File::create(&stderr).expect("create stderr log"))
            .spawn()
            .expect("start pmad run");
        PmadDaemon {
            child,
            stdout,
            stderr,
            exit: None,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far (complete lines).
    pub fn log(&self) -> Vec<LogLine> {
        parse_log(&std::fs::read_to_string(&self.stdout).unwrap_or_default()).0
    }

    /// Lines of stdout that are not JSON events.
    pub fn non_json_lines(&self) -> Vec<String> {
        parse_log(&std::fs::read_to_string(&self.stdout).unwrap_or_default()).1
    }

    /// The exit status if the process has ended (it is reaped once and remembered).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("wait for pmad");
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// How the process ended, for messages ("running", "exit code 1", "signal 7 (SIGBUS)").
    pub fn status_text(&mut self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self.exit_status() {
            None => "running".into(),
            Some(st) => match (st.code(), st.signal()) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(7)) => "killed by signal 7 (SIGBUS)".into(),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => format!("{st:?}"),
            },
        }
    }

    /// Wait until a log line matches `pred` (None on timeout or when the process exits first).
    pub fn wait_for(
        &mut self,
        timeout: std::time::Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Option<LogLine> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.log().into_iter().find(|e| pred(e)) {
                return Some(e);
            }
            if !self.alive() {
                // One last look: the line may have been written just before the exit.
                return self.log().into_iter().find(|e| pred(e));
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
    }

    /// Like [`PmadDaemon::wait_for`], but panics with the log tail when nothing matches.
    #[track_caller]
    pub fn expect(
        &mut self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> LogLine {
        match self.wait_for(timeout, pred) {
            Some(e) => e,
            None => panic!(
                "pmad: no {what} within {timeout:?} (process {})\n{}",
                self.status_text(),
                self.dump(40)
            ),
        }
    }

    /// SIGTERM, then wait up to `timeout`; returns the exit code (None: signal or timeout,
    /// in which case it is SIGKILLed).
    pub fn terminate(&mut self, timeout: std::time::Duration) -> Option<i32> {
        if self.alive() {
            let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = std::time::Instant::now() + timeout;
        while self.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return None;
        }
        self.exit_status().and_then(|s| s.code())
    }

    /// The last `n` lines of stdout plus stderr, for assertion messages.
    pub fn dump(&self, n: usize) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!(
            "-- pmad stdout (last {n} lines of {}):\n{tail}\n-- pmad stderr:\n{}",
            lines.len(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for PmadDaemon {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether `/proc/<pid>/maps` shows a mapping of a live (not deleted) file whose path
/// contains `needle`.
pub fn maps_contain(pid: u32, needle: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| {
            m.lines()
                .any(|l| l.contains(needle) && !l.ends_with("(deleted)"))
        })
        .unwrap_or(false)
}

/// What a tree snapshot records about one path (no atime: reading is allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// "file", "dir", "symlink" or "other".
    pub kind: &'static str,
    /// st_mode (type and permission bits).
    pub mode: u32,
    /// Inode number (a replaced file has another).
    pub ino: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// mtime, ns since the epoch.
    pub mtime_ns: i128,
    /// ctime, ns since the epoch (changes on any write or metadata change).
    pub ctime_ns: i128,
    /// Content hash (files) or link target (symlinks).
    pub content: String,
}

/// Stat (and hash) one path without following a final symlink.
pub fn path_state(p: &Path) -> std::io::Result<PathState> {
    use std::hash::Hasher;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p)?;
    let ft = m.file_type();
    let (kind, content) = if ft.is_symlink() {
        (
            "symlink",
            std::fs::read_link(p)?.to_string_lossy().into_owned(),
        )
    } else if ft.is_dir() {
        ("dir", String::new())
    } else if ft.is_file() {
        let bytes = std::fs::read(p)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(&bytes);
        ("file", format!("{:016x}:{}", h.finish(), bytes.len()))
    } else {
        ("other", String::new())
    };
    Ok(PathState {
        kind,
        mode: m.mode(),
        ino: m.ino(),
        nlink: m.nlink(),
        size: if ft.is_dir() { 0 } else { m.size() },
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        content,
    })
}

/// Every path under `root` (relative; `""` is the root itself) with its state, not descending
/// into or listing `exclude`d directories (given relative to `root`).
pub fn tree_snapshot(root: &Path, exclude: &[&str]) -> BTreeMap<String, PathState> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        if exclude.iter().any(|e| rel == *e) {
            continue;
        }
        let st = path_state(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        if st.kind == "dir" {
            for e in std::fs::read_dir(&p).unwrap_or_else(|e| panic!("list {}: {e}", p.display())) {
                stack.push(e.expect("read_dir entry").path());
            }
        }
        out.insert(rel, st);
    }
    out
}

/// Differences between two snapshots, one line each (empty when equal).
pub fn diff_snapshots(
    want: &BTreeMap<String, PathState>,
    got: &BTreeMap<String, PathState>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => d.push(format!("{k:?}: missing (was {w:?})")),
            Some(g) if g != w => d.push(format!("{k:?}: changed\n    was {w:?}\n    now {g:?}")),
            _ => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            d.push(format!("{k:?}: created ({g:?})"));
        }
    }
    d
}
// ===================================================== end of the daemon-process harness block

/// One `[[recipe]]` table as the daemon tests use it: publish after every accepted checkpoint,
/// `dtype = "source"`, keep every output, into `<out_root>/<name>`. EMA gets `alpha`, the
/// others `window`.
pub fn recipe_toml(name: &str, method: &str, window: usize, alpha: f64, out_root: &Path) -> String {
    let size = if method == "ema" {
        format!("alpha = {alpha}")
    } else {
        format!("window = {window}")
    };
    format!(
        "[[recipe]]\nname = \"{name}\"\nmethod = \"{method}\"\n{size}\nemit_every = 1\n\
         out_dir = {:?}\ndtype = \"source\"\nkeep = 0\n\n",
        out_root.join(name).display().to_string()
    )
}

/// The `[server]` (off), `[log]` (JSON at `level`) and `[daemon]` tables of the daemon tests.
pub fn daemon_tail_toml(level: &str, grace: &str) -> String {
    format!(
        "[server]\nlisten = \"\"\n\n[log]\nformat = \"json\"\nlevel = \"{level}\"\n\n\
         [daemon]\nshutdown_grace = \"{grace}\"\n"
    )
}
