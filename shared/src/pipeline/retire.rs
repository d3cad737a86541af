//! `retire` (run id `retire-base-<id>`): deletes a base that garbage collection marked
//! `retiring`, then its record.
//!
//! The decision is made before the run starts, by `Store::retire_base`, in one SQLite
//! transaction that checks nothing refers to the base and marks it `retiring`; from that
//! commit on no snapshot intent or prepare uses it (`store/bases.rs`). The run only carries
//! the deletion out, so a crash anywhere resumes it: the volume call and the record's
//! deletion are both idempotent.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{PipelineContext, blocking, store_err, volume_err};
use crate::fault;
use crate::fsm::{StepError, StepRequest, StepResult, Workflow};
use crate::store::BaseState;
use crate::volume::VolumeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireInput {
    pub base_vol_id: u64,
    pub family: String,
    pub digest: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireState {
    /// Set by `delete_base_volume`: the volume is gone.
    pub deleted: bool,
}

type Req = StepRequest<RetireInput, RetireState>;

pub(super) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<RetireInput, RetireState> {
    let c = ctx.clone();
    Workflow::new("retire", 1)
        .step("delete_base_volume", move |req| delete_base_volume(c.clone(), req))
        .step("forget_base", move |req| forget_base(ctx.clone(), req))
}

async fn delete_base_volume(ctx: Arc<PipelineContext>, req: Req) -> StepResult<RetireState> {
    let id = req.r.base_vol_id;
    let run_id = req.run_id.to_string();
    blocking(&req.stop, move || {
        match ctx.store.base(id).map_err(store_err)? {
            // Gone: an earlier attempt finished both steps' work before crashing.
            None => return Ok(()),
            Some(row) if row.state != BaseState::Retiring => {
                return Err(StepError::abort(format!(
                    "base-{id} is {}, not retiring; only garbage collection's decision deletes a base",
                    row.state
                )));
            }
            Some(_) => {}
        }
        fault::point("gc.before_delete", &run_id);
        ctx.backend.delete(VolumeId::Base(id)).map_err(volume_err)?;
        fault::point("gc.after_delete", &run_id);
        Ok(())
    })
    .await?;
    Ok(RetireState { deleted: true })
}

async fn forget_base(ctx: Arc<PipelineContext>, req: Req) -> StepResult<RetireState> {
    if !req.w.deleted {
        return Err(StepError::abort("the response chain says the volume was not deleted"));
    }
    let (id, family, digest) = (req.r.base_vol_id, req.r.family.clone(), req.r.digest.clone());
    blocking(&req.stop, move || {
        ctx.store.forget_base(id).map_err(store_err)?;
        tracing::info!(%family, version = %digest, base = %VolumeId::Base(id), "old base deleted");
        Ok(())
    })
    .await?;
    Ok(req.w)
}
