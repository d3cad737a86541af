//! `prepare` (run id `prepare-<family>@<first 12 hex digits of the version's digest>`): one
//! version of a family → its own base volume → layers streamed into it → sealed. The caller
//! resolved the version and passes its manifest in the input, so a crash resumes the same
//! version even if the source moved on. (Runs named `prepare-<family>` were started by
//! releases before versions; they carry no manifest and resolve it in `fetch_manifest`.)
//!
//! Version 2 (this file and `stream.rs`): `fetch_manifest` → `prepare_thin_base` →
//! `stream_into_base`, which applies each layer as its bytes arrive and seals the base once
//! every digest matched. Version 1 (`v1.rs`: download everything, then unpack from the
//! cache) stays registered so that its runs finish after an upgrade.

mod stream;
#[cfg(test)]
mod tests;
mod v1;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::{PipelineContext, blocking, image_err, store_err, volume_err};
use crate::fault;
use crate::fsm::{RetryPolicy, StepError, StepRequest, StepResult, Workflow};
use crate::image::{ImageError, Manifest};
use crate::progress::StepTracker;
use crate::store::{BaseIntent, BaseState};

/// How `prepare` moves a version's bytes (`images.*` in the worker's settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareSettings {
    /// Download and verify every blob into the cache before applying any (version 1's
    /// order): nothing unverified is ever written, even to the unsealed base, at the cost
    /// of waiting for the downloads and reading every blob back.
    pub verify_before_unpack: bool,
    /// Layers downloaded at once (the earliest first).
    pub parallel_downloads: usize,
    /// Chunks of [`crate::image::FEED_CHUNK`] bytes a layer may hold in memory ahead of the
    /// unpacker; a download that is that far ahead waits.
    pub read_ahead_chunks: usize,
}

impl Default for PrepareSettings {
    fn default() -> Self {
        // 3 layers x 8 chunks x 256 KiB: at most 6 MiB read ahead.
        Self { verify_before_unpack: false, parallel_downloads: 3, read_ahead_chunks: 8 }
    }
}

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
    /// Set by `stream_into_base` (`download_blobs` in version 1): bytes fetched from the
    /// source (0 when all were cached).
    pub downloaded_bytes: u64,
    /// Set by `prepare_thin_base`.
    pub base_vol_id: Option<u64>,
    /// Set by `stream_into_base` (`unpack_into_base`): device nodes the layers carried that were not created
    /// (`DevicePolicy::Skip`).
    #[serde(default)]
    pub devices_skipped: u64,
    /// Set by `stream_into_base` (`unpack_into_base`) under `images.rootless`: entries owned by someone else,
    /// applied owned by the worker's user, and the setuid/setgid bits removed from them.
    #[serde(default)]
    pub owners_dropped: u64,
    #[serde(default)]
    pub setid_stripped: u64,
}

type Req = StepRequest<PrepareInput, PrepareState>;

/// The current version (2): new runs take it.
pub(super) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<PrepareInput, PrepareState> {
    let (c1, c2, c3) = (ctx.clone(), ctx.clone(), ctx);
    // Downloads and the unpack share the step: the download's patience, the unpack's time.
    let stream = RetryPolicy {
        max_attempts: 10,
        max_interval: Duration::from_secs(60),
        attempt_timeout: Duration::from_secs(3600),
        ..RetryPolicy::default()
    };
    Workflow::new("prepare", 2)
        .step("fetch_manifest", move |req| fetch_manifest(c1.clone(), req))
        .step("prepare_thin_base", move |req| prepare_thin_base(c2.clone(), req))
        .step_with("stream_into_base", stream, move |req| stream::stream_into_base(c3.clone(), req))
}

/// Version 1, for the runs it started before an upgrade.
pub(super) fn workflow_v1(ctx: Arc<PipelineContext>) -> Workflow<PrepareInput, PrepareState> {
    v1::workflow(ctx)
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

/// Says once what the layers' entries became other than asked: owners dropped
/// (`images.rootless`), device nodes skipped (`images.devices`).
fn warn_about(family: &str, devices_skipped: u64, owners_dropped: u64, setid_stripped: u64) {
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
}

/// A version whose blobs cannot fit in the cache below the refusal watermark is refused
/// before its first byte, clearly, not by a full disk half way.
fn refuse_without_room(ctx: &PipelineContext, family: &str, manifest: &Manifest) -> Result<(), StepError> {
    let Some(limit) = ctx.apply.refuse_percent else { return Ok(()) };
    let need = ctx.cache.missing_bytes(&manifest.layers);
    let room = ctx.cache.room_below(limit).map_err(image_err)?;
    if need > room {
        let cache = ctx.cache.dir().to_path_buf();
        return Err(image_err(ImageError::NoRoomToDownload { family: family.to_owned(), cache, need, room }));
    }
    Ok(())
}

/// Downloads every blob of `manifest` not cached yet into the cache, verified, four at a
/// time. Returns the bytes downloaded now.
async fn cache_all_blobs(
    ctx: &Arc<PipelineContext>,
    manifest: &Manifest,
    progress: &Arc<StepTracker>,
    attempt: u32,
) -> Result<u64, StepError> {
    use futures::StreamExt;
    // Owned futures: borrowed ones trip the compiler's Send check for the step's future.
    let mut downloads = futures::stream::iter(manifest.layers.clone().into_iter().enumerate())
        .map(|(index, layer)| {
            let (ctx, progress) = (ctx.clone(), progress.clone());
            // One span per layer: how long its download took, and how much of it came now.
            let span = download_span(&layer);
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
            Err(e) => return Err(download_failed(ctx, manifest, attempt, MISMATCH_ATTEMPTS_V1, e).await),
        }
    }
    Ok(downloaded)
}

/// Blobs downloaded at once by [`cache_all_blobs`].
const PARALLEL_DOWNLOADS: usize = 4;
/// Attempts of a step whose download did not match its digest, before the source is
/// blamed (a torn transfer heals by downloading again; a corrupt source does not).
const MISMATCH_ATTEMPTS_V1: u32 = 2;
const MISMATCH_ATTEMPTS: u32 = 3;

/// The span of one layer's download.
fn download_span(layer: &crate::image::LayerDesc) -> tracing::Span {
    tracing::info_span!("layer.download", digest = %layer.digest, size = layer.size, fetched = tracing::field::Empty)
}

/// What a failed download makes of its step: a listed family that changed is the family's
/// error; a digest mismatch is retried until the `attempts`-th attempt, then blames the
/// source, saying how often it was fetched.
async fn download_failed(
    ctx: &PipelineContext,
    manifest: &Manifest,
    attempt: u32,
    attempts: u32,
    e: ImageError,
) -> StepError {
    if !matches!(e, ImageError::DigestMismatch { .. }) {
        return image_err(e);
    }
    // A listed family whose files were rewritten since the listing: not this version.
    match changed(ctx, manifest).await {
        Ok(Some(changed)) => image_err(changed),
        Err(e) => e,
        Ok(None) if attempt < attempts => StepError::transient(e),
        Ok(None) => StepError::abort_with(
            super::Cause::of_image(&e).as_str(),
            format!("{e} (fetched {attempt} times, in {attempt} attempts of the step)"),
        ),
    }
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

/// Bytes that can still be written before `usage` reaches `limit_percent` of its total.
fn room_below(usage: &crate::volume::Usage, limit_percent: f64) -> u64 {
    let allowed = (usage.total_bytes as f64 * limit_percent / 100.0) as u64;
    allowed.saturating_sub(usage.used_bytes)
}
