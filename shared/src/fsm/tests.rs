//! Engine tests in one process: the guarantees of `fsm/DESIGN.md` that do not need a
//! real crash (those are in `tests/tests/engine/fsm_crash.rs`). A shutdown followed by a reopen
//! stands in for a restart here; the run log is the same file.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::*;

fn config() -> EngineConfig {
    EngineConfig { retention: Duration::from_secs(3600), prune_interval: None }
}

async fn open(dir: &tempfile::TempDir) -> Engine {
    Engine::open(dir.path().join("runs.redb"), config()).await.expect("open engine")
}

fn quick(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(100),
        multiplier: 2.0,
        max_interval: Duration::from_secs(10),
        randomization_factor: 0.0,
        max_attempts,
        max_elapsed: Duration::from_secs(3600),
        attempt_timeout: Duration::from_secs(60),
    }
}

/// Each step appends `<workflow>:<step>` to the chain.
fn chain_workflow(name: &'static str) -> Workflow<String, Vec<String>> {
    let mut wf = Workflow::new(name, 1);
    for step in ["a", "b", "c"] {
        wf = wf.step(step, move |req: StepRequest<String, Vec<String>>| async move {
            let mut w = req.w;
            w.push(format!("{name}:{step}"));
            Ok(w)
        });
    }
    wf
}

/// A workflow whose second step waits until `gate` opens (or forever).
fn gated_workflow(name: &'static str, gate: Arc<tokio::sync::Semaphore>) -> Workflow<String, Vec<String>> {
    Workflow::new(name, 1)
        .step("first", move |req: StepRequest<String, Vec<String>>| async move {
            let mut w = req.w;
            w.push(format!("{name}:first"));
            Ok(w)
        })
        .step("gated", move |req: StepRequest<String, Vec<String>>| {
            let gate = gate.clone();
            async move {
                let _permit = gate.acquire().await.map_err(StepError::abort)?;
                let mut w = req.w;
                w.push(format!("{name}:gated:{}", req.r));
                Ok(w)
            }
        })
}

async fn wait_for_step(engine: &Engine, id: &str, step_index: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if engine.run_detail(id).expect("read").is_some_and(|d| d.summary.step_index >= step_index) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "run {id} never reached step {step_index}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn runs_thread_the_response_chain_and_record_history() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(chain_workflow("wf")).unwrap();
    let out = wf.run("r1", &"in".to_string(), &vec!["init".into()]).await.unwrap();
    assert_eq!(out, Outcome::Completed(vec!["init".into(), "wf:a".into(), "wf:b".into(), "wf:c".into()]));

    let detail = engine.run_detail("r1").unwrap().unwrap();
    assert_eq!(detail.summary.status, RunStatus::Completed);
    assert_eq!(detail.input, serde_json::json!("in"));
    assert_eq!(detail.responses.len(), 4, "initial response plus one per step");
    assert_eq!(detail.responses[0].response, serde_json::json!(["init"]));
    let kinds: Vec<_> = detail.events.iter().map(|e| serde_json::to_value(&e.kind).unwrap()["event"].clone()).collect();
    assert_eq!(kinds, ["started", "step_completed", "step_completed", "step_completed", "finished"]);

    // Starting a finished id returns its stored outcome; no step runs again.
    match wf.start("r1", &"in".to_string(), &vec![]).await.unwrap() {
        StartOutcome::Finished(Outcome::Completed(w)) => assert_eq!(w.len(), 4),
        other => panic!("expected the stored outcome, got {other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn wait_on_an_unknown_id_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(chain_workflow("wf")).unwrap();
    assert!(matches!(wf.wait("nope").await, Err(WaitError::NotFound(id)) if id == "nope"));
    engine.shutdown().await;
}

#[tokio::test]
async fn starting_an_active_id_returns_already_running() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let wf = engine.register(gated_workflow("g", gate.clone())).unwrap();
    assert_eq!(wf.start("x", &"1".into(), &vec![]).await.unwrap(), StartOutcome::Started);
    assert_eq!(wf.start("x", &"1".into(), &vec![]).await.unwrap(), StartOutcome::AlreadyRunning);
    // The same id for other work is the caller's mistake, never a silent success.
    match wf.start("x", &"2".into(), &vec![]).await {
        Err(e @ StartError::InputMismatch { .. }) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("another input"), "{e}");
        }
        other => panic!("expected InputMismatch, got {other:?}"),
    }
    gate.add_permits(1);
    let out = wf.wait("x").await.unwrap();
    assert_eq!(out, Outcome::Completed(vec!["g:first".into(), "g:gated:1".into()]), "the other starts changed nothing");
    // Finished, the same holds: same input returns the outcome, other input is refused.
    assert!(matches!(wf.start("x", &"1".into(), &vec![]).await.unwrap(), StartOutcome::Finished(_)));
    assert!(matches!(wf.start("x", &"3".into(), &vec![]).await, Err(StartError::InputMismatch { .. })));
    engine.shutdown().await;
}

