//! `bench activate`: activation latency on the btrfs backend — from a job's activation
//! starting to its snapshot being ready (the queue excluded: `Pipeline::activate` on a
//! prepared family) — p50 and p99 over 200 activations, beside the floor measured in the
//! same run on the same filesystem: the bare snapshot ioctl plus one durable redb commit.
//! Prints `activate ratio_vs_floor=<p50 ours / p50 floor>` (target <= 1.5). Needs root
//! (a loop-mounted btrfs); prints a skip line otherwise.

use std::ffi::CString;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use redb::{Database, Durability, TableDefinition};
use thinpipe::fsm::Outcome;
use thinpipe::volume::btrfs_ioctl;

const ACTIVATIONS: usize = 200;
const ROUNDS: usize = 4;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
    let state = state_dir.path().join("state");
    thinpipe::image::write_sample_family(&state, "bench")?;
    let sets = [
        format!("state_dir={}", state.display()),
        "backend=btrfs".to_owned(),
        format!("volumes_dir={}", fs.mount.join("volumes").display()),
    ];
    let config = worker::config::Config::load(None, [], &sets)?;
    let host = Arc::new(rt.block_on(worker::host::Host::open(config))?);
    let base = match rt.block_on(host.pipeline.prepare("bench"))? {
        Outcome::Completed(w) => w.base_vol_id.context("prepare gave no base")?,
        Outcome::Failed(f) => bail!("preparing the bench family failed: {f}"),
    };

    // The floor: the same snapshot ioctl and one durable commit, nothing else.
    let base_dir = std::fs::File::open(fs.mount.join(format!("volumes/bases/base-{base}")))?;
    std::fs::create_dir_all(fs.mount.join("floor"))?;
    let floor_dir = std::fs::File::open(fs.mount.join("floor"))?;
    let db = Database::create(state_dir.path().join("floor.redb"))?;
    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    let per_round = ACTIVATIONS / ROUNDS;
    for round in 0..ROUNDS {
        for i in 0..per_round {
            let n = round * per_round + i;
            let started = Instant::now();
            match rt.block_on(host.pipeline.activate("bench", &format!("bench-{n}"), base))? {
                Outcome::Completed(_) => ours.push(started.elapsed()),
                Outcome::Failed(f) => bail!("activation {n} failed: {f}"),
            }
        }
        for i in 0..per_round {
            let n = (round * per_round + i) as u64;
            let started = Instant::now();
            btrfs_ioctl::snapshot_create(&floor_dir, &CString::new(format!("s{n}"))?, &base_dir, false)?;
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.open_table(T)?.insert(n, n)?;
            txn.commit()?;
            floor.push(started.elapsed());
        }
    }
    rt.block_on(host.close());
    ours.sort();
    floor.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "activate_ours_btrfs p50 {:.2} ms p99 {:.2} ms ({ACTIVATIONS} activations; state on {}, volumes on a loop btrfs)",
        ms(percentile(&ours, 0.5)),
        ms(percentile(&ours, 0.99)),
        dir.display()
    );
    println!(
        "activate_floor_btrfs p50 {:.2} ms p99 {:.2} ms (snapshot ioctl + one durable redb commit)",
        ms(percentile(&floor, 0.5)),
        ms(percentile(&floor, 0.99))
    );
    println!("activate ratio_vs_floor={:.2}", ms(percentile(&ours, 0.5)) / ms(percentile(&floor, 0.5)));
    Ok(())
}
