//! The `verified_signatures` table: registry versions whose signatures passed their family's
//! policy, by the fingerprint of the key set that verified them (`image/signature`). A
//! version's row goes by garbage collection once no base of it is left
//! ([`Store::forget_unused_verified`]).

use rusqlite::{OptionalExtension, params};

use super::Store;
use crate::image::Digest;
use crate::image::signature::VerifiedCache;

impl Store {
    /// Forgets verifications of versions this host no longer has a base of, once they are
    /// older than `before` (epoch ms: a verification not yet followed by its prepare's base
    /// is kept a while); how many.
    pub fn forget_unused_verified(&self, before: i64) -> Result<usize, super::StoreError> {
        self.with_conn(|c| {
            c.prepare_cached(
                "DELETE FROM verified_signatures
                 WHERE verified_at < ?1 AND digest NOT IN (SELECT digest FROM bases)",
            )?
            .execute(params![before])
        })
    }
}

impl VerifiedCache for Store {
    fn is_verified(&self, digest: &Digest, keys: &str) -> Result<bool, String> {
        let found: Option<i64> = self
            .with_conn(|c| {
                c.prepare_cached("SELECT 1 FROM verified_signatures WHERE digest = ?1 AND keys = ?2")?
                    .query_row(params![digest.as_str(), keys], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| e.to_string())?;
        Ok(found.is_some())
    }

    fn remember_verified(&self, digest: &Digest, keys: &str) -> Result<(), String> {
        let now = jiff::Timestamp::now().as_millisecond();
        self.with_conn(|c| {
            c.prepare_cached(
                "INSERT INTO verified_signatures (digest, keys, verified_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (digest, keys) DO UPDATE SET verified_at = excluded.verified_at",
            )?
            .execute(params![digest.as_str(), keys, now])
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use crate::image::Digest;
    use crate::image::signature::VerifiedCache;
    use crate::store::Store;

    #[test]
    fn a_verified_version_is_remembered_per_key_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("host.db")).unwrap();
        let d = Digest::of_bytes(b"m");
        assert!(!store.is_verified(&d, "keys-a").unwrap());
        store.remember_verified(&d, "keys-a").unwrap();
        store.remember_verified(&d, "keys-a").unwrap();
        assert!(store.is_verified(&d, "keys-a").unwrap());
        assert!(!store.is_verified(&d, "keys-b").unwrap(), "another key set verifies again");
        assert_eq!(store.forget_unused_verified(0).unwrap(), 0, "a recent verification is kept");
        assert_eq!(store.forget_unused_verified(i64::MAX).unwrap(), 1, "one of no base is forgotten");
        assert!(!store.is_verified(&d, "keys-a").unwrap());
    }
}
