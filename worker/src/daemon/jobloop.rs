//! The job loop: receive, validate, run, publish the result, ack — with bounded
//! concurrency, a visibility heartbeat per job, and an explicit drain. The map's entry
//! point for a job: from here, `job/executor.rs` runs it.
//!
//! Per job: an invalid message is dead-lettered with the reason. The executor resolves the
//! version (`prepare`: the source's current one; `activate`: the host's current one, or the
//! pinned digest), runs `prepare-<family>@<digest prefix>` under the per-family lease when the
//! version has no sealed base yet, makes it current (the one place that does), and for
//! `activate` runs `activate-<invocation_id>`; `release` records the release and runs
//! `release-<invocation_id>`. A run that failed publishes a failure result and is acked; a
//! job naming a family or version that does not exist is dead-lettered too; anything
//! transient, and a fault of the host or program (a run record that does not decode, an
//! unregistered workflow), makes the message visible again after `retry_delay_secs`.
//!
//! While the state directory is short of room (`job/statespace.rs`), prepares and activations
//! get a `host_full` failed result (as above the volumes' refusal watermark) and releases,
//! which give space back, still run.
//!
//! Shutdown (a signal, a lost lease, a run log whose storage failed, or the admin API's
//! drain): the loop is not ready from that moment, stops receiving (a receive in flight is
//! finished, not dropped, and what it brought is handed back at once), hands back jobs still
//! waiting for their family's prepare, waits for the jobs in flight up to the drain deadline
//! (counted from the signal), makes the messages of jobs still running visible again, stops
//! the maintenance task, and returns; `Host::close` then stops the engine (the runs of
//! unfinished jobs stop their steps and resume at the next start). After an admin drain the process
//! stays up until it is told to stop.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thinpipe::sync::lock;

use thinpipe::job::{Job, JobKind, JobResult, JobStatus};
use thinpipe::queue::{Delivery, JobQueue};
use thinpipe::{fault, telemetry};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::daemon::backlog::Backlog;
use crate::daemon::order::{JobOrder, Turn};
use crate::daemon::receiver::{Received, Receiver, release};
use crate::host::Host;
use crate::job::executor::{Executor, JobEnd};

/// What the loop did, for logs and tests.
#[derive(Debug, Default)]
pub struct LoopReport {
    pub handled: u64,
    /// Jobs still running at the drain deadline, whose messages were released.
    pub released_at_drain: usize,
}

pub struct JobLoop {
    host: Arc<Host>,
    /// Received from in parallel (e.g. a host-specific queue and a fleet-wide one).
    queues: Vec<Arc<dyn JobQueue>>,
    executor: Executor,
    /// Keeps each invocation's jobs in receive order.
    order: Arc<JobOrder>,
    /// Jobs running now (for the admin API).
    running: Arc<AtomicUsize>,
    /// Fired by an admin drain.
    draining: CancellationToken,
    /// Queues whose last receive failed.
    receive_failing: Arc<AtomicUsize>,
    /// The queues' backlog gauges.
    backlog: Arc<Backlog>,
}

/// Counts a running job for as long as it lives (panics and aborts included).
struct Running(Arc<AtomicUsize>);

