//! How every benchmark reports, so that each figure in `RESULTS.md` can be checked from what
//! is printed beside it: each round's paired figures (which side went first), each ratio
//! with what it is made of, its target and `PASS`/`MISS`, and the process's peak RSS.

use std::time::Duration;

/// Which way a target points.
#[derive(Clone, Copy)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

/// Prints `<bench> <name>=<value> (target <= x) PASS|MISS`.
pub fn ratio(bench: &str, name: &str, value: f64, goal: Goal) {
    let (op, target, pass) = match goal {
        Goal::AtMost(t) => ("<=", t, value <= t),
        Goal::AtLeast(t) => (">=", t, value >= t),
    };
    println!("{bench} {name}={value:.2} (target {op} {target}) {}", if pass { "PASS" } else { "MISS" });
}

/// Prints `<bench>_peak_rss <MiB> MiB`: this process's high-water mark of resident memory.
pub fn peak_rss(bench: &str) {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    println!("{bench}_peak_rss {:.1} MiB (this benchmark's process)", usage.ru_maxrss as f64 / 1024.0);
}

/// Which side goes first in round `round`: ours in even rounds, the baseline in odd ones.
pub fn ours_first(round: usize) -> bool {
    round.is_multiple_of(2)
}

pub fn side(round: usize) -> &'static str {
    if ours_first(round) { "ours" } else { "baseline" }
}

/// The median of per-round ratios, printed with the ratios it is taken from.
pub fn median_of_ratios(bench: &str, name: &str, ratios: &[f64]) -> f64 {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    let m = median_f(&sorted);
    let list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!("{bench}_{name}_rounds [{}] -> median {m:.2}", list.join(", "));
    m
}

/// The median of a sorted slice (the mean of the two middle values for an even length).
pub fn median_f(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n.is_multiple_of(2) { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 } else { sorted[n / 2] }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time (user + system) this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// What a child process used, by [`wait_with_usage`].
pub struct ChildUsage {
    pub rusage: libc::rusage,
    /// Its peak resident memory in MiB: `VmHWM` of its own address space, sampled every
    /// 20 ms while it runs. Not `ru_maxrss`: a child started with `posix_spawn` (vfork)
    /// takes its parent's high-water mark at `exec`, so that figure is never below the
    /// benchmark's own.
    pub peak_rss_mib: f64,
}

/// Waits for child `child` to exit successfully and returns what it used (`wait4`): its CPU
/// time, the blocks it read from a disk, and its peak RSS.
pub fn wait_with_usage(child: &std::process::Child, what: &str) -> anyhow::Result<ChildUsage> {
    let pid = child.id() as libc::pid_t;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak_kib = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                // Gone (exited, not yet reaped) or unreadable: the last sample stands.
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            peak_kib
        })
    };
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child pid with valid pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak_kib = sampler.join().map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))?;
    anyhow::ensure!(rc == pid, "wait4 failed: {}", std::io::Error::last_os_error());
    anyhow::ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{what} failed (status {status})");
    Ok(ChildUsage { rusage: usage, peak_rss_mib: peak_kib as f64 / 1024.0 })
}
