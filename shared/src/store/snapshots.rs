//! The `snapshots` table: one row per activation (run id → snapshot).
//!
//! The row is written in state `intended`, with its id allocated from the `snap` sequence,
//! before the volume is created; a resume after a crash finds it and finishes the same
//! snapshot instead of creating a second one.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, epoch_ms};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotState {
    Intended,
    Exposed,
    Released,
}

impl SnapshotState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Intended => "intended",
            Self::Exposed => "exposed",
            Self::Released => "released",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "intended" => Some(Self::Intended),
            "exposed" => Some(Self::Exposed),
            "released" => Some(Self::Released),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub id: u64,
    pub run_id: String,
    pub family: String,
    pub base_vol_id: u64,
    pub vol_id: String,
    pub path: Option<String>,
    pub state: SnapshotState,
    pub created_at_ms: i64,
    pub released_at_ms: Option<i64>,
}

const COLUMNS: &str = "id, run_id, family, base_vol_id, vol_id, path, state, created_at, released_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
    let state: String = r.get(6)?;
    Ok(SnapshotRow {
        id: r.get::<_, i64>(0)? as u64,
        run_id: r.get(1)?,
        family: r.get(2)?,
        base_vol_id: r.get::<_, i64>(3)? as u64,
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
        released_at_ms: r.get(8)?,
    })
}

impl Store {
    /// Records the intended snapshot of `run_id`, or returns the one already recorded.
    /// The id comes from the `snap` sequence and is taken in the same transaction as the
    /// row, so a crash leaves neither a row without its id nor a gap. `name` makes the
    /// backend's volume name from the id.
    pub fn intend_snapshot(
        &self,
        run_id: &str,
        family: &str,
        base_vol_id: u64,
        name: impl Fn(u64) -> String,
    ) -> Result<SnapshotRow, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let select = format!("SELECT {COLUMNS} FROM snapshots WHERE run_id = ?1");
        self.with_conn(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            if let Some(existing) = tx.query_row(&select, params![run_id], row).optional()? {
                return Ok(existing);
            }
            let id = super::sequence::next_in(&tx, "snap")?;
            tx.execute(
                "INSERT INTO snapshots (id, run_id, family, base_vol_id, vol_id, state, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'intended', ?6)",
                params![id, run_id, family, base_vol_id as i64, name(id as u64), now],
            )?;
            let created = tx.query_row(&select, params![run_id], row)?;
            tx.commit()?;
            Ok(created)
        })
    }

    pub fn snapshot_by_run(&self, run_id: &str) -> Result<Option<SnapshotRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE run_id = ?1");
        self.with_conn(|c| c.query_row(&sql, params![run_id], row).optional())
    }

    pub fn snapshot(&self, id: u64) -> Result<Option<SnapshotRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE id = ?1");
        self.with_conn(|c| c.query_row(&sql, params![id as i64], row).optional())
    }

    /// Every snapshot, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM snapshots ORDER BY id");
        self.with_conn(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }

    /// Records where a snapshot is exposed: an advisory write ([`Sync::Deferred`]).
    pub fn set_snapshot_exposed(&self, id: u64, path: &str) -> Result<(), StoreError> {
        self.update_snapshot(id, "state = 'exposed', path = ?2", params![id as i64, path], Sync::Deferred)
    }

    pub fn set_snapshot_released(&self, id: u64) -> Result<(), StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.update_snapshot(id, "state = 'released', released_at = ?2", params![id as i64, now], Sync::Full)
    }

    fn update_snapshot(
        &self,
        id: u64,
        set: &str,
        params: &[&dyn rusqlite::ToSql],
        sync: Sync,
    ) -> Result<(), StoreError> {
        let sql = format!("UPDATE snapshots SET {set} WHERE id = ?1");
        let changed = self.with_conn(|c| match sync {
            Sync::Full => c.execute(&sql, params),
            Sync::Deferred => {
                c.pragma_update(None, "synchronous", "NORMAL")?;
                let updated = c.execute(&sql, params);
                // Back to FULL whatever happened: every other write is an intent or a lease.
                c.pragma_update(None, "synchronous", "FULL")?;
                updated
            }
        })?;
        if changed == 0 {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!("snapshot {id}"),
                detail: "is not recorded".into(),
            });
        }
        Ok(())
    }
}

impl SnapshotState {
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}

/// Whether a write waits for its fsync.
#[derive(Clone, Copy)]
enum Sync {
    /// `synchronous=FULL`: durable before the call returns (intents, releases).
    Full,
    /// `synchronous=NORMAL` for this statement. Only for the advisory "exposed" mark: the
    /// run's own response holds the path durably, and a row claims its volume whether
    /// `intended` or `exposed`. In WAL mode the write becomes durable with the next FULL
    /// commit or checkpoint; a power loss can lose the mark, never reorder it after a
    /// later write.
    Deferred,
}
