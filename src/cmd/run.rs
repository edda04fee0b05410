//! `pmad run --config FILE`: the daemon, with its logging, runtime and signals.

use anyhow::Context;
use pmad::config::{Config, Priority};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// `pmad run` arguments.
#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: PathBuf,
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    // Before any thread starts: every thread pmad starts inherits it.
    let priority_failures = match cfg.priority {
        Priority::Background => pmad::sys::lower_priority(),
        Priority::Normal => Vec::new(),
    };
    pmad::obs::log::init(cfg.log_format, &cfg.log_level);
    for f in priority_failures {
        tracing::warn!(event = "daemon.priority", error = %f, "could not lower pmad's priority below the trainer's");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("pmad-io")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        install_signals(shutdown.clone())?;
        pmad::daemon::run(cfg, shutdown).await?;
        anyhow::Ok(())
    })
}

/// SIGTERM/SIGINT: the first stops gracefully, a second one exits at once.
fn install_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                shutdown.cancel();
            } else {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
