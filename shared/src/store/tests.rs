//! Store tests in one process. Cross-process contention is in `tests/tests/engine/store_processes.rs`.

use std::sync::Arc;
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
fn versions_have_their_own_bases_and_one_current_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert!(store.image("web").unwrap().is_none());
    store.upsert_image("web", "dir:/srv/images").unwrap();
    let ready = |i: BaseIntent| match i {
        BaseIntent::Ready(row) => row,
        BaseIntent::Retiring(row) => panic!("retiring: {row:?}"),
    };
    let v1 = ready(store.intend_base("web", "sha256:aaaa", &["sha256:l1".into()]).unwrap());
    assert_eq!((v1.id, v1.state), (1, BaseState::Preparing));
    assert_eq!(ready(store.intend_base("web", "sha256:aaaa", &[]).unwrap()).id, 1, "the recorded base again");
    assert!(store.make_current("web", 1).is_err(), "an unsealed base cannot be current");
    store.mark_base_sealed(1).unwrap();
    assert_eq!(store.make_current("web", 1).unwrap(), None);
    let v2 = ready(store.intend_base("web", "sha256:bbbb", &["sha256:l2".into()]).unwrap());
    assert_eq!(v2.id, 2, "a new version gets a new base");
    store.mark_base_sealed(2).unwrap();
    assert_eq!(store.make_current("web", 2).unwrap(), Some(1));
    assert_eq!(store.current_base("web").unwrap().unwrap().digest, "sha256:bbbb");
    assert_eq!(store.base_of_version("web", "sha256:aaaa").unwrap().unwrap().blobs, Some(vec!["sha256:l1".into()]));
    store.upsert_image("web", "dir:/elsewhere").unwrap();
    let row = store.image("web").unwrap().unwrap();
    assert_eq!((row.current_base, row.source.as_str()), (Some(2), "dir:/elsewhere"), "upsert keeps what is known");
    assert!(store.make_current("other", 1).is_err(), "a base of another family");

    // Retiring: the current version is kept; an old one without snapshots is marked, and a
    // snapshot intent on it is refused in its own transaction.
    assert!(matches!(store.retire_base(2, 0, |_| None).unwrap(), Retire::Kept(why) if why.contains("current version")));
    assert!(
        matches!(store.retire_base(1, 0, |_| Some("in use".into())).unwrap(), Retire::Kept(why) if why == "in use")
    );
    assert!(
        matches!(store.retire_base(1, 0, |_| None).unwrap(), Retire::Marked(row) if row.state == BaseState::Retiring)
    );
    assert!(matches!(
        store.intend_snapshot("activate-late", "web", 1, None, None, |id| format!("snap-{id}")).unwrap(),
        Intent::BaseUnavailable(why) if why.contains("retiring")
    ));
    assert!(matches!(store.intend_base("web", "sha256:aaaa", &[]).unwrap(), BaseIntent::Retiring(_)));
    assert!(store.forget_base(2).is_err(), "only a retiring base is forgotten");
    store.forget_base(1).unwrap();
    store.forget_base(1).unwrap();
    assert!(matches!(store.retire_base(1, 0, |_| None).unwrap(), Retire::Gone));
    assert_eq!(ready(store.intend_base("web", "sha256:aaaa", &[]).unwrap()).id, 3, "collected, then prepared anew");

    // A live snapshot keeps its (non-current) base.
    store.mark_base_sealed(3).unwrap();
    recorded(store.intend_snapshot("activate-old", "web", 3, None, None, |id| format!("snap-{id}")).unwrap());
    assert!(matches!(store.retire_base(3, 0, |_| None).unwrap(), Retire::Kept(why) if why.contains("1 live snapshot")));
    assert!(store.base(3).unwrap().unwrap().last_activated_at_ms.is_some());

    // A sealed version that was never current (its job has not switched to it yet) is kept
    // for the grace period; one that was superseded is not.
    let fresh = ready(store.intend_base("web", "sha256:cccc", &[]).unwrap());
    store.mark_base_sealed(fresh.id).unwrap();
    let kept = store.retire_base(fresh.id, 60_000, |_| None).unwrap();
    assert!(matches!(&kept, Retire::Kept(why) if why.contains("never its family's current version")), "{kept:?}");
    assert!(matches!(store.retire_check(fresh.id, 0, |_| None).unwrap(), Retire::Marked(_)), "would go without grace");
    assert_eq!(store.base(fresh.id).unwrap().unwrap().state, BaseState::Sealed, "a check marks nothing");
    store.make_current("web", fresh.id).unwrap();
    assert!(store.base(2).unwrap().unwrap().superseded_at_ms.is_some());
    assert!(matches!(store.retire_base(2, 60_000, |_| None).unwrap(), Retire::Marked(_)), "superseded: no grace");
}

