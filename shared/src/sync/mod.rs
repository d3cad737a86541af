//! Small synchronisation pieces shared by the engine and the store: one way to take a
//! lock ([`lock`]) and one group-commit protocol ([`GroupCommit`]).

mod group_commit;

pub use group_commit::{GroupCommit, Joined, Queue, QueueLock, Stopped};

/// Takes `m`, recovering the value if a thread panicked while holding it. Every mutex in
/// thinpipe guards plain data updated in single assignments or whole-collection edits, so
/// a panic cannot leave it half-updated; failing every later caller would turn one bug
/// into a stuck worker.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`lock`] for readers of an `RwLock`.
pub fn read<T: ?Sized>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`lock`] for writers of an `RwLock`.
pub fn write<T: ?Sized>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
