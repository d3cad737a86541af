//! The versions jobs in flight use, so garbage collection keeps them.
//!
//! A job holds its family version from the moment it resolves it until the version is safe
//! by itself: an activation until its snapshot's row is recorded (from then on the live row
//! keeps the base), a prepare until its base is the family's current version or the job ends.
//! Garbage collection asks [`InUse`] inside its SQLite transaction while holding the
//! registry's lock, and a job takes its hold before it looks the version's base up; so either
//! the collector sees the hold, or the job sees the base `retiring` and prepares it again.
//! The registry is in memory: one worker process owns a state directory and runs every job
//! of it (a one-shot command runs alone, holding the run log).
//!
//! Prepares also take [`InUse::prepare`], a shared guard that blob collection takes
//! exclusively: a prepare's blobs are downloaded before its base records them.

use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// (family, digest) → holds.
pub type Held = HashMap<(String, String), usize>;

#[derive(Default)]
pub struct InUse {
    held: Arc<Mutex<Held>>,
    blobs: Arc<tokio::sync::RwLock<()>>,
}

/// Keeps one family version from being collected until dropped.
pub struct Hold {
    held: Arc<Mutex<Held>>,
    key: (String, String),
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl InUse {
    /// Holds version `digest` of `family`.
    pub fn hold(&self, family: &str, digest: &str) -> Hold {
        let key = (family.to_owned(), digest.to_owned());
        *lock(&self.held).entry(key.clone()).or_default() += 1;
        Hold { held: self.held.clone(), key }
    }

    /// The registry: garbage collection decides while holding its lock.
    pub(super) fn registry(&self) -> Arc<Mutex<Held>> {
        self.held.clone()
    }

    /// Taken (shared) by a prepare for its whole run; blob collection waits for none.
    pub async fn prepare(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.blobs.clone().read_owned().await
    }

    /// Exclusive access for blob collection, if no prepare is running.
    pub fn collect_blobs(&self) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        self.blobs.clone().try_write_owned().ok()
    }
}
