//! The host's SQLite database: images, snapshots, leases and id sequences.
//!
//! One file per host, opened by every process that needs it (the worker, the CLI, tests).
//! WAL mode with `synchronous=FULL`: an intent record (a base or snapshot id about to be
//! created) is durable before the side effect it announces, so a power loss cannot leave an
//! orphan (the advisory writes, a snapshot's `created` and `exposed` marks, skip their fsync;
//! see `snapshots.rs`). A busy timeout makes short contention wait instead of fail; past it the error is
//! [`StoreError::Locked`]. Migrations run at open, in one transaction.
//!
//! Calls are synchronous and short (one statement, one fsync at most). Async code calls
//! them through [`Store::call`], the one async facade: the call runs on the blocking pool, so
//! an fsync never holds an async worker thread.

mod bases;
mod error;
mod file_digests;
mod images;
mod lease;
mod migrations;
mod placement;
mod sequence;
mod snapshots;
mod verified;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

pub use bases::{BaseIntent, BaseRow, BaseState, Retire, short_digest};
pub use error::StoreError;
pub use images::ImageRow;
pub use lease::{Acquired, Holder, LeaseInfo};
pub use placement::Binding;
pub use snapshots::{Advance, Intent, RESERVE_BATCH, ReleaseRequest, Restored, SnapshotRow, SnapshotState, rfc3339};

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a statement waits for another connection's lock before `Locked`.
    pub busy_timeout: Duration,
    /// Who moves the WAL back into the database file.
    pub checkpoint: Checkpoint,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { busy_timeout: Duration::from_secs(5), checkpoint: Checkpoint::Inline }
    }
}

/// Who checkpoints the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// SQLite's default: the connection whose commit fills the WAL past 1,000 pages
    /// checkpoints inside that commit. Fine for short-lived tools.
    Inline,
    /// A thread of the store's own checkpoints (passively: it never blocks a writer) once the
    /// WAL holds [`CHECKPOINT_PAGES`] pages, looking every `every`; commits never do, so a job's
    /// intent commit never pays for a checkpoint. For the worker, which commits on the job path.
    Background { every: Duration },
}

/// WAL pages that make the background checkpointer act (SQLite's own autocheckpoint default).
pub const CHECKPOINT_PAGES: i64 = 1000;

/// The host database.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// The background checkpointer ([`Checkpoint::Background`]); stopped and joined on drop.
    checkpointer: Option<Checkpointer>,
}

struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(Checkpointer { stop, thread }) = self.checkpointer.take() {
            drop(stop); // the thread's receive ends: it checkpoints once more and returns
            if thread.join().is_err() {
                tracing::warn!(path = %self.path.display(), "the WAL checkpoint thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(path, &StoreOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, options: &StoreOptions) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err = |e| StoreError::classify(&path, e);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(err)?;
        conn.busy_timeout(options.busy_timeout).map_err(err)?;
        // Room for every statement the store prepares (about 60; rusqlite keeps 16 by default),
        // so a statement on a hot path is parsed once per connection, not once per call.
        conn.set_prepared_statement_cache_capacity(128);
        // journal_mode answers with a row; the first read of the file happens here, so a
        // corrupt or foreign file is reported now, not at the first job.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::ReadOnly {
                path,
                detail: format!("could not switch to WAL mode (journal_mode is {mode})"),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(err)?;
        migrate(&path, &mut conn)?;
        let checkpointer = match options.checkpoint {
            Checkpoint::Inline => None,
            Checkpoint::Background { every } => {
                // The WAL hook replaces SQLite's autocheckpoint (which would run inside a
                // commit) and only notes how long the WAL is. SQLite calls it when a statement
                // that commits steps to its end (every transaction's COMMIT does); a commit
                // it misses is seen at the next one, or by the checkpoint at drop.
                let pages = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
                let seen = pages.clone();
                conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, n: std::ffi::c_int| {
                    seen.store(i64::from(n), std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }))
                .map_err(err)?;
                let other = Connection::open_with_flags(&path, flags).map_err(err)?;
                other.busy_timeout(options.busy_timeout).map_err(err)?;
                Some(spawn_checkpointer(path.clone(), other, every, pages))
            }
        };
        Ok(Store { path, conn: Mutex::new(conn), checkpointer })
    }

    /// Runs `f` (calls on this store) on the blocking pool and returns its result: the way
    /// async code uses the host database.
    pub async fn call<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(result) => result,
            // `f` panicked (a bug): the call failed; the database is as its last commit left it.
            Err(e) => Err(StoreError::Invalid {
                path: self.path.clone(),
                what: "a host database call".into(),
                detail: format!("its task failed: {e}"),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.with_conn(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
    }

    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        // A panic while holding the connection leaves no half-done statement behind:
        // SQLite rolls back an unfinished statement itself.
        let conn = crate::sync::lock(&self.conn);
        f(&conn).map_err(|e| StoreError::classify(&self.path, e))
    }
}

/// Checkpoints the WAL on its own connection whenever it holds [`CHECKPOINT_PAGES`] pages
/// (looking every `every`), and once more when the store is dropped.
fn spawn_checkpointer(
    path: PathBuf,
    conn: Connection,
    every: Duration,
    pages: std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> Checkpointer {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        loop {
            let last = matches!(stopped.recv_timeout(every), Err(std::sync::mpsc::RecvTimeoutError::Disconnected));
            if !last && pages.load(std::sync::atomic::Ordering::Relaxed) < CHECKPOINT_PAGES {
                continue;
            }
            // (busy, WAL pages, pages checkpointed): a busy checkpoint is simply tried again.
            let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            });
            if let Err(e) = done {
                tracing::warn!(path = %path.display(), error = %e, "WAL checkpoint failed; it is tried again");
            }
            if last {
                return;
            }
        }
    });
    Checkpointer { stop, thread }
}

fn migrate(path: &Path, conn: &mut Connection) -> Result<(), StoreError> {
    let err = |e| StoreError::classify(path, e);
    let known = migrations::MIGRATIONS.len() as i64;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err)?;
    if version > known {
        return Err(StoreError::TooNew { path: path.to_path_buf(), found: version, known });
    }
    for (i, sql) in migrations::MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64).map_err(err)?;
    }
    tx.commit().map_err(err)
}

/// Milliseconds since the epoch, as SQLite stores times here.
pub(crate) fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests;
