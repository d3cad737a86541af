//! `worker runs` without a running worker: the run log read straight from the state
//! directory (the same JSON the admin API answers). A worker running on the directory holds
//! the log's lock; then the admin API is the way in.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use thinpipe::fsm::{Engine, OpenError, RunFilter, RunStatus};

use crate::config::Config;

/// What to read.
pub enum Query {
    List { workflow: Option<String>, status: Option<String>, limit: usize },
    Show(String),
}

/// Reads `query` from the run log of `config`'s state directory. Never creates one.
pub fn read(config: &Config, query: Query) -> anyhow::Result<Value> {
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

fn lookup(engine: &Engine, config: &Config, query: Query) -> anyhow::Result<Value> {
    match query {
        Query::List { workflow, status, limit } => {
            let status = match status.as_deref().filter(|s| !s.is_empty()) {
                None => None,
                Some(s) => Some(
                    serde_json::from_value::<RunStatus>(json!(s))
                        .map_err(|_| anyhow::anyhow!("status {s:?}: expected active, completed or failed"))?,
                ),
            };
            let filter = RunFilter { workflow: workflow.filter(|w| !w.is_empty()), status, limit: Some(limit) };
            Ok(serde_json::to_value(engine.list_runs(&filter)?)?)
        }
        Query::Show(id) => match engine.run_detail(&id)? {
            Some(run) => {
                let mut v = serde_json::to_value(run)?;
                v["host_id"] = json!(config.worker.host_id);
                Ok(v)
            }
            None => bail!("no run {id} in {}", config.runs_path().display()),
        },
    }
}
