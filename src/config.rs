//! The daemon's TOML configuration: raw serde structs (unknown keys refused) resolved into a
//! validated [`Config`] that the rest of the daemon trusts.
//!
//! Every error names the key (`recipe[1].window`) and the bad value. Durations are human units
//! ("10s", "30m"), sizes too ("5GB", "512MiB"). Defaults and meanings are documented in
//! `config/pmad.toml` and README.md; this module is the single source of their values.

use crate::engine::OutDtype;
use crate::merge::{Accumulator, Method};
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration error, naming the key and the bad value.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ConfigError {
    file: String,
    msg: String,
}

fn err(key: &str, msg: impl std::fmt::Display) -> String {
    format!("{key}: {msg}")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    watch: RawWatch,
    #[serde(default)]
    phase: RawPhase,
    #[serde(default)]
    state: RawState,
    #[serde(default, rename = "recipe")]
    recipes: Vec<RawRecipe>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    daemon: RawDaemon,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    dir: PathBuf,
    #[serde(default = "d_layout")]
    layout: String,
    pattern: Option<String>,
    marker: Option<String>,
    #[serde(default = "d_mode")]
    mode: String,
    #[serde(default = "d_poll")]
    poll_interval: String,
    #[serde(default = "d_settle")]
    settle: String,
    #[serde(default)]
    allow_nonfinite: bool,
}
fn d_layout() -> String {
    "hf".into()
}
fn d_mode() -> String {
    "auto".into()
}
fn d_poll() -> String {
    "10s".into()
}
fn d_settle() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPhase {
    #[serde(default)]
    start_step: u64,
    #[serde(default)]
    end_step: u64,
    #[serde(default)]
    lr_from_trainer_state: bool,
    #[serde(default = "d_tol")]
    lr_tolerance: f64,
    #[serde(default)]
    interval_steps: u64,
}
fn d_tol() -> f64 {
    0.01
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default)]
    dir: String,
    #[serde(default = "d_acc")]
    accumulator: String,
    #[serde(default = "d_budget")]
    memory_budget: String,
}
impl Default for RawState {
    fn default() -> Self {
        RawState {
            dir: String::new(),
            accumulator: d_acc(),
            memory_budget: d_budget(),
        }
    }
}
fn d_acc() -> String {
    "f32".into()
}
fn d_budget() -> String {
    "auto".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: String,
    method: String,
    #[serde(default = "d_window")]
    window: usize,
    alpha: Option<f64>,
    #[serde(default)]
    weights: Vec<f64>,
    #[serde(default = "d_every")]
    emit_every: u64,
    #[serde(default)]
    emit_interval: String,
    out_dir: PathBuf,
    #[serde(default = "d_dtype")]
    dtype: String,
    #[serde(default = "d_shard")]
    shard_size: String,
    #[serde(default = "d_keep")]
    keep: usize,
    #[serde(default)]
    on_emit: Vec<String>,
    #[serde(default = "d_on_emit_timeout")]
    on_emit_timeout: String,
}
fn d_window() -> usize {
    10
}
fn d_every() -> u64 {
    1
}
fn d_dtype() -> String {
    "source".into()
}
fn d_shard() -> String {
    "5GB".into()
}
fn d_keep() -> usize {
    3
}
fn d_on_emit_timeout() -> String {
    "10m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "d_listen")]
    listen: String,
}
impl Default for RawServer {
    fn default() -> Self {
        RawServer { listen: d_listen() }
    }
}
fn d_listen() -> String {
    "127.0.0.1:9464".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default = "d_format")]
    format: String,
    #[serde(default = "d_level")]
    level: String,
}
impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: d_format(),
            level: d_level(),
        }
    }
}
fn d_format() -> String {
    "text".into()
}
fn d_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default = "d_grace")]
    shutdown_grace: String,
    #[serde(default = "d_progress")]
    progress_interval: String,
}
impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            shutdown_grace: d_grace(),
            progress_interval: d_progress(),
        }
    }
}
fn d_grace() -> String {
    "20s".into()
}
fn d_progress() -> String {
    "10s".into()
}

