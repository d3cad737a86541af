//! `release` (run id `release-<invocation_id>`): deletes that activation's snapshot.
//! Idempotent: a released snapshot is released again without error.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PipelineContext, blocking, store_err, volume_err};
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
    /// The snapshot that was released.
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
    let snap = blocking(move || {
        let row = ctx
            .store
            .snapshot_by_run(&activate_run_id(&invocation))
            .map_err(store_err)?
            .ok_or_else(|| StepError::abort(format!("invocation {invocation} has no snapshot to release")))?;
        if row.state != SnapshotState::Released {
            ctx.backend.delete(VolumeId::Snap(row.id)).map_err(volume_err)?;
            ctx.store.set_snapshot_released(row.id).map_err(store_err)?;
        }
        Ok(row.id)
    })
    .await?;
    Ok(ReleaseState { snapshot_id: Some(snap) })
}