/// superfly/fsm defect: the initial W was not saved, so a crash before the first step lost
/// it. With a durable start (the option), a restart before the first step resumes the run
/// with its initial response.
#[tokio::test]
async fn initial_response_survives_a_restart_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let never = Arc::new(tokio::sync::Semaphore::new(0));
    let wf = Workflow::<String, Vec<String>>::new("w", 1).with_durable_start().step("first", move |req| {
        let never = never.clone();
        async move {
            let _p = never.acquire().await.map_err(StepError::abort)?;
            Ok(req.w)
        }
    });
    let wf = engine.register(wf).unwrap();
    wf.start("r", &"in".into(), &vec!["initial".into()]).await.unwrap();
    engine.shutdown().await;
    drop((engine, wf));

    let engine = open(&dir).await;
    let wf = engine.register(chain_workflow("w").with_durable_start()).unwrap();
    let report = engine.resume_all().await.unwrap();
    assert_eq!(report.resumed, ["r"]);
    let out = wf.wait("r").await.unwrap();
    assert_eq!(out, Outcome::Completed(vec!["initial".into(), "w:a".into(), "w:b".into(), "w:c".into()]));
    engine.shutdown().await;
}

/// Guarantee 1 (the default): a run's start is committed with its first transition. Before
/// that nothing of it is on disk (a stop leaves nothing to resume; the caller starts it
/// again), while it is listed as active and can be waited on; the first commit holds the
/// start, the initial response and the first step together.
#[tokio::test]
async fn the_start_is_committed_with_the_first_transition() {
    // Two steps; the first waits for the gate.
    fn first_gated(gate: Arc<tokio::sync::Semaphore>) -> Workflow<String, Vec<String>> {
        Workflow::new("g", 1)
            .step("first", move |req: StepRequest<String, Vec<String>>| {
                let gate = gate.clone();
                async move {
                    let _permit = gate.acquire().await.map_err(StepError::abort)?;
                    Ok([req.w, vec!["first".into()]].concat())
                }
            })
            .step("second", |req: StepRequest<String, Vec<String>>| async move {
                Ok([req.w, vec!["second".into()]].concat())
            })
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let wf = engine.register(first_gated(gate.clone())).unwrap();
    let commits = engine.commit_count();
    assert_eq!(wf.start("r", &"in".into(), &vec!["initial".into()]).await.unwrap(), StartOutcome::Started);
    assert_eq!(engine.commit_count(), commits, "nothing is written at start");
    assert!(engine.run_detail("r").unwrap().is_none(), "not in the run log before its first commit");
    let active = engine.list_runs(&RunFilter { status: Some(RunStatus::Active), ..Default::default() }).unwrap();
    assert_eq!(active.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r"], "listed while in flight");
    assert_eq!(wf.start("r", &"in".into(), &vec![]).await.unwrap(), StartOutcome::AlreadyRunning);
    assert!(matches!(wf.start("r", &"other".into(), &vec![]).await, Err(StartError::InputMismatch { .. })));
    // Stopped before its first commit: nothing to resume after a restart.
    engine.shutdown().await;
    drop((engine, wf));
    let engine = open(&dir).await;
    let wf = engine.register(first_gated(gate.clone())).unwrap();
    assert!(engine.resume_all().await.unwrap().resumed.is_empty());
    assert!(matches!(wf.wait("r").await, Err(WaitError::NotFound(_))));

    // Started again (a redelivered job): two steps, two commits, the first holding the start.
    let commits = engine.commit_count();
    gate.add_permits(1);
    let out = wf.run("r", &"in".into(), &vec!["initial".into()]).await.unwrap();
    assert_eq!(out, Outcome::Completed(vec!["initial".into(), "first".into(), "second".into()]));
    assert_eq!(engine.commit_count() - commits, 2, "one commit per transition, none for the start");
    let detail = engine.run_detail("r").unwrap().unwrap();
    let kinds: Vec<String> = detail.events.iter().map(|e| format!("{:?}", e.kind)).collect();
    assert!(kinds[0].starts_with("Started") && kinds[1].starts_with("StepCompleted"), "{kinds:?}");
    assert_eq!(detail.responses[0].response, serde_json::json!(["initial"]), "the initial response is stored");
    engine.shutdown().await;
}

/// superfly/fsm defect: resumed runs inherited other runs' completed steps. Two workflows
/// with the same input type, each with runs stopped mid-way, resume only their own runs.
#[tokio::test]
async fn workflows_sharing_an_input_type_never_resume_each_others_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let closed = Arc::new(tokio::sync::Semaphore::new(0));
    let a = engine.register(gated_workflow("alpha", closed.clone())).unwrap();
    let b = engine.register(gated_workflow("beta", closed.clone())).unwrap();
    for i in 0..3 {
        a.start(&format!("a{i}"), &format!("A{i}"), &vec![format!("a{i}")]).await.unwrap();
        b.start(&format!("b{i}"), &format!("B{i}"), &vec![format!("b{i}")]).await.unwrap();
    }
    for i in 0..3 {
        wait_for_step(&engine, &format!("a{i}"), 1).await;
        wait_for_step(&engine, &format!("b{i}"), 1).await;
    }
    engine.shutdown().await;
    drop((engine, a, b));

    let engine = open(&dir).await;
    let open_gate = Arc::new(tokio::sync::Semaphore::new(1000));
    let a = engine.register(gated_workflow("alpha", open_gate.clone())).unwrap();
    let b = engine.register(gated_workflow("beta", open_gate)).unwrap();
    let mut report = engine.resume_all().await.unwrap();
    report.resumed.sort();
    assert_eq!(report.resumed, ["a0", "a1", "a2", "b0", "b1", "b2"]);
    for i in 0..3 {
        let wa = a.wait(&format!("a{i}")).await.unwrap();
        assert_eq!(wa, Outcome::Completed(vec![format!("a{i}"), "alpha:first".into(), format!("alpha:gated:A{i}")]));
        let wb = b.wait(&format!("b{i}")).await.unwrap();
        assert_eq!(wb, Outcome::Completed(vec![format!("b{i}"), "beta:first".into(), format!("beta:gated:B{i}")]));
    }
    engine.shutdown().await;
}

/// superfly/fsm defect: `Wait` returned nil for failed runs after a restart.
#[tokio::test]
async fn a_failed_runs_wait_after_restart_returns_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = Workflow::<String, u32>::new("f", 1)
        .step("ok", |req| async move { Ok(req.w + 1) })
        .step("boom", |_req| async move { Err(StepError::abort("manifest is malformed")) });
    let wf = engine.register(wf).unwrap();
    let first = wf.run("r", &"x".into(), &0).await.unwrap();
    engine.shutdown().await;
    drop((engine, wf));

    let engine = open(&dir).await;
    let wf = engine
        .register(
            Workflow::<String, u32>::new("f", 1)
                .step("ok", |r| async move { Ok(r.w) })
                .step("boom", |r| async move { Ok(r.w) }),
        )
        .unwrap();
    engine.resume_all().await.unwrap();
    let after = wf.wait("r").await.unwrap();
    let expected = Outcome::Failed(Failure {
        step: "boom".into(),
        error: "manifest is malformed".into(),
        kind: FailureKind::Aborted,
        code: None,
    });
    assert_eq!(first, expected);
    assert_eq!(after, expected);
    engine.shutdown().await;
}

