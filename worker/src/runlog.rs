//! `worker runs` without a running worker: the run log read straight from the state
//! directory (the same wire types the admin API answers). A worker running on the directory holds
//! the log's lock; then the admin API is the way in.

use anyhow::{Context, bail};
use thinpipe::fsm::{Engine, OpenError, RunFilter, RunStatus};

use crate::admin::client::Answer;
use crate::admin::wire::{RunLine, RunView};
use crate::config::Config;

/// What to read.
pub enum Query {
    List { workflow: Option<String>, status: Option<String>, limit: usize },
    Show(String),
}

/// Reads `query` from the run log of `config`'s state directory. Never creates one.
pub fn read(config: &Config, query: Query) -> anyhow::Result<Answer> {
    let path = config.runs_path();
    if !path.exists() {
        bail!("no run log at {}: no worker has run on this state directory yet", path.display());
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    runtime.block_on(async {
        let engine = match Engine::open(&path, Default::default()).await {
            Ok(e) => e,
            Err(OpenError::AlreadyOpen { .. }) => bail!(
                "the run log {} is held by a running worker whose admin API is off: set admin.listen on it, or pass --admin-url",
                path.display()
            ),
            Err(e) => return Err(e).context("opening the run log"),
        };
        let value = lookup(&engine, config, query);
        engine.shutdown().await;
        value
    })
}

fn lookup(engine: &Engine, config: &Config, query: Query) -> anyhow::Result<Answer> {
    match query {
        Query::List { workflow, status, limit } => {
            let status = match status.as_deref().filter(|s| !s.is_empty()) {
                None => None,
                Some(s) => Some(s.parse::<RunStatus>().map_err(anyhow::Error::msg)?),
            };
            let filter = RunFilter { workflow: workflow.filter(|w| !w.is_empty()), status, limit: Some(limit) };
            Ok(Answer::Runs(engine.list_runs(&filter)?.into_iter().map(RunLine::from).collect()))
        }
        Query::Show(id) => match engine.run_detail(&id)? {
            Some(run) => Ok(Answer::Run(Box::new(RunView::new(run, &config.worker.host_id)))),
            None => bail!("no run {id} in {}", config.runs_path().display()),
        },
    }
}
