//! The workflows, written on the engine (ARCHITECTURE.md, `pipeline/`): `prepare` (one version
//! of a family → sealed base), `activate` (base → one exposed snapshot per invocation),
//! `release`, and `retire` (deletes a base garbage collection gave up).
//!
//! Where the guards live: `prepare_thin_base` takes the version's base id from SQLite
//! (`Store::intend_base`, which allocates and records it in one transaction) before it
//! creates the volume; `activate_snapshot` records the run's snapshot
//! (`Store::intend_snapshot`, which refuses a base that is not sealed) before creating it.
//! Every other step is idempotent and reads what it needs from the previous step's
//! response. The family's current-version pointer is not touched here: the worker's job
//! loop owns it; what runs `retire` is `lifecycle/`.
//!
//! An invocation's activation and release are ordered by its snapshot row's state in the
//! host database (`store/snapshots.rs`): a release is recorded before its run starts, and
//! from then on no activation step creates or exposes anything for that invocation. The
//! steps of both hold the invocation's lock (`invocations.rs`) around their check and their
//! volume call, so the two never run at the same time on one host.

mod activate;
mod cause;
mod invocations;
mod prepare;
mod release;
mod reservations;
mod retire;

use std::sync::Arc;

use crate::fault;
use crate::fsm::{
    ArchiveError, Engine, Failure, FailureKind, Outcome, RegisterError, RunError, RunFilter, RunStatus, StartOutcome,
    StepError, StopSignal, WorkflowHandle,
};
use crate::image::Manifest;
use crate::image::{ApplyOptions, BlobCache, BlobSource, ImageError};
use crate::job::{activate_run_id, prepare_run_id, release_run_id, retire_run_id};
use crate::store::{BaseRow, ReleaseRequest, SnapshotRow, SnapshotState, Store, StoreError};
use crate::volume::{VolumeBackend, VolumeError, VolumeId};

pub use activate::{ActivateInput, ActivateState};
pub use cause::Cause;
pub use invocations::InvocationLocks;
pub use prepare::{PrepareInput, PrepareSettings, PrepareState};
pub use release::{ReleaseInput, ReleaseState};
pub use reservations::{ReservationError, Resolved};
pub use retire::{RetireInput, RetireState};

/// What the steps work with.
pub struct PipelineContext {
    pub store: Arc<Store>,
    pub backend: Arc<dyn VolumeBackend>,
    pub cache: BlobCache,
    pub source: Arc<dyn BlobSource>,
    pub apply: ApplyOptions,
    /// How `prepare` moves a version's bytes.
    pub prepare: PrepareSettings,
    /// Serialises the steps of one invocation's jobs.
    pub invocations: InvocationLocks,
    /// This host's name, kept in each snapshot's record.
    pub host_id: Option<String>,
    /// How far the running steps have got (for progress bars and the admin API).
    pub progress: crate::progress::ProgressBoard,
}

/// A pipeline call that could not produce an outcome: the run could not be started or
/// waited for, or the host database failed before it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Run(#[from] RunError),
    /// A finished run could not be moved aside for its id to run again.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A release named another family than its invocation's: refused, nothing released.
    #[error(
        "invocation {invocation} belongs to family {recorded}, not {given}: nothing was released; send the release with the family its activation named"
    )]
    WrongFamily { invocation: String, recorded: String, given: String },
}

/// What a release job did, beside its run's outcome.
#[derive(Clone, Debug)]
pub struct Release {
    pub outcome: Outcome<ReleaseState>,
    /// The snapshot row as the release request found or made it.
    pub request: ReleaseRequest,
}

impl Release {
    /// A sentence for the job's result when the release had nothing to give back.
    pub fn detail(&self) -> Option<String> {
        match &self.request {
            ReleaseRequest::Releasing(_) | ReleaseRequest::OtherFamily(_) => None,
            ReleaseRequest::Tombstone(row) => Some(format!(
                "{} had no snapshot; recorded as released, so a later activate of it is refused",
                invocation_of(row)
            )),
            // Still `releasing`: this job's own earlier delivery, or another release of the
            // same invocation, recorded it; its run finishes it. Nothing to add.
            ReleaseRequest::Already(row) if row.state != SnapshotState::Released => None,
            ReleaseRequest::Already(row) => Some(format!(
                "{} was already released at {}",
                invocation_of(row),
                row.release_requested_at_ms.map_or_else(|| "an unknown time".into(), crate::store::rfc3339)
            )),
        }
    }
}

