//! The `images` table: one row per image family known on this host, with the family's
//! current version (`current_base`, a `bases` row). The versions themselves live in
//! `bases.rs`, which also holds the one write of the current pointer.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, epoch_ms};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRow {
    pub family: String,
    pub source: String,
    /// The base of the family's current version; `None` until a prepare completes.
    pub current_base: Option<u64>,
    pub updated_at_ms: i64,
    /// Why the family's last prepare failed, and when (cleared when a version becomes current).
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
}

const COLUMNS: &str = "family, source, current_base, updated_at, last_error, last_error_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        family: r.get(0)?,
        source: r.get(1)?,
        current_base: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
        updated_at_ms: r.get(3)?,
        last_error: r.get(4)?,
        last_error_at_ms: r.get(5)?,
    })
}

impl Store {
    /// Records `family` with its source, keeping what is already known about it.
    pub fn upsert_image(&self, family: &str, source: &str) -> Result<(), StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO images (family, source, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (family) DO UPDATE SET source = excluded.source, updated_at = excluded.updated_at",
                params![family, source, now],
            )
        })?;
        Ok(())
    }

    /// Records why a prepare of `family` failed (a family not recorded is left unrecorded).
    pub fn record_family_failure(&self, family: &str, error: &str) -> Result<(), StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.with_conn(|c| {
            c.execute(
                "UPDATE images SET last_error = ?2, last_error_at = ?3, updated_at = ?3 WHERE family = ?1",
                params![family, error, now],
            )
        })?;
        Ok(())
    }

    /// Forgets families that never became usable and were last touched before `before_ms`:
    /// no current version, no version recorded, no snapshot row. Returns their names.
    pub fn forget_stale_families(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c.prepare(
                "DELETE FROM images WHERE current_base IS NULL AND updated_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM bases WHERE bases.family = images.family)
                   AND NOT EXISTS (SELECT 1 FROM snapshots WHERE snapshots.family = images.family
                                   AND snapshots.state != 'released')
                 RETURNING family",
            )?;
            let rows = stmt.query_map(params![before_ms], |r| r.get(0))?;
            rows.collect()
        })
    }

    pub fn image(&self, family: &str) -> Result<Option<ImageRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM images WHERE family = ?1");
        self.with_conn(|c| c.prepare_cached(&sql)?.query_row(params![family], row).optional())
    }

    pub fn list_images(&self) -> Result<Vec<ImageRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM images ORDER BY family");
        self.with_conn(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }
}
