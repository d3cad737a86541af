//! `bench sqs`: jobs per second end to end through SQS (enqueue, receive, run an activate
//! of a prepared family on the `dir` backend, ack) with concurrency 16, beside a minimal
//! boto3 consumer (receive 10, delete batch) on the same moto server in the same run, in
//! interleaved rounds (the ratio is the median of the rounds' ratios); and
//! the idle worker's SQS requests per minute (long polling: target <= 3). The worker's state
//! lives on `/dev/shm` so that the activation itself costs next to nothing.
//!
//! Uses `THINPIPE_TEST_AWS_ENDPOINT` if set, else starts `.venv/bin/moto_server` itself
//! (`scripts/test` installs it).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use thinpipe::fsm::Outcome;
use thinpipe::job::{Job, JobKind};
use thinpipe::queue::{Delivery, JobQueue, QueueError, SqsQueue, SqsSettings};
use tokio_util::sync::CancellationToken;

const JOBS: usize = 400;
const CONCURRENCY: usize = 16;
const IDLE_WINDOW: Duration = Duration::from_secs(45);

struct Moto(Option<Child>);

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0
            && let Err(e) = child.kill().and_then(|()| child.wait().map(drop))
        {
            eprintln!("stopping moto_server: {e}");
        }
    }
}

fn moto() -> anyhow::Result<(Moto, String)> {
    if let Ok(e) = std::env::var("THINPIPE_TEST_AWS_ENDPOINT") {
        return Ok((Moto(None), e));
    }
    let bin = Path::new(".venv/bin/moto_server");
    ensure!(
        bin.exists(),
        "{} is missing: run ./scripts/test once (it installs moto) or set THINPIPE_TEST_AWS_ENDPOINT",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let moto = Moto(Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((moto, format!("http://127.0.0.1:{port}")))
}

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
}

/// Rounds of (ours, boto3), interleaved so that both see the same server and machine state;
/// the ratio is the median of the per-round ratios.
const ROUNDS: usize = 3;

pub fn run(base: &Path) -> anyhow::Result<()> {
    let (_moto, endpoint) = moto()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let ours = rt.block_on(ours(base, &endpoint))?;
        let boto3 = boto3(&endpoint)?;
        println!("sqs_round{round} worker {ours:.1} jobs/s, boto3 consumer {boto3:.1} msgs/s");
        ratios.push((ours / boto3, ours, boto3));
    }
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, ours, boto3) = ratios[ROUNDS / 2];
    println!("sqs_worker_jobs {ours:.1} jobs/s");
    println!("sqs_boto3_consumer {boto3:.1} msgs/s");
    println!("sqs ratio_vs_boto3={ratio:.2}");
    let idle = rt.block_on(idle(base, &endpoint))?;
    println!("sqs_idle_requests {idle:.1} requests/min");
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
) -> anyhow::Result<(tempfile::TempDir, Arc<worker::host::Host>, aws_sdk_sqs::Client)> {
    // The activation is meant to cost nothing next to the queue path being measured: keep
    // the worker's state (run log, database, `dir` volumes) in memory when there is a tmpfs.
    let shm = Path::new("/dev/shm");
    let state = if shm.is_dir() { tempfile::tempdir_in(shm)? } else { tempfile::tempdir_in(base)? };
    thinpipe::image::write_sample_family(state.path(), "bench")?;
    let sets = [
        format!("state_dir={}", state.path().display()),
        format!("worker.concurrency={CONCURRENCY}"),
        "queue.kind=sqs".into(),
        format!("queue.url={url}"),
        format!("aws.endpoint={endpoint}"),
    ];
    let config = worker::config::Config::load(None, [], &sets)?;
    let host = Arc::new(worker::host::Host::open(config).await?);
    match host.pipeline.prepare("bench").await? {
        Outcome::Completed(_) => {}
        Outcome::Failed(f) => bail!("preparing the bench family failed: {f}"),
    }
    let (sdk, _) = thinpipe::aws::test_config(endpoint).await;
    Ok((state, host, thinpipe::aws::sqs_client(&sdk)))
}

async fn ours(base: &Path, endpoint: &str) -> anyhow::Result<f64> {
    let (sdk, _) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::sqs_client(&sdk);
    let url = queue(&client, &format!("bench-jobs-{:x}", rand::random::<u32>())).await?;
    let (_state, host, client) = worker(base, endpoint, &url).await?;
    let sqs = SqsQueue::new(
        client.clone(),
        SqsSettings { queue_url: url.clone(), dead_letter_url: None, visibility: Duration::from_secs(60) },
    );
    for i in 0..JOBS {
        let job = Job::new(JobKind::Activate, "bench", Some(&format!("b-{i}")));
        sqs.send(&url, &job.to_json(), &BTreeMap::new()).await?;
    }
    let counting = Counting::new(sqs);
    let shutdown = CancellationToken::new();
    let job_loop = worker::jobloop::JobLoop::new(host.clone(), vec![counting.clone()]);
    let cpu_before = cpu_time();
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
    let cpu = cpu_time() - cpu_before;
    println!(
        "sqs_worker_cpu {:.2} ms per job ({:.0}% of one core)",
        cpu.as_secs_f64() * 1000.0 / JOBS as f64,
        100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64()
    );
    ensure!(depth(&client, &url).await? == 0, "messages left in the queue after every job was acked");
    shutdown.cancel();
    runner.await??;
    host.close().await;
    Ok(JOBS as f64 / elapsed.as_secs_f64())
}

fn boto3(endpoint: &str) -> anyhow::Result<f64> {
    let script = r#"
import sys, time, uuid, boto3
endpoint, n = sys.argv[1], int(sys.argv[2])
sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
url = sqs.create_queue(QueueName="bench-boto3-" + uuid.uuid4().hex[:8])["QueueUrl"]
for i in range(0, n, 10):
    sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(j), "MessageBody": "m"} for j in range(min(10, n - i))])
start, done = time.monotonic(), 0
while done < n:
    msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    if msgs:
        sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)])
        done += len(msgs)
print(n / (time.monotonic() - start))
"#;
    let out = Command::new(".venv/bin/python")
        .args(["-c", script, endpoint, &JOBS.to_string()])
        .output()
        .context("running the boto3 baseline")?;
    ensure!(out.status.success(), "boto3 baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

async fn idle(base: &Path, endpoint: &str) -> anyhow::Result<f64> {
    let (sdk, _) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::sqs_client(&sdk);
    let url = queue(&client, &format!("bench-idle-{:x}", rand::random::<u32>())).await?;
    let (_state, host, client) = worker(base, endpoint, &url).await?;
    let counting = Counting::new(SqsQueue::new(
        client,
        SqsSettings { queue_url: url, dead_letter_url: None, visibility: Duration::from_secs(60) },
    ));
    let shutdown = CancellationToken::new();
    let job_loop = worker::jobloop::JobLoop::new(host.clone(), vec![counting.clone()]);
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

/// CPU time (user + system) this process has used: the worker's share of the machine that
/// moto also runs on.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
