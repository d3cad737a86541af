//! The `dmthin` backend: bases and snapshots are thin devices of one device-mapper thin
//! pool (created by the host setup and named in the config), each holding an ext4
//! filesystem. Needs root, the `dm-thin-pool` module, `mkfs.ext4` (e2fsprogs) and, for
//! listing, `thin_ls` (thin-provisioning-tools).
//!
//! - create base = `create_thin` + activate + `mkfs.ext4` + mount (for unpacking);
//! - seal = unmount, deactivate, then a `base-N.sealed` marker: snapshots are always taken
//!   from an inactive origin, so no suspend is needed;
//! - snapshot = `create_snap <snap> <base>`; expose = activate + mount;
//! - delete = unmount, deactivate, `delete <id>`.
//!
//! Thin ids are 24-bit and unique per pool: bases take `1..2^20`, snapshots
//! `2^20 + n` up to `2^24 - 1` (see [`thin_id`]); running out of a range is a clear error.
//! Each active device's uuid is derived from its thin id, and the kernel keeps uuids unique,
//! so one thin id is never active under two names.
//!
//! Files: `device.rs` the raw ioctls (no retries, no classification); `errno.rs` what an
//! errno means, as pure functions with a table test: `EEXIST` on create is checked (the id
//! must really be in the pool) and then taken as a re-run; `ENODATA` (no such device or
//! origin), `EINVAL`, `EBUSY` (after a few short retries of `delete`, made here) and any
//! error of a failed pool abort; `ENOSPC` and any error while the pool is out of data space
//! or read-only are the host's storage (`VolumeError::HostStorage`); each with the pool's
//! status in the message. Anything else is transient. `ids.rs` the thin-id ranges, `ext4.rs` the
//! filesystem in each device, `listing.rs` what the pool holds; this file the backend. Device
//! nodes are made by this backend under `<root>/dev` from major:minor: no udev, no
//! `/dev/mapper/*`.
//!
//! Layout under the volume root: `bases/base-N` and `snaps/snap-N` (mount points),
//! `bases/base-N.sealed` (markers), `dev/` (device nodes).

pub mod device;
mod errno;
mod ext4;
mod ids;
mod listing;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use devicemapper::Device;

use super::{Usage, VolumeBackend, VolumeError, VolumeId};
use crate::fault;
use device::{DmFailure, Pool};
use errno::{AfterDelete, PoolMode, Verdict};
use ext4::{c_path, empty_dir, mkfs_ext4, mount_ext4, remove_if_present, umount};
pub use ids::{SNAP_THIN_ID_BASE, THIN_ID_LIMIT, thin_id, volume_of};
use listing::parse_pool_usage;

/// Where the pool is and how big each thin device is.
#[derive(Clone, Debug)]
pub struct DmThinOptions {
    /// The pool's device-mapper name.
    pub pool: String,
    /// Mount points, seal markers and device nodes live here.
    pub root: PathBuf,
    /// The virtual size of every thin device, in bytes (a multiple of 512). Never shrink it
    /// while bases exist: snapshots take the size the config says at activation.
    pub volume_bytes: u64,
}

#[derive(Debug)]
pub struct DmThinBackend {
    pool: Pool,
    root: PathBuf,
    sectors: u64,
    prefix: String,
}

impl DmThinBackend {
    /// Opens the backend on the active thin pool `options.pool`.
    pub fn open(options: DmThinOptions) -> Result<Self, VolumeError> {
        let pool = Pool::open(&options.pool).map_err(|e| VolumeError::Abort {
            volume: format!("pool {}", options.pool),
            detail: format!(
                "{e}: create the thin pool first (see the Ansible role), or use backend = \"btrfs\" or \"dir\""
            ),
        })?;
        if options.volume_bytes < 16 << 20 || !options.volume_bytes.is_multiple_of(512) {
            return Err(VolumeError::Abort {
                volume: format!("pool {}", options.pool),
                detail: format!(
                    "volume size {} bytes: expected a multiple of 512 of at least 16 MiB",
                    options.volume_bytes
                ),
            });
        }
        for d in ["bases", "snaps", "dev"] {
            let p = options.root.join(d);
            fs::create_dir_all(&p).map_err(|e| VolumeError::io(p.display(), "creating the volume root", e))?;
        }
        let prefix = format!("thinpipe-{}", options.pool);
        Ok(Self { pool, root: options.root, sectors: options.volume_bytes / 512, prefix })
    }

    /// The raw pool, for tests and tools.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The device-mapper name of a volume's active device.
    pub fn device_name(&self, vol: VolumeId) -> String {
        format!("{}-{vol}", self.prefix)
    }

