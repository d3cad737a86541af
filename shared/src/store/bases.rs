//! The `bases` table: one row per family *version* (manifest digest) prepared on this host,
//! with its base volume; and the family's current-version pointer, `images.current_base`.
//!
//! A base moves one way: `preparing` (its id is recorded before the volume is created: the
//! guard of `prepare_thin_base`) → `sealed` (its layers are applied; snapshots may be taken)
//! → `retiring` (garbage collection decided to delete it; nothing may use it again) → the
//! row is deleted once the volume is gone.
//!
//! Two decisions are made inside one SQLite transaction each, so they cannot race:
//! [`Store::retire_base`] checks that nothing refers to a base and marks it `retiring`, and
//! snapshot intents (`snapshots.rs`) refuse a base that is not `sealed`. So no activation can
//! record a snapshot of a base being deleted, and no base with a live snapshot is deleted.
//! [`Store::make_current`] is the one write of the current pointer; only the worker's job loop
//! calls it, after `prepare` completes.

use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Store, StoreError, epoch_ms};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseState {
    /// The id is recorded; the volume may exist and be partly written.
    Preparing,
    /// Layers applied and sealed: snapshots are taken from it.
    Sealed,
    /// Being deleted by garbage collection; refused to every new use.
    Retiring,
}

impl BaseState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Sealed => "sealed",
            Self::Retiring => "retiring",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Preparing, Self::Sealed, Self::Retiring].into_iter().find(|b| b.name() == s)
    }
}

impl std::fmt::Display for BaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One family version on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRow {
    /// The base volume's id (`base-<id>`).
    pub id: u64,
    pub family: String,
    /// The version: the manifest digest its source resolved to (`unknown:base-<id>` for a
    /// base recorded before versions existed without one).
    pub digest: String,
    /// The blob digests of its layers (`None`: recorded before versions existed; unknown).
    pub blobs: Option<Vec<String>>,
    pub state: BaseState,
    pub created_at_ms: i64,
    pub sealed_at_ms: Option<i64>,
    /// When a snapshot of it was last recorded (what capacity eviction orders by).
    pub last_activated_at_ms: Option<i64>,
    /// When another version replaced it as its family's current one.
    pub superseded_at_ms: Option<i64>,
    pub retiring_at_ms: Option<i64>,
    /// File data its layers wrote when it was sealed (what evicting it frees, roughly);
    /// `None` for bases sealed before this was recorded.
    pub bytes: Option<u64>,
}

impl BaseRow {
    /// The first 12 hex digits of the digest (what run ids and messages show).
    pub fn short_digest(&self) -> &str {
        short_digest(&self.digest)
    }
}

/// The first 12 hex digits of a `sha256:` digest (the whole string if it has no algorithm).
pub fn short_digest(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.get(..12).unwrap_or(hex)
}

/// What [`Store::intend_base`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseIntent {
    /// The version's base: new (`preparing`), or recorded by an earlier attempt.
    Ready(BaseRow),
    /// Garbage collection is deleting this version's old base; try again once it is gone.
    Retiring(BaseRow),
}

/// What [`Store::retire_base`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retire {
    /// The base is `retiring` now (or was already): delete its volume, then its row.
    Marked(BaseRow),
    /// Something still refers to it; the reason says what.
    Kept(String),
    /// No such base (already deleted).
    Gone,
}

const COLUMNS: &str =
    "id, family, digest, blobs, state, created_at, sealed_at, last_activated_at, retiring_at, superseded_at, bytes";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BaseRow> {
    let state: String = r.get(4)?;
    let blobs: Option<String> = r.get(3)?;
    let bad =
        |i: usize, what: String| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, what.into());
    Ok(BaseRow {
        id: r.get::<_, i64>(0)? as u64,
        family: r.get(1)?,
        digest: r.get(2)?,
        blobs: blobs
            .map(|b| serde_json::from_str(&b).map_err(|e| bad(3, format!("blob list {b:?}: {e}"))))
            .transpose()?,
        state: BaseState::parse(&state).ok_or_else(|| bad(4, format!("unknown base state {state:?}")))?,
        created_at_ms: r.get(5)?,
        sealed_at_ms: r.get(6)?,
        last_activated_at_ms: r.get(7)?,
        retiring_at_ms: r.get(8)?,
        superseded_at_ms: r.get(9)?,
        bytes: r.get::<_, Option<i64>>(10)?.map(|b| b as u64),
    })
}

