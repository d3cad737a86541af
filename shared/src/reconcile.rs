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
//! volume still exists, or a `created`/`exposed` row whose volume is not seen. With `fix`,
//! the first volume is deleted. The second row is never released here: what reconcile cannot
//! see may still be in use (a volume directory on a filesystem that is not mounted, a pool
//! not activated), and releasing it would let a later pass delete it once it reappears. The
//! report says what to check; an operator who knows the snapshot is gone releases its
//! invocation (`release`), which is idempotent.
//!
//! A volume whose id is reserved but unbound is no orphan: a power loss may have taken the
//! record of a live snapshot, and the worker resolves it at start-up against the run log
//! (`pipeline/reservations.rs`).
//!
//! An `exposed` row whose volume exists but is not usable at its path (a mount a reboot
//! took away) is reported as `unexposed`; with `fix` it is exposed again (what the worker
//! does at start-up), and one that cannot be is left with the reason.
//!
//! In-between artifacts (a half-made snapshot copy, [`VolumeBackend::leftovers`]) are
//! listed with their bytes; with `fix` they are removed, like orphans, unless their
//! volume's row is `intended` while a worker runs on the state directory (its activation
//! may be making it now; garbage collection, which knows which runs are in flight, removes
//! it once its run has failed).
//!
//! The backend is listed before the records are read: a volume is only created after its
//! record is committed, so a worker running meanwhile can never make its new volume look
//! like an orphan. A contradiction is checked again, volume and row, after the records are
//! read, so a release or activation that finished meanwhile is not reported.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::store::{SnapshotState, Store, StoreError};
use crate::volume::{Leftover, VolumeBackend, VolumeError, VolumeId};

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
    /// Contradictions that `fix` leaves alone, each with what to check.
    pub left: Vec<String>,
    /// Exposed snapshots not usable at their paths (unmounted by a reboot, say).
    pub unexposed: Vec<String>,
    /// Snapshots exposed again (with `fix`).
    pub reexposed: Vec<String>,
    /// In-between artifacts (half-made volumes), with their bytes.
    pub leftovers: Vec<String>,
    /// In-between artifacts removed (with `fix`).
    pub leftovers_removed: Vec<String>,
    /// How many volumes the backend holds.
    pub volumes: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.orphans.len() == self.deleted.len()
            && self.contradictions.len() == self.repaired.len()
            && self.leftovers.len() == self.leftovers_removed.len()
            && self.unexposed.len() == self.reexposed.len()
    }
}

