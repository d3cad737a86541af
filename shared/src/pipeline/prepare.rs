//! `prepare` (run id `prepare-<family>@<first 12 hex digits of the version's digest>`): one
//! version of a family → cached blobs → its own base volume → layers applied → sealed. The
//! caller resolved the version and passes its manifest in the input, so a crash resumes the
//! same version even if the source moved on. (Runs named `prepare-<family>` were started by
//! releases before versions; they carry no manifest and resolve it in `fetch_manifest`.)

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::{PipelineContext, blocking, image_err, store_err, volume_err};
use crate::fault;
use crate::fsm::{RetryPolicy, StepError, StepRequest, StepResult, Workflow};
use crate::image::{ImageError, Manifest, apply_layer_reporting};
use crate::store::{BaseIntent, BaseState};
use crate::volume::VolumeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareInput {
    pub family: String,
    /// The version to prepare (absent in runs started before versions existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
}

/// The response chain of `prepare`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareState {
    /// Set by `fetch_manifest`.
    pub manifest: Option<Manifest>,
    /// Set by `download_blobs`: bytes fetched from the source (0 when all were cached).
    pub downloaded_bytes: u64,
    /// Set by `prepare_thin_base`.
    pub base_vol_id: Option<u64>,
    /// Set by `unpack_into_base`: device nodes the layers carried that were not created
    /// (`DevicePolicy::Skip`).
    #[serde(default)]
    pub devices_skipped: u64,
    /// Set by `unpack_into_base` under `images.rootless`: entries owned by someone else,
    /// applied owned by the worker's user, and the setuid/setgid bits removed from them.
    #[serde(default)]
    pub owners_dropped: u64,
    #[serde(default)]
    pub setid_stripped: u64,
}

type Req = StepRequest<PrepareInput, PrepareState>;

pub(super) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<PrepareInput, PrepareState> {
    let (c1, c2, c3, c4) = (ctx.clone(), ctx.clone(), ctx.clone(), ctx);
    let downloads = RetryPolicy { max_attempts: 10, max_interval: Duration::from_secs(60), ..RetryPolicy::default() };
    let unpack = RetryPolicy { max_attempts: 4, attempt_timeout: Duration::from_secs(3600), ..RetryPolicy::default() };
    Workflow::new("prepare", 1)
        .step("fetch_manifest", move |req| fetch_manifest(c1.clone(), req))
        .step_with("download_blobs", downloads, move |req| download_blobs(c2.clone(), req))
        .step("prepare_thin_base", move |req| prepare_thin_base(c3.clone(), req))
        .step_with("unpack_into_base", unpack, move |req| unpack_into_base(c4.clone(), req))
}

/// The layers of `manifest` as the progress board follows them: (digest, size).
fn layers_of(manifest: &Manifest) -> Vec<(String, u64)> {
    manifest.layers.iter().map(|l| (l.digest.to_string(), l.size)).collect()
}

fn manifest_of(req: &Req) -> Result<&Manifest, StepError> {
    req.w.manifest.as_ref().ok_or_else(|| StepError::abort("the response chain has no manifest"))
}

async fn fetch_manifest(ctx: Arc<PipelineContext>, req: Req) -> StepResult<PrepareState> {
    let _progress = ctx.progress.begin(&req.run_id, &req.r.family, "fetch_manifest", 0);
    let family = req.r.family.clone();
    let manifest = match &req.r.manifest {
        Some(m) => m.clone(),
        None => ctx.source.manifest(&family).await.map_err(image_err)?,
    };
    let source = ctx.source.describe();
    let store = ctx.store.clone();
    blocking(&req.stop, move || store.upsert_image(&family, &source).map_err(store_err)).await?;
    Ok(PrepareState { manifest: Some(manifest), ..req.w })
}

/// Blobs downloaded at once.
const PARALLEL_DOWNLOADS: usize = 4;

