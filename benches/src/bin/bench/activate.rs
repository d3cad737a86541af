//! `bench activate`: activation latency on the btrfs and overlay backends: from a job's
//! activation starting to its snapshot being exposed (the queue excluded: `Pipeline::activate`
//! on a prepared family), each beside its floor measured in the same run on the same
//! filesystems: the backend's bare snapshot (btrfs: the snapshot ioctl; overlay: three
//! directories and the mount) plus one durable redb commit on the disk of our state.
//!
//! Prints, each beside its target:
//! - `activate ratio_vs_floor_btrfs=` and `ratio_vs_floor_overlay=` (p50 ours / p50 floor,
//!   <= 1.15) and `p99_ratio_btrfs=`, `p99_ratio_overlay=` (<= 1.5), over 200 activations in
//!   4 rounds that alternate which side goes first;
//! - `activate concurrent_ratio_overlay=<ours / floor>` (>= 1.0): 16 activations at a time
//!   against 16 threads each doing the floor, in activations per second; btrfs's beside it
//!   (its snapshot commits serialise in the kernel);
//! - `activate release_p99_ms_overlay=` (releasing the sequential rounds' snapshots one by
//!   one), btrfs's beside it;
//! - `activate overlay_size_ratio=<p50 on a 200 MiB tree / p50 on a 20 MiB tree>` (<= 1.2),
//!   with the `dir` backend's p50 on both trees beside it;
//! - `activate gc_p99_ratio=<p99 during GC / p99 without>` (<= 2, btrfs): activations one at a
//!   time while garbage collection deletes 50 old bases (each with a small tree) in the
//!   background, beside the same number of activations without it, in alternating rounds;
//! - `activate syncs_per_activation=<n>` (<= 1): fsync/fdatasync calls on an activation's
//!   path, counted by `strace -f -y` on a child process doing N activations, minus the same
//!   child doing none (so setup and prepare cancel out), minus the background WAL
//!   checkpoints' syncs (printed beside, amortized).
//!
//! Needs root (a loop-mounted btrfs, overlay mounts) and `strace`; prints a skip line
//! otherwise.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use redb::{Database, Durability, TableDefinition};
use thinpipe::fsm::Outcome;
use thinpipe::volume::{OverlayBackend, OverlayOptions, VolumeBackend, VolumeId, btrfs_ioctl, overlay_mount};

use crate::report::{self, Goal, ms, percentile};

const ACTIVATIONS: usize = 200;
const ROUNDS: usize = 4;
const CONCURRENCY: usize = 16;
const CONCURRENT_PER_TASK: usize = 10;
const CONCURRENT_ROUNDS: usize = 2;
const SYNC_COUNT_ACTIVATIONS: usize = 100;
/// Activations per tree size for `overlay_size_ratio` (overlay), and for `dir`'s copies.
const SIZE_ACTIVATIONS: usize = 60;
const SIZE_ACTIVATIONS_DIR: usize = 5;
const FLOOR: TableDefinition<u64, u64> = TableDefinition::new("t");

/// A worker host on `state` with the given backend and volume directory, `family` prepared.
fn host(
    rt: &tokio::runtime::Runtime,
    state: &Path,
    backend: &str,
    volumes: &Path,
    family: &str,
) -> anyhow::Result<(Arc<worker::host::Host>, u64)> {
    if !state.join("images").join(family).exists() {
        thinpipe::image::write_sample_family(state, family)?;
    }
    let sets = [
        format!("state_dir={}", state.display()),
        format!("backend={backend}"),
        format!("volumes_dir={}", volumes.display()),
    ];
    let config = worker::config::Config::load(None, [], &sets)?;
    let host = Arc::new(rt.block_on(worker::host::Host::open(config))?);
    let base = prepare(rt, &host, family)?;
    Ok((host, base))
}

fn prepare(rt: &tokio::runtime::Runtime, host: &Arc<worker::host::Host>, family: &str) -> anyhow::Result<u64> {
    let job = thinpipe::job::Job::new(thinpipe::job::JobKind::Prepare, family, None);
    let prepared = rt.block_on(worker::commands::run::run(host, &job))?;
    match prepared.base_vol_id {
        Some(base) => Ok(base),
        None => bail!("preparing {family} failed: {}", prepared.error.unwrap_or_default()),
    }
}

async fn activate(host: &worker::host::Host, name: &str, base: u64) -> anyhow::Result<()> {
    activate_family(host, "bench", name, base).await
}

