//! `worker runs`: through the admin API of the worker running on the state directory, or,
//! when none runs there, the run log read straight from the state directory (the same wire
//! types the admin API answers). A running worker holds the log's lock; then the admin API
//! is the way in.

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

/// `worker runs`: through the admin API of the worker running on the state directory (or
/// `--admin-url`), else straight from the run log when no worker runs there.
pub fn run(config: &Config, query: Query, admin_url: Option<&str>, json: bool) -> anyhow::Result<()> {
    use crate::admin::client;
    let running = admin_url.is_some() || config.state_dir.join(crate::admin::ADDR_FILE).exists();
    let through_api = || -> anyhow::Result<Answer> {
        let base = client::base_url(config, admin_url)?;
        Ok(match &query {
            Query::List { workflow, status, limit } => {
                let enc = |s: &Option<String>| s.as_deref().map(encode).unwrap_or_default();
                let path = format!("/api/runs?limit={limit}&workflow={}&status={}", enc(workflow), enc(status));
                Answer::Runs(client::get(config, &base, &path)?)
            }
            Query::Show(id) => Answer::Run(client::get(config, &base, &format!("/api/runs/{}", encode(id)))?),
        })
    };
    let answer = match (running, admin_url) {
        (true, Some(_)) => through_api()?,
        // The address file of a worker that was killed stays behind: no answer means no worker.
        (true, None) => match through_api() {
            Ok(v) => v,
            Err(e) if client::is_unreachable(&e) => read(config, query)?,
            Err(e) => return Err(e),
        },
        (false, _) => read(config, query)?,
    };
    if json {
        println!("{}", answer.json()?);
    } else {
        print!("{}", answer.text());
    }
    Ok(())
}

/// Percent-encodes a query or path value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
