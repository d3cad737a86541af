//! `worker run prepare|activate|release`: one job, no queue, the result printed.

use std::sync::Arc;

use anyhow::Context;
use thinpipe::fsm::Outcome;
use thinpipe::job::{JobResult, JobStatus};

use crate::host::Host;

/// Prepares `family` (if needed) and returns the result.
pub async fn prepare(host: &Arc<Host>, family: &str) -> anyhow::Result<JobResult> {
    let mut result = base_result(thinpipe::job::JobKind::Prepare, family, None, thinpipe::job::prepare_run_id(family));
    match host.pipeline.prepare(family).await.context("running prepare")? {
        Outcome::Completed(w) => {
            let base = w.base_vol_id.context("prepare completed without a base")?;
            let (store, f) = (host.store.clone(), family.to_owned());
            tokio::task::spawn_blocking(move || store.set_prepared(&f, true)).await??;
            result.base_vol_id = Some(base);
        }
        Outcome::Failed(f) => fail(&mut result, f.to_string()),
    }
    Ok(result)
}

/// Activates a snapshot of `family` (preparing it first if needed).
pub async fn activate(host: &Arc<Host>, family: &str, invocation_id: &str) -> anyhow::Result<JobResult> {
    let mut result = base_result(
        thinpipe::job::JobKind::Activate,
        family,
        Some(invocation_id),
        thinpipe::job::activate_run_id(invocation_id),
    );
    // A released invocation is refused before anything is prepared for it.
    if let Some(Outcome::Failed(f)) = host.pipeline.released_activation(invocation_id).await? {
        fail(&mut result, f.to_string());
        return Ok(result);
    }
    let prep = prepare(host, family).await?;
    let Some(base) = prep.base_vol_id else {
        fail(&mut result, prep.error.unwrap_or_default());
        return Ok(result);
    };
    result.base_vol_id = Some(base);
    match host.pipeline.activate(family, invocation_id, base).await.context("running activate")? {
        Outcome::Completed(w) => result.snapshot_path = w.path,
        Outcome::Failed(f) => fail(&mut result, f.to_string()),
    }
    Ok(result)
}

pub async fn release(host: &Arc<Host>, family: &str, invocation_id: &str) -> anyhow::Result<JobResult> {
    let mut result = base_result(
        thinpipe::job::JobKind::Release,
        family,
        Some(invocation_id),
        thinpipe::job::release_run_id(invocation_id),
    );
    let release = host.pipeline.release(family, invocation_id).await.context("running release")?;
    result.detail = release.detail();
    if let Outcome::Failed(f) = release.outcome {
        fail(&mut result, f.to_string());
    }
    Ok(result)
}

fn base_result(kind: thinpipe::job::JobKind, family: &str, invocation: Option<&str>, run_id: String) -> JobResult {
    JobResult {
        job_id: "one-shot".into(),
        kind,
        family: family.to_owned(),
        invocation_id: invocation.map(str::to_owned),
        status: JobStatus::Succeeded,
        run_id,
        snapshot_path: None,
        base_vol_id: None,
        error: None,
        detail: None,
    }
}

fn fail(result: &mut JobResult, error: String) {
    result.status = JobStatus::Failed;
    result.error = Some(error);
}
