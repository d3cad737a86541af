//! Opening a host's state: the worker lease, the run log, the host database, the blob
//! cache, the volume backend and the pipeline, from the configuration.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use thinpipe::admin::wire::BackendChoice;
use thinpipe::fsm::{Engine, EngineConfig, OpenError};
use thinpipe::image::{ApplyOptions, BlobCache, BlobSource, EcrLogins, LocalDir, RegistrySource, S3Source};
use thinpipe::lifecycle::Lifecycle;
use thinpipe::pipeline::{Pipeline, PipelineContext};
use thinpipe::store::{Acquired, Binding, Checkpoint, Holder, SnapshotState, Store, StoreOptions};
use thinpipe::volume::{
    BtrfsBackend, DirBackend, DmThinBackend, DmThinOptions, OverlayBackend, OverlayOptions, Traced, VolumeBackend,
    VolumeId,
};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendKind, Config, QueueKind, SourceSpec};

/// The lease that makes one worker process the owner of a state directory.
const WORKER_LEASE: &str = "worker";

pub struct Host {
    pub config: Config,
    /// The volume backend in use, and why.
    pub backend_choice: BackendChoice,
    pub engine: Engine,
    pub store: Arc<Store>,
    pub pipeline: Pipeline,
    /// Versions, garbage collection, capacity and expiry.
    pub lifecycle: Arc<Lifecycle>,
    /// Fires if the worker lease is lost: the process must stop.
    pub lease_lost: CancellationToken,
    /// Stops the lease renewal at close.
    closing: CancellationToken,
    /// The lease renewal task, awaited at close.
    renewal: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Host {
    pub async fn open(config: Config) -> anyhow::Result<Host> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating the state directory {}", config.state_dir.display()))?;
        // The worker commits intents on the job path: WAL checkpoints run beside it, not in them.
        let options = StoreOptions {
            checkpoint: Checkpoint::Background { every: Duration::from_secs(1) },
            ..StoreOptions::default()
        };
        let store = Arc::new(Store::open_with(config.host_db_path(), &options)?);
        // Settings naming other volumes than the host's are refused before anything is taken.
        let (backend, backend_choice) = open_volumes(&config, &store)?;
        tracing::info!(backend = %backend_choice.name, why = %backend_choice.why, "volume backend");
        let ttl = Duration::from_secs(config.worker.lease_ttl_secs);
        let engine = take_state(&config, &store, ttl).await?;
        let source: Arc<dyn BlobSource> = match config.source_spec()? {
            SourceSpec::S3(url) => {
                let opts = config.aws.options();
                let sdk = thinpipe::aws::sdk_config(&opts).await;
                let endpoint = thinpipe::aws::endpoint_description(&sdk);
                Arc::new(S3Source::new(thinpipe::aws::s3_client(&sdk, &opts), &url)?.with_endpoint(endpoint))
            }
            SourceSpec::Dir(path) => Arc::new(LocalDir::new(path).with_memo(store.clone())),
            SourceSpec::Registry(template) => {
                let policy = Arc::new(config.registry.policy()?);
                let mut options = config.registry.options()?;
                options.ecr = Some(EcrLogins::new(config.aws.options(), config.registry.ecr_hosts.clone()));
                Arc::new(RegistrySource::new(template, options)?.with_signatures(policy, store.clone()))
            }
        };
        let cache = BlobCache::open(config.blob_cache_dir())?
            .with_stall_timeout(Duration::from_secs(config.images.stall_timeout_secs));
        let apply = ApplyOptions {
            max_layer_bytes: config.images.max_layer_bytes,
            devices: config.images.device_policy(),
            rootless: config.images.rootless,
            // A layer may fill the volumes up to the refusal watermark, not past it.
            refuse_percent: Some(config.capacity.refuse_percent),
            ..ApplyOptions::default()
        };
        let ctx = PipelineContext {
            store: store.clone(),
            backend,
            cache,
            source,
            apply,
            prepare: config.images.prepare_settings(),
            invocations: Default::default(),
            host_id: Some(config.worker.host_id.clone()),
            progress: Default::default(),
        };
        let pipeline = Pipeline::register(&engine, ctx)?;
        let lifecycle = Arc::new(Lifecycle::new(pipeline.clone(), config.lifecycle_settings()));
        // Before any run resumes: a snapshot id whose binding a power loss took is resolved.
        let resolved = pipeline.resolve_reserved_ids().await.context("resolving reserved snapshot ids")?;
        if resolved != Default::default() {
            tracing::warn!(restored = ?resolved.restored, deleted = ?resolved.deleted, "resolved reserved snapshot ids a power loss left with volumes");
        }
        // Mounts do not outlive a reboot: every live snapshot is usable again before a job is.
        let exposed = lifecycle.expose_live().await.context("exposing the live snapshots again")?;
        if exposed.usable > 0 || !exposed.lost.is_empty() || !exposed.failed.is_empty() {
            tracing::info!(usable = exposed.usable, lost = ?exposed.lost, failed = ?exposed.failed, "live snapshots checked at start-up");
        }
        let lease_lost = CancellationToken::new();
        let closing = CancellationToken::new();
        let renewal = spawn_lease_renewal(store.clone(), ttl, lease_lost.clone(), closing.clone(), engine.clone());
        let renewal = std::sync::Mutex::new(Some(renewal));
        Ok(Host { config, backend_choice, engine, store, pipeline, lifecycle, lease_lost, closing, renewal })
    }

