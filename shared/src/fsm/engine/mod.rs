//! The engine: owns the run log; starts, resumes, waits on, cancels, archives and prunes
//! runs, and shuts down. By concern: `live.rs` (runs this process drives: start, wait,
//! cancel, stop), `recovery.rs` (resuming what a crash or a stop left), `maintenance.rs`
//! (shutdown, archive, prune), `reads.rs` (raw reads of the run log); this file has the
//! types and opening. The per-run loop is in `runner`, the state both share in `state`,
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

use super::error::{ArchiveError, CancelError, OpenError, PruneError, ReadError, StartError, StorageError, WaitError};
use super::key;
use super::runner;
use super::schema::{EventKind, Failure, FailureKind, LOG, RUNS, RunRecord, RunStatus, now_ms, read_header};
use super::state::{Inner, RawOutcome, RunEnd, Running, lock};
use super::workflow::{BoundRun, ErasedWorkflow};
use super::writer::{Change, Op, OpError, Reply, Unrecorded, Update, Writer};

mod live;
mod maintenance;
mod reads;
mod recovery;

use reads::Lookup;

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
    /// The current version of workflow `name`: the one new runs use.
    pub(super) fn workflow(&self, name: &str) -> Option<Arc<dyn ErasedWorkflow>> {
        let map = crate::sync::read(&self.inner.workflows);
        map.get(name).and_then(|r| r.current.clone())
    }
    /// The workflow a recorded run was started by: its own version when this process has
    /// it, else the current one (whose resume then fails the run, naming both versions).
    pub(super) fn workflow_of(&self, record: &RunRecord) -> Option<Arc<dyn ErasedWorkflow>> {
        let map = crate::sync::read(&self.inner.workflows);
        let registered = map.get(record.workflow.as_str())?;
        registered.version(record.version).or_else(|| registered.current.clone())
    }
    /// The versions of workflow `name` this process has, the current one first.
    pub(super) fn versions_of(&self, name: &str) -> Vec<u32> {
        let map = crate::sync::read(&self.inner.workflows);
        map.get(name).map(|r| r.versions()).unwrap_or_default()
    }
    /// Fires when a commit of the run log failed on its storage (a full disk, an I/O
    /// error). redb then refuses every write until the file is opened again: the owner
    /// reports itself not ready and restarts (the worker exits; its supervisor starts it).
    pub fn storage_failed(&self) -> tokio_util::sync::CancellationToken {
        self.inner.writer.faulted()
    }
    /// Why the run log refuses writes, once [`Engine::storage_failed`] fired.
    pub fn storage_fault(&self) -> Option<StorageError> {
        self.inner.writer.fault()
    }
    /// Commits made by the run log's writer so far. Fewer commits than transitions means
    /// the group commit is sharing fsyncs.
    pub fn commit_count(&self) -> u64 {
        self.inner.writer.commits()
    }
}
