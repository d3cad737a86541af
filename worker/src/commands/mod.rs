//! The one-shot subcommands, one file each: `run` (one job without a queue), `runs` (the run
//! log, through the admin API or the file), `reconcile`, `images` (and `gc`), `demo`; and
//! `config` here. Each takes the loaded settings and returns what `main` turns into an exit
//! code.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;

pub mod demo;
pub mod images;
pub mod reconcile;
pub mod run;
pub mod runs;

/// `worker config`: the effective settings (secrets redacted), as TOML or JSON.
pub fn print_config(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(&config.redacted()).context("encoding the configuration")?);
    } else {
        print!("{}", toml::to_string_pretty(&config.redacted()).context("encoding the configuration")?);
    }
    Ok(ExitCode::SUCCESS)
}
