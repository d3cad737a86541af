//! `reconcile`: the volumes a backend holds against the records in the host database.
//!
//! A volume is claimed when a record names it: a base by an image's `base_vol_id` or by
//! the `base_vol_id` of a snapshot not yet released (an old base keeps serving its
//! snapshots after the family moved to a new one), a snapshot by its row while not
//! released. An orphan is a volume nothing claims (left by a tool, a bug or a lost
//! database); a missing volume is a claim with no volume (normal for a run between its
//! intent and its create; otherwise the run's next attempt makes it).
//!
//! A contradiction is a snapshot row whose state the disk denies: a `released` row whose
//! volume still exists, or a `created`/`exposed` row whose volume is gone. With `fix`, the
//! first volume is deleted and the second row marked `released` (nothing is left to give
//! back; the activation's holder has lost its snapshot either way).
//!
//! The backend is listed before the records are read: a volume is only created after its
//! record is committed, so a worker running meanwhile can never make its new volume look
//! like an orphan. A contradiction is checked again, volume and row, after the records are
//! read, so a release or activation that finished meanwhile is not reported.

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
    /// Snapshot rows whose state the disk denies, e.g. "snap-4: released but its volume exists".
    pub contradictions: Vec<String>,
    /// Contradictions repaired (with `fix`).
    pub repaired: Vec<String>,
    /// How many volumes the backend holds.
    pub volumes: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.orphans.len() == self.deleted.len() && self.contradictions.len() == self.repaired.len()
    }
}

/// Compares `backend` with `store`; with `fix`, deletes every orphan.
pub fn reconcile(store: &Store, backend: &dyn VolumeBackend, fix: bool) -> Result<Report, ReconcileError> {
    let volumes: BTreeSet<VolumeId> = backend.list()?.into_iter().collect();
    let mut claimed = BTreeSet::new();
    for base in store.list_bases()? {
        claimed.insert(VolumeId::Base(base.id));
    }
    let snapshots = store.list_snapshots()?;
    for snap in &snapshots {
        if snap.state != SnapshotState::Released {
            claimed.insert(VolumeId::Snap(snap.id));
            if let Some(base) = snap.base_vol_id {
                claimed.insert(VolumeId::Base(base));
            }
        }
    }
    // Rows the disk contradicts, each checked again (row and volume) now that the records
    // are read: the listing is older than them.
    let mut contradicted = Vec::new();
    for snap in &snapshots {
        let vol = VolumeId::Snap(snap.id);
        let listed = volumes.contains(&vol);
        let suspect = match snap.state {
            SnapshotState::Released => listed,
            SnapshotState::Created | SnapshotState::Exposed => !listed,
            SnapshotState::Intended | SnapshotState::Releasing => false,
        };
        if !suspect {
            continue;
        }
        let Some(now) = store.snapshot(snap.id)? else { continue };
        let exists = backend.exists(vol)?;
        match now.state {
            SnapshotState::Released if exists => contradicted.push((now, true)),
            SnapshotState::Created | SnapshotState::Exposed if !exists => contradicted.push((now, false)),
            _ => {}
        }
    }
    // A released row's leftover volume is reported (and repaired) as that row's
    // contradiction, not a second time as an orphan.
    let explained: BTreeSet<VolumeId> =
        contradicted.iter().filter(|(_, exists)| *exists).map(|(row, _)| VolumeId::Snap(row.id)).collect();
    let orphans: Vec<VolumeId> = volumes.difference(&claimed).filter(|v| !explained.contains(v)).copied().collect();
    let mut report = Report {
        orphans: orphans.iter().map(VolumeId::to_string).collect(),
        missing: claimed.difference(&volumes).map(VolumeId::to_string).collect(),
        deleted: Vec::new(),
        contradictions: contradicted.iter().map(|(row, exists)| contradiction(row, *exists)).collect(),
        repaired: Vec::new(),
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
        for (row, exists) in &contradicted {
            let vol = VolumeId::Snap(row.id);
            if *exists {
                backend.delete(vol)?;
                tracing::info!(volume = %vol, run_id = %row.run_id, "deleted the volume of a released snapshot");
            } else {
                store.mark_snapshot_released(row.id)?;
                tracing::info!(volume = %vol, run_id = %row.run_id, "marked a snapshot whose volume is gone as released");
            }
            report.repaired.push(contradiction(row, *exists));
        }
    }
    Ok(report)
}

