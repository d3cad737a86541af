//! The fleet's queue path against moto's SQS with the real `worker` and `enqueue`
//! binaries: jobs posted by `enqueue` run on a worker and their results come back on a
//! reply queue; the same job posted twice makes one snapshot; malformed messages land in
//! the dead-letter queue with the reason attribute while the worker keeps running.

use std::process::{Command, Stdio};
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::queue::{JobQueue, REASON_ATTRIBUTE, SqsQueue, SqsSettings};
use thinpipe_tests::{Daemon, bin};

struct Sqs {
    endpoint: String,
    client: aws_sdk_sqs::Client,
    jobs: String,
    dlq: String,
}

async fn sqs(endpoint: String) -> Sqs {
    let (config, _) = thinpipe::aws::test_config(&endpoint).await;
    let client = thinpipe::aws::sqs_client(&config);
    let suffix = format!("{:x}", rand::random::<u64>());
    let jobs = client.create_queue().queue_name(format!("jobs-{suffix}")).send().await.unwrap();
    let dlq = client.create_queue().queue_name(format!("dlq-{suffix}")).send().await.unwrap();
    Sqs { endpoint, client, jobs: jobs.queue_url().unwrap().to_owned(), dlq: dlq.queue_url().unwrap().to_owned() }
}

const AWS_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

fn worker_env(s: &Sqs) -> Vec<(&str, &str)> {
    let mut env = vec![
        ("THINPIPE_QUEUE_KIND", "sqs"),
        ("THINPIPE_QUEUE_URL", s.jobs.as_str()),
        ("THINPIPE_QUEUE_DEAD_LETTER_URL", s.dlq.as_str()),
        ("THINPIPE_AWS_ENDPOINT", s.endpoint.as_str()),
        ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "10"),
    ];
    env.extend(AWS_ENV);
    env
}

fn enqueue(s: &Sqs, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("enqueue"))
        .args(["--queue-url", &s.jobs, "--endpoint-url", &s.endpoint, "--wait", "--json", "--timeout", "120"])
        .args(args)
        .envs(AWS_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn enqueued_jobs_run_on_a_worker_and_reply_and_a_repeat_makes_no_second_snapshot() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let daemon = Daemon::start(dir.path(), &worker_env(&s));

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
fn malformed_messages_land_in_the_dlq_with_their_reason_and_the_worker_keeps_running() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(sqs(endpoint));
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let mut daemon = Daemon::start(dir.path(), &worker_env(&s));
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
