//! `release` (run id `release-<invocation_id>`): gives an invocation's snapshot back.
//!
//! Before the run starts, [`Pipeline::release`](super::Pipeline::release) records the
//! release in the host database (`Store::request_release`): the row becomes `releasing`, or a
//! tombstone if no activation recorded anything. From that commit on no activation of the
//! invocation creates or exposes anything. The step then takes the invocation's lock (waiting
//! for an activation step in flight), deletes the volume and marks the row `released`.
//! Idempotent: a released row is left as it is.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PipelineContext, blocking, store_err, volume_err};
use crate::fault;
use crate::fsm::{RetryPolicy, StepError, StepRequest, StepResult, Workflow};
use crate::job::activate_run_id;
use crate::store::SnapshotState;
use crate::volume::VolumeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInput {
    pub invocation_id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseState {
    /// The snapshot row that was released (a tombstone's, if there was no activation).
    pub snapshot_id: Option<u64>,
}

pub(super) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<ReleaseInput, ReleaseState> {
    Workflow::new("release", 1)
        .step_with("release_snapshot", RetryPolicy::default(), move |req| release_snapshot(ctx.clone(), req))
}

async fn release_snapshot(
    ctx: Arc<PipelineContext>,
    req: StepRequest<ReleaseInput, ReleaseState>,
) -> StepResult<ReleaseState> {
    let invocation = req.r.invocation_id.clone();
    let _serial = ctx.invocations.lock(&invocation).await;
    let run_id = req.run_id.to_string();
    let snap = blocking(&req.stop, move || finish_release(&ctx, &invocation, &run_id)).await?;
    Ok(ReleaseState { snapshot_id: Some(snap) })
}

/// Deletes the volume of the invocation's `releasing` row and marks it `released`. The caller
/// holds the invocation's lock.
pub(super) fn finish_release(ctx: &PipelineContext, invocation: &str, detail: &str) -> Result<u64, StepError> {
    let row = ctx.store.snapshot_by_run(&activate_run_id(invocation)).map_err(store_err)?.ok_or_else(|| {
        StepError::abort(format!("invocation {invocation} has no release recorded in the host database"))
    })?;
    match row.state {
        SnapshotState::Released => return Ok(row.id),
        SnapshotState::Releasing => {}
        live => {
            // Only `Pipeline::release` starts this run, after recording the release.
            return Err(StepError::abort(format!(
                "invocation {invocation} is {live} but no release is recorded for it"
            )));
        }
    }
    ctx.backend.delete(VolumeId::Snap(row.id)).map_err(volume_err)?;
    fault::point("release.after_delete", detail);
    ctx.store.mark_snapshot_released(row.id).map_err(store_err)?;
    Ok(row.id)
}
