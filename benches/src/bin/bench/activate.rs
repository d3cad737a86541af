//! `bench activate`: activation latency on the btrfs backend — from a job's activation
//! starting to its snapshot being exposed (the queue excluded: `Pipeline::activate` on a
//! prepared family) — beside the floor measured in the same run on the same filesystem: the
//! bare snapshot ioctl plus one durable redb commit on the same disk as our state.
//!
//! Prints, each beside its target:
//! - `activate ratio_vs_floor=<p50 ours / p50 floor>` (<= 1.5) and `p99_ratio` (<= 2.0), over
//!   200 activations in 4 rounds that alternate which side goes first;
//! - `activate concurrent_ratio=<ours / floor>` (>= 1.0): 16 activations at a time against
//!   16 threads each doing the floor's ioctl and commit, in activations per second;
//! - `activate gc_p99_ratio=<p99 during GC / p99 without>` (<= 2): activations one at a time
//!   while garbage collection deletes 50 old bases (each with a small tree) in the
//!   background, beside the same number of activations without it, in alternating rounds;
//! - `activate syncs_per_activation=<n>` (<= 2): fsync/fdatasync calls on an activation's
//!   path, counted by `strace -f -y` on a child process doing N activations, minus the same
//!   child doing none (so setup and prepare cancel out), minus the background WAL
//!   checkpoints' syncs (printed beside, amortized).
//!
//! Needs root (a loop-mounted btrfs) and `strace`; prints a skip line otherwise.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use redb::{Database, Durability, TableDefinition};
use thinpipe::fsm::Outcome;
use thinpipe::volume::btrfs_ioctl;

use crate::report::{self, Goal, ms, percentile};

const ACTIVATIONS: usize = 200;
const ROUNDS: usize = 4;
const CONCURRENCY: usize = 16;
const CONCURRENT_PER_TASK: usize = 10;
const CONCURRENT_ROUNDS: usize = 2;
const SYNC_COUNT_ACTIVATIONS: usize = 100;
const FLOOR: TableDefinition<u64, u64> = TableDefinition::new("t");

/// A worker host on `state` with its volumes under `volumes` (btrfs), its family prepared.
fn host(rt: &tokio::runtime::Runtime, state: &Path, volumes: &Path) -> anyhow::Result<(Arc<worker::host::Host>, u64)> {
    thinpipe::image::write_sample_family(state, "bench")?;
    let sets = [
        format!("state_dir={}", state.display()),
        "backend=btrfs".to_owned(),
        format!("volumes_dir={}", volumes.display()),
    ];
    let config = worker::config::Config::load(None, [], &sets)?;
    let host = Arc::new(rt.block_on(worker::host::Host::open(config))?);
    let job = thinpipe::job::Job::new(thinpipe::job::JobKind::Prepare, "bench", None);
    let prepared = rt.block_on(worker::commands::run::run(&host, &job))?;
    let base = match prepared.base_vol_id {
        Some(base) => base,
        None => bail!("preparing the bench family failed: {}", prepared.error.unwrap_or_default()),
    };
    Ok((host, base))
}

async fn activate(host: &worker::host::Host, name: &str, base: u64) -> anyhow::Result<()> {
    match host.pipeline.activate("bench", name, base, None).await? {
        Outcome::Completed(_) => Ok(()),
        Outcome::Failed(f) => bail!("activation {name} failed: {f}"),
    }
}

/// The floor: the same snapshot ioctl and one durable commit, nothing else.
struct Floor {
    base_dir: std::fs::File,
    into: std::fs::File,
    db: Database,
}

