//! The `file_digests` table: the digests of a directory source's flat layer files, each with
//! the identity of the file it was read from (`image/memo.rs` says why, and what identifies
//! a file). Keyed by path: a file replaced at a path replaces its row. A row whose file is
//! gone or changed is forgotten by garbage collection ([`Store::forget_file_digests`]).

use std::path::Path;

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};
use crate::image::{Digest, DigestMemo, FileIdentity};

const SELECT: &str = "SELECT path, dev, ino, size, mtime_ns, ctime_ns FROM file_digests";

impl Store {
    /// Forgets the digests of files that are gone or changed since they were remembered; how
    /// many. Reads each remembered file's metadata (a directory source holds few files).
    pub fn forget_file_digests(&self) -> Result<usize, StoreError> {
        let rows: Vec<(String, FileIdentity)> = self.with_conn(|c| {
            let mut stmt = c.prepare_cached(SELECT)?;
            let rows = stmt.query_map([], |r| {
                let parse = |s: String| s.parse::<i128>().unwrap_or(i128::MIN);
                Ok((
                    r.get::<_, String>(0)?,
                    FileIdentity {
                        dev: r.get::<_, i64>(1)? as u64,
                        ino: r.get::<_, i64>(2)? as u64,
                        size: r.get::<_, i64>(3)? as u64,
                        mtime_ns: parse(r.get(4)?),
                        ctime_ns: parse(r.get(5)?),
                    },
                ))
            })?;
            rows.collect()
        })?;
        let stale: Vec<String> = rows
            .into_iter()
            .filter(|(path, id)| std::fs::metadata(path).map_or(true, |m| FileIdentity::of(&m) != *id))
            .map(|(path, _)| path)
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        self.with_conn(|c| {
            let tx = c.unchecked_transaction()?;
            for path in &stale {
                tx.prepare_cached("DELETE FROM file_digests WHERE path = ?1")?.execute(params![path])?;
            }
            tx.commit()
        })?;
        Ok(stale.len())
    }
}

fn path_key(path: &Path) -> Result<&str, String> {
    path.to_str().ok_or_else(|| format!("{} is not UTF-8: its digest is not remembered", path.display()))
}

impl DigestMemo for Store {
    fn recall(&self, path: &Path, id: &FileIdentity) -> Result<Option<Digest>, String> {
        let key = path_key(path)?;
        let found: Option<String> = self
            .with_conn(|c| {
                c.prepare_cached(
                    "SELECT digest FROM file_digests
                     WHERE path = ?1 AND dev = ?2 AND ino = ?3 AND size = ?4 AND mtime_ns = ?5 AND ctime_ns = ?6",
                )?
                .query_row(
                    params![
                        key,
                        id.dev as i64,
                        id.ino as i64,
                        id.size as i64,
                        id.mtime_ns.to_string(),
                        id.ctime_ns.to_string()
                    ],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(|e| e.to_string())?;
        found.map(|d| Digest::parse(&d)).transpose()
    }

    fn remember(&self, path: &Path, id: &FileIdentity, digest: &Digest) -> Result<(), String> {
        let key = path_key(path)?;
        self.with_conn(|c| {
            c.prepare_cached(
                "INSERT INTO file_digests (path, dev, ino, size, mtime_ns, ctime_ns, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (path) DO UPDATE SET dev = ?2, ino = ?3, size = ?4, mtime_ns = ?5, ctime_ns = ?6,
                                                  digest = ?7",
            )?
            .execute(params![
                key,
                id.dev as i64,
                id.ino as i64,
                id.size as i64,
                id.mtime_ns.to_string(),
                id.ctime_ns.to_string(),
                digest.as_str()
            ])
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }
}
