//! The job loop: receive, validate, run, publish the result, ack — with bounded
//! concurrency, a visibility heartbeat per job, and an explicit drain.
//!
//! Per job: an invalid message is dead-lettered with the reason. `prepare` takes the
//! per-family lease, runs `prepare-<family>` unless the family is already prepared, and
//! sets the `prepared` flag (only here). `activate` does that first, then runs
//! `activate-<invocation_id>`; concurrent activations of one family wait on the same
//! prepare run. A run that failed publishes a failure result and is acked; a prepare that
//! failed because the family does not exist is dead-lettered too; anything transient makes
//! the message visible again after `retry_delay_secs`.
//!
//! Shutdown: when `shutdown` fires the loop stops receiving, waits for in-flight jobs up to
//! the drain deadline, makes the messages of jobs still running visible again, and stops
//! the engine (their runs resume at the next start).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thinpipe::fault;
use thinpipe::fsm::{Failure, FailureKind, Outcome, RunError};
use thinpipe::job::{Job, JobKind, JobResult, JobStatus};
use thinpipe::queue::{Delivery, JobQueue};
use thinpipe::store::{Acquired, Holder};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::host::Host;

/// What the loop did, for logs and tests.
#[derive(Debug, Default)]
pub struct LoopReport {
    pub handled: u64,
    /// Jobs still running at the drain deadline, whose messages were released.
    pub released_at_drain: usize,
}

/// How one job ended.
enum JobEnd {
    /// Publish the result (if asked) and ack.
    Done(JobResult),
    /// Dead-letter with the reason (publishing a failure result first, if asked).
    DeadLetter(String, Option<JobResult>),
    /// Leave the message for a later try.
    Retry(String),
}