impl Floor {
    fn once(&self, n: u64) -> anyhow::Result<()> {
        btrfs_ioctl::snapshot_create(&self.into, &CString::new(format!("s{n}"))?, &self.base_dir, false)?;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(FLOOR)?.insert(n, n)?;
        txn.commit()?;
        Ok(())
    }
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("activate skipped: needs root for a loop-mounted btrfs");
        return Ok(());
    }
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::new() else { bail!("cannot make a test btrfs") };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // As on a host: the worker's state on the machine's disk, the volumes on their own
    // filesystem. The floor's commit goes to the same disk as ours.
    let state_dir = tempfile::Builder::new().prefix("bench-activate-").tempdir_in(dir)?;
    let (host, base) = host(&rt, &state_dir.path().join("state"), &fs.mount.join("volumes"))?;
    std::fs::create_dir_all(fs.mount.join("floor"))?;
    let floor = Arc::new(Floor {
        base_dir: std::fs::File::open(fs.mount.join(format!("volumes/bases/base-{base}")))?,
        into: std::fs::File::open(fs.mount.join("floor"))?,
        db: Database::create(state_dir.path().join("floor.redb"))?,
    });

    // One at a time, in rounds alternating which side goes first.
    let (mut ours, mut floors) = (Vec::new(), Vec::new());
    let per_round = ACTIVATIONS / ROUNDS;
    let mut next = 0u64;
    for round in 0..ROUNDS {
        let (mut o, mut f) = (Vec::new(), Vec::new());
        for ours_turn in if report::ours_first(round) { [true, false] } else { [false, true] } {
            for _ in 0..per_round {
                next += 1;
                let started = Instant::now();
                if ours_turn {
                    rt.block_on(activate(&host, &format!("bench-{next}"), base))?;
                    o.push(started.elapsed());
                } else {
                    floor.once(next)?;
                    f.push(started.elapsed());
                }
            }
        }
        o.sort();
        f.sort();
        println!(
            "activate_round{round} first={} ours_p50 {:.2} ms floor_p50 {:.2} ms ratio {:.2}",
            report::side(round),
            ms(percentile(&o, 0.5)),
            ms(percentile(&f, 0.5)),
            ms(percentile(&o, 0.5)) / ms(percentile(&f, 0.5))
        );
        ours.extend(o);
        floors.extend(f);
    }
    ours.sort();
    floors.sort();
    println!(
        "activate_ours_btrfs p50 {:.2} ms p99 {:.2} ms ({ACTIVATIONS} activations; state on {}, volumes on a loop btrfs)",
        ms(percentile(&ours, 0.5)),
        ms(percentile(&ours, 0.99)),
        dir.display()
    );
    println!(
        "activate_floor_btrfs p50 {:.2} ms p99 {:.2} ms (snapshot ioctl + one durable redb commit)",
        ms(percentile(&floors, 0.5)),
        ms(percentile(&floors, 0.99))
    );
    println!("activate ratios below: p50 and p99 of all rounds' samples, ours over floor");
    report::ratio(
        "activate",
        "ratio_vs_floor",
        ms(percentile(&ours, 0.5)) / ms(percentile(&floors, 0.5)),
        Goal::AtMost(1.5),
    );
    report::ratio(
        "activate",
        "p99_ratio",
        ms(percentile(&ours, 0.99)) / ms(percentile(&floors, 0.99)),
        Goal::AtMost(2.0),
    );

    // Sixteen at a time.
    let mut ratios = Vec::new();
    for round in 0..CONCURRENT_ROUNDS {
        let (mut o, mut f) = (0.0, 0.0);
        for ours_turn in if report::ours_first(round) { [true, false] } else { [false, true] } {
            let started = Instant::now();
            if ours_turn {
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for t in 0..CONCURRENCY {
                        let (host, first) = (host.clone(), next + (t * CONCURRENT_PER_TASK) as u64);
                        tasks.push(tokio::spawn(async move {
                            for k in 0..CONCURRENT_PER_TASK as u64 {
                                activate(&host, &format!("conc-{}", first + k), base).await?;
                            }
                            anyhow::Ok(())
                        }));
                    }
                    for t in tasks {
                        t.await??;
                    }
                    anyhow::Ok(())
                })?;
                o = (CONCURRENCY * CONCURRENT_PER_TASK) as f64 / started.elapsed().as_secs_f64();
            } else {
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..CONCURRENCY)
                        .map(|t| {
                            let (floor, first) = (floor.clone(), next + (t * CONCURRENT_PER_TASK) as u64);
                            s.spawn(move || -> anyhow::Result<()> {
                                for k in 0..CONCURRENT_PER_TASK as u64 {
                                    floor.once(first + k)?;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().map_err(|_| anyhow::anyhow!("a floor thread panicked"))??;
                    }
                    anyhow::Ok(())
                })?;
                f = (CONCURRENCY * CONCURRENT_PER_TASK) as f64 / started.elapsed().as_secs_f64();
            }
            next += (CONCURRENCY * CONCURRENT_PER_TASK) as u64;
        }
        println!(
            "activate_concurrent{CONCURRENCY}_round{round} first={} ours {o:.0}/s floor {f:.0}/s ratio {:.2}",
            report::side(round),
            o / f
        );
        ratios.push(o / f);
    }
    let ratio = report::median_of_ratios("activate", "concurrent_ratio", &ratios);
    report::ratio("activate", "concurrent_ratio", ratio, Goal::AtLeast(1.0));

    gc_p99(&rt, &host, &floor, base, &mut next)?;
    rt.block_on(host.close());
    drop(rt);

    syncs(dir, &fs.mount)?;
    report::peak_rss("activate");
    Ok(())
}