impl Running {
    fn start(counter: &Arc<AtomicUsize>) -> Running {
        counter.fetch_add(1, Ordering::SeqCst);
        Running(counter.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl JobLoop {
    /// `queues` must not be empty; each one's long poll holds a job slot, so the
    /// configuration requires `worker.concurrency >= queues.len()`.
    pub fn new(host: Arc<Host>, queues: Vec<Arc<dyn JobQueue>>) -> Arc<Self> {
        assert!(!queues.is_empty(), "a job loop needs a queue");
        let draining = CancellationToken::new();
        Arc::new(Self {
            executor: Executor::new(host.clone(), draining.clone()),
            backlog: Arc::new(Backlog::new(&queues)),
            order: Arc::default(),
            host,
            queues,
            running: Arc::default(),
            draining,
            receive_failing: Arc::default(),
        })
    }

    /// Stops taking jobs (the admin API's drain): running jobs finish, the process stays up
    /// until it is told to shut down.
    pub fn drain(&self) {
        if !self.draining.is_cancelled() {
            tracing::info!("drain requested: no new jobs will be taken");
        }
        self.draining.cancel();
    }

    /// Whether the loop is draining, whatever started it (the admin API, a signal, a lost
    /// lease): it takes no new jobs and is not ready.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Jobs running now.
    pub fn in_flight(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// The backlog gauges of the queues this loop reads.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    /// The room the state directory must keep for new jobs to be taken.
    pub fn state_space(&self) -> crate::job::statespace::StateSpace {
        crate::job::statespace::StateSpace::new(self.host.config.state_dir.clone())
    }

    /// Whether the last receive from some queue failed (the queue is not usable now).
    pub fn queue_failing(&self) -> bool {
        self.receive_failing.load(Ordering::SeqCst) > 0
    }

    /// Runs until `shutdown` fires (or the worker lease is lost), then drains.
    pub async fn run(self: &Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<LoopReport> {
        let cfg = &self.host.config;
        let report = self.host.engine.resume_all().await?;
        if !report.resumed.is_empty() || !report.failed.is_empty() {
            tracing::info!(resumed = report.resumed.len(), failed = report.failed.len(), "resumed unfinished runs");
        }
        let stop = CancellationToken::new();
        let lost = self.host.lease_lost.clone();
        // A run log whose storage failed refuses every write until it is opened again: stop.
        let broken = self.host.engine.storage_failed();
        let stopper = {
            let (stop, shutdown, lost, drain) = (stop.clone(), shutdown.clone(), lost.clone(), self.draining.clone());
            let broken = broken.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {},
                    _ = lost.cancelled() => {},
                    _ = broken.cancelled() => {},
                    _ = drain.cancelled() => {},
                }
                // Whatever started the drain, the worker is not ready from now on.
                drain.cancel();
                stop.cancel();
            })
        };
        // Releases recorded whose run was lost (older versions) are finished before new work.
        match self.host.pipeline.finish_pending_releases().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(releases = n, "finished releases recorded before this start"),
            Err(e) => tracing::warn!(error = %e, "could not finish the releases recorded before this start"),
        }
        // Expiry and garbage collection run beside the jobs until the loop stops.
        let maintenance_stop = CancellationToken::new();
        let maintenance = {
            let (host, stop) = (self.host.clone(), maintenance_stop.clone());
            tokio::spawn(async move { host.lifecycle.run(stop).await })
        };
        // The backlog gauges follow a timer only when metrics go out over OTLP; a scrape of
        // `/metrics` refreshes them itself.
        let backlog = telemetry::otlp_metrics_enabled().then(|| {
            let (backlog, stop) = (self.backlog.clone(), maintenance_stop.clone());
            tokio::spawn(async move { backlog.run(stop).await })
        });
        // One receiver per queue; they share the job slots and hand over what they receive.
        let slots = Arc::new(tokio::sync::Semaphore::new(cfg.worker.concurrency));
        let share = cfg.worker.concurrency.div_ceil(self.queues.len()).clamp(1, 10);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Received>(cfg.worker.concurrency);
        let mut receivers = JoinSet::new();
        for queue in &self.queues {
            let receiver = Receiver {
                queue: queue.clone(),
                slots: slots.clone(),
                share,
                wait: Duration::from_secs(cfg.queue.wait_secs),
                stop: stop.clone(),
                tx: tx.clone(),
                failing: self.receive_failing.clone(),
            };
            receivers.spawn(receiver.run());
        }
        drop(tx);
        let in_flight: Arc<Mutex<InFlight>> = Arc::default();
        let mut tasks = JoinSet::new();
        let mut out = LoopReport::default();
        // The drain deadline counts from the signal, not from the end of the receives that
        // were in flight then (an SQS long poll is waited out, so its messages can be handed back).
        let mut shutdown_at = None;
        // Until every receiver has stopped (they stop when `stop` fires).
        loop {
            tokio::select! {
                _ = shutdown.cancelled(), if shutdown_at.is_none() => shutdown_at = Some(tokio::time::Instant::now()),
                _ = lost.cancelled(), if shutdown_at.is_none() => shutdown_at = Some(tokio::time::Instant::now()),
                _ = broken.cancelled(), if shutdown_at.is_none() => shutdown_at = Some(tokio::time::Instant::now()),
                received = rx.recv() => {
                    let Some(Received { queue, delivery, permit }) = received else { break };
                    let this = self.clone();
                    let (q, d) = (queue.clone(), delivery.clone());
                    let running = Running::start(&self.running);
                    // Taken here, in receive order: an invocation's jobs run in that order.
                    let turn = self.order.take(invocation_of(&delivery.body).as_deref());
                    let handle = tasks.spawn(async move {
                        this.handle(&q, d, permit, turn).await;
                        drop(running);
                    });
                    lock(&in_flight).insert(handle.id(), (queue, delivery));
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    out.handled += 1;
                    forget(&in_flight, done);
                }
            }
        }
        while receivers.join_next().await.is_some() {}
        stopper.abort();
        if !shutdown.is_cancelled() && !lost.is_cancelled() && !broken.is_cancelled() {
            // An admin drain: jobs finish at their own pace; then the process waits to be
            // stopped (an upgrade replaces the binary meanwhile).
            tracing::info!(in_flight = tasks.len(), "drained: waiting for running jobs, then for shutdown");
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = lost.cancelled() => break,
                    _ = broken.cancelled() => break,
                    Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                        out.handled += 1;
                        forget(&in_flight, done);
                    }
                }
            }
        }
        // Drain: in-flight jobs get until the deadline.
        let deadline =
            shutdown_at.unwrap_or_else(tokio::time::Instant::now) + Duration::from_secs(cfg.worker.drain_deadline_secs);
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
        // Maintenance returns at once when told, dropping a pass where it stands (see
        // `Lifecycle::run`); the deadline only bounds a pass stuck outside an await.
        maintenance_stop.cancel();
        let mut maintenance = maintenance;
        if tokio::time::timeout_at(deadline, &mut maintenance).await.is_err() {
            maintenance.abort();
            tracing::warn!("drain deadline passed during a maintenance pass; its runs resume at the next start");
        }
        if let Some(backlog) = backlog
            && let Err(e) = backlog.await
        {
            tracing::warn!(error = %e, "the backlog gauges' task ended abnormally");
        }
        let left: Vec<(Arc<dyn JobQueue>, Delivery)> = lock(&in_flight).drain().map(|(_, d)| d).collect();
        out.released_at_drain = left.len();
        for (queue, d) in &left {
            release(queue.as_ref(), d).await;
        }
        if !left.is_empty() {
            tracing::warn!(jobs = left.len(), "drain deadline passed: released the messages of unfinished jobs");
        }
        Ok(out)
    }

    /// Handles one delivery from start to ack. The job slot `permit` is given back as soon
    /// as the job's work is done, before the result is sent and the message acked (acks are
    /// batched and may linger).
    async fn handle(&self, queue: &Arc<dyn JobQueue>, d: Delivery, permit: OwnedSemaphorePermit, mut turn: Turn) {
        let job = match Job::parse(&d.body) {
            Ok(job) => job,
            Err(reason) => {
                tracing::warn!(message_id = %d.message_id, %reason, "invalid job message: dead-lettering it");
                telemetry::metrics()
                    .jobs
                    .add(1, &[telemetry::kv("kind", "invalid"), telemetry::kv("outcome", "dead_lettered")]);
                if let Err(e) = queue.dead_letter(&d, &reason.0).await {
                    tracing::error!(message_id = %d.message_id, error = %e, "could not dead-letter an invalid message; it will come back");
                }
                return;
            }
        };
        let span = tracing::info_span!(
            "job",
            message_id = %d.message_id,
            kind = %job.kind,
            family = %job.family,
            invocation_id = job.invocation_id.as_deref(),
            // A prepare's run id names its version, known once it is resolved (recorded below).
            run_id = (job.kind != JobKind::Prepare).then(|| job.run_id()),
            host_id = %self.host.config.worker.host_id,
            outcome = tracing::field::Empty,
        );
        // The job continues the trace of whoever posted it.
        if let Some(parent) = d.attributes.get(telemetry::TRACEPARENT) {
            telemetry::set_parent(&span, parent);
        }
        let started = std::time::Instant::now();
        span.in_scope(|| tracing::info!(receive_count = d.receive_count, "job received"));
        // Dropped (and the heartbeat aborted) however this task ends, abort and panic included.
        let heartbeat = self.spawn_heartbeat(queue, d.clone());
        turn.wait().await;
        let end = tracing::Instrument::instrument(self.executor.execute(&job, &d.message_id), span.clone()).await;
        drop(permit);
        drop(heartbeat);
        let outcome = match &end {
            JobEnd::Done(r) if r.status == JobStatus::Succeeded => "succeeded",
            JobEnd::Done(_) => "failed",
            JobEnd::DeadLetter(..) => "dead_lettered",
            JobEnd::Retry(_) => "retried",
            JobEnd::HandBack => "handed_back",
        };
        span.record("outcome", outcome);
        if let JobEnd::Done(r) | JobEnd::DeadLetter(_, Some(r)) = &end
            && job.kind == JobKind::Prepare
            && !r.run_id.is_empty()
        {
            span.record("run_id", r.run_id.as_str());
        }
        telemetry::metrics()
            .jobs
            .add(1, &[telemetry::kv("kind", job.kind.to_string()), telemetry::kv("outcome", outcome)]);
        tracing::Instrument::instrument(self.finish(queue, &d, &job, end, started), span).await;
    }

    /// Publishes a finished job's result and acks, dead-letters or delays its message.
    /// Logs `job done` with its outcome and duration: at INFO when it succeeded, at WARN when
    /// it failed (every failure, whatever its cause, at one level).
    async fn finish(
        &self,
        queue: &Arc<dyn JobQueue>,
        d: &Delivery,
        job: &Job,
        end: JobEnd,
        started: std::time::Instant,
    ) {
        match end {
            JobEnd::Done(result) => {
                if !self.reply(queue, job, &result).await {
                    self.retry_later(queue, d, "the result could not be sent").await;
                    return;
                }
                fault::point("jobloop.before_ack", &job.run_id());
                let duration_ms = started.elapsed().as_millis() as u64;
                match queue.ack(d).await {
                    Ok(()) if result.status == JobStatus::Succeeded => {
                        tracing::info!(message_id = %d.message_id, outcome = "succeeded", duration_ms, "job done")
                    }
                    Ok(()) => tracing::warn!(
                        message_id = %d.message_id,
                        outcome = "failed",
                        duration_ms,
                        error = result.error.as_deref().unwrap_or_default(),
                        "job done"
                    ),
                    Err(e) => {
                        tracing::warn!(message_id = %d.message_id, error = %e, "ack failed; the job will be redelivered and its stored outcome returned")
                    }
                }
            }
            JobEnd::DeadLetter(reason, result) => {
                if let Some(result) = result
                    && !self.reply(queue, job, &result).await
                {
                    self.retry_later(queue, d, "the result could not be sent").await;
                    return;
                }
                let duration_ms = started.elapsed().as_millis() as u64;
                tracing::warn!(message_id = %d.message_id, outcome = "dead_lettered", duration_ms, %reason, "job done: dead-lettering it");
                if let Err(e) = queue.dead_letter(d, &reason).await {
                    tracing::error!(message_id = %d.message_id, error = %e, "could not dead-letter the job; it will come back");
                }
            }
            JobEnd::Retry(reason) => self.retry_later(queue, d, &reason).await,
            JobEnd::HandBack => {
                tracing::info!(message_id = %d.message_id, "draining: handed back a job that had not started");
                release(queue.as_ref(), d).await;
            }
        }
    }

    async fn retry_later(&self, queue: &Arc<dyn JobQueue>, d: &Delivery, reason: &str) {
        let delay = Duration::from_secs(self.host.config.worker.retry_delay_secs);
        // A job that could not run because this host's storage is short is not the job's
        // fault: its receive is not counted towards the dead letter (where the queue allows).
        let host_fault =
            self.host.engine.storage_fault().map(|f| f.to_string()).or_else(|| self.state_space().shortage());
        let deferred = match &host_fault {
            Some(why) => {
                tracing::warn!(message_id = %d.message_id, %reason, host = %why, "job will be retried; this receive is not counted");
                queue.defer_uncounted(d, delay).await
            }
            None => {
                tracing::warn!(message_id = %d.message_id, %reason, "job will be retried");
                queue.extend(d, delay).await
            }
        };
        if let Err(e) = deferred {
            tracing::warn!(message_id = %d.message_id, error = %e, "could not delay the retry; the message returns when its visibility ends");
        }
    }

    /// Sends the result to `reply_to`. True if there was nothing to send, it was sent, or
    /// the reply queue is gone for good (the requester left; the outcome stays in the run
    /// log, and holding the job back would only redeliver it forever). False if sending
    /// may work later.
    async fn reply(&self, queue: &Arc<dyn JobQueue>, job: &Job, result: &JobResult) -> bool {
        let Some(to) = &job.reply_to else { return true };
        let body = match serde_json::to_string(result) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a job result");
                return false;
            }
        };
        match queue.send(to, &body, &BTreeMap::new()).await {
            Ok(_) => true,
            Err(e) if !e.is_retryable() => {
                tracing::warn!(reply_to = %to, error = %e, run_id = %result.run_id, "the reply queue cannot take the result; it stays in the run log");
                true
            }
            Err(e) => {
                tracing::warn!(reply_to = %to, error = %e, "sending the result failed");
                false
            }
        }
    }

    /// Extends the message's visibility every third of it until the returned handle is
    /// dropped (which aborts the task).
    fn spawn_heartbeat(&self, queue: &Arc<dyn JobQueue>, d: Delivery) -> AbortOnDropHandle<()> {
        let queue = queue.clone();
        let visibility = Duration::from_secs(self.host.config.queue.visibility_timeout_secs);
        AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                tokio::time::sleep(visibility / 3).await;
                if let Err(e) = queue.extend(&d, visibility).await {
                    tracing::warn!(message_id = %d.message_id, error = %e, "visibility heartbeat failed");
                }
            }
        }))
    }
}

/// The message (and its queue) of each running job task.
type InFlight = HashMap<tokio::task::Id, (Arc<dyn JobQueue>, Delivery)>;

/// The invocation a message is about, if it names one (an unreadable body has none; the
/// job's task dead-letters it).
fn invocation_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("invocation_id")?.as_str().map(str::to_owned)
}

fn forget(in_flight: &Mutex<InFlight>, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
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
