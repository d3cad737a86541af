//! The store's error type. Every variant names the database file; `is_retryable` says
//! whether trying again can help.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "the host database {path} is locked by another connection and stayed locked past the busy timeout; retry, or find the process holding it"
    )]
    Locked { path: PathBuf },
    #[error(
        "the host database {path} is read-only (or its directory is): {detail}; make the state directory writable by this user"
    )]
    ReadOnly { path: PathBuf, detail: String },
    #[error(
        "cannot open or create the host database {path}: {detail}; check that its directory exists and is writable"
    )]
    CannotOpen { path: PathBuf, detail: String },
    #[error(
        "the host database {path} is corrupt or not an SQLite database ({detail}); move it aside (a new one starts empty), then `worker reconcile` lists the volumes no record claims and `--fix` deletes them"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("the disk holding the host database {path} is full")]
    DiskFull { path: PathBuf },
    #[error("the host database {path} has schema version {found}; this build knows up to {known}: upgrade thinpipe")]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error("lease {key} is no longer held by {holder}: it expired and was taken over, or was never held")]
    LeaseLost { key: String, holder: String },
    #[error("{what} in {path}: {detail}")]
    Invalid { path: PathBuf, what: String, detail: String },
    #[error("a host database write was interrupted: {detail}; retry")]
    Interrupted { detail: String },
    // The cause is in the message, and not also a `source()`: `{:#}` would print it twice.
    #[error("host database {path}: {error}")]
    Sqlite { path: PathBuf, error: rusqlite::Error },
}

impl StoreError {
    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Locked { .. } | Self::DiskFull { .. } | Self::Interrupted { .. })
    }

    pub(crate) fn classify(path: &std::path::Path, e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let path = path.to_path_buf();
        let detail = e.to_string();
        match e.sqlite_error_code() {
            Some(C::DatabaseBusy | C::DatabaseLocked) => Self::Locked { path },
            Some(C::ReadOnly) => Self::ReadOnly { path, detail },
            Some(C::CannotOpen | C::PermissionDenied) => Self::CannotOpen { path, detail },
            Some(C::DatabaseCorrupt | C::NotADatabase) => Self::Corrupt { path, detail },
            Some(C::DiskFull) => Self::DiskFull { path },
            _ => Self::Sqlite { path, error: e },
        }
    }
}