pub(super) fn base_in(c: &rusqlite::Connection, id: u64) -> rusqlite::Result<Option<BaseRow>> {
    c.prepare_cached(&format!("SELECT {COLUMNS} FROM bases WHERE id = ?1"))?
        .query_row(params![id as i64], row)
        .optional()
}

impl Store {
    /// The base of version `digest` of `family`: the recorded one, or a new id from the
    /// `base` sequence recorded `preparing` in the same transaction (the intent, written
    /// before the volume is created). `blobs` are the version's layer blob digests.
    pub fn intend_base(&self, family: &str, digest: &str, blobs: &[String]) -> Result<BaseIntent, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let blobs = serde_json::to_string(blobs).map_err(|e| self.invalid(family, e.to_string()))?;
        self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let select = format!("SELECT {COLUMNS} FROM bases WHERE family = ?1 AND digest = ?2");
            let out = match tx.query_row(&select, params![family, digest], row).optional()? {
                Some(r) if r.state == BaseState::Retiring => BaseIntent::Retiring(r),
                Some(r) => BaseIntent::Ready(r),
                None => {
                    let id = super::sequence::next_in(&tx, "base")?;
                    tx.execute(
                        "INSERT INTO bases (id, family, digest, blobs, state, created_at)
                         VALUES (?1, ?2, ?3, ?4, 'preparing', ?5)",
                        params![id, family, digest, blobs, now],
                    )?;
                    BaseIntent::Ready(tx.query_row(&select, params![family, digest], row)?)
                }
            };
            tx.commit()?;
            Ok(out)
        })
    }

    /// Records that base `id`'s layers are applied and sealed. Idempotent; refused for a
    /// base that garbage collection is deleting.
    pub fn mark_base_sealed(&self, id: u64) -> Result<BaseRow, StoreError> {
        self.mark_base_sealed_with(id, None)
    }

    /// [`Store::mark_base_sealed`], recording the bytes its layers wrote when known.
    pub fn mark_base_sealed_with(&self, id: u64, bytes: Option<u64>) -> Result<BaseRow, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let bytes = bytes.map(|b| b as i64);
        let row = self.with_conn(|c| {
            c.execute(
                "UPDATE bases SET state = 'sealed', sealed_at = ?2, bytes = COALESCE(?3, bytes)
                 WHERE id = ?1 AND state = 'preparing'",
                params![id as i64, now, bytes],
            )?;
            base_in(c, id)
        })?;
        match row {
            Some(r) if r.state == BaseState::Sealed => Ok(r),
            Some(r) => Err(self.invalid(&format!("base-{id}"), format!("is {}, so it cannot be sealed", r.state))),
            None => Err(self.invalid(&format!("base-{id}"), "is not recorded".into())),
        }
    }

    /// Makes sealed base `id` the current version of its family, in one transaction that
    /// checks it is sealed. Returns the base that was current before, if any.
    pub fn make_current(&self, family: &str, id: u64) -> Result<Option<u64>, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let out = self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let base = base_in(&tx, id)?;
            let previous: Option<Option<i64>> = tx
                .query_row("SELECT current_base FROM images WHERE family = ?1", params![family], |r| r.get(0))
                .optional()?;
            let out = match (&base, previous) {
                (Some(b), Some(previous)) if b.family == family && b.state == BaseState::Sealed => {
                    tx.execute(
                        "UPDATE images SET current_base = ?2, updated_at = ?3, last_error = NULL, last_error_at = NULL
                         WHERE family = ?1",
                        params![family, id as i64, now],
                    )?;
                    tx.execute(
                        "UPDATE bases SET superseded_at = ?2 WHERE id = ?1 AND id != ?3",
                        params![previous, now, id as i64],
                    )?;
                    Ok(previous.map(|p| p as u64))
                }
                (_, None) => Err("the family is not recorded".to_owned()),
                (None, _) => Err("is not recorded".to_owned()),
                (Some(b), _) if b.family != family => Err(format!("belongs to family {}", b.family)),
                (Some(b), _) => Err(format!("is {}; only a sealed base can be current", b.state)),
            };
            tx.commit()?;
            Ok(out)
        })?;
        out.map_err(|detail| self.invalid(&format!("base-{id} of family {family}"), detail))
    }

    pub fn base(&self, id: u64) -> Result<Option<BaseRow>, StoreError> {
        self.with_conn(|c| base_in(c, id))
    }

    /// The base of version `digest` of `family`, if this host has one.
    pub fn base_of_version(&self, family: &str, digest: &str) -> Result<Option<BaseRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM bases WHERE family = ?1 AND digest = ?2");
        self.with_conn(|c| c.query_row(&sql, params![family, digest], row).optional())
    }

    /// The current version of `family`, if it has one.
    pub fn current_base(&self, family: &str) -> Result<Option<BaseRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM bases WHERE id = (SELECT current_base FROM images WHERE family = ?1)");
        self.with_conn(|c| c.query_row(&sql, params![family], row).optional())
    }

    /// Every base, by family, oldest first.
    pub fn list_bases(&self) -> Result<Vec<BaseRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM bases ORDER BY family, id");
        self.with_conn(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }

    /// How many snapshots of base `id` are live (not `released`).
    pub fn live_snapshots_of(&self, id: u64) -> Result<u64, StoreError> {
        self.with_conn(|c| live_in(c, id))
    }

    /// In one transaction: if nothing keeps base `id` ([`keep_reason`]; `in_use` is asked
    /// inside the transaction, so whatever it consults, the worker's in-flight registry, must
    /// be held by the caller across this call), marks it `retiring`.
    pub fn retire_base(
        &self,
        id: u64,
        grace_ms: i64,
        in_use: impl FnOnce(&BaseRow) -> Option<String>,
    ) -> Result<Retire, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let Some(base) = base_in(&tx, id)? else {
                return Ok(Retire::Gone);
            };
            if base.state == BaseState::Retiring {
                return Ok(Retire::Marked(base));
            }
            if let Some(why) = keep_reason(&tx, &base, grace_ms, now)?.or_else(|| in_use(&base)) {
                return Ok(Retire::Kept(why));
            }
            tx.execute("UPDATE bases SET state = 'retiring', retiring_at = ?2 WHERE id = ?1", params![id as i64, now])?;
            let marked = base_in(&tx, id)?;
            tx.commit()?;
            Ok(marked.map_or(Retire::Gone, Retire::Marked))
        })
    }

    /// Why base `id` is kept now ([`keep_reason`], then `in_use`), without marking anything
    /// (`worker gc --dry-run`). `None`: it would be retired.
    pub fn retire_check(
        &self,
        id: u64,
        grace_ms: i64,
        in_use: impl FnOnce(&BaseRow) -> Option<String>,
    ) -> Result<Retire, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.with_conn(|c| {
            let Some(base) = base_in(c, id)? else { return Ok(Retire::Gone) };
            if base.state == BaseState::Retiring {
                return Ok(Retire::Marked(base));
            }
            Ok(match keep_reason(c, &base, grace_ms, now)?.or_else(|| in_use(&base)) {
                Some(why) => Retire::Kept(why),
                None => Retire::Marked(base),
            })
        })
    }

    /// Capacity eviction of a whole family, in one transaction: if no snapshot of any of its
    /// versions is live and `in_use` keeps none of them, clears its current version and marks
    /// every base of it `retiring`. Returns the marked bases, or why the family is kept.
    pub fn evict_family(
        &self,
        family: &str,
        in_use: impl Fn(&BaseRow) -> Option<String>,
    ) -> Result<Result<Vec<BaseRow>, String>, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let bases: Vec<BaseRow> = {
                let mut stmt = tx.prepare(&format!("SELECT {COLUMNS} FROM bases WHERE family = ?1 ORDER BY id"))?;
                let rows = stmt.query_map(params![family], row)?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for base in &bases {
                let live = live_in(&tx, base.id)?;
                if live > 0 {
                    return Ok(Err(format!("{live} live snapshot(s) of base-{}", base.id)));
                }
                if let Some(why) = in_use(base) {
                    return Ok(Err(why));
                }
            }
            tx.execute(
                "UPDATE images SET current_base = NULL, updated_at = ?2 WHERE family = ?1",
                params![family, now],
            )?;
            tx.execute(
                "UPDATE bases SET state = 'retiring', retiring_at = COALESCE(retiring_at, ?2) WHERE family = ?1",
                params![family, now],
            )?;
            let mut marked = Vec::with_capacity(bases.len());
            for base in &bases {
                marked.extend(base_in(&tx, base.id)?);
            }
            tx.commit()?;
            Ok(Ok(marked))
        })
    }

    /// Families with a base that is not retiring, least recently used first (last
    /// activation, else when sealed, else when recorded), with that time.
    pub fn families_by_last_use(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare(
                "SELECT family, MAX(COALESCE(last_activated_at, sealed_at, created_at)) AS used FROM bases
                 WHERE state != 'retiring' GROUP BY family ORDER BY used, family",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Deletes the row of retiring base `id` once its volume is gone. Idempotent.
    pub fn forget_base(&self, id: u64) -> Result<(), StoreError> {
        let state = self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let state = base_in(&tx, id)?.map(|b| b.state);
            if state == Some(BaseState::Retiring) {
                tx.execute("DELETE FROM bases WHERE id = ?1", params![id as i64])?;
            }
            tx.commit()?;
            Ok(state)
        })?;
        match state {
            None | Some(BaseState::Retiring) => Ok(()),
            Some(s) => Err(self.invalid(&format!("base-{id}"), format!("is {s}, not retiring; it is not deleted"))),
        }
    }

    fn invalid(&self, what: &str, detail: String) -> StoreError {
        StoreError::Invalid { path: self.path.clone(), what: what.to_owned(), detail }
    }
}