/// Compares `backend` with `store`; with `fix`, deletes every orphan.
pub fn reconcile(store: &Store, backend: &dyn VolumeBackend, fix: bool) -> Result<Report, ReconcileError> {
    let volumes: BTreeSet<VolumeId> = backend.list()?.into_iter().collect();
    let mut claimed = BTreeSet::new();
    for base in store.list_bases()? {
        claimed.insert(VolumeId::Base(base.id));
    }
    // A reserved id's volume is the worker's to resolve at start-up (`pipeline/reservations.rs`):
    // it may be a live snapshot whose record a power loss took. Never an orphan here.
    let reserved: BTreeSet<VolumeId> = store.unbound_snapshot_ids()?.into_iter().map(VolumeId::Snap).collect();
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
    let mut unexposed = Vec::new();
    for snap in snapshots.iter().filter(|s| s.state == SnapshotState::Exposed) {
        if volumes.contains(&VolumeId::Snap(snap.id)) && !backend.is_exposed(snap.id)? {
            unexposed.push(snap);
        }
    }
    // A released row's leftover volume is reported (and repaired) as that row's
    // contradiction, not a second time as an orphan.
    let explained: BTreeSet<VolumeId> =
        contradicted.iter().filter(|(_, exists)| *exists).map(|(row, _)| VolumeId::Snap(row.id)).collect();
    let orphans: Vec<VolumeId> =
        volumes.difference(&claimed).filter(|v| !explained.contains(v) && !reserved.contains(v)).copied().collect();
    let mut report = Report {
        orphans: orphans.iter().map(VolumeId::to_string).collect(),
        missing: claimed.difference(&volumes).map(VolumeId::to_string).collect(),
        deleted: Vec::new(),
        contradictions: contradicted.iter().map(|(row, exists)| contradiction(row, *exists)).collect(),
        repaired: Vec::new(),
        left: Vec::new(),
        unexposed: unexposed
            .iter()
            .map(|r| {
                format!("snap-{} ({}): exposed, but not usable at its path (unmounted by a reboot?)", r.id, r.run_id)
            })
            .collect(),
        reexposed: Vec::new(),
        leftovers: Vec::new(),
        leftovers_removed: Vec::new(),
        volumes: volumes.len(),
    };
    // Without a worker holding the state directory, no activation is making anything.
    let now = crate::store::epoch_ms(std::time::SystemTime::now());
    let worker_runs = store.lease("worker")?.is_some_and(|l| l.expires_at_ms > now);
    let swept = sweep_leftovers(store, backend, !fix, &|row| row.state == SnapshotState::Intended && worker_runs)?;
    report.leftovers = swept.found.iter().map(describe_leftover).collect();
    report.leftovers_removed = swept.removed.iter().map(describe_leftover).collect();
    if fix {
        // Snapshots first: a backend may refuse to delete a base with snapshots.
        let mut order = orphans;
        order.sort_by_key(|v| matches!(v, VolumeId::Base(_)));
        for vol in order {
            backend.delete(vol)?;
            tracing::info!(volume = %vol, backend = backend.name(), "deleted an orphan volume");
            report.deleted.push(vol.to_string());
        }
        for (row, line) in unexposed.iter().zip(report.unexposed.clone()) {
            match backend.expose(row.id) {
                Ok(_) => report.reexposed.push(line),
                Err(e) => report.left.push(format!("{line} — exposing it failed: {e}")),
            }
        }
        for (row, exists) in &contradicted {
            let vol = VolumeId::Snap(row.id);
            if *exists {
                backend.delete(vol)?;
                tracing::info!(volume = %vol, run_id = %row.run_id, "deleted the volume of a released snapshot");
                report.repaired.push(contradiction(row, *exists));
            } else {
                report.left.push(format!(
                    "{} — left as it is: reconcile never releases a live snapshot it cannot see. Check that {} is mounted and these are the host's settings; if the snapshot is really gone, release its invocation ({})",
                    contradiction(row, false),
                    backend.name(),
                    row.run_id.strip_prefix("activate-").unwrap_or(&row.run_id)
                ));
            }
        }
    }
    Ok(report)
}

/// In-between artifacts found, and those removed.
#[derive(Clone, Debug, Default)]
pub struct Swept {
    pub found: Vec<Leftover>,
    pub removed: Vec<Leftover>,
}

impl Swept {
    pub fn bytes_removed(&self) -> u64 {
        self.removed.iter().map(|l| l.bytes).sum()
    }
}

/// Lists the backend's in-between artifacts and (unless `dry_run`) removes each whose volume
/// no activation may be making now: its snapshot row is absent, or `making(row)` says no
/// run is making it. Shared by `reconcile --fix` and garbage collection.
pub fn sweep_leftovers(
    store: &Store,
    backend: &dyn VolumeBackend,
    dry_run: bool,
    making: &dyn Fn(&crate::store::SnapshotRow) -> bool,
) -> Result<Swept, ReconcileError> {
    let mut swept = Swept { found: backend.leftovers()?, removed: Vec::new() };
    if dry_run {
        return Ok(swept);
    }
    for leftover in &swept.found {
        let making = match leftover.of {
            VolumeId::Snap(id) => store.snapshot(id)?.is_some_and(|row| making(&row)),
            VolumeId::Base(_) => false,
        };
        if making {
            continue;
        }
        backend.remove_leftover(leftover)?;
        tracing::info!(of = %leftover.of, path = %leftover.path.display(), bytes = leftover.bytes, "removed an in-between artifact");
        swept.removed.push(leftover.clone());
    }
    Ok(swept)
}

