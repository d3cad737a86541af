//! What an errno from a device-mapper call means, as pure functions of the errno (and the
//! pool's mode): tested by a table, without a kernel. `device.rs` makes the calls; `mod.rs`
//! acts on these answers.

use std::time::Duration;

/// What a failed call means for its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Retrying cannot help: the volume call fails, with the pool's status in its message.
    Abort,
    /// The pool is full or read-only: an operator must free space (`host_storage`).
    HostStorage,
    /// May succeed later: the caller's retry policy decides.
    Transient,
}

/// The pool's mode, the fifth field of its status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    ReadWrite,
    /// `out_of_data_space`: writes that need a new block fail (with `error_if_no_space`).
    OutOfDataSpace,
    /// `ro`: the kernel switched the pool to read-only (metadata full or failing).
    ReadOnly,
    /// `Fail`, or a status this code does not know.
    Failed,
}

impl PoolMode {
    /// The mode in a status line `<transaction> <meta> <data> <held root> <mode> ...`.
    pub fn of_status(status: &str) -> Self {
        match status.split_whitespace().nth(4) {
            Some("rw") => Self::ReadWrite,
            Some("out_of_data_space") => Self::OutOfDataSpace,
            Some("ro") => Self::ReadOnly,
            _ => Self::Failed,
        }
    }
}

/// The errnos that end a call in a writable pool: no such device or origin (`ENODATA`), a
/// malformed or refused message (`EINVAL`, `EPERM`), the device in use (`EBUSY`, after
/// `delete` retried it), the id taken (`EEXIST`, once the caller found it is not its own
/// re-run). `ENOSPC` is the host's storage.
const HARD: [i32; 5] = [libc::ENODATA, libc::EINVAL, libc::EBUSY, libc::EEXIST, libc::EPERM];

/// How often `delete` is tried while the kernel says the thin id is busy.
pub const DELETE_BUSY_ATTEMPTS: u32 = 4;

/// A failed call with `errno` (`None`: the call failed without one) while the pool is in
/// `mode`: any failure of a full or read-only pool is the host's storage, of a failed pool
/// an abort.
pub fn classify(errno: Option<i32>, mode: PoolMode) -> Verdict {
    match mode {
        PoolMode::OutOfDataSpace | PoolMode::ReadOnly => Verdict::HostStorage,
        PoolMode::Failed => Verdict::Abort,
        PoolMode::ReadWrite => match errno {
            Some(libc::ENOSPC) => Verdict::HostStorage,
            Some(n) if HARD.contains(&n) => Verdict::Abort,
            _ => Verdict::Transient,
        },
    }
}

/// What `delete` does after its `attempt`-th try failed with `errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterDelete {
    /// The thin id is not in the pool: already deleted (a re-run).
    Gone,
    /// Busy (open elsewhere, maybe closing now): wait, then try again.
    RetryAfter(Duration),
    /// Give up: [`classify`] says how.
    Fail,
}

pub fn after_delete(errno: Option<i32>, attempt: u32) -> AfterDelete {
    match errno {
        Some(libc::ENODATA) => AfterDelete::Gone,
        Some(libc::EBUSY) if attempt < DELETE_BUSY_ATTEMPTS => {
            AfterDelete::RetryAfter(Duration::from_millis(50 * u64::from(attempt)))
        }
        _ => AfterDelete::Fail,
    }
}

/// Whether `create_thin`/`create_snap` failing with `errno` may be a re-run of a create
/// that succeeded (then the caller checks that the id is in the pool).
pub fn create_may_be_rerun(errno: Option<i32>) -> bool {
    errno == Some(libc::EEXIST)
}

/// Whether `reserve_metadata_snap` failing with `errno` means a snapshot is already held
/// (left by an interrupted listing): release it and reserve again.
pub fn metadata_snap_held(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EBUSY | libc::EINVAL))
}

/// Whether activating failed because the thin id is not in the pool.
pub fn not_in_pool(errno: Option<i32>) -> bool {
    errno == Some(libc::ENODATA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_errno_means_what_the_backend_documents() {
        use PoolMode::{Failed, OutOfDataSpace, ReadOnly, ReadWrite};
        use Verdict::{Abort, HostStorage, Transient};
        let table = [
            (Some(libc::ENODATA), ReadWrite, Abort),
            (Some(libc::EINVAL), ReadWrite, Abort),
            (Some(libc::ENOSPC), ReadWrite, HostStorage),
            (Some(libc::EBUSY), ReadWrite, Abort),
            (Some(libc::EEXIST), ReadWrite, Abort),
            (Some(libc::EPERM), ReadWrite, Abort),
            (Some(libc::EIO), ReadWrite, Transient),
            (Some(libc::ENOMEM), ReadWrite, Transient),
            (Some(libc::EAGAIN), ReadWrite, Transient),
            (None, ReadWrite, Transient),
            // A full or read-only pool: the host's storage, whatever the errno.
            (Some(libc::EIO), OutOfDataSpace, HostStorage),
            (None, ReadOnly, HostStorage),
            (Some(libc::EINVAL), OutOfDataSpace, HostStorage),
            // A failed pool: everything aborts.
            (Some(libc::EAGAIN), Failed, Abort),
            (None, Failed, Abort),
        ];
        for (errno, mode, verdict) in table {
            assert_eq!(classify(errno, mode), verdict, "errno {errno:?}, pool {mode:?}");
        }
    }

    #[test]
    fn the_pool_mode_is_read_from_the_status_line() {
        let modes = [
            ("1 10/1024 20/4096 - rw discard_passdown queue_if_no_space - 1024", PoolMode::ReadWrite),
            (
                "1 10/1024 4096/4096 - out_of_data_space discard_passdown error_if_no_space - 1024",
                PoolMode::OutOfDataSpace,
            ),
            ("1 1024/1024 20/4096 - ro discard_passdown queue_if_no_space needs_check 1024", PoolMode::ReadOnly),
            ("Fail", PoolMode::Failed),
        ];
        for (status, mode) in modes {
            assert_eq!(PoolMode::of_status(status), mode, "{status}");
        }
    }

    #[test]
    fn delete_retries_a_busy_id_a_few_times_and_takes_a_missing_one_as_done() {
        assert_eq!(after_delete(Some(libc::ENODATA), 1), AfterDelete::Gone);
        assert_eq!(after_delete(Some(libc::EBUSY), 1), AfterDelete::RetryAfter(Duration::from_millis(50)));
        assert_eq!(after_delete(Some(libc::EBUSY), 3), AfterDelete::RetryAfter(Duration::from_millis(150)));
        assert_eq!(after_delete(Some(libc::EBUSY), DELETE_BUSY_ATTEMPTS), AfterDelete::Fail);
        assert_eq!(after_delete(Some(libc::EIO), 1), AfterDelete::Fail);
        assert!(create_may_be_rerun(Some(libc::EEXIST)) && !create_may_be_rerun(Some(libc::ENOSPC)));
        assert!(metadata_snap_held(Some(libc::EBUSY)) && metadata_snap_held(Some(libc::EINVAL)));
        assert!(!metadata_snap_held(Some(libc::ENOMEM)));
        assert!(not_in_pool(Some(libc::ENODATA)) && !not_in_pool(None));
    }
}
