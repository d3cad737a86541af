//! The job executor, shared by the daemon's job loop and the one-shot commands: one job in,
//! how it ended out. It owns the family's current-version pointer (`Lifecycle::make_current`
//! is called only here).
//!
//! - `prepare`: resolves the version (the source's current one, or the pinned `digest`),
//!   prepares it unless this host has it sealed, and makes it the family's current version.
//! - `activate`: refuses an invocation a release has reached; uses the host's current version
//!   (no source lookup) or the pinned one, preparing it first if needed; then runs
//!   `activate-<invocation_id>`.
//! - `release`: records the release and runs `release-<invocation_id>`.
//!
//! Prepares and activations are refused while the host is full (`Lifecycle::admit`): a failed
//! result that says so, neither retried here nor dead-lettered. A version being prepared is
//! prepared once per host: one task per family in this process (a lock), one process per
//! family (the `prepare/<family>` lease).

use std::sync::Arc;
use std::time::Duration;

use thinpipe::fsm::{Failure, FailureKind, Outcome, RunError};
use thinpipe::image::Manifest;
use thinpipe::job::{Job, JobKind, JobResult, JobStatus, prepare_run_id};
use thinpipe::lifecycle::{Hold, ResolveError, Target, Want};
use thinpipe::pipeline::{Cause, PipelineError, PrepareState};
use thinpipe::store::{BaseRow, ReleaseRequest};
use thinpipe::telemetry;
use tokio_util::sync::CancellationToken;

use super::prepare_gate::PrepareGate;
use crate::host::Host;

/// How one job ended.
pub enum JobEnd {
    /// Publish the result (if asked) and ack.
    Done(JobResult),
    /// Dead-letter with the reason (publishing a failure result first, if asked).
    DeadLetter(String, Option<JobResult>),
    /// Leave the message for a later try.
    Retry(String),
    /// Draining began before the job started its run: make the message visible again now,
    /// for another worker (or this one's next start).
    HandBack,
}

pub struct Executor {
    host: Arc<Host>,
    /// One prepare per family at a time, in this process and on this host.
    gate: PrepareGate,
    /// Fired when draining begins: jobs still waiting for a prepare are handed back.
    draining: CancellationToken,
}

impl Executor {
    pub fn new(host: Arc<Host>, draining: CancellationToken) -> Executor {
        let ttl = Duration::from_secs(host.config.worker.lease_ttl_secs);
        let gate = PrepareGate::new(host.store.clone(), ttl);
        Executor { host, gate, draining }
    }

    /// Runs `job` (delivered as message `job_id`) to its end.
    pub async fn execute(&self, job: &Job, job_id: &str) -> JobEnd {
        let result = JobResult {
            job_id: job_id.to_owned(),
            kind: job.kind,
            family: job.family.clone(),
            invocation_id: job.invocation_id.clone(),
            status: JobStatus::Succeeded,
            run_id: job.run_id(),
            snapshot_path: None,
            base_vol_id: None,
            error: None,
            cause: None,
            detail: None,
            devices_skipped: None,
            owners_dropped: None,
            setid_stripped: None,
            digest: job.digest.clone(),
            image: None,
            host_id: Some(self.host.config.worker.host_id.clone()),
            host_queue: Some(self.host.config.worker.host_queue_url.clone()).filter(|q| !q.is_empty()),
        };
        match job.kind {
            JobKind::Prepare | JobKind::Activate => self.prepare_or_activate(job, result).await,
            JobKind::Release => {
                let mut result = result;
                let invocation = job.invocation_id.clone().unwrap_or_default();
                let end = match self.host.pipeline.release(&job.family, &invocation).await {
                    // In a fleet (a shared queue beside the host's own), an invocation this host
                    // never saw was activated elsewhere: the release went to the wrong host.
                    // The tombstone stays (an activation of it arriving here later is refused).
                    Ok(release)
                        if matches!(release.request, ReleaseRequest::Tombstone(_))
                            && !self.host.config.queue.extra_urls.is_empty() =>
                    {
                        let host = &self.host.config.worker.host_id;
                        failed(
                            result,
                            Some(Cause::WrongHost),
                            &format!(
                                "invocation {invocation} is not on host {host}; send the release to the host queue in the activation's result"
                            ),
                        )
                    }
                    Ok(release) => {
                        result.detail = release.detail();
                        match &release.outcome {
                            Outcome::Completed(_) => JobEnd::Done(result),
                            Outcome::Failed(f) => failed_run(result, f),
                        }
                    }
                    Err(e) => not_run(e, result),
                };
                // The released snapshot's base may be garbage now.
                self.host.lifecycle.wake();
                end
            }
        }
    }

