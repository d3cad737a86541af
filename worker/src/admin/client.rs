//! `worker runs list|show`: the admin API from the command line (blocking; call it outside
//! any async runtime).

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::wire::{EventKind, RunLine, RunView};
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

/// The admin API's base URL: `--admin-url`, else the address the running worker wrote to
/// its state directory, else the configured `admin.listen`.
pub fn base_url(config: &Config, flag: Option<&str>) -> anyhow::Result<String> {
    if let Some(u) = flag {
        return Ok(u.trim_end_matches('/').to_owned());
    }
    let file = config.state_dir.join(super::ADDR_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok(text.trim().trim_end_matches('/').to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if config.admin.listen.is_empty() {
                bail!("no worker is serving the admin API for {} (admin.listen is empty)", config.state_dir.display());
            }
            Ok(format!("http://{}", config.admin.listen))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

pub fn get<T: DeserializeOwned>(config: &Config, base: &str, path: &str) -> anyhow::Result<T> {
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let mut req = client.get(format!("{base}{path}"));
    if !config.admin.token.is_empty() {
        req = req.bearer_auth(&config.admin.token);
    }
    let resp = req.send().with_context(|| format!("{base}: is the worker running? (`worker daemon`)"))?;
    let status = resp.status();
    let body: Value = resp.json().with_context(|| format!("{base}{path}: the answer is not JSON"))?;
    if !status.is_success() {
        let msg = body.get("error").and_then(Value::as_str).unwrap_or("no detail");
        bail!("{base}{path}: HTTP {status}: {msg}");
    }
    serde_json::from_value(body).with_context(|| format!("{base}{path}: the answer is not what this version expects"))
}

/// Whether `e` (from [`get`]) means nothing answered at the address: no worker is there.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect))
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

fn status(s: super::wire::RunStatus) -> &'static str {
    match s {
        super::wire::RunStatus::Active => "active",
        super::wire::RunStatus::Completed => "completed",
        super::wire::RunStatus::Failed => "failed",
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
