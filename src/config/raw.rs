//! The config file as written (serde structs; unknown keys refused) and its resolution into
//! the validated types of [`super`]. Every default and every check lives here, once.

use super::{
    Config, Layout, LogFormat, Marker, PartitionConfig, Pattern, PhaseConfig, Recipe, SelectConfig,
    SpikeConfig, StateConfig, WatchConfig, WatchMode,
};
use crate::math::kinds::{Accumulator, OutDtype};
use crate::math::{Method, MethodKind, Shape};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// `key: message`, the form of every config error.
fn err(key: &str, msg: impl std::fmt::Display) -> String {
    format!("{key}: {msg}")
}

/// Parse a name through its kind's table; the error names the key and the accepted names.
fn named<T: FromStr<Err = String>>(key: &str, s: &str) -> Result<T, String> {
    s.parse().map_err(|e| err(key, e))
}

/// Parse and resolve config text.
pub(super) fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
    resolve(raw, env)
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
    spike: Option<RawSpike>,
    partition: Option<RawPartition>,
    #[serde(default)]
    select: RawSelect,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelect {
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartition {
    #[serde(default = "d_auto")]
    index: toml::Value,
    #[serde(default = "d_auto")]
    count: toml::Value,
    #[serde(default = "d_auto_str")]
    by: String,
    #[serde(default = "d_auto_str")]
    commit: String,
    #[serde(default = "d_takeover")]
    takeover_after: String,
    #[serde(default = "d_part_timeout")]
    part_timeout: String,
}
fn d_auto() -> toml::Value {
    toml::Value::String("auto".into())
}
fn d_auto_str() -> String {
    "auto".into()
}
fn d_takeover() -> String {
    "10m".into()
}
fn d_part_timeout() -> String {
    "2h".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpike {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "d_series")]
    series: Vec<String>,
    #[serde(default = "d_spike_window")]
    window: usize,
    #[serde(default = "d_z")]
    z: f64,
    recover_z: Option<f64>,
    #[serde(default = "d_k")]
    k: usize,
    out_dir: Option<PathBuf>,
}
fn d_series() -> Vec<String> {
    vec!["loss".into(), "grad_norm".into()]
}
fn d_spike_window() -> usize {
    64
}
fn d_z() -> f64 {
    6.0
}
fn d_k() -> usize {
    3
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
    #[serde(default)]
    save_interval: Option<String>,
}
impl Default for RawState {
    fn default() -> Self {
        RawState {
            dir: String::new(),
            accumulator: d_acc(),
            memory_budget: d_budget(),
            save_interval: None,
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
    shape: Option<String>,
    final_lr_ratio: Option<f64>,
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
    #[serde(default = "d_priority")]
    priority: String,
    #[serde(default = "d_threads")]
    threads: toml::Value,
}
impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            shutdown_grace: d_grace(),
            progress_interval: d_progress(),
            priority: d_priority(),
            threads: d_threads(),
        }
    }
}
fn d_priority() -> String {
    "background".into()
}
fn d_threads() -> toml::Value {
    toml::Value::String("auto".into())
}
fn d_grace() -> String {
    "20s".into()
}
fn d_progress() -> String {
    "10s".into()
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

fn resolve(raw: RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
    let w = raw.watch;
    if w.dir.as_os_str().is_empty() {
        return Err(err("watch.dir", "must not be empty"));
    }
    let layout: Layout = named("watch.layout", &w.layout)?;
    let (def_pattern, def_marker) = match layout {
        Layout::Hf => ("checkpoint-{step}", "trainer_state.json"),
        Layout::Megatron => ("iter_{step}", "latest_checkpointed_iteration.txt"),
        Layout::Deepspeed => ("global_step{step}", "latest"),
        Layout::Torchtitan => ("step-{step}", ".metadata"),
        Layout::OlmoCore => ("step{step}", ".metadata.json"),
        Layout::Dcp => ("", ".metadata"),
        Layout::Custom => ("", ""),
    };
    let pattern_text = match (&w.pattern, layout) {
        (Some(p), _) => p.clone(),
        (None, Layout::Custom | Layout::Dcp) => {
            return Err(err(
                "watch.pattern",
                format!("is required with layout = \"{layout}\""),
            ))
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
    let mode: WatchMode = named("watch.mode", &w.mode)?;
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
    let accumulator: Accumulator = named("state.accumulator", &s.accumulator)?;
    let (memory_budget, memory_budget_auto) = if s.memory_budget.trim() == "auto" {
        (crate::sys::available_memory() / 2, true)
    } else {
        (size("state.memory_budget", &s.memory_budget)?, false)
    };
    let state = StateConfig {
        dir: (!s.dir.is_empty()).then(|| PathBuf::from(&s.dir)),
        accumulator,
        memory_budget,
        memory_budget_auto,
        // Default: 30 minutes, or 0 with [partition], where a restart that reads checkpoints
        // again waits for the other instances' verdicts on each of them.
        save_interval: match &s.save_interval {
            Some(v) => duration("state.save_interval", v)?,
            None if raw.partition.is_some() => Duration::ZERO,
            None => Duration::from_secs(30 * 60),
        },
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
        let kind: MethodKind = named(&key("method"), &r.method)?;
        let method = match kind {
            MethodKind::Sma => Method::Sma,
            MethodKind::Wma => Method::Wma,
            MethodKind::Ema => Method::Ema {
                alpha: r
                    .alpha
                    .ok_or_else(|| err(&key("alpha"), "is required with method = \"ema\""))?,
            },
            MethodKind::Weights => Method::Weights(r.weights.clone()),
            MethodKind::Schedule => Method::Schedule {
                shape: named(
                    &key("shape"),
                    r.shape.as_deref().ok_or_else(|| {
                        err(
                            &key("shape"),
                            format!(
                                "is required with method = \"schedule\" (one of {})",
                                Shape::one_of()
                            ),
                        )
                    })?,
                )?,
                final_lr_ratio: r.final_lr_ratio.unwrap_or(0.0),
            },
        };
        for (set, name) in [
            (r.shape.is_some(), "shape"),
            (r.final_lr_ratio.is_some(), "final_lr_ratio"),
        ] {
            if set && kind != MethodKind::Schedule {
                return Err(err(&key(name), "is only used with method = \"schedule\""));
            }
        }
        if r.alpha.is_some() && kind != MethodKind::Ema {
            return Err(err(&key("alpha"), "is only used with method = \"ema\""));
        }
        if !r.weights.is_empty() && kind != MethodKind::Weights {
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
                &key(match kind {
                    MethodKind::Ema => "alpha",
                    MethodKind::Schedule => "final_lr_ratio",
                    _ => "weights",
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
        let dtype: OutDtype = named(&key("dtype"), &r.dtype)?;
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
    let log_format: LogFormat = named("log.format", &raw.log.format)?;
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        return Err(err(
            "log.level",
            format!(
                "{:?} is not a level (error, warn, info, debug, trace)",
                raw.log.level
            ),
        ));
    }
    let (threads, threads_auto) = match &raw.daemon.threads {
        toml::Value::String(s) if s == "auto" => {
            (super::default_threads(crate::sys::usable_cores()), true)
        }
        toml::Value::Integer(n) if *n >= 1 => (*n as usize, false),
        other => {
            return Err(err(
                "daemon.threads",
                format!("{other} is not \"auto\" or a number of threads (at least 1)"),
            ))
        }
    };
    let partition = raw
        .partition
        .map(|p| resolve_partition(p, env))
        .transpose()?;
    if let Some(p) = partition.as_ref().filter(|p| p.count > 1) {
        // Every instance must publish the same steps, or their parts never meet: decided by
        // arrivals alone, which all instances see alike, never by each one's clock.
        if let Some((i, _)) = recipes
            .iter()
            .enumerate()
            .find(|(_, r)| r.emit_interval.is_some())
        {
            return Err(err(
                &format!("recipe[{i}].emit_interval"),
                format!(
                    "cannot be used with [partition] (count = {}): each instance's clock would \
                     pick different steps and their parts would never make a whole output; \
                     use emit_every",
                    p.count
                ),
            ));
        }
    }
    let spike = match raw.spike {
        Some(s) if s.enabled => Some(resolve_spike(s, &watch, &recipes)?),
        _ => None,
    };
    for (list, pats) in [
        ("include", &raw.select.include),
        ("exclude", &raw.select.exclude),
    ] {
        for (i, p) in pats.iter().enumerate() {
            if let Err(e) = regex::Regex::new(p) {
                return Err(err(
                    &format!("select.{list}[{i}]"),
                    format!("{p:?} is not a regular expression: {e}"),
                ));
            }
        }
    }
    let select = SelectConfig {
        include: raw.select.include,
        exclude: raw.select.exclude,
    };
    Ok(Config {
        watch,
        select,
        phase,
        state,
        recipes,
        spike,
        partition,
        listen,
        log_format,
        log_level: raw.log.level,
        shutdown_grace: duration("daemon.shutdown_grace", &raw.daemon.shutdown_grace)?,
        progress_interval: duration("daemon.progress_interval", &raw.daemon.progress_interval)?,
        priority: named("daemon.priority", &raw.daemon.priority)?,
        threads,
        threads_auto,
    })
}

fn resolve_spike(
    s: RawSpike,
    watch: &WatchConfig,
    recipes: &[Recipe],
) -> Result<SpikeConfig, String> {
    if watch.layout != Layout::Hf && watch.layout != Layout::Custom {
        return Err(err(
            "spike.enabled",
            "needs HF trainer_state.json (layout = \"hf\" or \"custom\")",
        ));
    }
    if s.series.is_empty() || s.series.iter().any(|x| x.trim().is_empty()) {
        return Err(err(
            "spike.series",
            "must name at least one log_history key",
        ));
    }
    if s.window < super::SPIKE_MIN_WINDOW {
        return Err(err(
            "spike.window",
            format!(
                "{} is too few values to judge a spike (at least {})",
                s.window,
                super::SPIKE_MIN_WINDOW
            ),
        ));
    }
    if !(s.z.is_finite() && s.z > 0.0) {
        return Err(err("spike.z", format!("{} must be a positive number", s.z)));
    }
    let recover_z = s.recover_z.unwrap_or(s.z / 2.0);
    if !(recover_z.is_finite() && recover_z > 0.0 && recover_z <= s.z) {
        return Err(err(
            "spike.recover_z",
            format!("{recover_z} must be positive and at most spike.z ({})", s.z),
        ));
    }
    if s.k == 0 {
        return Err(err("spike.k", "must be at least 1"));
    }
    let out_dir = s
        .out_dir
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| err("spike.out_dir", "is required when spike.enabled = true"))?;
    if out_dir == watch.dir || recipes.iter().any(|r| r.out_dir == out_dir) {
        return Err(err(
            "spike.out_dir",
            format!(
                "{} is watch.dir or a recipe's out_dir; give rescues their own directory",
                out_dir.display()
            ),
        ));
    }
    Ok(SpikeConfig {
        series: s.series,
        window: s.window,
        z: s.z,
        recover_z,
        k: s.k,
        out_dir,
    })
}

/// Where the index and the count come from when they are "auto", per launcher, in order.
const LAUNCHERS: &[(&str, Option<&str>)] = &[
    ("PMAD_PARTITION_INDEX", Some("PMAD_PARTITION_COUNT")),
    ("SLURM_PROCID", Some("SLURM_NTASKS")),
    ("LWS_WORKER_INDEX", Some("LWS_GROUP_SIZE")),
    // Indexed Jobs and JobSets tell the index only.
    ("JOB_COMPLETION_INDEX", None),
];

/// A partition number from the config (an integer) or the environment ("auto").
fn number_from_env(
    key: &str,
    v: &toml::Value,
    env: &dyn Fn(&str) -> Option<String>,
    vars: &[&str],
) -> Result<Option<(usize, String)>, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(Some((*n as usize, "config".into()))),
        toml::Value::String(s) if s == "auto" => {
            for var in vars {
                if let Some(text) = env(var) {
                    let n = text
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| err(key, format!("{var}={text:?} is not a number")))?;
                    return Ok(Some((n, (*var).to_string())));
                }
            }
            Ok(None)
        }
        other => Err(err(key, format!("{other} is not \"auto\" or a number"))),
    }
}

fn resolve_partition(
    p: RawPartition,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PartitionConfig, String> {
    let index_vars: Vec<&str> = LAUNCHERS.iter().map(|l| l.0).collect();
    let (index, index_from) = number_from_env("partition.index", &p.index, env, &index_vars)?
        .ok_or_else(|| {
            err(
                "partition.index",
                format!(
                    "is \"auto\" but none of {} is set (one pmad per node: the launcher sets one; \
                     never RANK, which counts GPUs)",
                    index_vars.join(", ")
                ),
            )
        })?;
    // The count from the same launcher as the index, else PMAD_PARTITION_COUNT.
    let mut count_vars: Vec<&str> = LAUNCHERS
        .iter()
        .filter(|l| l.0 == index_from)
        .filter_map(|l| l.1)
        .collect();
    if !count_vars.contains(&"PMAD_PARTITION_COUNT") {
        count_vars.push("PMAD_PARTITION_COUNT");
    }
    let (count, count_from) = number_from_env("partition.count", &p.count, env, &count_vars)?
        .ok_or_else(|| {
            err(
                "partition.count",
                format!(
                    "is \"auto\" but {} is not set{}",
                    count_vars.join(" or "),
                    if index_from == "JOB_COMPLETION_INDEX" {
                        " (an Indexed Job tells the index only: set partition.count)"
                    } else {
                        ""
                    }
                ),
            )
        })?;
    if count == 0 {
        return Err(err("partition.count", format!("is 0 (from {count_from})")));
    }
    if index >= count {
        return Err(err(
            "partition.index",
            format!(
                "{index} (from {index_from}) is not below partition.count {count} (from {count_from})"
            ),
        ));
    }
    Ok(PartitionConfig {
        index,
        count,
        index_from,
        count_from,
        by: named("partition.by", &p.by)?,
        commit: named("partition.commit", &p.commit)?,
        takeover_after: duration("partition.takeover_after", &p.takeover_after)?,
        part_timeout: duration("partition.part_timeout", &p.part_timeout)?,
    })
}