    async fn prepare_or_activate(&self, job: &Job, mut result: JobResult) -> JobEnd {
        let pipeline = &self.host.pipeline;
        let invocation = job.invocation_id.clone().unwrap_or_default();
        // A released invocation is refused before anything is prepared for it.
        if job.kind == JobKind::Activate {
            match pipeline.released_activation(&invocation).await {
                Ok(Some(Outcome::Failed(f))) => return failed_run(result, &f),
                Ok(_) => {}
                Err(e) => return JobEnd::Retry(e.to_string()),
            }
        }
        // The state directory short of room refuses like a full volume store.
        let admitted = match crate::job::statespace::StateSpace::new(self.host.config.state_dir.clone()).shortage() {
            Some(short) => Err(short),
            None => self.host.lifecycle.admit().await,
        };
        if let Err(full) = admitted {
            telemetry::metrics().capacity_refusals.add(1, &[telemetry::kv("kind", job.kind.to_string())]);
            tracing::warn!(reason = %full, "refused: the host is full");
            return failed(result, Some(Cause::HostFull), &full);
        }
        let want = match (job.kind, job.pinned()) {
            (_, Some(digest)) => Want::Pinned(digest),
            (JobKind::Prepare, None) => Want::Latest,
            _ => Want::Current,
        };
        let (hold, base, applied) = match self.ensure_version(&job.family, &want, job.kind == JobKind::Prepare).await {
            Ok(v) => v,
            Err(Prep::Unknown(cause, why)) => {
                result.status = JobStatus::Failed;
                result.error = Some(why.clone());
                result.cause = Some(cause.as_str().to_owned());
                return JobEnd::DeadLetter(why, Some(result));
            }
            Err(Prep::Source(cause, why)) => return failed(result, Some(cause), &why),
            // A run started before versions resolves its family itself: the same rule.
            Err(Prep::Failed { run_id, failure }) if Cause::of_failure(&failure).is_some_and(Cause::job_is_wrong) => {
                result.run_id = run_id;
                let why = failure.to_string();
                return match failed_run(result, &failure) {
                    JobEnd::Done(result) => JobEnd::DeadLetter(why, Some(result)),
                    other => other,
                };
            }
            Err(Prep::Failed { run_id, failure }) => {
                // `worker images` shows why, until a prepare succeeds or the family ages out.
                let (family, error) = (job.family.clone(), failure.to_string());
                if let Err(e) = self.host.store.call(move |s| s.record_family_failure(&family, &error)).await {
                    tracing::warn!(error = ?e, "could not record why the prepare failed; the job's result says it");
                }
                result.run_id = run_id;
                return failed_run(result, &failure);
            }
            Err(Prep::Retry(why)) => return JobEnd::Retry(why),
            Err(Prep::HandBack) => return JobEnd::HandBack,
        };
        result.base_vol_id = Some(base.id);
        result.digest = Some(base.digest.clone());
        result.image = self.host.pipeline.context().source.reference_of(&base.family, &base.digest);
        let mut notes = Vec::new();
        if applied.devices_skipped > 0 {
            result.devices_skipped = Some(applied.devices_skipped);
            notes.push(format!(
                "{} device nodes in the image's layers were not created (images.devices = \"skip\")",
                applied.devices_skipped
            ));
        }
        if applied.owners_dropped > 0 {
            result.owners_dropped = Some(applied.owners_dropped);
            result.setid_stripped = Some(applied.setid_stripped);
            notes.push(format!(
                "{} entries owned by other users were applied owned by this worker's user, {} of them without their setuid/setgid bits (images.rootless)",
                applied.owners_dropped, applied.setid_stripped
            ));
        }
        if !notes.is_empty() {
            result.detail = Some(notes.join("; "));
        }
        if job.kind == JobKind::Prepare {
            result.run_id = prepare_run_id(&base.family, &base.digest);
            return JobEnd::Done(result);
        }
        let outcome = pipeline.activate(&job.family, &invocation, base.id, job.ttl_secs).await;
        // The snapshot's row (live) keeps the base from now on.
        drop(hold);
        match outcome {
            Ok(Outcome::Completed(w)) => {
                result.snapshot_path = w.path;
                if w.digest.is_some() {
                    result.digest = w.digest;
                }
                JobEnd::Done(result)
            }
            Ok(Outcome::Failed(f)) => failed_run(result, &f),
            Err(e) => not_run(e, result),
        }
    }

