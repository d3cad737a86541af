//! The workflows in one process on the `dir` backend and the sample family (fast; the real
//! worker process, queue and crashes are in `tests/`).

use std::sync::Arc;

use super::*;
use crate::fsm::{EngineConfig, FailureKind};
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
    };
    let pipeline = Pipeline::register(&engine, ctx).unwrap();
    Env { _dir: dir, engine, pipeline }
}

#[tokio::test]
async fn prepare_activate_release() {
    let env = env().await;
    let p = &env.pipeline;
    let prep = match p.prepare("web").await.unwrap() {
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
        let Outcome::Completed(act) = p.activate("web", inv, base).await.unwrap() else { panic!("activate failed") };
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
    let Outcome::Completed(again) = p.activate("web", "a", base).await.unwrap() else { panic!() };
    assert_eq!(std::path::PathBuf::from(again.path.unwrap()), paths[0]);
    let snaps: Vec<_> = backend.list().unwrap().into_iter().filter(|v| matches!(v, VolumeId::Snap(_))).collect();
    assert_eq!(snaps.len(), 2);

    let Outcome::Completed(rel) = p.release("a").await.unwrap() else { panic!("release failed") };
    assert!(!backend.exists(VolumeId::Snap(rel.snapshot_id.unwrap())).unwrap());
    assert!(paths[1].exists(), "only that one snapshot");
    assert!(matches!(p.release("a").await.unwrap(), Outcome::Completed(_)), "release is idempotent");
    match p.release("never").await.unwrap() {
        Outcome::Failed(f) => assert!(f.kind == FailureKind::Aborted && f.error.contains("never"), "{f:?}"),
        other => panic!("{other:?}"),
    }
    env.engine.shutdown().await;
}

#[tokio::test]
async fn an_unknown_family_or_a_corrupt_layer_fails_and_seals_nothing() {
    let env = env().await;
    let p = &env.pipeline;
    match p.prepare("nope").await.unwrap() {
        Outcome::Failed(f) => assert!(f.step == "fetch_manifest" && f.error.contains("nope"), "{f:?}"),
        other => panic!("{other:?}"),
    }
    // Corrupt a layer after the manifest is resolved: the digest no longer matches.
    let dir = env._dir.path().join("images-src/images/bad");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001.tar"), b"this is not a tar archive at all, it is text").unwrap();
    match p.prepare("bad").await.unwrap() {
        Outcome::Failed(f) => {
            assert_eq!(f.step, "unpack_into_base", "{f:?}");
            assert!(f.error.contains("0001.tar"), "names the blob: {}", f.error);
        }
        other => panic!("{other:?}"),
    }
    let row = p.context().store.image("bad").unwrap().unwrap();
    let base = row.base_vol_id.unwrap();
    assert!(!p.context().backend.is_sealed(base).unwrap(), "a half-built base is never sealed");
    assert!(!row.prepared);
    env.engine.shutdown().await;
}
