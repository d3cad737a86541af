//! The embedded queue: named queues in one SQLite file (`queue.db` in the state directory),
//! shared by the worker and the `enqueue` CLI on one machine, with the semantics of SQS:
//! visibility timeouts, receive counts, a redrive to the dead-letter table after
//! `max_receives`, and receipts that fence out a receiver whose visibility expired.
//!
//! Receiving polls (every 100 ms up to the wait): SQLite has no notification across
//! processes, and a job queue on one machine does not need lower latency than that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tokio_util::sync::CancellationToken;

use super::{Delivery, JobQueue, QueueError, QueueStats};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue         TEXT NOT NULL,
    body          TEXT NOT NULL,
    attributes    TEXT NOT NULL,
    visible_at    INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt       TEXT,
    sent_at       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id            INTEGER PRIMARY KEY,
    queue         TEXT NOT NULL,
    body          TEXT NOT NULL,
    attributes    TEXT NOT NULL,
    reason        TEXT NOT NULL,
    receive_count INTEGER NOT NULL,
    dead_at       INTEGER NOT NULL
);
";

const POLL: Duration = Duration::from_millis(100);

/// A dead-lettered message.
/// What [`EmbeddedQueue::cancel`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The message was waiting: it is gone, and no worker will run it.
    Removed,
    /// A worker has received it and may be running it now: left alone.
    Running,
    /// No such message in the queue (done, dead-lettered, or never sent here).
    NotQueued,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: String,
    pub queue: String,
    pub body: String,
    pub reason: String,
    pub receive_count: u32,
}

/// One named queue of an embedded queue file.
#[derive(Clone)]
pub struct EmbeddedQueue {
    path: PathBuf,
    name: String,
    visibility: Duration,
    max_receives: u32,
    conn: Arc<Mutex<Connection>>,
}