    /// Stops the engine (runs stay resumable) and gives the worker lease back, but only
    /// once no step body runs: the engine's shutdown tells each step to stop and waits for
    /// their blocking work (`fsm/stop.rs`), up to the drain deadline. If one is still
    /// running then (stuck in the kernel, say), the lease is kept: it expires by itself
    /// after the process (and the step with it) has exited, so no other worker can start on
    /// this state directory while a step of this one still writes.
    pub async fn close(&self) {
        // The lease is renewed while the steps stop: it must not expire under them.
        let grace = Duration::from_secs(self.config.worker.drain_deadline_secs);
        let stopped = tokio::time::timeout(grace, self.engine.shutdown()).await.is_ok();
        self.closing.cancel();
        let renewal = thinpipe::sync::lock(&self.renewal).take();
        if let Some(renewal) = renewal
            && let Err(e) = renewal.await
        {
            tracing::warn!(error = %e, "the worker lease renewal ended abnormally");
        }
        if !stopped {
            tracing::error!(
                waited_secs = grace.as_secs(),
                "a step is still running after the engine was told to stop; the worker lease is kept (it expires after this process exits) so that no worker starts on this state directory while the step writes"
            );
            return;
        }
        match self.store.call(|s| s.release_lease(WORKER_LEASE, Holder::this_process())).await {
            Ok(_) => tracing::debug!("worker lease released"),
            Err(e) => tracing::warn!(error = %e, "could not release the worker lease; it expires by itself"),
        }
    }
}