/// superfly/fsm defect: retries forever. The policy's attempt bound ends the run.
#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_policys_bound() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let wf = Workflow::<(), ()>::new("r", 1).step_with("flaky", quick(4), move |_req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Err(StepError::transient("connection reset")) }
    });
    let wf = engine.register(wf).unwrap();
    let out = wf.run("r", &(), &()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    match out {
        Outcome::Failed(f) => {
            assert_eq!(f.kind, FailureKind::RetriesExhausted);
            assert!(f.error.contains("connection reset") && f.error.contains("attempt 4 of 4"), "{}", f.error);
        }
        other => panic!("expected failure, got {other:?}"),
    }
    let failed_attempts = engine
        .run_detail("r")
        .unwrap()
        .unwrap()
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::AttemptFailed { .. }))
        .count();
    assert_eq!(failed_attempts, 4, "every failed attempt is in the history");
    let summary = engine.list_runs(&RunFilter::default()).unwrap().remove(0);
    assert_eq!(summary.attempts, 4, "the listing counts the attempts the history shows");
    engine.shutdown().await;
}

/// A run listing's attempts: every step's successful attempt plus the failed ones.
#[tokio::test(start_paused = true)]
async fn a_listing_counts_every_attempt_of_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let wf = Workflow::<(), ()>::new("two", 1)
        .step_with("flaky", quick(5), move |_req| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move { if n < 2 { Err(StepError::transient("not yet")) } else { Ok(()) } }
        })
        .step("then", |_req| async move { Ok(()) });
    let wf = engine.register(wf).unwrap();
    assert!(matches!(wf.run("r", &(), &()).await.unwrap(), Outcome::Completed(_)));
    let summary = engine.list_runs(&RunFilter::default()).unwrap().remove(0);
    assert_eq!(summary.attempts, 4, "two steps done, two failed attempts of the first");
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_elapsed_bound() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let policy = RetryPolicy { max_attempts: 1000, max_elapsed: Duration::from_millis(1000), ..quick(1000) };
    // Delays 100, 200, 400, 800: the elapsed bound (1 s) is passed after the fourth delay.
    let wf = Workflow::<(), ()>::new("r", 1).step_with("flaky", policy, move |_req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Err(StepError::transient("busy")) }
    });
    let wf = engine.register(wf).unwrap();
    let out = wf.run("r", &(), &()).await.unwrap();
    assert!(matches!(out, Outcome::Failed(ref f) if f.kind == FailureKind::RetriesExhausted), "{out:?}");
    let n = calls.load(Ordering::SeqCst);
    assert!((4..=5).contains(&n), "the elapsed bound stops retries after 4 or 5 attempts, got {n}");
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn abort_stops_after_one_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let wf = Workflow::<(), ()>::new("a", 1).step_with("no", quick(10), move |_req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Err(StepError::abort("no layers")) }
    });
    let wf = engine.register(wf).unwrap();
    let out = wf.run("r", &(), &()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        matches!(out, Outcome::Failed(ref f) if f.kind == FailureKind::Aborted && f.error == "no layers"),
        "{out:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn transient_errors_back_off_with_growing_delays() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let wf = Workflow::<(), u32>::new("t", 1).step_with("flaky", quick(10), move |req| {
        s.lock().unwrap().push((req.attempt, tokio::time::Instant::now()));
        async move { if req.attempt < 5 { Err(StepError::transient("not yet")) } else { Ok(req.attempt) } }
    });
    let wf = engine.register(wf).unwrap();
    assert_eq!(wf.run("r", &(), &0).await.unwrap(), Outcome::Completed(5));
    let seen = seen.lock().unwrap().clone();
    let attempts: Vec<u32> = seen.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, [1, 2, 3, 4, 5]);
    let delays: Vec<Duration> = seen.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert_eq!(delays, [100, 200, 400, 800].map(Duration::from_millis), "exponential, multiplier 2, no jitter");
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_caught_and_counted_as_a_failed_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = Workflow::<(), u32>::new("p", 1).step_with("sometimes_panics", quick(3), |req| async move {
        if req.attempt == 1 {
            panic!("bug in step");
        }
        Ok(req.attempt)
    });
    let wf = engine.register(wf).unwrap();
    assert_eq!(wf.run("r", &(), &0).await.unwrap(), Outcome::Completed(2));
    let detail = engine.run_detail("r").unwrap().unwrap();
    let panicked = detail.events.iter().any(|e| {
        matches!(&e.kind, EventKind::AttemptFailed { kind: AttemptErrorKind::Panic, error, attempt: 1, .. } if error.contains("bug in step"))
    });
    assert!(panicked, "history records the panic: {:?}", detail.events);
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_attempt_past_its_timeout_fails_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let policy = RetryPolicy { attempt_timeout: Duration::from_secs(5), ..quick(3) };
    let wf = Workflow::<(), u32>::new("t", 1).step_with("slow_once", policy, |req| async move {
        if req.attempt == 1 {
            std::future::pending::<()>().await;
        }
        Ok(req.attempt)
    });
    let wf = engine.register(wf).unwrap();
    assert_eq!(wf.run("r", &(), &0).await.unwrap(), Outcome::Completed(2));
    let detail = engine.run_detail("r").unwrap().unwrap();
    assert!(
        detail
            .events
            .iter()
            .any(|e| matches!(e.kind, EventKind::AttemptFailed { kind: AttemptErrorKind::Timeout, .. }))
    );
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_attempt_count_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = Workflow::<(), u32>::new("c", 1)
        .step_with("flaky", quick(3), |_req| async move { Err::<u32, _>(StepError::transient("down")) });
    let wf = engine.register(wf).unwrap();
    wf.start("r", &(), &0).await.unwrap();
    // Two failed attempts recorded, then the process stops during the backoff.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while engine.run_detail("r").unwrap().is_none_or(|d| d.summary.attempts < 2) {
        assert!(tokio::time::Instant::now() < deadline, "two attempts never recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.shutdown().await;
    drop((engine, wf));

    let engine = open(&dir).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let wf = engine
        .register(Workflow::<(), u32>::new("c", 1).step_with("flaky", quick(3), move |req| {
            s.lock().unwrap().push(req.attempt);
            async move { Err::<u32, _>(StepError::transient("still down")) }
        }))
        .unwrap();
    engine.resume_all().await.unwrap();
    let out = wf.wait("r").await.unwrap();
    assert_eq!(*seen.lock().unwrap(), [3], "only the third and last attempt runs after the restart");
    assert!(matches!(out, Outcome::Failed(ref f) if f.kind == FailureKind::RetriesExhausted), "{out:?}");
    engine.shutdown().await;
}

