//! Volume backends: where bases and snapshots live.
//!
//! One trait, [`VolumeBackend`]: create a base, open it for writing, seal it, snapshot it,
//! expose a snapshot, delete, exists, list. Every call is idempotent (doing it twice is
//! doing it once), because a step that makes it may run again after a crash. Each backend
//! maps its errors to [`VolumeError`]'s kinds (transient, abort, host storage) at its boundary.
//! Calls are blocking; async callers use `spawn_blocking`.
//!
//! Backends: `dir` (plain directories, reflink copies where the filesystem has them; no
//! root; O(files) snapshots, and says so), `overlay` (a base directory as the lower layer of
//! an overlayfs mount per snapshot; O(1); root), `btrfs` (subvolumes and O(1) snapshots by
//! ioctl; root) and `dmthin` (thin devices of a device-mapper pool, by ioctl; root).
//! `conformance` is the one test suite every backend must pass (public with `test-support`,
//! so the dm-thin guest runs it too); `testfs` makes loop-mounted filesystems for tests. [`Traced`] wraps any backend so its calls are spans
//! named the same whichever backend it is (the worker opens every backend through it).

mod btrfs;
mod dir;
pub mod dmthin;
mod overlay;
mod traced;

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;

use std::fmt;
use std::path::PathBuf;

pub use btrfs::BtrfsBackend;
/// The raw btrfs calls, for the benchmark's floor.
pub use btrfs::ioctl as btrfs_ioctl;
#[cfg(any(test, feature = "test-support"))]
pub mod testfs;
pub use dir::DirBackend;
pub use dmthin::{DmThinBackend, DmThinOptions};
/// The raw overlayfs calls, for the benchmark's floor.
pub use overlay::mount as overlay_mount;
pub use overlay::{OverlayBackend, OverlayOptions};
pub use traced::Traced;

/// A volume: a base (one per family) or a snapshot (one per activation), by sequence id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VolumeId {
    Base(u64),
    Snap(u64),
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeId::Base(id) => write!(f, "base-{id}"),
            VolumeId::Snap(id) => write!(f, "snap-{id}"),
        }
    }
}

impl VolumeId {
    /// Parses `base-N` / `snap-N`.
    pub fn parse(s: &str) -> Option<VolumeId> {
        if let Some(n) = s.strip_prefix("base-") {
            n.parse().ok().filter(|n| *n > 0).map(VolumeId::Base)
        } else if let Some(n) = s.strip_prefix("snap-") {
            n.parse().ok().filter(|n| *n > 0).map(VolumeId::Snap)
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// May succeed if tried again (I/O hiccup, busy device).
    #[error("volume {volume}: {detail}")]
    Transient { volume: String, detail: String },
    /// The host's storage is full or read-only (a full filesystem or quota, a thin pool out
    /// of data space or switched to read-only): retrying does not help until an operator
    /// frees space; the job fails with the `host_storage` cause.
    #[error("volume {volume}: {detail}; the host's storage is full or read-only")]
    HostStorage { volume: String, detail: String },
    /// Will not succeed by retrying (missing origin, sealed base written to, a refused call).
    #[error("volume {volume}: {detail}")]
    Abort { volume: String, detail: String },
    /// The volume exists but its contents can no longer be trusted (a `volatile` overlay
    /// snapshot that lost its mount): it must be released, never handed out again.
    #[error("volume {volume}: {detail}; it must be released")]
    Lost { volume: String, detail: String },
}

impl VolumeError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transient { .. } => true,
            Self::HostStorage { .. } | Self::Abort { .. } | Self::Lost { .. } => false,
        }
    }

    /// Classifies an I/O error: out of space and read-only are the host's storage,
    /// permission problems abort, the rest may pass.
    pub(crate) fn io(volume: impl fmt::Display, what: &str, e: std::io::Error) -> Self {
        let volume = volume.to_string();
        let detail = format!("{what}: {e}");
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS) => Self::HostStorage { volume, detail },
            Some(libc::EACCES | libc::EPERM | libc::ENOTDIR) => Self::Abort { volume, detail },
            _ => Self::Transient { volume, detail },
        }
    }
}