    /// The sealed base of the version `want` names, preparing it first if needed, held
    /// against garbage collection. A prepare job (`make_current`) makes it the family's
    /// current version; an activation only if the family has none.
    /// Also says what a prepare it ran changed from what the layers said (the run's last
    /// response; the default when nothing was prepared).
    async fn ensure_version(
        &self,
        family: &str,
        want: &Want,
        make_current: bool,
    ) -> Result<(Hold, BaseRow, PrepareState), Prep> {
        let lifecycle = &self.host.lifecycle;
        let version = lifecycle.resolve(family, want).await.map_err(|e| match e {
            e if e.is_retryable() => Prep::Retry(e.to_string()),
            ResolveError::Source(e) => match Cause::of_image(&e) {
                cause if cause.job_is_wrong() => Prep::Unknown(cause, e.to_string()),
                cause => Prep::Source(cause, e.to_string()),
            },
            ResolveError::Store(e) => Prep::Retry(e.to_string()),
        })?;
        let (base, applied) = match version.target {
            Target::Sealed(row) => (row, PrepareState::default()),
            Target::Prepare(manifest) => self.prepare(&manifest, !matches!(want, Want::Pinned(_))).await?,
        };
        lifecycle.make_current(&base, make_current).await.map_err(|e| Prep::Retry(e.to_string()))?;
        Ok((version.hold, base, applied))
    }

    /// Prepares the version `manifest` describes: one task per family in this process, one
    /// process per family on this host. `current` says the version was the source's current
    /// one: if it no longer is when its prepare fails, the job is retried with the new one.
    async fn prepare(&self, manifest: &Manifest, current: bool) -> Result<(BaseRow, PrepareState), Prep> {
        let family = manifest.family.as_str();
        // A job waiting here has not started: once draining begins it is handed back.
        let Some(turn) = self.gate.turn(family, &self.draining).await else { return Err(Prep::HandBack) };
        if let Some(base) = self.sealed(manifest).await? {
            return Ok((base, PrepareState::default())); // another task of ours prepared it while we waited
        }
        let held = self.gate.lease(turn).await.map_err(|e| Prep::Retry(e.to_string()))?;
        let lost = held.lost().clone();
        // Blob collection waits while a prepare downloads and applies blobs.
        let blobs = self.host.lifecycle.in_use().prepare().await;
        let outcome = tokio::select! {
            o = self.host.pipeline.prepare(manifest) => Some(o),
            _ = lost.cancelled() => None,
        };
        let run_id = prepare_run_id(family, manifest.digest.as_str());
        if outcome.is_none() {
            // Not only the wait: the run itself stops (its step's blocking work included)
            // before the blobs are given back to collection. It stays active and resumes
            // when this family's prepare is next taken.
            let why = format!("lost the prepare lease of {family}");
            if self.host.engine.stop_run(&run_id, &why).await {
                tracing::warn!(family, run_id, "{why}: its run is stopped and resumes when the prepare is taken again");
            }
        }
        drop(blobs);
        let result = match outcome {
            None => {
                Err(Prep::Retry(format!("lost the prepare lease of {family}; another process may be preparing it")))
            }
            Some(Err(e)) => Err(Prep::Retry(e.to_string())),
            Some(Ok(Outcome::Failed(failure))) if failure.kind == FailureKind::Corrupt => {
                tracing::error!(%failure, "the prepare run failed because its record is corrupt; the job is retried with a new run");
                Err(Prep::Retry(failure.to_string()))
            }
            Some(Ok(Outcome::Failed(failure))) => {
                // A version the source no longer has as current (its files rewritten during the
                // prepare) is not worth a failed result: the job is retried with the new one.
                // A lookup that fails here changes nothing: the failure is reported as it is.
                let now = if current { self.host.pipeline.context().source.manifest(family).await.ok() } else { None };
                match now {
                    Some(now) if now.digest != manifest.digest => Err(Prep::Retry(format!(
                        "family {family} changed at its source while version {} was being prepared ({failure}); retrying with {}",
                        manifest.digest, now.digest
                    ))),
                    _ => Err(Prep::Failed { run_id, failure }),
                }
            }
            Some(Ok(Outcome::Completed(w))) => match self.sealed(manifest).await? {
                Some(base) => Ok((base, w)),
                None => Err(Prep::Failed {
                    run_id,
                    failure: Failure {
                        step: "prepare".into(),
                        error: format!("prepare completed but {family}@{} has no sealed base", manifest.digest),
                        kind: FailureKind::Corrupt,
                        code: None,
                    },
                }),
            },
        };
        held.leave().await;
        result
    }

