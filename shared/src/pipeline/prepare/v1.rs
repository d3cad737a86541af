//! Version 1 of `prepare`, kept so that runs it started before an upgrade finish with its
//! own steps (`fsm/DESIGN.md`, guarantee 11): every blob is downloaded into the cache
//! (`download_blobs`), then the base is made (`prepare_thin_base`) and the layers are
//! applied from the cache (`unpack_into_base`). New runs use version 2 (`stream.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::{
    PrepareInput, PrepareState, Req, cache_all_blobs, changed, fetch_manifest, layers_of, manifest_of,
    prepare_thin_base, refuse_without_room, room_below,
};
use crate::fault;
use crate::fsm::{RetryPolicy, StepError, StepResult, Workflow};
use crate::image::apply_layer_reporting;
use crate::pipeline::{PipelineContext, blocking, image_err, store_err, volume_err};
use crate::volume::VolumeId;

pub(in crate::pipeline) fn workflow(ctx: Arc<PipelineContext>) -> Workflow<PrepareInput, PrepareState> {
    let (c1, c2, c3, c4) = (ctx.clone(), ctx.clone(), ctx.clone(), ctx);
    let downloads = RetryPolicy { max_attempts: 10, max_interval: Duration::from_secs(60), ..RetryPolicy::default() };
    let unpack = RetryPolicy { max_attempts: 4, attempt_timeout: Duration::from_secs(3600), ..RetryPolicy::default() };
    Workflow::new("prepare", 1)
        .step("fetch_manifest", move |req| fetch_manifest(c1.clone(), req))
        .step_with("download_blobs", downloads, move |req| download_blobs(c2.clone(), req))
        .step("prepare_thin_base", move |req| prepare_thin_base(c3.clone(), req))
        .step_with("unpack_into_base", unpack, move |req| unpack_into_base(c4.clone(), req))
}

async fn download_blobs(ctx: Arc<PipelineContext>, req: Req) -> StepResult<PrepareState> {
    let manifest = manifest_of(&req)?;
    let progress =
        Arc::new(ctx.progress.begin_with_layers(&req.run_id, &req.r.family, "download_blobs", &layers_of(manifest)));
    fault::pause("prepare.download", &req.r.family).await;
    fault::fail("prepare.download", &req.r.family).map_err(StepError::transient)?;
    refuse_without_room(&ctx, &req.r.family, manifest)?;
    let downloaded = cache_all_blobs(&ctx, manifest, &progress, req.attempt).await?;
    // A listed family rewritten while its blobs were downloaded may have been listed half
    // old, half new: never seal that; the next prepare takes the version then current.
    if let Some(changed) = changed(&ctx, manifest).await? {
        return Err(image_err(changed));
    }
    tracing::info!(family = %req.r.family, layers = manifest.layers.len(), downloaded, "blobs cached");
    Ok(PrepareState { downloaded_bytes: downloaded, ..req.w })
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
            super::warn_about(&family, devices_skipped, owners_dropped, setid_stripped);
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