/// The volumes under `<root>/bases` and `<root>/snaps` (the layout both file-based backends
/// use), sorted. Names that are not `base-N` / `snap-N` directories are ignored.
fn list_layout(root: &std::path::Path) -> Result<Vec<VolumeId>, VolumeError> {
    let mut out = Vec::new();
    for d in ["bases", "snaps"] {
        let dir = root.join(d);
        let entries = std::fs::read_dir(&dir).map_err(|e| VolumeError::io(dir.display(), "listing", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| VolumeError::io(dir.display(), "listing", e))?;
            if let Some(vol) = entry.file_name().to_str().and_then(VolumeId::parse)
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                out.push(vol);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where bases and snapshots live.
pub trait VolumeBackend: Send + Sync {
    /// The backend's name (`dir`, `overlay`, `btrfs`, `dmthin`).
    fn name(&self) -> &'static str;
    /// Whether a snapshot costs O(1) regardless of the base's size.
    fn constant_time_snapshots(&self) -> bool;
    /// Creates an empty, writable base. Existing and unsealed: nothing to do.
    fn create_base(&self, id: u64) -> Result<(), VolumeError>;
    /// Empties an unsealed base and returns its root for writing (a rerun starts clean).
    fn reset_base(&self, id: u64) -> Result<PathBuf, VolumeError>;
    /// Makes a base read-only; snapshots are taken from sealed bases only. Idempotent.
    fn seal_base(&self, id: u64) -> Result<(), VolumeError>;
    fn is_sealed(&self, id: u64) -> Result<bool, VolumeError>;
    /// Creates snapshot `snap` of sealed base `base`. Existing: nothing to do.
    fn snapshot(&self, base: u64, snap: u64) -> Result<(), VolumeError>;
    /// Makes a snapshot usable and returns its path (a mount point or directory).
    fn expose(&self, snap: u64) -> Result<PathBuf, VolumeError>;
    /// Whether a snapshot is usable at the path `expose` returns. A backend that mounts
    /// snapshots says no for one a reboot unmounted (`expose` mounts it again).
    fn is_exposed(&self, snap: u64) -> Result<bool, VolumeError> {
        self.exists(VolumeId::Snap(snap))
    }
    /// Deletes a volume. Missing: nothing to do.
    fn delete(&self, vol: VolumeId) -> Result<(), VolumeError>;
    fn exists(&self, vol: VolumeId) -> Result<bool, VolumeError>;
    /// Every volume this backend holds.
    fn list(&self) -> Result<Vec<VolumeId>, VolumeError>;
    /// How full the storage under the volumes is.
    fn usage(&self) -> Result<Usage, VolumeError>;
    /// Where this backend keeps its volumes: recorded in the host database at first use, so
    /// a command run with other settings is refused instead of seeing live volumes as missing.
    fn place(&self) -> Result<Place, VolumeError>;
    /// In-between artifacts: what a create or snapshot interrupted by a crash (or a full disk)
    /// leaves beside the volumes (a `dir` snapshot's half copy). Each belongs to one volume,
    /// and is never a volume itself. Backends whose creates are atomic have none.
    fn leftovers(&self) -> Result<Vec<Leftover>, VolumeError> {
        Ok(Vec::new())
    }
    /// Removes one in-between artifact. Missing: nothing to do. Removing the artifact of a
    /// create still in progress makes that create fail (transient) and start again.
    fn remove_leftover(&self, _leftover: &Leftover) -> Result<(), VolumeError> {
        Ok(())
    }
    /// Waits (at most `timeout`) until the space of volumes deleted so far counts as free.
    /// Immediate on backends whose `delete` frees it (dir, dm-thin); btrfs frees a deleted
    /// subvolume's blocks in the kernel's cleaner, after a transaction commit (up to a
    /// minute later with the default `commit=30`).
    fn wait_reclaimed(&self, _timeout: std::time::Duration) -> Result<(), VolumeError> {
        Ok(())
    }
}

/// Where a backend's volumes live: compared as a whole with what the host database recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Place {
    /// The backend's name (`dir`, `overlay`, `btrfs`, `dmthin`).
    pub backend: String,
    /// The volume directory (absolute), or for dm-thin the pool and its mount root.
    pub location: String,
    /// The filesystem (type and id) or device the volumes are on.
    pub filesystem: String,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {} at {} ({})", self.backend, self.location, self.filesystem)
    }
}

/// An in-between artifact (see [`VolumeBackend::leftovers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// The volume whose create or snapshot left it.
    pub of: VolumeId,
    /// Where it is (a path), for messages and removal.
    pub path: PathBuf,
    /// Bytes it holds on disk.
    pub bytes: u64,
}

