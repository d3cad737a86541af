//! Garbage collection: bases no job can use again, and blobs no kept base needs.
//!
//! Roots: a base is kept while it is its family's current version, while a live (not
//! released) snapshot was made from it, while a job in flight holds its version
//! (`in_use.rs`) or its prepare run is in flight, and, for `gc.grace_secs` after it was
//! prepared or last used, while it is a version that was never current (its job may not
//! have made it current yet). Everything else is garbage: old versions
//! without live snapshots, unsealed bases of failed prepares. Each is decided on its own in
//! one SQLite transaction (`Store::retire_base`) and deleted by its own `retire` run, so a
//! stuck deletion fails alone and is tried again next pass. No lock is held across a
//! deletion: activations wait at most for one decision's transaction.
//!
//! A pass reclaims in order of least harm: partial downloads no download is using (only
//! above the high watermark: otherwise they are kept for resuming), in-between artifacts
//! of interrupted volume creates, old versions, then blobs no kept base needs (when no
//! prepare runs: a prepare downloads its blobs before its base records them). Only then,
//! still above the high watermark, whole families with no live snapshot are evicted,
//! least recently used first, until usage is below the low watermark; and none at all when
//! evicting every such family would not bring usage below the high watermark (what fills
//! the disk is not thinpipe's bases: evicting would lose them and relieve nothing).

use std::collections::BTreeSet;

use serde::Serialize;

use super::{Lifecycle, LifecycleError, Pressure};
use crate::fsm::Outcome;
use crate::job::{legacy_prepare_run_id, prepare_run_id};
use crate::pipeline::Pipeline;
use crate::store::{BaseRow, BaseState, Retire};
use crate::telemetry::metrics;
use crate::volume::Usage;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BaseSummary {
    pub id: u64,
    pub family: String,
    pub digest: String,
    pub state: BaseState,
}

impl From<&BaseRow> for BaseSummary {
    fn from(b: &BaseRow) -> Self {
        BaseSummary { id: b.id, family: b.family.clone(), digest: b.digest.clone(), state: b.state }
    }
}

/// A base left alone, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub base: BaseSummary,
    pub reason: String,
}

/// What one pass did (with `dry_run`, what it would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// Bases deleted (dry run: that would be).
    pub deleted: Vec<BaseSummary>,
    /// Old versions kept, and why.
    pub kept: Vec<Kept>,
    /// Deletions that failed this pass (tried again next pass), with the error.
    pub failed: Vec<Kept>,
    /// Families evicted whole because the host was above its high watermark.
    pub evicted_families: Vec<String>,
    pub blobs_deleted: usize,
    pub blob_bytes_deleted: u64,
    /// Partial downloads deleted (above the high watermark, when no download used them).
    pub partials_deleted: usize,
    pub partial_bytes_deleted: u64,
    /// In-between artifacts of interrupted volume creates removed, with their bytes.
    pub leftovers_removed: usize,
    pub leftover_bytes_removed: u64,
    /// Why no family was evicted although the host was above its high watermark.
    pub eviction_skipped: Option<String>,
    /// Families forgotten: they never became usable and their last failure is older than
    /// the retention.
    pub families_forgotten: Vec<String>,
    /// Remembered digests of flat layer files that are gone or changed, forgotten.
    pub file_digests_forgotten: usize,
    /// Signature verifications of versions no base is left of.
    #[serde(default)]
    pub verifications_forgotten: usize,
    /// Why blobs were not collected this pass, if they were not.
    pub blobs_skipped: Option<String>,
    /// Blob bytes deleted plus what the volume storage's usage fell by.
    pub bytes_reclaimed: u64,
    pub usage_before: Option<Usage>,
    pub usage_after: Option<Usage>,
}

impl GcReport {
    pub fn did_something(&self) -> bool {
        !self.deleted.is_empty()
            || !self.failed.is_empty()
            || self.blobs_deleted > 0
            || self.partials_deleted > 0
            || self.leftovers_removed > 0
            || !self.families_forgotten.is_empty()
    }
}

