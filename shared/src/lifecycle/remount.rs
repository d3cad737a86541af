//! Live snapshots after a restart: a mount does not outlive a reboot (overlay snapshots,
//! dm-thin's mounted devices), so before a worker takes jobs it exposes every snapshot the
//! host database records `exposed` again; exposing a usable snapshot changes nothing. A live
//! row still `intended` or `created` whose volume exists is exposed too: the `exposed` mark is
//! written without an fsync, so a power loss can take it from a finished activation (and a
//! resumed one exposes its snapshot anyway). A
//! snapshot whose contents cannot be trusted any more ([`VolumeError::Lost`]: a `volatile`
//! overlay after a reboot) is released through the release workflow, as its scheduler would,
//! so it is never handed out again; one that cannot be exposed for another reason is reported
//! (and `worker reconcile` reports it too) and left alone.

use super::{Lifecycle, LifecycleError};
use crate::fsm::Outcome;
use crate::store::SnapshotState;
use crate::volume::VolumeError;

/// What [`Lifecycle::expose_live`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exposed {
    /// Snapshots usable at their paths (mounted again, or never unmounted).
    pub usable: usize,
    /// Invocations whose snapshot was lost, and released.
    pub lost: Vec<String>,
    /// Snapshots that could not be exposed, each with the error.
    pub failed: Vec<String>,
}

impl Lifecycle {
    /// Exposes every live snapshot whose volume exists (see the module doc).
    pub async fn expose_live(&self) -> Result<Exposed, LifecycleError> {
        let rows = self.store().call(|s| s.list_snapshots()).await?;
        let mut out = Exposed::default();
        let live = [SnapshotState::Intended, SnapshotState::Created, SnapshotState::Exposed];
        for row in rows.into_iter().filter(|r| live.contains(&r.state) && r.base_vol_id.is_some()) {
            let backend = self.pipeline.context().backend.clone();
            let (id, marked) = (row.id, row.state == SnapshotState::Exposed);
            let exposed = tokio::task::spawn_blocking(move || {
                if !marked && !backend.exists(crate::volume::VolumeId::Snap(id))? {
                    return Ok(None); // its activation has not made it yet
                }
                backend.expose(id).map(Some)
            })
            .await
            .map_err(|e| LifecycleError::Task(format!("exposing snap-{id}: {e}")))?;
            let invocation = row.run_id.strip_prefix("activate-").unwrap_or(&row.run_id).to_owned();
            match exposed {
                Ok(None) => {}
                Ok(Some(_)) => out.usable += 1,
                Err(lost @ VolumeError::Lost { .. }) => {
                    tracing::error!(family = %row.family, invocation = %invocation, snapshot = id, error = %lost, cause = "snapshot_lost", "a live snapshot lost its contents; releasing it");
                    // A release that fails here is retried by the invocation's own release, or
                    // by the next start: the row stays `exposed` and expose keeps refusing it.
                    let failed = match self.pipeline.release(&row.family, &invocation).await {
                        Ok(r) => match r.outcome {
                            Outcome::Completed(_) => None,
                            Outcome::Failed(f) => Some(f.to_string()),
                        },
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(why) = failed {
                        tracing::error!(invocation = %invocation, error = %why, "releasing a lost snapshot failed");
                        out.failed.push(format!("snap-{id} ({invocation}): lost, and its release failed: {why}"));
                        continue;
                    }
                    crate::telemetry::metrics()
                        .snapshots_expired
                        .add(1, &[crate::telemetry::kv("why", "snapshot_lost")]);
                    out.lost.push(invocation);
                }
                Err(e) => {
                    tracing::error!(family = %row.family, invocation = %invocation, snapshot = id, error = %e, "a live snapshot cannot be exposed; `worker reconcile` reports it");
                    out.failed.push(format!("snap-{id} ({invocation}): {e}"));
                }
            }
        }
        if !out.lost.is_empty() {
            self.wake();
        }
        Ok(out)
    }
}