async fn activate_family(host: &worker::host::Host, family: &str, name: &str, base: u64) -> anyhow::Result<()> {
    match host.pipeline.activate(family, name, base, None).await? {
        Outcome::Completed(_) => Ok(()),
        Outcome::Failed(f) => bail!("activation {name} failed: {f}"),
    }
}

/// A backend's floor: its bare snapshot and one durable commit, nothing else.
trait Floor: Send + Sync {
    fn once(&self, n: u64) -> anyhow::Result<()>;
}

fn commit(db: &Database, n: u64) -> anyhow::Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.open_table(FLOOR)?.insert(n, n)?;
    txn.commit()?;
    Ok(())
}

/// btrfs: the snapshot ioctl.
struct BtrfsFloor {
    base_dir: std::fs::File,
    into: std::fs::File,
    db: Database,
}

impl Floor for BtrfsFloor {
    fn once(&self, n: u64) -> anyhow::Result<()> {
        btrfs_ioctl::snapshot_create(&self.into, &CString::new(format!("s{n}"))?, &self.base_dir, false)?;
        commit(&self.db, n)
    }
}

/// overlay: a snapshot's three directories and its mount (unmounted when dropped).
struct OverlayFloor {
    lower: PathBuf,
    root: PathBuf,
    db: Database,
}

impl Floor for OverlayFloor {
    fn once(&self, n: u64) -> anyhow::Result<()> {
        let dir = self.root.join(format!("s{n}"));
        std::fs::create_dir(&dir)?;
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.join(d))?;
        }
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        let layers = overlay_mount::Layers { lower: &self.lower, upper: &upper, work: &work, volatile: false };
        overlay_mount::mount(&dir.join("merged"), &layers)?;
        commit(&self.db, n)
    }
}

impl Drop for OverlayFloor {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for e in entries.flatten() {
            if let Err(err) = overlay_mount::unmount(&e.path().join("merged")) {
                eprintln!("unmounting the floor's {}: {err}", e.path().display());
            }
        }
    }
}

/// Unmounts every overlay snapshot of a volume directory when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let Ok(b) = OverlayBackend::open(&self.0, OverlayOptions::default()) else { return };
        for vol in b.list().unwrap_or_default() {
            if let VolumeId::Snap(_) = vol
                && let Err(e) = b.delete(vol)
            {
                eprintln!("unmounting {vol}: {e}");
            }
        }
    }
}

/// One backend under test: its host, the bench family's base, and its floor.
struct Side {
    name: &'static str,
    host: Arc<worker::host::Host>,
    base: u64,
    floor: Arc<dyn Floor>,
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("activate skipped: needs root for a loop-mounted btrfs and overlay mounts");
        return Ok(());
    }
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::new() else { bail!("cannot make a test btrfs") };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // As on a host: the worker's state on the machine's disk, btrfs volumes on their own
    // filesystem, overlay volumes on the machine's disk. Every floor commits to that disk.
    let scratch = tempfile::Builder::new().prefix("bench-activate-").tempdir_in(dir)?;
    let s = scratch.path();
    let (btrfs_host, btrfs_base) = host(&rt, &s.join("btrfs"), "btrfs", &fs.mount.join("volumes"), "bench")?;
    std::fs::create_dir_all(fs.mount.join("floor"))?;
    let btrfs = Side {
        name: "btrfs",
        host: btrfs_host,
        base: btrfs_base,
        floor: Arc::new(BtrfsFloor {
            base_dir: std::fs::File::open(fs.mount.join(format!("volumes/bases/base-{btrfs_base}")))?,
            into: std::fs::File::open(fs.mount.join("floor"))?,
            db: Database::create(s.join("floor-btrfs.redb"))?,
        }),
    };
    let overlay_volumes = s.join("overlay/volumes");
    let _unmount = Unmount(overlay_volumes.clone());
    let (overlay_host, overlay_base) = host(&rt, &s.join("overlay"), "overlay", &overlay_volumes, "bench")?;
    std::fs::create_dir_all(s.join("overlay-floor"))?;
    let overlay = Side {
        name: "overlay",
        host: overlay_host,
        base: overlay_base,
        floor: Arc::new(OverlayFloor {
            lower: overlay_volumes.join(format!("bases/base-{overlay_base}")),
            root: s.join("overlay-floor"),
            db: Database::create(s.join("floor-overlay.redb"))?,
        }),
    };
    println!("activate: state on {}, btrfs volumes on a loop btrfs, overlay volumes beside the state", dir.display());

    let mut next = 0u64;
    let mut released = Vec::new();
    for side in [&btrfs, &overlay] {
        let (ours, floors, names) = sequential(&rt, side, &mut next)?;
        report::ratio(
            "activate",
            &format!("ratio_vs_floor_{}", side.name),
            ms(percentile(&ours, 0.5)) / ms(percentile(&floors, 0.5)),
            Goal::AtMost(1.15),
        );
        report::ratio(
            "activate",
            &format!("p99_ratio_{}", side.name),
            ms(percentile(&ours, 0.99)) / ms(percentile(&floors, 0.99)),
            Goal::AtMost(1.5),
        );
        released.push(release_p99(&rt, side, &names)?);
    }
    let btrfs_concurrent = concurrent(&rt, &btrfs, &mut next)?;
    let overlay_concurrent = concurrent(&rt, &overlay, &mut next)?;
    println!(
        "activate concurrent_ratio_btrfs={btrfs_concurrent:.2} (beside overlay's; btrfs's snapshot commits serialise in the kernel)"
    );
    report::ratio("activate", "concurrent_ratio_overlay", overlay_concurrent, Goal::AtLeast(1.0));
    println!(
        "activate release_p99_ms_overlay={:.2} (release_p99_ms_btrfs={:.2} beside it; {ACTIVATIONS} releases one at a time, each to the volume's deletion and its record)",
        released[1], released[0]
    );

    size_ratio(&rt, &overlay, s)?;
    gc_p99(&rt, &btrfs.host, btrfs.floor.as_ref(), btrfs.base, &mut next)?;
    rt.block_on(btrfs.host.close());
    rt.block_on(overlay.host.close());
    drop(rt);

    syncs(dir, &fs.mount)?;
    report::peak_rss("activate");
    Ok(())
}