/// Family `web`'s sealed base (made on first use).
fn web_base(store: &Store) -> u64 {
    store.upsert_image("web", "dir:/srv/images").unwrap();
    let (BaseIntent::Ready(row) | BaseIntent::Retiring(row)) = store.intend_base("web", "sha256:web", &[]).unwrap();
    store.mark_base_sealed(row.id).unwrap().id
}

fn recorded(i: Intent) -> SnapshotRow {
    match i {
        Intent::Recorded(row) => row,
        other => panic!("not recorded: {other:?}"),
    }
}

#[test]
fn a_snapshot_intent_is_recorded_once_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = recorded(
        store.intend_snapshot("activate-1", "web", web_base(&store), None, None, |id| format!("snap-{id}")).unwrap(),
    );
    assert_eq!((first.id, first.vol_id.as_str(), first.state), (1, "snap-1", SnapshotState::Intended));
    let again = recorded(
        store.intend_snapshot("activate-1", "web", web_base(&store), None, None, |id| format!("snap-{id}")).unwrap(),
    );
    assert_eq!(again, first, "the same run finds the same snapshot");
    let second = recorded(
        store.intend_snapshot("activate-2", "web", web_base(&store), None, None, |id| format!("snap-{id}")).unwrap(),
    );
    assert_eq!(second.id, 2);
    store.mark_snapshot_exposed(1, "/vols/snap-1").unwrap();
    store.request_release("activate-2", "web", |id| format!("snap-{id}")).unwrap();
    store.mark_snapshot_released(2).unwrap();
    let all = store.list_snapshots().unwrap();
    assert_eq!(all[0].state, SnapshotState::Exposed);
    assert_eq!(all[0].path.as_deref(), Some("/vols/snap-1"));
    assert_eq!(all[1].state, SnapshotState::Released);
    assert!(all[1].released_at_ms.is_some() && all[1].release_requested_at_ms.is_some());
}

/// Every pair (from, to) through the one fenced path: forward moves happen; backward ones
/// change nothing; a live move on a row a release reached is refused as `Released`.
#[test]
fn snapshot_states_move_one_way_only() {
    use SnapshotState::*;
    let states = [Intended, Created, Exposed, Releasing, Released];
    for from in states {
        for to in [Created, Exposed, Released] {
            let dir = tempfile::tempdir().unwrap();
            let store = open(&dir);
            let row = recorded(
                store
                    .intend_snapshot("activate-x", "web", web_base(&store), None, None, |id| format!("snap-{id}"))
                    .unwrap(),
            );
            match from {
                Intended => {}
                Created => {
                    store.mark_snapshot_created(row.id).unwrap();
                }
                Exposed => {
                    store.mark_snapshot_exposed(row.id, "/p").unwrap();
                }
                Releasing | Released => {
                    store.request_release("activate-x", "web", |_| unreachable!()).unwrap();
                }
            }
            if from == Released {
                store.mark_snapshot_released(row.id).unwrap();
            }
            assert_eq!(store.snapshot(row.id).unwrap().unwrap().state, from);
            let moved = match to {
                Created => store.mark_snapshot_created(row.id),
                Exposed => store.mark_snapshot_exposed(row.id, "/q"),
                _ => store.mark_snapshot_released(row.id),
            }
            .unwrap();
            let after = store.snapshot(row.id).unwrap().unwrap();
            match moved {
                Advance::Moved(r) => {
                    assert!(from < to, "{from} -> {to} moved");
                    assert_eq!((r.state, after.state), (to, to));
                }
                Advance::Unchanged(r) => {
                    assert!(from >= to && from.is_released() == to.is_released(), "{from} -> {to} unchanged");
                    assert_eq!((r.state, after.state), (from, from));
                }
                Advance::Released(r) => {
                    assert!(from.is_released() && !to.is_released(), "{from} -> {to} refused");
                    assert_eq!((r.state, after.state), (from, from), "a released row never turns live again");
                }
            }
        }
    }
}