/// A `dead_letters` row selected as `id, queue, body, reason, receive_count`.
fn dead_letter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        message_id: r.get::<_, i64>(0)?.to_string(),
        queue: r.get(1)?,
        body: r.get(2)?,
        reason: r.get(3)?,
        receive_count: r.get(4)?,
    })
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl EmbeddedQueue {
    /// Opens queue `name` in the file at `path` (created if missing).
    pub fn open(
        path: impl AsRef<Path>,
        name: &str,
        visibility: Duration,
        max_receives: u32,
    ) -> Result<Self, QueueError> {
        let path = path.as_ref().to_path_buf();
        let err = |e: rusqlite::Error| QueueError::Unavailable {
            queue: format!("{name} in {}", path.display()),
            detail: format!("{e}; check that the state directory exists and is writable"),
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        // Several processes (the worker, `enqueue`s) may create the file at once. Switching a
        // new file to WAL takes a lock that SQLite does not wait for (it answers BUSY at
        // once, to avoid deadlock), so wait for the winner here.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let setup = conn
                .query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
                .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
                .and_then(|()| conn.execute_batch(SCHEMA));
            match setup {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(e)),
            }
        }
        Ok(Self {
            path,
            name: name.to_owned(),
            visibility,
            max_receives: max_receives.max(1),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The same file, another queue name (for replies and tests).
    pub fn named(&self, name: &str) -> Self {
        Self { name: name.to_owned(), ..self.clone() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, QueueError> {
        let conn = self.conn.clone();
        let queue = self.describe();
        tokio::task::spawn_blocking(move || {
            let mut c = crate::sync::lock(&conn);
            f(&mut c)
        })
        .await
        .map_err(|e| QueueError::Unavailable { queue: queue.clone(), detail: e.to_string() })?
        .map_err(|e| QueueError::Unavailable { queue, detail: e.to_string() })
    }

    /// Messages waiting (visible or in flight) in this queue.
    pub async fn depth(&self) -> Result<u64, QueueError> {
        let name = self.name.clone();
        self.with_conn(move |c| {
            c.query_row("SELECT COUNT(*) FROM messages WHERE queue = ?1", params![name], |r| r.get::<_, i64>(0))
        })
        .await
        .map(|n| n as u64)
    }

    /// Messages visible now: waiting to be received (not in flight).
    pub async fn visible(&self) -> Result<u64, QueueError> {
        let name = self.name.clone();
        self.with_conn(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND visible_at <= ?2",
                params![name, now_ms()],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    /// Dead letters of this queue, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let name = self.name.clone();
        self.with_conn(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, queue, body, reason, receive_count FROM dead_letters WHERE queue = ?1 ORDER BY dead_at, id",
            )?;
            let rows = stmt.query_map(params![name], dead_letter_row)?;
            rows.collect()
        })
        .await
    }

    /// Moves dead letters of this queue (all, or the one with `message_id`) back into the
    /// queue, visible now with their receive count reset, under their message ids. Returns
    /// how many moved.
    pub async fn redrive(&self, message_id: Option<&str>) -> Result<u64, QueueError> {
        let (name, id) = (self.name.clone(), self.dead_letter_id(message_id)?);
        self.with_conn(move |c| {
            let tx = c.transaction()?;
            let moved = tx.execute(
                "INSERT INTO messages (id, queue, body, attributes, visible_at, receive_count, receipt, sent_at)
                 SELECT id, queue, body, attributes, ?3, 0, NULL, ?3 FROM dead_letters
                 WHERE queue = ?1 AND (?2 IS NULL OR id = ?2)",
                params![name, id, now_ms()],
            )?;
            tx.execute("DELETE FROM dead_letters WHERE queue = ?1 AND (?2 IS NULL OR id = ?2)", params![name, id])?;
            tx.commit()?;
            Ok(moved as u64)
        })
        .await
    }

    /// Deletes dead letters of this queue (all, or the one with `message_id`). Returns how
    /// many were deleted.
    pub async fn purge_dead_letters(&self, message_id: Option<&str>) -> Result<u64, QueueError> {
        let (name, id) = (self.name.clone(), self.dead_letter_id(message_id)?);
        self.with_conn(move |c| {
            c.execute("DELETE FROM dead_letters WHERE queue = ?1 AND (?2 IS NULL OR id = ?2)", params![name, id])
                .map(|n| n as u64)
        })
        .await
    }

    /// Takes back a job that no worker has received yet (or whose worker's visibility
    /// lapsed): deletes message `message_id` if it is visible now. A job a worker is running
    /// is left alone (its result comes as usual).
    pub async fn cancel(&self, message_id: &str) -> Result<Cancelled, QueueError> {
        let (name, id) = (self.name.clone(), self.dead_letter_id(Some(message_id))?);
        self.with_conn(move |c| {
            let tx = c.transaction()?;
            let visible: Option<bool> = tx
                .query_row(
                    "SELECT visible_at <= ?3 FROM messages WHERE queue = ?1 AND id = ?2",
                    params![name, id, now_ms()],
                    |r| r.get(0),
                )
                .optional()?;
            let out = match visible {
                None => Cancelled::NotQueued,
                Some(false) => Cancelled::Running,
                Some(true) => {
                    tx.execute("DELETE FROM messages WHERE queue = ?1 AND id = ?2", params![name, id])?;
                    Cancelled::Removed
                }
            };
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    fn dead_letter_id(&self, message_id: Option<&str>) -> Result<Option<i64>, QueueError> {
        message_id
            .map(|m| {
                m.parse::<i64>().map_err(|_| QueueError::Invalid {
                    queue: self.describe(),
                    detail: format!(
                        "message id {} is not one of this queue's (they are numbers)",
                        crate::quote::quote(m)
                    ),
                })
            })
            .transpose()
    }

    fn stale(&self, d: &Delivery) -> QueueError {
        QueueError::ReceiptStale { queue: self.describe(), message_id: d.message_id.clone() }
    }

    fn id(&self, d: &Delivery) -> Result<i64, QueueError> {
        d.message_id.parse().map_err(|_| QueueError::Invalid {
            queue: self.describe(),
            detail: format!("message id {:?} is not one of this queue's", d.message_id),
        })
    }
}

#[async_trait]
impl JobQueue for EmbeddedQueue {
    fn describe(&self) -> String {
        format!("embedded:{}#{}", self.path.display(), self.name)
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let name = self.name.clone();
        self.with_conn(move |c| {
            let (waiting, in_flight) = c.query_row(
                "SELECT COALESCE(SUM(visible_at <= ?2), 0), COALESCE(SUM(visible_at > ?2), 0)
                 FROM messages WHERE queue = ?1",
                params![name, now_ms()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )?;
            let dead: i64 =
                c.query_row("SELECT COUNT(*) FROM dead_letters WHERE queue = ?1", params![name], |r| r.get(0))?;
            Ok(QueueStats { waiting: waiting as u64, in_flight: in_flight as u64, dead_letters: Some(dead as u64) })
        })
        .await
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        self.poll(max, wait, &CancellationToken::new()).await
    }

    /// Stops between two polls once `stop` fires; a poll that claimed messages always
    /// returns them.
    async fn receive_until(
        &self,
        max: usize,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.poll(max, wait, stop).await
    }

    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        let (id, receipt) = (self.id(d)?, d.receipt.clone());
        let n = self
            .with_conn(move |c| c.execute("DELETE FROM messages WHERE id = ?1 AND receipt = ?2", params![id, receipt]))
            .await?;
        if n == 0 { Err(self.stale(d)) } else { Ok(()) }
    }

    async fn extend(&self, d: &Delivery, visibility: Duration) -> Result<(), QueueError> {
        let (id, receipt) = (self.id(d)?, d.receipt.clone());
        let until = now_ms() + visibility.as_millis() as i64;
        let n = self
            .with_conn(move |c| {
                c.execute(
                    "UPDATE messages SET visible_at = ?3 WHERE id = ?1 AND receipt = ?2",
                    params![id, receipt, until],
                )
            })
            .await?;
        if n == 0 { Err(self.stale(d)) } else { Ok(()) }
    }

    async fn release(&self, d: &Delivery) -> Result<(), QueueError> {
        self.extend(d, Duration::ZERO).await
    }

    async fn defer_uncounted(&self, d: &Delivery, delay: Duration) -> Result<(), QueueError> {
        let (id, receipt) = (self.id(d)?, d.receipt.clone());
        let until = now_ms() + delay.as_millis() as i64;
        let n = self
            .with_conn(move |c| {
                c.execute(
                    "UPDATE messages SET visible_at = ?3, receive_count = MAX(receive_count - 1, 0)
                     WHERE id = ?1 AND receipt = ?2",
                    params![id, receipt, until],
                )
            })
            .await?;
        if n == 0 { Err(self.stale(d)) } else { Ok(()) }
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        let (id, receipt, reason) = (self.id(d)?, d.receipt.clone(), reason.to_owned());
        let moved = self
            .with_conn(move |c| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let n = tx.execute(
                    "INSERT INTO dead_letters (id, queue, body, attributes, reason, receive_count, dead_at)
                     SELECT id, queue, body, attributes, ?3, receive_count, ?4 FROM messages WHERE id = ?1 AND receipt = ?2",
                    params![id, receipt, reason, now_ms()],
                )?;
                tx.execute("DELETE FROM messages WHERE id = ?1 AND receipt = ?2", params![id, receipt])?;
                tx.commit()?;
                Ok(n)
            })
            .await?;
        if moved == 0 { Err(self.stale(d)) } else { Ok(()) }
    }

    async fn send(&self, to: &str, body: &str, attributes: &BTreeMap<String, String>) -> Result<String, QueueError> {
        let (to, body) = (to.to_owned(), body.to_owned());
        let attrs = serde_json::to_string(attributes)
            .map_err(|e| QueueError::Invalid { queue: to.clone(), detail: e.to_string() })?;
        let id: i64 = self
            .with_conn(move |c| {
                let now = now_ms();
                c.execute(
                    "INSERT INTO messages (queue, body, attributes, visible_at, sent_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                    params![to, body, attrs, now],
                )?;
                Ok(c.last_insert_rowid())
            })
            .await?;
        Ok(id.to_string())
    }
}

impl EmbeddedQueue {
    /// Claims up to `max` visible messages, polling until `wait` has passed or `stop` fired.
    async fn poll(&self, max: usize, wait: Duration, stop: &CancellationToken) -> Result<Vec<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let name = self.name.clone();
            let vis = self.visibility.as_millis() as i64;
            let max_receives = self.max_receives;
            let got = self
                .with_conn(move |c| {
                    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let now = now_ms();
                    // Redrive: messages already received max_receives times go to dead letters.
                    tx.execute(
                        "INSERT INTO dead_letters (id, queue, body, attributes, reason, receive_count, dead_at)
                         SELECT id, queue, body, attributes,
                                'received ' || receive_count || ' times without being handled', receive_count, ?3
                         FROM messages WHERE queue = ?1 AND visible_at <= ?3 AND receive_count >= ?2",
                        params![name, max_receives, now],
                    )?;
                    tx.execute(
                        "DELETE FROM messages WHERE queue = ?1 AND visible_at <= ?3 AND receive_count >= ?2",
                        params![name, max_receives, now],
                    )?;
                    let mut out = Vec::new();
                    {
                        let mut stmt = tx.prepare(
                            "UPDATE messages SET visible_at = ?2 + ?3, receive_count = receive_count + 1,
                                    receipt = lower(hex(randomblob(12)))
                             WHERE id IN (SELECT id FROM messages WHERE queue = ?1 AND visible_at <= ?2
                                          ORDER BY id LIMIT ?4)
                             RETURNING id, receipt, body, receive_count, attributes",
                        )?;
                        let rows = stmt.query_map(params![name, now, vis, max as i64], |r| {
                            let attrs: String = r.get(4)?;
                            Ok(Delivery {
                                message_id: r.get::<_, i64>(0)?.to_string(),
                                receipt: r.get(1)?,
                                body: r.get(2)?,
                                receive_count: r.get(3)?,
                                attributes: serde_json::from_str(&attrs).unwrap_or_default(),
                            })
                        })?;
                        for row in rows {
                            out.push(row?);
                        }
                    }
                    tx.commit()?;
                    out.sort_by_key(|d: &Delivery| d.message_id.parse::<i64>().unwrap_or(0));
                    Ok(out)
                })
                .await?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(Vec::new()),
                _ = tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())) => {}
            }
        }
    }

    /// Finds a dead letter by message id (for the CLI's `--wait` on a job that was refused).
    pub async fn dead_letter_of(&self, message_id: &str) -> Result<Option<DeadLetter>, QueueError> {
        let Ok(id) = message_id.parse::<i64>() else { return Ok(None) };
        self.with_conn(move |c| {
            c.query_row(
                "SELECT id, queue, body, reason, receive_count FROM dead_letters WHERE id = ?1",
                params![id],
                dead_letter_row,
            )
            .optional()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_queue_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path().join("queue.db"), "jobs", Duration::from_millis(300), 3).unwrap();
        super::super::conformance::run(&q, &q.named("jobs-dlq"), true).await;
        assert_eq!(q.dead_letters().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn dead_letters_are_redriven_under_their_ids_or_purged() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path().join("queue.db"), "jobs", Duration::from_secs(30), 1).unwrap();
        for body in ["a", "b", "c"] {
            q.send("jobs", body, &BTreeMap::new()).await.unwrap();
        }
        for d in q.receive(10, Duration::ZERO).await.unwrap() {
            q.dead_letter(&d, "bad").await.unwrap();
        }
        let dead = q.dead_letters().await.unwrap();
        assert_eq!((dead.len(), q.depth().await.unwrap()), (3, 0));
        assert_eq!(q.redrive(Some(&dead[0].message_id)).await.unwrap(), 1);
        let back = q.receive(10, Duration::ZERO).await.unwrap();
        assert_eq!(
            (back.len(), back[0].message_id.as_str(), back[0].body.as_str()),
            (1, dead[0].message_id.as_str(), "a")
        );
        assert_eq!(back[0].receive_count, 1, "the count starts again");
        assert_eq!(q.purge_dead_letters(Some(&dead[1].message_id)).await.unwrap(), 1);
        assert_eq!(q.redrive(None).await.unwrap(), 1, "only c is left to redrive");
        assert!(q.dead_letters().await.unwrap().is_empty());
        assert_eq!(q.purge_dead_letters(None).await.unwrap(), 0);
        assert!(q.redrive(Some("x")).await.is_err(), "a malformed id is refused");
        assert_eq!(q.redrive(Some("999")).await.unwrap(), 0, "an unknown id moves nothing");
    }
}
