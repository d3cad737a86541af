//! Runs this process drives: start (recorded or not yet), wait, cancel, stop.

use super::recovery::Resumed;
use super::*;

impl Engine {
    pub(in crate::fsm) async fn start_raw(
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
            Ok(Reply::Applied | Reply::Pruned(_)) => Err(StartError::Storage(StorageError::Internal(
                "the writer answered a start with something else".into(),
            ))),
            Err(OpError::Stopped) => Err(StartError::ShutDown),
            Err(OpError::Fenced { id, why }) => Err(StartError::Corrupt { id, why }),
            Err(e) => Err(StartError::Storage(e.into())),
        }
    }
    /// Starts a run whose start is committed with its first transition: nothing is written
    /// now. Decided under the `unrecorded` lock, so two starts of one id make one run.
    pub(super) fn start_unrecorded(
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
                None => match self.read_record(id).map_err(|e| StartError::Storage(e.into()))? {
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
    pub(super) async fn drive_if_stalled(&self, wf: Arc<dyn ErasedWorkflow>, id: &str) -> Result<(), StartError> {
        if self.is_driven_here(id) {
            return Ok(());
        }
        match self.read_record(id).map_err(|e| StartError::Storage(e.into()))? {
            // Resumed by the version that started it (an older one, after an upgrade).
            Some(Ok(record)) if record.status == RunStatus::Active => {
                match self.resume_run(self.workflow_of(&record).unwrap_or(wf), id, &record).await {
                    Resumed::Yes | Resumed::MarkedFailed(_) => Ok(()),
                    Resumed::Left => Err(StartError::Storage(StorageError::Io(format!(
                        "run {id} is stalled and could not be resumed"
                    )))),
                }
            }
            // Finished meanwhile: a wait returns its outcome.
            _ => Ok(()),
        }
    }
    /// `start` found run `id` in the run log: the same work is joined or its outcome
    /// returned; other work under the same id is refused.
    pub(super) fn existing_run(
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
        let stored = self.read_input(id).map_err(|e| StartError::Storage(e.into()))?;
        if let Some(stored) = stored
            && stored != input
        {
            return Err(StartError::InputMismatch {
                id: id.to_owned(),
                existing: String::from_utf8_lossy(&stored).into_owned(),
            });
        }
        match self.read_end(id).map_err(|e| StartError::Storage(e.into()))? {
            Lookup::Active => Ok(StartOutcome::AlreadyRunning),
            Lookup::NotFound => {
                Err(StartError::Storage(StorageError::Internal(format!("run {id} vanished during start"))))
            }
            Lookup::Finished(RawOutcome::Completed(w)) => Ok(StartOutcome::Finished(Outcome::Completed(w))),
            Lookup::Finished(RawOutcome::Failed(f)) => Ok(StartOutcome::Finished(Outcome::Failed(f))),
        }
    }
    pub(super) fn spawn_run(
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
    pub(in crate::fsm) async fn wait_raw(&self, id: &str) -> Result<RawOutcome, WaitError> {
        let interrupted = |reason: &str| WaitError::Interrupted { id: id.to_owned(), reason: reason.to_owned() };
        if self.inner.shutdown.is_cancelled() {
            return Err(interrupted("the engine shut down"));
        }
        // Subscribe before reading, so a finish between the read and the wait is not missed.
        let mut rx =
            lock(&self.inner.waiters).entry(id.to_owned()).or_insert_with(|| watch::channel(None).0).subscribe();
        let mut found = self.read_end(id).map_err(|e| WaitError::Storage(e.into()))?;
        if let Lookup::NotFound = found {
            // Started but not yet recorded: wait for it. An entry leaves `unrecorded` only
            // after its first commit, so if it is gone now, the run log has it.
            let pending = lock(&self.inner.unrecorded).contains_key(id);
            found =
                if pending { Lookup::Active } else { self.read_end(id).map_err(|e| WaitError::Storage(e.into()))? };
        }
        if let Lookup::Active = found
            && !self.is_driven_here(id)
        {
            // No task of this process drives it (its last commit failed, or nothing has
            // resumed it yet): read again, since a task that just ended committed first.
            found = match self.read_end(id).map_err(|e| WaitError::Storage(e.into()))? {
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
                None => (self.read_record(id).map_err(|e| CancelError::Storage(e.into()))?, None),
            }
        };
        let record = match record {
            None => return Err(CancelError::NotFound(id.to_owned())),
            Some(Err(why)) => {
                return Err(CancelError::Storage(StorageError::Corrupt(format!(
                    "run {id} record does not decode: {why}"
                ))));
            }
            Some(Ok(r)) => r,
        };
        if record.status != RunStatus::Active {
            return Err(CancelError::NotActive { id: id.to_owned(), status: record.status });
        }
        let step = self
            .workflow_of(&record)
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
                let now = self.read_record(id).map_err(|e| CancelError::Storage(e.into()))?;
                let status = now.and_then(Result::ok).map_or(RunStatus::Failed, |r| r.status);
                return Err(CancelError::NotActive { id: id.to_owned(), status });
            }
            Err(OpError::NotFound(_)) => return Err(CancelError::NotFound(id.to_owned())),
            Err(OpError::Stopped) => return Err(CancelError::ShutDown),
            Err(e) => return Err(CancelError::Storage(e.into())),
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
    /// Drops the waiter entry of `id` if no one else waits on it.
    pub(super) fn forget_waiter(&self, id: &str) {
        let mut waiters = lock(&self.inner.waiters);
        if waiters.get(id).is_some_and(|tx| tx.receiver_count() <= 1) {
            waiters.remove(id);
        }
    }
    /// Whether run `id` has a task in this process, or is started and not yet recorded.
    pub(super) fn is_driven_here(&self, id: &str) -> bool {
        lock(&self.inner.running).contains_key(id) || lock(&self.inner.unrecorded).contains_key(id)
    }
}
