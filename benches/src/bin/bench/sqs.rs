//! `bench sqs`: jobs end to end through SQS (enqueue, receive, run an activate of a
//! prepared family on the `dir` backend, ack) with concurrency 16, beside a minimal boto3
//! consumer (receive 10, delete batch) on the same moto server, in rounds alternating which
//! goes first. moto serves about 60–70 messages/s to either, so the throughput ratio mostly
//! measures moto; the figures that describe the worker are printed beside it:
//! - `sqs requests_per_job=<x>`: every SQS request the worker made (counted by an SDK
//!   interceptor, by operation) over the jobs, at saturation (target <= 0.25; no replies);
//! - `sqs requests_per_job_with_replies=<x>`: the same with every job sending its result to a
//!   reply queue (results share `SendMessageBatch` calls; target <= 0.35);
//! - `sqs cpu_ratio_vs_boto3=<x>`: the worker's CPU per job spent on the queue path (its CPU
//!   per job minus the CPU of the same activation run directly, measured just before in the
//!   same process) over boto3's CPU per message, which does nothing with its messages
//!   (target <= 0.5); the whole CPU per job is printed beside;
//! - `sqs_idle_requests`: an idle worker's requests per minute (long polling: target <= 3).
//!
//! The worker's state lives on `/dev/shm` so that the activation itself costs next to nothing.
//!
//! Uses `THINPIPE_TEST_AWS_ENDPOINT` if set, else starts `.venv/bin/moto_server` itself; the
//! boto3 side runs `.venv/bin/python` (both from `./scripts/test`, which makes `.venv`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use thinpipe::fsm::Outcome;
use thinpipe::job::{Job, JobKind};
use thinpipe::queue::{Delivery, JobQueue, QueueError, QueueStats, SqsQueue, SqsSettings};
use tokio_util::sync::CancellationToken;

use crate::moto::{moto, venv};
use crate::report::{self, Goal};

const JOBS: usize = 400;
const CONCURRENCY: usize = 16;
const IDLE_WINDOW: Duration = Duration::from_secs(45);

/// Records the receive calls that reach SQS and counts acks (so the bench knows when the
/// jobs are done without adding requests of its own).
struct Counting {
    inner: SqsQueue,
    receives: std::sync::Mutex<Vec<Instant>>,
    acks: AtomicU64,
}

impl Counting {
    fn new(inner: SqsQueue) -> Arc<Self> {
        Arc::new(Self { inner, receives: std::sync::Mutex::new(Vec::new()), acks: AtomicU64::new(0) })
    }
}

#[async_trait]
impl JobQueue for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.receives.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
        self.inner.receive(max, wait).await
    }
    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.ack(d).await?;
        self.acks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn extend(&self, d: &Delivery, v: Duration) -> Result<(), QueueError> {
        self.inner.extend(d, v).await
    }
    async fn release(&self, d: &Delivery) -> Result<(), QueueError> {
        self.inner.release(d).await
    }
    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        self.inner.dead_letter(d, reason).await
    }
    async fn send(&self, to: &str, body: &str, a: &BTreeMap<String, String>) -> Result<String, QueueError> {
        self.inner.send(to, body, a).await
    }
    async fn stats(&self) -> Result<QueueStats, QueueError> {
        self.inner.stats().await
    }
    fn stats_interval(&self) -> Duration {
        self.inner.stats_interval()
    }
}

/// Counts every request the SQS client sends, by operation (`X-Amz-Target`).
#[derive(Clone, Debug, Default)]
struct RequestCounter(Arc<std::sync::Mutex<BTreeMap<String, u64>>>);

impl RequestCounter {
    fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl aws_sdk_sqs::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_sqs::config::RuntimeComponents,
        _cfg: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> Result<(), aws_sdk_sqs::error::BoxError> {
        let target = context.request().headers().get("x-amz-target").unwrap_or("unknown");
        let op = target.trim_start_matches("AmazonSQS.").to_owned();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(op).or_default() += 1;
        Ok(())
    }
}

