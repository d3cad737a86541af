//! `worker run prepare|activate|release`: one job, no queue, the result printed. The job runs
//! through the same executor as the daemon's (`executor.rs`).

use std::sync::Arc;

use thinpipe::job::{Job, JobResult, JobStatus};
use tokio_util::sync::CancellationToken;

use crate::executor::{Executor, JobEnd};
use crate::host::Host;

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
