//! Resuming what a crash or a stop left: every unfinished run from its last committed step.

use super::*;

impl Engine {
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
                match super::super::schema::decode_record(value.value()) {
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
            let Some(wf) = self.workflow_of(&record) else {
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
    pub(super) async fn resume_run(&self, wf: Arc<dyn ErasedWorkflow>, id: &str, record: &RunRecord) -> Resumed {
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
    /// Loads what a resume needs. `Corrupt(reason)`: the run can never resume; `Storage`:
    /// reading failed, try at the next start.
    pub(super) fn prepare_resume(
        &self,
        wf: &Arc<dyn ErasedWorkflow>,
        id: &str,
        record: &RunRecord,
    ) -> Result<(Arc<dyn BoundRun>, Vec<u8>), ResumeBlocker> {
        if record.version != wf.version() {
            let has: Vec<String> = self.versions_of(wf.name()).iter().map(u32::to_string).collect();
            return Err(ResumeBlocker::Corrupt(format!(
                "run was started by version {} of workflow {}; this build has version {}",
                record.version,
                wf.name(),
                has.join(" and ")
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
        let row = w.ok_or_else(|| format!("the response before step {} is missing", record.next_step))?;
        let w = super::super::schema::decode_response(&row)?.1.to_vec();
        let bound = wf.bind(id.into(), &input)?;
        Ok((bound, w))
    }
}

pub(super) enum ResumeBlocker {
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
pub(super) enum Resumed {
    Yes,
    MarkedFailed(String),
    /// Left active for the next start (its storage could not be read or written).
    Left,
}