/// The place of a file-based backend's volumes under `root`: its absolute path and the
/// filesystem's type and id (stable across mounts for btrfs, ext4 and XFS: they derive it
/// from the filesystem's UUID).
fn directory_place(backend: &str, root: &std::path::Path) -> Result<Place, VolumeError> {
    let location = std::fs::canonicalize(root).map_err(|e| VolumeError::io(root.display(), "resolving", e))?;
    let inspect = |e: nix::errno::Errno| VolumeError::io(root.display(), "inspecting the filesystem", e.into());
    let kind = nix::sys::statfs::statfs(&location).map_err(inspect)?.filesystem_type();
    let id = nix::sys::statvfs::statvfs(&location).map_err(inspect)?.filesystem_id();
    Ok(Place {
        backend: backend.into(),
        location: location.display().to_string(),
        filesystem: format!("{} {id:016x}", filesystem_name(kind)),
    })
}

fn filesystem_name(t: nix::sys::statfs::FsType) -> String {
    use nix::sys::statfs as s;
    let known = [
        (s::BTRFS_SUPER_MAGIC, "btrfs"),
        (s::EXT4_SUPER_MAGIC, "ext4"),
        (s::XFS_SUPER_MAGIC, "xfs"),
        (s::TMPFS_MAGIC, "tmpfs"),
        (s::OVERLAYFS_SUPER_MAGIC, "overlay"),
    ];
    known.iter().find(|(m, _)| *m == t).map_or_else(|| format!("fs type {:#x}", t.0), |(_, n)| (*n).to_string())
}

/// How full a backend's storage is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// What was measured, for messages: "pool data", "volumes filesystem".
    pub what: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
    /// dm-thin only: the pool's metadata blocks, used and total.
    pub metadata_blocks: Option<(u64, u64)>,
}

impl Usage {
    /// Data used, in percent of the total.
    pub fn percent(&self) -> f64 {
        percent(self.used_bytes, self.total_bytes)
    }

    /// Metadata used, in percent (dm-thin only).
    pub fn metadata_percent(&self) -> Option<f64> {
        self.metadata_blocks.map(|(used, total)| percent(used, total))
    }
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 { 100.0 } else { used as f64 * 100.0 / total as f64 }
}

/// The usage of the filesystem holding `path`, as `df` computes it: used over used plus
/// what an unprivileged writer may still use.
fn filesystem_usage(path: &std::path::Path) -> Result<Usage, VolumeError> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| VolumeError::io(path.display(), "measuring the filesystem", std::io::Error::from(e)))?;
    let unit = st.fragment_size() as u64;
    let used = (st.blocks() as u64).saturating_sub(st.blocks_free() as u64) * unit;
    let available = st.blocks_available() as u64 * unit;
    Ok(Usage {
        what: "volumes filesystem".into(),
        used_bytes: used,
        total_bytes: used + available,
        metadata_blocks: None,
    })
}
