//! Command-line output into a closed pipe (`worker runs list --json | head -c 100`): the
//! process ends quietly, killed by SIGPIPE as Unix tools are, instead of panicking in
//! `println!` on the EPIPE error.

/// Restores the default SIGPIPE action, which Rust's runtime sets to ignore. For one-shot
/// commands whose output goes to a terminal or a pipe. Sockets are unaffected (the standard
/// library sends with `MSG_NOSIGNAL`), so a server may call it too, but a long-running
/// daemon has no reason to.
pub fn end_quietly_on_broken_pipe() {
    // SAFETY: SIG_DFL is a valid action for SIGPIPE; signal() cannot fail with these
    // arguments, so its result (the previous action) carries nothing to check.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
