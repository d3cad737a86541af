//! `worker run prepare|activate|release`: one job, no queue, the result printed. The job runs
//! through the same executor as the daemon's (`job/executor.rs`).

use std::process::ExitCode;
use std::sync::Arc;

use thinpipe::job::{Job, JobResult, JobStatus};
use thinpipe::progress::{self, ProgressView};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::host::Host;
use crate::job::executor::{Executor, JobEnd};

/// Runs `job` and returns its result (a job the daemon would retry or dead-letter fails here,
/// with the reason).
pub async fn run(host: &Arc<Host>, job: &Job) -> anyhow::Result<JobResult> {
    job.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let executor = Executor::new(host.clone(), CancellationToken::new());
    let failed = |error: String| JobResult {
        job_id: "one-shot".into(),
        kind: job.kind,
        family: job.family.clone(),
        invocation_id: job.invocation_id.clone(),
        status: JobStatus::Failed,
        run_id: job.run_id(),
        snapshot_path: None,
        base_vol_id: None,
        error: Some(error),
        cause: None,
        detail: None,
        devices_skipped: None,
        owners_dropped: None,
        setid_stripped: None,
        digest: job.digest.clone(),
        image: None,
        host_id: Some(host.config.worker.host_id.clone()),
        host_queue: None,
    };
    Ok(match executor.execute(job, "one-shot").await {
        JobEnd::Done(result) | JobEnd::DeadLetter(_, Some(result)) => result,
        JobEnd::DeadLetter(reason, None) => failed(reason),
        JobEnd::Retry(why) => failed(format!("{why} (the daemon would retry this job; run the command again)")),
        JobEnd::HandBack => failed("handed back: the worker is draining".into()),
    })
}

/// `worker run`: opens the host, runs `job` with a progress bar on a terminal, prints the
/// result; exit 0 when it succeeded, 1 when it failed.
pub async fn command(config: Config, job: Job, json: bool) -> anyhow::Result<ExitCode> {
    let host = Arc::new(Host::open(config).await?);
    host.engine.resume_all().await?;
    let board = host.pipeline.context().progress.clone();
    let view = ProgressView::on_terminal(&job.family, &format!("{} {}", job.kind, job.family));
    let result = progress::while_running(view, async || board.current(), run(&host, &job)).await;
    host.close().await;
    let result = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!("{result}");
    }
    Ok(if result.status == JobStatus::Succeeded { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A new invocation id for `worker run activate` without one.
pub fn new_invocation_id() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("inv-{now}-{}", std::process::id())
}
