//! The engine: owns the run log; starts, resumes, waits on, cancels, archives and prunes
//! runs, and shuts down. The per-run loop is in `runner`, the state both share in `state`,
//! the history reads in `history`, the typed handle in `handle`; every write goes through
//! `writer`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::{ArchiveError, CancelError, OpenError, PruneError, ReadError, StartError, WaitError};
use super::key;
use super::runner;
use super::schema::{EventKind, Failure, FailureKind, LOG, RUNS, RunRecord, RunStatus, now_ms, read_header};
use super::state::{Inner, RawOutcome, RunEnd, Running, lock};
use super::workflow::{BoundRun, ErasedWorkflow};
use super::writer::{Change, Op, OpError, Reply, Unrecorded, Update, Writer};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Finished runs older than this are pruned with their history. Active runs never are.
    pub retention: Duration,
    /// How often the pruner looks; `None` runs no pruner (call `prune_finished_before`).
    pub prune_interval: Option<Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { retention: Duration::from_secs(7 * 24 * 3600), prune_interval: Some(Duration::from_secs(3600)) }
    }
}

/// A run's terminal outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<W> {
    Completed(W),
    Failed(Failure),
}

/// What `start` found.
#[derive(Clone, Debug, PartialEq)]
pub enum StartOutcome<W> {
    /// A new run was recorded and is running.
    Started,
    /// The id is an active run; wait on it.
    AlreadyRunning,
    /// The id already finished; here is its stored outcome.
    Finished(Outcome<W>),
}

/// What `resume_all` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResumeReport {
    pub resumed: Vec<String>,
    /// Runs that could not be resumed and were marked failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Active runs of workflows this process did not register; left untouched.
    pub unknown_workflow: Vec<String>,
}

