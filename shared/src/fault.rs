//! Named fault points for crash tests.
//!
//! `fault::point("fsm.after_commit", "run-3/step_b")` kills the process with SIGKILL (no
//! destructors, no flush) when the environment variable `THINPIPE_FAULT` names this point:
//! either `name` (any detail) or `name@detail`. Only builds with the `fault-injection`
//! feature check the variable; other builds compile every point to nothing.
//! [`pause`] is the same for a delay (`THINPIPE_PAUSE=name@detail=ms`), and [`fail`] for
//! a transient error the first N times the point is reached (`THINPIPE_FAIL=name@detail*N`).
//! Each variable is read once per process.

/// Whether this build has the fault points (a test build). A production binary must not.
pub const COMPILED_IN: bool = cfg!(feature = "fault-injection");

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

/// How long `THINPIPE_PAUSE` (`name@detail=ms` or `name=ms`) says to wait at this point.
#[cfg(feature = "fault-injection")]
fn pause_for(name: &str, detail: &str) -> Option<std::time::Duration> {
    // Read once per process, like THINPIPE_FAULT: the unpacker asks before every entry.
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| std::env::var("THINPIPE_PAUSE").ok()).as_deref()?;
    let (point, ms) = spec.rsplit_once('=')?;
    let hit = match point.split_once('@') {
        Some((n, d)) => n == name && d == detail,
        None => point == name,
    };
    let ms = ms.parse::<u64>().ok().filter(|_| hit)?;
    eprintln!("pause point {name}@{detail}: waiting {ms} ms");
    Some(std::time::Duration::from_millis(ms))
}

/// A named pause for tests that need a job to be running: when `THINPIPE_PAUSE` is
/// `name@detail=ms` (or `name=ms`), waits that long here. Nothing without the feature.
#[cfg(feature = "fault-injection")]
pub async fn pause(name: &str, detail: &str) {
    if let Some(wait) = pause_for(name, detail) {
        tokio::time::sleep(wait).await;
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub async fn pause(_name: &str, _detail: &str) {}

/// [`pause`] inside a blocking step body (a thread, not a task): what a long unpack is.
#[cfg(feature = "fault-injection")]
pub fn pause_blocking(name: &str, detail: &str) {
    if let Some(wait) = pause_for(name, detail) {
        std::thread::sleep(wait);
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn pause_blocking(_name: &str, _detail: &str) {}

/// A named transient failure for tests of retries: when `THINPIPE_FAIL` is `name@detail*N`
/// (or `name*N`; N defaults to 1), the first N calls in this process return an error.
/// Always `Ok` without the feature.
#[cfg(feature = "fault-injection")]
pub fn fail(name: &str, detail: &str) -> Result<(), String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static FAILED: AtomicU32 = AtomicU32::new(0);
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let Some(spec) = SPEC.get_or_init(|| std::env::var("THINPIPE_FAIL").ok()).as_deref() else { return Ok(()) };
    let (point, times) = match spec.rsplit_once('*') {
        Some((p, n)) => (p, n.parse::<u32>().unwrap_or(1)),
        None => (spec, 1),
    };
    let hit = match point.split_once('@') {
        Some((n, d)) => n == name && d == detail,
        None => point == name,
    };
    if hit && FAILED.fetch_add(1, Ordering::SeqCst) < times {
        eprintln!("fail point {name}@{detail} armed: failing this attempt");
        return Err(format!("injected failure at {name} (THINPIPE_FAIL)"));
    }
    Ok(())
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn fail(_name: &str, _detail: &str) -> Result<(), String> {
    Ok(())
}