    fn uuid(&self, thin_id: u64) -> String {
        let dev = self.pool.device();
        format!("THINPIPE-{}-{}-{thin_id}", dev.major, dev.minor)
    }

    fn mount_point(&self, vol: VolumeId) -> PathBuf {
        match vol {
            VolumeId::Base(_) => self.root.join("bases").join(vol.to_string()),
            VolumeId::Snap(_) => self.root.join("snaps").join(vol.to_string()),
        }
    }

    fn seal_marker(&self, id: u64) -> PathBuf {
        self.root.join("bases").join(format!("{}.sealed", VolumeId::Base(id)))
    }

    /// The pool's status line and its mode (only in `rw` may a failure be transient).
    fn pool_state(&self) -> (String, PoolMode) {
        let status = match self.pool.status() {
            Ok(s) => s,
            Err(s) => format!("unavailable: {s}"),
        };
        let mode = PoolMode::of_status(&status);
        (status, mode)
    }

    /// A failure of this backend that looked transient is classified again by the pool's
    /// mode (full, read-only, failed), with the pool's status in the message.
    fn checked<T>(&self, r: Result<T, VolumeError>) -> Result<T, VolumeError> {
        match r {
            Err(VolumeError::Transient { volume, detail }) => {
                let (status, mode) = self.pool_state();
                if mode == PoolMode::ReadWrite {
                    return Err(VolumeError::Transient { volume, detail });
                }
                let detail = format!("{detail} [pool {} status: {status}]", self.pool.name());
                Err(verdict(errno::classify(None, mode), volume, detail))
            }
            other => other,
        }
    }

    /// A failure, classified, with the pool's status in the message.
    fn fail(&self, vol: impl std::fmt::Display, e: DmFailure) -> VolumeError {
        let (status, mode) = self.pool_state();
        let detail = format!("{e} [pool {} status: {status}]", self.pool.name());
        verdict(errno::classify(e.errno, mode), vol.to_string(), detail)
    }

    /// A block device node for `dev` under `<root>/dev`, (re)made when missing or stale.
    fn node(&self, name: &str, dev: Device) -> Result<PathBuf, VolumeError> {
        let path = self.root.join("dev").join(name);
        let want = libc::makedev(dev.major, dev.minor);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_block_device() && m.rdev() == want => return Ok(path),
            Ok(_) => fs::remove_file(&path).map_err(|e| VolumeError::io(path.display(), "removing a stale node", e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VolumeError::io(path.display(), "inspecting the node", e)),
        }
        let c = c_path(&path)?;
        // SAFETY: mknod(2) with a valid NUL-terminated path.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, want) } != 0 {
            return Err(VolumeError::io(path.display(), "making the device node", std::io::Error::last_os_error()));
        }
        Ok(path)
    }

    /// Activates `vol` and returns its device number. `ENODATA`: not in the pool.
    fn activate(&self, vol: VolumeId) -> Result<Device, DmFailure> {
        let tid = thin_id(vol).map_err(|e| DmFailure::other(format!("activating {vol}"), e.to_string()))?;
        self.pool.activate(&self.device_name(vol), &self.uuid(tid), tid, self.sectors)
    }

    /// Whether thin id of `vol` is in the pool: active, or activates (then deactivated).
    fn in_pool(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        let name = self.device_name(vol);
        if self.pool.active(&name).map_err(|e| self.fail(vol, e))?.is_some() {
            return Ok(true);
        }
        match self.activate(vol) {
            Ok(_) => {
                self.pool.deactivate(&name).map_err(|e| self.fail(vol, e))?;
                Ok(true)
            }
            Err(e) if errno::not_in_pool(e.errno) => Ok(false),
            Err(e) => Err(self.fail(vol, e)),
        }
    }

    /// Sends `create_thin`/`create_snap`; `EEXIST` is a re-run once the id is seen in the pool.
    fn create(&self, vol: VolumeId, msg: &str) -> Result<(), VolumeError> {
        match self.pool.message(msg) {
            Ok(_) => Ok(()),
            Err(e) if errno::create_may_be_rerun(e.errno) => {
                if self.in_pool(vol)? {
                    tracing::debug!(volume = %vol, "thin id already in the pool: a re-run");
                    Ok(())
                } else {
                    Err(self.fail(vol, e))
                }
            }
            Err(e) => Err(self.fail(vol, e)),
        }
    }

    fn mounted(&self, mount_point: &Path, dev: Device) -> Result<bool, VolumeError> {
        match fs::metadata(mount_point) {
            Ok(m) => Ok(m.dev() == libc::makedev(dev.major, dev.minor)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VolumeError::io(mount_point.display(), "inspecting the mount point", e)),
        }
    }

    /// Activates and mounts `vol` read-write at its mount point; `format`: make a new ext4
    /// first when mounting fails (an unsealed base whose mkfs never finished).
    fn mount(&self, vol: VolumeId, format: bool) -> Result<PathBuf, VolumeError> {
        let dev = self.activate(vol).map_err(|e| self.fail(vol, e))?;
        let mp = self.mount_point(vol);
        if self.mounted(&mp, dev)? {
            return Ok(mp);
        }
        fs::create_dir_all(&mp).map_err(|e| VolumeError::io(mp.display(), "creating the mount point", e))?;
        let node = self.node(&self.device_name(vol), dev)?;
        match mount_ext4(&node, &mp) {
            Ok(()) => Ok(mp),
            Err(e) if format => {
                tracing::info!(volume = %vol, error = %e, "no filesystem yet: making one");
                mkfs_ext4(vol, &node)?;
                mount_ext4(&node, &mp).map_err(|e| VolumeError::io(vol, "mounting after mkfs", e))?;
                Ok(mp)
            }
            Err(e) => Err(VolumeError::io(vol, &format!("mounting {} at {}", node.display(), mp.display()), e)),
        }
    }

    /// Unmounts `vol` (not mounted: nothing to do) and deactivates its device.
    fn unmount_and_deactivate(&self, vol: VolumeId) -> Result<(), VolumeError> {
        let mp = self.mount_point(vol);
        if let Some(dev) = self.pool.active(&self.device_name(vol)).map_err(|e| self.fail(vol, e))?
            && self.mounted(&mp, dev)?
        {
            umount(&mp).map_err(|e| VolumeError::io(vol, &format!("unmounting {}", mp.display()), e))?;
        }
        self.pool.deactivate(&self.device_name(vol)).map_err(|e| self.fail(vol, e))?;
        Ok(())
    }
}

