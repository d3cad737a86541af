//! The `snapshots` table: one row per invocation (keyed by its activation's run id), and
//! the one fenced path that moves a row between states.
//!
//! States move one way only: `intended → created → exposed` while the snapshot is live, then
//! `releasing → released` once a release arrived. Every change goes through [`advance_in`],
//! whose `UPDATE … WHERE state IN (…)` only matches a row that is behind the target state;
//! the store, not each step, decides what a move means:
//!
//! - a move forward happens ([`Advance::Moved`]);
//! - a move to a state the row is already at or past, within the same half, changes nothing
//!   ([`Advance::Unchanged`]): a re-run step after a crash;
//! - a live move (`created`, `exposed`) on a row that a release has reached changes nothing
//!   and says so ([`Advance::Released`]): the release won, the activation must stop.
//!
//! The row is written in state `intended` before the volume is created; a resume finds it and
//! finishes the same snapshot instead of creating a second one. Its id is *bound*, not
//! allocated: ids are taken from the `snap` sequence durably in batches
//! ([`Store::reserve_snapshot_ids`], one fsync per [`RESERVE_BATCH`] activations) into
//! `snapshot_ids`, and an intent moves the smallest reserved id into its row in a transaction
//! that waits for no fsync. The activation's one durable write is then the run log's commit
//! of its step. A process crash keeps the binding (the WAL is written before the call
//! returns); a power loss may lose it, leaving a reserved id whose volume exists: at start-up,
//! before any run resumes, `pipeline::reservations` resolves each such id against the disk and
//! the run log (the completed activation that holds it gets its row back; otherwise the
//! volume is deleted), so an id is never handed out with another invocation's volume. A release that finds no row leaves a *tombstone* (a row born
//! `released`, with no base), so an invocation id is single use: a later activation of it is
//! refused instead of creating a snapshot nobody will release.

use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Store, StoreError, epoch_ms};

/// Where a snapshot row is in its life. The order of the variants is the order of the states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// The id is recorded; the volume may not exist yet.
    Intended,
    /// The volume exists.
    Created,
    /// The volume is exposed at the row's path (an advisory mark).
    Exposed,
    /// A release arrived: no activation may use the row again; the volume is being deleted.
    Releasing,
    /// The volume is gone (or never existed: a tombstone).
    Released,
}

impl SnapshotState {
    const ALL: [SnapshotState; 5] = [Self::Intended, Self::Created, Self::Exposed, Self::Releasing, Self::Released];

    pub fn name(self) -> &'static str {
        match self {
            Self::Intended => "intended",
            Self::Created => "created",
            Self::Exposed => "exposed",
            Self::Releasing => "releasing",
            Self::Released => "released",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.name() == s)
    }

    /// Whether a release has reached the row.
    pub fn is_released(self) -> bool {
        self >= Self::Releasing
    }
}

impl std::fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: u64,
    /// The activation's run id (`activate-<invocation_id>`).
    pub run_id: String,
    pub family: String,
    /// The base the snapshot is made from; `None` for a tombstone.
    pub base_vol_id: Option<u64>,
    pub vol_id: String,
    pub path: Option<String>,
    pub state: SnapshotState,
    pub created_at_ms: i64,
    /// When the first release of this invocation arrived.
    pub release_requested_at_ms: Option<i64>,
    /// When the volume was gone for good.
    pub released_at_ms: Option<i64>,
    /// The version (manifest digest) of the base it was made from.
    pub digest: Option<String>,
    /// When the worker releases it by itself (the activation's `ttl_secs`).
    pub expires_at_ms: Option<i64>,
    /// The host whose activation made it (`worker.host_id`).
    pub host_id: Option<String>,
}

impl SnapshotRow {
    /// A row a release made before any activation did: it never had a volume.
    pub fn is_tombstone(&self) -> bool {
        self.base_vol_id.is_none()
    }

    /// "invocation X was released at <time>; use a new invocation id", for a released row.
    pub fn released_message(&self) -> String {
        let invocation = self.run_id.strip_prefix("activate-").unwrap_or(&self.run_id);
        let at = self.release_requested_at_ms.or(self.released_at_ms).map_or_else(|| "an unknown time".into(), rfc3339);
        format!("invocation {invocation} was released at {at}; use a new invocation id")
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.to_string(),
        Err(_) => format!("{ms} ms after the epoch"),
    }
}

