//! What the admin API answers, as types: the server builds them from the engine's, the
//! store's and the progress board's records; `worker runs` (through the API, or from the run
//! log when no worker runs), `worker images` and `enqueue --wait` read the same types. A
//! change to the engine's internals changes a `From` here, not what clients parse.

use serde::{Deserialize, Serialize};

use crate::fsm::{self, RunDetail, RunSummary, WorkflowInfo};
use crate::image::BlobCache;
use crate::lifecycle::Watermarks;
use crate::lifecycle::inventory::{FamilyView, families};
use crate::progress;
use crate::store::{Store, StoreError};
use crate::volume::{Place, Usage};

pub use fsm::RunStatus;

/// One line of `GET /api/runs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunLine {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    pub status: RunStatus,
    /// The step to run next (active), or the number of steps (completed).
    pub step_index: u32,
    /// Attempts of every step so far, the failed ones included.
    pub attempts: u32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub failure: Option<Failure>,
    /// The trace the run belongs to (32 hex digits).
    pub trace_id: Option<String>,
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub step: String,
    pub error: String,
    /// `aborted`, `retries_exhausted`, `cancelled` or `corrupt`.
    pub kind: String,
    /// The machine-readable cause an aborting step gave (`not_found`, `access_denied`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// `GET /api/runs/{id}`: one run with everything recorded about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    #[serde(flatten)]
    pub line: RunLine,
    /// The host whose run log holds the run.
    pub host_id: String,
    pub input: serde_json::Value,
    /// Index 0 is the initial response, index i step i−1's.
    pub responses: Vec<Response>,
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub index: u32,
    pub response: serde_json::Value,
}

/// One history event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: u64,
    #[serde(flatten)]
    pub what: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Resumed { step: String, attempts: u32 },
    AttemptFailed { step: String, attempt: u32, error: String, kind: String, duration_ms: u64 },
    StepCompleted { step: String, attempt: u32, duration_ms: u64 },
    Finished { status: RunStatus, failure: Option<Failure> },
}

/// `GET /api/workflows`: a workflow's name, version and steps in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    pub name: String,
    pub version: u32,
    pub steps: Vec<String>,
    /// Older versions this worker keeps so that runs they started finish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub older_versions: Vec<u32>,
}

/// The snake_case name serde gives a unit enum value.
fn name_of(v: impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

impl From<fsm::Failure> for Failure {
    fn from(f: fsm::Failure) -> Self {
        Failure { step: f.step, error: f.error, kind: name_of(f.kind), code: f.code }
    }
}

impl From<RunSummary> for RunLine {
    fn from(s: RunSummary) -> Self {
        RunLine {
            id: s.id,
            workflow: s.workflow,
            version: s.version,
            status: s.status,
            step_index: s.step_index,
            attempts: s.attempts,
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
            finished_at_ms: s.finished_at_ms,
            failure: s.failure.map(Failure::from),
            trace_id: s.trace_id,
        }
    }
}

impl From<fsm::Event> for Event {
    fn from(e: fsm::Event) -> Self {
        let what = match e.kind {
            fsm::EventKind::Started => EventKind::Started,
            fsm::EventKind::Resumed { step, attempts } => EventKind::Resumed { step, attempts },
            fsm::EventKind::AttemptFailed { step, attempt, error, kind, duration_ms } => {
                EventKind::AttemptFailed { step, attempt, error, kind: name_of(kind), duration_ms }
            }
            fsm::EventKind::StepCompleted { step, attempt, duration_ms } => {
                EventKind::StepCompleted { step, attempt, duration_ms }
            }
            fsm::EventKind::Finished { status, failure } => {
                EventKind::Finished { status, failure: failure.map(Failure::from) }
            }
        };
        Event { seq: e.seq, at_ms: e.at_ms, what }
    }
}

impl RunView {
    pub fn new(d: RunDetail, host_id: &str) -> Self {
        RunView {
            line: d.summary.into(),
            host_id: host_id.to_owned(),
            input: d.input,
            responses: d.responses.into_iter().map(|r| Response { index: r.index, response: r.response }).collect(),
            events: d.events.into_iter().map(Event::from).collect(),
        }
    }
}

impl From<WorkflowInfo> for Workflow {
    fn from(w: WorkflowInfo) -> Self {
        Workflow { name: w.name, version: w.version, steps: w.steps, older_versions: w.older_versions }
    }
}

/// `GET /api/progress`: one running step, with the bytes it has moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    pub run_id: String,
    pub family: String,
    pub step: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    // Older workers answer without these.
    #[serde(default)]
    pub applied_entries: u64,
    #[serde(default)]
    pub applied_bytes: u64,
    /// For a step that moves layers (download, unpack): each one, in the manifest's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerProgress>,
}