pub struct JobLoop {
    host: Arc<Host>,
    queue: Arc<dyn JobQueue>,
    /// One prepare per family at a time in this process.
    prepare_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl JobLoop {
    pub fn new(host: Arc<Host>, queue: Arc<dyn JobQueue>) -> Arc<Self> {
        Arc::new(Self { host, queue, prepare_locks: Mutex::new(HashMap::new()) })
    }

    /// Runs until `shutdown` fires (or the worker lease is lost), then drains.
    pub async fn run(self: &Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<LoopReport> {
        let cfg = &self.host.config;
        let report = self.host.engine.resume_all().await?;
        if !report.resumed.is_empty() || !report.failed.is_empty() {
            tracing::info!(resumed = report.resumed.len(), failed = report.failed.len(), "resumed unfinished runs");
        }
        let stop = CancellationToken::new();
        let stopper = {
            let (stop, shutdown, lost) = (stop.clone(), shutdown.clone(), self.host.lease_lost.clone());
            tokio::spawn(async move {
                tokio::select! { _ = shutdown.cancelled() => {}, _ = lost.cancelled() => {} }
                stop.cancel();
            })
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.worker.concurrency));
        let in_flight: Arc<Mutex<HashMap<tokio::task::Id, Delivery>>> = Arc::default();
        let mut tasks = JoinSet::new();
        let mut out = LoopReport::default();
        let wait = Duration::from_secs(cfg.queue.wait_secs);
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                p = slots.clone().acquire_owned() => p?,
            };
            let want = 1 + slots.available_permits().min(9);
            let deliveries = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.queue.receive(want, wait) => r,
            };
            let deliveries = match deliveries {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "receiving jobs failed; retrying");
                    tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                    continue;
                }
            };
            let mut first = Some(first);
            for d in deliveries {
                let Some(permit) = first.take().or_else(|| slots.clone().try_acquire_owned().ok()) else {
                    // More messages than free slots (cannot happen: we asked for as many as
                    // were free); make the extra one visible again rather than hold it.
                    self.release(&d).await;
                    continue;
                };
                let this = self.clone();
                let delivery = d.clone();
                let handle = tasks.spawn(async move {
                    this.handle(delivery).await;
                    drop(permit);
                });
                lock(&in_flight).insert(handle.id(), d);
            }
            while let Some(done) = tasks.try_join_next_with_id() {
                out.handled += 1;
                forget(&in_flight, done);
            }
        }
        stopper.abort();
        while let Some(done) = tasks.try_join_next_with_id() {
            out.handled += 1;
            forget(&in_flight, done);
        }
        // Drain: in-flight jobs get until the deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.worker.drain_deadline_secs);
        tracing::info!(in_flight = tasks.len(), "draining");
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next_with_id()).await {
                Ok(Some(done)) => {
                    out.handled += 1;
                    forget(&in_flight, done);
                }
                Ok(None) => break,
                Err(_) => break,
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let left: Vec<Delivery> = lock(&in_flight).drain().map(|(_, d)| d).collect();
        out.released_at_drain = left.len();
        for d in &left {
            self.release(d).await;
        }
        if !left.is_empty() {
            tracing::warn!(jobs = left.len(), "drain deadline passed: released the messages of unfinished jobs");
        }
        Ok(out)
    }

    async fn release(&self, d: &Delivery) {
        if let Err(e) = self.queue.release(d).await {
            tracing::warn!(message_id = %d.message_id, error = %e, "could not release a message; it returns when its visibility ends");
        }
    }

    /// Handles one delivery from start to ack.
    pub async fn handle(&self, d: Delivery) {
        let job = match Job::parse(&d.body) {
            Ok(job) => job,
            Err(reason) => {
                tracing::warn!(message_id = %d.message_id, %reason, "invalid job message: dead-lettering it");
                if let Err(e) = self.queue.dead_letter(&d, &reason.0).await {
                    tracing::error!(message_id = %d.message_id, error = %e, "could not dead-letter an invalid message; it will come back");
                }
                return;
            }
        };
        let span = tracing::info_span!("job", message_id = %d.message_id, kind = %job.kind, family = %job.family, run_id = %job.run_id());
        // Dropped (and the heartbeat stopped) however this task ends, abort and panic included.
        let heartbeat = self.spawn_heartbeat(d.clone()).drop_guard();
        let end = tracing::Instrument::instrument(self.execute(&job, &d), span.clone()).await;
        drop(heartbeat);
        match end {
            JobEnd::Done(result) => {
                if !self.reply(&job, &result).await {
                    self.retry_later(&d, "the result could not be sent").await;
                    return;
                }
                fault::point("jobloop.before_ack", &job.run_id());
                match self.queue.ack(&d).await {
                    Ok(()) => tracing::info!(message_id = %d.message_id, status = ?result.status, "job done"),
                    Err(e) => {
                        tracing::warn!(message_id = %d.message_id, error = %e, "ack failed; the job will be redelivered and its stored outcome returned")
                    }
                }
            }
            JobEnd::DeadLetter(reason, result) => {
                if let Some(result) = result
                    && !self.reply(&job, &result).await
                {
                    self.retry_later(&d, "the result could not be sent").await;
                    return;
                }
                tracing::warn!(message_id = %d.message_id, %reason, "dead-lettering the job");
                if let Err(e) = self.queue.dead_letter(&d, &reason).await {
                    tracing::error!(message_id = %d.message_id, error = %e, "could not dead-letter the job; it will come back");
                }
            }
            JobEnd::Retry(reason) => self.retry_later(&d, &reason).await,
        }
    }

    async fn retry_later(&self, d: &Delivery, reason: &str) {
        tracing::warn!(message_id = %d.message_id, %reason, "job will be retried");
        let delay = Duration::from_secs(self.host.config.worker.retry_delay_secs);
        if let Err(e) = self.queue.extend(d, delay).await {
            tracing::warn!(message_id = %d.message_id, error = %e, "could not delay the retry; the message returns when its visibility ends");
        }
    }

    /// Sends the result to `reply_to`; true if there was nothing to send or it was sent.
    async fn reply(&self, job: &Job, result: &JobResult) -> bool {
        let Some(to) = &job.reply_to else { return true };
        let body = match serde_json::to_string(result) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a job result");
                return false;
            }
        };
        match self.queue.send(to, &body, &BTreeMap::new()).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(reply_to = %to, error = %e, "sending the result failed");
                false
            }
        }
    }

    fn spawn_heartbeat(&self, d: Delivery) -> CancellationToken {
        let stop = CancellationToken::new();
        let queue = self.queue.clone();
        let visibility = Duration::from_secs(self.host.config.queue.visibility_timeout_secs);
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(visibility / 3) => {}
                }
                if let Err(e) = queue.extend(&d, visibility).await {
                    tracing::warn!(message_id = %d.message_id, error = %e, "visibility heartbeat failed");
                }
            }
        });
        stop
    }

    async fn execute(&self, job: &Job, d: &Delivery) -> JobEnd {
        let mut result = JobResult {
            job_id: d.message_id.clone(),
            kind: job.kind,
            family: job.family.clone(),
            invocation_id: job.invocation_id.clone(),
            status: JobStatus::Succeeded,
            run_id: job.run_id(),
            snapshot_path: None,
            base_vol_id: None,
            error: None,
        };
        let failed = |mut result: JobResult, f: &Failure| {
            result.status = JobStatus::Failed;
            result.error = Some(f.to_string());
            JobEnd::Done(result)
        };
        let pipeline = &self.host.pipeline;
        let invocation = job.invocation_id.clone().unwrap_or_default();
        match job.kind {
            JobKind::Prepare | JobKind::Activate => {
                let base = match self.ensure_prepared(&job.family).await {
                    Ok(base) => base,
                    Err(Prep::Unknown(f)) => {
                        result.status = JobStatus::Failed;
                        result.error = Some(f.to_string());
                        result.run_id = thinpipe::job::prepare_run_id(&job.family);
                        return JobEnd::DeadLetter(f.error.clone(), Some(result));
                    }
                    Err(Prep::Failed(f)) => {
                        result.run_id = thinpipe::job::prepare_run_id(&job.family);
                        return failed(result, &f);
                    }
                    Err(Prep::Retry(why)) => return JobEnd::Retry(why),
                };
                result.base_vol_id = Some(base);
                if job.kind == JobKind::Prepare {
                    return JobEnd::Done(result);
                }
                match pipeline.activate(&job.family, &invocation, base).await {
                    Ok(Outcome::Completed(w)) => {
                        result.snapshot_path = w.path;
                        JobEnd::Done(result)
                    }
                    Ok(Outcome::Failed(f)) => failed(result, &f),
                    Err(e) => JobEnd::Retry(e.to_string()),
                }
            }
            JobKind::Release => match pipeline.release(&invocation).await {
                Ok(Outcome::Completed(_)) => JobEnd::Done(result),
                Ok(Outcome::Failed(f)) => failed(result, &f),
                Err(e) => JobEnd::Retry(e.to_string()),
            },
        }
    }

    /// The family's sealed base, preparing it first if needed. Owns the `prepared` flag.
    async fn ensure_prepared(&self, family: &str) -> Result<u64, Prep> {
        if let Some(base) = self.prepared_base(family).await? {
            return Ok(base);
        }
        let lock = lock(&self.prepare_locks).entry(family.to_owned()).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        if let Some(base) = self.prepared_base(family).await? {
            return Ok(base); // another task of ours prepared it while we waited
        }
        let key = format!("prepare/{family}");
        let ttl = Duration::from_secs(self.host.config.worker.lease_ttl_secs);
        let store = self.host.store.clone();
        let k = key.clone();
        match blocking(move || store.acquire_lease_reclaiming(&k, Holder::this_process(), ttl)).await? {
            Acquired::Yes => {}
            Acquired::TookOver { from } => {
                tracing::warn!(family, previous = %from, "took over the prepare lease of a process that is gone")
            }
            Acquired::HeldBy(holder) => {
                return Err(Prep::Retry(format!("family {family} is being prepared by {holder}")));
            }
        }
        let lost = CancellationToken::new();
        let renewer = {
            let (store, key, lost) = (self.host.store.clone(), key.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let (s, k) = (store.clone(), key.clone());
                    match tokio::task::spawn_blocking(move || s.renew_lease(&k, Holder::this_process(), ttl)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) if e.is_retryable() => {
                            tracing::warn!(error = %e, "renewing the prepare lease failed; retrying")
                        }
                        _ => {
                            lost.cancel();
                            return;
                        }
                    }
                }
            })
        };
        let outcome = tokio::select! {
            o = self.host.pipeline.prepare(family) => Some(o),
            _ = lost.cancelled() => None,
        };
        renewer.abort();
        let result = match outcome {
            None => {
                Err(Prep::Retry(format!("lost the prepare lease of {family}; another process may be preparing it")))
            }
            Some(Err(e)) => Err(Prep::Retry(run_error(e))),
            Some(Ok(Outcome::Failed(f))) => {
                if f.step == "fetch_manifest" && f.kind == FailureKind::Aborted {
                    Err(Prep::Unknown(f))
                } else {
                    Err(Prep::Failed(f))
                }
            }
            Some(Ok(Outcome::Completed(w))) => match w.base_vol_id {
                Some(base) => {
                    fault::point("jobloop.before_prepared_flag", family);
                    let (store, f) = (self.host.store.clone(), family.to_owned());
                    blocking(move || store.set_prepared(&f, true)).await?;
                    Ok(base)
                }
                None => Err(Prep::Failed(Failure {
                    step: "prepare".into(),
                    error: "prepare completed without a base".into(),
                    kind: FailureKind::Corrupt,
                })),
            },
        };
        let (store, k) = (self.host.store.clone(), key);
        if let Err(e) = blocking(move || store.release_lease(&k, Holder::this_process())).await {
            tracing::warn!(family, "could not release the prepare lease ({e:?}); it expires by itself");
        }
        result
    }

    /// The base of a prepared family whose volume is sealed, if any.
    async fn prepared_base(&self, family: &str) -> Result<Option<u64>, Prep> {
        let (store, f) = (self.host.store.clone(), family.to_owned());
        let row = blocking(move || store.image(&f)).await?;
        Ok(row.filter(|r| r.prepared).and_then(|r| r.base_vol_id))
    }
}

/// Why `ensure_prepared` gave no base.
enum Prep {
    /// The family does not resolve (no such family, no layers, malformed manifest).
    Unknown(Failure),
    Failed(Failure),
    Retry(String),
}

impl std::fmt::Debug for Prep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prep::Unknown(x) | Prep::Failed(x) => write!(f, "{x}"),
            Prep::Retry(x) => f.write_str(x),
        }
    }
}

fn run_error(e: RunError) -> String {
    e.to_string()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, thinpipe::store::StoreError> + Send + 'static,
) -> Result<T, Prep> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Prep::Retry(e.to_string())),
        Err(e) => Err(Prep::Retry(format!("blocking task failed: {e}"))),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn forget(
    in_flight: &Mutex<HashMap<tokio::task::Id, Delivery>>,
    done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => {
            if e.is_panic() {
                tracing::error!("a job task panicked; its message returns when its visibility ends");
            }
            e.id()
        }
    };
    lock(in_flight).remove(&id);
}