/// Why the records keep `base`: it is a family's current version; a snapshot of it is live;
/// or it is a sealed version that was never current and was prepared or used within
/// `grace_ms` (its prepare completed but the job has not made it current yet, e.g. after a
/// crash between the two; the redelivered job does it).
fn keep_reason(c: &rusqlite::Connection, base: &BaseRow, grace_ms: i64, now: i64) -> rusqlite::Result<Option<String>> {
    let current: Option<String> = c
        .prepare_cached("SELECT family FROM images WHERE current_base = ?1")?
        .query_row(params![base.id as i64], |r| r.get(0))
        .optional()?;
    if let Some(family) = current {
        return Ok(Some(format!("it is the current version of family {family}")));
    }
    let live = live_in(c, base.id)?;
    if live > 0 {
        return Ok(Some(format!("{live} live snapshot(s) were made from it")));
    }
    let last_use = base.last_activated_at_ms.or(base.sealed_at_ms).unwrap_or(base.created_at_ms);
    if base.state == BaseState::Sealed && base.superseded_at_ms.is_none() && now - last_use < grace_ms {
        return Ok(Some(format!(
            "it was never its family's current version and was prepared or used {}s ago (kept for {}s)",
            (now - last_use) / 1000,
            grace_ms / 1000
        )));
    }
    Ok(None)
}

fn live_in(c: &rusqlite::Connection, id: u64) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT COUNT(*) FROM snapshots WHERE base_vol_id = ?1 AND state != 'released'")?
        .query_row(params![id as i64], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}