/// What a completed activation recorded in the run log, for [`Store::restore_snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub id: u64,
    pub run_id: String,
    pub family: String,
    pub base_vol_id: u64,
    pub vol_id: String,
    pub path: Option<String>,
    pub digest: Option<String>,
    pub host_id: Option<String>,
}

/// What [`Store::intend_snapshot`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Intent {
    /// The snapshot to create (or finish): new, or recorded by an earlier attempt.
    Recorded(SnapshotRow),
    /// A release reached this invocation first: nothing may be created for it.
    Released(SnapshotRow),
    /// The base is not a sealed base of this host (being deleted, or unknown): the reason.
    BaseUnavailable(String),
}

/// What a move through the fenced path did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Advance {
    /// The row moved; here it is after the move.
    Moved(SnapshotRow),
    /// The row was already at or past the target in the same half: nothing changed.
    Unchanged(SnapshotRow),
    /// A live move on a row a release has reached: nothing changed.
    Released(SnapshotRow),
}

impl Advance {
    pub fn row(&self) -> &SnapshotRow {
        match self {
            Advance::Moved(r) | Advance::Unchanged(r) | Advance::Released(r) => r,
        }
    }
}

/// What [`Store::request_release`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseRequest {
    /// A live row is now `releasing`: its volume is to be deleted.
    Releasing(SnapshotRow),
    /// No activation had recorded anything: a tombstone now refuses any later one.
    Tombstone(SnapshotRow),
    /// An earlier release got here first (the row is `releasing` or `released`).
    Already(SnapshotRow),
    /// The invocation belongs to another family than the release named: nothing changed.
    OtherFamily(SnapshotRow),
}

impl ReleaseRequest {
    pub fn row(&self) -> &SnapshotRow {
        match self {
            ReleaseRequest::Releasing(r)
            | ReleaseRequest::Tombstone(r)
            | ReleaseRequest::Already(r)
            | ReleaseRequest::OtherFamily(r) => r,
        }
    }
}

const COLUMNS: &str = "id, run_id, family, base_vol_id, vol_id, path, state, created_at, release_requested_at, \
                       released_at, digest, expires_at, host_id";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
    let state: String = r.get(6)?;
    Ok(SnapshotRow {
        id: r.get::<_, i64>(0)? as u64,
        run_id: r.get(1)?,
        family: r.get(2)?,
        base_vol_id: r.get::<_, Option<i64>>(3)?.map(|b| b as u64),
        vol_id: r.get(4)?,
        path: r.get(5)?,
        state: SnapshotState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                6,
                rusqlite::types::Type::Text,
                format!("unknown snapshot state {state:?}").into(),
            )
        })?,
        created_at_ms: r.get(7)?,
        release_requested_at_ms: r.get(8)?,
        released_at_ms: r.get(9)?,
        digest: r.get(10)?,
        expires_at_ms: r.get(11)?,
        host_id: r.get(12)?,
    })
}

/// One row by a cached statement: the activation's path prepares each statement once per
/// connection, not once per call.
fn query_one(c: &rusqlite::Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<SnapshotRow> {
    c.prepare_cached(sql)?.query_row(p, row)
}

/// Whether a write waits for its fsync.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// `synchronous=FULL`: durable before the call returns (id reservations, releases).
    Full,
    /// `synchronous=NORMAL` for this transaction. For an intent's binding of a reserved id
    /// (see the module doc) and the advisory `created` and `exposed` marks: the run's own
    /// response holds the id and the path durably, and a row claims its volume whether
    /// `intended`, `created` or `exposed`. In WAL mode the write becomes
    /// durable with the next FULL commit or checkpoint; a power loss can lose the mark, never
    /// reorder it after a later write.
    Deferred,
}

