//! `stream_into_base`, the last step of `prepare` version 2: one pass over each layer's
//! bytes. Downloads run ahead of the unpacker, the earliest layer first, a few at a time
//! (`PrepareSettings`); each passes its bytes through the hasher into the cache and on to the
//! unpacker (`BlobCache::tee`, `image/feed.rs`), which applies layer k+1 as soon as layer k
//! is applied and k+1's bytes arrive. A layer cached and verified before (an earlier attempt,
//! a crash) is applied from the cache, never downloaded again.
//!
//! Verification keeps its promise: bytes reach only the unsealed base before their digests
//! are known; the base is sealed only after every blob matched its manifest digest and every
//! tar its `rootfs.diff_ids` entry. A mismatch fails the attempt; the next attempt empties
//! the base and fetches again. The unpacker's confinement (`image/apply.rs`) is the defence
//! meanwhile, as it is for verified bytes. `verify_before_unpack` restores version 1's order.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    MISMATCH_ATTEMPTS, PrepareState, Req, cache_all_blobs, changed, download_failed, download_span, layers_of,
    manifest_of, refuse_without_room, room_below,
};
use crate::fault;
use crate::fsm::{StepError, StepResult};
use crate::image::{
    ApplyStats, Feed, FeedReader, ImageError, LayerDesc, Manifest, TeeError, apply_layer_from, apply_layer_reporting,
};
use crate::pipeline::{PipelineContext, blocking, image_err, store_err, volume_err};
use crate::progress::StepTracker;
use crate::volume::VolumeId;

/// Where the unpacker reads one layer from.
enum LayerInput {
    /// The cache holds it, verified.
    Cached,
    /// Its download, as it arrives.
    Fed(mpsc::Receiver<Feed>),
}

/// What the layers' entries did, summed.
#[derive(Clone, Copy, Default)]
struct Applied {
    devices_skipped: u64,
    owners_dropped: u64,
    setid_stripped: u64,
    written: u64,
}

pub(super) async fn stream_into_base(ctx: Arc<PipelineContext>, req: Req) -> StepResult<PrepareState> {
    let manifest = Arc::new(manifest_of(&req)?.clone());
    let family = req.r.family.clone();
    let progress =
        Arc::new(ctx.progress.begin_with_layers(&req.run_id, &family, "stream_into_base", &layers_of(&manifest)));
    fault::pause("prepare.download", &family).await;
    fault::fail("prepare.download", &family).map_err(StepError::transient)?;
    fault::pause("prepare.unpack", &family).await;
    let base = req.w.base_vol_id.ok_or_else(|| StepError::abort("the response chain has no base volume"))?;
    let sealed = {
        let ctx = ctx.clone();
        blocking(&req.stop, move || ctx.backend.is_sealed(base).map_err(volume_err)).await?
    };
    if sealed {
        // Sealed by an earlier attempt that crashed before its commit: only the record is left.
        let ctx = ctx.clone();
        blocking(&req.stop, move || ctx.store.mark_base_sealed_with(base, None).map_err(store_err)).await?;
        return Ok(req.w);
    }
    refuse_without_room(&ctx, &family, &manifest)?;
    let mut downloaded = 0;
    if ctx.prepare.verify_before_unpack {
        downloaded = cache_all_blobs(&ctx, &manifest, &progress, req.attempt).await?;
    }

    // Every layer not cached gets a feed; its download starts in order, a few at a time.
    let mut inputs = Vec::with_capacity(manifest.layers.len());
    let mut feeds = Vec::new();
    for (index, layer) in manifest.layers.iter().enumerate() {
        if ctx.cache.contains(&layer.digest) {
            inputs.push(LayerInput::Cached);
        } else {
            let (tx, rx) = mpsc::channel(ctx.prepare.read_ahead_chunks.max(1));
            inputs.push(LayerInput::Fed(rx));
            feeds.push((index, layer.clone(), tx));
        }
    }
    // Fires when either side fails: the other stops instead of finishing useless work.
    let abandon = req.stop.token().child_token();
    let downloads = futures::stream::iter(feeds)
        .map(|(index, layer, tx)| {
            let (ctx, progress, abandon) = (ctx.clone(), progress.clone(), abandon.clone());
            let span = download_span(&layer);
            async move {
                if abandon.is_cancelled() {
                    return Err(TeeError::ReaderGone);
                }
                let teed = ctx.cache.tee(ctx.source.as_ref(), &layer, &tx, &|n| progress.advance(index, n)).await;
                match &teed {
                    Ok(fetched) => {
                        tracing::Span::current().record("fetched", *fetched);
                    }
                    Err(TeeError::Image(_)) => abandon.cancel(),
                    Err(TeeError::ReaderGone) => {}
                }
                teed
            }
            .instrument(span)
        })
        .buffered(ctx.prepare.parallel_downloads.max(1))
        .collect::<Vec<_>>();
    let unpack = {
        let (ctx, manifest, progress, abandon) = (ctx.clone(), manifest.clone(), progress.clone(), abandon.clone());
        let runtime = tokio::runtime::Handle::current();
        let family = family.clone();
        blocking(&req.stop, move || {
            let applied = apply_layers(&ctx, base, &manifest, inputs, &progress, &abandon, &runtime, &family);
            if applied.is_err() {
                abandon.cancel();
            }
            applied
        })
    };
    let (applied, fetched) = tokio::join!(unpack, downloads);
    // A download's own failure is the cause; the unpacker only saw its stream end early.
    for teed in fetched {
        match teed {
            Ok(n) => downloaded += n,
            Err(TeeError::ReaderGone) => {}
            Err(TeeError::Image(e)) => {
                return Err(download_failed(&ctx, &manifest, req.attempt, MISMATCH_ATTEMPTS, e).await);
            }
        }
    }
    let applied = applied?;
    // A listed family rewritten while it was streamed may have been listed half old, half
    // new: never seal that; the next prepare takes the version then current.
    if let Some(changed) = changed(&ctx, &manifest).await? {
        return Err(image_err(changed));
    }
    let sealed = {
        let (ctx, family, digest) = (ctx.clone(), family.clone(), manifest.digest.clone());
        let (layers, written) = (manifest.layers.len(), applied.written);
        blocking(&req.stop, move || {
            ctx.backend.seal_base(base).map_err(volume_err)?;
            fault::point("prepare.after_seal", &family);
            ctx.store.mark_base_sealed_with(base, Some(written)).map_err(store_err)?;
            tracing::info!(%family, base = %VolumeId::Base(base), version = %digest, layers, "base sealed");
            Ok(())
        })
    };
    sealed.await?;
    super::warn_about(&family, applied.devices_skipped, applied.owners_dropped, applied.setid_stripped);
    Ok(PrepareState {
        downloaded_bytes: downloaded,
        devices_skipped: applied.devices_skipped,
        owners_dropped: applied.owners_dropped,
        setid_stripped: applied.setid_stripped,
        ..req.w
    })
}

