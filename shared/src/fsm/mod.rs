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
//! Layout: `workflow` (the typed definition), `engine` (start, wait, cancel, resume,
//! shutdown, history reads), `runner` (one run's loop), `retry` (the only user of
//! `backoff`), `writer` (every redb write; leader/follower group commit in the caller's
//! thread), `schema` (tables and
//! records), `key` (collision-free composite keys). The commit protocol and crash
//! assumptions are in `DESIGN.md` beside this file.

mod engine;
mod error;
pub mod key;
mod retry;
mod runner;
mod schema;
mod workflow;
mod writer;

pub use engine::{
    Engine, EngineConfig, Outcome, RecordedResponse, ResumeReport, RunDetail, RunError, RunFilter, RunSummary,
    StartOutcome, WorkflowHandle, WorkflowInfo,
};
pub use error::{CancelError, OpenError, ReadError, RegisterError, StartError, WaitError};
pub use retry::{RetryPolicy, retry_transient};
pub use schema::{AttemptErrorKind, Event, EventKind, Failure, FailureKind, RunStatus};
pub use workflow::{StepError, StepRequest, StepResult, Workflow};

#[cfg(test)]
mod tests;