/// The one fenced move: `id` to `to`, following the rules in the module doc.
fn advance_in(
    tx: &Transaction<'_>,
    id: u64,
    to: SnapshotState,
    path: Option<&str>,
    now: i64,
) -> rusqlite::Result<Advance> {
    let before: Vec<String> =
        SnapshotState::ALL.iter().filter(|s| **s < to).map(|s| format!("'{}'", s.name())).collect();
    let current = |tx: &Transaction<'_>| {
        query_one(tx, &format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1"), params![id as i64])
    };
    if !before.is_empty() {
        // A live row that a release reaches keeps its path; times are set once.
        let sql = format!(
            "UPDATE snapshots SET state = ?2, path = COALESCE(?3, path),
                    release_requested_at = CASE WHEN ?2 IN ('releasing', 'released')
                                                THEN COALESCE(release_requested_at, ?4)
                                                ELSE release_requested_at END,
                    released_at = CASE WHEN ?2 = 'released' THEN ?4 ELSE released_at END
             WHERE id = ?1 AND state IN ({})
             RETURNING {COLUMNS}",
            before.join(", ")
        );
        if let Some(moved) = query_one(tx, &sql, params![id as i64, to.name(), path, now]).optional()? {
            return Ok(Advance::Moved(moved));
        }
    }
    let now_row = current(tx)?;
    Ok(if now_row.state.is_released() && !to.is_released() {
        Advance::Released(now_row)
    } else {
        Advance::Unchanged(now_row)
    })
}

/// Snapshot ids reserved per durable commit. Large, so the reservation's fsync lands on one
/// activation in a thousand (below the p99): a reserved id costs nothing but its row in
/// `snapshot_ids`, it survives restarts, and start-up checks each one with one lookup.
pub const RESERVE_BATCH: u64 = 1024;

/// One intent.
pub(super) struct Request {
    pub run_id: String,
    pub family: String,
    pub base_vol_id: u64,
    /// The snapshot expires this long after its intent is recorded.
    pub ttl: Option<std::time::Duration>,
    pub host_id: Option<String>,
    pub name: Box<dyn Fn(u64) -> String + Send>,
}

/// Records the intended snapshot of `run_id` in `tx`, or finds the row already there. A new
/// row is refused unless its base is sealed (a base being deleted is `retiring`: see
/// `bases.rs`); recording one binds the smallest reserved id and notes the base's last
/// activation. `None`: no id is reserved (reserve a batch, then try again).
fn intend_in(tx: &Transaction<'_>, request: &Request, now: i64) -> rusqlite::Result<Option<Intent>> {
    let select = format!("SELECT {COLUMNS} FROM snapshots WHERE run_id = ?1");
    if let Some(existing) = query_one(tx, &select, params![request.run_id]).optional()? {
        return Ok(Some(if existing.state.is_released() {
            Intent::Released(existing)
        } else {
            Intent::Recorded(existing)
        }));
    }
    let base = super::bases::base_in(tx, request.base_vol_id)?;
    let digest = match base {
        Some(b) if b.state == super::BaseState::Sealed && b.family == request.family => b.digest,
        Some(b) if b.family != request.family => {
            return Ok(Some(Intent::BaseUnavailable(format!("base-{} belongs to family {}", b.id, b.family))));
        }
        Some(b) => return Ok(Some(Intent::BaseUnavailable(format!("base-{} is {}", b.id, b.state)))),
        None => return Ok(Some(Intent::BaseUnavailable(format!("base-{} is not recorded", request.base_vol_id)))),
    };
    let Some(id) = tx
        .prepare_cached("DELETE FROM snapshot_ids WHERE id = (SELECT MIN(id) FROM snapshot_ids) RETURNING id")?
        .query_row([], |r| r.get::<_, i64>(0))
        .optional()?
    else {
        return Ok(None);
    };
    tx.prepare_cached("UPDATE bases SET last_activated_at = ?2 WHERE id = ?1")?
        .execute(params![request.base_vol_id as i64, now])?;
    let created = query_one(
        tx,
        &format!(
            "INSERT INTO snapshots (id, run_id, family, base_vol_id, vol_id, state, created_at, digest, expires_at, host_id)
             VALUES (?1, ?2, ?3, ?4, ?5, 'intended', ?6, ?7, ?8, ?9) RETURNING {COLUMNS}"
        ),
        params![
            id,
            request.run_id,
            request.family,
            request.base_vol_id as i64,
            (request.name)(id as u64),
            now,
            digest,
            request.ttl.map(|ttl| now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))),
            request.host_id
        ],
    )?;
    Ok(Some(Intent::Recorded(created)))
}

