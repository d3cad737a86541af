//! The daemon: a host's state, its queues, the job loop and the admin API, run until
//! `shutdown` fires (or the worker lease is lost), then stopped in order: the job loop
//! drains, the admin API stops, the host closes. `signals.rs` turns SIGTERM/SIGINT into
//! `shutdown`; `main.rs` turns the outcome into an exit code.
//!
//! Every task is owned by what started it and ends with it: job tasks, receivers, the
//! maintenance and backlog tasks by the job loop (joined at the drain); a job's visibility
//! heartbeat and its prepare-lease renewer by the job (aborted when it is dropped, an abort at
//! the drain deadline included); the worker-lease renewal and the engine's run tasks by the
//! host (joined by `Host::close`); the admin server by this function. The SQS ack and send
//! batchers end when their queue is dropped; every ack and send is awaited by its job first.

use std::sync::Arc;

use anyhow::Context;
use thinpipe::telemetry::PrometheusMetrics;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::host::Host;

pub mod admin;
pub mod backlog;
pub mod jobloop;
pub mod order;
pub mod receiver;
pub mod signals;

/// Why the daemon stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Told to (`shutdown`, or before it started): drained.
    Drained,
    /// Another process took the worker lease: this one stopped without being told.
    LeaseLost,
    /// The run log's storage failed (a full disk, an I/O error): redb accepts no write until
    /// it is opened again, so the process exits for its supervisor to start it afresh.
    StorageFailed,
}

/// Runs the worker on `config` until `shutdown` fires. `prometheus` is what `/metrics` serves.
pub async fn run(
    config: Config,
    prometheus: Option<PrometheusMetrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<Stopped> {
    // A fresh host: the state directory (which holds the embedded queue) is made here, as
    // `run` and `demo` make it.
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating the state directory {}", config.state_dir.display()))?;
    let queues = crate::host::open_queues(&config).await?;
    let host = tokio::select! {
        host = Host::open(config.clone()) => Arc::new(host?),
        _ = shutdown.cancelled() => {
            tracing::info!("signal received before the worker started (while opening its state): exiting");
            return Ok(Stopped::Drained);
        }
    };
    let described: Vec<String> = queues.iter().map(|q| q.describe()).collect();
    tracing::info!(
        host_id = %config.worker.host_id,
        state_dir = %config.state_dir.display(),
        queues = %described.join(", "),
        "worker started"
    );
    let job_loop = crate::daemon::jobloop::JobLoop::new(host.clone(), queues);
    let admin_stop = CancellationToken::new();
    let admin = if config.admin.listen.is_empty() {
        None
    } else {
        match admin::serve(host.clone(), job_loop.clone(), prometheus, admin_stop.clone()).await {
            Ok((_, server)) => Some(server),
            Err(e) => {
                host.close().await;
                return Err(e);
            }
        }
    };
    let report = job_loop.run(shutdown).await;
    // The admin API answers until the jobs are drained, then stops with the process.
    admin_stop.cancel();
    if let Some(server) = admin {
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "the admin API task ended abnormally");
        }
        let addr_file = config.state_dir.join(thinpipe::admin::ADDR_FILE);
        if let Err(e) = std::fs::remove_file(&addr_file) {
            tracing::warn!(path = %addr_file.display(), error = %e, "could not remove the admin address file");
        }
    }
    host.close().await;
    let report = report?;
    tracing::info!(handled = report.handled, released = report.released_at_drain, "worker stopped");
    Ok(if host.lease_lost.is_cancelled() {
        Stopped::LeaseLost
    } else if let Some(fault) = host.engine.storage_fault() {
        tracing::error!(%fault, "exiting so that the worker starts again with its run log opened afresh");
        Stopped::StorageFailed
    } else {
        Stopped::Drained
    })
}