/// The durable FSM engine. Cheap to clone; all clones share one run log.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl Engine {
    /// Opens (or creates) the run log at `path`. Must be called inside a tokio runtime: the
    /// engine spawns its pruner there. Nothing runs until `start` or `resume_all`.
    pub async fn open(path: impl AsRef<Path>, config: EngineConfig) -> Result<Engine, OpenError> {
        let path = path.as_ref().to_path_buf();
        tokio::runtime::Handle::try_current().map_err(|_| OpenError::NoRuntime)?;
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::AlreadyOpen { path }),
            Err(error) => return Err(OpenError::Open { path, error }),
        };
        Self::on_database(db, path, config)
    }

    /// The engine on an open redb database (`path` names it in messages): what `open` does
    /// after opening the file, and what tests use with a storage backend of their own.
    pub(crate) fn on_database(db: Database, path: PathBuf, config: EngineConfig) -> Result<Engine, OpenError> {
        let db = Arc::new(db);
        let writer = Writer::open(db.clone()).map_err(|error| OpenError::Init { path: path.clone(), error })?;
        let engine = Engine {
            inner: Arc::new(Inner {
                path,
                db,
                writer,
                workflows: RwLock::new(HashMap::new()),
                waiters: Mutex::new(HashMap::new()),
                running: Mutex::new(HashMap::new()),
                unrecorded: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        };
        engine.spawn_pruner(&config);
        Ok(engine)
    }

    /// The run log's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(super) fn workflow(&self, name: &str) -> Option<Arc<dyn ErasedWorkflow>> {
        let map = crate::sync::read(&self.inner.workflows);
        map.get(name).cloned()
    }

    /// Fires when a commit of the run log failed on its storage (a full disk, an I/O
    /// error). redb then refuses every write until the file is opened again: the owner
    /// reports itself not ready and restarts (the worker exits; its supervisor starts it).
    pub fn storage_failed(&self) -> tokio_util::sync::CancellationToken {
        self.inner.writer.faulted()
    }

    /// Why the run log refuses writes, once [`Engine::storage_failed`] fired.
    pub fn storage_fault(&self) -> Option<String> {
        self.inner.writer.fault()
    }

    /// Commits made by the run log's writer so far. Fewer commits than transitions means
    /// the group commit is sharing fsyncs.
    pub fn commit_count(&self) -> u64 {
        self.inner.writer.commits()
    }

    pub(super) async fn start_raw(
        &self,
        wf: Arc<dyn ErasedWorkflow>,
        id: &str,
        input: Vec<u8>,
        w0: Vec<u8>,
    ) -> Result<StartOutcome<Vec<u8>>, StartError> {
        if id.is_empty() || id.len() > key::MAX_RUN_ID_LEN {
            return Err(StartError::InvalidId(id.to_owned()));
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(StartError::ShutDown);
        }
        let now = now_ms();
        let record = RunRecord {
            workflow: wf.name().to_owned(),
            version: wf.version(),
            status: RunStatus::Active,
            next_step: 0,
            attempts: 0,
            failed_attempts: 0,
            next_event: 0,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            failure: None,
            trace_parent: crate::telemetry::current_traceparent(),
        };
        let trace_parent = record.trace_parent.clone();
        if !wf.durable_start() {
            let outcome = self.start_unrecorded(wf.clone(), id, Unrecorded { record, input, w0 }, trace_parent)?;
            if matches!(outcome, StartOutcome::AlreadyRunning) {
                self.drive_if_stalled(wf, id).await?;
            }
            return Ok(outcome);
        }
        let op = Op::Start { id: id.to_owned(), record, input: input.clone(), w0: w0.clone() };
        match self.inner.writer.submit(op).await {
            Ok(Reply::Created) => {
                let bound = wf.bind(id.into(), &input).map_err(|why| StartError::Corrupt { id: id.to_owned(), why })?;
                let position = runner::Position { w: w0, step: 0, attempts: 0 };
                self.spawn_run(wf, bound, id.to_owned(), position, None, trace_parent);
                Ok(StartOutcome::Started)
            }
            Ok(Reply::Exists(existing)) => {
                let outcome = self.existing_run(&wf, id, &input, existing)?;
                if matches!(outcome, StartOutcome::AlreadyRunning) {
                    self.drive_if_stalled(wf, id).await?;
                }
                Ok(outcome)
            }
            Ok(Reply::Applied | Reply::Pruned(_)) => Err(StartError::Storage("unexpected reply to start".into())),
            Err(OpError::Stopped) => Err(StartError::ShutDown),
            Err(OpError::Fenced { id, why }) => Err(StartError::Corrupt { id, why }),
            Err(e) => Err(StartError::Storage(e.to_string())),
        }
    }

    /// Starts a run whose start is committed with its first transition: nothing is written
    /// now. Decided under the `unrecorded` lock, so two starts of one id make one run.
    fn start_unrecorded(
        &self,
        wf: Arc<dyn ErasedWorkflow>,
        id: &str,
        start: Unrecorded,
        trace_parent: Option<String>,
    ) -> Result<StartOutcome<Vec<u8>>, StartError> {
        enum Found {
            New,
            Unrecorded(Unrecorded),
            Recorded(RunRecord),
        }
        let found = {
            let mut unrecorded = lock(&self.inner.unrecorded);
            match unrecorded.get(id) {
                Some(other) => Found::Unrecorded(other.clone()),
                None => match self.read_record(id).map_err(|e| StartError::Storage(e.to_string()))? {
                    Some(Ok(existing)) => Found::Recorded(existing),
                    Some(Err(why)) => {
                        let why = format!("its stored record does not decode: {why}");
                        return Err(StartError::Corrupt { id: id.to_owned(), why });
                    }
                    None => {
                        unrecorded.insert(id.to_owned(), start.clone());
                        Found::New
                    }
                },
            }
        };
        match found {
            Found::New => {
                let bound = match wf.bind(id.into(), &start.input) {
                    Ok(b) => b,
                    Err(why) => {
                        lock(&self.inner.unrecorded).remove(id);
                        return Err(StartError::Corrupt { id: id.to_owned(), why });
                    }
                };
                let position = runner::Position { w: start.w0.clone(), step: 0, attempts: 0 };
                self.spawn_run(wf, bound, id.to_owned(), position, Some(start), trace_parent);
                Ok(StartOutcome::Started)
            }
            Found::Unrecorded(other) => {
                if other.record.workflow != wf.name() {
                    return Err(StartError::WrongWorkflow {
                        id: id.to_owned(),
                        existing: other.record.workflow,
                        requested: wf.name().to_owned(),
                    });
                }
                if other.input != start.input {
                    let existing = String::from_utf8_lossy(&other.input).into_owned();
                    return Err(StartError::InputMismatch { id: id.to_owned(), existing });
                }
                Ok(StartOutcome::AlreadyRunning)
            }
            Found::Recorded(existing) => self.existing_run(&wf, id, &start.input, existing),
        }
    }

    /// After `start` joined run `id` as already running: an active run that no task here
    /// drives (a failed commit stopped it) is resumed now, not left for the next start, so
    /// that its caller does not wait on nothing.
    async fn drive_if_stalled(&self, wf: Arc<dyn ErasedWorkflow>, id: &str) -> Result<(), StartError> {
        if self.is_driven_here(id) {
            return Ok(());
        }
        match self.read_record(id).map_err(|e| StartError::Storage(e.to_string()))? {
            Some(Ok(record)) if record.status == RunStatus::Active => match self.resume_run(wf, id, &record).await {
                Resumed::Yes | Resumed::MarkedFailed(_) => Ok(()),
                Resumed::Left => Err(StartError::Storage(format!("run {id} is stalled and could not be resumed"))),
            },
            // Finished meanwhile: a wait returns its outcome.
            _ => Ok(()),
        }
    }

    /// `start` found run `id` in the run log: the same work is joined or its outcome
    /// returned; other work under the same id is refused.
    fn existing_run(
        &self,
        wf: &Arc<dyn ErasedWorkflow>,
        id: &str,
        input: &[u8],
        existing: RunRecord,
    ) -> Result<StartOutcome<Vec<u8>>, StartError> {
        if existing.workflow != wf.name() {
            return Err(StartError::WrongWorkflow {
                id: id.to_owned(),
                existing: existing.workflow,
                requested: wf.name().to_owned(),
            });
        }
        let stored = self.read_input(id).map_err(|e| StartError::Storage(e.to_string()))?;
        if let Some(stored) = stored
            && stored != input
        {
            return Err(StartError::InputMismatch {
                id: id.to_owned(),
                existing: String::from_utf8_lossy(&stored).into_owned(),
            });
        }
        match self.read_end(id).map_err(|e| StartError::Storage(e.to_string()))? {
            Lookup::Active => Ok(StartOutcome::AlreadyRunning),
            Lookup::NotFound => Err(StartError::Storage(format!("run {id} vanished during start"))),
            Lookup::Finished(RawOutcome::Completed(w)) => Ok(StartOutcome::Finished(Outcome::Completed(w))),
            Lookup::Finished(RawOutcome::Failed(f)) => Ok(StartOutcome::Finished(Outcome::Failed(f))),
        }
    }

    fn spawn_run(
        &self,
        wf: Arc<dyn ErasedWorkflow>,
        bound: Arc<dyn BoundRun>,
        id: String,
        position: runner::Position,
        unrecorded: Option<Unrecorded>,
        trace_parent: Option<String>,
    ) {
        let run = Running { stop: self.inner.shutdown.child_token(), ended: CancellationToken::new() };
        {
            let mut running = lock(&self.inner.running);
            if running.contains_key(&id) {
                return;
            }
            running.insert(id.clone(), run.clone());
        }
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            let end =
                runner::drive(&inner, wf, bound, &id, position, unrecorded, trace_parent.as_deref(), &run.stop).await;
            // A run that stopped before its first commit leaves nothing behind.
            lock(&inner.unrecorded).remove(&id);
            lock(&inner.running).remove(&id);
            run.ended.cancel();
            if let Some(end) = end {
                inner.notify(&id, end);
            }
        });
    }

    /// Waits for a run to finish and returns its stored outcome, raw.
    pub(super) async fn wait_raw(&self, id: &str) -> Result<RawOutcome, WaitError> {
        let interrupted = |reason: &str| WaitError::Interrupted { id: id.to_owned(), reason: reason.to_owned() };
        if self.inner.shutdown.is_cancelled() {
            return Err(interrupted("the engine shut down"));
        }
        // Subscribe before reading, so a finish between the read and the wait is not missed.
        let mut rx =
            lock(&self.inner.waiters).entry(id.to_owned()).or_insert_with(|| watch::channel(None).0).subscribe();
        let mut found = self.read_end(id).map_err(|e| WaitError::Storage(e.to_string()))?;
        if let Lookup::NotFound = found {
            // Started but not yet recorded: wait for it. An entry leaves `unrecorded` only
            // after its first commit, so if it is gone now, the run log has it.
            let pending = lock(&self.inner.unrecorded).contains_key(id);
            found = if pending {
                Lookup::Active
            } else {
                self.read_end(id).map_err(|e| WaitError::Storage(e.to_string()))?
            };
        }
        if let Lookup::Active = found
            && !self.is_driven_here(id)
        {
            // No task of this process drives it (its last commit failed, or nothing has
            // resumed it yet): read again, since a task that just ended committed first.
            found = match self.read_end(id).map_err(|e| WaitError::Storage(e.to_string()))? {
                Lookup::Active => {
                    self.forget_waiter(id);
                    return Err(interrupted(
                        "it is not running in this process (its last commit failed, or it was not resumed); starting it again, or the next start, resumes it",
                    ));
                }
                other => other,
            };
        }
        match found {
            Lookup::Finished(outcome) => return Ok(outcome),
            Lookup::NotFound => {
                self.forget_waiter(id);
                return Err(WaitError::NotFound(id.to_owned()));
            }
            Lookup::Active => {}
        }
        loop {
            if let Some(end) = rx.borrow_and_update().clone() {
                return match end {
                    RunEnd::Finished(outcome) => Ok(outcome),
                    RunEnd::Interrupted(reason) => Err(interrupted(&reason)),
                };
            }
            if rx.changed().await.is_err() {
                return Err(interrupted("the engine shut down"));
            }
        }
    }

    /// Ends an active run as failed with `reason`. Its current step is stopped at its next
    /// await point; a transition it was about to commit is fenced out.
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<(), CancelError> {
        let (record, start) = {
            let unrecorded = lock(&self.inner.unrecorded);
            match unrecorded.get(id) {
                // Not yet in the run log: the failure is recorded with its start.
                Some(u) => (Some(Ok(u.record.clone())), Some(Box::new(u.clone()))),
                None => (self.read_record(id).map_err(|e| CancelError::Storage(e.to_string()))?, None),
            }
        };
        let record = match record {
            None => return Err(CancelError::NotFound(id.to_owned())),
            Some(Err(why)) => return Err(CancelError::Storage(format!("run {id} record does not decode: {why}"))),
            Some(Ok(r)) => r,
        };
        if record.status != RunStatus::Active {
            return Err(CancelError::NotActive { id: id.to_owned(), status: record.status });
        }
        let step = self
            .workflow(&record.workflow)
            .map_or_else(|| format!("#{}", record.next_step), |w| w.step_name(record.next_step as usize).to_owned());
        let failure = Failure { step, error: reason.to_owned(), kind: FailureKind::Cancelled, code: None };
        let change = Change {
            id: id.to_owned(),
            start,
            expect_step: None,
            update: Update::Fail(failure.clone()),
            events: Vec::new(),
        };
        let was_unrecorded = change.start.is_some();
        match self.inner.writer.submit(Op::Change(change)).await {
            Ok(_) => {
                if was_unrecorded {
                    lock(&self.inner.unrecorded).remove(id);
                }
            }
            // It finished between our read and our write.
            Err(OpError::Fenced { .. }) => {
                let now = self.read_record(id).map_err(|e| CancelError::Storage(e.to_string()))?;
                let status = now.and_then(Result::ok).map_or(RunStatus::Failed, |r| r.status);
                return Err(CancelError::NotActive { id: id.to_owned(), status });
            }
            Err(OpError::NotFound(_)) => return Err(CancelError::NotFound(id.to_owned())),
            Err(OpError::Stopped) => return Err(CancelError::ShutDown),
            Err(e) => return Err(CancelError::Storage(e.to_string())),
        }
        if let Some(run) = lock(&self.inner.running).get(id) {
            run.stop.cancel();
        }
        self.inner.notify(id, RunEnd::Finished(RawOutcome::Failed(failure)));
        Ok(())
    }

    /// Stops the task driving run `id` in this process without recording anything: the run
    /// stays active, resumable by the next start. Returns once the task has ended, its
    /// step's blocking work included (`fsm/stop.rs`); waiters get `Interrupted` with
    /// `reason`. `false` if no task of this engine drives it.
    pub async fn stop_run(&self, id: &str, reason: &str) -> bool {
        let Some(run) = lock(&self.inner.running).get(id).cloned() else { return false };
        run.stop.cancel();
        run.ended.cancelled().await;
        self.inner.notify(id, RunEnd::Interrupted(reason.to_owned()));
        true
    }

    /// Re-runs every unfinished run of every registered workflow, each from its own last
    /// completed step with its own response and attempt count. A run that cannot be decoded
    /// is marked failed with the reason; it does not stop the others.
    pub async fn resume_all(&self) -> Result<ResumeReport, ReadError> {
        let mut report = ResumeReport::default();
        let mut active = Vec::new();
        let mut corrupt = Vec::new();
        {
            let txn = self.inner.db.begin_read().map_err(ReadError::from_any)?;
            let runs = txn.open_table(RUNS).map_err(ReadError::from_any)?;
            let log = txn.open_table(LOG).map_err(ReadError::from_any)?;
            for entry in runs.iter().map_err(ReadError::from_any)? {
                let (id, value) = entry.map_err(ReadError::from_any)?;
                let id = id.value().to_owned();
                match serde_json::from_slice::<RunRecord>(value.value()) {
                    Ok(r) if r.status == RunStatus::Active => {}
                    Ok(_) => continue,
                    Err(e) => {
                        corrupt.push((id, format!("run index record does not decode: {e}")));
                        continue;
                    }
                }
                match read_header(&log, &id).map_err(ReadError::from_any)? {
                    Some(Ok(r)) if r.status == RunStatus::Active => active.push((id, r)),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => corrupt.push((id, format!("run record does not decode: {e}"))),
                    None => corrupt.push((id, "run record is missing".to_owned())),
                }
            }
        }
        for (id, reason) in corrupt {
            tracing::error!(run_id = %id, %reason, "marking undecodable run failed");
            match self.inner.writer.submit(Op::MarkCorrupt { id: id.clone(), reason: reason.clone() }).await {
                Ok(_) => report.failed.push((id, reason)),
                Err(e) => tracing::error!(run_id = %id, error = %e, "could not mark undecodable run failed"),
            }
        }
        for (id, record) in active {
            if lock(&self.inner.running).contains_key(&id) {
                continue;
            }
            let Some(wf) = self.workflow(&record.workflow) else {
                tracing::warn!(run_id = %id, workflow = %record.workflow, "active run of an unregistered workflow left as is");
                report.unknown_workflow.push(id);
                continue;
            };
            match self.resume_run(wf, &id, &record).await {
                Resumed::Yes => report.resumed.push(id),
                Resumed::MarkedFailed(reason) => report.failed.push((id, reason)),
                Resumed::Left => {}
            }
        }
        Ok(report)
    }

    /// Picks run `id` (active in the run log, `record` its header) up again from its own
    /// last completed step; a run that can never resume is marked failed with the reason.
    async fn resume_run(&self, wf: Arc<dyn ErasedWorkflow>, id: &str, record: &RunRecord) -> Resumed {
        match self.prepare_resume(&wf, id, record) {
            Ok((bound, w)) => {
                let step = wf.step_name(record.next_step as usize).to_owned();
                let change = Change {
                    id: id.to_owned(),
                    start: None,
                    expect_step: Some(record.next_step),
                    update: Update::Nothing,
                    events: vec![EventKind::Resumed { step, attempts: record.attempts }],
                };
                match self.inner.writer.submit(Op::Change(change)).await {
                    Ok(_) => {
                        let trace = record.trace_parent.clone();
                        let position = runner::Position { w, step: record.next_step, attempts: record.attempts };
                        self.spawn_run(wf, bound, id.to_owned(), position, None, trace);
                        Resumed::Yes
                    }
                    Err(e) => {
                        tracing::error!(run_id = %id, error = %e, "could not record the resume; the run stays active");
                        Resumed::Left
                    }
                }
            }
            Err(ResumeBlocker::Storage(e)) => {
                tracing::error!(run_id = %id, error = %e, "reading the run failed; it stays active for the next start");
                Resumed::Left
            }
            Err(ResumeBlocker::Corrupt(reason)) => {
                tracing::error!(run_id = %id, %reason, "run cannot resume; marking it failed");
                let failure = Failure {
                    step: wf.step_name(record.next_step as usize).to_owned(),
                    error: reason.clone(),
                    kind: FailureKind::Corrupt,
                    code: None,
                };
                let change = Change {
                    id: id.to_owned(),
                    start: None,
                    expect_step: None,
                    update: Update::Fail(failure.clone()),
                    events: Vec::new(),
                };
                match self.inner.writer.submit(Op::Change(change)).await {
                    Ok(_) => {
                        self.inner.notify(id, RunEnd::Finished(RawOutcome::Failed(failure)));
                        Resumed::MarkedFailed(reason)
                    }
                    Err(e) => {
                        tracing::error!(run_id = %id, error = %e, "could not mark the run failed");
                        Resumed::Left
                    }
                }
            }
        }
    }

    /// Drops the waiter entry of `id` if no one else waits on it.
    fn forget_waiter(&self, id: &str) {
        let mut waiters = lock(&self.inner.waiters);
        if waiters.get(id).is_some_and(|tx| tx.receiver_count() <= 1) {
            waiters.remove(id);
        }
    }

    /// Whether run `id` has a task in this process, or is started and not yet recorded.
    fn is_driven_here(&self, id: &str) -> bool {
        lock(&self.inner.running).contains_key(id) || lock(&self.inner.unrecorded).contains_key(id)
    }

    fn read_log(&self, key: &[u8]) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        Ok(txn.open_table(LOG)?.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Loads what a resume needs. `Corrupt(reason)`: the run can never resume; `Storage`:
    /// reading failed, try at the next start.
    fn prepare_resume(
        &self,
        wf: &Arc<dyn ErasedWorkflow>,
        id: &str,
        record: &RunRecord,
    ) -> Result<(Arc<dyn BoundRun>, Vec<u8>), ResumeBlocker> {
        if record.version != wf.version() {
            return Err(ResumeBlocker::Corrupt(format!(
                "run was started by version {} of workflow {}; this build has version {}",
                record.version,
                wf.name(),
                wf.version()
            )));
        }
        if record.next_step as usize >= wf.step_count() {
            return Err(ResumeBlocker::Corrupt(format!(
                "run is active at step {} but the workflow has {} steps",
                record.next_step,
                wf.step_count()
            )));
        }
        let input = self.read_log(&key::input_key(id)).map_err(ResumeBlocker::Storage)?;
        let w = self.read_log(&key::response_key(id, u64::from(record.next_step))).map_err(ResumeBlocker::Storage)?;
        let input = input.ok_or("the run's input is missing")?;
        let w = w.ok_or_else(|| format!("the response before step {} is missing", record.next_step))?;
        let bound = wf.bind(id.into(), &input)?;
        Ok((bound, w))
    }

    /// Stops every run at its next await point, leaving it active for the next start, then
    /// flushes and stops the writer. Waiters get `Interrupted`. Not a cancel.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let waiters: Vec<_> = lock(&self.inner.waiters).drain().collect();
        for (_, tx) in waiters {
            tx.send_replace(Some(RunEnd::Interrupted("the engine shut down".into())));
        }
        self.inner.writer.stop();
    }

    /// Moves finished run `id`, with its whole history, to `<id>~<finished ms>` and returns
    /// that id, so `id` can be started afresh (a new job retrying a failed prepare, or
    /// preparing again a version whose base was collected) while the old run stays
    /// inspectable. An active run is refused.
    pub async fn archive_finished(&self, id: &str) -> Result<String, ArchiveError> {
        if lock(&self.inner.unrecorded).contains_key(id) {
            // Started, its start not committed yet (guarantee 1): active.
            return Err(ArchiveError::StillActive(id.to_owned()));
        }
        let record = match self.read_record(id).map_err(|e| ArchiveError::Storage(e.to_string()))? {
            None => return Err(ArchiveError::NotFound(id.to_owned())),
            Some(Err(why)) => return Err(ArchiveError::Storage(format!("run {id} record does not decode: {why}"))),
            Some(Ok(r)) => r,
        };
        if !record.status.is_finished() {
            return Err(ArchiveError::StillActive(id.to_owned()));
        }
        let to = format!("{id}~{}", record.finished_at_ms.unwrap_or(record.updated_at_ms));
        match self.inner.writer.submit(Op::Archive { id: id.to_owned(), to: to.clone() }).await {
            Ok(_) => Ok(to),
            Err(OpError::NotFound(_)) => Err(ArchiveError::NotFound(id.to_owned())),
            Err(OpError::Stopped) => Err(ArchiveError::ShutDown),
            Err(e) => Err(ArchiveError::Storage(e.to_string())),
        }
    }

    /// Deletes finished runs that finished before `cutoff_ms` (ms since the epoch).
    pub async fn prune_finished_before(&self, cutoff_ms: u64) -> Result<usize, PruneError> {
        match self.inner.writer.submit(Op::Prune { finished_before_ms: cutoff_ms }).await {
            Ok(Reply::Pruned(n)) => Ok(n),
            Ok(_) => Err(PruneError::Storage("the writer answered a prune with something else".into())),
            Err(OpError::Stopped) => Err(PruneError::ShutDown),
            Err(e) => Err(PruneError::Storage(e.to_string())),
        }
    }

    fn spawn_pruner(&self, config: &EngineConfig) {
        let engine = self.clone();
        let shutdown = self.inner.shutdown.clone();
        let Some(interval) = config.prune_interval else {
            return;
        };
        let retention = config.retention;
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
                match engine.prune_finished_before(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(runs = n, "pruned finished runs past retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning finished runs failed; will try again"),
                }
            }
        });
    }

    fn read_record(&self, id: &str) -> Result<Option<Result<RunRecord, String>>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        read_header(&txn.open_table(LOG)?, id)
    }

    /// The input a run was started with, as stored.
    fn read_input(&self, id: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        Ok(log.get(key::input_key(id).as_slice())?.map(|v| v.value().to_vec()))
    }

    fn read_end(&self, id: &str) -> Result<Lookup, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let record: RunRecord = match read_header(&log, id)? {
            None => return Ok(Lookup::NotFound),
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                return Ok(Lookup::Finished(RawOutcome::Failed(Failure {
                    step: "(unknown)".into(),
                    error: format!("run record does not decode: {e}"),
                    kind: FailureKind::Corrupt,
                    code: None,
                })));
            }
        };
        Ok(match record.status {
            RunStatus::Active => Lookup::Active,
            RunStatus::Failed => Lookup::Finished(RawOutcome::Failed(record.failure.unwrap_or(Failure {
                step: "(unknown)".into(),
                error: "failed without a recorded reason".into(),
                kind: FailureKind::Corrupt,
                code: None,
            }))),
            RunStatus::Completed => {
                let k = key::response_key(id, u64::from(record.next_step));
                match log.get(k.as_slice())? {
                    Some(w) => Lookup::Finished(RawOutcome::Completed(w.value().to_vec())),
                    None => Lookup::Finished(RawOutcome::Failed(Failure {
                        step: "(final)".into(),
                        error: "completed run has no final response".into(),
                        kind: FailureKind::Corrupt,
                        code: None,
                    })),
                }
            }
        })
    }
}

enum ResumeBlocker {
    Corrupt(String),
    Storage(redb::Error),
}

impl From<String> for ResumeBlocker {
    fn from(reason: String) -> Self {
        Self::Corrupt(reason)
    }
}

impl From<&str> for ResumeBlocker {
    fn from(reason: &str) -> Self {
        Self::Corrupt(reason.to_owned())
    }
}

/// What [`Engine::resume_run`] did.
enum Resumed {
    Yes,
    MarkedFailed(String),
    /// Left active for the next start (its storage could not be read or written).
    Left,
}

enum Lookup {
    NotFound,
    Active,
    Finished(RawOutcome),
}