fn contradiction(row: &crate::store::SnapshotRow, exists: bool) -> String {
    let vol = VolumeId::Snap(row.id);
    if exists {
        format!("{vol} ({}): released, but its volume exists", row.run_id)
    } else {
        format!("{vol} ({}): {}, but its volume is gone", row.run_id, row.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BaseIntent, Intent, SnapshotRow};
    use crate::volume::DirBackend;

    fn intend(store: &Store, run: &str, base: u64) -> SnapshotRow {
        match store.intend_snapshot(run, "web", base, None, None, |id| VolumeId::Snap(id).to_string()).unwrap() {
            Intent::Recorded(row) => row,
            other => panic!("{other:?}"),
        }
    }

    /// A host database and a `dir` backend with family `web`'s base sealed.
    fn host() -> (tempfile::TempDir, Store, DirBackend, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("host.db")).unwrap();
        let backend = DirBackend::open(dir.path().join("volumes")).unwrap();
        store.upsert_image("web", "local").unwrap();
        let BaseIntent::Ready(row) = store.intend_base("web", "sha256:v1", &[]).unwrap() else { unreachable!() };
        let base = row.id;
        backend.create_base(base).unwrap();
        backend.seal_base(base).unwrap();
        store.mark_base_sealed(base).unwrap();
        (dir, store, backend, base)
    }

    #[test]
    fn finds_and_deletes_orphans_but_never_a_claimed_volume() {
        let (_dir, store, backend, base) = host();
        let snap = intend(&store, "activate-a", base);
        backend.snapshot(base, snap.id).unwrap();
        // Planted: a snapshot and a base no record names.
        backend.snapshot(base, 99).unwrap();
        backend.create_base(42).unwrap();
        // Intended but not yet created: missing, not an error.
        let pending = intend(&store, "activate-b", base);

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

    #[test]
    fn finds_and_repairs_rows_the_disk_contradicts() {
        let (_dir, store, backend, base) = host();
        // A released row whose volume was left behind (what the old release race did).
        let leaked = intend(&store, "activate-leaked", base);
        backend.snapshot(base, leaked.id).unwrap();
        store.request_release("activate-leaked", "web", |id| VolumeId::Snap(id).to_string()).unwrap();
        store.mark_snapshot_released(leaked.id).unwrap();
        // An exposed row whose volume is gone.
        let lost = intend(&store, "activate-lost", base);
        store.mark_snapshot_exposed(lost.id, "/nowhere").unwrap();
        // Consistent rows: live with its volume, and a tombstone.
        let fine = intend(&store, "activate-fine", base);
        backend.snapshot(base, fine.id).unwrap();
        store.mark_snapshot_exposed(fine.id, "/somewhere").unwrap();
        store.request_release("activate-never", "web", |id| VolumeId::Snap(id).to_string()).unwrap();

        let report = reconcile(&store, &backend, false).unwrap();
        assert_eq!(
            report.contradictions,
            [
                format!("snap-{} (activate-leaked): released, but its volume exists", leaked.id),
                format!("snap-{} (activate-lost): exposed, but its volume is gone", lost.id),
            ]
        );
        assert!(!report.is_clean() && report.orphans.is_empty());
        let fixed = reconcile(&store, &backend, true).unwrap();
        assert_eq!(fixed.repaired, fixed.contradictions);
        assert!(!backend.exists(VolumeId::Snap(leaked.id)).unwrap());
        assert_eq!(store.snapshot(lost.id).unwrap().unwrap().state, SnapshotState::Released);
        assert!(backend.exists(VolumeId::Snap(fine.id)).unwrap());
        let after = reconcile(&store, &backend, false).unwrap();
        assert!(after.is_clean() && after.contradictions.is_empty(), "{after:?}");
    }
}
