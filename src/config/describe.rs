//! `pmad check-config`'s rendering of the resolved settings.

use super::{Config, Marker, WatchMode};
use crate::math::kinds::Accumulator;
use crate::math::Method;
use std::fmt::Write as _;

impl Config {
    /// Human-readable resolved settings (for `pmad check-config`).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let w = &self.watch;
        let _ = writeln!(s, "[watch]");
        let _ = writeln!(s, "dir            = {}", w.dir.display());
        let _ = writeln!(s, "layout         = {}", w.layout);
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
        let sel = &self.select;
        let _ = writeln!(s, "[select]");
        let list = |v: &[String]| {
            if v.is_empty() {
                "(none)".to_string()
            } else {
                v.iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let _ = writeln!(
            s,
            "include        = {}",
            if sel.include.is_empty() {
                "(none: the checkpoint format's rule)".to_string()
            } else {
                list(&sel.include)
            }
        );
        let _ = writeln!(s, "exclude        = {}", list(&sel.exclude));
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
        let _ = writeln!(
            s,
            "save_interval  = {}",
            humantime::format_duration(st.save_interval)
        );
        for r in &self.recipes {
            let _ = writeln!(s, "[[recipe]] {}", r.name);
            let method = match &r.method {
                Method::Sma => "sma".to_string(),
                Method::Wma => "wma".to_string(),
                Method::Ema { alpha } => format!("ema (alpha {alpha})"),
                Method::Weights(w) => format!("weights {w:?}"),
                Method::Schedule {
                    shape,
                    final_lr_ratio,
                } => format!("schedule {shape} (final_lr_ratio {final_lr_ratio})"),
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
        let _ = writeln!(s, "format         = {}", self.log_format);
        let _ = writeln!(s, "level          = {}", self.log_level);
        let _ = writeln!(s, "[daemon]");
        let _ = writeln!(
            s,
            "shutdown_grace = {}",
            humantime::format_duration(self.shutdown_grace)
        );
        let _ = writeln!(
            s,
            "priority       = {}{}",
            self.priority,
            match self.priority {
                super::Priority::Background => " (nice 10, SCHED_BATCH, lowest best-effort I/O)",
                super::Priority::Normal => "",
            }
        );
        let _ = writeln!(
            s,
            "threads        = {}{}",
            self.threads,
            if self.threads_auto {
                format!(
                    " (auto: a quarter of the {} usable cores)",
                    crate::sys::usable_cores()
                )
            } else {
                String::new()
            }
        );
        if let Some(p) = &self.partition {
            let _ = writeln!(s, "[partition]");
            let _ = writeln!(s, "index          = {} (from {})", p.index, p.index_from);
            let _ = writeln!(s, "count          = {} (from {})", p.count, p.count_from);
            let _ = writeln!(s, "by             = {}", p.by);
            let modes: Vec<String> = self
                .recipes
                .iter()
                .map(|r| format!("{}: {}", r.name, p.commit.resolve(&r.out_dir)))
                .collect();
            let _ = writeln!(s, "commit         = {} ({})", p.commit, modes.join(", "));
            let _ = writeln!(
                s,
                "takeover_after = {}",
                humantime::format_duration(p.takeover_after)
            );
            let _ = writeln!(
                s,
                "part_timeout   = {}",
                humantime::format_duration(p.part_timeout)
            );
        }
        let _ = writeln!(s, "[spike]");
        match &self.spike {
            None => {
                let _ = writeln!(s, "enabled        = false");
            }
            Some(sp) => {
                let _ = writeln!(s, "enabled        = true");
                let _ = writeln!(s, "series         = {:?}", sp.series);
                let _ = writeln!(
                    s,
                    "detect         = z >= {} over the last {} values (median, MAD); recover below z {}",
                    sp.z, sp.window, sp.recover_z
                );
                let _ = writeln!(
                    s,
                    "rescue         = SMA of the last {} checkpoints before the onset, into {}",
                    sp.k,
                    sp.out_dir.display()
                );
            }
        }
        s
    }
}