#[test]
fn a_release_before_any_activation_leaves_a_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let req = store.request_release("activate-early", "web", |id| format!("snap-{id}")).unwrap();
    let ReleaseRequest::Tombstone(tomb) = req else { panic!("{req:?}") };
    assert!(tomb.is_tombstone() && tomb.state == SnapshotState::Released && tomb.base_vol_id.is_none());
    match store
        .intend_snapshot("activate-early", "web", web_base(&store), None, None, |id| format!("snap-{id}"))
        .unwrap()
    {
        Intent::Released(row) => {
            assert_eq!(row.id, tomb.id);
            let msg = row.released_message();
            assert!(
                msg.starts_with("invocation early was released at 20") && msg.ends_with("use a new invocation id"),
                "{msg}"
            );
        }
        other => panic!("an activation after the release must be refused: {other:?}"),
    }
    let again = store.request_release("activate-early", "web", |id| format!("snap-{id}")).unwrap();
    assert!(matches!(again, ReleaseRequest::Already(ref r) if r.id == tomb.id), "{again:?}");
    // A live row becomes releasing; a second request finds it already on its way.
    recorded(
        store.intend_snapshot("activate-live", "web", web_base(&store), None, None, |id| format!("snap-{id}")).unwrap(),
    );
    assert!(matches!(
        store.request_release("activate-live", "web", |_| unreachable!()).unwrap(),
        ReleaseRequest::Releasing(_)
    ));
    assert!(matches!(
        store.request_release("activate-live", "web", |_| unreachable!()).unwrap(),
        ReleaseRequest::Already(_)
    ));
    assert_eq!(store.releasing_snapshots().unwrap().len(), 1);
}

/// A database written by the first schema: rows that the old release race left `exposed`
/// with `released_at` set come out `releasing`, so the worker finishes them at start.
#[test]
fn the_first_schema_migrates_and_leaked_rows_become_releasing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(super::migrations::MIGRATIONS[0]).unwrap();
        c.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO snapshots VALUES (1, 'activate-ok', 'web', 1, 'snap-1', '/p1', 'exposed', 10, NULL);
             INSERT INTO snapshots VALUES (2, 'activate-gone', 'web', 1, 'snap-2', '/p2', 'released', 10, 20);
             INSERT INTO snapshots VALUES (3, 'activate-leak', 'web', 1, 'snap-3', '/p3', 'exposed', 10, 30);",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), super::migrations::MIGRATIONS.len() as i64);
    let rows = store.list_snapshots().unwrap();
    let states: Vec<_> = rows.iter().map(|r| (r.id, r.state)).collect();
    assert_eq!(states, [(1, SnapshotState::Exposed), (2, SnapshotState::Released), (3, SnapshotState::Releasing)]);
    assert_eq!(rows[2].release_requested_at_ms, Some(30));
    assert_eq!(rows[2].released_at_ms, None);
}

