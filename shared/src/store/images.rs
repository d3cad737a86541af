//! The `images` table: one row per image family known on this host.
//!
//! `base_vol_id` is the guard of `prepare_thin_base`: written before the volume is created.
//! `prepared` is read and written only by the worker's job loop (checked before deciding to
//! run `prepare`, set after it completes); steps never consult it.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, epoch_ms};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRow {
    pub family: String,
    pub source: String,
    pub manifest_digest: Option<String>,
    pub base_vol_id: Option<u64>,
    pub prepared: bool,
    pub prepared_at_ms: Option<i64>,
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
        self.with_conn(|c| {
            c.query_row(
                "SELECT family, source, manifest_digest, base_vol_id, prepared, prepared_at FROM images WHERE family = ?1",
                params![family],
                |r| {
                    Ok(ImageRow {
                        family: r.get(0)?,
                        source: r.get(1)?,
                        manifest_digest: r.get(2)?,
                        base_vol_id: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                        prepared: r.get(4)?,
                        prepared_at_ms: r.get(5)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn list_images(&self) -> Result<Vec<ImageRow>, StoreError> {
        let families: Vec<String> = self.with_conn(|c| {
            let mut stmt = c.prepare("SELECT family FROM images ORDER BY family")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        let mut out = Vec::with_capacity(families.len());
        for f in families {
            if let Some(row) = self.image(&f)? {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// The base volume id of `family`: the recorded one, or a new one from the `base`
    /// sequence recorded in the same transaction (the intent, written before the volume is
    /// created). The family must have been recorded with `upsert_image`.
    pub fn intend_base(&self, family: &str) -> Result<u64, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let id = self.with_conn(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let existing: Option<Option<i64>> = tx
                .query_row("SELECT base_vol_id FROM images WHERE family = ?1", params![family], |r| r.get(0))
                .optional()?;
            let id = match existing {
                None => return Ok(None),
                Some(Some(id)) => id,
                Some(None) => {
                    let id = super::sequence::next_in(&tx, "base")?;
                    tx.execute(
                        "UPDATE images SET base_vol_id = ?2, updated_at = ?3 WHERE family = ?1",
                        params![family, id, now],
                    )?;
                    id
                }
            };
            tx.commit()?;
            Ok(Some(id))
        })?;
        id.map(|id| id as u64).ok_or_else(|| StoreError::Invalid {
            path: self.path.clone(),
            what: format!("image family {family}"),
            detail: "is not recorded; record it with upsert_image first".into(),
        })
    }

    /// Forgets the base of `family` (after its volume was deleted).
    pub fn clear_base_vol_id(&self, family: &str) -> Result<(), StoreError> {
        self.update_image(family, "base_vol_id = NULL, prepared = 0, prepared_at = NULL", params![family])
    }

    pub fn set_manifest_digest(&self, family: &str, digest: &str) -> Result<(), StoreError> {
        self.update_image(family, "manifest_digest = ?2", params![family, digest])
    }

    /// Sets or clears the `prepared` flag. Only the worker's job loop calls this.
    pub fn set_prepared(&self, family: &str, prepared: bool) -> Result<(), StoreError> {
        let at = prepared.then(|| epoch_ms(std::time::SystemTime::now()));
        self.update_image(family, "prepared = ?2, prepared_at = ?3", params![family, prepared, at])
    }

    fn update_image(&self, family: &str, set: &str, params: &[&dyn rusqlite::ToSql]) -> Result<(), StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        let sql = format!("UPDATE images SET {set}, updated_at = {now} WHERE family = ?1");
        let changed = self.with_conn(|c| c.execute(&sql, params))?;
        if changed == 0 {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!("image family {family}"),
                detail: "is not recorded; record it with upsert_image first".into(),
            });
        }
        Ok(())
    }
}