/// Takes the worker lease and opens the run log. Another live worker makes this refuse
/// (naming it), or, with `worker.wait_for_state`, wait: for its lease to expire, then for
/// its run log to be free (a stalled holder notices the lost lease when it wakes and stops).
async fn take_state(config: &Config, store: &Arc<Store>, ttl: Duration) -> anyhow::Result<Engine> {
    let me = Holder::this_process();
    let wait = config.worker.wait_for_state;
    let poll = ttl / 3;
    let mut told = false;
    loop {
        let acquired = store
            .call(move |s| s.acquire_lease_reclaiming(WORKER_LEASE, me, ttl))
            .await
            .context("taking the worker lease")?;
        match acquired {
            Acquired::Yes => break,
            Acquired::TookOver { from } => {
                thinpipe::telemetry::metrics().lease_takeovers.add(1, &[thinpipe::telemetry::kv("lease", "worker")]);
                tracing::warn!(previous = %from, "took over the worker lease of a process that is gone or stalled past its lease");
                break;
            }
            Acquired::HeldBy(holder) if !wait => bail!(
                "the state directory {} is in use by worker {holder}; stop it first, use another --state-dir, or set worker.wait_for_state=true to wait for it",
                config.state_dir.display()
            ),
            Acquired::HeldBy(holder) => {
                if !told {
                    tracing::warn!(%holder, "the state directory is in use; waiting for that worker's lease to end");
                    told = true;
                }
                tokio::time::sleep(poll).await;
            }
        }
    }
    let engine_config = EngineConfig {
        retention: Duration::from_secs(config.engine.retention_days * 24 * 3600),
        ..EngineConfig::default()
    };
    loop {
        match Engine::open(config.runs_path(), engine_config.clone()).await {
            Ok(e) => return Ok(e),
            Err(e @ OpenError::AlreadyOpen { .. }) if !wait => {
                bail!("{e} (the worker lease was free, so the holder is not a thinpipe worker of this state directory)")
            }
            Err(OpenError::AlreadyOpen { .. }) => {
                // The previous holder still runs (stalled); keep our lease while it notices.
                store
                    .call(move |s| s.renew_lease(WORKER_LEASE, me, ttl))
                    .await
                    .context("the worker lease was taken while waiting for the run log")?;
                tracing::info!("waiting for the previous worker to release the run log");
                tokio::time::sleep(poll).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn spawn_lease_renewal(
    store: Arc<Store>,
    ttl: Duration,
    lost: CancellationToken,
    closing: CancellationToken,
    engine: Engine,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = closing.cancelled() => return,
                _ = tokio::time::sleep(ttl / 3) => {}
            }
            match store.call(move |s| s.renew_lease(WORKER_LEASE, Holder::this_process(), ttl)).await {
                Ok(()) => {}
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "renewing the worker lease failed; retrying")
                }
                Err(e) => {
                    tracing::error!(error = %e, "lost the worker lease: another process may own this state directory; stopping");
                    lost.cancel();
                    engine.shutdown().await;
                    return;
                }
            }
        }
    })
}

/// The job queues the configuration names (one, or several SQS queues).
pub async fn open_queues(config: &Config) -> anyhow::Result<Vec<Arc<dyn thinpipe::queue::JobQueue>>> {
    let q = &config.queue;
    let visibility = Duration::from_secs(q.visibility_timeout_secs);
    Ok(match q.kind {
        QueueKind::Sqs => {
            let sdk = thinpipe::aws::sdk_config(&config.aws.options()).await;
            let client = thinpipe::aws::sqs_client(&sdk);
            config
                .queue_urls()
                .into_iter()
                .map(|queue_url| {
                    let settings = thinpipe::queue::SqsSettings {
                        queue_url,
                        dead_letter_url: (!q.dead_letter_url.is_empty()).then(|| q.dead_letter_url.clone()),
                        visibility,
                    };
                    Arc::new(thinpipe::queue::SqsQueue::new(client.clone(), settings))
                        as Arc<dyn thinpipe::queue::JobQueue>
                })
                .collect()
        }
        QueueKind::Embedded => {
            vec![Arc::new(thinpipe::queue::EmbeddedQueue::open(&q.path, &q.name, visibility, q.max_receives)?)]
        }
    })
}

/// The configured volume backend (or, with `backend = "auto"`, the chosen one), checked
/// against where the host database says this host's volumes live (recorded at first use): a
/// command whose settings name another backend, volume directory or filesystem is refused
/// before it touches a volume.
pub fn open_volumes(config: &Config, store: &Store) -> anyhow::Result<(Arc<dyn VolumeBackend>, BackendChoice)> {
    let choice = choose_backend(config, store)?;
    let backend = open_backend(config, &choice)?;
    check_place(config, store, backend.as_ref())?;
    Ok((backend, choice))
}