/// Checkpoint directory naming and completion conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// HF Trainer: `checkpoint-N/`, complete when `trainer_state.json` exists.
    Hf,
    /// Megatron-LM: `iter_NNNNNNN/`, complete when `latest_checkpointed_iteration.txt` in the
    /// watched directory names N or later.
    Megatron,
    /// DeepSpeed: `global_stepN/`, complete when the `latest` file names it or a later step.
    Deepspeed,
    /// Pattern and marker given explicitly.
    Custom,
}

/// How a checkpoint signals that it is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// No marker: validation and quiescence alone.
    None,
    /// A file inside the checkpoint directory that must exist and be non-empty (and parse, if
    /// it is JSON).
    InDir(String),
    /// A tracker file in the watched directory naming the newest complete step (or a tag that
    /// ends in it); checkpoints at or below that step are complete.
    Tracker(String),
}

/// Where the step number sits in a checkpoint directory name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// Text before `{step}`.
    pub prefix: String,
    /// Text after `{step}`.
    pub suffix: String,
}

impl Pattern {
    /// Parse `prefix{step}suffix`.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let (prefix, suffix) = s
            .split_once("{step}")
            .ok_or_else(|| format!("{s:?} must contain {{step}}"))?;
        if suffix.contains("{step}") || s.contains('/') {
            return Err(format!(
                "{s:?} must contain {{step}} once and name a directory directly inside watch.dir"
            ));
        }
        Ok(Pattern {
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    /// The step of a directory name matching the pattern.
    pub fn step(&self, name: &str) -> Option<u64> {
        let mid = name
            .strip_prefix(&self.prefix)?
            .strip_suffix(&self.suffix)?;
        if mid.is_empty() || !mid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        mid.parse().ok()
    }
}

/// Discovery settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify plus periodic scans, except on network filesystems where it only polls.
    Auto,
    /// inotify plus periodic scans.
    Inotify,
    /// Periodic scans only.
    Poll,
}

/// `[watch]`, resolved.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The training output directory.
    pub dir: PathBuf,
    /// Naming convention.
    pub layout: Layout,
    /// Directory name pattern.
    pub pattern: Pattern,
    /// Completion marker.
    pub marker: Marker,
    /// Discovery mode.
    pub mode: WatchMode,
    /// Full scan period (always on).
    pub poll_interval: Duration,
    /// Files must be unchanged this long.
    pub settle: Duration,
    /// Accept checkpoints with NaN/Inf values.
    pub allow_nonfinite: bool,
}

/// `[phase]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseConfig {
    /// First step that counts.
    pub start_step: u64,
    /// Last step that counts (0 = open-ended).
    pub end_step: u64,
    /// Accept only checkpoints on the LR plateau (HF trainer_state.json).
    pub lr_from_trainer_state: bool,
    /// Relative tolerance for "on the plateau".
    pub lr_tolerance: f64,
    /// Minimum steps between accepted checkpoints.
    pub interval_steps: u64,
}

/// `[state]`, resolved.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Persistent state directory (None = no persistence).
    pub dir: Option<PathBuf>,
    /// Accumulator precision.
    pub accumulator: Accumulator,
    /// Bytes of accumulators kept in RAM; beyond it they live in files under `dir`.
    pub memory_budget: u64,
    /// Whether `memory_budget` was derived automatically.
    pub memory_budget_auto: bool,
}

/// One `[[recipe]]`, resolved.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Unique name (used in logs, metrics and paths).
    pub name: String,
    /// Weighting.
    pub method: Method,
    /// N (1 for ema, which runs over every accepted checkpoint).
    pub window: usize,
    /// Publish after every k-th accepted checkpoint (0 = only by interval).
    pub emit_every: u64,
    /// Publish at most this often (None = no time limit).
    pub emit_interval: Option<Duration>,
    /// Where outputs go.
    pub out_dir: PathBuf,
    /// Output dtype.
    pub dtype: OutDtype,
    /// Maximum shard size in bytes.
    pub shard_size: u64,
    /// Outputs retained (0 = all).
    pub keep: usize,
    /// Command run after publishing, with {path} {step} {recipe} substituted.
    pub on_emit: Vec<String>,
    /// Time limit for `on_emit`.
    pub on_emit_timeout: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// JSON lines.
    Json,
}