/// superfly/fsm defect: one undecodable run blocked the resume of all others.
#[tokio::test]
async fn an_undecodable_run_is_failed_with_a_reason_and_does_not_block_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let closed = Arc::new(tokio::sync::Semaphore::new(0));
    let wf = engine.register(gated_workflow("g", closed)).unwrap();
    for id in ["good1", "bad", "good2"] {
        wf.start(id, &id.to_string(), &vec![]).await.unwrap();
        wait_for_step(&engine, id, 1).await;
    }
    engine.shutdown().await;
    drop((engine, wf));
    {
        let db = redb::Database::create(dir.path().join("runs.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(schema::LOG)
            .unwrap()
            .insert(key::header_key("bad").as_slice(), b"{not json".as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    let engine = open(&dir).await;
    let wf = engine.register(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(100)))).unwrap();
    let mut report = engine.resume_all().await.unwrap();
    report.resumed.sort();
    assert_eq!(report.resumed, ["good1", "good2"]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, "bad");
    assert!(report.failed[0].1.contains("does not decode"), "{}", report.failed[0].1);
    for id in ["good1", "good2"] {
        assert!(matches!(wf.wait(id).await.unwrap(), Outcome::Completed(_)));
    }
    match wf.wait("bad").await.unwrap() {
        Outcome::Failed(f) => assert_eq!(f.kind, FailureKind::Corrupt),
        other => panic!("{other:?}"),
    }
    let history = engine.run_detail("bad").unwrap().unwrap();
    assert_eq!(history.summary.status, RunStatus::Failed);
    assert!(history.events.len() >= 3, "the earlier history is kept: {:?}", history.events);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_run_of_another_workflow_version_is_failed_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(0)))).unwrap();
    wf.start("r", &"x".into(), &vec![]).await.unwrap();
    wait_for_step(&engine, "r", 1).await;
    engine.shutdown().await;
    drop((engine, wf));

    let engine = open(&dir).await;
    let v2 = Workflow::<String, Vec<String>>::new("g", 2).step("first", |r| async move { Ok(r.w) });
    let wf = engine.register(v2).unwrap();
    let report = engine.resume_all().await.unwrap();
    assert!(report.resumed.is_empty());
    match wf.wait("r").await.unwrap() {
        Outcome::Failed(f) => assert!(f.kind == FailureKind::Corrupt && f.error.contains("version 1"), "{f:?}"),
        other => panic!("{other:?}"),
    }
    engine.shutdown().await;
}

