//! The fleet's queue path against moto's SQS with the real `worker` and `enqueue`
//! binaries: jobs posted by `enqueue` run on a worker and their results come back on a
//! reply queue; the same job posted twice makes one snapshot; malformed messages land in
//! the dead-letter queue with the reason attribute while the worker keeps running.

use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::queue::{JobQueue, REASON_ATTRIBUTE, SqsQueue, SqsSettings};
use thinpipe_tests::Daemon;
use thinpipe_tests::aws::{Sqs, sqs};

fn enqueue(s: &Sqs, args: &[&str]) -> serde_json::Value {
    thinpipe_tests::enqueue_wait_to(thinpipe_tests::To::Sqs { queue: &s.jobs, endpoint: &s.endpoint }, args)
}

#[test]
fn enqueued_jobs_run_on_a_worker_and_reply_and_a_repeat_makes_no_second_snapshot() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let daemon = Daemon::start(dir.path(), &s.worker_env("10"));

    let first = enqueue(&s, &["activate", "--family", "web", "--invocation-id", "inv-1"]);
    assert_eq!(first["status"], "succeeded", "{first} {}", daemon.log());
    let again = enqueue(&s, &["activate", "--family", "web", "--invocation-id", "inv-1"]);
    assert_eq!(again["snapshot_path"], first["snapshot_path"]);
    let snaps = std::fs::read_dir(dir.path().join("volumes/snaps")).unwrap().count();
    assert_eq!(snaps, 1, "the same job twice makes one snapshot");
    assert!(daemon.stop(Duration::from_secs(60)).success());
    // The temporary reply queues were deleted; only ours remain.
    let left = rt.block_on(s.client.list_queues().send()).unwrap();
    assert!(!left.queue_urls().iter().any(|u| u.contains("thinpipe-reply")), "{:?}", left.queue_urls());
}

#[test]
fn one_worker_receives_from_its_own_queue_and_a_fleet_wide_one() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let host = rt.block_on(sqs(endpoint.clone()));
    let fleet = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let mut env = host.worker_env("10");
    env.push(("THINPIPE_QUEUE_EXTRA_URLS", fleet.jobs.as_str()));
    env.push(("THINPIPE_WORKER_HOST_ID", "h1"));
    let daemon = Daemon::start(dir.path(), &env);

    // Each queue is long-polled on its own: a job on either runs while the other is idle.
    let from_fleet = enqueue(&fleet, &["activate", "--family", "web", "--invocation-id", "fleet-1"]);
    assert_eq!(from_fleet["status"], "succeeded", "{from_fleet} {}", daemon.log());
    let from_host = enqueue(&host, &["activate", "--family", "web", "--invocation-id", "host-1"]);
    assert_eq!(from_host["status"], "succeeded", "{from_host} {}", daemon.log());
    let again = enqueue(&fleet, &["activate", "--family", "web", "--invocation-id", "fleet-2"]);
    assert_eq!(again["status"], "succeeded", "{again} {}", daemon.log());
    assert_eq!(from_host["base_vol_id"], from_fleet["base_vol_id"], "one base whatever the queue");
    let snaps = std::fs::read_dir(dir.path().join("volumes/snaps")).unwrap().count();
    assert_eq!(snaps, 3);

    // Every result names the host and the queue that reaches it alone, whichever queue the
    // job came from; the snapshot's record keeps the host.
    for r in [&from_fleet, &from_host, &again] {
        assert_eq!((r["host_id"].as_str(), r["host_queue"].as_str()), (Some("h1"), Some(host.jobs.as_str())), "{r}");
    }
    let store = thinpipe::store::Store::open(dir.path().join("host.db")).unwrap();
    let row = store.snapshot_by_run("activate-fleet-1").unwrap().unwrap();
    assert_eq!(row.host_id.as_deref(), Some("h1"));
    // The release goes to the host queue in the result; one that reaches a host that never
    // saw the invocation (activated elsewhere) says so, naming the host, and is not
    // dead-lettered.
    let released = enqueue(&host, &["release", "--family", "web", "--invocation-id", "fleet-1"]);
    assert_eq!(released["status"], "succeeded", "{released}");
    let misrouted = enqueue(&host, &["release", "--family", "web", "--invocation-id", "elsewhere-1"]);
    assert_eq!(misrouted["status"], "failed", "{misrouted}");
    let error = misrouted["error"].as_str().unwrap();
    assert!(
        error.contains("invocation elsewhere-1 is not on host h1")
            && error.contains("host queue in the activation's result"),
        "{error}"
    );
    assert_eq!(misrouted["host_id"], "h1");
    assert!(daemon.stop(Duration::from_secs(60)).success());
    assert_eq!(depth(&host) + depth(&fleet), 0, "every message was acked");
}