/// The whole resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[watch]`.
    pub watch: WatchConfig,
    /// `[phase]`.
    pub phase: PhaseConfig,
    /// `[state]`.
    pub state: StateConfig,
    /// `[[recipe]]`s.
    pub recipes: Vec<Recipe>,
    /// `[server] listen` (None = off).
    pub listen: Option<SocketAddr>,
    /// `[log] format`.
    pub log_format: LogFormat,
    /// `[log] level` (an EnvFilter directive).
    pub log_level: String,
    /// `[daemon] shutdown_grace`: how long an in-flight emission may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// `[daemon] progress_interval`: how often long emissions log progress.
    pub progress_interval: Duration,
}

fn duration(key: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        err(
            key,
            format!("{s:?} is not a duration like \"10s\" or \"30m\" ({e})"),
        )
    })
}

fn size(key: &str, s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| {
            err(
                key,
                format!("{s:?} is not a size like \"5GB\" or \"512MiB\""),
            )
        })
}

/// Memory available to this process: the cgroup limit if set, else physical memory.
pub fn available_memory() -> u64 {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match (cgroup, total) {
        (Some(c), Some(t)) => c.min(t),
        (Some(c), None) => c,
        (None, Some(t)) => t,
        (None, None) => 8 << 30,
    }
}