/// What one saturated run of the worker measured.
struct Ours {
    jobs_per_sec: f64,
    cpu_per_job: Duration,
    /// CPU of one activation run directly (no queue), on the same host.
    cpu_per_activation: Duration,
    requests: BTreeMap<String, u64>,
}

/// Rounds of (ours, boto3), interleaved so that both see the same server and machine state;
/// the ratio is the median of the per-round ratios.
const ROUNDS: usize = 4;

pub fn run(base: &Path) -> anyhow::Result<()> {
    let (_moto, endpoint) = moto()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut throughput, mut cpu, mut requests) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (ours, boto3) = if report::ours_first(round) {
            let o = rt.block_on(ours(base, &endpoint, false))?;
            (o, boto3(&endpoint)?)
        } else {
            let b = boto3(&endpoint)?;
            (rt.block_on(ours(base, &endpoint, false))?, b)
        };
        let total: u64 = ours.requests.values().sum();
        let per_job = total as f64 / JOBS as f64;
        let by_op: Vec<String> = ours.requests.iter().map(|(op, n)| format!("{op} {n}")).collect();
        let queue_cpu = ours.cpu_per_job.saturating_sub(ours.cpu_per_activation);
        println!(
            "sqs_round{round} first={} worker {:.1} jobs/s, {:.2} ms CPU/job = {:.2} activation + {:.2} queue path, {total} requests for {JOBS} jobs ({}); boto3 {:.1} msgs/s, {:.2} ms CPU/msg",
            report::side(round),
            ours.jobs_per_sec,
            ours.cpu_per_job.as_secs_f64() * 1000.0,
            ours.cpu_per_activation.as_secs_f64() * 1000.0,
            queue_cpu.as_secs_f64() * 1000.0,
            by_op.join(", "),
            boto3.msgs_per_sec,
            boto3.cpu_per_msg.as_secs_f64() * 1000.0
        );
        throughput.push(ours.jobs_per_sec / boto3.msgs_per_sec);
        cpu.push(queue_cpu.as_secs_f64() / boto3.cpu_per_msg.as_secs_f64());
        requests.push(per_job);
    }
    let ratio = report::median_of_ratios("sqs", "ratio_vs_boto3", &throughput);
    println!("sqs ratio_vs_boto3={ratio:.2} (throughput; both sides are limited by moto)");
    let per_job = report::median_of_ratios("sqs", "requests_per_job", &requests);
    report::ratio("sqs", "requests_per_job", per_job, Goal::AtMost(0.25));
    let cpu_ratio = report::median_of_ratios("sqs", "cpu_ratio_vs_boto3", &cpu);
    report::ratio("sqs", "cpu_ratio_vs_boto3", cpu_ratio, Goal::AtMost(0.5));
    // With a result per job: results of jobs that end together share SendMessageBatch calls.
    let mut with_replies = Vec::new();
    for round in 0..2 {
        let ours = rt.block_on(ours(base, &endpoint, true))?;
        let total: u64 = ours.requests.values().sum();
        let by_op: Vec<String> = ours.requests.iter().map(|(op, n)| format!("{op} {n}")).collect();
        println!("sqs_replies_round{round} {total} requests for {JOBS} jobs with results ({})", by_op.join(", "));
        with_replies.push(total as f64 / JOBS as f64);
    }
    let per_job = report::median_of_ratios("sqs", "requests_per_job_with_replies", &with_replies);
    report::ratio("sqs", "requests_per_job_with_replies", per_job, Goal::AtMost(0.35));
    let idle = rt.block_on(idle(base, &endpoint))?;
    println!("sqs_idle_requests {idle:.1} requests/min");
    report::ratio("sqs", "idle_requests_per_min", idle, Goal::AtMost(3.0));
    report::peak_rss("sqs");
    Ok(())
}