impl VolumeBackend for DmThinBackend {
    fn name(&self) -> &'static str {
        "dmthin"
    }

    fn constant_time_snapshots(&self) -> bool {
        true
    }

    fn create_base(&self, id: u64) -> Result<(), VolumeError> {
        self.checked(self.create_base_inner(id))
    }

    fn reset_base(&self, id: u64) -> Result<PathBuf, VolumeError> {
        self.checked(self.reset_base_inner(id))
    }

    fn seal_base(&self, id: u64) -> Result<(), VolumeError> {
        self.checked(self.seal_base_inner(id))
    }

    fn is_sealed(&self, id: u64) -> Result<bool, VolumeError> {
        let marker = self.seal_marker(id);
        match fs::symlink_metadata(&marker) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VolumeError::io(marker.display(), "inspecting the seal marker", e)),
        }
    }

    fn snapshot(&self, base: u64, snap: u64) -> Result<(), VolumeError> {
        self.checked(self.snapshot_inner(base, snap))
    }

    fn expose(&self, snap: u64) -> Result<PathBuf, VolumeError> {
        self.checked(self.mount(VolumeId::Snap(snap), false))
    }

    /// Its device is active and mounted at its mount point: a reboot (or an unmount by hand)
    /// leaves the thin device in the pool, but neither.
    fn is_exposed(&self, snap: u64) -> Result<bool, VolumeError> {
        let vol = VolumeId::Snap(snap);
        match self.pool.active(&self.device_name(vol)).map_err(|e| self.fail(vol, e))? {
            Some(dev) => self.mounted(&self.mount_point(vol), dev),
            None => Ok(false),
        }
    }

    fn delete(&self, vol: VolumeId) -> Result<(), VolumeError> {
        self.checked(self.delete_inner(vol))
    }

    fn exists(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        self.checked(self.in_pool(vol))
    }

    fn place(&self) -> Result<super::Place, VolumeError> {
        let dev = self.pool.device();
        Ok(super::Place {
            backend: "dmthin".into(),
            location: format!("pool {} mounted under {}", self.pool.name(), self.root.display()),
            filesystem: format!("thin pool device {}:{}", dev.major, dev.minor),
        })
    }

    fn usage(&self) -> Result<Usage, VolumeError> {
        let volume = format!("pool {}", self.pool.name());
        let status = self.pool.status().map_err(|e| self.fail(&volume, e))?;
        let table = self.pool.table(&self.pool.name()).map_err(|e| self.fail(&volume, e))?;
        let block_sectors = table.first().and_then(|(_, _, _, p)| p.split_whitespace().nth(2)?.parse::<u64>().ok());
        let bad =
            || VolumeError::Abort { volume: volume.clone(), detail: format!("unexpected pool status {status:?}") };
        let (meta, data) = parse_pool_usage(&status).ok_or_else(bad)?;
        let block_bytes = block_sectors.ok_or_else(bad)? * 512;
        Ok(Usage {
            what: "pool data".into(),
            used_bytes: data.0 * block_bytes,
            total_bytes: data.1 * block_bytes,
            metadata_blocks: Some(meta),
        })
    }

    fn list(&self) -> Result<Vec<VolumeId>, VolumeError> {
        let ids = self.checked(self.thin_ids())?;
        let mut out: Vec<VolumeId> = ids.iter().filter_map(|&t| volume_of(t)).collect();
        let foreign = ids.len() - out.len();
        if foreign > 0 {
            tracing::warn!(pool = %self.pool.name(), foreign, "thin ids outside thinpipe's ranges (not listed)");
        }
        out.sort();
        Ok(out)
    }
}

