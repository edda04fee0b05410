//! `pmad check-config FILE`: validate a config and print the resolved settings.

use pmad::config::Config;
use std::path::PathBuf;

/// `pmad check-config` arguments.
#[derive(clap::Args)]
pub struct CheckConfigArgs {
    /// TOML config file.
    config: PathBuf,
}

/// Print the resolved settings; a bad config is an error naming the key.
pub fn run(args: CheckConfigArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    super::print_out(&cfg.describe())
}