fn invocation_of(row: &SnapshotRow) -> String {
    format!("invocation {}", row.run_id.strip_prefix("activate-").unwrap_or(&row.run_id))
}

/// The four workflows (prepare, activate, release, retire), registered on one engine.
#[derive(Clone)]
pub struct Pipeline {
    ctx: Arc<PipelineContext>,
    prepare: WorkflowHandle<PrepareInput, PrepareState>,
    activate: WorkflowHandle<ActivateInput, ActivateState>,
    release: WorkflowHandle<ReleaseInput, ReleaseState>,
    retire: WorkflowHandle<RetireInput, RetireState>,
}

impl Pipeline {
    /// Registers `prepare`, `activate` and `release` on `engine`. Call before `resume_all`.
    pub fn register(engine: &Engine, ctx: PipelineContext) -> Result<Pipeline, RegisterError> {
        let ctx = Arc::new(ctx);
        Ok(Pipeline {
            prepare: {
                // Runs version 1 started before an upgrade finish with its steps.
                engine.register_older(prepare::workflow_v1(ctx.clone()))?;
                engine.register(prepare::workflow(ctx.clone()))?
            },
            activate: engine.register(activate::workflow(ctx.clone()))?,
            release: engine.register(release::workflow(ctx.clone()))?,
            retire: engine.register(retire::workflow(ctx.clone()))?,
            ctx,
        })
    }

    pub fn context(&self) -> &PipelineContext {
        &self.ctx
    }

    /// Runs (or joins) run `prepare-<family>@<digest>` for the version `manifest` describes.
    /// A completed run's stored outcome is returned as is (unless its base was collected
    /// since); a failed one is archived (its history kept under `<run id>~<time>`) and the
    /// version prepared afresh, so a new job retries what an old one could not do.
    pub async fn prepare(&self, manifest: &Manifest) -> Result<Outcome<PrepareState>, PipelineError> {
        let id = prepare_run_id(&manifest.family, manifest.digest.as_str());
        let input = PrepareInput { family: manifest.family.clone(), manifest: Some(manifest.clone()) };
        let outcome = self.run_prepare(&id, &input).await?;
        // A version prepared before, whose base garbage collection has since deleted: the
        // old run stays in the log under another id, and the version is prepared afresh.
        if let Outcome::Completed(w) = &outcome
            && let Some(base) = w.base_vol_id
            && self.ctx.store.call(move |s| s.base(base)).await?.is_none()
        {
            let archived = self.archive(&id).await?;
            tracing::info!(run_id = %id, %archived, "preparing again a version whose base was collected");
            return self.run_prepare(&id, &input).await;
        }
        Ok(outcome)
    }

    /// Runs (or joins) prepare run `id`; a run that ran (or was joined) here is recorded in
    /// `thinpipe.prepare.duration` by outcome, a version found prepared is not.
    async fn run_prepare(&self, id: &str, input: &PrepareInput) -> Result<Outcome<PrepareState>, PipelineError> {
        let started = std::time::Instant::now();
        let (outcome, ran) = self.run_retrying_failed(&self.prepare, id, input, &PrepareState::default()).await?;
        if ran {
            let label = if matches!(outcome, Outcome::Completed(_)) { "succeeded" } else { "failed" };
            let attrs = [crate::telemetry::kv("outcome", label)];
            crate::telemetry::metrics().prepare_duration.record(started.elapsed().as_secs_f64(), &attrs);
        }
        Ok(outcome)
    }

    /// Runs (or joins) run `retire-base-<id>`: deletes a base that `Store::retire_base`
    /// marked `retiring`, then its record. A failed run is archived and run again.
    pub async fn retire(&self, base: &BaseRow) -> Result<Outcome<RetireState>, PipelineError> {
        let id = retire_run_id(base.id);
        let input = RetireInput { base_vol_id: base.id, family: base.family.clone(), digest: base.digest.clone() };
        Ok(self.run_retrying_failed(&self.retire, &id, &input, &RetireState::default()).await?.0)
    }

