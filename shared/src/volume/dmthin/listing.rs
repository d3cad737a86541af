//! What the pool holds, read from the kernel and the pool's metadata: its thin ids (`thin_ls`
//! on a metadata snapshot), active devices mapping its ids under foreign names, and its
//! usage from the status line.

use std::process::Command;

use super::device::ActiveDevice;
use super::{DmThinBackend, errno, ids::volume_of};
use crate::volume::VolumeError;

impl DmThinBackend {
    /// Thin ids in the pool, read with `thin_ls` from a metadata snapshot of the live pool.
    pub fn thin_ids(&self) -> Result<Vec<u64>, VolumeError> {
        let pool_vol = format!("pool {}", self.pool.name());
        let meta = self.pool.metadata_device().map_err(|e| self.fail(&pool_vol, e))?;
        let node = self.node(&format!("{}-tmeta", self.prefix), meta)?;
        // A snapshot left by an interrupted listing blocks a new one: release it first.
        if let Err(e) = self.pool.message("reserve_metadata_snap") {
            if !errno::metadata_snap_held(e.errno) {
                return Err(self.fail(&pool_vol, e));
            }
            self.pool.message("release_metadata_snap").map_err(|e| self.fail(&pool_vol, e))?;
            self.pool.message("reserve_metadata_snap").map_err(|e| self.fail(&pool_vol, e))?;
        }
        let listed =
            Command::new("thin_ls").arg("--metadata-snap").args(["--no-headers", "-o", "DEV"]).arg(&node).output();
        // Released whatever the listing did; a failed release is the error that matters more
        // (a held metadata snapshot pins the pool's metadata until the next listing frees it).
        self.pool.message("release_metadata_snap").map_err(|e| self.fail(&pool_vol, e))?;
        let out = listed.map_err(|e| VolumeError::Abort {
            volume: pool_vol.clone(),
            detail: format!("running thin_ls: {e} (install thin-provisioning-tools)"),
        })?;
        if !out.status.success() {
            return Err(VolumeError::Transient {
                volume: pool_vol,
                detail: format!("thin_ls {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        let mut ids = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
            let id = line.trim().parse::<u64>().map_err(|e| VolumeError::Transient {
                volume: pool_vol.clone(),
                detail: format!("thin_ls printed {line:?}: {e}"),
            })?;
            ids.push(id);
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Active devices that map a thin id of this pool under a name this backend would not
    /// use for it (a second name for one thin id).
    pub fn foreign_activations(&self) -> Result<Vec<(String, u64)>, VolumeError> {
        let pool_dev = self.pool.device().to_string();
        let devices = self.pool.devices().map_err(|e| self.fail(format!("pool {}", self.pool.name()), e))?;
        let mut out = Vec::new();
        for ActiveDevice { name, table } in devices {
            let Some((target, params)) = table else { continue };
            let mut p = params.split_whitespace();
            if target != "thin" || p.next() != Some(pool_dev.as_str()) {
                continue;
            }
            let Some(tid) = p.next().and_then(|t| t.parse::<u64>().ok()) else { continue };
            if volume_of(tid).is_none_or(|vol| self.device_name(vol) != name) {
                out.push((name, tid));
            }
        }
        Ok(out)
    }
}

/// The (used, total) metadata and data blocks of a pool status line
/// (`<transaction> <meta used>/<total> <data used>/<total> ...`).
pub(super) fn parse_pool_usage(status: &str) -> Option<((u64, u64), (u64, u64))> {
    let mut fields = status.split_whitespace().skip(1);
    let mut pair = || {
        let (used, total) = fields.next()?.split_once('/')?;
        Some((used.parse().ok()?, total.parse().ok()?))
    };
    Some((pair()?, pair()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pool_usage_is_read_from_the_status_line() {
        let status = "5 281/4096 1920/8192 - rw no_discard_passdown queue_if_no_space - 1024";
        assert_eq!(super::parse_pool_usage(status), Some(((281, 4096), (1920, 8192))));
        assert_eq!(super::parse_pool_usage("Fail"), None);
    }
}
