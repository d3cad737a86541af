//! The typed face of a registered workflow: start, wait and run with the workflow's own
//! input and response types; the engine underneath deals in bytes.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use std::sync::Arc;

use super::engine::{Engine, Outcome, StartOutcome};
use super::error::{RegisterError, StartError, WaitError};
use super::state::RawOutcome;
use super::workflow::Workflow;

impl Engine {
    /// Registers the current version of a workflow and returns the typed handle to start
    /// and wait on its runs. New runs use this version.
    pub fn register<R, W>(&self, workflow: Workflow<R, W>) -> Result<WorkflowHandle<R, W>, RegisterError>
    where
        R: Serialize + DeserializeOwned + Send + Sync + 'static,
        W: Serialize + DeserializeOwned + Send + 'static,
    {
        let name = workflow.name();
        let mut map = crate::sync::write(&self.inner.workflows);
        let registered = map.entry(name).or_default();
        if registered.current.is_some() || registered.version(workflow.version()).is_some() {
            return Err(RegisterError::Duplicate(name.to_owned()));
        }
        registered.current = Some(Arc::new(workflow));
        Ok(WorkflowHandle { engine: self.clone(), name, _types: PhantomData })
    }

    /// Keeps an older version of a workflow so that the runs it started before an upgrade
    /// finish with its own steps (`fsm/DESIGN.md`, guarantee 11). No new run uses it; its
    /// input and response must decode as the current version's types for `wait` to read
    /// their outcomes.
    pub fn register_older<R, W>(&self, workflow: Workflow<R, W>) -> Result<(), RegisterError>
    where
        R: Serialize + DeserializeOwned + Send + Sync + 'static,
        W: Serialize + DeserializeOwned + Send + 'static,
    {
        let name = workflow.name();
        let mut map = crate::sync::write(&self.inner.workflows);
        let registered = map.entry(name).or_default();
        if registered.version(workflow.version()).is_some() {
            return Err(RegisterError::Duplicate(format!("{name} version {}", workflow.version())));
        }
        registered.older.push(Arc::new(workflow));
        Ok(())
    }
}

/// The typed face of one registered workflow.
pub struct WorkflowHandle<R, W> {
    engine: Engine,
    name: &'static str,
    _types: PhantomData<fn(R) -> W>,
}

impl<R, W> Clone for WorkflowHandle<R, W> {
    fn clone(&self) -> Self {
        Self { engine: self.engine.clone(), name: self.name, _types: PhantomData }
    }
}

impl<R, W> WorkflowHandle<R, W>
where
    R: Serialize + DeserializeOwned + Send + Sync + 'static,
    W: Serialize + DeserializeOwned + Send + 'static,
{
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Records the run (id, input, initial response) durably, then starts its first step.
    pub async fn start(&self, id: &str, input: &R, initial: &W) -> Result<StartOutcome<W>, StartError> {
        let encode = |error| StartError::Encode { id: id.to_owned(), error };
        let input = serde_json::to_vec(input).map_err(encode)?;
        let w0 = serde_json::to_vec(initial).map_err(encode)?;
        let wf = self.engine.workflow(self.name).ok_or_else(|| StartError::NotRegistered(self.name.to_owned()))?;
        Ok(match self.engine.start_raw(wf, id, input, w0).await? {
            StartOutcome::Started => StartOutcome::Started,
            StartOutcome::AlreadyRunning => StartOutcome::AlreadyRunning,
            StartOutcome::Finished(raw) => StartOutcome::Finished(
                decode_outcome(id, raw_of(raw))
                    .map_err(|e| StartError::Corrupt { id: id.to_owned(), why: e.to_string() })?,
            ),
        })
    }

    /// Waits for the run to finish; after a restart too. Unknown id: `NotFound`.
    pub async fn wait(&self, id: &str) -> Result<Outcome<W>, WaitError> {
        decode_outcome(id, self.engine.wait_raw(id).await?)
    }

    /// `start`, then `wait`: whether the run is new, already running, or finished.
    pub async fn run(&self, id: &str, input: &R, initial: &W) -> Result<Outcome<W>, RunError> {
        match self.start(id, input, initial).await? {
            StartOutcome::Finished(outcome) => Ok(outcome),
            StartOutcome::Started | StartOutcome::AlreadyRunning => Ok(self.wait(id).await?),
        }
    }
}

/// `WorkflowHandle::run` failed to start or to wait.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Wait(#[from] WaitError),
}

impl RunError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Start(e) => e.is_retryable(),
            Self::Wait(e) => e.is_retryable(),
        }
    }
}

fn raw_of(o: Outcome<Vec<u8>>) -> RawOutcome {
    match o {
        Outcome::Completed(w) => RawOutcome::Completed(w),
        Outcome::Failed(f) => RawOutcome::Failed(f),
    }
}

fn decode_outcome<W: DeserializeOwned>(id: &str, raw: RawOutcome) -> Result<Outcome<W>, WaitError> {
    match raw {
        RawOutcome::Failed(f) => Ok(Outcome::Failed(f)),
        RawOutcome::Completed(bytes) => serde_json::from_slice(&bytes)
            .map(Outcome::Completed)
            .map_err(|e| WaitError::Decode { id: id.to_owned(), error: e.to_string() }),
    }
}