/// Guarantee 11: after an upgrade that changed a workflow's shape, a run the old version
/// started finishes with the old version's steps, while new runs take the new ones.
#[tokio::test]
async fn a_run_of_an_older_version_kept_by_the_upgrade_finishes_with_its_own_steps() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(0)))).unwrap();
    wf.start("old", &"x".into(), &vec![]).await.unwrap();
    wait_for_step(&engine, "old", 1).await;
    engine.shutdown().await;
    drop((engine, wf));

    let engine = open(&dir).await;
    let v2 = Workflow::<String, Vec<String>>::new("g", 2).step("only", |r| async move {
        let mut w = r.w;
        w.push("g:v2".into());
        Ok(w)
    });
    let wf = engine.register(v2).unwrap();
    engine.register_older(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(1)))).unwrap();
    assert!(matches!(engine.register_older(chain_workflow("g")), Err(RegisterError::Duplicate(_))), "version 1 twice");
    let report = engine.resume_all().await.unwrap();
    assert_eq!(report.resumed, ["old"]);
    assert_eq!(wf.wait("old").await.unwrap(), Outcome::Completed(vec!["g:first".into(), "g:gated:x".into()]));
    assert_eq!(wf.run("new", &"y".into(), &vec![]).await.unwrap(), Outcome::Completed(vec!["g:v2".into()]));
    let info = engine.workflows();
    assert_eq!((info[0].version, info[0].older_versions.clone()), (2, vec![1]), "{info:?}");
    engine.shutdown().await;
}

#[tokio::test]
async fn cancel_ends_an_active_run_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(0)))).unwrap();
    wf.start("r", &"x".into(), &vec![]).await.unwrap();
    wait_for_step(&engine, "r", 1).await;
    let waiter = {
        let wf = wf.clone();
        tokio::spawn(async move { wf.wait("r").await })
    };
    engine.cancel("r", "operator asked").await.unwrap();
    let expected = Outcome::Failed(Failure {
        step: "gated".into(),
        error: "operator asked".into(),
        kind: FailureKind::Cancelled,
        code: None,
    });
    assert_eq!(waiter.await.unwrap().unwrap(), expected);
    assert!(matches!(engine.cancel("r", "again").await, Err(CancelError::NotActive { .. })));
    assert!(matches!(engine.cancel("zzz", "x").await, Err(CancelError::NotFound(_))));
    assert_eq!(wf.start("r", &"x".into(), &vec![]).await.unwrap(), StartOutcome::Finished(expected));

    // A run not yet in the run log (its first step still running) is cancelled too: the
    // failure is recorded with its start, and its step's late commit is fenced out.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let first_gated = Workflow::<String, Vec<String>>::new("h", 1).step("only", move |req| {
        let gate = gate.clone();
        async move {
            let _permit = gate.acquire().await.map_err(StepError::abort)?;
            Ok(req.w)
        }
    });
    let wf = engine.register(first_gated).unwrap();
    wf.start("u", &"x".into(), &vec![]).await.unwrap();
    assert!(engine.run_detail("u").unwrap().is_none());
    engine.cancel("u", "never mind").await.unwrap();
    let out = wf.wait("u").await.unwrap();
    assert!(matches!(out, Outcome::Failed(Failure { kind: FailureKind::Cancelled, .. })), "{out:?}");
    assert_eq!(engine.run_detail("u").unwrap().unwrap().summary.status, RunStatus::Failed);
    engine.shutdown().await;
}

#[tokio::test]
async fn shutdown_leaves_runs_active_and_interrupts_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(0)))).unwrap();
    wf.start("r", &"x".into(), &vec![]).await.unwrap();
    wait_for_step(&engine, "r", 1).await;
    let waiter = {
        let wf = wf.clone();
        tokio::spawn(async move { wf.wait("r").await })
    };
    engine.shutdown().await;
    assert!(matches!(waiter.await.unwrap(), Err(WaitError::Interrupted { .. })));
    drop((engine, wf));
    let engine = open(&dir).await;
    let run = engine.run_detail("r").unwrap().unwrap();
    assert_eq!(run.summary.status, RunStatus::Active);
    assert_eq!(run.summary.step_index, 1);
    engine.shutdown().await;
}

// Group commit needs a second thread to queue while the leader commits, as in the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine.register(chain_workflow("wf")).unwrap();
    let before = engine.commit_count();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let wf = wf.clone();
        tasks.push(tokio::spawn(async move { wf.run(&format!("r{i}"), &String::new(), &vec![]).await }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap().unwrap(), Outcome::Completed(w) if w.len() == 3));
    }
    let commits = engine.commit_count() - before;
    // 64 starts + 3 transitions each = 256 writes.
    assert!(commits < 256, "group commit: 256 writes took {commits} commits");
    engine.shutdown().await;
}