fn describe_leftover(l: &Leftover) -> String {
    format!("{} ({} bytes, of {})", l.path.display(), l.bytes, l.of)
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
    #[test]
    fn a_half_copy_is_an_in_between_artifact_swept_unless_its_activation_may_be_making_it() {
        let (_dir, store, backend, base) = host();
        let killed = intend(&store, "activate-killed", base);
        let making = intend(&store, "activate-making", base);
        for id in [killed.id, making.id] {
            let half = _dir.path().join("volumes/snaps").join(format!(".tmp-snap-{id}"));
            std::fs::create_dir_all(half.join("etc")).unwrap();
            std::fs::write(half.join("etc/passwd"), vec![7u8; 64 << 10]).unwrap();
        }
        store.request_release("activate-killed", "web", |id| VolumeId::Snap(id).to_string()).unwrap();
        store.mark_snapshot_released(killed.id).unwrap();

        let report = reconcile(&store, &backend, false).unwrap();
        assert_eq!(report.leftovers.len(), 2, "{report:?}");
        assert!(report.leftovers[0].contains(&format!("of snap-{}", killed.id)), "{report:?}");
        assert!(!report.is_clean());
        // A worker holds the state directory: the intended activation may be making its copy.
        let holder = crate::store::Holder::fresh();
        assert!(store.acquire_lease("worker", &holder, std::time::Duration::from_secs(60)).unwrap());
        let fixed = reconcile(&store, &backend, true).unwrap();
        assert_eq!(fixed.leftovers_removed.len(), 1, "{fixed:?}");
        let left: Vec<VolumeId> = backend.leftovers().unwrap().iter().map(|l| l.of).collect();
        assert_eq!(left, [VolumeId::Snap(making.id)], "the intended activation's copy is left to it");
        // No worker: nothing is making it.
        assert!(store.release_lease("worker", &holder).unwrap());
        assert_eq!(reconcile(&store, &backend, true).unwrap().leftovers_removed.len(), 1);
        assert!(backend.leftovers().unwrap().is_empty());
    }

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
        // Planted: a snapshot and a base no record names (the snapshot's id past the reserved
        // batch: a reserved id's volume is start-up's to resolve, not an orphan).
        backend.snapshot(base, 9999).unwrap();
        backend.create_base(42).unwrap();
        // Intended but not yet created: missing, not an error.
        let pending = intend(&store, "activate-b", base);

        let report = reconcile(&store, &backend, false).unwrap();
        assert_eq!(report.orphans, ["base-42", "snap-9999"]);
        assert_eq!(report.missing, [VolumeId::Snap(pending.id).to_string()]);
        assert!(report.deleted.is_empty() && !report.is_clean());
        assert!(backend.exists(VolumeId::Snap(9999)).unwrap(), "no fix: nothing deleted");

        let fixed = reconcile(&store, &backend, true).unwrap();
        assert_eq!(fixed.deleted, ["snap-9999", "base-42"]);
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
        assert_eq!(fixed.repaired, fixed.contradictions[..1]);
        assert!(!backend.exists(VolumeId::Snap(leaked.id)).unwrap());
        // A live row whose volume is not seen is never released by reconcile: it says why.
        assert_eq!(store.snapshot(lost.id).unwrap().unwrap().state, SnapshotState::Exposed);
        assert!(
            fixed.left[0].contains("never releases a live snapshot") && fixed.left[0].contains("lost"),
            "{fixed:?}"
        );
        assert!(backend.exists(VolumeId::Snap(fine.id)).unwrap());
        let after = reconcile(&store, &backend, false).unwrap();
        assert_eq!(after.contradictions.len(), 1, "{after:?}");
        assert!(!after.is_clean());
    }
}
