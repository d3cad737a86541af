//! `worker`: the thinpipe daemon and its one-shot commands. This file only parses the command
//! line and dispatches (to `worker::daemon` and `worker::commands`), then turns outcomes into
//! exit codes.
//!
//! Exit codes: 0 success; 1 the job ran and failed; 2 usage or configuration error;
//! 3 the command could not run (storage, queue, another worker holding the state).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use thinpipe::job::{Job, JobKind};
use tokio_util::sync::CancellationToken;
use worker::commands;
use worker::config::Config;

/// How long the end of `main` waits for blocking step bodies after the drain.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(500);

const EXIT_CODES: &str = "Exit codes: 0 success; 1 the job (or check) ran and failed; 2 usage or configuration \
error; 3 the command could not run (storage, queue, another worker holding the state directory); \
130 stopped by a second SIGINT or SIGTERM.";

#[derive(Parser)]
#[command(
    version = env!("THINPIPE_VERSION"),
    about = "thinpipe worker: durable image preparation and snapshot activation",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Configuration file (TOML). Every setting can also come from THINPIPE_<KEY> or --set.
    #[arg(long, env = "THINPIPE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// State directory (shorthand for --set state_dir=DIR).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Log format, text or json (shorthand for --set log_format=FORMAT).
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Override one setting: --set queue.name=jobs (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    sets: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the job loop until SIGTERM or SIGINT (a second signal exits at once).
    Daemon,
    /// Run one job without a queue and print its result.
    Run {
        #[command(subcommand)]
        job: OneShot,
        /// Print the result as JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// The main job on embedded defaults: sample family, prepare, two activations.
    Demo {
        /// Print the results (and the commands that release the snapshots) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration as TOML (and check it). Secrets are redacted.
    Config {
        /// Print it as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Compare the volumes the backend holds with the host database's records: report
    /// orphans (volumes no record claims) and missing volumes; `--fix` deletes the orphans.
    /// Safe while the daemon runs. Exit 0 when no orphan is left, 1 otherwise.
    Reconcile {
        /// Delete every orphan.
        #[arg(long)]
        fix: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Collect garbage now: old versions' bases no snapshot uses, unsealed bases of failed
    /// prepares, blobs no kept base needs (and, above the high watermark, whole unused
    /// families). Needs the state directory (stop the daemon first, or use its admin API's
    /// POST /api/gc). Exit 0 unless a deletion failed.
    Gc {
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per family: its current version, the other versions kept, their bases, live snapshots
    /// and last use; and the volume storage's usage. Reads the host database only (safe while
    /// the daemon runs).
    Images {
        /// Print the inventory as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect runs: through the admin API of the worker running on the state directory, or
    /// read from its run log when none runs.
    Runs {
        #[command(subcommand)]
        cmd: RunsCommand,
        /// The admin API (default: the address the worker wrote to <state_dir>/admin.addr).
        #[arg(long, global = true)]
        admin_url: Option<String>,
        /// Print JSON as the API returns it.
        #[arg(long, global = true)]
        json: bool,
    },
}

impl RunsCommand {
    fn query(&self) -> worker::commands::runs::Query {
        match self {
            RunsCommand::List { workflow, status, limit } => worker::commands::runs::Query::List {
                workflow: workflow.clone(),
                status: status.clone(),
                limit: *limit,
            },
            RunsCommand::Show { id } => worker::commands::runs::Query::Show(id.clone()),
        }
    }
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Runs, newest first.
    List {
        /// Only runs of this workflow: prepare, activate, release or retire-base.
        #[arg(long)]
        workflow: Option<String>,
        /// active, completed or failed.
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One run: input, history, recorded responses.
    Show {
        /// The run id, as `runs list` shows it (prepare-web@5cb5a41d4c9b, activate-inv-1, ...).
        id: String,
    },
}

#[derive(Subcommand)]
enum OneShot {
    /// Prepare a family's version (the source's current one, or --digest) and make it the
    /// family's current version on this host (each version is prepared once per host).
    Prepare {
        /// The image family (its name at the source).
        #[arg(long)]
        family: String,
        /// The version to prepare (a manifest digest, sha256:...).
        #[arg(long)]
        digest: Option<String>,
        /// Where image families come from (overrides `source`): a path, dir:<path>,
        /// s3://bucket/prefix, or a registry reference (registry.example.com/team/{family}:1.4,
        /// docker.io/library/debian:bookworm, docker://…).
        #[arg(long)]
        source: Option<String>,
    },
    /// Activate a fresh snapshot of a family (preparing it first if needed).
    Activate {
        /// The image family (its name at the source).
        #[arg(long)]
        family: String,
        /// The invocation this snapshot is for (single use). Defaults to a new id, printed
        /// in the result (`invocation_id`) for the release.
        #[arg(long)]
        invocation_id: Option<String>,
        /// The version to activate (default: the family's current version on this host).
        #[arg(long)]
        digest: Option<String>,
        /// Release the snapshot by itself after this many seconds.
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// Where image families come from (overrides `source`): a path, dir:<path>,
        /// s3://bucket/prefix, or a registry reference (registry.example.com/team/{family}:1.4,
        /// docker.io/library/debian:bookworm, docker://…).
        #[arg(long)]
        source: Option<String>,
    },
    /// Release the snapshot of one activation.
    Release {
        /// The image family of the activation.
        #[arg(long)]
        family: String,
        /// The invocation whose snapshot to release.
        #[arg(long)]
        invocation_id: String,
    },
}

/// `worker --version`: the version (with the build id), the commit, and whether this is a
/// test build with fault points compiled in.
fn version() -> &'static str {
    let commit = match env!("THINPIPE_COMMIT") {
        "" => "unknown",
        c => c,
    };
    let test = if thinpipe::fault::COMPILED_IN { ", TEST BUILD: fault points compiled in" } else { "" };
    // Built once per process, for the parser, which wants a static string.
    Box::leak(format!("{} (commit {commit}{test})", env!("THINPIPE_VERSION")).into_boxed_str())
}

fn main() -> ExitCode {
    let cli = match Cli::command().version(version()).try_get_matches() {
        Ok(m) => match Cli::from_arg_matches(&m) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        },
        Err(e) => e.exit(),
    };
    if !matches!(cli.command, Command::Daemon) {
        thinpipe::sigpipe::end_quietly_on_broken_pipe();
    }
    let mut sets = cli.sets.clone();
    if let Some(dir) = &cli.state_dir {
        sets.push(format!("state_dir={}", dir.display()));
    }
    if let Some(format) = &cli.log_format {
        sets.push(format!("log_format={format}"));
    }
    if let Command::Run {
        job: OneShot::Prepare { source: Some(s), .. } | OneShot::Activate { source: Some(s), .. },
        ..
    } = &cli.command
    {
        sets.push(format!("source={s}"));
    }
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &sets) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Command::Runs { cmd, admin_url, json } = &cli.command {
        return match commands::runs::run(&config, cmd.query(), admin_url.as_deref(), *json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {e:#}");
                // Naming a run that is not there is a usage error; anything else could not run.
                ExitCode::from(if e.downcast_ref::<commands::runs::NoSuchRun>().is_some() { 2 } else { 3 })
            }
        };
    }
    // The demo talks to a person through its progress bar; keep the log to warnings there.
    let level = if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "info" };
    // The daemon also serves its metrics at the admin API's /metrics.
    let prometheus = matches!(cli.command, Command::Daemon) && !config.admin.listen.is_empty();
    let telemetry = thinpipe::telemetry::init("thinpipe-worker", config.log_format, level, prometheus);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let code = match runtime.block_on(run(cli.command, config, telemetry.prometheus())) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<worker::host::WrongSettings>().is_some() => {
            eprintln!("worker: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("worker: {e:#}");
            ExitCode::from(3)
        }
    };
    // Bounded: a step body still running on a blocking thread (an unpack past the drain
    // deadline) is not waited for; its run resumes at the next start (steps run at least once).
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    // Pending spans and metrics go out before the process ends.
    telemetry.shutdown();
    code
}

async fn run(
    command: Command,
    config: Config,
    prometheus: Option<thinpipe::telemetry::PrometheusMetrics>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Config { json } => commands::print_config(&config, json),
        Command::Demo { json } => {
            Ok(if commands::demo::run(config, json).await? { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Daemon => daemon(config, prometheus).await,
        Command::Runs { .. } => unreachable!("handled before the runtime starts"),
        Command::Reconcile { fix, json } => commands::reconcile::run(&config, fix, json),
        Command::Images { json } => commands::images::print(&config, json),
        Command::Gc { dry_run, json } => commands::images::gc(config, dry_run, json).await,
        Command::Run { job, json } => {
            let job = match job {
                OneShot::Prepare { family, digest, .. } => {
                    Job { digest, ..Job::new(JobKind::Prepare, &family, None) }.versioned()
                }
                OneShot::Activate { family, invocation_id, digest, ttl_secs, .. } => {
                    let id = invocation_id.unwrap_or_else(commands::run::new_invocation_id);
                    Job { digest, ttl_secs, ..Job::new(JobKind::Activate, &family, Some(&id)) }.versioned()
                }
                OneShot::Release { family, invocation_id } => Job::new(JobKind::Release, &family, Some(&invocation_id)),
            };
            commands::run::command(config, job, json).await
        }
    }
}

async fn daemon(
    config: Config,
    prometheus: Option<thinpipe::telemetry::PrometheusMetrics>,
) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    // First, so a signal while waiting for the state directory (worker.wait_for_state)
    // ends the wait cleanly instead of killing the process by SIGTERM's default action.
    worker::daemon::signals::spawn(shutdown.clone())?;
    Ok(match worker::daemon::run(config, prometheus, shutdown).await? {
        worker::daemon::Stopped::Drained => ExitCode::SUCCESS,
        worker::daemon::Stopped::LeaseLost | worker::daemon::Stopped::StorageFailed => ExitCode::from(3),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every option, argument and command says what it is, and `--help` ends with the exit
    /// codes.
    #[test]
    fn every_argument_has_help_and_the_exit_codes_are_in_help() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if !["help", "version"].contains(&id) && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                check(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        let mut missing = Vec::new();
        check(&cmd, cmd.get_name(), &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
        let help = cmd.clone().render_long_help().to_string();
        assert!(help.contains("Exit codes: 0"), "{help}");
    }
}
