//! The engine's redb tables and the records stored in them. All table definitions live here.
//!
//! | table       | key                    | value                                   |
//! |-------------|------------------------|-----------------------------------------|
//! | `log`       | header key(run id)     | the live [`RunRecord`] as JSON          |
//! | `log`       | input key(run id)      | the run's input `R` as JSON, written once |
//! | `log`       | event key(run id, seq) | [`Event`] as JSON                       |
//! | `log`       | response key(run id, i)| `W` after `i` steps; index 0 = initial `W` |
//! | `runs`      | run id                 | the [`RunRecord`] as of its last status change (the index for listing) |
//!
//! Keys are made by [`super::key`]; one run's rows are adjacent. A transition writes only
//! the `log` table (header, event, response: usually one leaf page), which keeps its commit
//! close to redb's single-insert floor; `runs` is written when a run starts and finishes. Values are JSON so that the inspector can show them
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

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A run's live header: `None` if there is no such run, `Some(Err)` if it does not decode.
pub(super) fn read_header(
    log: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    id: &str,
) -> Result<Option<Result<RunRecord, String>>, redb::Error> {
    Ok(log.get(key::header_key(id).as_slice())?.map(|v| serde_json::from_slice(v.value()).map_err(|e| e.to_string())))
}
