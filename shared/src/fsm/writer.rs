//! The writer: every redb write goes through here, and writes that are waiting together
//! share one `Durability::Immediate` commit (the group commit).
//!
//! The protocol is [`crate::sync::GroupCommit`]'s (leader/follower, in the callers' own
//! threads): a lone run pays one fsync per transition and no thread hand-off, and
//! concurrent runs share fsyncs. No reply is sent before its commit is durable. An op that
//! fails validation (the run is no longer in the state the caller expects: fenced) writes
//! nothing and the rest of the batch still commits; a storage error aborts the whole
//! transaction and every op in it fails.
//!
//! The leader blocks its thread for the commit: under tokio's multi-thread runtime through
//! `block_in_place`, so the thread's other tasks move elsewhere; on a current-thread
//! runtime (tests, small tools) directly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableTable};
use tokio::sync::oneshot;

use super::error::StorageError;
use super::key;
use super::schema::{
    Event, EventKind, Failure, FailureKind, LOG, RUNS, RunRecord, RunStatus, decode_record, decode_response,
    encode_response, now_ms,
};
use crate::sync::{GroupCommit, Joined};

/// Requests applied in one transaction at most.
const MAX_BATCH: usize = 512;

/// A run started but not yet in the run log: its record, input and initial response are
/// written by the first change that commits (guarantee 1 of `fsm/DESIGN.md`).
#[derive(Clone, Debug)]
pub(crate) struct Unrecorded {
    pub record: RunRecord,
    pub input: Vec<u8>,
    pub w0: Vec<u8>,
}

/// A change to one run.
pub(crate) struct Change {
    pub id: String,
    /// Set while the run is not yet in the run log: the change records its start first.
    pub start: Option<Box<Unrecorded>>,
    /// The step the run must be at (active); `None` accepts any active run.
    pub expect_step: Option<u32>,
    pub update: Update,
    /// Appended to history before the `Finished` event that `Complete`/`Fail` add.
    pub events: Vec<EventKind>,
}

pub(crate) enum Update {
    /// The step at `expect_step` completed with this response.
    Advance {
        w: Vec<u8>,
        last: bool,
    },
    /// One more failed attempt of the current step.
    CountAttempt,
    Fail(Failure),
    /// History only.
    Nothing,
}

pub(crate) enum Op {
    Start {
        id: String,
        record: RunRecord,
        input: Vec<u8>,
        w0: Vec<u8>,
    },
    Change(Change),
    /// Replace an undecodable run record by a failed one carrying `reason`.
    MarkCorrupt {
        id: String,
        reason: String,
    },
    /// Delete runs that finished before this time.
    Prune {
        finished_before_ms: u64,
    },
    /// Move failed run `id`, history and all, to id `to`, freeing `id` for a new run.
    Archive {
        id: String,
        to: String,
    },
}

pub(crate) enum Reply {
    Created,
    /// Start found the id already there.
    Exists(RunRecord),
    Applied,
    Pruned(usize),
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum OpError {
    #[error("run {0} does not exist")]
    NotFound(String),
    #[error("run {id} is no longer in the expected state: {why}")]
    Fenced { id: String, why: String },
    #[error("{0}")]
    Storage(StorageError),
    #[error("the engine has shut down")]
    Stopped,
}

/// Where a caller has handled the answers it expects, what is left is a storage failure;
/// any other answer there means the engine's bookkeeping broke.
impl From<OpError> for StorageError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Storage(s) => s,
            OpError::NotFound(_) | OpError::Fenced { .. } | OpError::Stopped => Self::Internal(e.to_string()),
        }
    }
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Reply, OpError>>,
}

pub(crate) struct Writer {
    db: Arc<Database>,
    group: GroupCommit<Request>,
    commits: AtomicU64,
    /// Set by the first commit that failed on the storage (a full disk, an I/O error): redb
    /// refuses every later write until the file is opened again, so the owner must restart.
    fault: std::sync::OnceLock<StorageError>,
    faulted: tokio_util::sync::CancellationToken,
}

