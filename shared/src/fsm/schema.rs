//! The engine's redb tables and the records stored in them. All table definitions live here.
//!
//! | table       | key                    | value                                   |
//! |-------------|------------------------|-----------------------------------------|
//! | `log`       | header key(run id)     | the live [`RunRecord`], compact ([`encode_record`]) |
//! | `log`       | input key(run id)      | the run's input `R` as JSON, written once |
//! | `log`       | event key(run id, seq) | [`Event`] as JSON                       |
//! | `log`       | response key(run id, i)| `W` after `i` steps as JSON (index 0 = initial `W`), after the step's folded `StepCompleted` event |
//! | `runs`      | run id                 | the [`RunRecord`] as of its last status change (the index for listing), compact |
//!
//! Keys are made by [`super::key`]; one run's rows are adjacent. A step's transition writes
//! only the `log` table, and two rows of it (header, and the response with the step's
//! `StepCompleted` event folded in front, [`encode_response`]: usually one leaf page), which
//! keeps its commit close to redb's single-insert floor; other events (start, resume, failed
//! attempts, finish) are rows of their own. A response row without a folded event (one
//! written before events were folded, or index 0) is plain JSON: the reader tells them apart
//! by the first byte (a folded row starts with 0, which no JSON text does). Headers are
//! encoded compactly too (postcard after a 0 byte) and read back from JSON when an earlier
//! version wrote them. So a run log written by an earlier version is read as it is, without
//! a rewrite, and its runs go on in the new encoding; `runs` is written when a run starts and finishes. Values are JSON so that the inspector can show them
//! without knowing the workflow's types, and so that a record that no longer decodes can be
//! reported with a reason instead of blocking a resume.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::key;

pub(crate) const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
pub(crate) const LOG: TableDefinition<&[u8], &[u8]> = TableDefinition::new("log");

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Active,
    Completed,
    Failed,
}

impl RunStatus {
    pub fn is_finished(self) -> bool {
        self != RunStatus::Active
    }
}

impl std::str::FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(Self::Active),
            "completed" => Ok(Self::Completed),
            "failed" => Ok(Self::Failed),
            other => Err(format!("unknown run status {other:?}: expected active, completed or failed")),
        }
    }
}

/// Why a run failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A step returned `Abort`.
    Aborted,
    /// A step kept failing until its retry policy gave up.
    RetriesExhausted,
    /// `cancel(id, reason)` ended it.
    Cancelled,
    /// Its stored record, input or response could not be decoded, or its workflow changed.
    Corrupt,
}

/// A failed run's terminal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The step that was to run (or the workflow name if none could be named).
    pub step: String,
    pub error: String,
    pub kind: FailureKind,
    /// The machine-readable cause an aborting step gave (`StepError::abort_with`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {} failed ({:?}): {}", self.step, self.kind, self.error)
    }
}

/// The run's header row. Updated by every transition, in the same transaction as its event.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub workflow: String,
    pub version: u32,
    pub status: RunStatus,
    /// Index of the step to run next; the step count once completed.
    pub next_step: u32,
    /// Failed attempts of `next_step` so far (restored on resume).
    pub attempts: u32,
    /// Failed attempts over the whole run, every step (absent in records written before it
    /// was kept: then 0).
    #[serde(default)]
    pub failed_attempts: u32,
    /// Sequence number of the next history event.
    pub next_event: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub failure: Option<Failure>,
    /// W3C `traceparent` of the span that started the run: the run's spans, resumed ones
    /// included, belong to that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

/// Why an attempt failed, as recorded in history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptErrorKind {
    Transient,
    Abort,
    Timeout,
    Panic,
    /// The step succeeded but its transition could not be committed.
    Commit,
    Corrupt,
}

/// One history event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    Started,
    /// The process restarted and picked the run up again at `step`.
    Resumed {
        step: String,
        attempts: u32,
    },
    AttemptFailed {
        step: String,
        attempt: u32,
        error: String,
        kind: AttemptErrorKind,
        duration_ms: u64,
    },
    StepCompleted {
        step: String,
        attempt: u32,
        duration_ms: u64,
    },
    Finished {
        status: RunStatus,
        failure: Option<Failure>,
    },
}

/// The first byte of a compact header; no JSON text starts with it.
const COMPACT: u8 = 0;

/// The header as postcard encodes it: every field, in this order (postcard has no field
/// names, so fields are only ever appended, and enums keep their variants' order).
#[derive(Serialize, Deserialize)]
struct CompactRecord<'a> {
    workflow: std::borrow::Cow<'a, str>,
    version: u32,
    status: RunStatus,
    next_step: u32,
    attempts: u32,
    failed_attempts: u32,
    next_event: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    failure: Option<CompactFailure>,
    trace_parent: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct CompactFailure {
    step: String,
    error: String,
    kind: FailureKind,
    code: Option<String>,
}

