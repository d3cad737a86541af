//! Reserved snapshot ids a power loss left with a volume (`store/snapshots.rs`): an
//! activation binds its id by a write that waits for no fsync, so a power loss can take the
//! binding while the snapshot it made, and even the run log's commit of the activation, are on
//! disk. Before any run resumes or job runs, each reserved, unbound id whose volume (or half
//! copy) exists is resolved: if a completed activation's recorded response holds the id, its
//! row comes back (`exposed`, at the recorded path); otherwise nothing holds the volume and
//! it is deleted. Either way, the id is never bound again next to a volume it did not make.
//!
//! After a process crash (the common case) the binding survives and nothing here has work: the
//! run log is read only when such an id is found.

use std::collections::HashMap;

use super::{ActivateInput, ActivateState, Pipeline};
use crate::fsm::{ReadError, RunFilter, RunStatus};
use crate::store::{Restored, StoreError};
use crate::volume::{VolumeError, VolumeId};

/// Why the reserved ids could not be resolved (the worker does not start: an id left
/// unresolved could be bound next to a stale volume).
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("reading the run log: {0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Task(String),
}

/// What [`Pipeline::resolve_reserved_ids`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Snapshots whose row came back from the run log.
    pub restored: Vec<String>,
    /// Volumes nothing held, deleted.
    pub deleted: Vec<String>,
}

impl Pipeline {
    /// Resolves every reserved, unbound snapshot id that has a volume (see the module doc).
    /// Call at start, before `resume_all` and before any job.
    pub async fn resolve_reserved_ids(&self) -> Result<Resolved, ReservationError> {
        let (store, backend) = (self.ctx.store.clone(), self.ctx.backend.clone());
        let found = tokio::task::spawn_blocking(move || -> Result<Vec<u64>, ReservationError> {
            // One listing, not a lookup per reserved id: a batch is large, and on dm-thin a
            // lookup of a missing id costs a device activation attempt.
            let mut on_disk: std::collections::BTreeSet<VolumeId> = backend.list()?.into_iter().collect();
            on_disk.extend(backend.leftovers()?.into_iter().map(|l| l.of));
            let unbound = store.unbound_snapshot_ids()?;
            Ok(unbound.into_iter().filter(|&id| on_disk.contains(&VolumeId::Snap(id))).collect())
        })
        .await
        .map_err(|e| ReservationError::Task(e.to_string()))??;
        let mut out = Resolved::default();
        if found.is_empty() {
            return Ok(out);
        }
        let holders = self.completed_activations()?;
        for id in found {
            let vol = VolumeId::Snap(id);
            if let Some(restored) = holders.get(&id) {
                let store = self.ctx.store.clone();
                let r = restored.clone();
                let row = tokio::task::spawn_blocking(move || store.restore_snapshot(&r))
                    .await
                    .map_err(|e| ReservationError::Task(e.to_string()))??;
                if row.is_some() {
                    tracing::warn!(volume = %vol, run_id = %restored.run_id, "restored a snapshot's record from the run log (the host database lost it: a power loss?)");
                    out.restored.push(vol.to_string());
                    continue;
                }
            }
            let backend = self.ctx.backend.clone();
            tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
                backend.delete(vol)?;
                for l in backend.leftovers()?.iter().filter(|l| l.of == vol) {
                    backend.remove_leftover(l)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| ReservationError::Task(e.to_string()))??;
            tracing::warn!(volume = %vol, "deleted the volume of a reserved snapshot id no activation holds (its binding was lost before its run committed)");
            out.deleted.push(vol.to_string());
        }
        Ok(out)
    }

    /// Every completed activation's snapshot, by id, as its run recorded it.
    fn completed_activations(&self) -> Result<HashMap<u64, Restored>, ReservationError> {
        let engine = self.activate.engine();
        let filter = RunFilter { workflow: Some("activate".into()), status: Some(RunStatus::Completed), limit: None };
        let mut out = HashMap::new();
        for run in engine.list_runs(&filter)? {
            let Some(detail) = engine.run_detail(&run.id)? else { continue };
            let (Ok(input), Some(last)) =
                (serde_json::from_value::<ActivateInput>(detail.input), detail.responses.last())
            else {
                continue;
            };
            let Ok(state) = serde_json::from_value::<ActivateState>(last.response.clone()) else { continue };
            let Some(id) = state.snapshot_id else { continue };
            out.insert(
                id,
                Restored {
                    id,
                    run_id: run.id.clone(),
                    family: input.family,
                    base_vol_id: state.base_vol_id,
                    vol_id: VolumeId::Snap(id).to_string(),
                    path: state.path,
                    digest: state.digest,
                    host_id: self.ctx.host_id.clone(),
                },
            );
        }
        Ok(out)
    }
}