/// A database from before versions: each family's base becomes a version (sealed if it was
/// prepared, with its recorded digest), the prepared ones current; snapshots learn their
/// version's digest.
#[test]
fn bases_of_the_second_schema_become_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(super::migrations::MIGRATIONS[0]).unwrap();
        c.execute_batch(super::migrations::MIGRATIONS[1]).unwrap();
        c.execute_batch(
            "PRAGMA user_version = 2;
             INSERT INTO images VALUES ('web', 'dir:/x', 'sha256:aaaa', 1, 1, 50, 10, 50);
             INSERT INTO images VALUES ('api', 'dir:/x', NULL, 2, 0, NULL, 10, 10);
             INSERT INTO images VALUES ('new', 'dir:/x', NULL, NULL, 0, NULL, 10, 10);
             INSERT INTO snapshots (id, run_id, family, base_vol_id, vol_id, state, created_at)
                 VALUES (1, 'activate-a', 'web', 1, 'snap-1', 'exposed', 60);",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let bases = store.list_bases().unwrap();
    let got: Vec<_> = bases.iter().map(|b| (b.id, b.family.as_str(), b.digest.as_str(), b.state)).collect();
    assert_eq!(got, [(2, "api", "unknown:base-2", BaseState::Preparing), (1, "web", "sha256:aaaa", BaseState::Sealed)]);
    assert_eq!(store.current_base("web").unwrap().unwrap().id, 1);
    assert!(store.current_base("api").unwrap().is_none() && store.current_base("new").unwrap().is_none());
    assert_eq!(store.snapshot(1).unwrap().unwrap().digest.as_deref(), Some("sha256:aaaa"));
    assert!(bases.iter().all(|b| b.blobs.is_none()), "the blob lists are unknown");
}

#[test]
fn a_locked_database_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    let store =
        Store::open_with(&path, &StoreOptions { busy_timeout: Duration::from_millis(50), ..StoreOptions::default() })
            .unwrap();
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

/// With a background checkpointer, commits never checkpoint (the WAL hook replaces SQLite's
/// autocheckpoint on the store's connection), and the WAL still reaches the database file,
/// by the thread.
#[test]
fn the_background_checkpointer_moves_the_wal_into_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    let options =
        StoreOptions { checkpoint: Checkpoint::Background { every: Duration::from_millis(20) }, ..Default::default() };
    let store = Store::open_with(&path, &options).unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    // More commits than CHECKPOINT_PAGES: the thread notices and checkpoints.
    for i in 0..2000 {
        recorded(
            store
                .intend_snapshot(&format!("activate-{i}"), "web", web_base(&store), None, None, |id| {
                    format!("snap-{id}")
                })
                .unwrap(),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&path).unwrap().len() <= before {
        assert!(std::time::Instant::now() < deadline, "the WAL was never checkpointed into {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(store); // stops and joins the thread
    let again = Store::open(&path).unwrap();
    assert_eq!(again.list_snapshots().unwrap().len(), 2000, "nothing lost");
}

/// Intents recorded by many threads at once each get their own row and id: no id twice, no
/// gap, every run's row found again, and ids were reserved durably once per batch.
#[test]
fn concurrent_intents_bind_reserved_ids_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let (threads, each) = (16, 64);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..each)
                    .map(|i| {
                        recorded(
                            store
                                .intend_snapshot(
                                    &format!("activate-{t}-{i}"),
                                    "web",
                                    web_base(&store),
                                    None,
                                    None,
                                    |id| format!("snap-{id}"),
                                )
                                .unwrap(),
                        )
                        .id
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut ids: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (1..=(threads * each) as u64).collect::<Vec<_>>(), "every id once, no gap");
    assert_eq!((threads * each) as u64 % crate::store::RESERVE_BATCH, 0);
    assert!(store.unbound_snapshot_ids().unwrap().is_empty(), "whole batches, all bound");
    assert_eq!(store.next_id("snap").unwrap(), (threads * each) as u64 + 1, "no id reserved twice");
    let again = recorded(
        store.intend_snapshot("activate-3-7", "web", web_base(&store), None, None, |_| unreachable!()).unwrap(),
    );
    assert_eq!(again.run_id, "activate-3-7");
}

#[test]
fn the_volume_place_is_recorded_once_and_moves_only_while_no_volume_depends_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let place = |backend: &str, location: &str| crate::volume::Place {
        backend: backend.into(),
        location: location.into(),
        filesystem: "btrfs 00000000000000aa".into(),
    };
    assert_eq!(store.volume_place().unwrap(), None);
    assert_eq!(store.bind_volumes(&place("btrfs", "/mnt/vol")).unwrap(), Binding::First);
    assert_eq!(store.bind_volumes(&place("btrfs", "/mnt/vol")).unwrap(), Binding::Same);
    // Nothing depends on the record yet: it follows the settings.
    assert_eq!(
        store.bind_volumes(&place("dir", "/srv/state/volumes")).unwrap(),
        Binding::Moved { from: place("btrfs", "/mnt/vol") }
    );
    store.upsert_image("web", "local").unwrap();
    store.intend_base("web", "sha256:v1", &[]).unwrap();
    let refused = store.bind_volumes(&place("btrfs", "/mnt/vol")).unwrap();
    assert_eq!(refused, Binding::Differs { recorded: place("dir", "/srv/state/volumes"), bases: 1, live_snapshots: 0 });
    assert_eq!(store.volume_place().unwrap(), Some(place("dir", "/srv/state/volumes")), "a refusal changes nothing");
}