/// A quiet host cannot stall a commit: writers arrive in pairs on an otherwise idle engine
/// (the second often joins just as the first's leader finds the queue empty), and each pair
/// waits for both commits before the next arrives, so a stranded commit would wait forever
/// (no later write would come to lead it). Every commit must return within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_writers_on_an_idle_engine_never_wait_for_a_later_write() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine
        .register(
            Workflow::new("one", 1).step("only", |req: StepRequest<String, Vec<String>>| async move { Ok(req.w) }),
        )
        .unwrap();
    let bound = Duration::from_secs(10);
    // The second writer of a pair arrives after a random part of a commit's time, so some
    // arrive in the instant the leader finds the queue empty.
    let commit_time = {
        let t = std::time::Instant::now();
        wf.run("calibrate", &String::new(), &vec![]).await.unwrap();
        t.elapsed()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    for pair in 0..500 {
        let offset = commit_time.mul_f64(rng.random_range(0.5..1.5));
        let runs = (0..2).map(|k| {
            let wf = wf.clone();
            tokio::spawn(async move {
                if k == 1 {
                    // Jitter, not synchronisation: a busy wait shorter than a commit.
                    let t = std::time::Instant::now();
                    while t.elapsed() < offset {
                        std::hint::spin_loop();
                    }
                }
                wf.run(&format!("p{pair}-{k}"), &String::new(), &vec![]).await
            })
        });
        let both = futures::future::join_all(runs);
        let done = tokio::time::timeout(bound, both)
            .await
            .unwrap_or_else(|_| panic!("pair {pair}: a commit did not return within {bound:?} on an idle engine"));
        for r in done {
            assert!(matches!(r.unwrap().unwrap(), Outcome::Completed(_)));
        }
    }
    engine.shutdown().await;
}

/// What the blocking step bodies of [`Probe::workflow`] report: how many run now (`live`),
/// the most ever at once (`most`), and one permit on `started` per body started.
#[derive(Clone)]
struct Probe {
    live: Arc<AtomicU32>,
    most: Arc<AtomicU32>,
    started: Arc<tokio::sync::Semaphore>,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            live: Arc::new(AtomicU32::new(0)),
            most: Arc::new(AtomicU32::new(0)),
            started: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }

    fn live(&self) -> u32 {
        self.live.load(Ordering::SeqCst)
    }

    /// Waits until one more body has started.
    async fn started(&self) {
        self.started.acquire().await.unwrap().forget();
    }

    /// A one-step workflow whose blocking work runs until its stop signal fires (checked
    /// between units, as the unpacker does per entry); each attempt times out after `timeout`.
    fn workflow(&self, timeout: Duration) -> Workflow<String, Vec<String>> {
        let probe = self.clone();
        Workflow::new("blocking", 1).step_with(
            "long",
            RetryPolicy { attempt_timeout: timeout, ..quick(3) },
            move |req: StepRequest<String, Vec<String>>| {
                let probe = probe.clone();
                async move {
                    let stop = req.stop.clone();
                    req.stop
                        .spawn_blocking(move || {
                            let now = probe.live.fetch_add(1, Ordering::SeqCst) + 1;
                            probe.most.fetch_max(now, Ordering::SeqCst);
                            probe.started.add_permits(1);
                            while !stop.is_stopped() {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                            probe.live.fetch_sub(1, Ordering::SeqCst);
                        })
                        .await
                        .map_err(StepError::transient)?;
                    Err(StepError::transient("stopped"))
                }
            },
        )
    }
}

/// Shutdown tells a running step to stop and returns only after its blocking work has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_steps_blocking_work() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let probe = Probe::new();
    let wf = engine.register(probe.workflow(Duration::from_secs(3600))).unwrap();
    let run = tokio::spawn(async move { wf.run("r", &String::new(), &vec![]).await });
    probe.started().await;
    assert_eq!(probe.live(), 1);
    engine.shutdown().await;
    assert_eq!(probe.live(), 0, "a step body outlived the engine's shutdown");
    assert!(run.await.unwrap().is_err(), "the waiter is interrupted");
}

/// `stop_run` stops one run's task and its step's blocking work, records nothing (the run
/// stays active), and the next start resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_run_stops_the_step_and_leaves_the_run_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let probe = Probe::new();
    let wf = engine.register(probe.workflow(Duration::from_secs(3600))).unwrap();
    let w = wf.clone();
    let waiter = tokio::spawn(async move { w.run("r", &String::new(), &vec![]).await });
    probe.started().await;
    assert!(engine.stop_run("r", "lost the lease").await);
    assert_eq!(probe.live(), 0, "the step's blocking work still runs after stop_run returned");
    let err = waiter.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("lost the lease"), "{err}");
    assert!(!engine.stop_run("r", "again").await, "no task drives it any more");
    // Still active, and a new start drives it again.
    let w = wf.clone();
    tokio::spawn(async move { w.start("r", &String::new(), &vec![]).await });
    probe.started().await;
    assert_eq!(probe.live(), 1);
    engine.shutdown().await;
}

/// An attempt past its timeout is told to stop, and the next attempt starts only after its
/// blocking work returned: two attempts of one step never write at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_attempts_work_ends_before_the_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let probe = Probe::new();
    let wf = engine.register(probe.workflow(Duration::from_millis(50))).unwrap();
    let outcome = wf.run("r", &String::new(), &vec![]).await.unwrap();
    assert!(matches!(outcome, Outcome::Failed(ref f) if f.kind == FailureKind::RetriesExhausted), "{outcome:?}");
    assert_eq!(probe.most.load(Ordering::SeqCst), 1, "two attempts' blocking work overlapped");
    assert_eq!(probe.live(), 0);
    engine.shutdown().await;
}

