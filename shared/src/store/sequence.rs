//! Id sequences: one counter per namespace (`base`, `snap`, ...), starting at 1, advanced
//! atomically in one statement so concurrent processes never get the same value.

use rusqlite::params;

use super::{Store, StoreError};

impl Store {
    /// The next value of namespace `ns`: 1 the first time, then 2, 3, ...
    pub fn next_id(&self, ns: &str) -> Result<u64, StoreError> {
        let v = self.with_conn(|c| next_in(c, ns))?;
        u64::try_from(v).map_err(|_| StoreError::Invalid {
            path: self.path.clone(),
            what: format!("sequence {ns}"),
            detail: format!("holds a negative value {v}"),
        })
    }
}

/// Advances `ns` on `conn` (inside the caller's transaction, if any) and returns the value.
pub(crate) fn next_in(conn: &rusqlite::Connection, ns: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO sequences (ns, v) VALUES (?1, 1)
         ON CONFLICT (ns) DO UPDATE SET v = v + 1
         RETURNING v",
    )?
    .query_row(params![ns], |r| r.get(0))
}
