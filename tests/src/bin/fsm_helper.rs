//! Test helper for the engine crash tests: runs N copies of a four-step workflow in one
//! process, recording every side effect in `effects.log`, and prints each outcome as a JSON
//! line. Built with fault points, so `THINPIPE_FAULT` can kill it at a named instant.
//!
//! Steps: `record` (effect), `allocate` (guarded: a snapshot intent in the host store
//! before the "volume" file is created, so it happens exactly once per run), `record2`
//! (effect, with a short await so runs overlap), `finish` (effect).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use thinpipe::fsm::{Engine, EngineConfig, Outcome, RetryPolicy, StepError, StepRequest, Workflow};
use thinpipe::store::Store;

#[derive(Parser)]
struct Args {
    /// Folder holding runs.redb, host.db, effects.log and vols/.
    #[arg(long)]
    state: PathBuf,
    /// Runs `run-0` .. `run-(N-1)`.
    #[arg(long)]
    runs: usize,
    /// Generation tag written with each effect (1 = first process, 2 = after restart).
    #[arg(long)]
    generation: u32,
    /// Delay inside `record2`, so that runs are in flight together.
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
    /// Record each run's start on its own before its first step (the engine's option);
    /// by default the start is committed with the first transition.
    #[arg(long)]
    durable_start: bool,
}

struct Ctx {
    state: PathBuf,
    store: Store,
    generation: u32,
    delay: Duration,
}

impl Ctx {
    fn effect(&self, run: &str, step: &str, detail: &str) -> Result<(), StepError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("effects.log"))
            .map_err(StepError::transient)?;
        // One write(2) per line, so a kill cannot leave half a line.
        let line = format!("{} {run} {step} {detail}\n", self.generation);
        f.write_all(line.as_bytes()).map_err(StepError::transient)?;
        f.sync_data().map_err(StepError::transient)
    }
}

type W = Vec<String>;

fn workflow(ctx: Arc<Ctx>) -> Workflow<u32, W> {
    let policy = RetryPolicy { initial_interval: Duration::from_millis(10), ..RetryPolicy::default() };
    let (c1, c2, c3, c4) = (ctx.clone(), ctx.clone(), ctx.clone(), ctx);
    Workflow::new("crashy", 1)
        .default_policy(policy)
        .step("record", move |req: StepRequest<u32, W>| {
            let ctx = c1.clone();
            async move {
                ctx.effect(&req.run_id, "record", "-")?;
                let mut w = req.w;
                w.push(format!("{}:record", req.run_id));
                Ok(w)
            }
        })
        .step("allocate", move |req: StepRequest<u32, W>| {
            let ctx = c2.clone();
            async move {
                // The guard: the intent row (with its allocated id) is durable before the
                // volume exists, and a re-run finds it instead of allocating again.
                let snap = match ctx
                    .store
                    .intend_snapshot(&req.run_id, "fam", 1, None, None, |id| format!("vol-{id}"))
                    .map_err(StepError::transient)?
                {
                    thinpipe::store::Intent::Recorded(row) => row,
                    thinpipe::store::Intent::Released(row) => return Err(StepError::abort(row.released_message())),
                    thinpipe::store::Intent::BaseUnavailable(why) => return Err(StepError::abort(why)),
                };
                thinpipe::fault::point("helper.after_intent", &req.run_id);
                let vol = ctx.state.join("vols").join(&snap.vol_id);
                match std::fs::OpenOptions::new().write(true).create_new(true).open(&vol) {
                    Ok(f) => {
                        f.sync_all().map_err(StepError::transient)?;
                        ctx.effect(&req.run_id, "allocate", &snap.vol_id)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(StepError::transient(e)),
                }
                let mut w = req.w;
                w.push(format!("{}:allocate:{}", req.run_id, snap.vol_id));
                Ok(w)
            }
        })
        .step("record2", move |req: StepRequest<u32, W>| {
            let ctx = c3.clone();
            async move {
                tokio::time::sleep(ctx.delay).await;
                ctx.effect(&req.run_id, "record2", "-")?;
                let mut w = req.w;
                w.push(format!("{}:record2:{}", req.run_id, req.r));
                Ok(w)
            }
        })
        .step("finish", move |req: StepRequest<u32, W>| {
            let ctx = c4.clone();
            async move {
                ctx.effect(&req.run_id, "finish", "-")?;
                let mut w = req.w;
                w.push(format!("{}:finish", req.run_id));
                Ok(w)
            }
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(args.state.join("vols")).context("creating vols/")?;
    let store = Store::open(args.state.join("host.db"))?;
    // The snapshots' base: one sealed version of family `fam`.
    store.upsert_image("fam", "helper")?;
    let (thinpipe::store::BaseIntent::Ready(base) | thinpipe::store::BaseIntent::Retiring(base)) =
        store.intend_base("fam", "sha256:helper", &[])?;
    store.mark_base_sealed(base.id)?;
    let ctx = Arc::new(Ctx {
        state: args.state.clone(),
        store,
        generation: args.generation,
        delay: Duration::from_millis(args.step_delay_ms),
    });
    let engine = Engine::open(runs_path(&args.state), EngineConfig::default()).await?;
    let wf = workflow(ctx);
    let wf = engine.register(if args.durable_start { wf.with_durable_start() } else { wf })?;
    let report = engine.resume_all().await?;
    eprintln!("resumed {} runs", report.resumed.len());
    let mut waits = Vec::new();
    for i in 0..args.runs {
        let wf = wf.clone();
        waits.push(tokio::spawn(async move {
            let id = format!("run-{i}");
            let out = wf.run(&id, &(i as u32), &vec![format!("init:{id}")]).await;
            (id, out)
        }));
    }
    let mut stdout = std::io::stdout().lock();
    for w in waits {
        let (id, out) = w.await?;
        let line = match out? {
            Outcome::Completed(chain) => serde_json::json!({"id": id, "completed": chain}),
            Outcome::Failed(f) => serde_json::json!({"id": id, "failed": f.to_string()}),
        };
        writeln!(stdout, "{line}")?;
    }
    engine.shutdown().await;
    Ok(())
}

fn runs_path(state: &Path) -> PathBuf {
    state.join("runs.redb")
}