/// One at a time, in rounds alternating which side goes first: (ours, floor) sorted, and the
/// invocations activated.
fn sequential(
    rt: &tokio::runtime::Runtime,
    side: &Side,
    next: &mut u64,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<String>)> {
    let (mut ours, mut floors, mut names) = (Vec::new(), Vec::new(), Vec::new());
    let per_round = ACTIVATIONS / ROUNDS;
    for round in 0..ROUNDS {
        let (mut o, mut f) = (Vec::new(), Vec::new());
        for ours_turn in if report::ours_first(round) { [true, false] } else { [false, true] } {
            for _ in 0..per_round {
                *next += 1;
                let started = Instant::now();
                if ours_turn {
                    let name = format!("bench-{next}");
                    rt.block_on(activate(&side.host, &name, side.base))?;
                    o.push(started.elapsed());
                    names.push(name);
                } else {
                    side.floor.once(*next)?;
                    f.push(started.elapsed());
                }
            }
        }
        o.sort();
        f.sort();
        println!(
            "activate_{}_round{round} first={} ours_p50 {:.3} ms floor_p50 {:.3} ms ratio {:.2}",
            side.name,
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
        "activate_ours_{} p50 {:.3} ms p99 {:.3} ms; floor p50 {:.3} ms p99 {:.3} ms ({ACTIVATIONS} each; floor = bare snapshot + one durable redb commit)",
        side.name,
        ms(percentile(&ours, 0.5)),
        ms(percentile(&ours, 0.99)),
        ms(percentile(&floors, 0.5)),
        ms(percentile(&floors, 0.99))
    );
    Ok((ours, floors, names))
}

/// Releases `names` one at a time; the p99 in ms.
fn release_p99(rt: &tokio::runtime::Runtime, side: &Side, names: &[String]) -> anyhow::Result<f64> {
    let mut took = Vec::new();
    for name in names {
        let started = Instant::now();
        let r = rt.block_on(side.host.pipeline.release("bench", name))?;
        ensure!(matches!(r.outcome, Outcome::Completed(_)), "releasing {name} on {} failed", side.name);
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "activate_release_{} p50 {:.3} ms p99 {:.3} ms ({} releases)",
        side.name,
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        took.len()
    );
    Ok(ms(percentile(&took, 0.99)))
}

/// Sixteen at a time, ours against the floor's threads: the median of the rounds' ratios.
fn concurrent(rt: &tokio::runtime::Runtime, side: &Side, next: &mut u64) -> anyhow::Result<f64> {
    let mut ratios = Vec::new();
    for round in 0..CONCURRENT_ROUNDS {
        let (mut o, mut f) = (0.0, 0.0);
        for ours_turn in if report::ours_first(round) { [true, false] } else { [false, true] } {
            let started = Instant::now();
            if ours_turn {
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for t in 0..CONCURRENCY {
                        let (host, base, first) =
                            (side.host.clone(), side.base, *next + (t * CONCURRENT_PER_TASK) as u64);
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
                            let (floor, first) = (side.floor.clone(), *next + (t * CONCURRENT_PER_TASK) as u64);
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
            *next += (CONCURRENCY * CONCURRENT_PER_TASK) as u64;
        }
        println!(
            "activate_concurrent{CONCURRENCY}_{}_round{round} first={} ours {o:.0}/s floor {f:.0}/s ratio {:.2}",
            side.name,
            report::side(round),
            o / f
        );
        ratios.push(o / f);
    }
    Ok(report::median_of_ratios("activate", &format!("concurrent_ratio_{}", side.name), &ratios))
}

/// A flat family of one layer holding `mib` MiB in 64 KiB files, in `state`'s images.
fn sized_family(state: &Path, family: &str, mib: usize) -> anyhow::Result<()> {
    let dir = state.join("images").join(family);
    std::fs::create_dir_all(&dir)?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(dir.join("layer-1.tar"))?));
    let body: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    for i in 0..mib * 16 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, format!("d{}/f{i}", i % 64), &body[..])?;
    }
    b.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// p50 of `n` activations of `family` (prepared) on `host`.
