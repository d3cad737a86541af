//! What decides over time (ARCHITECTURE.md, `lifecycle/`): which version of a family a job
//! uses and when a new one becomes current (`versions.rs`), which bases are garbage and
//! which families to evict when the host fills up (`gc.rs`, `capacity.rs`), and which
//! activations have expired (`expiry.rs`). It decides and starts runs (`retire`, `release`);
//! it never deletes a volume by itself.
//!
//! [`Lifecycle::run`] is the worker's maintenance task: it wakes every `interval`, after a new
//! version became current, and after releases, and then releases expired activations and
//! collects garbage. At start-up, `remount.rs` makes every live snapshot usable again
//! before jobs are taken. When its stop token fires it returns at once, dropping a pass where it
//! stands: the pass commits its decisions one transaction at a time, and the retire and
//! release runs it started belong to the engine, which stops them at shutdown and resumes
//! them at the next start.

mod capacity;
mod expiry;
mod gc;
mod in_use;
pub mod inventory;
mod remount;
mod versions;

use crate::sync::lock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use capacity::{Pressure, Watermarks};
pub use gc::{BaseSummary, GcReport, Kept};
pub use in_use::{Hold, InUse};
pub use remount::Exposed;
pub use versions::{ResolveError, Target, Version, Want};

use crate::pipeline::Pipeline;
use crate::store::{Store, StoreError};
use crate::volume::{Usage, VolumeError};

#[derive(Clone, Debug)]
pub struct Settings {
    pub watermarks: Watermarks,
    /// Live snapshots older than this are released (`None`: never).
    pub max_activation_age: Option<Duration>,
    /// How often the maintenance task runs without being woken.
    pub interval: Duration,
    /// How long a version that was never current is kept after it was prepared or used.
    pub grace: Duration,
    /// How long a family that never became usable (its prepares failed) stays listed.
    pub forget_failed_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            watermarks: Watermarks::default(),
            max_activation_age: None,
            interval: Duration::from_secs(60),
            grace: Duration::from_secs(600),
            forget_failed_after: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// How long a usage measurement is trusted on the job path.
const USAGE_MAX_AGE: Duration = Duration::from_secs(1);

pub struct Lifecycle {
    pipeline: Pipeline,
    pub settings: Settings,
    in_use: InUse,
    wake: tokio::sync::Notify,
    /// One collection pass at a time.
    pass: tokio::sync::Mutex<()>,
    usage: Mutex<Option<(Instant, Usage)>>,
}

impl Lifecycle {
    pub fn new(pipeline: Pipeline, settings: Settings) -> Lifecycle {
        Lifecycle {
            pipeline,
            settings,
            in_use: InUse::default(),
            wake: tokio::sync::Notify::new(),
            pass: tokio::sync::Mutex::new(()),
            usage: Mutex::new(None),
        }
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub fn in_use(&self) -> &InUse {
        &self.in_use
    }

    /// Asks the maintenance task for a pass soon (a version became current, a release ran).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The maintenance task: at once (finishing what a crash interrupted), then every
    /// interval or when woken, until `stop`: releases expired activations and collects
    /// garbage. A failed pass is logged and tried again next time.
    pub async fn run(&self, stop: CancellationToken) {
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(self.settings.interval) => {}
                }
            }
            // A pass is dropped where it stands when `stop` fires: its decisions are
            // committed one transaction at a time, and its runs are durable and resume.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.pass() => {}
            }
        }
    }

    /// One maintenance pass: expired activations, then garbage.
    async fn pass(&self) {
        match self.release_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released expired activations"),
            Err(e) => tracing::warn!(error = %e, "releasing expired activations failed; tried again next pass"),
        }
        match self.collect(false).await {
            Ok(report) if report.did_something() => tracing::info!(
                deleted = report.deleted.len(),
                evicted = ?report.evicted_families,
                blobs = report.blobs_deleted,
                failed = report.failed.len(),
                "garbage collected"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "garbage collection failed; tried again next pass"),
        }
    }

    /// The backend's usage, measured at most [`USAGE_MAX_AGE`] ago.
    pub async fn usage(&self) -> Result<Usage, VolumeError> {
        if let Some((at, usage)) = &*lock(&self.usage)
            && at.elapsed() < USAGE_MAX_AGE
        {
            return Ok(usage.clone());
        }
        self.measure().await
    }

    /// Measures the backend's usage now.
    pub async fn measure(&self) -> Result<Usage, VolumeError> {
        let backend = self.pipeline.context().backend.clone();
        let usage = tokio::task::spawn_blocking(move || backend.usage()).await.map_err(|e| {
            VolumeError::Transient { volume: "usage".into(), detail: format!("the measuring task failed: {e}") }
        })??;
        let m = crate::telemetry::metrics();
        m.capacity_used_percent.record(usage.percent(), &[crate::telemetry::kv("what", "data")]);
        for (of, bytes) in [("used", usage.used_bytes), ("total", usage.total_bytes)] {
            m.volume_bytes.record(bytes, &[crate::telemetry::kv("what", "data"), crate::telemetry::kv("of", of)]);
        }
        if let Some(meta) = usage.metadata_percent() {
            m.capacity_used_percent.record(meta, &[crate::telemetry::kv("what", "metadata")]);
        }
        *lock(&self.usage) = Some((Instant::now(), usage.clone()));
        Ok(usage)
    }

    /// Why new prepares and activations are refused now, if they are.
    pub async fn full(&self) -> Option<String> {
        match self.usage().await {
            Ok(usage) => match self.settings.watermarks.assess(&usage) {
                Pressure::Full(why) => Some(why),
                Pressure::High => {
                    self.wake();
                    None
                }
                Pressure::Normal => None,
            },
            Err(e) => {
                // Not knowing is not full: the job's own volume call reports a real problem.
                tracing::warn!(error = %e, "could not measure the volume storage's usage");
                None
            }
        }
    }

    /// Admits a new prepare or activation: refused with the reason while the host is above
    /// its refusal limit. A refusal wakes the maintenance task, which frees what it can; the
    /// job is not held while it does (space may come back only after the filesystem's next
    /// commit), so a scheduler places it elsewhere or tries again.
    pub async fn admit(&self) -> Result<(), String> {
        match self.full().await {
            None => Ok(()),
            Some(why) => {
                self.wake();
                Err(why)
            }
        }
    }

    fn store(&self) -> Arc<Store> {
        self.pipeline.context().store.clone()
    }
}

/// A lifecycle call that failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("{0}")]
    Task(String),
}

impl From<crate::reconcile::ReconcileError> for LifecycleError {
    fn from(e: crate::reconcile::ReconcileError) -> Self {
        match e {
            crate::reconcile::ReconcileError::Store(e) => Self::Store(e),
            crate::reconcile::ReconcileError::Volume(e) => Self::Volume(e),
        }
    }
}
