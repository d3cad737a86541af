//! Defining a workflow: an ordered list of named async steps over an input `R` and a
//! response `W` that each step receives from the previous one and returns updated.
//!
//! ```ignore
//! let wf = Workflow::<Input, Resp>::new("prepare", 1)
//!     .step("fetch_manifest", |req| async move { Ok(Resp { manifest: Some(fetch(&req.r).await?), ..req.w }) })
//!     .step_with("download_blobs", RetryPolicy { max_attempts: 20, ..Default::default() }, download);
//! ```
//!
//! The engine stores `R` and `W` as JSON; this module is where the typed world meets the
//! engine's bytes ([`ErasedWorkflow`]).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::retry::RetryPolicy;
use super::stop::StopSignal;

/// What a step receives.
#[derive(Debug)]
pub struct StepRequest<R, W> {
    pub run_id: Arc<str>,
    /// The run's input, written once at start.
    pub r: Arc<R>,
    /// The previous step's response (the initial response for the first step).
    pub w: W,
    /// 1 for the first attempt of this step; counts across restarts.
    pub attempt: u32,
    /// Fires when this attempt must end; blocking work goes through it (`fsm/stop.rs`).
    pub stop: StopSignal,
}

/// A step's error, classified for the retry loop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Retrying cannot help: the run fails now. `code` is the workflow's machine-readable
    /// cause, kept in the run's [`super::Failure`] for callers to decide on.
    #[error("{message}")]
    Abort { message: String, code: Option<&'static str> },
    /// May succeed later: retried under the step's policy.
    #[error("{0}")]
    Transient(String),
}

impl StepError {
    pub fn abort(e: impl std::fmt::Display) -> Self {
        Self::Abort { message: e.to_string(), code: None }
    }
    /// An abort with a machine-readable cause.
    pub fn abort_with(code: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Abort { message: e.to_string(), code: Some(code) }
    }
    pub fn transient(e: impl std::fmt::Display) -> Self {
        Self::Transient(e.to_string())
    }
}

pub type StepResult<W> = Result<W, StepError>;

type StepFn<R, W> = Arc<dyn Fn(StepRequest<R, W>) -> BoxFuture<'static, StepResult<W>> + Send + Sync>;

struct StepDef<R, W> {
    name: &'static str,
    policy: RetryPolicy,
    run: StepFn<R, W>,
}

/// A workflow definition. Register it with [`super::Engine::register`].
pub struct Workflow<R, W> {
    name: &'static str,
    version: u32,
    steps: Vec<StepDef<R, W>>,
    default_policy: RetryPolicy,
    durable_start: bool,
}

impl<R, W> Workflow<R, W>
where
    R: Serialize + DeserializeOwned + Send + Sync + 'static,
    W: Serialize + DeserializeOwned + Send + 'static,
{
    /// `version` is stored with each run; a run started under another version is failed on
    /// resume instead of being fed to steps it was not written for.
    pub fn new(name: &'static str, version: u32) -> Self {
        Self { name, version, steps: Vec::new(), default_policy: RetryPolicy::default(), durable_start: false }
    }

    /// Records each run's start on its own, durably, before its first step runs (one more
    /// commit per run). By default the start is committed together with the run's first
    /// transition (`fsm/DESIGN.md`, guarantee 1): right for runs whose caller starts them
    /// again after a crash (a job whose message was not acknowledged).
    pub fn with_durable_start(mut self) -> Self {
        self.durable_start = true;
        self
    }

    /// The policy of steps added after this call with [`Workflow::step`].
    pub fn default_policy(mut self, policy: RetryPolicy) -> Self {
        self.default_policy = policy;
        self
    }

    /// Appends a step with the default retry policy.
    pub fn step<F, Fut>(self, name: &'static str, f: F) -> Self
    where
        F: Fn(StepRequest<R, W>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepResult<W>> + Send + 'static,
    {
        let policy = self.default_policy.clone();
        self.step_with(name, policy, f)
    }

    /// Appends a step with its own retry policy.
    pub fn step_with<F, Fut>(mut self, name: &'static str, policy: RetryPolicy, f: F) -> Self
    where
        F: Fn(StepRequest<R, W>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepResult<W>> + Send + 'static,
    {
        self.steps.push(StepDef { name, policy, run: Arc::new(move |req| Box::pin(f(req))) });
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name).collect()
    }
}

/// The engine's view of a workflow: bytes in, bytes out.
pub(crate) trait ErasedWorkflow: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn durable_start(&self) -> bool;
    fn step_count(&self) -> usize;
    fn step_name(&self, index: usize) -> &'static str;
    fn policy(&self, index: usize) -> &RetryPolicy;
    /// Decodes the run's input once; the error names what failed to decode.
    fn bind(&self, run_id: Arc<str>, input: &[u8]) -> Result<Arc<dyn BoundRun>, String>;
}

/// One run's input bound to the workflow's steps.
pub(crate) trait BoundRun: Send + Sync {
    fn call(
        &self,
        index: usize,
        w: &[u8],
        attempt: u32,
        stop: StopSignal,
    ) -> BoxFuture<'static, Result<Vec<u8>, CallError>>;
}

pub(crate) enum CallError {
    Step(StepError),
    /// The stored response could not be decoded or the new one encoded.
    Corrupt(String),
}

struct Bound<R, W> {
    run_id: Arc<str>,
    r: Arc<R>,
    steps: Vec<StepFn<R, W>>,
    _w: PhantomData<fn() -> W>,
}

impl<R, W> ErasedWorkflow for Workflow<R, W>
where
    R: Serialize + DeserializeOwned + Send + Sync + 'static,
    W: Serialize + DeserializeOwned + Send + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn durable_start(&self) -> bool {
        self.durable_start
    }
    fn step_count(&self) -> usize {
        self.steps.len()
    }
    fn step_name(&self, index: usize) -> &'static str {
        self.steps.get(index).map_or("(none)", |s| s.name)
    }
    fn policy(&self, index: usize) -> &RetryPolicy {
        self.steps.get(index).map_or(&self.default_policy, |s| &s.policy)
    }
    fn bind(&self, run_id: Arc<str>, input: &[u8]) -> Result<Arc<dyn BoundRun>, String> {
        let r: R = serde_json::from_slice(input)
            .map_err(|e| format!("input of run {run_id} does not decode as {}: {e}", std::any::type_name::<R>()))?;
        Ok(Arc::new(Bound::<R, W> {
            run_id,
            r: Arc::new(r),
            steps: self.steps.iter().map(|s| s.run.clone()).collect(),
            _w: PhantomData,
        }))
    }
}

impl<R, W> BoundRun for Bound<R, W>
where
    R: Send + Sync + 'static,
    W: Serialize + DeserializeOwned + Send + 'static,
{
    fn call(
        &self,
        index: usize,
        w: &[u8],
        attempt: u32,
        stop: StopSignal,
    ) -> BoxFuture<'static, Result<Vec<u8>, CallError>> {
        // The runner only calls indices below `step_count`.
        let step = self.steps[index].clone();
        let decoded: Result<W, _> = serde_json::from_slice(w);
        let run_id = self.run_id.clone();
        let r = self.r.clone();
        Box::pin(async move {
            let w = decoded.map_err(|e| {
                CallError::Corrupt(format!(
                    "stored response of run {run_id} does not decode as {}: {e}",
                    std::any::type_name::<W>()
                ))
            })?;
            let next = step(StepRequest { run_id, r, w, attempt, stop }).await.map_err(CallError::Step)?;
            serde_json::to_vec(&next).map_err(|e| CallError::Corrupt(format!("response does not encode: {e}")))
        })
    }
}