impl Config {
    /// Read and resolve a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|msg| ConfigError {
            file: path.display().to_string(),
            msg,
        })
    }

    /// Parse and resolve config text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        resolve(raw)
    }

    /// The largest window over recipes (how many checkpoints stay pinned).
    pub fn window_capacity(&self) -> usize {
        self.recipes.iter().map(|r| r.window).max().unwrap_or(1)
    }

    /// Human-readable resolved settings (for `pmad check-config`).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let w = &self.watch;
        let _ = writeln!(s, "[watch]");
        let _ = writeln!(s, "dir            = {}", w.dir.display());
        let layout = match w.layout {
            Layout::Hf => "hf",
            Layout::Megatron => "megatron",
            Layout::Deepspeed => "deepspeed",
            Layout::Custom => "custom",
        };
        let _ = writeln!(s, "layout         = {layout}");
        let _ = writeln!(
            s,
            "pattern        = {}{{step}}{}",
            w.pattern.prefix, w.pattern.suffix
        );
        let marker = match &w.marker {
            Marker::None => "(none: validation and settle only)".to_string(),
            Marker::InDir(m) => format!("{m} (inside each checkpoint directory)"),
            Marker::Tracker(m) => format!("{m} (in watch.dir, naming the newest complete step)"),
        };
        let _ = writeln!(s, "marker         = {marker}");
        let mode = match w.mode {
            WatchMode::Auto => "auto (inotify; polling only on network filesystems)",
            WatchMode::Inotify => "inotify",
            WatchMode::Poll => "poll",
        };
        let _ = writeln!(s, "mode           = {mode}");
        let _ = writeln!(
            s,
            "poll_interval  = {}",
            humantime::format_duration(w.poll_interval)
        );
        let _ = writeln!(
            s,
            "settle         = {}",
            humantime::format_duration(w.settle)
        );
        let _ = writeln!(s, "allow_nonfinite = {}", w.allow_nonfinite);
        let p = &self.phase;
        let _ = writeln!(s, "[phase]");
        let _ = writeln!(
            s,
            "steps          = {}..{}",
            p.start_step,
            if p.end_step == 0 {
                "open".to_string()
            } else {
                p.end_step.to_string()
            }
        );
        let _ = writeln!(
            s,
            "lr_from_trainer_state = {} (tolerance {})",
            p.lr_from_trainer_state, p.lr_tolerance
        );
        let _ = writeln!(s, "interval_steps = {}", p.interval_steps);
        let st = &self.state;
        let _ = writeln!(s, "[state]");
        let _ = writeln!(
            s,
            "dir            = {}",
            st.dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "(none: no persistence)".into())
        );
        let _ = writeln!(
            s,
            "accumulator    = {}{}",
            st.accumulator.name(),
            if st.accumulator == Accumulator::F32 {
                " (f64 if a recipe publishes f32/f64 tensors, e.g. dtype = \"source\" on f32 checkpoints: twice the memory)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "memory_budget  = {}{}",
            bytesize::ByteSize(st.memory_budget).display().si(),
            if st.memory_budget_auto {
                " (auto: half of available memory)"
            } else {
                ""
            }
        );
        for r in &self.recipes {
            let _ = writeln!(s, "[[recipe]] {}", r.name);
            let method = match &r.method {
                Method::Sma => "sma".to_string(),
                Method::Wma => "wma".to_string(),
                Method::Ema { alpha } => format!("ema (alpha {alpha})"),
                Method::Weights(w) => format!("weights {w:?}"),
            };
            let _ = writeln!(s, "  method       = {method}");
            let window = match r.method {
                Method::Ema { .. } => "every accepted checkpoint (running EMA)".to_string(),
                _ => format!("last {}", r.window),
            };
            let _ = writeln!(s, "  window       = {window}");
            let _ = writeln!(
                s,
                "  emit         = every {} accepted{}",
                r.emit_every,
                r.emit_interval
                    .map(|d| format!(", at most every {}", humantime::format_duration(d)))
                    .unwrap_or_default()
            );
            let _ = writeln!(s, "  out_dir      = {}", r.out_dir.display());
            let _ = writeln!(s, "  dtype        = {}", r.dtype.name());
            let _ = writeln!(
                s,
                "  shard_size   = {}",
                bytesize::ByteSize(r.shard_size).display().si()
            );
            let _ = writeln!(
                s,
                "  keep         = {}",
                if r.keep == 0 {
                    "all".into()
                } else {
                    r.keep.to_string()
                }
            );
            if !r.on_emit.is_empty() {
                let _ = writeln!(
                    s,
                    "  on_emit      = {:?} (timeout {})",
                    r.on_emit,
                    humantime::format_duration(r.on_emit_timeout)
                );
            }
        }
        let _ = writeln!(s, "[server]");
        let _ = writeln!(
            s,
            "listen         = {}",
            self.listen
                .map(|a| a.to_string())
                .unwrap_or_else(|| "(off)".into())
        );
        let _ = writeln!(s, "[log]");
        let _ = writeln!(
            s,
            "format         = {}",
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        );
        let _ = writeln!(s, "level          = {}", self.log_level);
        let _ = writeln!(s, "[daemon]");
        let _ = writeln!(
            s,
            "shutdown_grace = {}",
            humantime::format_duration(self.shutdown_grace)
        );
        s
    }
}

