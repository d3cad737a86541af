//! What an errno from a device-mapper call means, as pure functions of the errno (and the
//! pool's mode): tested by a table, without a kernel. `device.rs` makes the calls; `mod.rs`
//! acts on these answers.

use std::time::Duration;

/// What a failed call means for its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Retrying cannot help: the volume call fails, with the pool's status in its message.
    Abort,
    /// May succeed later: the caller's retry policy decides.
    Transient,
}

/// The errnos that end a call whatever the pool's mode: no such device or origin
/// (`ENODATA`), a malformed or refused message (`EINVAL`, `EPERM`), no space (`ENOSPC`),
/// the device in use (`EBUSY`, after `delete` retried it), the id taken (`EEXIST`, once the
/// caller found it is not its own re-run).
const HARD: [i32; 6] = [libc::ENODATA, libc::EINVAL, libc::ENOSPC, libc::EBUSY, libc::EEXIST, libc::EPERM];

/// How often `delete` is tried while the kernel says the thin id is busy.
pub const DELETE_BUSY_ATTEMPTS: u32 = 4;

/// A failed call with `errno` (`None`: the call failed without one) while the pool is, or
/// is not, in `rw` mode: any failure while it is not (read-only, failed, out of data space)
/// is an abort.
pub fn classify(errno: Option<i32>, pool_rw: bool) -> Verdict {
    if !pool_rw || errno.is_some_and(|n| HARD.contains(&n)) { Verdict::Abort } else { Verdict::Transient }
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
        use Verdict::{Abort, Transient};
        let table = [
            (Some(libc::ENODATA), true, Abort),
            (Some(libc::EINVAL), true, Abort),
            (Some(libc::ENOSPC), true, Abort),
            (Some(libc::EBUSY), true, Abort),
            (Some(libc::EEXIST), true, Abort),
            (Some(libc::EPERM), true, Abort),
            (Some(libc::EIO), true, Transient),
            (Some(libc::ENOMEM), true, Transient),
            (Some(libc::EAGAIN), true, Transient),
            (None, true, Transient),
            // Not rw (read-only, failed, out of data space): everything aborts.
            (Some(libc::EIO), false, Abort),
            (Some(libc::EAGAIN), false, Abort),
            (None, false, Abort),
        ];
        for (errno, rw, verdict) in table {
            assert_eq!(classify(errno, rw), verdict, "errno {errno:?}, pool rw {rw}");
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