#[tokio::test]
async fn pruning_removes_finished_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let done = engine.register(chain_workflow("done")).unwrap();
    let gated = engine.register(gated_workflow("g", Arc::new(tokio::sync::Semaphore::new(0)))).unwrap();
    done.run("finished", &String::new(), &vec![]).await.unwrap();
    gated.start("active", &String::new(), &vec![]).await.unwrap();
    wait_for_step(&engine, "active", 1).await;

    assert_eq!(engine.prune_finished_before(0).await.unwrap(), 0, "nothing finished before the epoch");
    let far_future = u64::MAX;
    assert_eq!(engine.prune_finished_before(far_future).await.unwrap(), 1);
    assert!(engine.run_detail("finished").unwrap().is_none());
    assert!(engine.run_detail("active").unwrap().is_some(), "active runs are never pruned");
    assert!(matches!(done.wait("finished").await, Err(WaitError::NotFound(_))));
    engine.shutdown().await;
}

#[tokio::test]
async fn list_runs_filters_by_workflow_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let a = engine.register(chain_workflow("a")).unwrap();
    let f = engine
        .register(Workflow::<String, u32>::new("f", 1).step("x", |_r| async move { Err(StepError::abort("no")) }))
        .unwrap();
    for i in 0..3 {
        a.run(&format!("a{i}"), &String::new(), &vec![]).await.unwrap();
    }
    f.run("f0", &String::new(), &0).await.unwrap();
    let all = engine.list_runs(&RunFilter::default()).unwrap();
    assert_eq!(all.len(), 4);
    let only_a = engine.list_runs(&RunFilter { workflow: Some("a".into()), ..Default::default() }).unwrap();
    assert_eq!(only_a.len(), 3);
    let failed = engine.list_runs(&RunFilter { status: Some(RunStatus::Failed), ..Default::default() }).unwrap();
    assert_eq!(failed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["f0"]);
    let limited = engine.list_runs(&RunFilter { limit: Some(2), ..Default::default() }).unwrap();
    assert_eq!(limited.len(), 2);
    let wfs = engine.workflows();
    assert_eq!(wfs[0].name, "a");
    assert_eq!(wfs[0].steps, ["a", "b", "c"]);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_second_engine_on_the_same_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    match Engine::open(dir.path().join("runs.redb"), config()).await {
        Err(e @ OpenError::AlreadyOpen { .. }) => assert!(e.to_string().contains("runs.redb")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second engine opened the same run log"),
    }
    engine.shutdown().await;
}

#[derive(Serialize, Deserialize)]
struct Odd {
    id: u64,
}

#[tokio::test]
async fn arbitrary_ids_are_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let wf = engine
        .register(Workflow::<Odd, Vec<u64>>::new("o", 1).step("s", |r| async move {
            let mut w = r.w;
            w.push(r.r.id);
            Ok(w)
        }))
        .unwrap();
    let ids = ["a", "a\0", "a\0\0", "\u{1F600}", "prepare-x", "prepare-x/y", " ", "ab", "a b"];
    for (i, id) in ids.iter().enumerate() {
        wf.run(id, &Odd { id: i as u64 }, &vec![]).await.unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        let d = engine.run_detail(id).unwrap().unwrap();
        assert_eq!(d.responses.len(), 2, "{id:?}");
        assert_eq!(d.responses[1].response, serde_json::json!([i]), "{id:?}");
        assert_eq!(d.events.len(), 3, "{id:?}");
    }
    assert!(matches!(wf.start("", &Odd { id: 0 }, &vec![]).await, Err(StartError::InvalidId(_))));
    engine.shutdown().await;
}

#[tokio::test]
async fn a_finished_run_can_be_archived_and_its_id_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir).await;
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = fail.clone();
    let wf = engine
        .register(Workflow::<(), u32>::new("p", 1).step("s", move |_r| {
            let fail = f.load(Ordering::SeqCst);
            async move { if fail { Err(StepError::abort("source down")) } else { Ok(7) } }
        }))
        .unwrap();
    assert!(matches!(wf.run("prepare-web", &(), &0).await.unwrap(), Outcome::Failed(_)));
    assert!(matches!(engine.archive_finished("nope").await, Err(ArchiveError::NotFound(_))));
    let archived = engine.archive_finished("prepare-web").await.unwrap();
    assert!(archived.starts_with("prepare-web~"));
    let old = engine.run_detail(&archived).unwrap().unwrap();
    assert_eq!(old.summary.status, RunStatus::Failed);
    assert_eq!(old.events.len(), 3, "the history moved with it: {:?}", old.events);
    assert!(engine.run_detail("prepare-web").unwrap().is_none());
    fail.store(false, Ordering::SeqCst);
    assert_eq!(wf.run("prepare-web", &(), &0).await.unwrap(), Outcome::Completed(7));
    assert_eq!(engine.list_runs(&RunFilter::default()).unwrap().len(), 2);
    // A completed run too; an active one is refused.
    let completed = engine.archive_finished("prepare-web").await.unwrap();
    assert_eq!(engine.run_detail(&completed).unwrap().unwrap().summary.status, RunStatus::Completed);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let slow = engine
        .register(Workflow::<(), u32>::new("slow", 1).step("s", move |_r| {
            let released = released.clone();
            async move {
                if let Some(rx) = released.lock().await.take() {
                    rx.await.map_err(StepError::transient)?;
                }
                Ok(1)
            }
        }))
        .unwrap();
    slow.start("busy", &(), &0).await.unwrap();
    assert!(matches!(engine.archive_finished("busy").await, Err(ArchiveError::StillActive(_))), "not while active");
    release.send(()).unwrap();
    assert_eq!(slow.wait("busy").await.unwrap(), Outcome::Completed(1));
    engine.shutdown().await;
}