impl Store {
    /// Records the intended snapshot of `run_id`, or returns the one already recorded; once
    /// a release has reached the invocation, says so instead. The id is the smallest reserved
    /// one, bound in the same transaction as the row (no fsync of its own; a batch of ids is
    /// reserved durably first when none is left: see the module doc). `name` makes the
    /// backend's volume name from the id; with `ttl`, the row expires that long after this
    /// intent. Refused ([`Intent::BaseUnavailable`]) unless the base is a sealed base of
    /// `family`.
    pub fn intend_snapshot(
        &self,
        run_id: &str,
        family: &str,
        base_vol_id: u64,
        ttl: Option<std::time::Duration>,
        host_id: Option<&str>,
        name: impl Fn(u64) -> String + Send + 'static,
    ) -> Result<Intent, StoreError> {
        let request = Request {
            run_id: run_id.to_owned(),
            family: family.to_owned(),
            base_vol_id,
            ttl,
            host_id: host_id.map(str::to_owned),
            name: Box::new(name),
        };
        loop {
            let now = epoch_ms(std::time::SystemTime::now());
            if let Some(intent) = self.write(Sync::Deferred, |tx| intend_in(tx, &request, now))? {
                return Ok(intent);
            }
            self.reserve_snapshot_ids(RESERVE_BATCH)?;
        }
    }

    /// Reserves `n` snapshot ids from the `snap` sequence, durably, unless some are still
    /// reserved (another intent refilled them meanwhile). Returns how many were added.
    pub fn reserve_snapshot_ids(&self, n: u64) -> Result<u64, StoreError> {
        let added = self.write(Sync::Full, |tx| {
            let left: i64 = tx.query_row("SELECT COUNT(*) FROM snapshot_ids", [], |r| r.get(0))?;
            if left > 0 {
                return Ok(0);
            }
            for _ in 0..n {
                let id = super::sequence::next_in(tx, "snap")?;
                tx.prepare_cached("INSERT INTO snapshot_ids (id) VALUES (?1)")?.execute(params![id])?;
            }
            Ok(n)
        })?;
        if added > 0 {
            crate::fault::point("snapshots.after_reserve", "snap");
        }
        Ok(added)
    }

