//! The workflows in one process on the `dir` backend and the sample family (fast; the real
//! worker process, queue and crashes are in `tests/`).

use std::sync::Arc;

use super::*;
use crate::fsm::EngineConfig;
use crate::image::write_sample_family;
use crate::volume::{DirBackend, VolumeId};

struct Env {
    _dir: tempfile::TempDir,
    engine: Engine,
    pipeline: Pipeline,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images-src");
    write_sample_family(&images, "web").unwrap();
    let engine =
        Engine::open(dir.path().join("runs.redb"), EngineConfig { prune_interval: None, ..Default::default() })
            .await
            .unwrap();
    let ctx = PipelineContext {
        store: Arc::new(Store::open(dir.path().join("host.db")).unwrap()),
        backend: Arc::new(DirBackend::open(dir.path().join("volumes")).unwrap()),
        cache: BlobCache::open(dir.path().join("blobs")).unwrap(),
        source: Arc::new(crate::image::LocalDir::new(&images)),
        apply: ApplyOptions::default(),
        prepare: Default::default(),
        invocations: Default::default(),
        host_id: None,
        progress: Default::default(),
    };
    let pipeline = Pipeline::register(&engine, ctx).unwrap();
    Env { _dir: dir, engine, pipeline }
}

/// Prepares the source's current version of `family`.
async fn prepare(p: &Pipeline, family: &str) -> Outcome<PrepareState> {
    let manifest = p.context().source.manifest(family).await.unwrap();
    p.prepare(&manifest).await.unwrap()
}

