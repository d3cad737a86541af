//! `worker runs list|show`: the admin API from the command line (blocking; call it outside
//! any async runtime).

use anyhow::{Context, bail};
use serde_json::Value;

use crate::config::Config;

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

pub fn get(config: &Config, base: &str, path: &str) -> anyhow::Result<Value> {
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
    Ok(body)
}

/// Whether `e` (from [`get`]) means nothing answered at the address: no worker is there.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(reqwest::Error::is_connect))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn age(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else { return "-".into() };
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

/// The runs table.
pub fn print_list(runs: &Value) -> String {
    let mut out =
        format!("{:<40} {:<10} {:<10} {:>5} {:>8}  {}\n", "RUN", "WORKFLOW", "STATUS", "STEP", "ATTEMPTS", "STARTED");
    for r in runs.as_array().into_iter().flatten() {
        out += &format!(
            "{:<40} {:<10} {:<10} {:>5} {:>8}  {}\n",
            text(&r["id"]),
            text(&r["workflow"]),
            text(&r["status"]),
            text(&r["step_index"]),
            text(&r["attempts"]),
            age(&r["created_at_ms"])
        );
    }
    out
}

/// One run: its header, history and recorded responses.
pub fn print_run(run: &Value) -> String {
    let mut out = format!(
        "run {} ({} v{})\nstatus {}  step {}  attempts {}  started {}\n",
        text(&run["id"]),
        text(&run["workflow"]),
        text(&run["version"]),
        text(&run["status"]),
        text(&run["step_index"]),
        text(&run["attempts"]),
        age(&run["created_at_ms"])
    );
    if let Some(h) = run["host_id"].as_str() {
        out += &format!("host {h}\n");
    }
    if let Some(t) = run["trace_id"].as_str() {
        out += &format!("trace {t}\n");
    }
    if run["failure"].is_object() {
        let f = &run["failure"];
        out += &format!("failed at {} ({}): {}\n", text(&f["step"]), text(&f["kind"]), text(&f["error"]));
    }
    out += &format!("input {}\n\nhistory:\n", run["input"]);
    for e in run["events"].as_array().into_iter().flatten() {
        let what = match e["event"].as_str().unwrap_or("?") {
            "step_completed" => format!(
                "{} completed (attempt {}, {} ms)",
                text(&e["step"]),
                text(&e["attempt"]),
                text(&e["duration_ms"])
            ),
            "attempt_failed" => format!(
                "{} attempt {} failed ({}, {} ms): {}",
                text(&e["step"]),
                text(&e["attempt"]),
                text(&e["kind"]),
                text(&e["duration_ms"]),
                text(&e["error"])
            ),
            "resumed" => format!("resumed at {}", text(&e["step"])),
            "finished" => format!("finished {}", text(&e["status"])),
            other => other.to_owned(),
        };
        out += &format!("  {:>3}  {}\n", text(&e["seq"]), what);
    }
    out += "\nresponses:\n";
    for r in run["responses"].as_array().into_iter().flatten() {
        out += &format!("  [{}] {}\n", text(&r["index"]), r["response"]);
    }
    out
}
