//! The run log on a disk that fills: a start that cannot be committed fails with the
//! storage's kind (`StorageError::NoSpace`, retryable, not the caller's mistake), the engine
//! says why it refuses writes, and once space is freed and the log opened again the same
//! start succeeds. Real tmpfs; needs root (CI runs as root).

use thinpipe::fsm::{Engine, EngineConfig, Outcome, StartError, StepRequest, StorageError, Workflow};

/// Its start is committed before `start` returns, so a full disk answers the start itself.
fn echo() -> Workflow<String, usize> {
    Workflow::new("echo", 1)
        .step("measure", |req: StepRequest<String, usize>| async move { Ok(req.r.len()) })
        .with_durable_start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_run_log_is_reported_as_no_space_and_heals_after_a_reopen() {
    let Some(disk) = thinpipe_tests::SmallTmpfs::new(8) else { return };
    let path = disk.mount.join("runs.redb");
    let engine = Engine::open(&path, EngineConfig::default()).await.unwrap();
    let wf = engine.register(echo()).unwrap();
    assert!(matches!(wf.run("small", &"x".to_owned(), &0).await.unwrap(), Outcome::Completed(1)));

    // Fill what is left, then start a run whose input needs the log to grow.
    let ballast = disk.mount.join("ballast");
    let room = free_bytes(&disk.mount);
    if let Err(e) = std::fs::write(&ballast, vec![0u8; room as usize]) {
        // tmpfs may keep a few pages back: what was written stays and fills the disk.
        eprintln!("ballast stopped short: {e}");
    }
    let big = "y".repeat(2 << 20);
    let Err(err) = wf.start("big", &big, &0).await else { panic!("a 2 MiB input committed on a full disk") };
    let StartError::Storage(kind) = &err else { panic!("expected a storage error, got {err:?}") };
    assert!(matches!(kind, StorageError::NoSpace(_)), "the kind is kept: {kind:?}");
    assert!(err.is_retryable() && !err.is_callers_mistake(), "{err}");
    assert!(err.to_string().contains("full"), "the message says the disk is full: {err}");
    assert!(
        matches!(engine.storage_fault(), Some(StorageError::NoSpace(_))),
        "the engine refuses writes and says why: {:?}",
        engine.storage_fault()
    );
    engine.shutdown().await;
    drop((wf, engine));

    // Space freed and the log opened again: the same start succeeds; the earlier run is kept.
    std::fs::remove_file(&ballast).unwrap();
    let engine = Engine::open(&path, EngineConfig::default()).await.unwrap();
    let wf = engine.register(echo()).unwrap();
    assert!(matches!(wf.run("big", &big, &0).await.unwrap(), Outcome::Completed(n) if n == 2 << 20));
    assert!(matches!(wf.run("small", &"x".to_owned(), &0).await.unwrap(), Outcome::Completed(1)));
    engine.shutdown().await;
}

/// Bytes free on the filesystem at `dir`.
fn free_bytes(dir: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs {}", dir.display());
    s.f_bavail * s.f_frsize
}
