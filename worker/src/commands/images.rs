//! `worker images` and `worker gc`: what the host holds, and what a collection pass did, as
//! text for people or JSON for tools.

use thinpipe::admin::wire::Images;
use thinpipe::image::BlobCache;
use thinpipe::lifecycle::GcReport;
use thinpipe::lifecycle::inventory::VersionView;
use thinpipe::store::Store;

use crate::config::Config;

/// The view for `worker images`: opens the host database (safe while the daemon runs).
pub fn collect(config: &Config) -> anyhow::Result<Images> {
    let store = Store::open(config.host_db_path())?;
    let cache = BlobCache::open(config.blob_cache_dir())?;
    // A backend that cannot be opened here (dm-thin without root) leaves usage unmeasured;
    // one that opens somewhere else than this host's volumes refuses the command.
    let choice = crate::host::choose_backend(config, &store)?;
    let usage = match crate::host::open_backend(config, &choice) {
        Ok(backend) => {
            crate::host::check_place(config, &store, backend.as_ref())?;
            backend.usage().map_err(|e| format!("{e:#}"))
        }
        Err(e) => Err(format!("{e:#}")),
    };
    let mut images = Images::gather(&store, &cache, usage, config.watermarks())?;
    images.backend = Some(choice);
    Ok(images)
}

pub fn print(config: &Config, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let images = collect(config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if images.families.is_empty() {
        println!("no families prepared on this host");
    }
    for f in &images.families {
        println!(
            "{}  ({} live snapshot(s), last used {}, source {})",
            f.family,
            f.live_snapshots,
            f.last_used.as_deref().unwrap_or("never"),
            // A registry source names the family's place: say the family's own reference.
            f.source.replace(thinpipe::image::FAMILY_PLACEHOLDER, &f.family)
        );
        match &f.current {
            Some(v) => println!("  current  {}", version_line(v)),
            None => println!("  current  none (prepared on the next prepare or activate)"),
        }
        if let (Some(error), Some(at)) = (&f.last_error, &f.last_error_at) {
            println!("  FAILED   last prepare at {at}: {error}");
        }
        for v in &f.others {
            println!("  kept     {}", version_line(v));
        }
    }
    match (&images.usage, &images.usage_error) {
        (Some(u), _) => println!(
            "\nstorage: {} {:.1}% used ({} of {} bytes){}; high {}%, low {}%, refuse {}%",
            u.what,
            u.percent(),
            u.used_bytes,
            u.total_bytes,
            u.metadata_percent().map(|m| format!(", metadata {m:.1}%")).unwrap_or_default(),
            images.watermarks.high_percent,
            images.watermarks.low_percent,
            images.watermarks.refuse_percent
        ),
        (None, Some(e)) => println!("\nstorage: not measured: {e}"),
        (None, None) => {}
    }
    println!(
        "blob cache: {} bytes, partial downloads: {} bytes",
        images.blob_cache_bytes, images.partial_download_bytes
    );
    if let Some(place) = &images.volumes {
        println!("volumes: {place}");
    }
    if let Some(b) = &images.backend {
        println!("backend: {} ({})\nsnapshot size limit: {}", b.name, b.why, b.snapshot_size_limit);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn version_line(v: &VersionView) -> String {
    format!(
        "{} {} {} live={} layers={}B last_activated={}",
        v.digest,
        v.base,
        v.state,
        v.live_snapshots,
        v.layer_bytes,
        v.last_activated_at.as_deref().unwrap_or("never")
    )
}

pub fn print_gc(report: &GcReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    for b in &report.deleted {
        println!("{verb} base-{} ({}@{})", b.id, b.family, b.digest);
    }
    for k in &report.kept {
        println!("kept base-{} ({}@{}): {}", k.base.id, k.base.family, k.base.digest, k.reason);
    }
    for k in &report.failed {
        println!("FAILED to delete base-{} ({}@{}): {}", k.base.id, k.base.family, k.base.digest, k.reason);
    }
    for f in &report.evicted_families {
        println!("evicted family {f} (the host was above its high watermark)");
    }
    for f in &report.families_forgotten {
        println!("forgot family {f} (it never prepared, and its last failure is older than the run retention)");
    }
    if report.file_digests_forgotten > 0 {
        println!(
            "forgot the digests of {} layer file(s) of the image directory that are gone or changed",
            report.file_digests_forgotten
        );
    }
    if let Some(why) = &report.eviction_skipped {
        println!("evicted nothing: {why}");
    }
    if report.partials_deleted > 0 {
        println!(
            "{verb} {} partial download(s) ({} bytes; the host was above its high watermark)",
            report.partials_deleted, report.partial_bytes_deleted
        );
    }
    if report.leftovers_removed > 0 {
        println!("{verb} {} half-made volume(s) ({} bytes)", report.leftovers_removed, report.leftover_bytes_removed);
    }
    println!(
        "{verb} {} base(s), {} blob(s) ({} bytes){}; {} bytes reclaimed",
        report.deleted.len(),
        report.blobs_deleted,
        report.blob_bytes_deleted,
        report.blobs_skipped.as_deref().map(|s| format!(" [blobs skipped: {s}]")).unwrap_or_default(),
        report.bytes_reclaimed
    );
    Ok(())
}

/// `worker gc`: one collection pass on the state directory (its runs resumed first); exit 0
/// unless a deletion failed.
pub async fn gc(config: Config, dry_run: bool, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let host = std::sync::Arc::new(crate::host::Host::open(config).await?);
    host.engine.resume_all().await?;
    let report = host.lifecycle.collect(dry_run).await;
    host.close().await;
    let report = report?;
    print_gc(&report, json)?;
    Ok(if report.failed.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}
