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
}

const COLUMNS: &str = "family, source, current_base, updated_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        family: r.get(0)?,
        source: r.get(1)?,
        current_base: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
        updated_at_ms: r.get(3)?,
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