async fn download_blobs(ctx: Arc<PipelineContext>, req: Req) -> StepResult<PrepareState> {
    use futures::StreamExt;
    let manifest = manifest_of(&req)?;
    let progress =
        Arc::new(ctx.progress.begin_with_layers(&req.run_id, &req.r.family, "download_blobs", &layers_of(manifest)));
    fault::pause("prepare.download", &req.r.family).await;
    fault::fail("prepare.download", &req.r.family).map_err(StepError::transient)?;
    // A version that cannot fit is refused now, clearly, not by a full disk half way.
    if let Some(limit) = ctx.apply.refuse_percent {
        let need = ctx.cache.missing_bytes(&manifest.layers);
        let room = ctx.cache.room_below(limit).map_err(image_err)?;
        if need > room {
            let cache = ctx.cache.dir().to_path_buf();
            return Err(image_err(ImageError::NoRoomToDownload { family: req.r.family.clone(), cache, need, room }));
        }
    }
    // Owned futures: borrowed ones trip the compiler's Send check for the step's future.
    let mut downloads = futures::stream::iter(manifest.layers.clone().into_iter().enumerate())
        .map(|(index, layer)| {
            let (ctx, progress) = (ctx.clone(), progress.clone());
            // One span per layer: how long its download took, and how much of it came now.
            let span = tracing::info_span!(
                "layer.download",
                digest = %layer.digest,
                size = layer.size,
                fetched = tracing::field::Empty
            );
            async move {
                let (path, fetched) =
                    ctx.cache.ensure_reporting(ctx.source.as_ref(), &layer, &|n| progress.advance(index, n)).await?;
                tracing::Span::current().record("fetched", fetched);
                // Bytes cached before (the whole blob, or a partial resumed) count as done.
                progress.advance(index, layer.size.saturating_sub(fetched));
                progress.finished(index);
                Ok::<_, ImageError>((path, fetched))
            }
            .instrument(span)
        })
        .buffer_unordered(PARALLEL_DOWNLOADS);
    let mut downloaded = 0;
    while let Some(result) = downloads.next().await {
        match result {
            Ok((_, n)) => downloaded += n,
            // A listed family whose files were rewritten since the listing: not this version.
            Err(ImageError::DigestMismatch { .. }) if let Some(changed) = changed(&ctx, manifest).await? => {
                return Err(image_err(changed));
            }
            // A mismatch may be a torn transfer: one more try, then it is the source.
            Err(e @ ImageError::DigestMismatch { .. }) if req.attempt < 2 => return Err(StepError::transient(e)),
            Err(e @ ImageError::DigestMismatch { .. }) => return Err(image_err(e)),
            Err(e) => return Err(image_err(e)),
        }
    }
    drop(downloads);
    // A listed family rewritten while its blobs were downloaded may have been listed half
    // old, half new: never seal that; the next prepare takes the version then current.
    if let Some(changed) = changed(&ctx, manifest).await? {
        return Err(image_err(changed));
    }
    tracing::info!(family = %req.r.family, layers = manifest.layers.len(), downloaded, "blobs cached");
    Ok(PrepareState { downloaded_bytes: downloaded, ..req.w })
}

/// For a family listed from its files (not a published manifest object): whether it now
/// resolves to another version than `manifest`, as [`ImageError::FamilyChanged`].
async fn changed(ctx: &PipelineContext, manifest: &Manifest) -> Result<Option<ImageError>, StepError> {
    if !crate::image::is_listed(manifest) {
        return Ok(None);
    }
    let now = ctx.source.manifest(&manifest.family).await.map_err(image_err)?;
    Ok((now.digest != manifest.digest).then(|| ImageError::FamilyChanged {
        family: manifest.family.clone(),
        source_desc: ctx.source.describe(),
        was: manifest.digest.to_string(),
        now: now.digest.to_string(),
    }))
}

/// The guarded step: the version's base id is taken from (or allocated and recorded in)
/// SQLite before the volume exists, so a crash between the two leaves a record, not an
/// orphan. A base that garbage collection is deleting (an old, failed attempt at this
/// version) is waited out: the retry allocates a new one once it is gone.
async fn prepare_thin_base(ctx: Arc<PipelineContext>, req: Req) -> StepResult<PrepareState> {
    let _progress = ctx.progress.begin(&req.run_id, &req.r.family, "prepare_thin_base", 0);
    let manifest = manifest_of(&req)?;
    let digest = manifest.digest.to_string();
    let blobs: Vec<String> = manifest.layers.iter().map(|l| l.digest.to_string()).collect();
    let family = req.r.family.clone();
    let base = blocking(&req.stop, move || {
        let row = match ctx.store.intend_base(&family, &digest, &blobs).map_err(store_err)? {
            BaseIntent::Ready(row) => row,
            BaseIntent::Retiring(row) => {
                return Err(StepError::transient(format!(
                    "base-{} of {family}@{} is being deleted by garbage collection; a new base is made once it is gone",
                    row.id,
                    row.short_digest()
                )));
            }
        };
        fault::point("prepare.after_base_intent", &family);
        if row.state == BaseState::Preparing {
            ctx.backend.create_base(row.id).map_err(volume_err)?;
        }
        fault::point("prepare.after_base_create", &family);
        Ok(row.id)
    })
    .await?;
    Ok(PrepareState { base_vol_id: Some(base), ..req.w })
}