async fn queue(client: &aws_sdk_sqs::Client, name: &str) -> anyhow::Result<String> {
    let out = client.create_queue().queue_name(name).send().await?;
    Ok(out.queue_url().context("no queue url")?.to_owned())
}

async fn depth(client: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<u64> {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = client.get_queue_attributes().queue_url(url).attribute_names(A::All).send().await?;
    let attrs = out.attributes().context("no attributes")?;
    let n = |a: A| attrs.get(&a).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(n(A::ApproximateNumberOfMessages) + n(A::ApproximateNumberOfMessagesNotVisible))
}

async fn worker(
    base: &Path,
    endpoint: &str,
    url: &str,
    counter: &RequestCounter,
) -> anyhow::Result<(tempfile::TempDir, Arc<worker::host::Host>, aws_sdk_sqs::Client)> {
    // The activation is meant to cost nothing next to the queue path being measured: keep
    // the worker's state (run log, database, `dir` volumes) in memory when there is a tmpfs.
    let shm = Path::new("/dev/shm");
    let state = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir_in(base)? };
    thinpipe::image::write_sample_family(state.path(), "bench")?;
    let sets = [
        format!("state_dir={}", state.path().display()),
        // Named, not `auto`: as root `auto` picks overlay, whose snapshots stay mounted.
        "backend=dir".into(),
        format!("worker.concurrency={CONCURRENCY}"),
        "queue.kind=sqs".into(),
        format!("queue.url={url}"),
        format!("aws.endpoint={endpoint}"),
    ];
    let config = worker::config::Config::load(None, [], &sets)?;
    let host = Arc::new(worker::host::Host::open(config).await?);
    let job = thinpipe::job::Job::new(thinpipe::job::JobKind::Prepare, "bench", None);
    let prepared = worker::commands::run::run(&host, &job).await?;
    if prepared.base_vol_id.is_none() {
        bail!("preparing the bench family failed: {}", prepared.error.unwrap_or_default());
    }
    let (sdk, _) = thinpipe::aws::test_config(endpoint).await;
    let conf = aws_sdk_sqs::config::Builder::from(&sdk).interceptor(counter.clone()).build();
    Ok((state, host, aws_sdk_sqs::Client::from_conf(conf)))
}

