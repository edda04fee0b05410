//! The daemon's configuration: a TOML file resolved into a validated [`Config`] that the rest
//! of the daemon trusts.
//!
//! - this module: the resolved types and their loading;
//! - `raw`: the serde structs (unknown keys refused) and the resolution rules, the single
//!   source of every default and check;
//! - `describe`: the resolved settings as `pmad check-config` prints them.
//!
//! Every error names the key (`recipe[1].window`) and the bad value. Durations are human units
//! ("10s", "30m"), sizes too ("5GB", "512MiB"). Names (layouts, methods, dtypes, ...) are
//! parsed here, once, through their kinds' name tables. The documented example is
//! `config/pmad.toml`; the reference is docs/configuration.md.

mod describe;
mod raw;

use crate::error::{Error, Result};
use crate::math::kinds::{Accumulator, OutDtype};
use crate::math::Method;
use crate::names::named_enum;
pub use crate::output::partition::{CommitMode, PartitionBy};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

named_enum! {
    /// Checkpoint directory naming and completion conventions.
    pub enum Layout {
        /// HF Trainer: `checkpoint-N/`, complete when `trainer_state.json` exists.
        Hf = "hf",
        /// Megatron-LM: `iter_NNNNNNN/`, complete when `latest_checkpointed_iteration.txt` in
        /// the watched directory names N or later.
        Megatron = "megatron",
        /// DeepSpeed: `global_stepN/`, complete when the `latest` file names it or a later
        /// step.
        Deepspeed = "deepspeed",
        /// torchtitan: `step-N/` holding a DCP checkpoint, complete when its `.metadata`
        /// (written last) exists.
        Torchtitan = "torchtitan",
        /// OLMo-core: `stepN/` (written as `stepN-tmp`, renamed) holding DCP in
        /// `model_and_optim/`, complete when `.metadata.json` (written last) exists.
        OlmoCore = "olmo-core",
        /// Any PyTorch DCP checkpoint (torch FSDP2 `dcp.save`): the pattern is required, the
        /// marker is `.metadata`.
        Dcp = "dcp",
        /// Pattern and marker given explicitly.
        Custom = "custom",
    }
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

named_enum! {
    /// How checkpoints are discovered.
    pub enum WatchMode {
        /// inotify plus periodic scans, except on network filesystems where it only polls.
        Auto = "auto",
        /// inotify plus periodic scans.
        Inotify = "inotify",
        /// Periodic scans only.
        Poll = "poll",
    }
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
    /// Longest time changed sums wait before they are saved (they are saved at once when a
    /// checkpoint they hold is deleted, and at shutdown); zero saves after every change.
    pub save_interval: Duration,
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

named_enum! {
    /// Log output format.
    pub enum LogFormat {
        /// One readable line per event.
        Text = "text",
        /// JSON lines.
        Json = "json",
    }
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
    /// `[spike]`, when enabled.
    pub spike: Option<SpikeConfig>,
    /// `[partition]`: this instance's part of every output, when several pmads share them.
    pub partition: Option<PartitionConfig>,
    /// `[daemon] priority`.
    pub priority: Priority,
    /// `[daemon] threads`: worker threads for passes and emissions.
    pub threads: usize,
    /// Whether `threads` was derived from the usable cores.
    pub threads_auto: bool,
    /// `[select]`: which tensors are averaged besides the format's own rule.
    pub select: SelectConfig,
}

/// `[select]`: regular expressions over tensor keys (validated when the config is read). A
/// float tensor is averaged when its key matches an `include` pattern (or `include` is empty
/// and the checkpoint format's rule selects it) and no `exclude` pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectConfig {
    /// `include`.
    pub include: Vec<String>,
    /// `exclude`.
    pub exclude: Vec<String>,
}

named_enum! {
    /// How pmad's CPU and I/O priority compare with the trainer's.
    pub enum Priority {
        /// Lower: nice 10, SCHED_BATCH, the lowest best-effort I/O priority.
        Background = "background",
        /// As started.
        Normal = "normal",
    }
}

/// The default worker threads of a sidecar: a quarter of the cores it may use (at least 1),
/// so the trainer beside it keeps the rest.
pub fn default_threads(usable_cores: usize) -> usize {
    (usable_cores / 4).max(1)
}

/// `[partition]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionConfig {
    /// This instance's index, in `0..count`.
    pub index: usize,
    /// How many instances share every output.
    pub count: usize,
    /// Where `index` came from (`config` or an environment variable).
    pub index_from: String,
    /// Where `count` came from.
    pub count_from: String,
    /// How outputs are split.
    pub by: PartitionBy,
    /// How parts are committed.
    pub commit: CommitMode,
    /// After this, any instance may commit a step whose parts are all there.
    pub takeover_after: Duration,
    /// A step whose parts are not all there after this is abandoned.
    pub part_timeout: Duration,
}

