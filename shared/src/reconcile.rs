//! `reconcile`: the volumes a backend holds against the records in the host database.
//!
//! A volume is claimed when a record names it: a base by an image's `base_vol_id` or by
//! the `base_vol_id` of a snapshot not yet released (an old base keeps serving its
//! snapshots after the family moved to a new one), a snapshot by its row while not
//! released. An orphan is a volume nothing claims (left by a tool, a bug or a lost
//! database); a missing volume is a claim with no volume (normal for a run between its
//! intent and its create; otherwise the run's next attempt makes it).
//!
//! The backend is listed before the records are read: a volume is only created after its
//! record is committed, so a worker running meanwhile can never make its new volume look
//! like an orphan.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::store::{SnapshotState, Store, StoreError};
use crate::volume::{VolumeBackend, VolumeError, VolumeId};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// What `reconcile` found (and, with `fix`, deleted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Volumes no record claims.
    pub orphans: Vec<String>,
    /// Claims with no volume.
    pub missing: Vec<String>,
    /// Orphans deleted (with `fix`).
    pub deleted: Vec<String>,
    /// How many volumes the backend holds.
    pub volumes: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.orphans.len() == self.deleted.len()
    }
}

/// Compares `backend` with `store`; with `fix`, deletes every orphan.
pub fn reconcile(store: &Store, backend: &dyn VolumeBackend, fix: bool) -> Result<Report, ReconcileError> {
    let volumes: BTreeSet<VolumeId> = backend.list()?.into_iter().collect();
    let mut claimed = BTreeSet::new();
    for image in store.list_images()? {
        if let Some(base) = image.base_vol_id {
            claimed.insert(VolumeId::Base(base));
        }
    }
    for snap in store.list_snapshots()? {
        if snap.state != SnapshotState::Released {
            claimed.insert(VolumeId::Snap(snap.id));
            claimed.insert(VolumeId::Base(snap.base_vol_id));
        }
    }
    let orphans: Vec<VolumeId> = volumes.difference(&claimed).copied().collect();
    let mut report = Report {
        orphans: orphans.iter().map(VolumeId::to_string).collect(),
        missing: claimed.difference(&volumes).map(VolumeId::to_string).collect(),
        deleted: Vec::new(),
        volumes: volumes.len(),
    };
    if fix {
        // Snapshots first: a backend may refuse to delete a base with snapshots.
        let mut order = orphans;
        order.sort_by_key(|v| matches!(v, VolumeId::Base(_)));
        for vol in order {
            backend.delete(vol)?;
            tracing::info!(volume = %vol, backend = backend.name(), "deleted an orphan volume");
            report.deleted.push(vol.to_string());
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::DirBackend;

    #[test]
    fn finds_and_deletes_orphans_but_never_a_claimed_volume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("host.db")).unwrap();
        let backend = DirBackend::open(dir.path().join("volumes")).unwrap();
        store.upsert_image("web", "local").unwrap();
        let base = store.intend_base("web").unwrap();
        backend.create_base(base).unwrap();
        backend.seal_base(base).unwrap();
        let snap = store.intend_snapshot("activate-a", "web", base, |id| VolumeId::Snap(id).to_string()).unwrap();
        backend.snapshot(base, snap.id).unwrap();
        // Planted: a snapshot and a base no record names.
        backend.snapshot(base, 99).unwrap();
        backend.create_base(42).unwrap();
        // Intended but not yet created: missing, not an error.
        let pending = store.intend_snapshot("activate-b", "web", base, |id| VolumeId::Snap(id).to_string()).unwrap();

        let report = reconcile(&store, &backend, false).unwrap();
        assert_eq!(report.orphans, ["base-42", "snap-99"]);
        assert_eq!(report.missing, [VolumeId::Snap(pending.id).to_string()]);
        assert!(report.deleted.is_empty() && !report.is_clean());
        assert!(backend.exists(VolumeId::Snap(99)).unwrap(), "no fix: nothing deleted");

        let fixed = reconcile(&store, &backend, true).unwrap();
        assert_eq!(fixed.deleted, ["snap-99", "base-42"]);
        assert!(fixed.is_clean());
        assert_eq!(reconcile(&store, &backend, false).unwrap().orphans, Vec::<String>::new());
        assert!(backend.exists(VolumeId::Snap(snap.id)).unwrap());
        assert!(backend.exists(VolumeId::Base(base)).unwrap());
    }
}
