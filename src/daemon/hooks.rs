//! `on_emit`: a command run after each published output, in the background, with a time
//! limit. Its outcome is logged (`hook.finished`, `hook.failed`); it never holds up the
//! daemon, and commands still running at shutdown are stopped.

use crate::config::Recipe;
use crate::obs::log::secs;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A command to run after an emission.
#[derive(Debug)]
pub struct HookJob {
    /// Recipe name.
    pub recipe: String,
    /// Step published.
    pub step: u64,
    /// Command and arguments, placeholders substituted.
    pub argv: Vec<String>,
    /// Time limit.
    pub timeout: Duration,
}

impl HookJob {
    /// The job for recipe `r` after it published `step` at `path`, or `None` without
    /// `on_emit`: `{path}`, `{step}` and `{recipe}` are substituted in every argument.
    pub fn after_emission(r: &Recipe, step: u64, path: &Path) -> Option<HookJob> {
        if r.on_emit.is_empty() {
            return None;
        }
        let argv = r
            .on_emit
            .iter()
            .map(|a| {
                a.replace("{path}", &path.display().to_string())
                    .replace("{step}", &step.to_string())
                    .replace("{recipe}", &r.name)
            })
            .collect();
        Some(HookJob {
            recipe: r.name.clone(),
            step,
            argv,
            timeout: r.on_emit_timeout,
        })
    }
}

/// Run a job to completion or its time limit, logging the outcome.
pub async fn run_hook(job: HookJob) {
    let Some((prog, args)) = job.argv.split_first() else {
        return;
    };
    let started = Instant::now();
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, error = %e);
            return;
        }
    };
    match tokio::time::timeout(job.timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {
            info!(event = "hook.finished", recipe = %job.recipe, step = job.step, command = %prog, took = %secs(started.elapsed()));
        }
        Ok(Ok(status)) => {
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, status = %status);
        }
        Ok(Err(e)) => {
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, error = %e);
        }
        Err(_) => {
            let _ = child.kill().await;
            warn!(event = "hook.failed", recipe = %job.recipe, step = job.step, command = %prog, reason = "timeout", timeout = %secs(job.timeout));
        }
    }
}
