//! One error enum per engine operation. Each says whether trying again can help.

use std::path::PathBuf;

use super::schema::RunStatus;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(
        "the run log {path} is already open in another process (one worker per host owns it); stop that process or point this one at another state directory"
    )]
    AlreadyOpen { path: PathBuf },
    // The cause is in the message, and not also a `source()`: `{:#}` would print it twice.
    #[error("cannot open the run log {path}: {error}")]
    Open { path: PathBuf, error: redb::DatabaseError },
    #[error("cannot initialise the run log {path}: {error}")]
    Init { path: PathBuf, error: redb::Error },
    #[error("Engine::open must be called inside a tokio runtime")]
    NoRuntime,
}

impl OpenError {
    /// Only another process holding the file can go away by itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::AlreadyOpen { .. } => true,
            Self::Open { .. } | Self::Init { .. } | Self::NoRuntime => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    #[error("workflow {0} is registered twice")]
    Duplicate(String),
}

impl RegisterError {
    /// A program error: registering again cannot help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Duplicate(_) => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("run id {0:?} is empty or longer than 4096 bytes")]
    InvalidId(String),
    #[error("run {id} belongs to workflow {existing}, not {requested}")]
    WrongWorkflow { id: String, existing: String, requested: String },
    /// A run id names one piece of work: starting it again with another input is a mistake
    /// of the caller (say, an invocation id reused for another family), never a retry.
    #[error("run {id} already exists with another input ({existing}); a run id cannot be reused for different work")]
    InputMismatch { id: String, existing: String },
    #[error("cannot encode the input or initial response of run {id}: {error}")]
    Encode { id: String, error: serde_json::Error },
    #[error("run {id} cannot start: {why}")]
    Corrupt { id: String, why: String },
    #[error("workflow {0} is not registered with this engine")]
    NotRegistered(String),
    #[error("run log storage failed: {0}")]
    Storage(String),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl StartError {
    /// Whether the same start may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(_) | Self::ShutDown => true,
            Self::InvalidId(_)
            | Self::WrongWorkflow { .. }
            | Self::InputMismatch { .. }
            | Self::Encode { .. }
            | Self::Corrupt { .. }
            | Self::NotRegistered(_) => false,
        }
    }

    /// Whether the request itself is wrong (an id that cannot be, or one reused for other
    /// work): no retry and no repair of the host helps, so a job carrying it is
    /// dead-lettered. The other permanent errors are faults of the host or the program (a
    /// run record that does not decode, a workflow this build does not register, an input
    /// that does not encode): the job is kept and retried, and the error is logged loudly.
    pub fn is_callers_mistake(&self) -> bool {
        match self {
            Self::InvalidId(_) | Self::WrongWorkflow { .. } | Self::InputMismatch { .. } => true,
            Self::Encode { .. } | Self::Corrupt { .. } | Self::NotRegistered(_) | Self::Storage(_) | Self::ShutDown => {
                false
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    #[error("no run with id {0}")]
    NotFound(String),
    #[error("stopped waiting for run {id}: {reason}; it stays active and resumes at the next start")]
    Interrupted { id: String, reason: String },
    #[error("the result of run {id} does not decode: {error}")]
    Decode { id: String, error: String },
    #[error("run log storage failed: {0}")]
    Storage(String),
}

impl WaitError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Interrupted { .. } | Self::Storage(_) => true,
            Self::NotFound(_) | Self::Decode { .. } => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CancelError {
    #[error("no run with id {0}")]
    NotFound(String),
    #[error("run {id} is already {status:?}; only active runs can be cancelled")]
    NotActive { id: String, status: RunStatus },
    #[error("run log storage failed: {0}")]
    Storage(String),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl CancelError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(_) | Self::ShutDown => true,
            Self::NotFound(_) | Self::NotActive { .. } => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error("no run with id {0}")]
    NotFound(String),
    #[error("run {0} is still active; only a finished run can be archived")]
    StillActive(String),
    #[error("run log storage failed: {0}")]
    Storage(String),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl ArchiveError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(_) | Self::ShutDown => true,
            Self::NotFound(_) | Self::StillActive(_) => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PruneError {
    #[error("pruning the run log failed: {0}")]
    Storage(String),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl PruneError {
    /// Pruning is maintenance: the next pass tries again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(_) | Self::ShutDown => true,
        }
    }
}

/// A read of the run log failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the run log failed: {0}")]
pub struct ReadError(pub redb::Error);

// Not `#[from]`: that would also make the cause a `source()`, printed twice by `{:#}`.
impl From<redb::Error> for ReadError {
    fn from(e: redb::Error) -> Self {
        ReadError(e)
    }
}

impl ReadError {
    /// A failed read may succeed later unless the file is corrupt.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.0, redb::Error::Corrupted(_))
    }

    pub(crate) fn from_any(e: impl Into<redb::Error>) -> Self {
        Self(e.into())
    }
}