    /// The sealed base of `manifest`'s version, if this host has one.
    async fn sealed(&self, manifest: &Manifest) -> Result<Option<BaseRow>, Prep> {
        let (f, d) = (manifest.family.clone(), manifest.digest.to_string());
        let row =
            self.host.store.call(move |s| s.base_of_version(&f, &d)).await.map_err(|e| Prep::Retry(e.to_string()))?;
        Ok(row.filter(|r| r.state == thinpipe::store::BaseState::Sealed))
    }
}

/// Why `ensure_version` gave no base.
enum Prep {
    /// The version does not resolve (no such family or version, no layers, a malformed
    /// manifest): the job is a mistake and is dead-lettered.
    Unknown(Cause, String),
    /// The source cannot give the version (access denied, bad data): a failed result.
    Source(Cause, String),
    Failed {
        run_id: String,
        failure: Failure,
    },
    Retry(String),
    /// Draining began while the job waited for the family's prepare.
    HandBack,
}

impl std::fmt::Debug for Prep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prep::Unknown(_, x) | Prep::Source(_, x) | Prep::Retry(x) => f.write_str(x),
            Prep::Failed { failure, .. } => write!(f, "{failure}"),
            Prep::HandBack => f.write_str("handed back: draining"),
        }
    }
}

fn failed(mut result: JobResult, cause: Option<Cause>, error: &str) -> JobEnd {
    result.status = JobStatus::Failed;
    result.error = Some(error.to_owned());
    result.cause = cause.map(|c| c.as_str().to_owned());
    JobEnd::Done(result)
}

/// A failed run's result: its error, and its cause when the failing step gave one. A run
/// that failed because a record could not be read back or written (`corrupt`) is a fault of
/// this host or build, not of the job: the job is retried and the error is loud.
fn failed_run(result: JobResult, f: &Failure) -> JobEnd {
    if f.kind == FailureKind::Corrupt {
        tracing::error!(failure = %f, "the job's run failed because its record is corrupt; the job is retried with a new run");
        return JobEnd::Retry(f.to_string());
    }
    failed(result, Cause::of_failure(f), &f.to_string())
}

/// A run that could not be started or waited for: a mistake in the job (a run id reused
/// for other work) is dead-lettered with a failure result; anything else is retried.
fn not_run(e: PipelineError, mut result: JobResult) -> JobEnd {
    match &e {
        // The job names an invocation of a family that does not have it.
        PipelineError::WrongFamily { .. } => {
            result.status = JobStatus::Failed;
            result.error = Some(e.to_string());
            result.cause = Some(Cause::NotFound.as_str().to_owned());
            JobEnd::DeadLetter(e.to_string(), Some(result))
        }
        PipelineError::Run(RunError::Start(start)) if start.is_callers_mistake() => {
            result.status = JobStatus::Failed;
            result.error = Some(e.to_string());
            JobEnd::DeadLetter(e.to_string(), Some(result))
        }
        // A fault of this host or build (a corrupt run record, an unregistered workflow): the
        // job is not at fault and stays; the error is loud, and the job is retried later.
        PipelineError::Run(RunError::Start(start)) if !start.is_retryable() => {
            tracing::error!(error = %e, "the job cannot run on this host until its run log or program is repaired; it is retried later");
            JobEnd::Retry(e.to_string())
        }
        PipelineError::Run(_) | PipelineError::Archive(_) | PipelineError::Store(_) => JobEnd::Retry(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> JobResult {
        let job = Job::new(JobKind::Activate, "web", Some("inv"));
        serde_json::from_value(serde_json::json!({
            "job_id": "m-1", "kind": "activate", "family": "web", "status": "succeeded", "run_id": job.run_id()
        }))
        .unwrap()
    }

    fn failure(kind: FailureKind, code: Option<&str>) -> Failure {
        Failure { step: "activate_snapshot".into(), error: "it went wrong".into(), kind, code: code.map(str::to_owned) }
    }

    /// A corrupt record is the host's or the build's fault: the job is retried, never
    /// answered as failed; a step's failure is the job's answer, with its cause.
    #[test]
    fn a_run_failed_corrupt_is_retried_and_a_step_failure_is_the_answer() {
        assert!(
            matches!(failed_run(result(), &failure(FailureKind::Corrupt, None)), JobEnd::Retry(e) if e.contains("it went wrong"))
        );
        match failed_run(result(), &failure(FailureKind::Aborted, Some("not_found"))) {
            JobEnd::Done(r) => {
                assert_eq!((r.status, r.cause.as_deref()), (JobStatus::Failed, Some("not_found")));
                assert!(r.error.is_some_and(|e| e.contains("it went wrong")));
            }
            _ => panic!("a step's failure is the job's result"),
        }
    }
}
