//! A model-based test of the engine on a storage backend that fails: random operations
//! (start, wait, cancel, restart) against the engine, with write and sync failures injected
//! into the redb file underneath, checked against a model of what the engine may report.
//! Whatever fails, the engine never reports an outcome the model would not: a completed run
//! has the right response, a failed one failed for a reason it was given, an outcome once
//! reported never changes, and after a restart on healthy storage every run that reported an
//! outcome still has it and every other run either finishes right or was never recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::*;

/// The redb file in memory. `fail_in`: how many more writes and syncs succeed before they
/// all fail (negative: none fails); the bytes written stay, as on a disk after a crash.
#[derive(Clone, Debug, Default)]
struct FailingDisk {
    bytes: Arc<RwLock<Vec<u8>>>,
    fail_in: Arc<AtomicI64>,
    failures: Arc<AtomicU64>,
}

impl FailingDisk {
    fn new() -> Self {
        let disk = FailingDisk::default();
        disk.heal();
        disk
    }

    fn heal(&self) {
        self.fail_in.store(-1, Ordering::SeqCst);
    }

    fn fail_after(&self, n: i64) {
        self.fail_in.store(n, Ordering::SeqCst);
    }

    /// Counts one write or sync; `Err` once the countdown has run out.
    fn io(&self) -> std::io::Result<()> {
        let left = self.fail_in.load(Ordering::SeqCst);
        if left < 0 {
            return Ok(());
        }
        if left == 0 {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::other("injected storage failure"));
        }
        self.fail_in.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

impl redb::StorageBackend for FailingDisk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        let end = start + out.len();
        if end > bytes.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end"));
        }
        out.copy_from_slice(&bytes[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.io()?;
        self.bytes.write().unwrap_or_else(|p| p.into_inner()).resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.io()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.io()?;
        let mut bytes = self.bytes.write().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        if bytes.len() < start + data.len() {
            bytes.resize(start + data.len(), 0);
        }
        bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// A run's input: its number, and the step that aborts (if any).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Input {
    n: u64,
    abort_at: Option<usize>,
}

const STEPS: [&str; 3] = ["s0", "s1", "s2"];

/// Step i adds 10^i to the response: a completed run's response is `n + 111`.
fn workflow() -> Workflow<Input, u64> {
    let mut wf = Workflow::new("model", 1).default_policy(RetryPolicy {
        initial_interval: Duration::from_millis(1),
        max_interval: Duration::from_millis(5),
        max_attempts: 3,
        ..RetryPolicy::default()
    });
    for (i, name) in STEPS.iter().enumerate() {
        wf = wf.step(name, move |req: StepRequest<Input, u64>| async move {
            if req.r.abort_at == Some(i) {
                return Err(StepError::abort_with("told_to", format!("input aborts at {name}")));
            }
            Ok(req.w + 10u64.pow(i as u32))
        });
    }
    wf
}

/// What the test may see of one run id; each id always gets the same input.
#[derive(Debug, Default)]
struct Expect {
    /// The first terminal outcome the engine reported: it may never change.
    outcome: Option<Outcome<u64>>,
    /// A cancel of it succeeded, or failed on the storage: a commit that reports a storage
    /// failure may still be on the disk (its last write landed, its sync did not), so after
    /// a restart the run may be cancelled.
    cancelled: bool,
}

fn input_of(id: usize) -> Input {
    Input { n: id as u64 * 1000, abort_at: (id % 3 == 2).then_some(id % STEPS.len()) }
}

/// Checks `outcome` of run `id` against the model, and records it.
fn check(id: usize, outcome: Outcome<u64>, model: &mut BTreeMap<usize, Expect>, trace: &[String]) {
    let input = input_of(id);
    let expect = model.entry(id).or_default();
    match &outcome {
        Outcome::Completed(w) => {
            assert!(input.abort_at.is_none(), "run {id} completed though its input aborts: {trace:?}");
            assert_eq!(*w, input.n + 111, "run {id} completed with a wrong response: {trace:?}");
        }
        Outcome::Failed(f) => match f.kind {
            FailureKind::Aborted => {
                let at =
                    input.abort_at.unwrap_or_else(|| panic!("run {id} aborted without being told to: {f:?} {trace:?}"));
                assert_eq!(f.step, STEPS[at], "{trace:?}");
                assert_eq!(f.code.as_deref(), Some("told_to"), "the abort's code is kept: {trace:?}");
            }
            FailureKind::Cancelled => assert!(expect.cancelled, "run {id} cancelled by no one: {f:?} {trace:?}"),
            other => panic!("run {id} failed {other:?}, which nothing here causes: {f:?} {trace:?}"),
        },
    }
    match &expect.outcome {
        Some(first) => assert_eq!(first, &outcome, "run {id}'s outcome changed: {trace:?}"),
        None => expect.outcome = Some(outcome),
    }
}

struct Harness {
    disk: FailingDisk,
    engine: Engine,
    handle: WorkflowHandle<Input, u64>,
}

impl Harness {
    async fn open(disk: FailingDisk) -> Harness {
        let db = redb::Builder::new().create_with_backend(disk.clone()).expect("open the run log");
        let config = EngineConfig { retention: Duration::from_secs(3600), prune_interval: None };
        let engine = Engine::on_database(db, "memory".into(), config).expect("engine");
        let handle = engine.register(workflow()).expect("register");
        Harness { disk, engine, handle }
    }

    /// Stops the engine, heals the storage and opens it again: a restart after the failure.
    async fn restart(self) -> Harness {
        self.engine.shutdown().await;
        let disk = self.disk.clone();
        drop(self);
        disk.heal();
        let h = Harness::open(disk).await;
        h.engine.resume_all().await.expect("resume after a restart on healthy storage");
        h
    }
}

async fn run_seed(seed: u64) -> (u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model: BTreeMap<usize, Expect> = BTreeMap::new();
    let mut trace = Vec::new();
    let mut interrupted = 0;
    let mut h = Harness::open(FailingDisk::new()).await;
    for _ in 0..40 {
        let id = rng.random_range(0..6usize);
        let run = format!("run-{id}");
        match rng.random_range(0..10u32) {
            0..=3 => {
                trace.push(format!("start {id}"));
                match h.handle.start(&run, &input_of(id), &input_of(id).n).await {
                    Ok(StartOutcome::Finished(o)) => check(id, o, &mut model, &trace),
                    Ok(StartOutcome::Started | StartOutcome::AlreadyRunning) => {}
                    Err(e) => {
                        assert!(e.is_retryable(), "start {id}: {e} is not a storage failure: {trace:?}");
                        interrupted += 1;
                    }
                }
            }
            4..=6 => {
                trace.push(format!("wait {id}"));
                match tokio::time::timeout(Duration::from_secs(10), h.handle.wait(&run)).await {
                    Ok(Ok(o)) => check(id, o, &mut model, &trace),
                    Ok(Err(WaitError::NotFound(_))) => {
                        let seen = model.get(&id).and_then(|e| e.outcome.as_ref());
                        assert!(seen.is_none(), "run {id} reported {seen:?} before and is now unknown: {trace:?}");
                    }
                    Ok(Err(e)) => {
                        assert!(e.is_retryable(), "wait {id}: {e}: {trace:?}");
                        interrupted += 1;
                    }
                    Err(_) => panic!("wait {id} hung: {trace:?}"),
                }
            }
            7 => {
                trace.push(format!("cancel {id}"));
                match h.engine.cancel(&run, "the model cancels").await {
                    Ok(()) => model.entry(id).or_default().cancelled = true,
                    Err(CancelError::NotFound(_) | CancelError::NotActive { .. }) => {}
                    Err(e) => {
                        assert!(matches!(e, CancelError::Storage(_) | CancelError::ShutDown), "{e}: {trace:?}");
                        if matches!(e, CancelError::Storage(_)) {
                            model.entry(id).or_default().cancelled = true;
                        }
                        interrupted += 1;
                    }
                }
            }
            8 => {
                let after = rng.random_range(0..12i64);
                trace.push(format!("storage fails after {after} writes"));
                h.disk.fail_after(after);
            }
            _ => {
                trace.push("restart".into());
                h = h.restart().await;
            }
        }
    }
    // A last restart on healthy storage: every run finishes, right, or was never recorded.
    trace.push("final restart".into());
    h = h.restart().await;
    for id in 0..6 {
        match tokio::time::timeout(Duration::from_secs(10), h.handle.wait(&format!("run-{id}"))).await {
            Ok(Ok(o)) => check(id, o, &mut model, &trace),
            Ok(Err(WaitError::NotFound(_))) => {
                let seen = model.get(&id).and_then(|e| e.outcome.as_ref());
                assert!(seen.is_none(), "run {id} reported {seen:?} and was lost: {trace:?}");
            }
            Ok(Err(e)) => panic!("run {id} after the final restart: {e}: {trace:?}"),
            Err(_) => panic!("run {id} never finished after the final restart: {trace:?}"),
        }
    }
    h.engine.shutdown().await;
    (h.disk.failures.load(Ordering::SeqCst), interrupted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_never_reports_what_the_model_forbids_when_storage_fails() {
    let (mut failures, mut interrupted) = (0, 0);
    for seed in 0..64 {
        let (f, i) = run_seed(seed).await;
        failures += f;
        interrupted += i;
    }
    eprintln!("{failures} storage failures injected; callers saw {interrupted} interrupted or failed calls");
    // The injected failures happened and reached callers: the commit-failure path ran.
    assert!(failures > 0, "no storage failure was injected");
    assert!(interrupted > 0, "no caller saw a storage failure");
}