/// Why a job in flight keeps `row`, if one does. Asked with the registry locked.
fn in_use_reason(held: &super::in_use::Held, row: &BaseRow, pipeline: &Pipeline) -> Option<String> {
    if held.contains_key(&(row.family.clone(), row.digest.clone())) {
        return Some("a job in flight uses this version".into());
    }
    if row.state == BaseState::Preparing {
        let runs = [prepare_run_id(&row.family, &row.digest), legacy_prepare_run_id(&row.family)];
        if let Some(run) = runs.iter().find(|id| pipeline.run_in_flight(id)) {
            return Some(format!("its prepare run {run} is in flight"));
        }
    }
    None
}

/// How long eviction waits for a deletion's space to come back (btrfs frees a deleted
/// subvolume's blocks after up to two transaction commits; the default commit interval is 30 s).
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

impl Lifecycle {
    /// One garbage collection pass (see the module doc). With `dry_run`, nothing is marked or
    /// deleted: the report says what would be.
    pub async fn collect(&self, dry_run: bool) -> Result<GcReport, LifecycleError> {
        let _one_pass = self.pass.lock().await;
        let mut report = GcReport { dry_run, usage_before: self.measure().await.ok(), ..GcReport::default() };
        let pressed =
            report.usage_before.as_ref().is_some_and(|u| self.settings.watermarks.assess(u) != Pressure::Normal);
        if pressed {
            self.collect_partials(&mut report).await?;
        }
        self.sweep_leftovers(&mut report).await?;
        let bases = self.store().call(|s| s.list_bases()).await?;
        let current: BTreeSet<u64> =
            self.store().call(|s| s.list_images()).await?.into_iter().filter_map(|i| i.current_base).collect();
        let mut marked = Vec::new();
        for base in bases.iter().filter(|b| !current.contains(&b.id)) {
            match self.decide(base, dry_run).await? {
                Retire::Marked(row) => {
                    crate::fault::point("gc.after_mark", &crate::job::retire_run_id(row.id));
                    marked.push(row)
                }
                Retire::Kept(reason) => report.kept.push(Kept { base: base.into(), reason }),
                Retire::Gone => {}
            }
        }
        if dry_run {
            report.deleted = marked.iter().map(BaseSummary::from).collect();
        } else {
            self.retire_all(marked, &mut report).await;
        }
        self.collect_blobs(&mut report, pressed).await?;
        if !dry_run {
            self.evict(&mut report).await?;
            let age = i64::try_from(self.settings.forget_failed_after.as_millis()).unwrap_or(i64::MAX);
            let before = crate::store::epoch_ms(std::time::SystemTime::now()).saturating_sub(age);
            report.families_forgotten = self.store().call(move |s| s.forget_stale_families(before)).await?;
            report.file_digests_forgotten = self.store().call(|s| s.forget_file_digests()).await?;
            let hour_ago = crate::store::epoch_ms(std::time::SystemTime::now()).saturating_sub(3_600_000);
            report.verifications_forgotten = self.store().call(move |s| s.forget_unused_verified(hour_ago)).await?;
        }
        report.usage_after = self.measure().await.ok();
        if let (Some(before), Some(after)) = (&report.usage_before, &report.usage_after) {
            report.bytes_reclaimed = before.used_bytes.saturating_sub(after.used_bytes);
        }
        // The state directory may be on another filesystem than the volumes.
        report.bytes_reclaimed = report.bytes_reclaimed.max(report.blob_bytes_deleted + report.partial_bytes_deleted);
        if !dry_run {
            metrics().gc_bases_deleted.add(report.deleted.len() as u64, &[]);
            metrics().gc_blobs_deleted.add(report.blobs_deleted as u64, &[]);
            metrics().gc_bytes_reclaimed.add(report.bytes_reclaimed, &[]);
        }
        Ok(report)
    }

    /// Marks `base` retiring if nothing keeps it (dry run: says whether it would).
    async fn decide(&self, base: &BaseRow, dry_run: bool) -> Result<Retire, LifecycleError> {
        let (registry, pipeline, id) = (self.in_use.registry(), self.pipeline.clone(), base.id);
        let grace = i64::try_from(self.settings.grace.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .store()
            .call(move |s| {
                let held = super::lock(&registry);
                let in_use = |row: &BaseRow| in_use_reason(&held, row, &pipeline);
                if dry_run { s.retire_check(id, grace, in_use) } else { s.retire_base(id, grace, in_use) }
            })
            .await?)
    }