async fn ours(base: &Path, endpoint: &str, replies: bool) -> anyhow::Result<Ours> {
    let (sdk, _) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::sqs_client(&sdk);
    let url = queue(&client, &format!("bench-jobs-{:x}", rand::random::<u32>())).await?;
    let counter = RequestCounter::default();
    let (_state, host, client) = worker(base, endpoint, &url, &counter).await?;
    // The activation alone, run directly, for the CPU split.
    let base = base_of(&host).await?;
    let cpu_before = report::cpu_time();
    for i in 0..JOBS {
        match host.pipeline.activate("bench", &format!("direct-{i}"), base, None).await? {
            Outcome::Completed(_) => {}
            Outcome::Failed(f) => bail!("a direct activation failed: {f}"),
        }
    }
    let cpu_per_activation = (report::cpu_time() - cpu_before) / JOBS as u32;
    let sqs = SqsQueue::new(
        client.clone(),
        SqsSettings { queue_url: url.clone(), dead_letter_url: None, visibility: Duration::from_secs(60) },
    );
    let reply_to =
        if replies { Some(queue(&client, &format!("bench-results-{:x}", rand::random::<u32>())).await?) } else { None };
    for i in 0..JOBS {
        let job = Job { reply_to: reply_to.clone(), ..Job::new(JobKind::Activate, "bench", Some(&format!("b-{i}"))) };
        sqs.send(&url, &job.to_json(), &BTreeMap::new()).await?;
    }
    let counting = Counting::new(sqs);
    let shutdown = CancellationToken::new();
    let job_loop = worker::daemon::jobloop::JobLoop::new(host.clone(), vec![counting.clone()]);
    counter.take(); // the sends above are the bench's, not the worker's
    let cpu_before = report::cpu_time();
    let start = Instant::now();
    let runner = {
        let (l, s) = (job_loop.clone(), shutdown.clone());
        tokio::spawn(async move { l.run(s).await })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while counting.acks.load(Ordering::Relaxed) < JOBS as u64 {
        ensure!(Instant::now() < deadline, "the worker did not finish {JOBS} jobs in 10 minutes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    let cpu = report::cpu_time() - cpu_before;
    let requests = counter.take();
    ensure!(depth(&client, &url).await? == 0, "messages left in the queue after every job was acked");
    shutdown.cancel();
    runner.await??;
    host.close().await;
    Ok(Ours {
        jobs_per_sec: JOBS as f64 / elapsed.as_secs_f64(),
        cpu_per_job: cpu / JOBS as u32,
        cpu_per_activation,
        requests,
    })
}

/// The prepared bench family's base.
async fn base_of(host: &worker::host::Host) -> anyhow::Result<u64> {
    let store = host.store.clone();
    let row = tokio::task::spawn_blocking(move || store.current_base("bench")).await??;
    row.map(|r| r.id).context("the bench family has no current version")
}

/// What the boto3 consumer measured.
struct Boto3 {
    msgs_per_sec: f64,
    cpu_per_msg: Duration,
}

fn boto3(endpoint: &str) -> anyhow::Result<Boto3> {
    let script = r#"
import sys, time, uuid, boto3
endpoint, n = sys.argv[1], int(sys.argv[2])
sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
url = sqs.create_queue(QueueName="bench-boto3-" + uuid.uuid4().hex[:8])["QueueUrl"]
for i in range(0, n, 10):
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": "m"} for j in range(min(10, n - i))])
start, cpu, done = time.monotonic(), time.process_time(), 0
while done < n:
    msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    if msgs:
        sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
        done += len(msgs)
print(n / (time.monotonic() - start), (time.process_time() - cpu) / n)
"#;
    let out = Command::new(venv("python")?)
        .args(["-c", script, endpoint, &JOBS.to_string()])
        .output()
        .context("running the boto3 baseline")?;
    ensure!(out.status.success(), "boto3 baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let mut figures = text.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(rate)), Some(Ok(cpu))) = (figures.next(), figures.next()) else {
        bail!("the boto3 baseline printed {text:?}, not two figures")
    };
    Ok(Boto3 { msgs_per_sec: rate, cpu_per_msg: Duration::from_secs_f64(cpu) })
}

async fn idle(base: &Path, endpoint: &str) -> anyhow::Result<f64> {
    let (sdk, _) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::sqs_client(&sdk);
    let url = queue(&client, &format!("bench-idle-{:x}", rand::random::<u32>())).await?;
    let (_state, host, client) = worker(base, endpoint, &url, &RequestCounter::default()).await?;
    let counting = Counting::new(SqsQueue::new(
        client,
        SqsSettings { queue_url: url, dead_letter_url: None, visibility: Duration::from_secs(60) },
    ));
    let shutdown = CancellationToken::new();
    let job_loop = worker::daemon::jobloop::JobLoop::new(host.clone(), vec![counting.clone()]);
    let runner = {
        let (l, s) = (job_loop.clone(), shutdown.clone());
        tokio::spawn(async move { l.run(s).await })
    };
    // The measurement window itself: an idle worker for a fixed time.
    tokio::time::sleep(IDLE_WINDOW).await;
    let calls = counting.receives.lock().unwrap_or_else(|p| p.into_inner()).clone();
    shutdown.cancel();
    runner.await??;
    host.close().await;
    // The steady rate: calls after the first, over the time they span.
    ensure!(calls.len() >= 2, "the idle worker made {} receive calls in {IDLE_WINDOW:?}", calls.len());
    let span = calls[calls.len() - 1] - calls[0];
    Ok((calls.len() - 1) as f64 * 60.0 / span.as_secs_f64())
}