/// Empties the unsealed base and applies every layer in order, each from the cache or from
/// its feed. A fed layer counts only if its download sent [`Feed::Verified`].
#[allow(clippy::too_many_arguments)]
fn apply_layers(
    ctx: &PipelineContext,
    base: u64,
    manifest: &Manifest,
    inputs: Vec<LayerInput>,
    progress: &StepTracker,
    stop: &CancellationToken,
    runtime: &tokio::runtime::Handle,
    family: &str,
) -> Result<Applied, StepError> {
    // Never apply layers over a half-applied tree (an earlier attempt, a crash).
    let root = ctx.backend.reset_base(base).map_err(volume_err)?;
    let mut applied = Applied::default();
    for ((index, layer), input) in manifest.layers.iter().enumerate().zip(inputs) {
        // One span per layer: how long it took to apply, and what it wrote.
        let span = tracing::info_span!(
            "layer.apply",
            digest = %layer.digest,
            entries = tracing::field::Empty,
            written = tracing::field::Empty
        );
        let _entered = span.enter();
        let name = format!("{} ({})", layer.digest, layer.location);
        let mut opts = ctx.apply.clone();
        opts.stop = Some(stop.clone());
        if let Some(limit) = opts.refuse_percent {
            opts.room_bytes = Some(room_below(&ctx.backend.usage().map_err(volume_err)?, limit));
        }
        let on_entry = |written| progress.applied(index, written);
        let stats = match input {
            LayerInput::Cached => apply_layer_reporting(
                &root,
                &ctx.cache.path(&layer.digest),
                &name,
                layer.diff_id.as_ref(),
                &opts,
                &|n| progress.advance(index, n),
                &on_entry,
            ),
            LayerInput::Fed(rx) => apply_fed(&root, rx, layer, &name, &opts, runtime, stop, &on_entry),
        }
        .map_err(image_err)?;
        span.record("entries", stats.entries).record("written", stats.written);
        progress.finished(index);
        crate::telemetry::metrics().layer_bytes_applied.add(stats.written, &[]);
        tracing::debug!(%family, layer = %layer.digest, entries = stats.entries, bytes = stats.bytes, written = stats.written, "layer applied");
        applied.devices_skipped += stats.devices_skipped;
        applied.owners_dropped += stats.owners_dropped;
        applied.setid_stripped += stats.setid_stripped;
        applied.written += stats.written;
        // A crash here leaves a half-applied, unsealed base: the resumed step empties it.
        fault::point("prepare.after_layer_applied", family);
    }
    Ok(applied)
}

/// Applies one layer from its download's feed, reading the feed to its end (the blob may go
/// on past the tar's end blocks, and its digest covers it all).
#[allow(clippy::too_many_arguments)]
fn apply_fed(
    root: &Path,
    rx: mpsc::Receiver<Feed>,
    layer: &LayerDesc,
    name: &str,
    opts: &crate::image::ApplyOptions,
    runtime: &tokio::runtime::Handle,
    stop: &CancellationToken,
    on_entry: &dyn Fn(u64),
) -> Result<ApplyStats, ImageError> {
    let feed = FeedReader::new(rx, runtime.clone(), stop.clone());
    let (stats, mut feed) = apply_layer_from(
        root,
        feed,
        Path::new(&layer.location),
        name,
        layer.diff_id.as_ref(),
        opts,
        &|_| {},
        on_entry,
    )?;
    feed.drain().map_err(|e| ImageError::io("reading layer", &layer.location, e))?;
    if !feed.verified() {
        // The download failed or did not match; its error is what the step reports.
        return Err(ImageError::Unavailable {
            source_desc: "the layer's download".into(),
            detail: format!("layer {name} ended before its digest was verified"),
        });
    }
    Ok(stats)
}
