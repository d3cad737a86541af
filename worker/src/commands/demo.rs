//! `worker demo`: the main job on embedded defaults. Builds the sample family if absent,
//! enqueues one prepare and two activations on the embedded queue, runs the job loop
//! until their results arrive, prints each snapshot's path and run id, and stops. The
//! snapshots are kept for a look (an hour's time to live: a worker started on the state
//! directory releases them after that) and the commands that release them now are printed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use thinpipe::image::write_sample_family;
use thinpipe::job::{Job, JobKind, JobResult, JobStatus};
use thinpipe::queue::{EmbeddedQueue, JobQueue};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::jobloop::JobLoop;
use crate::host::Host;

pub const DEMO_FAMILY: &str = "demo";
/// How long the demo's snapshots live unless released before.
const DEMO_TTL_SECS: u64 = 3600;

/// Runs the demo; `Ok(true)` if every job succeeded. With `json`, stdout carries one JSON
/// object (the results and the release commands) and the narration goes to stderr.
pub async fn run(mut config: Config, json: bool) -> anyhow::Result<bool> {
    // The narration: for a person on stdout, beside the JSON on stderr.
    let say = |line: String| if json { eprintln!("{line}") } else { println!("{line}") };
    if !thinpipe::image::running_as_root() && !config.images.rootless {
        // The sample's files belong to root, which only root can keep: the demo says what it does.
        config.images.rootless = true;
        say("not running as root: the demo sets images.rootless = true (files owned by you, no setuid/setgid bits)"
            .into());
    }
    let images = config.source_dir()?;
    let wrote = write_sample_family(&images, DEMO_FAMILY)?;
    say(format!(
        "{} sample family {DEMO_FAMILY:?} in {}",
        if wrote { "built the" } else { "using the existing" },
        images.join("images").join(DEMO_FAMILY).display()
    ));
    let host = Arc::new(Host::open(config.clone()).await?);
    let q = &config.queue;
    let queue = EmbeddedQueue::open(&q.path, &q.name, Duration::from_secs(q.visibility_timeout_secs), q.max_receives)?;
    // Invocation ids are single use: two demos in one second must not share them.
    let stamp =
        format!("{}-{}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_micros(), std::process::id());
    let reply_to = format!("demo-results-{stamp}-{}", std::process::id());
    let activate = |n: u32| {
        Job {
            ttl_secs: Some(DEMO_TTL_SECS),
            ..Job::new(JobKind::Activate, DEMO_FAMILY, Some(&format!("demo-{stamp}-{n}")))
        }
        .versioned()
    };
    let jobs = [Job::new(JobKind::Prepare, DEMO_FAMILY, None), activate(1), activate(2)];
    for mut job in jobs.clone() {
        job.reply_to = Some(reply_to.clone());
        queue.send(&q.name, &job.to_json(), &BTreeMap::new()).await?;
    }
    say(format!("enqueued {} jobs on {}", jobs.len(), queue.describe()));

    let shutdown = CancellationToken::new();
    let job_loop = JobLoop::new(host.clone(), vec![Arc::new(queue.clone())]);
    let runner = {
        let (job_loop, shutdown) = (job_loop.clone(), shutdown.clone());
        tokio::spawn(async move { job_loop.run(shutdown).await })
    };

    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} jobs {msg} ({elapsed})")
            .context("progress template")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let replies = queue.named(&reply_to);
    let mut results: Vec<JobResult> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let board = host.pipeline.context().progress.clone();
    while results.len() < jobs.len() {
        // The step running now, and its bytes when it moves some.
        if let Some(p) = board.current().first() {
            let bytes = if p.total_bytes > 0 {
                format!(" {}/{}", indicatif::HumanBytes(p.done_bytes), indicatif::HumanBytes(p.total_bytes))
            } else {
                String::new()
            };
            bar.set_message(format!("{}{bytes} ({})", p.step, p.run_id));
        }
        if tokio::time::Instant::now() > deadline {
            bar.abandon_with_message("timed out");
            shutdown.cancel();
            bail!("the demo's jobs did not finish within 10 minutes; see the log above");
        }
        for d in replies.receive(10, Duration::from_millis(200)).await? {
            let result: JobResult = serde_json::from_str(&d.body).context("decoding a result")?;
            bar.set_message(format!("{} {}", result.kind, result.run_id));
            bar.inc(1);
            replies.ack(&d).await?;
            results.push(result);
        }
    }
    bar.finish_with_message("done");
    shutdown.cancel();
    runner.await.context("job loop task")??;
    host.close().await;

    results.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    let ok = results.iter().all(|r| r.status == JobStatus::Succeeded);
    let releases: Vec<String> = results
        .iter()
        .filter(|r| r.kind == JobKind::Activate && r.status == JobStatus::Succeeded)
        .filter_map(|r| r.invocation_id.as_deref())
        .map(|inv| {
            format!(
                "worker --state-dir {} run release --family {DEMO_FAMILY} --invocation-id {inv}",
                config.state_dir.display()
            )
        })
        .collect();
    if json {
        let out = serde_json::json!({"ok": ok, "results": results, "release_commands": releases});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ok);
    }
    println!();
    for r in &results {
        let status = if r.status == JobStatus::Succeeded { "ok" } else { "FAILED" };
        let what =
            r.snapshot_path.as_deref().map_or_else(|| format!("base-{}", r.base_vol_id.unwrap_or(0)), |p| p.to_owned());
        println!("{status:6} {:8} run {:28} {}", r.kind.to_string(), r.run_id, r.error.as_deref().unwrap_or(&what));
    }
    println!("\nrun log: {}   host db: {}", config.runs_path().display(), config.host_db_path().display());
    if !releases.is_empty() {
        println!(
            "\nThe snapshots are released after an hour by the next worker on {}, or now with:",
            config.state_dir.display()
        );
        for command in &releases {
            println!("  {command}");
        }
    }
    Ok(ok)
}