#[tokio::test]
async fn prepare_activate_release() {
    let env = env().await;
    let p = &env.pipeline;
    let prep = match prepare(p, "web").await {
        Outcome::Completed(w) => w,
        Outcome::Failed(f) => panic!("prepare failed: {f}"),
    };
    let base = prep.base_vol_id.unwrap();
    assert_eq!(prep.manifest.as_ref().unwrap().layers.len(), 3);
    assert!(prep.downloaded_bytes > 0);
    let backend = &p.context().backend;
    assert!(backend.is_sealed(base).unwrap());

    let mut paths = Vec::new();
    for inv in ["a", "b"] {
        let Outcome::Completed(act) = p.activate("web", inv, base, None).await.unwrap() else {
            panic!("activate failed")
        };
        paths.push(std::path::PathBuf::from(act.path.unwrap()));
    }
    assert_ne!(paths[0], paths[1]);
    let root = &paths[0];
    assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "welcome to the updated image\n");
    assert!(!root.join("etc/os-release").exists(), "whiteout applied");
    assert!(root.join("etc/release").exists());
    assert_eq!(std::fs::read_to_string(root.join("bin/hello")).unwrap(), "#!/bin/sh\necho hello from thinpipe\n");
    assert!(root.join("usr/bin/hi").exists(), "hardlink");
    let cache: Vec<_> = std::fs::read_dir(root.join("var/cache")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(cache, ["fresh"], "opaque directory");

    // The same invocation again: the stored outcome, no second snapshot.
    let Outcome::Completed(again) = p.activate("web", "a", base, None).await.unwrap() else { panic!() };
    assert_eq!(std::path::PathBuf::from(again.path.unwrap()), paths[0]);
    let snaps: Vec<_> = backend.list().unwrap().into_iter().filter(|v| matches!(v, VolumeId::Snap(_))).collect();
    assert_eq!(snaps.len(), 2);

    let rel = p.release("web", "a").await.unwrap();
    let Outcome::Completed(rel_w) = &rel.outcome else { panic!("release failed") };
    assert_eq!(rel.detail(), None, "a plain release");
    assert!(!backend.exists(VolumeId::Snap(rel_w.snapshot_id.unwrap())).unwrap());
    assert!(paths[1].exists(), "only that one snapshot");
    let again = p.release("web", "a").await.unwrap();
    assert!(matches!(again.outcome, Outcome::Completed(_)), "release is idempotent");
    assert!(again.detail().unwrap().contains("invocation a was already released at 20"), "{:?}", again.detail());
    // Activating a released invocation fails, naming the release; it never answers the old path.
    match p.activate("web", "a", base, None).await.unwrap() {
        Outcome::Failed(f) => assert!(f.error.contains("invocation a was released at"), "{f:?}"),
        other => panic!("{other:?}"),
    }
    // A release with no activation leaves a tombstone: the later activation is refused.
    let never = p.release("web", "never").await.unwrap();
    assert!(matches!(never.outcome, Outcome::Completed(_)), "{:?}", never.outcome);
    assert!(never.detail().unwrap().contains("had no snapshot"), "{:?}", never.detail());
    match p.activate("web", "never", base, None).await.unwrap() {
        Outcome::Failed(f) => {
            assert!(
                f.error.contains("invocation never was released at") && f.error.contains("new invocation id"),
                "{f:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    let snaps: Vec<_> = backend.list().unwrap().into_iter().filter(|v| matches!(v, VolumeId::Snap(_))).collect();
    assert_eq!(snaps.len(), 1, "only b's snapshot is left");
    env.engine.shutdown().await;
}

#[tokio::test]
async fn an_unknown_family_or_a_corrupt_layer_fails_and_seals_nothing() {
    let env = env().await;
    let p = &env.pipeline;
    let unknown = p.context().source.manifest("nope").await.unwrap_err();
    assert!(matches!(unknown, ImageError::FamilyNotFound { .. }) && unknown.to_string().contains("nope"), "{unknown}");
    // A family whose one layer is not an archive: its digest is right (the family is listed
    // from these files), so the download succeeds and unpacking fails.
    let dir = env._dir.path().join("images-src/images/bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001.tar"), b"this is not a tar archive at all, it is text").unwrap();
    match prepare(p, "bad").await {
        Outcome::Failed(f) => {
            assert_eq!(f.step, "stream_into_base", "{f:?}");
            assert!(f.error.contains("0001.tar"), "names the blob: {}", f.error);
        }
        other => panic!("{other:?}"),
    }
    let bases = p.context().store.list_bases().unwrap();
    let [row] = bases.as_slice() else { panic!("{bases:?}") };
    assert_eq!((row.family.as_str(), row.state), ("bad", crate::store::BaseState::Preparing));
    assert!(!p.context().backend.is_sealed(row.id).unwrap(), "a half-built base is never sealed");
    assert_eq!(p.context().store.image("bad").unwrap().unwrap().current_base, None);
    env.engine.shutdown().await;
}

/// A new version gets its own run and base; the old one keeps serving its snapshot, and once
/// that is released, `retire` deletes the old base and its record.
#[tokio::test]
async fn a_new_version_gets_its_own_base_and_the_old_one_can_be_retired() {
    let env = env().await;
    let p = &env.pipeline;
    let Outcome::Completed(v1) = prepare(p, "web").await else { panic!("prepare v1 failed") };
    let base1 = v1.base_vol_id.unwrap();
    let Outcome::Completed(old) = p.activate("web", "old", base1, None).await.unwrap() else { panic!() };
    let digest1 = v1.manifest.unwrap().digest;
    assert_eq!(old.digest.as_deref(), Some(digest1.as_str()));
    // v2: one more layer.
    let layer = env._dir.path().join("images-src/images/web/9999-v2.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "etc/version", &b"v2\n"[..]).unwrap();
    std::fs::write(&layer, b.into_inner().unwrap()).unwrap();
    let v2 = match prepare(p, "web").await {
        Outcome::Completed(w) => w,
        Outcome::Failed(f) => panic!("prepare v2 failed: {f}"),
    };
    let base2 = v2.base_vol_id.unwrap();
    assert_ne!(base1, base2, "a new version gets a new base");
    let runs = env.engine.list_runs(&Default::default()).unwrap();
    assert_eq!(runs.iter().filter(|r| r.id.starts_with("prepare-web@")).count(), 2, "one run per version");
    let Outcome::Completed(new) = p.activate("web", "new", base2, None).await.unwrap() else { panic!() };
    assert_eq!(std::fs::read_to_string(std::path::Path::new(&new.path.unwrap()).join("etc/version")).unwrap(), "v2\n");
    assert!(!std::path::Path::new(&old.path.clone().unwrap()).join("etc/version").exists(), "v1 untouched");

    let store = &p.context().store;
    store.make_current("web", base2).unwrap();
    assert!(matches!(store.retire_base(base1, 0, |_| None).unwrap(), crate::store::Retire::Kept(_)), "a live snapshot");
    p.release("web", "old").await.unwrap();
    let crate::store::Retire::Marked(row) = store.retire_base(base1, 0, |_| None).unwrap() else { panic!() };
    assert!(matches!(p.retire(&row).await.unwrap(), Outcome::Completed(_)));
    assert!(!p.context().backend.exists(VolumeId::Base(base1)).unwrap());
    assert!(store.base(base1).unwrap().is_none());
    assert!(p.context().backend.exists(VolumeId::Base(base2)).unwrap());
    env.engine.shutdown().await;
}

/// A release that arrives while its activation's step is in flight wins: the activation fails
/// with "released", the release deletes the snapshot, and nothing is left on disk.
#[tokio::test]
async fn a_release_during_an_activation_wins() {
    let env = env().await;
    let p = env.pipeline.clone();
    let Outcome::Completed(prep) = prepare(&p, "web").await else { panic!("prepare failed") };
    let base = prep.base_vol_id.unwrap();
    for round in 0..20 {
        let inv = format!("race-{round}");
        // The release is recorded while the activation holds (or is about to take) the lock.
        let held = p.context().invocations.lock(&inv).await;
        let activation = {
            let (p, inv) = (p.clone(), inv.clone());
            tokio::spawn(async move { p.activate("web", &inv, base, None).await.unwrap() })
        };
        let release = {
            let (p, inv) = (p.clone(), inv.clone());
            tokio::spawn(async move { p.release("web", &inv).await.unwrap() })
        };
        // Even rounds: the release is recorded before the activation's step gets the lock.
        // Odd rounds: the two race freely.
        let recorded_first = round % 2 == 0;
        if recorded_first {
            let store = p.context().store.clone();
            let run = format!("activate-{inv}");
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while !store.snapshot_by_run(&run).unwrap().is_some_and(|r| r.state.is_released()) {
                assert!(tokio::time::Instant::now() < deadline, "round {round}: the release was never recorded");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        drop(held);
        let (activated, released) = (activation.await.unwrap(), release.await.unwrap());
        assert!(matches!(released.outcome, Outcome::Completed(_)), "round {round}: {:?}", released.outcome);
        let row = p.context().store.snapshot_by_run(&format!("activate-{inv}")).unwrap().unwrap();
        assert_eq!(row.state, crate::store::SnapshotState::Released, "round {round}");
        assert!(!p.context().backend.exists(VolumeId::Snap(row.id)).unwrap(), "round {round}: nothing left on disk");
        match activated {
            Outcome::Failed(f) => assert!(f.error.contains("was released at"), "round {round}: {f:?}"),
            Outcome::Completed(w) if recorded_first => {
                panic!("round {round}: the activation answered a path after its release: {w:?}")
            }
            Outcome::Completed(_) => {} // it finished before the release was recorded
        }
    }
    env.engine.shutdown().await;
}

/// A run named `prepare-<family>` by the release before versions (no manifest in its input)
/// still runs: it resolves the family itself, and the version it prepared is the one a
/// versioned prepare then finds, with no second base.
#[tokio::test]
async fn a_prepare_run_from_before_versions_still_completes_and_its_base_is_found() {
    let env = env().await;
    let p = &env.pipeline;
    let legacy = PrepareInput { family: "web".into(), manifest: None };
    let Outcome::Completed(old) = p.prepare.run("prepare-web", &legacy, &PrepareState::default()).await.unwrap() else {
        panic!("the legacy run failed")
    };
    let base = old.base_vol_id.unwrap();
    let Outcome::Completed(new) = prepare(p, "web").await else { panic!("the versioned prepare failed") };
    assert_eq!(new.base_vol_id, Some(base), "the same version's base, found by its digest");
    assert_eq!(p.context().store.next_id("base").unwrap(), 2, "no second base was allocated");
    env.engine.shutdown().await;
}

/// A power loss can take an activation's binding of its reserved id (a write that waits for
/// no fsync) while its snapshot, and even its run's commit, reached the disk. At start-up the
/// completed activation gets its row back; a volume nothing holds is deleted, so the next
/// activation bound to that id gets a fresh snapshot, not another invocation's.
#[tokio::test]
async fn a_binding_lost_to_a_power_loss_is_resolved_before_the_id_is_bound_again() {
    let env = env().await;
    let p = &env.pipeline;
    let Outcome::Completed(prep) = prepare(p, "web").await else { panic!("prepare failed") };
    let base = prep.base_vol_id.unwrap();
    let Outcome::Completed(a) = p.activate("web", "a", base, None).await.unwrap() else { panic!("activate a") };
    let a_id = a.snapshot_id.unwrap();
    let (store, backend) = (p.context().store.clone(), p.context().backend.clone());
    // What a power loss leaves: `a`'s row gone and its id back among the reserved ones; and a
    // reserved id with a volume whose activation never committed (written into, as an
    // invocation would).
    store
        .with_conn(|c| {
            c.execute("DELETE FROM snapshots WHERE id = ?1", [a_id as i64])?;
            c.execute("INSERT INTO snapshot_ids (id) VALUES (?1)", [a_id as i64])
        })
        .unwrap();
    let stale = *store.unbound_snapshot_ids().unwrap().iter().find(|id| **id != a_id).unwrap();
    backend.snapshot(base, stale).unwrap();
    std::fs::write(backend.expose(stale).unwrap().join("written-by-another-invocation"), b"x").unwrap();

    let resolved = p.resolve_reserved_ids().await.unwrap();
    assert_eq!(resolved.restored, [VolumeId::Snap(a_id).to_string()]);
    assert_eq!(resolved.deleted, [VolumeId::Snap(stale).to_string()]);
    let row = store.snapshot_by_run("activate-a").unwrap().unwrap();
    assert_eq!((row.id, row.state, row.path.as_deref()), (a_id, SnapshotState::Exposed, a.path.as_deref()));
    assert!(!backend.exists(VolumeId::Snap(stale)).unwrap());
    assert_eq!(p.resolve_reserved_ids().await.unwrap(), Resolved::default(), "nothing left to resolve");

    // The next activation binds the smallest reserved id: the stale one, now clean.
    let Outcome::Completed(c) = p.activate("web", "c", base, None).await.unwrap() else { panic!("activate c") };
    assert_eq!(c.snapshot_id, Some(stale));
    let path = std::path::PathBuf::from(c.path.unwrap());
    assert!(path.join("etc/motd").exists() && !path.join("written-by-another-invocation").exists());
    let report = crate::reconcile::reconcile(&store, backend.as_ref(), false).unwrap();
    assert!(report.is_clean() && report.missing.is_empty(), "{report:?}");
}