/// A header (or `runs` index) value: `0`, then the record as postcard.
pub(crate) fn encode_record(r: &RunRecord) -> Result<Vec<u8>, String> {
    let compact = CompactRecord {
        workflow: std::borrow::Cow::Borrowed(&r.workflow),
        version: r.version,
        status: r.status,
        next_step: r.next_step,
        attempts: r.attempts,
        failed_attempts: r.failed_attempts,
        next_event: r.next_event,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        finished_at_ms: r.finished_at_ms,
        failure: r.failure.as_ref().map(|f| CompactFailure {
            step: f.step.clone(),
            error: f.error.clone(),
            kind: f.kind,
            code: f.code.clone(),
        }),
        trace_parent: r.trace_parent.clone(),
    };
    let mut out = vec![COMPACT];
    postcard::to_io(&compact, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A header (or `runs` index) value, compact or (written by an earlier version) JSON.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<RunRecord, String> {
    let Some((&COMPACT, rest)) = bytes.split_first() else {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    };
    let c: CompactRecord<'_> = postcard::from_bytes(rest).map_err(|e| format!("compact run record: {e}"))?;
    Ok(RunRecord {
        workflow: c.workflow.into_owned(),
        version: c.version,
        status: c.status,
        next_step: c.next_step,
        attempts: c.attempts,
        failed_attempts: c.failed_attempts,
        next_event: c.next_event,
        created_at_ms: c.created_at_ms,
        updated_at_ms: c.updated_at_ms,
        finished_at_ms: c.finished_at_ms,
        failure: c.failure.map(|f| Failure { step: f.step, error: f.error, kind: f.kind, code: f.code }),
        trace_parent: c.trace_parent,
    })
}

/// The first byte of a response row with a folded event; no JSON text starts with it.
const FOLDED: u8 = 0;
/// The folded event's encoding: this version's fixed-width fields.
const FOLDED_V1: u8 = 1;

/// A response row: `w` (JSON), after `completed` (a `StepCompleted` event) encoded compactly:
/// `0, 1, seq u64, at_ms u64, attempt u32, duration_ms u64, step length u16, step` (little
/// endian), then `w`.
pub(crate) fn encode_response(completed: Option<&Event>, w: &[u8]) -> Vec<u8> {
    let Some(Event { seq, at_ms, kind: EventKind::StepCompleted { step, attempt, duration_ms } }) = completed else {
        return w.to_vec();
    };
    // Step names are short identifiers (`&'static str` in the workflow); longer ones are cut
    // at 64 KiB, which no workflow comes near.
    let step = &step.as_bytes()[..step.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(32 + step.len() + w.len());
    out.extend_from_slice(&[FOLDED, FOLDED_V1]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.extend_from_slice(&attempt.to_le_bytes());
    out.extend_from_slice(&duration_ms.to_le_bytes());
    out.extend_from_slice(&(step.len() as u16).to_le_bytes());
    out.extend_from_slice(step);
    out.extend_from_slice(w);
    out
}

/// A response row's folded event (if any) and its response JSON.
pub(crate) fn decode_response(row: &[u8]) -> Result<(Option<Event>, &[u8]), String> {
    if row.first() != Some(&FOLDED) {
        return Ok((None, row));
    }
    let bad = || "a response row with a folded event is cut short".to_owned();
    if row.get(1) != Some(&FOLDED_V1) {
        return Err(format!("a response row's folded event has unknown format {:?}", row.get(1)));
    }
    let mut at = 2;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let field = row.get(at..at + n).ok_or_else(bad)?;
        at += n;
        Ok(field)
    };
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    let seq = u64_of(take(8)?);
    let at_ms = u64_of(take(8)?);
    let attempt = u32::from_le_bytes(take(4)?.try_into().unwrap_or_default());
    let duration_ms = u64_of(take(8)?);
    let len = u16::from_le_bytes(take(2)?.try_into().unwrap_or_default()) as usize;
    let step = String::from_utf8_lossy(take(len)?).into_owned();
    let kind = EventKind::StepCompleted { step, attempt, duration_ms };
    Ok((Some(Event { seq, at_ms, kind }), &row[at..]))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A run's live header: `None` if there is no such run, `Some(Err)` if it does not decode.
pub(super) fn read_header(
    log: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    id: &str,
) -> Result<Option<Result<RunRecord, String>>, redb::Error> {
    Ok(log.get(key::header_key(id).as_slice())?.map(|v| decode_record(v.value())))
}