    /// Runs the `retire` run of every marked base at once; a failure is reported, not fatal.
    async fn retire_all(&self, marked: Vec<BaseRow>, report: &mut GcReport) {
        let runs = marked.iter().map(|row| self.pipeline.retire(row));
        for (row, outcome) in marked.iter().zip(futures::future::join_all(runs).await) {
            match outcome {
                Ok(Outcome::Completed(_)) => report.deleted.push(row.into()),
                Ok(Outcome::Failed(f)) => report.failed.push(Kept { base: row.into(), reason: f.to_string() }),
                Err(e) => report.failed.push(Kept { base: row.into(), reason: e.to_string() }),
            }
        }
    }

    /// Above the high watermark: evicts families with no live snapshot, least recently
    /// used first, until usage is below the low watermark.
    async fn evict(&self, report: &mut GcReport) -> Result<(), LifecycleError> {
        let watermarks = self.settings.watermarks.clone();
        let usage = self.measure().await?;
        if watermarks.assess(&usage) == Pressure::Normal {
            return Ok(());
        }
        let families = self.store().call(|s| s.families_by_last_use()).await?;
        if let Some(why) = self.eviction_would_not_relieve(&usage, &families).await? {
            tracing::warn!(used_percent = usage.percent(), "{why}");
            report.eviction_skipped = Some(why);
            return Ok(());
        }
        for (family, _) in families {
            if watermarks.below_low(&self.measure().await?) {
                break;
            }
            let (registry, pipeline, f) = (self.in_use.registry(), self.pipeline.clone(), family.clone());
            let evicted = self
                .store()
                .call(move |s| {
                    let held = super::lock(&registry);
                    s.evict_family(&f, |row| in_use_reason(&held, row, &pipeline))
                })
                .await?;
            match evicted {
                Ok(rows) => {
                    let used = self.measure().await?.percent();
                    tracing::info!(%family, bases = rows.len(), used_percent = used, "evicting a family to free space");
                    report.evicted_families.push(family);
                    self.retire_all(rows, report).await;
                    self.settle().await;
                }
                Err(why) => tracing::debug!(%family, %why, "family kept"),
            }
        }
        Ok(())
    }

    /// Why evicting would not help, if it would not: even every family that has no live
    /// snapshot, evicted, frees less than what usage must drop to get below the high
    /// watermark. Bases whose size is not recorded count as helping (older records).
    async fn eviction_would_not_relieve(
        &self,
        usage: &Usage,
        families: &[(String, i64)],
    ) -> Result<Option<String>, LifecycleError> {
        let candidates: BTreeSet<String> = families.iter().map(|(f, _)| f.clone()).collect();
        let (bases, snapshots) = self.store().call(|s| Ok((s.list_bases()?, s.list_snapshots()?))).await?;
        let pinned: BTreeSet<String> = snapshots
            .iter()
            .filter(|s| !s.state.is_released() && s.base_vol_id.is_some())
            .map(|s| s.family.clone())
            .collect();
        let mut freeable = 0u64;
        for base in bases.iter().filter(|b| candidates.contains(&b.family) && !pinned.contains(&b.family)) {
            match base.bytes {
                Some(bytes) => freeable += bytes,
                None => return Ok(None),
            }
        }
        let high = (usage.total_bytes as f64 * self.settings.watermarks.high_percent / 100.0) as u64;
        let must_free = usage.used_bytes.saturating_sub(high);
        Ok((freeable < must_free).then(|| {
            format!(
                "{} is {:.0}% used; evicting every family without a live snapshot would free about {freeable} bytes of the {must_free} needed to get below the high watermark, so none is evicted: something else fills it",
                usage.what,
                usage.percent()
            )
        }))
    }

