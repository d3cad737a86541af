//! `activate` (run id `activate-<invocation_id>`): one fresh snapshot of the family's base,
//! exposed for one invocation. A redelivered message resumes this run; it never makes a
//! second snapshot, and never one for an invocation that a release has reached.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PipelineContext, blocking_short, store_err, volume_err};
use crate::fault;
use crate::fsm::{StepError, StepRequest, StepResult, Workflow};
use crate::store::{Advance, Intent, SnapshotRow};
use crate::volume::VolumeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateInput {
    pub family: String,
    pub invocation_id: String,
    /// The worker releases the snapshot this long after its intent, if no release came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// The response chain of `activate`. The initial response carries the base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateState {
    pub base_vol_id: u64,
    /// Set by `activate_snapshot`: the snapshot and where it is exposed.
    pub snapshot_id: Option<u64>,
    pub path: Option<String>,
    /// Set by `activate_snapshot`: the version (manifest digest) of the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

type Req = StepRequest<ActivateInput, ActivateState>;

/// Version 2: one step (version 1 had `activate_snapshot` then `expose`; its runs are failed
/// on resume, so drain a worker before upgrading it, as the Ansible upgrade does).
pub(super) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<ActivateInput, ActivateState> {
    Workflow::new("activate", 2).step("activate_snapshot", move |req| activate_snapshot(ctx.clone(), req))
}

/// The one step, guarded: the snapshot (run id → id) is recorded before it is created, so a
/// resume finds and finishes the same snapshot; a release that reached the invocation first
/// stops it before anything is created. Then the snapshot is exposed. All under the
/// invocation's lock, so a release of the same invocation cannot delete the snapshot between
/// a check of its row and the volume call that follows.
async fn activate_snapshot(ctx: Arc<PipelineContext>, req: Req) -> StepResult<ActivateState> {
    let base = req.w.base_vol_id;
    let run_id = req.run_id.to_string();
    let family = req.r.family.clone();
    let ttl = req.r.ttl_secs.map(std::time::Duration::from_secs);
    let _serial = ctx.invocations.lock(&req.r.invocation_id).await;
    let c = ctx.clone();
    let (snap, path, digest) = blocking_short(&req.stop, move || {
        let row = match c
            .store
            .intend_snapshot(&run_id, &family, base, ttl, c.host_id.as_deref(), |id| VolumeId::Snap(id).to_string())
            .map_err(store_err)?
        {
            Intent::Recorded(row) => row,
            Intent::Released(row) => return Err(released(&row)),
            // The job resolved the base under a hold, so this is a base deleted under a
            // resumed run: the activation cannot happen from it.
            Intent::BaseUnavailable(why) => {
                return Err(StepError::abort(format!(
                    "{why}: the version this activation was started on is gone; send the activate again with a new invocation id"
                )));
            }
        };
        fault::point("activate.after_snapshot_intent", &run_id);
        // The row's base, not the response's: a resume finishes what the intent recorded.
        let base = row.base_vol_id.unwrap_or(base);
        c.backend.snapshot(base, row.id).map_err(volume_err)?;
        fault::point("activate.after_snapshot_create", &run_id);
        // One advisory write on the way (`exposed`); `created` is written only when the
        // snapshot exists but cannot be exposed, so the row says what is on disk.
        let path = match c.backend.expose(row.id) {
            Ok(path) => path.to_string_lossy().into_owned(),
            Err(e) => {
                if let Advance::Released(row) = c.store.mark_snapshot_created(row.id).map_err(store_err)? {
                    return Err(released(&row));
                }
                return Err(volume_err(e));
            }
        };
        match c.store.mark_snapshot_exposed(row.id, &path).map_err(store_err)? {
            Advance::Released(row) => Err(released(&row)),
            Advance::Moved(_) | Advance::Unchanged(_) => Ok((row.id, path, row.digest)),
        }
    })
    .await?;
    Ok(ActivateState { snapshot_id: Some(snap), path: Some(path), digest, ..req.w })
}

/// The activation stops for good: its invocation was released.
fn released(row: &SnapshotRow) -> StepError {
    StepError::abort_with(super::Cause::Released.as_str(), row.released_message())
}
