//! Leases: a named lock with a holder and an expiry, shared by every process on the host.
//!
//! The holder is `pid:<pid>:<random>`, made once per process ([`Holder::this_process`]), so
//! a later process that reuses a dead one's pid is still a different holder. Acquire takes a
//! free or expired row (or one we already hold) in one statement; renew and release match
//! on the holder, so no process can extend or drop another's lease. A holder that cannot
//! renew (`LeaseLost`) must stop the work the lease protects.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, epoch_ms};

/// Who holds a lease: `pid:<pid>:<random>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Holder(String);

impl Holder {
    /// This process's holder, made once.
    pub fn this_process() -> &'static Holder {
        static HOLDER: OnceLock<Holder> = OnceLock::new();
        HOLDER.get_or_init(Holder::fresh)
    }

    /// A new holder for this pid with a fresh random part. Two calls never return equal
    /// holders (64 random bits).
    pub fn fresh() -> Holder {
        Holder(format!("pid:{}:{:016x}", std::process::id(), rand::random::<u64>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A lease row as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub key: String,
    pub holder: String,
    pub expires_at_ms: i64,
}

impl Store {
    /// Takes `key` for `ttl` if it is free, expired, or already ours. `true` if we hold it now.
    pub fn acquire_lease(&self, key: &str, holder: &Holder, ttl: Duration) -> Result<bool, StoreError> {
        self.acquire_lease_at(key, holder, ttl, SystemTime::now())
    }

    /// [`Store::acquire_lease`] with an explicit clock reading.
    pub fn acquire_lease_at(
        &self,
        key: &str,
        holder: &Holder,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        let now = epoch_ms(now);
        let expires = now.saturating_add(ttl.as_millis() as i64);
        let changed = self.with_conn(|c| {
            c.execute(
                "INSERT INTO leases (k, v, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v, expires_at = excluded.expires_at
                 WHERE leases.expires_at <= ?4 OR leases.v = excluded.v",
                params![key, holder.as_str(), expires, now],
            )
        })?;
        Ok(changed == 1)
    }

    /// Extends our lease to `now + ttl`. `LeaseLost` if it is not ours any more.
    pub fn renew_lease(&self, key: &str, holder: &Holder, ttl: Duration) -> Result<(), StoreError> {
        self.renew_lease_at(key, holder, ttl, SystemTime::now())
    }

    pub fn renew_lease_at(&self, key: &str, holder: &Holder, ttl: Duration, now: SystemTime) -> Result<(), StoreError> {
        let expires = epoch_ms(now).saturating_add(ttl.as_millis() as i64);
        let changed = self.with_conn(|c| {
            c.execute(
                "UPDATE leases SET expires_at = ?3 WHERE k = ?1 AND v = ?2",
                params![key, holder.as_str(), expires],
            )
        })?;
        if changed == 0 {
            return Err(StoreError::LeaseLost { key: key.to_owned(), holder: holder.to_string() });
        }
        Ok(())
    }

    /// Drops our lease. `false` if it was not ours (nothing changes then).
    pub fn release_lease(&self, key: &str, holder: &Holder) -> Result<bool, StoreError> {
        let changed =
            self.with_conn(|c| c.execute("DELETE FROM leases WHERE k = ?1 AND v = ?2", params![key, holder.as_str()]))?;
        Ok(changed == 1)
    }

    /// The lease row for `key`, expired or not.
    pub fn lease(&self, key: &str) -> Result<Option<LeaseInfo>, StoreError> {
        self.with_conn(|c| {
            c.query_row("SELECT k, v, expires_at FROM leases WHERE k = ?1", params![key], |r| {
                Ok(LeaseInfo { key: r.get(0)?, holder: r.get(1)?, expires_at_ms: r.get(2)? })
            })
            .optional()
        })
    }
}