/// The operations, unclassified by pool mode ([`DmThinBackend::checked`] does that).
impl DmThinBackend {
    fn create_base_inner(&self, id: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Base(id);
        if self.is_sealed(id)? {
            return Ok(());
        }
        let tid = thin_id(vol)?;
        self.create(vol, &format!("create_thin {tid}"))?;
        fault::point("dmthin.after_create_thin", &vol.to_string());
        self.mount(vol, true)?;
        Ok(())
    }

    fn reset_base_inner(&self, id: u64) -> Result<PathBuf, VolumeError> {
        let vol = VolumeId::Base(id);
        if self.is_sealed(id)? {
            return Err(VolumeError::Abort { volume: vol.to_string(), detail: "sealed: cannot be written".into() });
        }
        let root = self.mount(vol, true)?;
        empty_dir(&root, vol)?;
        Ok(root)
    }

    fn seal_base_inner(&self, id: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Base(id);
        if self.is_sealed(id)? {
            return Ok(());
        }
        if !self.in_pool(vol)? {
            return Err(VolumeError::Abort { volume: vol.to_string(), detail: "no such base in the pool".into() });
        }
        // Unmounting writes the filesystem back; deactivating makes the origin inactive.
        self.unmount_and_deactivate(vol)?;
        let marker = self.seal_marker(id);
        let file = fs::File::create(&marker).map_err(|e| VolumeError::io(vol, "writing the seal marker", e))?;
        file.sync_all().map_err(|e| VolumeError::io(vol, "syncing the seal marker", e))?;
        let dir = self.root.join("bases");
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| VolumeError::io(vol, "syncing the bases directory", e))?;
        Ok(())
    }

    fn snapshot_inner(&self, base: u64, snap: u64) -> Result<(), VolumeError> {
        let (origin, vol) = (VolumeId::Base(base), VolumeId::Snap(snap));
        if !self.is_sealed(base)? {
            return Err(VolumeError::Abort { volume: vol.to_string(), detail: format!("{origin} is not sealed") });
        }
        // Never snapshot an active origin (a crash may have left it active): deactivate first.
        self.pool.deactivate(&self.device_name(origin)).map_err(|e| self.fail(origin, e))?;
        let msg = format!("create_snap {} {}", thin_id(vol)?, thin_id(origin)?);
        self.create(vol, &msg)
    }

    fn delete_inner(&self, vol: VolumeId) -> Result<(), VolumeError> {
        self.unmount_and_deactivate(vol)?;
        let msg = format!("delete {}", thin_id(vol)?);
        for attempt in 1.. {
            match self.pool.message(&msg) {
                Ok(_) => break,
                Err(e) => match errno::after_delete(e.errno, attempt) {
                    AfterDelete::Gone => break,
                    AfterDelete::RetryAfter(pause) => std::thread::sleep(pause),
                    AfterDelete::Fail => return Err(self.fail(vol, e)),
                },
            }
        }
        if let VolumeId::Base(id) = vol {
            remove_if_present(&self.seal_marker(id), vol)?;
        }
        remove_if_present(&self.mount_point(vol), vol)?;
        remove_if_present(&self.root.join("dev").join(self.device_name(vol)), vol)
    }
}

/// The error a [`Verdict`] makes.
fn verdict(verdict: Verdict, volume: String, detail: String) -> VolumeError {
    match verdict {
        Verdict::Abort => VolumeError::Abort { volume, detail },
        Verdict::HostStorage => VolumeError::HostStorage { volume, detail },
        Verdict::Transient => VolumeError::Transient { volume, detail },
    }
}