/// Old bases garbage collection deletes in each `gc_p99` round.
const GC_BASES: usize = 50;
const GC_ROUNDS: usize = 2;
/// The most activations sampled in one GC window.
const GC_MAX_SAMPLES: usize = 300;

/// Activation p99 while garbage collection deletes [`GC_BASES`] old bases, beside p99
/// without it, in rounds alternating which goes first. "While" is from the pass's start
/// until the space of what it deleted counts as free again (on btrfs the pass itself is a
/// few ms of ioctls; the kernel's cleaner then frees the subvolumes' blocks for seconds):
/// the GC side samples activations in that window, up to [`GC_MAX_SAMPLES`]; the other side
/// takes as many with nothing in the background. The floor (snapshot ioctl + one redb commit)
/// is interleaved on both sides, one for one, to tell what the filesystem's own cleaner costs
/// every snapshot from what thinpipe adds.
fn gc_p99(
    rt: &tokio::runtime::Runtime,
    host: &Arc<worker::host::Host>,
    floor: &Floor,
    base: u64,
    next: &mut u64,
) -> anyhow::Result<()> {
    let (mut with_gc, mut without) = (Vec::new(), Vec::new());
    let (mut floor_gc, mut floor_quiet) = (Vec::new(), Vec::new());
    let mut windows = Vec::new();
    for round in 0..GC_ROUNDS {
        old_bases(host, round, base)?;
        let mut taken = 0;
        for gc_turn in if report::ours_first(round) { [true, false] } else { [false, true] } {
            if gc_turn {
                let (lifecycle, backend) = (host.lifecycle.clone(), host.pipeline.context().backend.clone());
                let started = Instant::now();
                let window = rt.spawn(async move {
                    let report = lifecycle.collect(false).await?;
                    tokio::task::spawn_blocking(move || backend.wait_reclaimed(std::time::Duration::from_secs(120)))
                        .await??;
                    anyhow::Ok(report)
                });
                let mut samples = Vec::new();
                while !window.is_finished() && samples.len() < GC_MAX_SAMPLES {
                    *next += 1;
                    let t = Instant::now();
                    rt.block_on(activate(host, &format!("gc-{next}"), base))?;
                    samples.push(t.elapsed());
                    *next += 1;
                    let t = Instant::now();
                    floor.once(*next)?;
                    floor_gc.push(t.elapsed());
                }
                let report = rt.block_on(window)??;
                ensure!(
                    report.deleted.len() == GC_BASES,
                    "the pass deleted {} bases: {report:?}",
                    report.deleted.len()
                );
                windows.push(started.elapsed());
                taken = samples.len();
                with_gc.extend(samples);
            } else {
                let n = if taken > 0 { taken } else { GC_MAX_SAMPLES / 2 };
                for _ in 0..n {
                    *next += 1;
                    let t = Instant::now();
                    rt.block_on(activate(host, &format!("gc-{next}"), base))?;
                    without.push(t.elapsed());
                    *next += 1;
                    let t = Instant::now();
                    floor.once(*next)?;
                    floor_quiet.push(t.elapsed());
                }
            }
        }
    }
    ensure!(
        with_gc.len() >= 20,
        "only {} activations ran during garbage collection: too few to measure",
        with_gc.len()
    );
    with_gc.sort();
    without.sort();
    floor_gc.sort();
    floor_quiet.sort();
    println!(
        "activate_gc_floor p99 {:.2} ms during GC, {:.2} ms without (ratio {:.2}): the filesystem's own cost to every snapshot while its cleaner frees the deleted subvolumes",
        ms(percentile(&floor_gc, 0.99)),
        ms(percentile(&floor_quiet, 0.99)),
        ms(percentile(&floor_gc, 0.99)) / ms(percentile(&floor_quiet, 0.99))
    );
    let windows: Vec<String> = windows.iter().map(|w| format!("{:.1}s", w.as_secs_f64())).collect();
    println!(
        "activate_gc p99 {:.2} ms over {} activations while GC deleted {GC_BASES} bases (x{GC_ROUNDS}, windows {}); without GC p99 {:.2} ms over {}",
        ms(percentile(&with_gc, 0.99)),
        with_gc.len(),
        windows.join(", "),
        ms(percentile(&without, 0.99)),
        without.len()
    );
    report::ratio(
        "activate",
        "gc_p99_ratio",
        ms(percentile(&with_gc, 0.99)) / ms(percentile(&without, 0.99)),
        Goal::AtMost(2.0),
    );
    Ok(())
}

