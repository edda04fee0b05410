//! The `pmad` binary: argument parsing, output and exit codes. Logic lives in the library;
//! each command's glue is in `cmd/`.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "pmad",
    version,
    about = "Pre-trained Model Averaging daemon: running averages of LLM checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge checkpoints (given oldest first) into one, once.
    Merge(cmd::merge::MergeArgs),
    /// Show a checkpoint's tensors, sizes and validity.
    Inspect(cmd::inspect::InspectArgs),
    /// Run the daemon: watch a training run and publish running averages.
    Run(cmd::run::RunArgs),
    /// Validate a config file and print the resolved settings.
    CheckConfig(cmd::check_config::CheckConfigArgs),
    /// A self-contained demonstration: a simulated training run merged live.
    Demo(cmd::demo::DemoArgs),
}

/// Exit codes: 0 ok, 1 runtime failure (or an invalid checkpoint for `inspect`), 2 usage or
/// configuration error.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Merge(a) => cmd::merge::run(a).map(|_| true),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Run(a) => cmd::run::run(a).map(|_| true),
        Command::CheckConfig(a) => cmd::check_config::run(a).map(|_| true),
        Command::Demo(a) => cmd::demo::run(a).map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<pmad::Error>() {
                Some(pe) if pe.is_usage() => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}
