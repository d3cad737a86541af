//! `activate` (run id `activate-<invocation_id>`): one fresh snapshot of the family's base,
//! exposed for one invocation. A redelivered message resumes this run; it never makes a
//! second snapshot, and never one for an invocation that a release has reached.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PipelineContext, blocking, store_err, volume_err};
use crate::fault;
use crate::fsm::{StepError, StepRequest, StepResult, Workflow};
use crate::store::{Advance, Intent, SnapshotRow};
use crate::volume::VolumeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateInput {
    pub family: String,
    pub invocation_id: String,
}

/// The response chain of `activate`. The initial response carries the base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateState {
    pub base_vol_id: u64,
    /// Set by `activate_snapshot`.
    pub snapshot_id: Option<u64>,
    /// Set by `expose`.
    pub path: Option<String>,
}

type Req = StepRequest<ActivateInput, ActivateState>;

pub(super) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<ActivateInput, ActivateState> {
    let (c1, c2) = (ctx.clone(), ctx);
    Workflow::new("activate", 1)
        .step("activate_snapshot", move |req| activate_snapshot(c1.clone(), req))
        .step("expose", move |req| expose(c2.clone(), req))
}

/// The guarded step: the snapshot (run id → id) is recorded before it is created, so a
/// resume finds and finishes the same snapshot; a release that reached the invocation first
/// stops it before anything is created. Runs under the invocation's lock, so a release of the
/// same invocation cannot delete the snapshot between the check and the create.
async fn activate_snapshot(ctx: Arc<PipelineContext>, req: Req) -> StepResult<ActivateState> {
    let base = req.w.base_vol_id;
    let run_id = req.run_id.to_string();
    let family = req.r.family.clone();
    let _serial = ctx.invocations.lock(&req.r.invocation_id).await;
    let c = ctx.clone();
    let snap = blocking(move || {
        let row = match c
            .store
            .intend_snapshot(&run_id, &family, base, |id| VolumeId::Snap(id).to_string())
            .map_err(store_err)?
        {
            Intent::Recorded(row) => row,
            Intent::Released(row) => return Err(released(&row)),
        };
        fault::point("activate.after_snapshot_intent", &run_id);
        // The row's base, not the response's: a resume finishes what the intent recorded.
        let base = row.base_vol_id.unwrap_or(base);
        c.backend.snapshot(base, row.id).map_err(volume_err)?;
        fault::point("activate.after_snapshot_create", &run_id);
        match c.store.mark_snapshot_created(row.id).map_err(store_err)? {
            Advance::Released(row) => Err(released(&row)),
            Advance::Moved(_) | Advance::Unchanged(_) => Ok(row.id),
        }
    })
    .await?;
    Ok(ActivateState { snapshot_id: Some(snap), ..req.w })
}

/// Exposes the snapshot, unless a release reached the invocation meanwhile (then the release,
/// waiting for this lock, deletes it).
async fn expose(ctx: Arc<PipelineContext>, req: Req) -> StepResult<ActivateState> {
    let snap = req.w.snapshot_id.ok_or_else(|| StepError::abort("the response chain has no snapshot"))?;
    let _serial = ctx.invocations.lock(&req.r.invocation_id).await;
    let c = ctx.clone();
    let path = blocking(move || {
        let row = c
            .store
            .snapshot(snap)
            .map_err(store_err)?
            .ok_or_else(|| StepError::abort(format!("snapshot {snap} is not recorded in the host database")))?;
        if row.state.is_released() {
            return Err(released(&row));
        }
        let path = c.backend.expose(snap).map_err(volume_err)?;
        let path = path.to_string_lossy().into_owned();
        match c.store.mark_snapshot_exposed(snap, &path).map_err(store_err)? {
            Advance::Released(row) => Err(released(&row)),
            Advance::Moved(_) | Advance::Unchanged(_) => Ok(path),
        }
    })
    .await?;
    Ok(ActivateState { path: Some(path), ..req.w })
}

/// The activation stops for good: its invocation was released.
fn released(row: &SnapshotRow) -> StepError {
    StepError::abort(row.released_message())
}