fn p50_of(rt: &tokio::runtime::Runtime, host: &Arc<worker::host::Host>, family: &str, n: usize) -> anyhow::Result<f64> {
    let base = prepare(rt, host, family)?;
    // The prepare's tree on disk first: the activations are measured, not the writeback of a
    // 200 MiB unpack that would otherwise slow their commits.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let mut took = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        rt.block_on(activate_family(host, family, &format!("{family}-{i}"), base))?;
        took.push(started.elapsed());
    }
    took.sort();
    Ok(ms(percentile(&took, 0.5)))
}

/// Overlay's activation on a 200 MiB tree against a 20 MiB one, with `dir`'s copies beside.
fn size_ratio(rt: &tokio::runtime::Runtime, overlay: &Side, scratch: &Path) -> anyhow::Result<()> {
    let overlay_state = &overlay.host.config.state_dir;
    let dir_state = scratch.join("dir");
    for state in [overlay_state.as_path(), dir_state.as_path()] {
        sized_family(state, "small", 20)?;
        sized_family(state, "large", 200)?;
    }
    let small = p50_of(rt, &overlay.host, "small", SIZE_ACTIVATIONS)?;
    let large = p50_of(rt, &overlay.host, "large", SIZE_ACTIVATIONS)?;
    let (dir_host, _) = host(rt, &dir_state, "dir", &dir_state.join("volumes"), "small")?;
    let dir_small = p50_of(rt, &dir_host, "small", SIZE_ACTIVATIONS_DIR)?;
    let dir_large = p50_of(rt, &dir_host, "large", SIZE_ACTIVATIONS_DIR)?;
    rt.block_on(dir_host.close());
    println!(
        "activate_size overlay p50 {small:.3} ms on 20 MiB, {large:.3} ms on 200 MiB ({SIZE_ACTIVATIONS} each); dir p50 {dir_small:.1} ms on 20 MiB, {dir_large:.1} ms on 200 MiB ({SIZE_ACTIVATIONS_DIR} each: it copies the tree)"
    );
    report::ratio("activate", "overlay_size_ratio", large / small, Goal::AtMost(1.2));
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
    floor: &dyn Floor,
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
    report::ratio("activate", "syncs_per_activation", median as f64, Goal::AtMost(1.0));
    Ok(())
}

/// The child `syncs` traces: a host on `state`, its family prepared, `n` activations (on
/// btrfs, or the backend named; also handy under `strace -f -tt -T` to see where an
/// activation's time goes).
pub fn syncs_child(args: &[String]) -> anyhow::Result<()> {
    let (state, volumes, n, backend) = match args {
        [state, volumes, n] => (state, volumes, n, "btrfs"),
        [state, volumes, n, backend] => (state, volumes, n, backend.as_str()),
        _ => bail!("usage: bench activate-syncs <state> <volumes> <n> [backend, default btrfs]"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (host, base) = host(&rt, &PathBuf::from(state), backend, &PathBuf::from(volumes), "bench")?;
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