/// One layer of a step in `GET /api/progress`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProgress {
    pub digest: String,
    pub size: u64,
    pub done_bytes: u64,
    #[serde(default)]
    pub applied_bytes: u64,
    pub finished: bool,
}

impl From<progress::LayerProgress> for LayerProgress {
    fn from(l: progress::LayerProgress) -> Self {
        let progress::LayerProgress { digest, size, done_bytes, applied_bytes, finished } = l;
        LayerProgress { digest, size, done_bytes, applied_bytes, finished }
    }
}

impl From<LayerProgress> for progress::LayerProgress {
    fn from(l: LayerProgress) -> Self {
        let LayerProgress { digest, size, done_bytes, applied_bytes, finished } = l;
        progress::LayerProgress { digest, size, done_bytes, applied_bytes, finished }
    }
}

impl From<progress::StepProgress> for StepProgress {
    fn from(p: progress::StepProgress) -> Self {
        let progress::StepProgress {
            run_id,
            family,
            step,
            done_bytes,
            total_bytes,
            applied_entries,
            applied_bytes,
            layers,
        } = p;
        let layers = layers.into_iter().map(LayerProgress::from).collect();
        StepProgress { run_id, family, step, done_bytes, total_bytes, applied_entries, applied_bytes, layers }
    }
}

impl From<StepProgress> for progress::StepProgress {
    fn from(p: StepProgress) -> Self {
        let StepProgress { run_id, family, step, done_bytes, total_bytes, applied_entries, applied_bytes, layers } = p;
        let layers = layers.into_iter().map(progress::LayerProgress::from).collect();
        progress::StepProgress { run_id, family, step, done_bytes, total_bytes, applied_entries, applied_bytes, layers }
    }
}

/// `GET /api/images` and `worker images --json`: the families on the host, storage usage,
/// the blob cache.
#[derive(Debug, Serialize)]
pub struct Images {
    pub families: Vec<FamilyView>,
    pub usage: Option<Usage>,
    /// Why usage could not be measured (e.g. dm-thin without root).
    pub usage_error: Option<String>,
    pub watermarks: Watermarks,
    pub blob_cache_bytes: u64,
    /// Interrupted downloads kept for resuming (deleted by garbage collection when the host
    /// is above its high watermark).
    pub partial_download_bytes: u64,
    /// Where this host's volumes live, as recorded at first use.
    pub volumes: Option<Place>,
    /// The backend this process uses and why (absent where none could be opened).
    pub backend: Option<BackendChoice>,
}

/// Which volume backend a worker uses, and why (`backend = "auto"` picks one at start-up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendChoice {
    /// `dir`, `overlay`, `btrfs` or `dmthin`.
    pub name: String,
    /// Why this one: configured, the host's volumes were made with it, or what the host
    /// supports.
    pub why: String,
    /// How large one snapshot may grow, or why it has no limit of its own.
    pub snapshot_size_limit: String,
}

/// Why the images view could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("measuring the blob cache: {0}")]
    Cache(#[from] crate::image::ImageError),
}

impl Images {
    /// The view from the host database, the blob cache and a usage measurement (or why
    /// there is none).
    pub fn gather(
        store: &Store,
        cache: &BlobCache,
        usage: Result<Usage, String>,
        watermarks: Watermarks,
    ) -> Result<Images, ImagesError> {
        let (usage, usage_error) = match usage {
            Ok(u) => (Some(u), None),
            Err(e) => (None, Some(e)),
        };
        Ok(Images {
            families: families(store, Some(cache))?,
            usage,
            usage_error,
            watermarks,
            blob_cache_bytes: cache.size()?,
            partial_download_bytes: cache.partials()?.iter().map(|(_, n)| n).sum(),
            volumes: store.volume_place()?,
            backend: None,
        })
    }
}
