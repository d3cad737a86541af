//! One lock per invocation, so the steps of two jobs for the same invocation never run at
//! the same time in this process.
//!
//! Why a process-local lock is enough: one worker process owns a state directory (the
//! `worker` lease), and every run of that directory, resumed or new, runs in it. The
//! durable part of the ordering lives in SQLite (the snapshot row's state, see
//! `store/snapshots.rs`); the lock only closes the window between a step's check of the row
//! and its side effect on the volume: an activation never creates or exposes a snapshot
//! while a release of the same invocation deletes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OwnedMutexGuard;

/// The locks, created on first use and forgotten once nobody holds or waits for them.
#[derive(Default)]
pub struct InvocationLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl InvocationLocks {
    /// Waits for, then holds, the lock of `invocation` until the guard is dropped.
    pub async fn lock(&self, invocation: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = crate::sync::lock(&self.locks);
            match locks.get(invocation).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    // Forget the locks nobody uses any more (amortised: only when adding one).
                    locks.retain(|_, l| l.strong_count() > 0);
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(invocation.to_owned(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_holder_per_invocation_and_nothing_kept_after() {
        let locks = Arc::new(InvocationLocks::default());
        let held = locks.lock("a").await;
        let other = locks.lock("b").await; // another invocation is not blocked
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { drop(locks.lock("a").await) })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "a second holder of the same invocation waits");
        drop(held);
        waiter.await.unwrap();
        drop(other);
        let _c = locks.lock("c").await;
        assert_eq!(locks.locks.lock().unwrap().len(), 1, "unused locks are forgotten");
    }
}