/// The backend to use: the configured one; with `backend = "auto"`, the one the host's
/// volumes were made with if it has any (a host never changes backend under its volumes),
/// else the fastest this host supports: dm-thin if a pool is configured, btrfs if the
/// volume directory is on btrfs (and this process is root), overlay if overlayfs mounts there
/// (tried), `dir` last.
pub fn choose_backend(config: &Config, store: &Store) -> anyhow::Result<BackendChoice> {
    let chosen = |kind: BackendKind, why: String| {
        let snapshot_size_limit = match kind {
            BackendKind::Dmthin => format!("{} bytes (dmthin.volume_bytes)", config.dmthin.volume_bytes),
            BackendKind::Overlay if config.overlay.snapshot_bytes > 0 => {
                format!("{} bytes (overlay.snapshot_bytes, an XFS project quota per snapshot)", config.overlay.snapshot_bytes)
            }
            BackendKind::Overlay => {
                "none: overlay snapshots share the volume filesystem (set overlay.snapshot_bytes with volumes_dir on XFS mounted with prjquota for a limit per snapshot)".to_owned()
            }
            _ => "none of its own: snapshots share the volume filesystem".to_owned(),
        };
        BackendChoice { name: kind.as_str().to_owned(), why, snapshot_size_limit }
    };
    if config.backend != BackendKind::Auto {
        return Ok(chosen(config.backend, "configured (backend setting)".to_owned()));
    }
    if has_volumes(store)? {
        let Some(place) = store.volume_place()? else {
            // Recorded before places were: those hosts ran the old default.
            return Ok(chosen(
                BackendKind::Dir,
                "the host's volumes predate recorded places (made with dir)".to_owned(),
            ));
        };
        let kind = [BackendKind::Dir, BackendKind::Overlay, BackendKind::Btrfs, BackendKind::Dmthin]
            .into_iter()
            .find(|k| k.as_str() == place.backend)
            .with_context(|| format!("the host database records volumes on an unknown backend: {place}"))?;
        return Ok(chosen(
            kind,
            // The place itself is shown beside (`worker images`' `volumes:` line): not twice.
            "the host's volumes were made with it (as the host database records); a host never changes backend under its volumes".to_owned(),
        ));
    }
    if !config.dmthin.pool.trim().is_empty() {
        return Ok(chosen(BackendKind::Dmthin, format!("dmthin.pool is set ({})", config.dmthin.pool)));
    }
    let root = std::path::Path::new(&config.volumes_dir);
    std::fs::create_dir_all(root).with_context(|| format!("creating the volume directory {}", root.display()))?;
    let fs_type = nix::sys::statfs::statfs(root)
        .with_context(|| format!("inspecting the filesystem of {}", root.display()))?
        .filesystem_type();
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    if fs_type == nix::sys::statfs::BTRFS_SUPER_MAGIC {
        if root_user {
            return Ok(chosen(BackendKind::Btrfs, format!("{} is on btrfs", root.display())));
        }
        tracing::info!("the volume directory is on btrfs, but btrfs snapshots need root");
    }
    match OverlayBackend::probe(root) {
        Ok(()) => Ok(chosen(
            BackendKind::Overlay,
            format!("overlayfs mounts under {} (not btrfs, no dm-thin pool)", root.display()),
        )),
        Err(e) => Ok(chosen(
            BackendKind::Dir,
            format!("no dm-thin pool, not btrfs as root, and overlayfs cannot mount here: {e}"),
        )),
    }
}

/// Whether the host database claims any volume (a base, or a snapshot not yet released).
fn has_volumes(store: &Store) -> anyhow::Result<bool> {
    Ok(!store.list_bases()?.is_empty() || store.list_snapshots()?.iter().any(|s| !s.state.is_released()))
}

