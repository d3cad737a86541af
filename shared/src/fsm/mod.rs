//! The durable finite-state-machine engine on redb.
//!
//! A [`Workflow`] is a fixed, ordered list of named async steps over an input `R` (written
//! once) and a response `W` threaded from step to step. The [`Engine`] runs each run as a
//! task and commits every transition (the step's response, the next state and a history
//! event) in one redb transaction before the next step starts, so a crash at any instant
//! resumes from the last completed transition; a run's start is committed with its first
//! transition (guarantee 1 in `DESIGN.md`). Steps run at least once: each must be
//! idempotent, or guarded by a durable record checked before its side effect.
//!
//! The engine knows nothing of images, volumes or queues.
//!
//! Layout: `workflow` (the typed definition), `engine` (open, register, start, wait,
//! cancel, resume, archive, prune, shutdown), `state` (what the engine and its run tasks
//! share), `runner` (one run's loop), `stop` (a step
//! body's stop signal and the blocking work it owns), `history` (listings and run details), `handle` (the
//! typed face of a workflow), `retry` (the only user of `backoff`), `writer` (every redb
//! write, table creation included; leader/follower group commit in the caller's thread),
//! `schema` (tables and records), `key` (collision-free composite keys). The commit protocol and crash
//! assumptions are in `DESIGN.md` beside this file.

mod engine;
mod error;
mod handle;
mod history;
pub mod key;
mod retry;
mod runner;
mod schema;
mod state;
mod stop;
mod workflow;
mod writer;

pub use engine::{Engine, EngineConfig, Outcome, ResumeReport, StartOutcome};
pub use error::{
    ArchiveError, CancelError, OpenError, PruneError, ReadError, RegisterError, StartError, StorageError, WaitError,
};
pub use handle::{RunError, WorkflowHandle};
pub use history::{RecordedResponse, RunDetail, RunFilter, RunSummary, WorkflowInfo};
pub use retry::{RetryPolicy, retry_transient};
pub use schema::{AttemptErrorKind, Event, EventKind, Failure, FailureKind, RunStatus};
pub use stop::StopSignal;
pub use workflow::{StepError, StepRequest, StepResult, Workflow};

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