    /// Starts (or joins) run `id`, archiving a failed one first; its outcome, and whether it
    /// ran (or was joined) now rather than found completed.
    async fn run_retrying_failed<R, W>(
        &self,
        handle: &WorkflowHandle<R, W>,
        id: &str,
        input: &R,
        initial: &W,
    ) -> Result<(Outcome<W>, bool), PipelineError>
    where
        R: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
        W: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    {
        match handle.start(id, input, initial).await.map_err(RunError::from)? {
            StartOutcome::Finished(Outcome::Completed(w)) => return Ok((Outcome::Completed(w), false)),
            StartOutcome::Finished(Outcome::Failed(f)) => {
                let archived = self.archive(id).await?;
                tracing::info!(run_id = %id, %archived, failure = %f, "retrying a failed run; the failed one is kept as {archived}");
                handle.start(id, input, initial).await.map_err(RunError::from)?;
            }
            StartOutcome::Started | StartOutcome::AlreadyRunning => {}
        }
        Ok((handle.wait(id).await.map_err(RunError::from)?, true))
    }

    /// Moves finished run `id` aside (kept under `<id>~<time>`) so the id can run again.
    async fn archive(&self, id: &str) -> Result<String, ArchiveError> {
        self.prepare.engine().archive_finished(id).await
    }

    /// Whether any prepare run has not finished (a run log that cannot be read says yes).
    pub fn prepares_in_flight(&self) -> bool {
        let filter = RunFilter { workflow: Some("prepare".into()), status: Some(RunStatus::Active), limit: Some(1) };
        self.prepare.engine().list_runs(&filter).map_or(true, |runs| !runs.is_empty())
    }

    /// Whether run `id` has not finished: running now (its first step included, before the
    /// run is in the run log), or recorded unfinished (e.g. a prepare resumed at start).
    pub fn run_in_flight(&self, id: &str) -> bool {
        // A run log that cannot be read says "in flight": garbage collection then keeps the base.
        self.prepare.engine().is_unfinished(id).unwrap_or(true)
    }

    /// Runs (or resumes) run `activate-<invocation_id>` from base `base_vol_id`. An
    /// invocation that a release has reached fails with "was released", whether the release
    /// came before the run, during it, or after it completed.
    pub async fn activate(
        &self,
        family: &str,
        invocation_id: &str,
        base_vol_id: u64,
        ttl_secs: Option<u64>,
    ) -> Result<Outcome<ActivateState>, PipelineError> {
        let run_id = activate_run_id(invocation_id);
        // No check before the run: its step refuses a released invocation itself, and the job
        // executors ask `released_activation` first (before preparing anything). A run this
        // call started answers as its step found the row; an outcome found stored (or a run
        // joined) is checked against the row now, since a release may have come in since.
        let input = ActivateInput { family: family.to_owned(), invocation_id: invocation_id.to_owned(), ttl_secs };
        let initial = ActivateState { base_vol_id, snapshot_id: None, path: None, digest: None };
        let (outcome, fresh) = match self.activate.start(&run_id, &input, &initial).await.map_err(RunError::from)? {
            StartOutcome::Started => (self.activate.wait(&run_id).await.map_err(RunError::from)?, true),
            StartOutcome::AlreadyRunning => (self.activate.wait(&run_id).await.map_err(RunError::from)?, false),
            StartOutcome::Finished(outcome) => (outcome, false),
        };
        if !fresh
            && let Outcome::Completed(_) = outcome
            && let Some(released) = self.released(&run_id).await?
        {
            return Ok(released);
        }
        Ok(outcome)
    }

    /// The failed outcome an activation of `invocation_id` gets once a release has reached
    /// it (`None` while it may still be activated).
    pub async fn released_activation(&self, invocation_id: &str) -> Result<Option<Outcome<ActivateState>>, StoreError> {
        self.released(&activate_run_id(invocation_id)).await
    }

    async fn released(&self, run_id: &str) -> Result<Option<Outcome<ActivateState>>, StoreError> {
        let id = run_id.to_owned();
        let row = self.ctx.store.call(move |s| s.snapshot_by_run(&id)).await?;
        Ok(row.filter(|r| r.state.is_released()).map(|r| {
            Outcome::Failed(Failure {
                step: "activate_snapshot".into(),
                error: r.released_message(),
                kind: FailureKind::Aborted,
                code: Some(Cause::Released.as_str().to_owned()),
            })
        }))
    }