/// Makes [`GC_BASES`] sealed old versions of the bench family, each with a small tree, that
/// garbage collection may delete (each was current, then replaced), and makes `current`
/// current again.
fn old_bases(host: &worker::host::Host, round: usize, current: u64) -> anyhow::Result<()> {
    let (store, backend) = (&host.store, &host.pipeline.context().backend);
    for i in 0..GC_BASES {
        let digest = format!("sha256:{:064x}", (round * GC_BASES + i + 1) as u128);
        let thinpipe::store::BaseIntent::Ready(row) = store.intend_base("bench", &digest, &[])? else {
            bail!("old base {digest} is retiring");
        };
        backend.create_base(row.id)?;
        let root = backend.reset_base(row.id)?;
        for f in 0..100 {
            let dir = root.join(format!("d{}", f % 10));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("f{f}")), vec![b'x'; 4096])?;
        }
        backend.seal_base(row.id)?;
        store.mark_base_sealed(row.id)?;
        store.make_current("bench", row.id)?;
    }
    store.make_current("bench", current)?;
    Ok(())
}

/// Counts fsync-family calls per activation with `strace`, on child processes: all of them,
/// and those on the activation's path (all but the background WAL checkpoints', each of which
/// syncs the WAL and then `host.db`; only they sync `host.db` itself).
fn syncs(dir: &Path, mount: &Path) -> anyhow::Result<()> {
    const SYNCS: [&str; 5] = ["fsync", "fdatasync", "sync_file_range", "syncfs", "msync"];
    if Command::new("strace").arg("-V").output().is_err() {
        println!("activate syncs_per_activation skipped: strace is not installed (scripts/test installs it)");
        return Ok(());
    }
    // (all sync calls, sync calls of checkpoints, sync calls between each two markers) of a
    // child doing `n` activations.
    let count = |n: usize| -> anyhow::Result<(u64, u64, Vec<u64>)> {
        let state = tempfile::Builder::new().prefix("bench-syncs-").tempdir_in(dir)?;
        let volumes = mount.join(format!("syncs-{n}"));
        let trace = state.path().join("strace.txt");
        let out = Command::new("strace")
            .args(["-f", "-y", "-e", &format!("trace=getppid,{}", SYNCS.join(",")), "-o"])
            .arg(&trace)
            .arg(std::env::current_exe()?)
            .arg("activate-syncs")
            .arg(state.path().join("state"))
            .arg(&volumes)
            .arg(n.to_string())
            .output()
            .context("running the bench under strace")?;
        ensure!(out.status.success(), "the sync-counting child failed: {}", String::from_utf8_lossy(&out.stderr));
        let (mut all, mut checkpoint_db) = (0, 0);
        let mut windows: Vec<u64> = Vec::new();
        for line in std::fs::read_to_string(&trace)?.lines() {
            // `<tid> fdatasync(7</path/host.db-wal>) = 0` (a call interrupted by another
            // thread's shows as `... <unfinished ...>`, then `<... fdatasync resumed>`)
            let Some(call) = line.split_whitespace().nth(1) else { continue };
            let Some((name, rest)) = call.split_once('(') else { continue };
            if name == "getppid" {
                windows.push(0);
                continue;
            }
            if !SYNCS.contains(&name) {
                continue;
            }
            all += 1;
            if let Some(w) = windows.last_mut() {
                *w += 1;
            }
            let path = rest.split_once('<').and_then(|(_, p)| p.split_once('>')).map(|(p, _)| p);
            if path.is_some_and(|p| p.ends_with("/host.db")) {
                checkpoint_db += 1;
            }
        }
        // The syncs after the last marker are the close's, not an activation's.
        windows.pop();
        Ok((all, 2 * checkpoint_db, windows))
    };
    let ((none, none_ckpt, _), (some, some_ckpt, mut each)) = (count(0)?, count(SYNC_COUNT_ACTIVATIONS)?);
    each.sort();
    let median = each.get(each.len() / 2).copied().unwrap_or(0);
    let most = each.last().copied().unwrap_or(0);
    let above: usize = each.iter().filter(|&&c| c > median).count();
    let n = SYNC_COUNT_ACTIVATIONS as f64;
    let all = some.saturating_sub(none) as f64 / n;
    let checkpoints = some_ckpt.saturating_sub(none_ckpt) as f64 / n;
    println!(
        "activate_syncs {some} sync calls for prepare + {SYNC_COUNT_ACTIVATIONS} activations ({some_ckpt} by WAL checkpoints), {none} for prepare alone ({none_ckpt} by checkpoints) (strace -f -y)"
    );
    println!(
        "activate syncs_all_per_activation={all:.2} (every sync of the process over the activations, {checkpoints:.2} of them background WAL checkpoints')"
    );
    println!(
        "activate_syncs_each median {median}, most {most}, {above} of {} activations above the median (syncs between two activations' starts)",
        each.len()
    );
    report::ratio("activate", "syncs_per_activation", median as f64, Goal::AtMost(2.0));
    Ok(())
}

/// The child `syncs` traces: a host on `state`, its family prepared, `n` activations.
pub fn syncs_child(args: &[String]) -> anyhow::Result<()> {
    let [state, volumes, n] = args else { bail!("usage: bench activate-syncs <state> <volumes> <n>") };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (host, base) = host(&rt, &PathBuf::from(state), &PathBuf::from(volumes))?;
    for i in 0..n.parse::<usize>()? {
        // A marker in the trace between activations (`syncs` counts the syncs between two).
        // SAFETY: getppid has no preconditions and cannot fail.
        unsafe { libc::getppid() };
        rt.block_on(activate(&host, &format!("sync-{i}"), base))?;
    }
    // SAFETY: as above.
    unsafe { libc::getppid() };
    rt.block_on(host.close());
    Ok(())
}