    /// Ids reserved and not bound to any activation, smallest first.
    pub fn unbound_snapshot_ids(&self) -> Result<Vec<u64>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare_cached("SELECT id FROM snapshot_ids ORDER BY id")?;
            let ids = stmt.query_map([], |r| r.get::<_, i64>(0))?.collect::<rusqlite::Result<Vec<i64>>>()?;
            Ok(ids.into_iter().map(|id| id as u64).collect())
        })
    }

    /// Gives a completed activation back the row a power loss took from it: reserved id `id`
    /// becomes its `exposed` row, durably. `None` if the id is not reserved any more or the run
    /// has a row (nothing to restore).
    pub fn restore_snapshot(&self, restored: &Restored) -> Result<Option<SnapshotRow>, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.write(Sync::Full, |tx| {
            let select = format!("SELECT {COLUMNS} FROM snapshots WHERE run_id = ?1");
            if query_one(tx, &select, params![restored.run_id]).optional()?.is_some() {
                return Ok(None);
            }
            let taken = tx.prepare_cached("DELETE FROM snapshot_ids WHERE id = ?1")?.execute(params![restored.id as i64])?;
            if taken == 0 {
                return Ok(None);
            }
            let row = query_one(
                tx,
                &format!(
                    "INSERT INTO snapshots (id, run_id, family, base_vol_id, vol_id, path, state, created_at, digest, host_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'exposed', ?7, ?8, ?9) RETURNING {COLUMNS}"
                ),
                params![
                    restored.id as i64,
                    restored.run_id,
                    restored.family,
                    restored.base_vol_id as i64,
                    restored.vol_id,
                    restored.path,
                    now,
                    restored.digest,
                    restored.host_id
                ],
            )?;
            Ok(Some(row))
        })
    }

    /// Runs `f` in one immediate transaction; with [`Sync::Deferred`], its commit waits for no
    /// fsync.
    fn write<T>(&self, sync: Sync, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        self.with_conn(|c| {
            if sync == Sync::Deferred {
                c.pragma_update(None, "synchronous", "NORMAL")?;
            }
            let out = (|| {
                let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })();
            if sync == Sync::Deferred {
                // Back to FULL whatever happened: every other write is durable.
                c.pragma_update(None, "synchronous", "FULL")?;
            }
            out
        })
    }

    /// Marks the snapshot's volume as created (advisory: no fsync of its own).
    pub fn mark_snapshot_created(&self, id: u64) -> Result<Advance, StoreError> {
        self.advance(id, SnapshotState::Created, None, Sync::Deferred)
    }

    /// Records where a snapshot is exposed (advisory: no fsync of its own).
    pub fn mark_snapshot_exposed(&self, id: u64, path: &str) -> Result<Advance, StoreError> {
        self.advance(id, SnapshotState::Exposed, Some(path), Sync::Deferred)
    }

    /// Records that the snapshot's volume is gone; durable before it returns.
    pub fn mark_snapshot_released(&self, id: u64) -> Result<Advance, StoreError> {
        self.advance(id, SnapshotState::Released, None, Sync::Full)
    }

    /// A release of the invocation whose activation is `run_id` arrived: in one durable
    /// transaction, a live row becomes `releasing` (no activation may use it again), or, if
    /// no activation recorded anything yet, a tombstone is written, born `released`, so that
    /// a later activation is refused. The tombstone takes an id from the `snap` sequence like
    /// any row (ids are never reused).
    pub fn request_release(
        &self,
        run_id: &str,
        family: &str,
        name: impl Fn(u64) -> String,
    ) -> Result<ReleaseRequest, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let select = format!("SELECT {COLUMNS} FROM snapshots WHERE run_id = ?1");
        self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let out = match query_one(&tx, &select, params![run_id]).optional()? {
                Some(existing) if existing.family != family => ReleaseRequest::OtherFamily(existing),
                Some(existing) if existing.state.is_released() => ReleaseRequest::Already(existing),
                Some(existing) => match advance_in(&tx, existing.id, SnapshotState::Releasing, None, now)? {
                    Advance::Moved(r) => ReleaseRequest::Releasing(r),
                    Advance::Unchanged(r) | Advance::Released(r) => ReleaseRequest::Already(r),
                },
                None => {
                    let id = super::sequence::next_in(&tx, "snap")?;
                    tx.execute(
                        "INSERT INTO snapshots (id, run_id, family, base_vol_id, vol_id, state, created_at,
                                                release_requested_at, released_at)
                         VALUES (?1, ?2, ?3, NULL, ?4, 'released', ?5, ?5, ?5)",
                        params![id, run_id, family, name(id as u64), now],
                    )?;
                    ReleaseRequest::Tombstone(query_one(&tx, &select, params![run_id])?)
                }
            };
            tx.commit()?;
            Ok(out)
        })
    }

    pub fn snapshot_by_run(&self, run_id: &str) -> Result<Option<SnapshotRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE run_id = ?1");
        self.with_conn(|c| query_one(c, &sql, params![run_id]).optional())
    }

    pub fn snapshot(&self, id: u64) -> Result<Option<SnapshotRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1");
        self.with_conn(|c| query_one(c, &sql, params![id as i64]).optional())
    }

    /// Every snapshot row (tombstones included), oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
        self.snapshots_where("1")
    }

    /// Live rows whose activation's time to live ran out by `now_ms`, or (with `max_age_ms`)
    /// that were recorded more than `max_age_ms` before it.
    pub fn expired_snapshots(&self, now_ms: i64, max_age_ms: Option<i64>) -> Result<Vec<SnapshotRow>, StoreError> {
        let too_old =
            max_age_ms.map_or_else(String::new, |age| format!("OR created_at < {}", now_ms.saturating_sub(age)));
        self.snapshots_where(&format!(
            "state NOT IN ('releasing', 'released') AND base_vol_id IS NOT NULL
             AND ((expires_at IS NOT NULL AND expires_at <= {now_ms}) {too_old})"
        ))
    }

    /// Rows a release reached whose volume is not yet known to be gone.
    pub fn releasing_snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
        self.snapshots_where("state = 'releasing'")
    }

    fn snapshots_where(&self, filter: &str) -> Result<Vec<SnapshotRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE {filter} ORDER BY id");
        self.with_conn(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }

    fn advance(&self, id: u64, to: SnapshotState, path: Option<&str>, sync: Sync) -> Result<Advance, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let moved = self.write(sync, |tx| {
            let exists: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM snapshots WHERE id = ?1)")?
                .query_row(params![id as i64], |r| r.get(0))?;
            if !exists {
                return Ok(None);
            }
            advance_in(tx, id, to, path, now).map(Some)
        })?;
        moved.ok_or_else(|| StoreError::Invalid {
            path: self.path.clone(),
            what: format!("snapshot {id}"),
            detail: "is not recorded".into(),
        })
    }
}