    /// Releases invocation `invocation_id` of `family`: records the release (a tombstone if
    /// nothing was activated), then runs `release-<invocation_id>`, which deletes the
    /// snapshot once no activation step of the invocation is in flight.
    pub async fn release(&self, family: &str, invocation_id: &str) -> Result<Release, PipelineError> {
        let run_id = release_run_id(invocation_id);
        let (activation, f) = (activate_run_id(invocation_id), family.to_owned());
        let request = self
            .ctx
            .store
            .call(move |s| s.request_release(&activation, &f, |id| VolumeId::Snap(id).to_string()))
            .await?;
        if let ReleaseRequest::OtherFamily(row) = &request {
            return Err(PipelineError::WrongFamily {
                invocation: invocation_id.to_owned(),
                recorded: row.family.clone(),
                given: family.to_owned(),
            });
        }
        fault::point("release.after_request", &run_id);
        let input = ReleaseInput { invocation_id: invocation_id.to_owned() };
        let outcome = self.release.run(&run_id, &input, &ReleaseState::default()).await?;
        Ok(Release { outcome, request })
    }

    /// Finishes every release recorded but not completed (rows left `releasing`, e.g. by a
    /// release whose run was lost with an older version). Call at start, after `resume_all`.
    pub async fn finish_pending_releases(&self) -> Result<usize, PipelineError> {
        let pending = self.ctx.store.call(|s| s.releasing_snapshots()).await?;
        let mut finished = 0;
        for row in pending {
            let invocation = row.run_id.strip_prefix("activate-").unwrap_or(&row.run_id).to_owned();
            let _serial = self.ctx.invocations.lock(&invocation).await;
            let ctx = self.ctx.clone();
            let detail = release_run_id(&invocation);
            // At start, outside any run: awaited right here.
            match blocking(&StopSignal::default(), move || release::finish_release(&ctx, &invocation, &detail)).await {
                Ok(_) => finished += 1,
                Err(e) => {
                    tracing::warn!(run_id = %row.run_id, error = %e, "could not finish a recorded release; the next start tries again")
                }
            }
        }
        Ok(finished)
    }
}

/// Runs a step's blocking work (SQLite, file trees, volumes) off the async threads, as work
/// of the step's attempt (`stop`): the engine waits for it before the run moves on or stops,
/// and long work checks `stop` between its units (`fsm/stop.rs`).
async fn blocking<T: Send + 'static>(
    stop: &StopSignal,
    f: impl FnOnce() -> Result<T, StepError> + Send + 'static,
) -> Result<T, StepError> {
    // The blocking work carries the step's span, so volume operations nest under it.
    let span = tracing::Span::current();
    // Not `block_in_place`: long work (unpacking a layer) must be left when the step is
    // stopped at shutdown or when a lease is lost; short work uses `blocking_short`.
    stop.spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| StepError::transient(format!("blocking task failed: {e}")))?
}

/// [`blocking`] for short work that cannot stop half-way anyway (a few system calls and one
/// small transaction: an activation): run on the step's own thread (`StopSignal::run_short`).
async fn blocking_short<T: Send + 'static>(
    stop: &StopSignal,
    f: impl FnOnce() -> Result<T, StepError> + Send + 'static,
) -> Result<T, StepError> {
    let span = tracing::Span::current();
    stop.run_short(move || span.in_scope(f))
        .await
        .map_err(|e| StepError::transient(format!("blocking task failed: {e}")))?
}

fn image_err(e: ImageError) -> StepError {
    if e.is_retryable() { StepError::transient(e) } else { StepError::abort_with(Cause::of_image(&e).as_str(), e) }
}

fn store_err(e: StoreError) -> StepError {
    abort_or_retry(e.is_retryable(), Cause::of_store(&e), e)
}

fn volume_err(e: VolumeError) -> StepError {
    abort_or_retry(e.is_retryable(), Cause::of_volume(&e), e)
}

fn abort_or_retry(retryable: bool, cause: Option<Cause>, e: impl std::fmt::Display) -> StepError {
    match (retryable, cause) {
        (true, _) => StepError::transient(e),
        (false, Some(cause)) => StepError::abort_with(cause.as_str(), e),
        (false, None) => StepError::abort(e),
    }
}

#[cfg(test)]
mod tests;