impl Writer {
    /// The writer of the run log `db`, whose tables it creates if they do not exist yet.
    pub(crate) fn open(db: Arc<Database>) -> Result<Self, redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(RUNS)?;
        txn.open_table(LOG)?;
        txn.commit()?;
        Ok(Self {
            db,
            group: GroupCommit::default(),
            commits: AtomicU64::new(0),
            fault: std::sync::OnceLock::new(),
            faulted: tokio_util::sync::CancellationToken::new(),
        })
    }

    pub(crate) async fn submit(&self, op: Op) -> Result<Reply, OpError> {
        let (reply, rx) = oneshot::channel();
        if self.group.join(Request { op, reply }).map_err(|_| OpError::Stopped)? == Joined::Lead {
            self.lead();
        }
        rx.await.map_err(|_| OpError::Stopped)?
    }

    /// Commits batches until the queue is empty. Runs without an await point, so the
    /// leader's future cannot be dropped half-way through.
    fn lead(&self) {
        let work = || self.group.lead(MAX_BATCH, |mut batch| self.commit_batch(&mut batch));
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
            _ => work(),
        }
    }

    fn commit_batch(&self, batch: &mut Vec<Request>) {
        match apply_batch(&self.db, batch) {
            Ok(replies) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                for (req, reply) in batch.drain(..).zip(replies) {
                    // The caller may have gone away; the commit stands either way.
                    if req.reply.send(reply).is_err() {
                        tracing::debug!("fsm writer: a caller left before its commit was acknowledged");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = batch.len(), "fsm commit failed; every op in the batch fails");
                // After a failed write redb answers `PreviousIo`: report the failure that
                // caused it (a full disk stays a full disk).
                let kind = match (&e, self.fault.get()) {
                    (redb::Error::PreviousIo, Some(first)) => first.clone(),
                    _ => StorageError::of(&e),
                };
                if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
                    if self.fault.set(kind.clone()).is_ok() {
                        tracing::error!(error = %e, "the run log refuses writes until it is opened again");
                    }
                    self.faulted.cancel();
                }
                for req in batch.drain(..) {
                    if req.reply.send(Err(OpError::Storage(kind.clone()))).is_err() {
                        tracing::debug!("fsm writer: a caller left before its commit failed");
                    }
                }
            }
        }
    }

    /// Fires when a commit failed on the storage (see [`Writer::fault`]).
    pub(crate) fn faulted(&self) -> tokio_util::sync::CancellationToken {
        self.faulted.clone()
    }

    /// Why the run log refuses writes, if a commit failed on the storage.
    pub(crate) fn fault(&self) -> Option<StorageError> {
        self.fault.get().cloned()
    }

    /// Commits made so far (for the benchmark and tests of the group commit).
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Refuses new ops. Ops already queued are still committed by the current leader.
    pub(crate) fn stop(&self) {
        self.group.stop();
    }
}

type Replies = Vec<Result<Reply, OpError>>;

fn apply_batch(db: &Database, batch: &mut [Request]) -> Result<Replies, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    let mut replies = Vec::with_capacity(batch.len());
    {
        let mut t = Tables { txn: &txn, log: txn.open_table(LOG)? };
        for req in batch.iter_mut() {
            // Take the op out; the request keeps only its reply channel.
            let op = std::mem::replace(&mut req.op, Op::Prune { finished_before_ms: 0 });
            replies.push(t.apply(op)?);
        }
    }
    txn.commit()?;
    Ok(replies)
}

struct Tables<'t> {
    /// `runs` is opened only by the ops that write it, so a plain transition's commit
    /// touches the `log` table alone.
    txn: &'t redb::WriteTransaction,
    log: redb::Table<'t, &'static [u8], &'static [u8]>,
}

/// The outer `Result` is a storage error (aborts the batch); the inner one is this op's.
type Applied = Result<Result<Reply, OpError>, redb::Error>;

