//! Store tests in one process. Cross-process contention is in `tests/tests/store_processes.rs`.

use std::time::{Duration, SystemTime};

use super::*;

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path().join("host.db")).expect("open store")
}

#[test]
fn open_applies_migrations_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert_eq!(store.schema_version().unwrap(), migrations::MIGRATIONS.len() as i64);
    drop(store);
    let store = open(&dir);
    assert_eq!(store.schema_version().unwrap(), migrations::MIGRATIONS.len() as i64);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir));
    let c = rusqlite::Connection::open(dir.path().join("host.db")).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let err = Store::open(dir.path().join("host.db")).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
}

#[test]
fn sequences_start_at_one_per_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert_eq!(store.next_id("base").unwrap(), 1);
    assert_eq!(store.next_id("base").unwrap(), 2);
    assert_eq!(store.next_id("snap").unwrap(), 1);
    assert_eq!(store.next_id("base").unwrap(), 3);
}

#[test]
fn lease_acquire_renew_release_match_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let me = Holder::fresh();
    let other = Holder::fresh();
    let ttl = Duration::from_secs(30);
    assert!(store.acquire_lease("prepare/f", &me, ttl).unwrap());
    assert!(store.acquire_lease("prepare/f", &me, ttl).unwrap(), "re-acquiring our own lease extends it");
    assert!(!store.acquire_lease("prepare/f", &other, ttl).unwrap(), "a live lease is not taken");

    assert!(!store.release_lease("prepare/f", &other).unwrap(), "release with the wrong holder changes nothing");
    assert!(matches!(store.renew_lease("prepare/f", &other, ttl), Err(StoreError::LeaseLost { .. })));
    assert_eq!(store.lease("prepare/f").unwrap().unwrap().holder, me.as_str());

    store.renew_lease("prepare/f", &me, ttl).unwrap();
    assert!(store.release_lease("prepare/f", &me).unwrap());
    assert!(store.lease("prepare/f").unwrap().is_none());
    assert!(store.acquire_lease("prepare/f", &other, ttl).unwrap());
}

#[test]
fn an_expired_lease_is_taken_over_and_the_old_holder_loses_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let old = Holder::fresh();
    let new = Holder::fresh();
    let t0 = SystemTime::now();
    let ttl = Duration::from_secs(10);
    assert!(store.acquire_lease_at("k", &old, ttl, t0).unwrap());
    assert!(!store.acquire_lease_at("k", &new, ttl, t0 + Duration::from_secs(9)).unwrap());
    assert!(store.acquire_lease_at("k", &new, ttl, t0 + Duration::from_secs(10)).unwrap(), "expired at t0+ttl");
    assert_eq!(store.lease("k").unwrap().unwrap().holder, new.as_str());
    assert!(matches!(
        store.renew_lease_at("k", &old, ttl, t0 + Duration::from_secs(11)),
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(!store.release_lease("k", &old).unwrap());
}

#[test]
fn pid_reuse_cannot_make_two_holders_equal() {
    // Two holders made in one process share the pid, as a new process reusing a dead
    // one's pid would; the random part still tells them apart.
    let a = Holder::fresh();
    let b = Holder::fresh();
    let pid = format!("pid:{}:", std::process::id());
    assert!(a.as_str().starts_with(&pid) && b.as_str().starts_with(&pid));
    assert_ne!(a, b);
    assert_eq!(Holder::this_process(), Holder::this_process(), "made once per process");

    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert!(store.acquire_lease("k", &a, Duration::from_secs(60)).unwrap());
    assert!(!store.acquire_lease("k", &b, Duration::from_secs(60)).unwrap());
    assert!(!store.release_lease("k", &b).unwrap());
}

#[test]
fn images_record_base_and_prepared_flag() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert!(store.image("web").unwrap().is_none());
    store.upsert_image("web", "dir:/srv/images").unwrap();
    assert_eq!(store.intend_base("web").unwrap(), 1);
    assert_eq!(store.intend_base("web").unwrap(), 1, "the recorded base is returned again");
    store.set_manifest_digest("web", "sha256:abc").unwrap();
    let row = store.image("web").unwrap().unwrap();
    assert_eq!((row.base_vol_id, row.prepared, row.manifest_digest.as_deref()), (Some(1), false, Some("sha256:abc")));
    store.set_prepared("web", true).unwrap();
    assert!(store.image("web").unwrap().unwrap().prepared);
    store.upsert_image("web", "dir:/elsewhere").unwrap();
    let row = store.image("web").unwrap().unwrap();
    assert_eq!(
        (row.base_vol_id, row.prepared, row.source.as_str()),
        (Some(1), true, "dir:/elsewhere"),
        "upsert keeps what is known"
    );
    assert!(matches!(store.intend_base("nope"), Err(StoreError::Invalid { .. })));
    store.clear_base_vol_id("web").unwrap();
    assert_eq!(store.intend_base("web").unwrap(), 2, "a new base after the old one was cleared");
}