    /// Deletes partial downloads that no download is using now (only called above the high
    /// watermark: a partial is worth keeping for a resume otherwise).
    async fn collect_partials(&self, report: &mut GcReport) -> Result<(), LifecycleError> {
        let cache = self.pipeline.context().cache.clone();
        let dry_run = report.dry_run;
        let (count, bytes) = tokio::task::spawn_blocking(move || -> Result<(usize, u64), crate::image::ImageError> {
            let (mut count, mut bytes) = (0, 0);
            for (digest, size) in cache.partials()? {
                if dry_run || cache.remove_idle_partial(&digest)? {
                    if !dry_run {
                        tracing::info!(%digest, bytes = size, "deleted a partial download to free space");
                    }
                    count += 1;
                    bytes += size;
                }
            }
            Ok((count, bytes))
        })
        .await
        .map_err(|e| LifecycleError::Task(format!("the partial-download collection task failed: {e}")))??;
        report.partials_deleted = count;
        report.partial_bytes_deleted = bytes;
        Ok(())
    }

    /// Removes in-between artifacts of interrupted volume creates (`reconcile`'s sweep).
    async fn sweep_leftovers(&self, report: &mut GcReport) -> Result<(), LifecycleError> {
        let (store, backend, pipeline) = (self.store(), self.pipeline.context().backend.clone(), self.pipeline.clone());
        let dry_run = report.dry_run;
        let making = move |row: &crate::store::SnapshotRow| {
            row.state == crate::store::SnapshotState::Intended && pipeline.run_in_flight(&row.run_id)
        };
        let swept = tokio::task::spawn_blocking(move || {
            crate::reconcile::sweep_leftovers(&store, backend.as_ref(), dry_run, &making)
        })
        .await
        .map_err(|e| LifecycleError::Task(format!("the in-between artifact sweep failed: {e}")))??;
        let done = if dry_run { &swept.found } else { &swept.removed };
        report.leftovers_removed = done.len();
        report.leftover_bytes_removed = done.iter().map(|l| l.bytes).sum();
        Ok(())
    }

    /// Waits (up to [`SETTLE_TIMEOUT`]) until the evicted bases' space counts as free, so
    /// eviction does not take more than it must.
    async fn settle(&self) {
        let backend = self.pipeline.context().backend.clone();
        match tokio::task::spawn_blocking(move || backend.wait_reclaimed(SETTLE_TIMEOUT)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "deleted space has not come back yet; evicting more would guess"),
            Err(e) => tracing::warn!(error = %e, "waiting for deleted space failed"),
        }
    }

    /// Deletes cached blobs that no base still needs, when no prepare runs. Under pressure
    /// (`pressed`: above the high watermark) a sealed base needs none of its blobs either:
    /// activations use the base, and a version prepared again downloads them again.
    async fn collect_blobs(&self, report: &mut GcReport, pressed: bool) -> Result<(), LifecycleError> {
        let Some(_no_prepare) = self.in_use.collect_blobs() else {
            report.blobs_skipped = Some("a prepare is running".into());
            return Ok(());
        };
        if self.pipeline.prepares_in_flight() {
            report.blobs_skipped = Some("a prepare run is in flight".into());
            return Ok(());
        }
        let bases = self.store().call(|s| s.list_bases()).await?;
        let mut needed = BTreeSet::new();
        let needs_blobs = |b: &&BaseRow| match b.state {
            BaseState::Retiring => false,
            BaseState::Sealed => !pressed,
            BaseState::Preparing => true,
        };
        for base in bases.iter().filter(needs_blobs) {
            match &base.blobs {
                Some(blobs) => needed.extend(blobs.iter().cloned()),
                None => {
                    report.blobs_skipped = Some(format!(
                        "base-{} was recorded before versions existed and has no blob list; its blobs are kept until it is collected",
                        base.id
                    ));
                    return Ok(());
                }
            }
        }
        let cache = self.pipeline.context().cache.clone();
        let dry_run = report.dry_run;
        let (count, bytes) = tokio::task::spawn_blocking(move || -> Result<(usize, u64), crate::image::ImageError> {
            let (mut count, mut bytes) = (0, 0);
            for (digest, size) in cache.list()? {
                if !needed.contains(digest.as_str()) {
                    if !dry_run {
                        cache.remove(&digest)?;
                    }
                    count += 1;
                    bytes += size;
                }
            }
            Ok((count, bytes))
        })
        .await
        .map_err(|e| LifecycleError::Task(format!("the blob collection task failed: {e}")))??;
        report.blobs_deleted = count;
        report.blob_bytes_deleted = bytes;
        Ok(())
    }
}
