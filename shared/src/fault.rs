//! Named fault points for crash tests.
//!
//! `fault::point("fsm.after_commit", "run-3/step_b")` kills the process with SIGKILL (no
//! destructors, no flush) when the environment variable `THINPIPE_FAULT` names this point:
//! either `name` (any detail) or `name@detail`. Only builds with the `fault-injection`
//! feature check the variable; other builds compile every point to nothing.

#[cfg(feature = "fault-injection")]
pub fn point(name: &str, detail: &str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("THINPIPE_FAULT").ok());
    let Some(spec) = armed else { return };
    let hit = match spec.split_once('@') {
        Some((n, d)) => n == name && d == detail,
        None => spec == name,
    };
    if hit {
        eprintln!("fault point {name}@{detail} armed: killing the process");
        // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str, _detail: &str) {}