async fn unpack_into_base(ctx: Arc<PipelineContext>, req: Req) -> StepResult<PrepareState> {
    let manifest = manifest_of(&req)?.clone();
    let progress =
        ctx.progress.begin_with_layers(&req.run_id, &req.r.family, "unpack_into_base", &layers_of(&manifest));
    fault::pause("prepare.unpack", &req.r.family).await;
    let base = req.w.base_vol_id.ok_or_else(|| StepError::abort("the response chain has no base volume"))?;
    let family = req.r.family.clone();
    let stop = req.stop.clone();
    let applied = blocking(&req.stop, move || {
        let (mut devices_skipped, mut owners_dropped, mut setid_stripped) = (0, 0, 0);
        let mut written = None;
        // Sealed by an earlier attempt that crashed before its commit: only the record is left.
        if !ctx.backend.is_sealed(base).map_err(volume_err)? {
            // A rerun starts from an empty base: never apply layers over a half-applied tree.
            let root = ctx.backend.reset_base(base).map_err(volume_err)?;
            for (index, layer) in manifest.layers.iter().enumerate() {
                // One span per layer: how long it took to apply, and what it wrote.
                let span = tracing::info_span!(
                    "layer.apply",
                    digest = %layer.digest,
                    entries = tracing::field::Empty,
                    written = tracing::field::Empty
                );
                let _entered = span.enter();
                let blob = ctx.cache.path(&layer.digest);
                let name = format!("{} ({})", layer.digest, layer.location);
                let mut opts = ctx.apply.clone();
                opts.stop = Some(stop.token().clone());
                if let Some(limit) = opts.refuse_percent {
                    opts.room_bytes = Some(room_below(&ctx.backend.usage().map_err(volume_err)?, limit));
                }
                let stats = apply_layer_reporting(
                    &root,
                    &blob,
                    &name,
                    layer.diff_id.as_ref(),
                    &opts,
                    &|n| progress.advance(index, n),
                    &|written| progress.applied(index, written),
                )
                .map_err(image_err)?;
                span.record("entries", stats.entries).record("written", stats.written);
                progress.finished(index);
                crate::telemetry::metrics().layer_bytes_applied.add(stats.written, &[]);
                tracing::debug!(%family, layer = %layer.digest, entries = stats.entries, bytes = stats.bytes, written = stats.written, "layer applied");
                devices_skipped += stats.devices_skipped;
                *written.get_or_insert(0) += stats.written;
                owners_dropped += stats.owners_dropped;
                setid_stripped += stats.setid_stripped;
            }
            if owners_dropped > 0 {
                tracing::warn!(
                    %family,
                    owners_dropped,
                    setid_stripped,
                    "images.rootless: {owners_dropped} entries of {family} are owned by this worker's user instead of their own, and {setid_stripped} lost their setuid/setgid bits"
                );
            }
            if devices_skipped > 0 {
                tracing::warn!(
                    %family,
                    devices_skipped,
                    "skipped {devices_skipped} device nodes in the layers of {family} (images.devices = \"skip\"; \"create\" makes them, \"refuse\" fails such images)"
                );
            }
            ctx.backend.seal_base(base).map_err(volume_err)?;
            fault::point("prepare.after_seal", &family);
        }
        ctx.store.mark_base_sealed_with(base, written).map_err(store_err)?;
        tracing::info!(%family, base = %VolumeId::Base(base), version = %manifest.digest, layers = manifest.layers.len(), "base sealed");
        Ok((devices_skipped, owners_dropped, setid_stripped))
    })
    .await?;
    let (devices_skipped, owners_dropped, setid_stripped) = applied;
    Ok(PrepareState { devices_skipped, owners_dropped, setid_stripped, ..req.w })
}

/// Bytes that can still be written before `usage` reaches `limit_percent` of its total.
fn room_below(usage: &crate::volume::Usage, limit_percent: f64) -> u64 {
    let allowed = (usage.total_bytes as f64 * limit_percent / 100.0) as u64;
    allowed.saturating_sub(usage.used_bytes)
}
