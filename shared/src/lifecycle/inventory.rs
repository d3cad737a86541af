//! What an operator sees of the families on a host (`worker images`, the admin API's
//! `/images`, the inspector's families panel): per family its current version, the other
//! versions kept, their bases, live snapshots, layer bytes and last use.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::image::BlobCache;
use crate::store::{BaseState, SnapshotState, Store, StoreError, rfc3339};

#[derive(Clone, Debug, Serialize)]
pub struct FamilyView {
    pub family: String,
    pub source: String,
    /// The version new activations use.
    pub current: Option<VersionView>,
    /// Other versions still on the host (live snapshots keep them, or they wait for
    /// garbage collection).
    pub others: Vec<VersionView>,
    /// Live snapshots over all versions.
    pub live_snapshots: u64,
    /// The last activation (or seal) of any version, RFC 3339.
    pub last_used: Option<String>,
    /// Why the family's last prepare failed, and when (RFC 3339), until one succeeds. A
    /// family that never prepared is forgotten once this is older than the run retention.
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VersionView {
    pub digest: String,
    pub base: String,
    pub base_vol_id: u64,
    pub state: BaseState,
    pub live_snapshots: u64,
    /// Bytes of its layer blobs still in the blob cache.
    pub layer_bytes: u64,
    pub sealed_at: Option<String>,
    pub last_activated_at: Option<String>,
}

/// Every family recorded on the host, by name.
pub fn families(store: &Store, cache: Option<&BlobCache>) -> Result<Vec<FamilyView>, StoreError> {
    let mut live: HashMap<u64, u64> = HashMap::new();
    for snap in store.list_snapshots()? {
        if snap.state != SnapshotState::Released
            && let Some(base) = snap.base_vol_id
        {
            *live.entry(base).or_default() += 1;
        }
    }
    // A cache that cannot be listed shows 0 layer bytes; the rest of the view stands.
    let blob_sizes: HashMap<String, u64> = cache
        .and_then(|c| c.list().ok())
        .map(|l| l.into_iter().map(|(d, n)| (d.to_string(), n)).collect())
        .unwrap_or_default();
    let mut by_family: BTreeMap<String, Vec<crate::store::BaseRow>> = BTreeMap::new();
    for base in store.list_bases()? {
        by_family.entry(base.family.clone()).or_default().push(base);
    }
    let mut out = Vec::new();
    for image in store.list_images()? {
        let bases = by_family.remove(&image.family).unwrap_or_default();
        let mut view = FamilyView {
            family: image.family.clone(),
            source: image.source.clone(),
            current: None,
            others: Vec::new(),
            live_snapshots: 0,
            last_used: None,
            last_error: image.last_error.clone(),
            last_error_at: image.last_error_at_ms.map(rfc3339),
        };
        let mut last = None;
        for b in &bases {
            let v = VersionView {
                digest: b.digest.clone(),
                base: format!("base-{}", b.id),
                base_vol_id: b.id,
                state: b.state,
                live_snapshots: live.get(&b.id).copied().unwrap_or(0),
                layer_bytes: b.blobs.iter().flatten().filter_map(|d| blob_sizes.get(d)).sum(),
                sealed_at: b.sealed_at_ms.map(rfc3339),
                last_activated_at: b.last_activated_at_ms.map(rfc3339),
            };
            view.live_snapshots += v.live_snapshots;
            last = last.max(b.last_activated_at_ms.or(b.sealed_at_ms));
            if image.current_base == Some(b.id) {
                view.current = Some(v);
            } else {
                view.others.push(v);
            }
        }
        view.last_used = last.map(rfc3339);
        out.push(view);
    }
    Ok(out)
}
