//! `bench fsm`: (1) the raw floor, redb single-insert commits/s with `Durability::Immediate`;
//! (2) durable transitions/s of one run stepping sequentially; (3) durable transitions/s
//! with 64 runs stepping concurrently (group commit); (4) the like-for-like floor of (3): raw
//! redb committing as many inserts per transaction as (3)'s mean batch, in rows/s. Targets:
//! (2)/(1) >= 0.8, (3)/(1) >= 3, (3)/(4) >= 0.5.

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use redb::{Database, Durability, TableDefinition};
use thinpipe::fsm::{Engine, EngineConfig, Outcome, Workflow};

use crate::report::{self, Goal};

const ROUNDS: usize = 8;
const RAW_COMMITS: u64 = 1000;
const SEQ_STEPS: usize = 1000;
const CONCURRENT_RUNS: usize = 64;
const CONCURRENT_STEPS: usize = 100;

/// The disk's fsync time drifts by tens of percent from second to second here, so the
/// figures are measured in interleaved rounds (alternating whether ours or the floors go
/// first): each figure is the median of its rounds, each ratio the median of the per-round
/// ratios.
pub fn run(base: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut raw, mut seq, mut conc, mut batched) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut r_seq, mut r_conc, mut r_batched) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let floors = |batch: f64| -> anyhow::Result<(f64, f64)> {
            Ok((raw_commits_per_sec(base, 1)?, raw_commits_per_sec(base, batch.round().max(1.0) as u64)?))
        };
        // The batched floor's batch size is ours measured in the same round, so ours runs
        // first there; the other floor alternates.
        let (r, s, c, commits, b);
        if report::ours_first(round) {
            s = rt.block_on(transitions_per_sec(base, 1, SEQ_STEPS))?.0;
            (c, commits) = rt.block_on(transitions_per_sec(base, CONCURRENT_RUNS, CONCURRENT_STEPS))?;
            (r, b) = floors(transitions_per_commit(commits))?;
        } else {
            r = raw_commits_per_sec(base, 1)?;
            s = rt.block_on(transitions_per_sec(base, 1, SEQ_STEPS))?.0;
            (c, commits) = rt.block_on(transitions_per_sec(base, CONCURRENT_RUNS, CONCURRENT_STEPS))?;
            b = floors(transitions_per_commit(commits))?.1;
        }
        let per_commit = transitions_per_commit(commits);
        println!(
            "fsm_round{round} first={} raw {r:.0}/s seq {s:.0}/s concurrent64 {c:.0}/s ({per_commit:.1} per commit) raw_batched{:.0} {b:.0} rows/s",
            report::side(round),
            per_commit.round()
        );
        r_seq.push(s / r);
        r_conc.push(c / r);
        r_batched.push(c / b);
        raw.push(r);
        seq.push(s);
        conc.push(c);
        batched.push(b);
    }
    println!("fsm_raw_redb_commit {:.0} commits/s (median of rounds)", median(raw));
    println!("fsm_sequential_transitions {:.0} transitions/s", median(seq));
    println!("fsm_concurrent64_transitions {:.0} transitions/s", median(conc));
    println!("fsm_raw_redb_batched {:.0} rows/s (inserts per commit = concurrent64's mean batch)", median(batched));
    let ratio_seq = report::median_of_ratios("fsm", "ratio_seq", &r_seq);
    let ratio_conc = report::median_of_ratios("fsm", "ratio_concurrent", &r_conc);
    let ratio_batched = report::median_of_ratios("fsm", "ratio_batched", &r_batched);
    report::ratio("fsm", "ratio_seq", ratio_seq, Goal::AtLeast(0.8));
    report::ratio("fsm", "ratio_concurrent", ratio_conc, Goal::AtLeast(3.0));
    report::ratio("fsm", "ratio_batched", ratio_batched, Goal::AtLeast(0.5));
    report::peak_rss("fsm");
    Ok(())
}

fn transitions_per_commit(commits: u64) -> f64 {
    (CONCURRENT_RUNS * CONCURRENT_STEPS) as f64 / commits.max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    report::median_f(&v)
}

/// Rows per second of raw redb, `per_commit` inserts per durable commit (1: commits/s).
fn raw_commits_per_sec(base: &Path, per_commit: u64) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir_in(base)?;
    let db = Database::create(dir.path().join("raw.redb"))?;
    let table: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
    let value = [7u8; 64];
    let start = Instant::now();
    for i in 0..RAW_COMMITS {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut t = txn.open_table(table)?;
            for k in 0..per_commit {
                t.insert(i * per_commit + k, value.as_slice())?;
            }
        }
        txn.commit()?;
    }
    Ok((RAW_COMMITS * per_commit) as f64 / start.elapsed().as_secs_f64())
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