/// Compares `backend`'s place with the host database's record (recording it at first use).
/// A database from before places were recorded, which claims volumes that `backend` does not
/// hold, is refused too: these settings are not the ones its volumes were made with.
pub fn check_place(config: &Config, store: &Store, backend: &dyn VolumeBackend) -> anyhow::Result<()> {
    let place = backend.place()?;
    if store.volume_place()?.is_none() {
        let claimed = claimed_volumes(store)?;
        let held: std::collections::BTreeSet<VolumeId> = backend.list()?.into_iter().collect();
        if !claimed.is_empty() && claimed.iter().all(|v| !held.contains(v)) {
            return Err(WrongSettings(format!(
                "the host database {} records {} volumes and {place} holds none of them; run with the settings this host was set up with (the same --config, or --set backend=... and volumes_dir=...); nothing was changed",
                config.host_db_path().display(),
                claimed.len()
            ))
            .into());
        }
    }
    match store.bind_volumes(&place)? {
        Binding::First => tracing::info!(%place, "recorded where this host's volumes live"),
        Binding::Same => {}
        Binding::Moved { from } => {
            tracing::warn!(%place, previous = %from, "the volumes moved; no volume was recorded at the old place")
        }
        Binding::Differs { recorded, bases, live_snapshots } => return Err(WrongSettings(format!(
            "the state directory {} keeps its volumes on {recorded} ({bases} bases, {live_snapshots} live snapshots recorded), but these settings name {place}; \
             run with the settings this host was set up with (the same --config, or --set backend={} and volumes_dir=...); nothing was changed",
            config.state_dir.display(),
            recorded.backend
        ))
        .into()),
    }
    Ok(())
}

/// Settings that name other volumes than the host's: a configuration error (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongSettings(pub String);

/// The volumes the host database says exist: every sealed base, and every live snapshot (a
/// base still `preparing` may never have been created).
fn claimed_volumes(store: &Store) -> anyhow::Result<Vec<VolumeId>> {
    let bases = store
        .list_bases()?
        .into_iter()
        .filter(|b| b.state != thinpipe::store::BaseState::Preparing)
        .map(|b| VolumeId::Base(b.id));
    let snaps = store
        .list_snapshots()?
        .into_iter()
        .filter(|s| matches!(s.state, SnapshotState::Created | SnapshotState::Exposed))
        .map(|s| VolumeId::Snap(s.id));
    Ok(bases.chain(snaps).collect())
}

/// The chosen volume backend, unchecked: commands use [`open_volumes`].
pub fn open_backend(config: &Config, choice: &BackendChoice) -> anyhow::Result<Arc<dyn VolumeBackend>> {
    let kind = [BackendKind::Dir, BackendKind::Overlay, BackendKind::Btrfs, BackendKind::Dmthin]
        .into_iter()
        .find(|k| k.as_str() == choice.name)
        .with_context(|| format!("no volume backend is called {:?}", choice.name))?;
    // Each backend through `Traced`: its calls are spans with one set of names.
    Ok(match kind {
        BackendKind::Btrfs => Arc::new(Traced::new(BtrfsBackend::open(&config.volumes_dir)?)),
        BackendKind::Dmthin => Arc::new(Traced::new(DmThinBackend::open(DmThinOptions {
            pool: config.dmthin.pool.clone(),
            root: config.volumes_dir.clone().into(),
            volume_bytes: config.dmthin.volume_bytes,
        })?)),
        BackendKind::Overlay => Arc::new(Traced::new(OverlayBackend::open(
            &config.volumes_dir,
            OverlayOptions {
                volatile: config.overlay.volatile,
                snapshot_bytes: (config.overlay.snapshot_bytes > 0).then_some(config.overlay.snapshot_bytes),
            },
        )?)),
        BackendKind::Dir | BackendKind::Auto => Arc::new(Traced::new(DirBackend::open(&config.volumes_dir)?)),
    })
}
