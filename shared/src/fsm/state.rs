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
    pub(super) workflows: RwLock<HashMap<&'static str, Arc<dyn ErasedWorkflow>>>,
    pub(super) waiters: Mutex<HashMap<String, watch::Sender<Option<RunEnd>>>>,
    pub(super) running: Mutex<HashMap<String, Running>>,
    /// Runs started but not yet in the run log (their start commits with their first
    /// transition). An entry leaves only after that commit, so a reader that holds this lock
    /// and does not find an id here finds it in the run log if it was started.
    pub(crate) unrecorded: Mutex<HashMap<String, Unrecorded>>,
    pub(crate) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
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