impl Tables<'_> {
    fn apply(&mut self, op: Op) -> Applied {
        match op {
            Op::Start { id, record, input, w0 } => self.start(&id, record, &input, &w0),
            Op::Change(change) => self.change(change),
            Op::MarkCorrupt { id, reason } => self.mark_corrupt(&id, reason),
            Op::Prune { finished_before_ms } => self.prune(finished_before_ms),
            Op::Archive { id, to } => self.archive(&id, &to),
        }
    }

    /// The live header of run `id` (from `log`).
    fn read_record(&self, id: &str) -> Result<Option<Result<RunRecord, String>>, redb::Error> {
        Ok(self.log.get(key::header_key(id).as_slice())?.map(|v| decode_record(v.value())))
    }

    /// Writes the header; with `index`, also the `runs` index (on start and status changes).
    fn put_record(&mut self, id: &str, record: &RunRecord, index: bool) -> Result<(), redb::Error> {
        let bytes = encode_record(record)?;
        self.log.insert(key::header_key(id).as_slice(), bytes.as_slice())?;
        if index {
            self.txn.open_table(RUNS)?.insert(id, bytes.as_slice())?;
        }
        Ok(())
    }

    fn push_event(&mut self, id: &str, record: &mut RunRecord, kind: EventKind, at_ms: u64) -> Result<(), redb::Error> {
        let event = Event { seq: record.next_event, at_ms, kind };
        let bytes = serde_json::to_vec(&event).map_err(encode_error)?;
        self.log.insert(key::event_key(id, event.seq).as_slice(), bytes.as_slice())?;
        record.next_event += 1;
        Ok(())
    }

    fn start(&mut self, id: &str, record: RunRecord, input: &[u8], w0: &[u8]) -> Applied {
        match self.read_record(id)? {
            Some(Ok(existing)) => return Ok(Ok(Reply::Exists(existing))),
            Some(Err(why)) => {
                return Ok(Err(OpError::Fenced {
                    id: id.to_owned(),
                    why: format!("its stored record does not decode: {why}"),
                }));
            }
            None => {}
        }
        self.create(id, record, input, w0)?;
        Ok(Ok(Reply::Created))
    }

    /// Writes a new run: input, initial response, `Started` event and header.
    fn create(&mut self, id: &str, mut record: RunRecord, input: &[u8], w0: &[u8]) -> Result<RunRecord, redb::Error> {
        self.log.insert(key::input_key(id).as_slice(), input)?;
        self.log.insert(key::response_key(id, 0).as_slice(), w0)?;
        let at = record.created_at_ms;
        self.push_event(id, &mut record, EventKind::Started, at)?;
        self.put_record(id, &record, true)?;
        Ok(record)
    }

    fn change(&mut self, c: Change) -> Applied {
        let mut record = match self.read_record(&c.id)? {
            None => match c.start {
                // The run's first transition: its start is committed with it.
                Some(start) => {
                    let Unrecorded { record, input, w0 } = *start;
                    self.create(&c.id, record, &input, &w0)?
                }
                None => return Ok(Err(OpError::NotFound(c.id))),
            },
            Some(Err(why)) => {
                return Ok(Err(OpError::Fenced { id: c.id, why: format!("its stored record does not decode: {why}") }));
            }
            Some(Ok(r)) => r,
        };
        if record.status != RunStatus::Active {
            let why = format!("it is {:?}", record.status);
            return Ok(Err(OpError::Fenced { id: c.id, why }));
        }
        if let Some(step) = c.expect_step
            && record.next_step != step
        {
            let why = format!("it is at step {}, not {step}", record.next_step);
            return Ok(Err(OpError::Fenced { id: c.id, why }));
        }
        let now = now_ms();
        let mut events = c.events;
        // A step's completion rides in its response row (`schema::encode_response`): a
        // transition writes two rows, not three.
        let folded = match (&c.update, events.last()) {
            (Update::Advance { .. }, Some(EventKind::StepCompleted { .. })) => events.pop(),
            _ => None,
        };
        for kind in events {
            if matches!(kind, EventKind::AttemptFailed { .. }) {
                record.failed_attempts += 1;
            }
            self.push_event(&c.id, &mut record, kind, now)?;
        }
        match c.update {
            Update::Advance { w, last } => {
                record.next_step += 1;
                record.attempts = 0;
                let completed = folded.map(|kind| {
                    let event = Event { seq: record.next_event, at_ms: now, kind };
                    record.next_event += 1;
                    event
                });
                let row = encode_response(completed.as_ref(), &w);
                self.log.insert(key::response_key(&c.id, u64::from(record.next_step)).as_slice(), row.as_slice())?;
                if last {
                    record.status = RunStatus::Completed;
                    record.finished_at_ms = Some(now);
                    let kind = EventKind::Finished { status: RunStatus::Completed, failure: None };
                    self.push_event(&c.id, &mut record, kind, now)?;
                }
            }
            Update::CountAttempt => record.attempts += 1,
            Update::Fail(failure) => {
                record.status = RunStatus::Failed;
                record.finished_at_ms = Some(now);
                record.failure = Some(failure.clone());
                let kind = EventKind::Finished { status: RunStatus::Failed, failure: Some(failure) };
                self.push_event(&c.id, &mut record, kind, now)?;
            }
            Update::Nothing => {}
        }
        record.updated_at_ms = now;
        let status_changed = record.status != RunStatus::Active;
        self.put_record(&c.id, &record, status_changed)?;
        Ok(Ok(Reply::Applied))
    }

    fn mark_corrupt(&mut self, id: &str, reason: String) -> Applied {
        // After every event recorded: the last event row's, or the last folded one's.
        let (lo, hi) = key::event_range(id);
        let after_rows = match self.log.range(lo.as_slice()..=hi.as_slice())?.next_back() {
            Some(entry) => key::decode(entry?.0.value()).map_or(0, |(_, seq)| seq + 1),
            None => 0,
        };
        let (lo, hi) = key::response_range(id);
        let after_folded = match self.log.range(lo.as_slice()..=hi.as_slice())?.next_back() {
            Some(entry) => decode_response(entry?.1.value()).ok().and_then(|(e, _)| e).map_or(0, |e| e.seq + 1),
            None => 0,
        };
        let next_event = after_rows.max(after_folded);
        let now = now_ms();
        let failure = Failure { step: "(unknown)".into(), error: reason, kind: FailureKind::Corrupt, code: None };
        let mut record = RunRecord {
            workflow: "(unknown)".into(),
            version: 0,
            status: RunStatus::Failed,
            next_step: 0,
            attempts: 0,
            failed_attempts: 0,
            next_event,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: Some(now),
            failure: Some(failure.clone()),
            trace_parent: None,
        };
        let kind = EventKind::Finished { status: RunStatus::Failed, failure: Some(failure) };
        self.push_event(id, &mut record, kind, now)?;
        self.put_record(id, &record, true)?;
        Ok(Ok(Reply::Applied))
    }

    fn archive(&mut self, id: &str, to: &str) -> Applied {
        match self.read_record(id)? {
            None => return Ok(Err(OpError::NotFound(id.to_owned()))),
            Some(Ok(r)) if r.status.is_finished() => {}
            Some(_) => {
                let why = "only a finished run can be archived".to_owned();
                return Ok(Err(OpError::Fenced { id: id.to_owned(), why }));
            }
        }
        if self.read_record(to)?.is_some() {
            return Ok(Err(OpError::Fenced { id: id.to_owned(), why: format!("run {to} already exists") }));
        }
        let (lo, hi) = key::run_range(id);
        let mut rows = Vec::new();
        for entry in self.log.range(lo.as_slice()..=hi.as_slice())? {
            let (k, v) = entry?;
            if let Some((_, n)) = key::decode(k.value()) {
                rows.push((key::encode(to, n), v.value().to_vec()));
            }
        }
        for (k, v) in &rows {
            self.log.insert(k.as_slice(), v.as_slice())?;
        }
        self.log.retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)?;
        let mut runs = self.txn.open_table(RUNS)?;
        let index = runs.remove(id)?.map(|v| v.value().to_vec());
        if let Some(index) = index {
            runs.insert(to, index.as_slice())?;
        }
        Ok(Ok(Reply::Applied))
    }

    fn prune(&mut self, finished_before_ms: u64) -> Applied {
        let mut doomed = Vec::new();
        let mut runs = self.txn.open_table(RUNS)?;
        for entry in runs.iter()? {
            let (id, value) = entry?;
            // The index's status is current once a run has finished. Undecodable records are
            // never pruned here: resume marks them failed first.
            if let Ok(record) = decode_record(value.value())
                && record.status.is_finished()
                && record.finished_at_ms.is_some_and(|t| t < finished_before_ms)
            {
                doomed.push(id.value().to_owned());
            }
        }
        for id in &doomed {
            runs.remove(id.as_str())?;
            let (lo, hi) = key::run_range(id);
            self.log.retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)?;
        }
        Ok(Ok(Reply::Pruned(doomed.len())))
    }
}

fn encode_record(record: &RunRecord) -> Result<Vec<u8>, redb::Error> {
    super::schema::encode_record(record).map_err(|e| redb::Error::from(std::io::Error::other(format!("encode: {e}"))))
}

/// Encoding our own plain structs cannot fail in practice; if it does, the batch aborts
/// rather than committing a half-written transition.
fn encode_error(e: serde_json::Error) -> redb::Error {
    redb::Error::from(std::io::Error::other(format!("encode: {e}")))
}
