//! The one way the tests run `pmad run`: [`Daemon::builder`] sets the config, working
//! directory, log location and environment (e.g. `PMAD_FAULT=op:N`); [`DaemonBuilder::start`]
//! spawns the real binary with stdout (the log) and stderr captured to files; the [`Daemon`]
//! waits for log events, sends SIGTERM (and reports the exit status) or SIGKILL, restarts
//! the same command, and is SIGKILLed on drop if still running (a failing test never leaks a
//! daemon).

use super::log::{Event, Log, LogFollower, POLL};
use super::pmad_cmd;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How to start `pmad run --config CONFIG`; cheap to clone, so one builder can start several
/// runs (e.g. one per log `tag`).
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    config: PathBuf,
    cwd: PathBuf,
    log_dir: Option<PathBuf>,
    tag: String,
    env: Vec<(String, String)>,
}

impl DaemonBuilder {
    /// Working directory of the process (default: the config file's directory).
    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = dir.to_path_buf();
        self
    }

    /// Directory of the captured logs (default: the working directory).
    pub fn log_dir(mut self, dir: &Path) -> Self {
        self.log_dir = Some(dir.to_path_buf());
        self
    }

    /// Name of this run's logs: `<log_dir>/<tag>.stdout.log` and `<tag>.stderr.log`
    /// (default `pmad`).
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag.to_string();
        self
    }

    /// Set an environment variable of the process. `RUST_LOG` and `PMAD_FAULT` of the test's
    /// own environment are never passed on; only what is set here.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `PMAD_FAULT=spec` when `spec` is given: fault injection, `op:N` fails the N-th `op`
    /// (create, write, fsync, rename, mkdir) with EIO; `op:N:TEXT` counts only paths holding
    /// TEXT.
    pub fn fault(self, spec: Option<&str>) -> Self {
        match spec {
            Some(f) => self.env("PMAD_FAULT", f),
            None => self,
        }
    }

    /// Spawn the process; stdout and stderr go to fresh (truncated) log files.
    pub fn start(self) -> Daemon {
        let dir = self.log_dir.clone().unwrap_or_else(|| self.cwd.clone());
        let stdout = dir.join(format!("{}.stdout.log", self.tag));
        let stderr = dir.join(format!("{}.stderr.log", self.tag));
        let mut cmd = pmad_cmd(&self.cwd);
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(
                std::fs::File::create(&stdout)
                    .unwrap_or_else(|e| panic!("create {}: {e}", stdout.display())),
            )
            .stderr(
                std::fs::File::create(&stderr)
                    .unwrap_or_else(|e| panic!("create {}: {e}", stderr.display())),
            );
        let child = cmd.spawn().expect("start pmad run");
        Daemon {
            child,
            log: Mutex::new(LogFollower::new(&stdout)),
            stdout,
            stderr,
            exit: None,
            spec: self,
        }
    }
}

/// A running (or ended) `pmad run` process.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// stdout: the log.
    pub stdout: PathBuf,
    /// stderr.
    pub stderr: PathBuf,
    log: Mutex<LogFollower>,
    exit: Option<ExitStatus>,
    spec: DaemonBuilder,
}

impl Daemon {
    /// A builder for `pmad run --config config`.
    pub fn builder(config: &Path) -> DaemonBuilder {
        DaemonBuilder {
            config: config.to_path_buf(),
            cwd: config
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            log_dir: None,
            tag: "pmad".into(),
            env: Vec::new(),
        }
    }

    /// `pmad run --config config` in `cwd`, logs in `cwd/<tag>.stdout.log` and
    /// `cwd/<tag>.stderr.log` (the common case of [`Daemon::builder`]).
    pub fn start(cwd: &Path, config: &Path, tag: &str) -> Daemon {
        Daemon::builder(config).cwd(cwd).tag(tag).start()
    }

    /// Start the same command again (config, working directory, environment, log directory)
    /// with logs named `tag`. The current process is SIGKILLed first if it is still running.
    pub fn restart(&mut self, tag: &str) {
        self.kill9();
        *self = self.spec.clone().tag(tag).start();
    }

    /// How this process was started (to start it again differently).
    pub fn spec(&self) -> &DaemonBuilder {
        &self.spec
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn follower(&self) -> MutexGuard<'_, LogFollower> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` over the log so far (complete lines), without copying it.
    pub fn with_log<R>(&self, f: impl FnOnce(&Log) -> R) -> R {
        let mut g = self.follower();
        f(g.poll())
    }

    /// The events logged so far.
    pub fn log(&self) -> Vec<Event> {
        self.with_log(|l| l.events.clone())
    }

    /// Lines of stdout that are not JSON events (see [`Log::non_json_lines`]).
    pub fn non_json_lines(&self) -> Vec<String> {
        self.with_log(Log::non_json_lines)
    }

    /// What the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The exit status if the process has ended (it is reaped once and remembered).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("wait for pmad");
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// How the process ended, for messages ("running", "exited with code 1",
    /// "killed by signal 7 (SIGBUS)").
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

    /// Wait up to `timeout` until the events logged so far satisfy `pred`. Returns whether
    /// they do; when the process exits first, one last look decides.
    pub fn wait_until(&mut self, timeout: Duration, pred: impl Fn(&[Event]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.with_log(|l| pred(&l.events)) {
                return true;
            }
            if !self.alive() || Instant::now() >= deadline {
                return self.with_log(|l| pred(&l.events));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Wait up to `timeout` for an event matching `pred` (the first in the log). None on
    /// timeout or when the process exits without having logged one.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let find = |d: &Daemon| d.with_log(|l| l.events.iter().find(|e| pred(e)).cloned());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = find(self) {
                return Some(e);
            }
            if !self.alive() {
                // One last look: the line may have been written just before the exit.
                return find(self);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Like [`Daemon::wait_for`], but panics with the log tail when nothing matches.
    #[track_caller]
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        match self.wait_for(timeout, pred) {
            Some(e) => e,
            None => panic!(
                "pmad: no {what} within {timeout:?} (process {})\n{}",
                self.status_text(),
                self.dump(40)
            ),
        }
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill9(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Send SIGTERM (if still running).
    pub fn sigterm(&mut self) {
        if self.alive() {
            let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
            rustix::process::kill_process(pid, rustix::process::Signal::TERM)
                .expect("kill -TERM pmad");
        }
    }

    /// Wait up to `timeout` for the process to end; returns its exit code. None when it was
    /// killed by a signal, or did not end in time (it is then SIGKILLed);
    /// [`Daemon::status_text`] says which.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        self.kill9();
        self.exit_status().and_then(|s| s.code())
    }

    /// SIGTERM, then [`Daemon::wait_exit`]: the exit code of a clean shutdown (0), or None.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.sigterm();
        self.wait_exit(timeout)
    }

    /// The last `n` lines of stdout plus stderr, for assertion messages.
    pub fn dump(&self, n: usize) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!(
            "-- pmad stdout {} (last {n} lines of {}):\n{tail}\n-- pmad stderr:\n{}",
            self.stdout.display(),
            lines.len(),
            self.stderr_text()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
