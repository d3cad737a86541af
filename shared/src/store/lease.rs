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

/// What [`Store::acquire_lease_reclaiming`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// We hold it now (it was free, expired, or ours).
    Yes,
    /// It was held by a process of this host that no longer exists; we took it over.
    TookOver { from: String },
    /// Someone else holds it.
    HeldBy(String),
}

impl Holder {
    /// The pid in a holder string `pid:<pid>:<random>`.
    pub fn pid_of(holder: &str) -> Option<u32> {
        holder.strip_prefix("pid:")?.split(':').next()?.parse().ok()
    }
}

/// Whether a process with this pid exists on this host (same pid namespace).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
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

    /// Like [`Store::acquire_lease`], but a lease whose holder's process is gone from this
    /// host is taken over at once instead of after its TTL (a worker restarted after a
    /// crash need not wait). The takeover matches the dead holder, so it cannot take a
    /// lease that changed hands meanwhile. A reused pid makes the old holder look alive:
    /// then the TTL decides, as usual.
    pub fn acquire_lease_reclaiming(&self, key: &str, holder: &Holder, ttl: Duration) -> Result<Acquired, StoreError> {
        if self.acquire_lease(key, holder, ttl)? {
            return Ok(Acquired::Yes);
        }
        let Some(current) = self.lease(key)? else {
            // Released between the two statements: try once more.
            return Ok(if self.acquire_lease(key, holder, ttl)? {
                Acquired::Yes
            } else {
                Acquired::HeldBy(String::new())
            });
        };
        if Holder::pid_of(&current.holder).is_some_and(|pid| !process_exists(pid)) {
            let expires = epoch_ms(SystemTime::now()).saturating_add(ttl.as_millis() as i64);
            let changed = self.with_conn(|c| {
                c.execute(
                    "UPDATE leases SET v = ?3, expires_at = ?4 WHERE k = ?1 AND v = ?2",
                    params![key, current.holder, holder.as_str(), expires],
                )
            })?;
            if changed == 1 {
                return Ok(Acquired::TookOver { from: current.holder });
            }
        }
        Ok(Acquired::HeldBy(current.holder))
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
