//! Which volumes this database describes: the backend and where its volumes live
//! (location and filesystem), recorded the first time a command opens a backend on it.
//!
//! A command whose settings name another place is refused before it touches a volume: run
//! with a forgotten `--config`, reconcile would see every live volume as missing, and a
//! `--fix` would then "repair" live snapshots away. The record moves by itself only while no
//! volume depends on it (no base row, no live snapshot row): then nothing can be lost.

use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Store, StoreError, epoch_ms};
use crate::volume::Place;

/// What [`Store::bind_volumes`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Nothing was recorded: `place` is now.
    First,
    /// The recorded place is `place`.
    Same,
    /// Another place was recorded, but no volume depended on it: `place` replaces it.
    Moved { from: Place },
    /// Another place is recorded and volumes depend on it: refuse.
    Differs { recorded: Place, bases: u64, live_snapshots: u64 },
}

impl Store {
    /// Records `place` as where this host's volumes live, or compares it with the record
    /// (see the module doc), in one transaction.
    pub fn bind_volumes(&self, place: &Place) -> Result<Binding, StoreError> {
        let now = epoch_ms(std::time::SystemTime::now());
        self.with_conn(|c| {
            let tx = Transaction::new_unchecked(c, TransactionBehavior::Immediate)?;
            let recorded = tx
                .query_row("SELECT backend, location, filesystem FROM volume_place WHERE one = 1", [], |r| {
                    Ok(Place { backend: r.get(0)?, location: r.get(1)?, filesystem: r.get(2)? })
                })
                .optional()?;
            let out = match recorded {
                Some(recorded) if recorded == *place => return Ok(Binding::Same),
                Some(recorded) => {
                    let bases: i64 = tx.query_row("SELECT COUNT(*) FROM bases", [], |r| r.get(0))?;
                    let live: i64 = tx.query_row(
                        "SELECT COUNT(*) FROM snapshots WHERE state != 'released' AND base_vol_id IS NOT NULL",
                        [],
                        |r| r.get(0),
                    )?;
                    if bases > 0 || live > 0 {
                        return Ok(Binding::Differs { recorded, bases: bases as u64, live_snapshots: live as u64 });
                    }
                    Binding::Moved { from: recorded }
                }
                None => Binding::First,
            };
            tx.execute(
                "INSERT INTO volume_place (one, backend, location, filesystem, recorded_at)
                 VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT (one) DO UPDATE SET backend = ?1, location = ?2, filesystem = ?3, recorded_at = ?4",
                params![place.backend, place.location, place.filesystem, now],
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Where this host's volumes live, if a command has recorded it.
    pub fn volume_place(&self) -> Result<Option<Place>, StoreError> {
        self.with_conn(|c| {
            c.query_row("SELECT backend, location, filesystem FROM volume_place WHERE one = 1", [], |r| {
                Ok(Place { backend: r.get(0)?, location: r.get(1)?, filesystem: r.get(2)? })
            })
            .optional()
        })
    }
}
