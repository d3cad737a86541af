//! One error enum per engine operation. Each says whether trying again can help.

use std::path::PathBuf;

use super::schema::RunStatus;

/// A failure of the run log's storage, by what it means for the host: a full disk is
/// mended by freeing space, a corrupt file by an operator, an I/O error may pass, and an
/// internal error is a bug of this program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("the disk holding the run log is full ({0}); free space on it")]
    NoSpace(String),
    #[error("the run log is corrupt: {0}")]
    Corrupt(String),
    #[error("run log I/O failed: {0}")]
    Io(String),
    #[error("the run log engine failed (a bug): {0}")]
    Internal(String),
}

impl StorageError {
    /// Classifies a redb error. `PreviousIo` (redb refuses writes after a failed one) is
    /// reported by the writer as the failure that caused it; here it is plain I/O.
    pub fn of(e: &redb::Error) -> Self {
        match e {
            redb::Error::Io(io) if is_no_space(io) => Self::NoSpace(e.to_string()),
            redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseAlreadyOpen => Self::Io(e.to_string()),
            redb::Error::Corrupted(_) => Self::Corrupt(e.to_string()),
            // redb's own enum is not exhaustive: its other errors are misuses of its API.
            _ => Self::Internal(e.to_string()),
        }
    }

    /// Space may be freed and I/O may recover (after the owner reopens the log); a corrupt
    /// file or a bug stays.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NoSpace(_) | Self::Io(_) => true,
            Self::Corrupt(_) | Self::Internal(_) => false,
        }
    }
}

impl From<redb::Error> for StorageError {
    fn from(e: redb::Error) -> Self {
        Self::of(&e)
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

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
    #[error(transparent)]
    Storage(StorageError),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl StartError {
    /// Whether the same start may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(e) => e.is_retryable(),
            Self::ShutDown => true,
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
    #[error(transparent)]
    Storage(StorageError),
}

impl WaitError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(e) => e.is_retryable(),
            Self::Interrupted { .. } => true,
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
    #[error(transparent)]
    Storage(StorageError),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl CancelError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(e) => e.is_retryable(),
            Self::ShutDown => true,
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
    #[error(transparent)]
    Storage(StorageError),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl ArchiveError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(e) => e.is_retryable(),
            Self::ShutDown => true,
            Self::NotFound(_) | Self::StillActive(_) => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PruneError {
    #[error("pruning the run log failed: {0}")]
    Storage(StorageError),
    #[error("the engine is shutting down")]
    ShutDown,
}

impl PruneError {
    /// Pruning is maintenance: the next pass tries again unless the log is corrupt.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(e) => e.is_retryable(),
            Self::ShutDown => true,
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
        self.kind().is_retryable()
    }

    /// What the failure means, as [`StorageError`].
    pub fn kind(&self) -> StorageError {
        StorageError::of(&self.0)
    }

    pub(crate) fn from_any(e: impl Into<redb::Error>) -> Self {
        Self(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_keep_their_kind_and_only_space_and_io_are_retried() {
        let io = |n| redb::Error::Io(std::io::Error::from_raw_os_error(n));
        let cases = [
            (io(libc::ENOSPC), StorageError::NoSpace(String::new()), true),
            (io(libc::EDQUOT), StorageError::NoSpace(String::new()), true),
            (io(libc::EIO), StorageError::Io(String::new()), true),
            (redb::Error::PreviousIo, StorageError::Io(String::new()), true),
            (redb::Error::Corrupted("bad page".into()), StorageError::Corrupt(String::new()), false),
            (redb::Error::TableDoesNotExist("runs".into()), StorageError::Internal(String::new()), false),
        ];
        for (e, kind, retryable) in cases {
            let got = StorageError::of(&e);
            assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&kind), "{e}: {got:?}");
            assert_eq!(got.is_retryable(), retryable, "{got}");
            assert_eq!(StartError::Storage(got.clone()).is_retryable(), retryable);
            assert!(!StartError::Storage(got).is_callers_mistake(), "a storage failure is never the job's fault");
        }
    }
}