fn resolve(raw: RawConfig) -> Result<Config, String> {
    let w = raw.watch;
    if w.dir.as_os_str().is_empty() {
        return Err(err("watch.dir", "must not be empty"));
    }
    let layout = match w.layout.as_str() {
        "hf" => Layout::Hf,
        "megatron" => Layout::Megatron,
        "deepspeed" => Layout::Deepspeed,
        "custom" => Layout::Custom,
        other => {
            return Err(err(
                "watch.layout",
                format!("{other:?} is not one of hf, megatron, deepspeed, custom"),
            ))
        }
    };
    let (def_pattern, def_marker) = match layout {
        Layout::Hf => ("checkpoint-{step}", "trainer_state.json"),
        Layout::Megatron => ("iter_{step}", "latest_checkpointed_iteration.txt"),
        Layout::Deepspeed => ("global_step{step}", "latest"),
        Layout::Custom => ("", ""),
    };
    let pattern_text = match (&w.pattern, layout) {
        (Some(p), _) => p.clone(),
        (None, Layout::Custom) => {
            return Err(err("watch.pattern", "is required with layout = \"custom\""))
        }
        (None, _) => def_pattern.to_string(),
    };
    let pattern = Pattern::parse(&pattern_text).map_err(|e| err("watch.pattern", e))?;
    let marker_text = w.marker.clone().unwrap_or_else(|| def_marker.to_string());
    let marker = if marker_text.is_empty() {
        Marker::None
    } else if marker_text.contains('/') || marker_text == ".." {
        return Err(err(
            "watch.marker",
            format!("{marker_text:?} must be a plain file name"),
        ));
    } else {
        match layout {
            Layout::Megatron | Layout::Deepspeed => Marker::Tracker(marker_text),
            _ => Marker::InDir(marker_text),
        }
    };
    let mode = match w.mode.as_str() {
        "auto" => WatchMode::Auto,
        "inotify" => WatchMode::Inotify,
        "poll" => WatchMode::Poll,
        other => {
            return Err(err(
                "watch.mode",
                format!("{other:?} is not one of auto, inotify, poll"),
            ))
        }
    };
    let poll_interval = duration("watch.poll_interval", &w.poll_interval)?;
    if poll_interval < Duration::from_millis(10) {
        return Err(err("watch.poll_interval", "must be at least 10ms"));
    }
    let watch = WatchConfig {
        dir: w.dir,
        layout,
        pattern,
        marker,
        mode,
        poll_interval,
        settle: duration("watch.settle", &w.settle)?,
        allow_nonfinite: w.allow_nonfinite,
    };

    let p = raw.phase;
    if p.end_step != 0 && p.end_step < p.start_step {
        return Err(err(
            "phase.end_step",
            format!("{} is before phase.start_step {}", p.end_step, p.start_step),
        ));
    }
    if !(p.lr_tolerance >= 0.0 && p.lr_tolerance < 1.0) {
        return Err(err(
            "phase.lr_tolerance",
            format!("{} must be in [0, 1)", p.lr_tolerance),
        ));
    }
    if p.lr_from_trainer_state && layout != Layout::Hf && layout != Layout::Custom {
        return Err(err(
            "phase.lr_from_trainer_state",
            "needs HF trainer_state.json (layout = \"hf\" or \"custom\")",
        ));
    }
    let phase = PhaseConfig {
        start_step: p.start_step,
        end_step: p.end_step,
        lr_from_trainer_state: p.lr_from_trainer_state,
        lr_tolerance: p.lr_tolerance,
        interval_steps: p.interval_steps,
    };

    let s = raw.state;
    let accumulator = match s.accumulator.as_str() {
        "f32" => Accumulator::F32,
        "f64" => Accumulator::F64,
        other => {
            return Err(err(
                "state.accumulator",
                format!("{other:?} is not one of f32, f64"),
            ))
        }
    };
    let (memory_budget, memory_budget_auto) = if s.memory_budget.trim() == "auto" {
        (available_memory() / 2, true)
    } else {
        (size("state.memory_budget", &s.memory_budget)?, false)
    };
    let state = StateConfig {
        dir: (!s.dir.is_empty()).then(|| PathBuf::from(&s.dir)),
        accumulator,
        memory_budget,
        memory_budget_auto,
    };

    if raw.recipes.is_empty() {
        return Err(err("recipe", "at least one [[recipe]] is required"));
    }
    let mut recipes = Vec::new();
    for (i, r) in raw.recipes.into_iter().enumerate() {
        let key = |k: &str| format!("recipe[{i}].{k}");
        if r.name.is_empty()
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(err(
                &key("name"),
                format!("{:?} must be non-empty letters, digits, - _ .", r.name),
            ));
        }
        if recipes.iter().any(|x: &Recipe| x.name == r.name) {
            return Err(err(&key("name"), format!("{:?} is used twice", r.name)));
        }
        let method = match r.method.as_str() {
            "sma" => Method::Sma,
            "wma" => Method::Wma,
            "ema" => Method::Ema {
                alpha: r
                    .alpha
                    .ok_or_else(|| err(&key("alpha"), "is required with method = \"ema\""))?,
            },
            "weights" => Method::Weights(r.weights.clone()),
            other => {
                return Err(err(
                    &key("method"),
                    format!("{other:?} is not one of sma, wma, ema, weights"),
                ))
            }
        };
        if r.alpha.is_some() && r.method != "ema" {
            return Err(err(&key("alpha"), "is only used with method = \"ema\""));
        }
        if !r.weights.is_empty() && r.method != "weights" {
            return Err(err(
                &key("weights"),
                "is only used with method = \"weights\"",
            ));
        }
        let window = match &method {
            Method::Ema { .. } => 1,
            Method::Weights(w) => {
                if w.is_empty() {
                    return Err(err(
                        &key("weights"),
                        "is required with method = \"weights\"",
                    ));
                }
                w.len()
            }
            _ => r.window,
        };
        if window == 0 {
            return Err(err(&key("window"), "must be at least 1"));
        }
        method.weights(window).map_err(|e| {
            err(
                &key(if r.method == "ema" {
                    "alpha"
                } else {
                    "weights"
                }),
                e,
            )
        })?;
        let emit_interval = if r.emit_interval.trim().is_empty() {
            None
        } else {
            Some(duration(&key("emit_interval"), &r.emit_interval)?)
        };
        if r.emit_every == 0 && emit_interval.is_none() {
            return Err(err(
                &key("emit_every"),
                "is 0 and emit_interval is empty: this recipe would never publish",
            ));
        }
        let dtype = OutDtype::parse(&r.dtype).ok_or_else(|| {
            err(
                &key("dtype"),
                format!("{:?} is not one of source, bf16, f16, f32", r.dtype),
            )
        })?;
        if r.out_dir.as_os_str().is_empty() {
            return Err(err(&key("out_dir"), "must not be empty"));
        }
        if r.out_dir == watch.dir {
            return Err(err(
                &key("out_dir"),
                format!(
                    "{} is watch.dir itself; give pmad its own directory",
                    r.out_dir.display()
                ),
            ));
        }
        if recipes.iter().any(|x: &Recipe| x.out_dir == r.out_dir) {
            return Err(err(
                &key("out_dir"),
                format!("{} is used by another recipe", r.out_dir.display()),
            ));
        }
        recipes.push(Recipe {
            name: r.name,
            method,
            window,
            emit_every: r.emit_every,
            emit_interval,
            out_dir: r.out_dir,
            dtype,
            shard_size: size(&key("shard_size"), &r.shard_size)?,
            keep: r.keep,
            on_emit: r.on_emit,
            on_emit_timeout: duration(&key("on_emit_timeout"), &r.on_emit_timeout)?,
        });
    }

    let listen = if raw.server.listen.trim().is_empty() {
        None
    } else {
        Some(
            raw.server
                .listen
                .trim()
                .parse::<SocketAddr>()
                .map_err(|_| {
                    err(
                        "server.listen",
                        format!(
                            "{:?} is not an address like \"127.0.0.1:9464\"",
                            raw.server.listen
                        ),
                    )
                })?,
        )
    };
    let log_format = match raw.log.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(err(
                "log.format",
                format!("{other:?} is not one of text, json"),
            ))
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        return Err(err(
            "log.level",
            format!(
                "{:?} is not a level (error, warn, info, debug, trace)",
                raw.log.level
            ),
        ));
    }
    Ok(Config {
        watch,
        phase,
        state,
        recipes,
        listen,
        log_format,
        log_level: raw.log.level,
        shutdown_grace: duration("daemon.shutdown_grace", &raw.daemon.shutdown_grace)?,
        progress_interval: duration("daemon.progress_interval", &raw.daemon.progress_interval)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [watch]
        dir = "/ckpt"
        [[recipe]]
        name = "sma10"
        method = "sma"
        out_dir = "/out/sma10"
    "#;

    #[test]
    fn defaults_resolve() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.watch.layout, Layout::Hf);
        assert_eq!(c.watch.pattern.step("checkpoint-1200"), Some(1200));
        assert_eq!(c.watch.pattern.step("checkpoint-12a"), None);
        assert_eq!(c.watch.pattern.step("tmp-checkpoint-12"), None);
        assert_eq!(c.watch.marker, Marker::InDir("trainer_state.json".into()));
        assert_eq!(c.watch.poll_interval, Duration::from_secs(10));
        assert_eq!(c.recipes[0].window, 10);
        assert_eq!(c.recipes[0].keep, 3);
        assert_eq!(c.recipes[0].shard_size, 5_000_000_000);
        assert_eq!(c.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(c.describe().contains("sma10"));
    }

    #[test]
    fn layouts_set_pattern_and_marker() {
        let c =
            Config::parse(&MIN.replace("dir = \"/ckpt\"", "dir = \"/c\"\nlayout = \"megatron\""))
                .unwrap();
        assert_eq!(c.watch.pattern.step("iter_0001000"), Some(1000));
        assert_eq!(
            c.watch.marker,
            Marker::Tracker("latest_checkpointed_iteration.txt".into())
        );
        let c =
            Config::parse(&MIN.replace("dir = \"/ckpt\"", "dir = \"/c\"\nlayout = \"deepspeed\""))
                .unwrap();
        assert_eq!(c.watch.pattern.step("global_step300"), Some(300));
    }

    fn bad(text: &str) -> String {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = bad(&format!("{MIN}\n[log]\nformat = \"xml\""));
        assert!(e.contains("log.format") && e.contains("xml"), "{e}");
        let e = bad(&MIN.replace("method = \"sma\"", "method = \"sma\"\nwindow = 0"));
        assert!(e.contains("recipe[0].window"), "{e}");
        let e = bad(&MIN.replace("[watch]", "[watch]\nsettle = \"5 parsecs\""));
        assert!(e.contains("watch.settle") && e.contains("parsecs"), "{e}");
        let e = bad(&MIN.replace("[watch]", "[watch]\nbogus = 1"));
        assert!(e.contains("bogus"), "{e}");
        let e = bad(&MIN.replace("method = \"sma\"", "method = \"ema\""));
        assert!(e.contains("recipe[0].alpha"), "{e}");
        let e = bad(&MIN.replace("method = \"sma\"", "method = \"ema\"\nalpha = 1.5"));
        assert!(e.contains("recipe[0].alpha") && e.contains("1.5"), "{e}");
        let e = bad(&MIN.replace(
            "method = \"sma\"",
            "method = \"sma\"\nshard_size = \"lots\"",
        ));
        assert!(
            e.contains("recipe[0].shard_size") && e.contains("lots"),
            "{e}"
        );
        let e = bad(&format!("{MIN}\n[server]\nlisten = \"nowhere\""));
        assert!(e.contains("server.listen") && e.contains("nowhere"), "{e}");
        let e = bad(&format!("{MIN}\n[state]\nmemory_budget = \"-1\""));
        assert!(e.contains("state.memory_budget"), "{e}");
        let e = bad(&MIN.replace("/out/sma10", "/ckpt"));
        assert!(e.contains("recipe[0].out_dir"), "{e}");
        let e = bad("[watch]\ndir = \"/c\"\n");
        assert!(e.contains("recipe"), "{e}");
        let e = bad(&MIN.replace("[watch]", "[watch]\nlayout = \"custom\""));
        assert!(e.contains("watch.pattern"), "{e}");
    }

    #[test]
    fn recipes_resolve_methods() {
        let text = format!(
            "{MIN}\n[[recipe]]\nname = \"ema\"\nmethod = \"ema\"\nalpha = 0.2\nout_dir = \"/out/ema\"\nemit_interval = \"30m\"\n\
             [[recipe]]\nname = \"w\"\nmethod = \"weights\"\nweights = [1, 2, 3]\nout_dir = \"/out/w\"\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.recipes[1].window, 1);
        assert_eq!(c.recipes[1].emit_interval, Some(Duration::from_secs(1800)));
        assert_eq!(c.recipes[2].window, 3);
        assert_eq!(c.window_capacity(), 10);
    }

    #[test]
    fn shipped_examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) == Some("toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 3);
    }
}