#[test]
fn malformed_messages_land_in_the_dlq_with_their_reason_and_the_worker_keeps_running() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let mut daemon = Daemon::start(dir.path(), &s.worker_env("10"));
    let q = SqsQueue::new(
        s.client.clone(),
        SqsSettings { queue_url: s.jobs.clone(), dead_letter_url: None, visibility: Duration::from_secs(30) },
    );
    let dlq = SqsQueue::new(
        s.client.clone(),
        SqsSettings { queue_url: s.dlq.clone(), dead_letter_url: None, visibility: Duration::from_secs(30) },
    );
    let bad = [("not json at all", "not JSON"), (r#"{"v":1,"kind":"explode","family":"web"}"#, "unknown variant")];
    let dead = rt.block_on(async {
        for (body, _) in &bad {
            q.send(&s.jobs, body, &Default::default()).await.unwrap();
        }
        let mut dead = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while dead.len() < bad.len() {
            assert!(tokio::time::Instant::now() < deadline, "not dead-lettered: {}", daemon.log());
            dead.extend(dlq.receive(10, Duration::from_secs(1)).await.unwrap());
        }
        dead
    });
    for (body, reason) in bad {
        let d = dead.iter().find(|d| d.body == body).unwrap_or_else(|| panic!("{body} missing from the DLQ"));
        let why = d.attributes.get(REASON_ATTRIBUTE).unwrap();
        assert!(why.contains(reason), "{body}: {why}");
    }
    assert!(daemon.is_running(), "{}", daemon.log());
    let ok = enqueue(&s, &["prepare", "--family", "web"]);
    assert_eq!(ok["status"], "succeeded", "the worker carries on");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

fn post(s: &Sqs, body: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let q = SqsQueue::new(
        s.client.clone(),
        SqsSettings { queue_url: s.jobs.clone(), dead_letter_url: None, visibility: Duration::from_secs(30) },
    );
    rt.block_on(q.send(&s.jobs, body, &Default::default())).unwrap()
}

/// Messages in the job queue, visible or in flight.
fn depth(s: &Sqs) -> u64 {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let out = rt.block_on(s.client.get_queue_attributes().queue_url(&s.jobs).attribute_names(A::All).send()).unwrap();
    let attrs = out.attributes().unwrap();
    let n = |a: A| attrs.get(&a).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(A::ApproximateNumberOfMessages) + n(A::ApproximateNumberOfMessagesNotVisible)
}

#[test]
fn a_worker_killed_during_prepare_is_resumed_by_the_next_from_the_redelivered_message() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let env = s.worker_env("3");
    let mut armed = env.clone();
    armed.push(("THINPIPE_FAULT", "prepare.after_base_create@web"));

    post(&s, r#"{"v":1,"kind":"prepare","family":"web"}"#);
    let mut first = Daemon::start(dir.path(), &armed);
    thinpipe_tests::wait_until("the armed worker to die at its fault point", Duration::from_secs(60), || {
        !first.is_running()
    });
    assert!(first.log().contains("fault point prepare.after_base_create@web armed"), "{}", first.log());
    drop(first);

    let second = Daemon::start(dir.path(), &env);
    let store_path = dir.path().join("host.db");
    thinpipe_tests::wait_until("the family to be prepared after the restart", Duration::from_secs(90), || {
        thinpipe::store::Store::open(&store_path)
            .ok()
            .and_then(|s| s.image("web").ok().flatten())
            .is_some_and(|i| i.current_base.is_some())
    });
    thinpipe_tests::wait_until("the message to be acked", Duration::from_secs(60), || depth(&s) == 0);
    assert!(second.stop(Duration::from_secs(60)).success());

    let bases: Vec<_> = std::fs::read_dir(dir.path().join("volumes/bases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".sealed"))
        .collect();
    assert_eq!(bases, ["base-1"], "exactly one base");
    let run = thinpipe_tests::prepare_run(dir.path(), "web");
    let detail = rt.block_on(async {
        let engine = thinpipe::fsm::Engine::open(dir.path().join("runs.redb"), Default::default()).await.unwrap();
        let d = engine.run_detail(&run).unwrap().unwrap();
        let all = engine.list_runs(&Default::default()).unwrap();
        engine.shutdown().await;
        (d, all)
    });
    assert_eq!(detail.1.len(), 1, "the same run was resumed, not a second one started");
    assert!(
        detail.0.events.iter().any(|e| matches!(e.kind, thinpipe::fsm::EventKind::Resumed { .. })),
        "history shows the resume"
    );
}

#[test]
fn the_heartbeat_keeps_a_long_job_invisible_and_sigterm_lets_it_finish() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    // The job runs ~8 s: four visibility timeouts of 2 s.
    let mut env = s.worker_env("2");
    env.push(("THINPIPE_PAUSE", "prepare.unpack@web=8000"));
    let daemon = Daemon::start(dir.path(), &env);
    post(&s, r#"{"v":1,"kind":"prepare","family":"web"}"#);
    daemon.wait_for_log("pause point prepare.unpack@web", Duration::from_secs(60));

    // While it runs, nobody else can receive it: the heartbeat extends its visibility.
    let q = SqsQueue::new(
        s.client.clone(),
        SqsSettings { queue_url: s.jobs.clone(), dead_letter_url: None, visibility: Duration::from_secs(1) },
    );
    let stolen = rt.block_on(async {
        let mut stolen = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
        while tokio::time::Instant::now() < deadline {
            stolen += q.receive(10, Duration::from_secs(1)).await.unwrap().len();
        }
        stolen
    });
    assert_eq!(stolen, 0, "the running job's message was redelivered");

    // SIGTERM while the job runs: it finishes, the worker exits 0, the job is acked.
    let status = daemon.stop(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let store = thinpipe::store::Store::open(dir.path().join("host.db")).unwrap();
    assert!(store.image("web").unwrap().unwrap().current_base.is_some(), "the in-flight job finished during the drain");
    assert_eq!(depth(&s), 0, "and was acked");
}

/// On a FIFO queue each invocation's activate and release run in the order they were posted
/// (even when one receive brings both), while activations of one family run in parallel.
#[test]
fn on_a_fifo_queue_an_invocations_jobs_keep_their_order_and_invocations_run_in_parallel() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (config, _) = rt.block_on(thinpipe::aws::test_config(&endpoint));
    let client = thinpipe::aws::sqs_client(&config);
    let suffix = format!("{:x}", rand::random::<u64>());
    let fifo = rt
        .block_on(
            client
                .create_queue()
                .queue_name(format!("jobs-{suffix}.fifo"))
                .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
                .send(),
        )
        .unwrap();
    let results = rt.block_on(client.create_queue().queue_name(format!("results-{suffix}")).send()).unwrap();
    let s = Sqs {
        endpoint: endpoint.clone(),
        client: client.clone(),
        jobs: fifo.queue_url().unwrap().to_owned(),
        dlq: results.queue_url().unwrap().to_owned(),
    };
    let results_url = results.queue_url().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let mut env = s.worker_env("10");
    env.retain(|(k, _)| *k != "THINPIPE_QUEUE_DEAD_LETTER_URL");
    env.push(("THINPIPE_WORKER_CONCURRENCY", "8"));
    let daemon = Daemon::start(dir.path(), &env);
    post(&s, &format!(r#"{{"v":1,"kind":"prepare","family":"web","reply_to":"{results_url}"}}"#));
    // Each invocation: activate then release, posted back to back; all invocations at once.
    const N: usize = 6;
    for i in 0..N {
        for kind in ["activate", "release"] {
            post(
                &s,
                &format!(
                    r#"{{"v":1,"kind":"{kind}","family":"web","invocation_id":"f-{i}","reply_to":"{results_url}"}}"#
                ),
            );
        }
    }
    let q = SqsQueue::new(
        client,
        SqsSettings { queue_url: results_url.clone(), dead_letter_url: None, visibility: Duration::from_secs(30) },
    );
    let mut got: Vec<serde_json::Value> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while got.len() < 1 + 2 * N {
        assert!(std::time::Instant::now() < deadline, "results: {got:#?}\n{}", daemon.log());
        for d in rt.block_on(q.receive(10, Duration::from_secs(1))).unwrap() {
            got.push(serde_json::from_str(&d.body).unwrap());
            rt.block_on(q.ack(&d)).unwrap();
        }
    }
    for i in 0..N {
        let inv = format!("f-{i}");
        let of = |kind: &str| got.iter().find(|r| r["kind"] == kind && r["invocation_id"] == inv.as_str()).unwrap();
        assert_eq!(of("activate")["status"], "succeeded", "{inv}: the activation ran first: {}", of("activate"));
        let release = of("release");
        assert_eq!(release["status"], "succeeded", "{release}");
        assert!(release["detail"].is_null(), "{inv}: the release found the snapshot to give back: {release}");
    }
    assert!(std::fs::read_dir(dir.path().join("volumes/snaps")).unwrap().next().is_none(), "nothing left");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}