/// The workflow of `testdata/run-log-v1.redb`: three steps; `c` of a run whose input is
/// "fail" aborts with a code; `b` of a run whose input is "retry" fails once, transiently;
/// `b` of a run whose input is "hold" waits for `gate`.
fn fixture_workflow(gate: Arc<tokio::sync::Semaphore>) -> Workflow<String, Vec<String>> {
    let tries = Arc::new(AtomicU32::new(0));
    Workflow::new("fixture", 1)
        .step("a", |req: StepRequest<String, Vec<String>>| async move {
            let mut w = req.w;
            w.push(format!("a:{}", req.r));
            Ok(w)
        })
        .step_with("b", quick(3), move |req: StepRequest<String, Vec<String>>| {
            let (gate, tries) = (gate.clone(), tries.clone());
            async move {
                if req.r.as_str() == "retry" && tries.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(StepError::transient("first try fails"));
                }
                if req.r.as_str() == "hold" {
                    let _permit = gate.acquire().await.map_err(StepError::abort)?;
                }
                let mut w = req.w;
                w.push(format!("b:{}", req.r));
                Ok(w)
            }
        })
        .step("c", |req: StepRequest<String, Vec<String>>| async move {
            if req.r.as_str() == "fail" {
                return Err(StepError::abort_with("bad_source", "the fixture's failing run"));
            }
            let mut w = req.w;
            w.push(format!("c:{}", req.r));
            Ok(w)
        })
}

/// A run log written by the previous version of the engine (`testdata/run-log-v1.redb`: the
/// runs `done-1`, `fail-1`, `retry-1` and `hold-1` of [`fixture_workflow`], the last stopped
/// at step `b`, written before steps' events were folded into their response rows): opened
/// by this one, every run reads back with its responses and its whole history in order, the active
/// run resumes from its committed step and completes, and new runs live beside the old ones.
#[tokio::test]
async fn a_run_log_written_by_the_previous_version_reads_back_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fsm/testdata/run-log-v1.redb");
    std::fs::copy(&fixture, dir.path().join("runs.redb")).unwrap();
    let engine = open(&dir).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let wf = engine.register(fixture_workflow(gate)).unwrap();
    let kinds = |id: &str| -> Vec<String> {
        let d = engine.run_detail(id).unwrap().unwrap();
        let seqs: Vec<u64> = d.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "{id}: events in order, none missing");
        d.events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Started => "started".to_owned(),
                EventKind::Resumed { step, .. } => format!("resumed:{step}"),
                EventKind::AttemptFailed { step, .. } => format!("failed:{step}"),
                EventKind::StepCompleted { step, .. } => format!("done:{step}"),
                EventKind::Finished { status, .. } => format!("finished:{status:?}"),
            })
            .collect()
    };
    assert_eq!(kinds("done-1"), ["started", "done:a", "done:b", "done:c", "finished:Completed"]);
    assert_eq!(kinds("retry-1"), ["started", "done:a", "failed:b", "done:b", "done:c", "finished:Completed"]);
    assert_eq!(kinds("fail-1"), ["started", "done:a", "done:b", "failed:c", "finished:Failed"]);
    let failed = engine.run_detail("fail-1").unwrap().unwrap();
    assert_eq!(failed.summary.failure.as_ref().and_then(|f| f.code.as_deref()), Some("bad_source"));
    let done = engine.run_detail("done-1").unwrap().unwrap();
    let last = done.responses.last().unwrap();
    assert_eq!((last.index, &last.response), (3, &serde_json::json!(["a:done", "b:done", "c:done"])));

    let report = engine.resume_all().await.unwrap();
    assert_eq!(report.resumed, ["hold-1"]);
    let Outcome::Completed(w) = wf.run("hold-1", &"hold".to_owned(), &Vec::new()).await.unwrap() else {
        panic!("hold-1 did not complete")
    };
    assert_eq!(w, ["a:hold", "b:hold", "c:hold"]);
    assert_eq!(kinds("hold-1"), ["started", "done:a", "resumed:b", "done:b", "done:c", "finished:Completed"]);
    let Outcome::Completed(_) = wf.run("new-1", &"done".to_owned(), &Vec::new()).await.unwrap() else { panic!() };
    assert_eq!(kinds("new-1"), ["started", "done:a", "done:b", "done:c", "finished:Completed"]);
    let completed = engine
        .list_runs(&RunFilter { status: Some(RunStatus::Completed), ..Default::default() })
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect::<std::collections::BTreeSet<_>>();
    assert_eq!(completed, ["done-1", "hold-1", "new-1", "retry-1"].map(str::to_owned).into());
}

#[test]
fn a_response_row_carries_its_folded_event_and_plain_json_rows_still_read() {
    let event = Event {
        seq: 7,
        at_ms: 1_700_000_000_123,
        kind: EventKind::StepCompleted { step: "unpack_into_base".into(), attempt: 2, duration_ms: 345 },
    };
    let w = br#"{"base":3}"#;
    let row = schema::encode_response(Some(&event), w);
    assert_eq!(schema::decode_response(&row).unwrap(), (Some(event), &w[..]));
    assert_eq!(schema::decode_response(w).unwrap(), (None, &w[..]), "a row of the previous format is plain JSON");
    assert_eq!(schema::encode_response(None, w), w.to_vec());
    assert!(schema::decode_response(&row[..20]).is_err(), "a cut row is an error, not a guess");
}
