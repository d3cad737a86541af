//! thinpipe benchmarks. Each figure is printed beside its baseline measured in the same run,
//! on the same disk, as `name value unit`, and each benchmark ends with a ratio line.
//!
//! `bench fsm`: (1) the raw floor, redb single-insert commits/s with `Durability::Immediate`;
//! (2) durable transitions/s of one run stepping sequentially; (3) durable transitions/s
//! with 64 runs stepping concurrently (group commit). Targets: (2)/(1) >= 0.8, (3)/(1) >= 3.
//!
//! `bench unpack`: the same uncompressed layer (>= 200 MB, many small files) applied by our
//! code and by GNU `tar -x` into the same filesystem; prints both times and
//! `unpack ratio_vs_tar=<ours/tar>` (target <= 1.25). Then the worker's peak RSS while
//! preparing a family with a 1 GiB layer (target <= 64 MiB: blobs are streamed).
//!
//! `bench sqs`: see `sqs.rs` (jobs/s through SQS beside a boto3 consumer; idle requests).
//!
//! `bench activate`: see `activate.rs` (activation latency on btrfs beside the snapshot
//! ioctl plus one durable commit; root).
//!
//! Scratch files go under `$BENCH_DIR` (default `target/bench`), on the disk the state
//! directory would use, never on a tmpfs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use redb::{Database, Durability, TableDefinition};
use thinpipe::fsm::{Engine, EngineConfig, Outcome, Workflow};

mod activate;
mod sqs;
mod unpack;

const ROUNDS: usize = 9;
const RAW_COMMITS: u64 = 1000;
const SEQ_STEPS: usize = 1000;
const CONCURRENT_RUNS: usize = 64;
const CONCURRENT_STEPS: usize = 100;

fn main() -> anyhow::Result<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    if which.is_empty() {
        bail!("usage: bench fsm|unpack|sqs|activate ...");
    }
    let base = std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    for name in which {
        match name.as_str() {
            "fsm" => fsm(&base)?,
            "unpack" => unpack::run(&base)?,
            "sqs" => sqs::run(&base)?,
            "activate" => activate::run(&base)?,
            other => bail!("unknown benchmark {other:?}: expected fsm, unpack, sqs or activate"),
        }
    }
    Ok(())
}

/// The disk's fsync time drifts by tens of percent from second to second here, so the
/// three figures are measured in interleaved rounds: each figure is the median of its
/// rounds, each ratio the median of the per-round ratios.
fn fsm(base: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut raw, mut seq, mut conc, mut conc_commits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        raw.push(raw_commits_per_sec(base)?);
        seq.push(rt.block_on(transitions_per_sec(base, 1, SEQ_STEPS))?.0);
        let (c, commits) = rt.block_on(transitions_per_sec(base, CONCURRENT_RUNS, CONCURRENT_STEPS))?;
        conc.push(c);
        conc_commits.push(commits as f64);
    }
    // Ratios pair each figure with the floor measured in the same round, so the drift
    // between rounds cancels; each reported ratio is the median of the rounds' ratios.
    let ratio_seq = median(seq.iter().zip(&raw).map(|(s, r)| s / r).collect());
    let ratio_conc = median(conc.iter().zip(&raw).map(|(c, r)| c / r).collect());
    let (raw, seq, conc) = (median(raw), median(seq), median(conc));
    println!("fsm_raw_redb_commit {raw:.0} commits/s");
    println!("fsm_sequential_transitions {seq:.0} transitions/s");
    println!("fsm_concurrent64_transitions {conc:.0} transitions/s");
    let transitions = (CONCURRENT_RUNS * CONCURRENT_STEPS) as f64;
    println!("fsm_concurrent64_transitions_per_commit {:.1} transitions/commit", transitions / median(conc_commits));
    println!("fsm ratio_seq={ratio_seq:.2} ratio_concurrent={ratio_conc:.2}");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn raw_commits_per_sec(base: &Path) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir_in(base)?;
    let db = Database::create(dir.path().join("raw.redb"))?;
    let table: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let value = [7u8; 64];
    let start = Instant::now();
    for i in 0..RAW_COMMITS {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        txn.open_table(table)?.insert(i, value.as_slice())?;
        txn.commit()?;
    }
    Ok(RAW_COMMITS as f64 / start.elapsed().as_secs_f64())
}

/// `runs` runs of a `steps`-step workflow, all started together; transitions per second
/// from the first start to the last completion, and the commits they took.
async fn transitions_per_sec(base: &Path, runs: usize, steps: usize) -> anyhow::Result<(f64, u64)> {
    let dir = tempfile::tempdir_in(base)?;
    let config = EngineConfig { prune_interval: None, ..EngineConfig::default() };
    let engine = Engine::open(dir.path().join("runs.redb"), config).await?;
    let mut wf = Workflow::<u32, u64>::new("bench", 1);
    for i in 0..steps {
        // Step names are &'static: leaking a few thousand short strings once is fine here.
        let name: &'static str = Box::leak(format!("s{i}").into_boxed_str());
        wf = wf.step(name, |req| async move { Ok(req.w + 1) });
    }
    let wf = engine.register(wf)?;
    let commits_before = engine.commit_count();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(runs);
    for r in 0..runs {
        let wf = wf.clone();
        tasks.push(tokio::spawn(async move { wf.run(&format!("run-{r}"), &0, &0).await }));
    }
    for t in tasks {
        match t.await?? {
            Outcome::Completed(n) if n == steps as u64 => {}
            other => bail!("bench run ended wrong: {other:?}"),
        }
    }
    let elapsed = start.elapsed();
    let commits = engine.commit_count() - commits_before;
    engine.shutdown().await;
    Ok(((runs * steps) as f64 / elapsed.as_secs_f64(), commits))
}
