//! Reading the history: run listings and one run's whole record (input, every response,
//! every event), for the admin API, `worker runs` and the inspector.

use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::engine::Engine;
use super::error::ReadError;
use super::key;
use super::schema::{Event, Failure, LOG, RUNS, RunRecord, RunStatus, decode_response, read_header};
use super::state::lock;

/// Filters for [`Engine::list_runs`].
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    pub workflow: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: Option<usize>,
}

/// One line of a run listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    pub status: RunStatus,
    /// The step to run next (active), or the number of steps (completed).
    pub step_index: u32,
    /// Attempts of all steps so far, the failed ones included.
    pub attempts: u32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub failure: Option<Failure>,
    /// The trace the run belongs to (32 hex digits), if it was started inside one.
    pub trace_id: Option<String>,
}

/// A response recorded in the chain: index 0 is the initial one, index i is step i−1's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordedResponse {
    pub index: u32,
    pub response: serde_json::Value,
}

/// One run with everything recorded about it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub input: serde_json::Value,
    pub responses: Vec<RecordedResponse>,
    pub events: Vec<Event>,
}

/// A registered workflow's shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkflowInfo {
    pub name: String,
    pub version: u32,
    pub steps: Vec<String>,
    /// Older versions kept so that runs they started before an upgrade finish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub older_versions: Vec<u32>,
}

impl Engine {
    /// Every registered workflow: its current version and steps, in order.
    pub fn workflows(&self) -> Vec<WorkflowInfo> {
        let map = crate::sync::read(&self.inner.workflows);
        let mut out: Vec<WorkflowInfo> = map
            .values()
            .filter_map(|r| {
                let w = r.current.as_ref()?;
                Some(WorkflowInfo {
                    name: w.name().to_owned(),
                    version: w.version(),
                    steps: (0..w.step_count()).map(|i| w.step_name(i).to_owned()).collect(),
                    older_versions: r.older.iter().map(|o| o.version()).collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Whether run `id` has not finished: a task drives it now, it was started but is not in
    /// the run log yet (its start commits with its first transition), or it is recorded
    /// unfinished (to be resumed).
    pub fn is_unfinished(&self, id: &str) -> Result<bool, ReadError> {
        // One lock at a time (a guard in an `||` would live to the end of the condition).
        let unrecorded = lock(&self.inner.unrecorded).contains_key(id);
        let running = lock(&self.inner.running).contains_key(id);
        if unrecorded || running {
            return Ok(true);
        }
        let txn = self.inner.db.begin_read().map_err(ReadError::from_any)?;
        let log = txn.open_table(LOG).map_err(ReadError::from_any)?;
        Ok(match read_header(&log, id).map_err(ReadError::from_any)? {
            Some(Ok(record)) => !record.status.is_finished(),
            // A record that cannot be decoded is failed at the next resume; not running now.
            Some(Err(_)) | None => false,
        })
    }

    /// Runs matching `filter`, newest first.
    pub fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, ReadError> {
        // Runs not yet in the run log are active; taken first, so a run recorded meanwhile is
        // found in one place or the other (and listed once).
        let unrecorded: Vec<(String, RunRecord)> =
            lock(&self.inner.unrecorded).iter().map(|(id, u)| (id.clone(), u.record.clone())).collect();
        let txn = self.inner.db.begin_read().map_err(ReadError::from_any)?;
        let runs = txn.open_table(RUNS).map_err(ReadError::from_any)?;
        let log = txn.open_table(LOG).map_err(ReadError::from_any)?;
        let mut out = Vec::new();
        for entry in runs.iter().map_err(ReadError::from_any)? {
            let (id, value) = entry.map_err(ReadError::from_any)?;
            // The index has the workflow and the status; the header has the live step.
            let Ok(indexed) = super::schema::decode_record(value.value()) else {
                continue; // resume marks it failed; until then it cannot be listed
            };
            if filter.workflow.as_deref().is_some_and(|w| w != indexed.workflow)
                || filter.status.is_some_and(|s| s != indexed.status)
            {
                continue;
            }
            let record = match read_header(&log, id.value()).map_err(ReadError::from_any)? {
                Some(Ok(r)) => r,
                _ => indexed,
            };
            out.push(summary(id.value(), record));
        }
        for (id, record) in unrecorded {
            let wanted = filter.workflow.as_deref().is_none_or(|w| w == record.workflow)
                && filter.status.is_none_or(|s| s == record.status);
            if wanted && !out.iter().any(|r| r.id == id) {
                out.push(summary(&id, record));
            }
        }
        out.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.id.cmp(&b.id)));
        if let Some(limit) = filter.limit {
            out.truncate(limit);
        }
        Ok(out)
    }

    /// One run with its input, every recorded response and every event; `None` if unknown.
    pub fn run_detail(&self, id: &str) -> Result<Option<RunDetail>, ReadError> {
        let txn = self.inner.db.begin_read().map_err(ReadError::from_any)?;
        let log = txn.open_table(LOG).map_err(ReadError::from_any)?;
        let record = match read_header(&log, id).map_err(ReadError::from_any)? {
            Some(Ok(r)) => r,
            None | Some(Err(_)) => return Ok(None),
        };
        let input = log
            .get(key::input_key(id).as_slice())
            .map_err(ReadError::from_any)?
            .map_or(serde_json::Value::Null, |v| json_or_text(v.value()));
        let (lo, hi) = key::response_range(id);
        let mut responses = Vec::new();
        // Steps' completions are folded into their response rows (`schema::encode_response`).
        let mut events = Vec::new();
        for entry in log.range(lo.as_slice()..=hi.as_slice()).map_err(ReadError::from_any)? {
            let (k, v) = entry.map_err(ReadError::from_any)?;
            let Some(index) = key::response_index(k.value()) else { continue };
            let response = match decode_response(v.value()) {
                Ok((folded, w)) => {
                    events.extend(folded);
                    json_or_text(w)
                }
                Err(e) => {
                    tracing::warn!(run_id = %id, error = %e, "showing an undecodable response row as text");
                    json_or_text(v.value())
                }
            };
            responses.push(RecordedResponse { index: index as u32, response });
        }
        let (lo, hi) = key::event_range(id);
        for entry in log.range(lo.as_slice()..=hi.as_slice()).map_err(ReadError::from_any)? {
            let (_, v) = entry.map_err(ReadError::from_any)?;
            match serde_json::from_slice::<Event>(v.value()) {
                Ok(e) => events.push(e),
                Err(e) => tracing::warn!(run_id = %id, error = %e, "skipping an undecodable history event"),
            }
        }
        events.sort_by_key(|e| e.seq);
        Ok(Some(RunDetail { summary: summary(id, record), input, responses, events }))
    }
}

fn summary(id: &str, r: RunRecord) -> RunSummary {
    RunSummary {
        id: id.to_owned(),
        workflow: r.workflow,
        version: r.version,
        status: r.status,
        step_index: r.next_step,
        // Every attempt of every step: each step done took one that succeeded, plus the
        // failed ones (a failed run's last attempt among them).
        attempts: r.next_step + r.failed_attempts,
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
        finished_at_ms: r.finished_at_ms,
        failure: r.failure,
        // traceparent = version-traceid-spanid-flags
        trace_id: r.trace_parent.as_deref().and_then(|tp| tp.split('-').nth(1)).map(str::to_owned),
    }
}

/// For display: the stored JSON, or the bytes as text if they are not JSON.
fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}