/// The fewest values `spike.window` may keep.
pub const SPIKE_MIN_WINDOW: usize = 8;

/// `[spike]`, resolved: the loss-spike sentinel and its rescue outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct SpikeConfig {
    /// The `log_history` keys watched (`loss`, `grad_norm`).
    pub series: Vec<String>,
    /// Healthy values kept per series.
    pub window: usize,
    /// A value scoring at least this robust z is a spike.
    pub z: f64,
    /// A spiking series recovers below this z.
    pub recover_z: f64,
    /// Checkpoints averaged for a rescue.
    pub k: usize,
    /// Where rescues are published.
    pub out_dir: PathBuf,
}

impl Config {
    /// Read and resolve a config file; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: Some(path.to_path_buf()),
            detail: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|e| match e {
            Error::Config { detail, .. } => Error::Config {
                file: Some(path.to_path_buf()),
                detail,
            },
            other => other,
        })
    }

    /// Parse and resolve config text.
    pub fn parse(text: &str) -> Result<Config> {
        Config::parse_with_env(text, &|var| std::env::var(var).ok())
    }

    /// Parse and resolve config text, reading `"auto"` settings from `env` (the process
    /// environment in [`Config::parse`]).
    pub fn parse_with_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        raw::parse(text, env).map_err(|detail| Error::Config { file: None, detail })
    }

    /// The largest window over recipes (how many checkpoints stay pinned).
    pub fn window_capacity(&self) -> usize {
        self.recipes.iter().map(|r| r.window).max().unwrap_or(1)
    }

    /// The directories pmad itself writes (outputs, state): never scanned as checkpoints.
    pub fn own_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.recipes.iter().map(|r| r.out_dir.clone()).collect();
        v.extend(self.state.dir.clone());
        v.extend(self.spike.as_ref().map(|s| s.out_dir.clone()));
        v
    }
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
    fn sums_wait_for_the_save_interval_except_with_partition() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.state.save_interval, Duration::from_secs(30 * 60));
        let c = Config::parse(&format!("{MIN}\n[state]\nsave_interval = \"0s\"")).unwrap();
        assert_eq!(c.state.save_interval, Duration::ZERO);
        let c = Config::parse(&format!(
            "{MIN}\n[state]\ndir = \"/s\"\n[partition]\ncount = 2\nindex = 0"
        ))
        .unwrap();
        assert_eq!(c.state.save_interval, Duration::ZERO);
        let e = bad(&format!("{MIN}\n[state]\nsave_interval = \"soon\""));
        assert!(e.contains("state.save_interval"), "{e}");
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
        let c =
            Config::parse(&MIN.replace("dir = \"/ckpt\"", "dir = \"/c\"\nlayout = \"torchtitan\""))
                .unwrap();
        assert_eq!(c.watch.pattern.step("step-300"), Some(300));
        assert_eq!(c.watch.marker, Marker::InDir(".metadata".into()));
        let e = bad(&MIN.replace("dir = \"/ckpt\"", "dir = \"/c\"\nlayout = \"dcp\""));
        assert!(e.contains("watch.pattern") && e.contains("\"dcp\""), "{e}");
    }

    #[test]
    fn select_patterns_are_checked_when_read() {
        let c = Config::parse(&format!(
            "{MIN}\n[select]\nexclude = [\"norm\", \"^output\\\\.\"]"
        ))
        .unwrap();
        assert_eq!(c.select.exclude, ["norm", "^output\\."]);
        assert!(c.select.include.is_empty());
        let e = bad(&format!("{MIN}\n[select]\ninclude = [\"ok\", \"(\"]"));
        assert!(
            e.contains("select.include[1]") && e.contains("not a regular expression"),
            "{e}"
        );
        let e = bad(&format!("{MIN}\n[select]\nincluded = []"));
        assert!(e.contains("included"), "{e}");
    }

    fn bad(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
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
    fn schedule_recipes_need_a_shape_and_keep_their_keys_to_themselves() {
        let sched = |extra: &str| {
            format!(
                "{MIN}\n[[recipe]]\nname = \"d\"\nmethod = \"schedule\"\nout_dir = \"/out/d\"\n{extra}"
            )
        };
        let c = Config::parse(&sched("shape = \"minus_sqrt\"\nwindow = 8")).unwrap();
        assert_eq!(
            c.recipes[1].method,
            Method::Schedule {
                shape: crate::math::Shape::MinusSqrt,
                final_lr_ratio: 0.0
            }
        );
        assert_eq!(c.recipes[1].window, 8);
        assert!(c
            .describe()
            .contains("schedule minus_sqrt (final_lr_ratio 0)"));
        let e = bad(&sched(""));
        assert!(
            e.contains("recipe[1].shape") && e.contains("linear, cosine, minus_sqrt"),
            "{e}"
        );
        let e = bad(&sched("shape = \"exp\""));
        assert!(e.contains("recipe[1].shape") && e.contains("exp"), "{e}");
        let e = bad(&sched("shape = \"cosine\"\nfinal_lr_ratio = 1.5"));
        assert!(
            e.contains("recipe[1].final_lr_ratio") && e.contains("1.5"),
            "{e}"
        );
        let e = bad(&MIN.replace("method = \"sma\"", "method = \"sma\"\nshape = \"cosine\""));
        assert!(
            e.contains("recipe[0].shape") && e.contains("schedule"),
            "{e}"
        );
        let e = bad(&MIN.replace("method = \"sma\"", "method = \"sma\"\nfinal_lr_ratio = 0.1"));
        assert!(e.contains("recipe[0].final_lr_ratio"), "{e}");
    }

    #[test]
    fn spike_settings_resolve_with_defaults_and_checks() {
        let c = Config::parse(&format!(
            "{MIN}\n[spike]\nenabled = true\nout_dir = \"/out/rescue\"\n"
        ))
        .unwrap();
        let s = c.spike.as_ref().unwrap();
        assert_eq!(s.series, ["loss", "grad_norm"]);
        assert_eq!((s.window, s.z, s.recover_z, s.k), (64, 6.0, 3.0, 3));
        assert!(c.own_dirs().contains(&PathBuf::from("/out/rescue")));
        assert!(c
            .describe()
            .contains("SMA of the last 3 checkpoints before the onset"));
        // Off unless enabled, even when other keys are set.
        let c = Config::parse(&format!("{MIN}\n[spike]\nz = 4.0\n")).unwrap();
        assert!(c.spike.is_none());
        for (extra, key) in [
            ("", "spike.out_dir"),
            ("out_dir = \"/o\"\nwindow = 3", "spike.window"),
            ("out_dir = \"/o\"\nz = 0", "spike.z"),
            ("out_dir = \"/o\"\nrecover_z = 9", "spike.recover_z"),
            ("out_dir = \"/o\"\nk = 0", "spike.k"),
            ("out_dir = \"/o\"\nseries = []", "spike.series"),
            ("out_dir = \"/out/sma10\"", "spike.out_dir"),
            ("out_dir = \"/o\"\nbogus = 1", "bogus"),
        ] {
            let e = bad(&format!("{MIN}\n[spike]\nenabled = true\n{extra}\n"));
            assert!(e.contains(key), "{extra:?}: {e}");
        }
        let e = bad(&format!(
            "{}\n[spike]\nenabled = true\nout_dir = \"/o\"\n",
            MIN.replace("[watch]", "[watch]\nlayout = \"megatron\"")
        ));
        assert!(
            e.contains("spike.enabled") && e.contains("trainer_state.json"),
            "{e}"
        );
    }

    #[test]
    fn daemon_priority_and_threads() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.priority, Priority::Background);
        assert!(c.threads_auto && c.threads == default_threads(crate::sys::usable_cores()));
        assert_eq!(
            (default_threads(1), default_threads(2), default_threads(64)),
            (1, 1, 16)
        );
        let c = Config::parse(&format!(
            "{MIN}\n[daemon]\npriority = \"normal\"\nthreads = 3\n"
        ))
        .unwrap();
        assert_eq!(
            (c.priority, c.threads, c.threads_auto),
            (Priority::Normal, 3, false)
        );
        for (v, key) in [
            ("threads = 0", "daemon.threads"),
            ("threads = \"many\"", "daemon.threads"),
            ("priority = \"high\"", "daemon.priority"),
        ] {
            let e = bad(&format!("{MIN}\n[daemon]\n{v}\n"));
            assert!(e.contains(key), "{v}: {e}");
        }
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

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn with_partition(section: &str) -> String {
        format!("{MIN}\n[partition]\n{section}")
    }

    #[test]
    fn no_partition_section_means_one_instance() {
        let c = Config::parse_with_env(MIN, &env_of(&[("SLURM_PROCID", "3")])).unwrap();
        assert_eq!(c.partition, None);
        assert!(!c.describe().contains("[partition]"));
    }

    #[test]
    fn partition_index_and_count_come_from_each_launcher() {
        let text = with_partition("");
        type Case<'a> = (&'a [(&'a str, &'a str)], (usize, &'a str), (usize, &'a str));
        let cases: &[Case] = &[
            (
                &[("PMAD_PARTITION_INDEX", "1"), ("PMAD_PARTITION_COUNT", "4")],
                (1, "PMAD_PARTITION_INDEX"),
                (4, "PMAD_PARTITION_COUNT"),
            ),
            (
                &[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "3"), ("RANK", "17")],
                (2, "SLURM_PROCID"),
                (3, "SLURM_NTASKS"),
            ),
            (
                &[("LWS_WORKER_INDEX", "0"), ("LWS_GROUP_SIZE", "8")],
                (0, "LWS_WORKER_INDEX"),
                (8, "LWS_GROUP_SIZE"),
            ),
            (
                &[("JOB_COMPLETION_INDEX", "5"), ("PMAD_PARTITION_COUNT", "6")],
                (5, "JOB_COMPLETION_INDEX"),
                (6, "PMAD_PARTITION_COUNT"),
            ),
            // pmad's own variables win over a launcher's.
            (
                &[
                    ("PMAD_PARTITION_INDEX", "1"),
                    ("PMAD_PARTITION_COUNT", "2"),
                    ("SLURM_PROCID", "7"),
                    ("SLURM_NTASKS", "8"),
                ],
                (1, "PMAD_PARTITION_INDEX"),
                (2, "PMAD_PARTITION_COUNT"),
            ),
        ];
        for (vars, (index, index_from), (count, count_from)) in cases {
            let p = Config::parse_with_env(&text, &env_of(vars))
                .unwrap()
                .partition
                .unwrap();
            assert_eq!(
                (
                    p.index,
                    p.index_from.as_str(),
                    p.count,
                    p.count_from.as_str()
                ),
                (*index, *index_from, *count, *count_from),
                "{vars:?}"
            );
            assert_eq!(p.by, PartitionBy::Auto);
            assert_eq!(p.commit, CommitMode::Auto);
            assert_eq!(p.takeover_after, Duration::from_secs(600));
            assert_eq!(p.part_timeout, Duration::from_secs(7200));
        }
        // Explicit numbers need no environment, and check-config says where they came from.
        let c = Config::parse_with_env(
            &with_partition("index = 1\ncount = 2\nby = \"tensor\"\ncommit = \"marker\""),
            &env_of(&[]),
        )
        .unwrap();
        let p = c.partition.as_ref().unwrap();
        assert_eq!(
            (p.index, p.count, p.by, p.commit),
            (1, 2, PartitionBy::Tensor, CommitMode::Marker)
        );
        assert!(
            c.describe().contains("index          = 1 (from config)"),
            "{}",
            c.describe()
        );
        let c = Config::parse_with_env(
            &text,
            &env_of(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "3")]),
        )
        .unwrap();
        assert!(
            c.describe()
                .contains("index          = 2 (from SLURM_PROCID)"),
            "{}",
            c.describe()
        );
        assert!(
            c.describe()
                .contains("count          = 3 (from SLURM_NTASKS)"),
            "{}",
            c.describe()
        );
    }

    #[test]
    fn partition_errors_name_the_key_and_the_variable() {
        let text = with_partition("");
        let error = |vars: &[(&str, &str)], text: &str| {
            Config::parse_with_env(text, &env_of(vars))
                .unwrap_err()
                .to_string()
        };
        // RANK and WORLD_SIZE count GPUs, not nodes: never used.
        let e = error(&[("RANK", "0"), ("WORLD_SIZE", "8")], &text);
        assert!(
            e.contains("partition.index") && e.contains("SLURM_PROCID"),
            "{e}"
        );
        let e = error(&[("JOB_COMPLETION_INDEX", "1")], &text);
        assert!(
            e.contains("partition.count") && e.contains("PMAD_PARTITION_COUNT"),
            "{e}"
        );
        assert!(e.contains("Indexed Job"), "{e}");
        let e = error(&[("SLURM_PROCID", "x1"), ("SLURM_NTASKS", "2")], &text);
        assert!(e.contains("SLURM_PROCID=\"x1\""), "{e}");
        let e = error(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")], &text);
        assert!(
            e.contains("4 (from SLURM_PROCID)") && e.contains("count 4 (from SLURM_NTASKS)"),
            "{e}"
        );
        let e = error(&[], &with_partition("index = 0\ncount = 0"));
        assert!(e.contains("partition.count") && e.contains("is 0"), "{e}");
        let e = error(&[], &with_partition("index = 0\ncount = 2\nby = \"layer\""));
        assert!(e.contains("partition.by"), "{e}");
        let e = error(
            &[],
            &with_partition("index = 0\ncount = 2\ntakeover_after = \"soon\""),
        );
        assert!(e.contains("partition.takeover_after"), "{e}");
        let e = error(&[], &with_partition("index = -1\ncount = 2"));
        assert!(e.contains("partition.index"), "{e}");
        let e = error(
            &[],
            &format!("{MIN}emit_interval = \"1h\"\n[partition]\nindex = 0\ncount = 2\n"),
        );
        assert!(
            e.contains("recipe[0].emit_interval") && e.contains("emit_every"),
            "{e}"
        );
        let e = error(&[], &with_partition("index = 0\ncount = 2\nrank = 1"));
        assert!(e.contains("rank"), "{e}");
    }
}
