//! `worker runs`: through the admin API of the worker running on the state directory, or,
//! when none runs there, the run log read straight from the state directory (the same wire
//! types the admin API answers). A running worker holds the log's lock; then the admin API
//! is the way in.

use anyhow::{Context, bail};
use serde::Serialize;
use thinpipe::admin::wire::{EventKind, RunLine, RunView};
use thinpipe::admin::{ADDR_FILE, AdminClient, AdminError};
use thinpipe::fsm::{Engine, OpenError, RunFilter, RunStatus};

use crate::config::Config;

/// What `worker runs` prints: a listing, or one run.
#[derive(Debug)]
pub enum Answer {
    Runs(Vec<RunLine>),
    Run(Box<RunView>),
}

impl Answer {
    /// As the admin API answers it.
    pub fn json(&self) -> anyhow::Result<String> {
        fn pretty(v: &impl Serialize) -> anyhow::Result<String> {
            serde_json::to_string_pretty(v).context("encoding the answer")
        }
        match self {
            Answer::Runs(runs) => pretty(runs),
            Answer::Run(run) => pretty(run),
        }
    }

    /// For a person.
    pub fn text(&self) -> String {
        match self {
            Answer::Runs(runs) => print_list(runs),
            Answer::Run(run) => print_run(run),
        }
    }
}

/// `worker runs show` named a run the log does not hold: the caller's mistake (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("no run {id} in {place}; `worker runs list` shows the runs there")]
pub struct NoSuchRun {
    pub id: String,
    pub place: String,
}

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
            None => Err(NoSuchRun { id, place: config.runs_path().display().to_string() }.into()),
        },
    }
}