#[test]
fn a_snapshot_intent_is_recorded_once_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = store.intend_snapshot("activate-1", "web", 3, |id| format!("snap-{id}")).unwrap();
    assert_eq!((first.id, first.vol_id.as_str(), first.state), (1, "snap-1", SnapshotState::Intended));
    let again = store.intend_snapshot("activate-1", "web", 3, |id| format!("snap-{id}")).unwrap();
    assert_eq!(again, first, "the same run finds the same snapshot");
    let second = store.intend_snapshot("activate-2", "web", 3, |id| format!("snap-{id}")).unwrap();
    assert_eq!(second.id, 2);
    store.set_snapshot_exposed(1, "/vols/snap-1").unwrap();
    store.set_snapshot_released(2).unwrap();
    let all = store.list_snapshots().unwrap();
    assert_eq!(all[0].state, SnapshotState::Exposed);
    assert_eq!(all[0].path.as_deref(), Some("/vols/snap-1"));
    assert_eq!(all[1].state, SnapshotState::Released);
    assert!(all[1].released_at_ms.is_some());
}

#[test]
fn a_locked_database_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    let store = Store::open_with(&path, &StoreOptions { busy_timeout: Duration::from_millis(50) }).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = store.next_id("base").unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    other.execute_batch("ROLLBACK").unwrap();
    assert_eq!(store.next_id("base").unwrap(), 1, "works again once the lock is gone");
}

#[test]
fn a_corrupt_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    std::fs::write(&path, vec![0xA5u8; 8192]).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn an_unwritable_directory_names_the_path() {
    // /proc refuses file creation even to root, unlike a chmod-ed directory.
    let path = std::path::Path::new("/proc/thinpipe-test-host.db");
    let err = Store::open(path).unwrap_err();
    assert!(matches!(err, StoreError::CannotOpen { .. } | StoreError::ReadOnly { .. }), "{err:?}");
    assert!(err.to_string().contains("/proc/thinpipe-test-host.db"), "{err}");
}

#[test]
fn a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/host.db");
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::CannotOpen { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir/host.db"), "{err}");
}

#[test]
fn a_lease_of_a_dead_process_is_taken_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let ttl = Duration::from_secs(3600);
    // A holder whose process is gone: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = format!("pid:{dead_pid}:00000000deadbeef");
    store
        .with_conn(|c| {
            c.execute(
                "INSERT INTO leases (k, v, expires_at) VALUES ('worker', ?1, ?2)",
                rusqlite::params![dead, i64::MAX],
            )
        })
        .unwrap();
    let me = Holder::fresh();
    assert_eq!(store.acquire_lease_reclaiming("worker", &me, ttl).unwrap(), Acquired::TookOver { from: dead.clone() });
    assert_eq!(store.lease("worker").unwrap().unwrap().holder, me.as_str());
    // A live holder (this process, another holder) is not taken over.
    let other = Holder::fresh();
    assert_eq!(store.acquire_lease_reclaiming("worker", &other, ttl).unwrap(), Acquired::HeldBy(me.to_string()));
    assert_eq!(Holder::pid_of(me.as_str()), Some(std::process::id()));
}
