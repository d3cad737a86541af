//! `activate` (run id `activate-<invocation_id>`): one fresh snapshot of the family's base,
//! exposed for one invocation. A redelivered message resumes this run; it never makes a
//! second snapshot.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PipelineContext, blocking, store_err, volume_err};
use crate::fault;
use crate::fsm::{StepError, StepRequest, StepResult, Workflow};
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
/// resume finds and finishes the same snapshot.
async fn activate_snapshot(ctx: Arc<PipelineContext>, req: Req) -> StepResult<ActivateState> {
    let base = req.w.base_vol_id;
    let run_id = req.run_id.to_string();
    let family = req.r.family.clone();
    let snap = blocking(move || {
        let row = ctx
            .store
            .intend_snapshot(&run_id, &family, base, |id| VolumeId::Snap(id).to_string())
            .map_err(store_err)?;
        fault::point("activate.after_snapshot_intent", &run_id);
        ctx.backend.snapshot(row.base_vol_id, row.id).map_err(volume_err)?;
        fault::point("activate.after_snapshot_create", &run_id);
        Ok(row.id)
    })
    .await?;
    Ok(ActivateState { snapshot_id: Some(snap), ..req.w })
}

async fn expose(ctx: Arc<PipelineContext>, req: Req) -> StepResult<ActivateState> {
    let snap = req.w.snapshot_id.ok_or_else(|| StepError::abort("the response chain has no snapshot"))?;
    let path = blocking(move || {
        let path = ctx.backend.expose(snap).map_err(volume_err)?;
        let path = path.to_string_lossy().into_owned();
        ctx.store.set_snapshot_exposed(snap, &path).map_err(store_err)?;
        Ok(path)
    })
    .await?;
    Ok(ActivateState { path: Some(path), ..req.w })
}
