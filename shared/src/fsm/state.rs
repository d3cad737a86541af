//! The state the engine and its run tasks share: the run log and its writer, the registered
//! workflows, who waits on which run, which runs are running, and the runs started but not
//! yet recorded. `engine` (the lifecycle) and `runner` (one run's loop) both use it; neither
//! imports the other's internals.

pub(super) use crate::sync::lock;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use redb::Database;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::schema::Failure;
use super::workflow::ErasedWorkflow;
use super::writer::{Op, OpError, Reply, Unrecorded, Writer};

/// A run driven by a task of this engine.
#[derive(Clone)]
pub(super) struct Running {
    /// Stops the task (a child of the engine's shutdown token).
    pub(super) stop: CancellationToken,
    /// Fires when the task has ended, its steps' blocking work included.
    pub(super) ended: CancellationToken,
}

#[derive(Clone, Debug)]
pub(crate) enum RawOutcome {
    Completed(Vec<u8>),
    Failed(Failure),
}

/// How a run's task ended, as told to waiters.
#[derive(Clone, Debug)]
pub(crate) enum RunEnd {
    Finished(RawOutcome),
    Interrupted(String),
}

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) db: Arc<Database>,
    pub(crate) writer: Writer,
    pub(super) workflows: RwLock<HashMap<&'static str, Registered>>,
    pub(super) waiters: Mutex<HashMap<String, watch::Sender<Option<RunEnd>>>>,
    pub(super) running: Mutex<HashMap<String, Running>>,
    /// Runs started but not yet in the run log (their start commits with their first
    /// transition). An entry leaves only after that commit, so a reader that holds this lock
    /// and does not find an id here finds it in the run log if it was started.
    pub(crate) unrecorded: Mutex<HashMap<String, Unrecorded>>,
    pub(crate) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
}

/// The versions of one workflow this process knows: the current one, which new runs use,
/// and older ones kept only so that runs they started finish with their own steps.
#[derive(Default)]
pub(crate) struct Registered {
    pub(crate) current: Option<Arc<dyn ErasedWorkflow>>,
    pub(crate) older: Vec<Arc<dyn ErasedWorkflow>>,
}

impl Registered {
    /// Version `version`, current or older.
    pub(crate) fn version(&self, version: u32) -> Option<Arc<dyn ErasedWorkflow>> {
        self.current.iter().chain(&self.older).find(|w| w.version() == version).cloned()
    }
    /// Every version, the current one first.
    pub(crate) fn versions(&self) -> Vec<u32> {
        self.current.iter().chain(&self.older).map(|w| w.version()).collect()
    }
}

impl Inner {
    pub(crate) fn notify(&self, id: &str, end: RunEnd) {
        if let Some(tx) = lock(&self.waiters).remove(id) {
            tx.send_replace(Some(end));
        }
    }

    pub(crate) async fn submit(&self, op: Op) -> Result<Reply, OpError> {
        self.writer.submit(op).await
    }
}