/// A flat family's layer files are hashed once: a listing finds each file's digest
/// remembered by its identity (proven by planting another digest: the listing returns it
/// without reading the file), a file is remembered only once settled, a file rewritten in
/// place with its size and mtime kept is hashed again (its ctime moved), and garbage
/// collection forgets the rows of files that are gone.
#[test]
fn a_flat_layer_files_digest_is_remembered_until_the_file_changes() {
    use crate::image::{BlobSource, Digest, LocalDir};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let family = dir.path().join("src/images/web");
    std::fs::create_dir_all(&family).unwrap();
    let (a, b) = (family.join("01-a.tar"), family.join("02-b.tar"));
    std::fs::write(&a, b"layer a").unwrap();
    std::fs::write(&b, b"layer b").unwrap();
    let source = LocalDir::new(dir.path().join("src")).with_memo(store.clone());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let digests = || -> Vec<Digest> {
        rt.block_on(source.manifest("web")).unwrap().layers.into_iter().map(|l| l.digest).collect()
    };
    let remembered =
        || -> i64 { store.with_conn(|c| c.query_row("SELECT COUNT(*) FROM file_digests", [], |r| r.get(0))).unwrap() };
    assert_eq!(digests(), [Digest::of_bytes(b"layer a"), Digest::of_bytes(b"layer b")]);
    assert_eq!(remembered(), 0, "files changed within the last second are not remembered yet");
    // The files settle: the listing runs once the clock is past their ctime by SETTLE.
    let settled_at = std::time::Instant::now() + crate::image::DIGEST_MEMO_SETTLE + Duration::from_millis(50);
    while std::time::Instant::now() < settled_at {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(digests(), [Digest::of_bytes(b"layer a"), Digest::of_bytes(b"layer b")]);
    assert_eq!(remembered(), 2);

    let planted = Digest::of_bytes(b"not read from the file");
    let plant = |path: &std::path::Path| {
        store
            .with_conn(|c| {
                c.execute(
                    "UPDATE file_digests SET digest = ?2 WHERE path = ?1",
                    rusqlite::params![path.to_str().unwrap(), planted.as_str()],
                )
            })
            .unwrap()
    };
    assert_eq!(plant(&a), 1);
    assert_eq!(digests()[0], planted, "the remembered digest is used: the file is not read");

    // Rewritten in place: same size, mtime set back. The ctime moves, so it is hashed again.
    let mtime = filetime::FileTime::from_last_modification_time(&std::fs::metadata(&a).unwrap());
    std::fs::write(&a, b"layer A").unwrap();
    filetime::set_file_mtime(&a, mtime).unwrap();
    assert_eq!(digests()[0], Digest::of_bytes(b"layer A"), "a changed file is hashed again");
    assert_eq!(digests()[0], Digest::of_bytes(b"layer A"), "and not remembered before it settles");

    assert_eq!(store.forget_file_digests().unwrap(), 1, "the row of the changed file is forgotten");
    assert_eq!(store.forget_file_digests().unwrap(), 0, "the other file is there as remembered");
    std::fs::remove_file(&b).unwrap();
    assert_eq!(store.forget_file_digests().unwrap(), 1, "the row of a file that is gone is forgotten");
}
