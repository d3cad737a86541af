//! The workflows of DESIGN.md section 4, written on the engine: `prepare` (family → sealed
//! base), `activate` (base → one exposed snapshot per invocation) and `release`.
//!
//! Where the guards live: `prepare_thin_base` takes the family's base id from SQLite
//! (`Store::intend_base`, which allocates and records it in one transaction) before it
//! creates the volume; `activate_snapshot` records the run's snapshot
//! (`Store::intend_snapshot`) before creating it. Every other step is idempotent and reads
//! what it needs from the previous step's response. The `prepared` flag is not touched
//! here: the worker's job loop owns it.

mod activate;
mod prepare;
mod release;

use std::sync::Arc;

use crate::fsm::{Engine, Outcome, RegisterError, RunError, StartOutcome, StepError, WorkflowHandle};
use crate::image::{ApplyOptions, BlobCache, BlobSource, ImageError};
use crate::job::{activate_run_id, prepare_run_id};
use crate::store::{Store, StoreError};
use crate::volume::{VolumeBackend, VolumeError};

pub use activate::{ActivateInput, ActivateState};
pub use prepare::{PrepareInput, PrepareState};
pub use release::{ReleaseInput, ReleaseState};

/// What the steps work with.
pub struct PipelineContext {
    pub store: Arc<Store>,
    pub backend: Arc<dyn VolumeBackend>,
    pub cache: BlobCache,
    pub source: Arc<dyn BlobSource>,
    pub apply: ApplyOptions,
}

/// The three workflows, registered on one engine.
#[derive(Clone)]
pub struct Pipeline {
    ctx: Arc<PipelineContext>,
    prepare: WorkflowHandle<PrepareInput, PrepareState>,
    activate: WorkflowHandle<ActivateInput, ActivateState>,
    release: WorkflowHandle<ReleaseInput, ReleaseState>,
}

impl Pipeline {
    /// Registers `prepare`, `activate` and `release` on `engine`. Call before `resume_all`.
    pub fn register(engine: &Engine, ctx: PipelineContext) -> Result<Pipeline, RegisterError> {
        let ctx = Arc::new(ctx);
        Ok(Pipeline {
            prepare: engine.register(prepare::workflow(ctx.clone()))?,
            activate: engine.register(activate::workflow(ctx.clone()))?,
            release: engine.register(release::workflow(ctx.clone()))?,
            ctx,
        })
    }

    pub fn context(&self) -> &PipelineContext {
        &self.ctx
    }

    /// Runs (or joins) run `prepare-<family>`. A completed run's stored outcome is returned
    /// as is; a failed one is archived (its history kept under `prepare-<family>~<time>`)
    /// and the family prepared afresh, so a new job retries what an old one could not do.
    pub async fn prepare(&self, family: &str) -> Result<Outcome<PrepareState>, RunError> {
        let id = prepare_run_id(family);
        let input = PrepareInput { family: family.to_owned() };
        match self.prepare.start(&id, &input, &PrepareState::default()).await? {
            StartOutcome::Finished(Outcome::Completed(w)) => return Ok(Outcome::Completed(w)),
            StartOutcome::Finished(Outcome::Failed(f)) => {
                let archived = self.prepare.engine().archive_failed(&id).await.map_err(|e| {
                    RunError::Start(crate::fsm::StartError::Storage(format!("archiving failed run {id}: {e}")))
                })?;
                tracing::info!(run_id = %id, %archived, failure = %f, "retrying a failed prepare; the failed run is kept as {archived}");
                self.prepare.start(&id, &input, &PrepareState::default()).await?;
            }
            StartOutcome::Started | StartOutcome::AlreadyRunning => {}
        }
        Ok(self.prepare.wait(&id).await?)
    }

    /// Runs (or resumes) run `activate-<invocation_id>` from base `base_vol_id`.
    pub async fn activate(
        &self,
        family: &str,
        invocation_id: &str,
        base_vol_id: u64,
    ) -> Result<Outcome<ActivateState>, RunError> {
        let input = ActivateInput { family: family.to_owned(), invocation_id: invocation_id.to_owned() };
        let initial = ActivateState { base_vol_id, snapshot_id: None, path: None };
        self.activate.run(&activate_run_id(invocation_id), &input, &initial).await
    }

    /// Runs run `release-<invocation_id>`: deletes that activation's snapshot.
    pub async fn release(&self, invocation_id: &str) -> Result<Outcome<ReleaseState>, RunError> {
        let input = ReleaseInput { invocation_id: invocation_id.to_owned() };
        self.release.run(&format!("release-{invocation_id}"), &input, &ReleaseState::default()).await
    }
}

/// Runs blocking work (SQLite, file trees, volumes) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StepError> + Send + 'static,
) -> Result<T, StepError> {
    // The blocking work carries the step's span, so volume operations nest under it.
    let span = tracing::Span::current();
    // Not `block_in_place`: it would save two thread hand-offs per step (measured: 0.1 ms an
    // activation), but the step could then no longer be abandoned at shutdown or when the
    // worker lease is lost; it would run to its commit.
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| StepError::transient(format!("blocking task failed: {e}")))?
}

fn image_err(e: ImageError) -> StepError {
    if e.is_retryable() { StepError::transient(e) } else { StepError::abort(e) }
}

fn store_err(e: StoreError) -> StepError {
    if e.is_retryable() { StepError::transient(e) } else { StepError::abort(e) }
}

fn volume_err(e: VolumeError) -> StepError {
    if e.is_retryable() { StepError::transient(e) } else { StepError::abort(e) }
}

#[cfg(test)]
mod tests;