/// `worker runs`: through the admin API of the worker running on the state directory (or
/// `--admin-url`), else straight from the run log when no worker runs there.
pub fn run(config: &Config, query: Query, admin_url: Option<&str>, json: bool) -> anyhow::Result<()> {
    let running = admin_url.is_some() || config.state_dir.join(ADDR_FILE).exists();
    let through_api = || -> anyhow::Result<Answer> {
        let client = admin_client(config, admin_url)?;
        Ok(match &query {
            Query::List { workflow, status, limit } => {
                let enc = |s: &Option<String>| s.as_deref().map(encode).unwrap_or_default();
                let path = format!("/api/runs?limit={limit}&workflow={}&status={}", enc(workflow), enc(status));
                Answer::Runs(client.get(&path)?)
            }
            Query::Show(id) => match client.get(&format!("/api/runs/{}", encode(id))) {
                Err(AdminError::Status { status: 404, .. }) => {
                    return Err(NoSuchRun { id: id.clone(), place: format!("the worker at {}", client.base()) }.into());
                }
                answer => Answer::Run(answer?),
            },
        })
    };
    let answer = match (running, admin_url) {
        (true, Some(_)) => through_api()?,
        // The address file of a worker that was killed stays behind: no answer means no worker.
        (true, None) => match through_api() {
            Ok(v) => v,
            Err(e) if e.downcast_ref::<AdminError>().is_some_and(AdminError::is_unreachable) => read(config, query)?,
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

/// The admin API of the worker on `config`'s state directory: `--admin-url`, else the
/// address the running worker wrote, else the configured `admin.listen`.
fn admin_client(config: &Config, flag: Option<&str>) -> anyhow::Result<AdminClient> {
    let base = match AdminClient::address(flag, &config.state_dir)? {
        Some(base) => base,
        None if config.admin.listen.is_empty() => {
            bail!("no worker is serving the admin API for {} (admin.listen is empty)", config.state_dir.display())
        }
        None => format!("http://{}", config.admin.listen),
    };
    Ok(AdminClient::new(&base, Some(&config.admin.token), std::time::Duration::from_secs(30))?)
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

fn age(ms: u64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(ms);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn status(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Active => "active",
        RunStatus::Completed => "completed",
        RunStatus::Failed => "failed",
    }
}

/// The runs table.
pub fn print_list(runs: &[RunLine]) -> String {
    let mut out =
        format!("{:<40} {:<10} {:<10} {:>5} {:>8}  {}\n", "RUN", "WORKFLOW", "STATUS", "STEP", "ATTEMPTS", "STARTED");
    for r in runs {
        out += &format!(
            "{:<40} {:<10} {:<10} {:>5} {:>8}  {}\n",
            r.id,
            r.workflow,
            status(r.status),
            r.step_index,
            r.attempts,
            age(r.created_at_ms)
        );
    }
    out
}

/// One run: its header, history and recorded responses.
pub fn print_run(run: &RunView) -> String {
    let r = &run.line;
    let mut out = format!(
        "run {} ({} v{})\nstatus {}  step {}  attempts {}  started {}\n",
        r.id,
        r.workflow,
        r.version,
        status(r.status),
        r.step_index,
        r.attempts,
        age(r.created_at_ms)
    );
    out += &format!("host {}\n", run.host_id);
    if let Some(t) = &r.trace_id {
        out += &format!("trace {t}\n");
    }
    if let Some(f) = &r.failure {
        let code = f.code.as_deref().map(|c| format!(", {c}")).unwrap_or_default();
        out += &format!("failed at {} ({}{code}): {}\n", f.step, f.kind, f.error);
    }
    out += &format!("input {}\n\nhistory:\n", run.input);
    for e in &run.events {
        let what = match &e.what {
            EventKind::Started => "started".to_owned(),
            EventKind::StepCompleted { step, attempt, duration_ms } => {
                format!("{step} completed (attempt {attempt}, {duration_ms} ms)")
            }
            EventKind::AttemptFailed { step, attempt, error, kind, duration_ms } => {
                format!("{step} attempt {attempt} failed ({kind}, {duration_ms} ms): {error}")
            }
            EventKind::Resumed { step, .. } => format!("resumed at {step}"),
            EventKind::Finished { status: s, .. } => format!("finished {}", status(*s)),
        };
        out += &format!("  {:>3}  {}\n", e.seq, what);
    }
    out += "\nresponses (each with what it changed; the whole ones: --json):\n";
    let mut before = serde_json::Value::Null;
    for r in &run.responses {
        out += &format!("  [{}] {}\n", r.index, changed(&before, &r.response, &run.input));
        before = r.response.clone();
    }
    out
}

/// The fields of `now` that differ from `before`; a value the input already shows (the
/// manifest, mostly) is named, not printed again.
fn changed(before: &serde_json::Value, now: &serde_json::Value, input: &serde_json::Value) -> String {
    let (Some(now_fields), before_fields) = (now.as_object(), before.as_object()) else { return now.to_string() };
    let mut parts = Vec::new();
    for (key, value) in now_fields {
        if before_fields.and_then(|b| b.get(key)) == Some(value) {
            continue;
        }
        if !value.is_null() && input.get(key) == Some(value) {
            parts.push(format!("{key}=(as in the input)"));
        } else {
            parts.push(format!("{key}={value}"));
        }
    }
    if parts.is_empty() { "(unchanged)".to_owned() } else { parts.join(" ") }
}

#[cfg(test)]
mod response_tests {
    use serde_json::json;

    #[test]
    fn a_response_shows_what_it_changed_and_names_what_the_input_holds() {
        let input = json!({"family": "web", "manifest": {"layers": [1, 2, 3]}});
        let first = json!({"manifest": null, "base": null});
        let second = json!({"manifest": {"layers": [1, 2, 3]}, "base": null});
        let third = json!({"manifest": {"layers": [1, 2, 3]}, "base": 4});
        assert_eq!(super::changed(&serde_json::Value::Null, &first, &input), "base=null manifest=null");
        assert_eq!(super::changed(&first, &second, &input), "manifest=(as in the input)");
        assert_eq!(super::changed(&second, &third, &input), "base=4");
        assert_eq!(super::changed(&third, &third, &input), "(unchanged)");
    }
}
