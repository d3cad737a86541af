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
//! `device.rs` holds the raw ioctls; this file decides what an errno means: `EEXIST` on
//! create is checked (the id must really be in the pool) and then taken as a re-run;
//! `ENODATA` (no such device or origin), `EINVAL`, `ENOSPC`, `EBUSY` (after a few short
//! retries here; `device.rs` has none) and any error while the pool is not in `rw` mode abort with the pool's
//! status in the message; anything else is transient. Device nodes are made by this
//! backend under `<root>/dev` from major:minor: no udev, no `/dev/mapper/*`.
//!
//! Layout under the volume root: `bases/base-N` and `snaps/snap-N` (mount points),
//! `bases/base-N.sealed` (markers), `dev/` (device nodes).

pub mod device;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use devicemapper::Device;

use super::{Usage, VolumeBackend, VolumeError, VolumeId};
use crate::fault;
use device::{DmFailure, Pool};

/// Thin ids are 24-bit.
pub const THIN_ID_LIMIT: u64 = 1 << 24;
/// Snapshots take thin ids from here up; bases take those below.
pub const SNAP_THIN_ID_BASE: u64 = 1 << 20;

/// The pool-wide thin id of a volume, or an abort when its range is exhausted.
pub fn thin_id(vol: VolumeId) -> Result<u64, VolumeError> {
    let (id, ok) = match vol {
        VolumeId::Base(n) => (n, n > 0 && n < SNAP_THIN_ID_BASE),
        VolumeId::Snap(n) => (SNAP_THIN_ID_BASE.saturating_add(n), n > 0 && n < THIN_ID_LIMIT - SNAP_THIN_ID_BASE),
    };
    if ok {
        Ok(id)
    } else {
        let (range, limit) = match vol {
            VolumeId::Base(_) => ("base", SNAP_THIN_ID_BASE - 1),
            VolumeId::Snap(_) => ("snapshot", THIN_ID_LIMIT - SNAP_THIN_ID_BASE - 1),
        };
        Err(VolumeError::Abort {
            volume: vol.to_string(),
            detail: format!(
                "the {range} range of dm-thin ids is exhausted (at most {limit} {range}s per pool): \
                 drain the host and recreate its pool and state"
            ),
        })
    }
}

/// The volume a thin id belongs to (`None` for ids outside both ranges).
pub fn volume_of(thin_id: u64) -> Option<VolumeId> {
    match thin_id {
        0 => None,
        n if n < SNAP_THIN_ID_BASE => Some(VolumeId::Base(n)),
        n if n < THIN_ID_LIMIT => Some(VolumeId::Snap(n - SNAP_THIN_ID_BASE)),
        _ => None,
    }
}

/// How often `delete` is tried while the kernel says the thin id is busy.
const DELETE_BUSY_ATTEMPTS: u32 = 4;

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

fn errno_is(e: &DmFailure, errnos: &[i32]) -> bool {
    e.errno.is_some_and(|n| errnos.contains(&n))
}

fn c_path(path: &Path) -> Result<CString, VolumeError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VolumeError::Abort { volume: path.display().to_string(), detail: "path contains NUL".into() })
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

    /// The pool's status line and whether it is in `rw` mode (the only mode in which a
    /// failure may be transient).
    fn pool_state(&self) -> (String, bool) {
        let status = match self.pool.status() {
            Ok(s) => s,
            Err(s) => format!("unavailable: {s}"),
        };
        // status: "<transaction> <meta> <data> <held root> rw|ro|out_of_data_space ..." or "Fail".
        let rw = status.split_whitespace().nth(4) == Some("rw");
        (status, rw)
    }

    /// Any failure of this backend while the pool is not `rw` (read-only, failed, out of
    /// data space) is an abort, with the pool's status in the message.
    fn checked<T>(&self, r: Result<T, VolumeError>) -> Result<T, VolumeError> {
        match r {
            Err(VolumeError::Transient { volume, detail }) => {
                let (status, rw) = self.pool_state();
                if rw {
                    Err(VolumeError::Transient { volume, detail })
                } else {
                    let detail = format!("{detail} [pool {} status: {status}]", self.pool.name());
                    Err(VolumeError::Abort { volume, detail })
                }
            }
            other => other,
        }
    }

    /// A failure, classified, with the pool's status in the message.
    fn fail(&self, vol: impl std::fmt::Display, e: DmFailure) -> VolumeError {
        let (status, mode_ok) = self.pool_state();
        let detail = format!("{e} [pool {} status: {status}]", self.pool.name());
        let hard = errno_is(&e, &[libc::ENODATA, libc::EINVAL, libc::ENOSPC, libc::EBUSY, libc::EEXIST, libc::EPERM]);
        if hard || !mode_ok {
            VolumeError::Abort { volume: vol.to_string(), detail }
        } else {
            VolumeError::Transient { volume: vol.to_string(), detail }
        }
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
            Err(e) if errno_is(&e, &[libc::ENODATA]) => Ok(false),
            Err(e) => Err(self.fail(vol, e)),
        }
    }

    /// Sends `create_thin`/`create_snap`; `EEXIST` is a re-run once the id is seen in the pool.
    fn create(&self, vol: VolumeId, msg: &str) -> Result<(), VolumeError> {
        match self.pool.message(msg) {
            Ok(_) => Ok(()),
            Err(e) if errno_is(&e, &[libc::EEXIST]) => {
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

    /// Thin ids in the pool, read with `thin_ls` from a metadata snapshot of the live pool.
    pub fn thin_ids(&self) -> Result<Vec<u64>, VolumeError> {
        let pool_vol = format!("pool {}", self.pool.name());
        let meta = self.pool.metadata_device().map_err(|e| self.fail(&pool_vol, e))?;
        let node = self.node(&format!("{}-tmeta", self.prefix), meta)?;
        // A snapshot left by an interrupted listing blocks a new one: release it first.
        if let Err(e) = self.pool.message("reserve_metadata_snap") {
            if !errno_is(&e, &[libc::EBUSY, libc::EINVAL]) {
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
        for device::ActiveDevice { name, table } in devices {
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

fn mkfs_ext4(vol: VolumeId, node: &Path) -> Result<(), VolumeError> {
    // No discard (a whole-device discard is slow on thin and pointless on a new device).
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"])
        .arg(node)
        .output()
        .map_err(|e| VolumeError::Abort {
            volume: vol.to_string(),
            detail: format!("running mkfs.ext4: {e} (install e2fsprogs)"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VolumeError::Transient {
            volume: vol.to_string(),
            detail: format!("mkfs.ext4 {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

fn mount_ext4(node: &Path, mount_point: &Path) -> std::io::Result<()> {
    let src = CString::new(node.as_os_str().as_bytes())?;
    let dst = CString::new(mount_point.as_os_str().as_bytes())?;
    // SAFETY: mount(2) with valid NUL-terminated strings and a NULL data pointer.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), c"ext4".as_ptr(), libc::MS_NOATIME, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn umount(mount_point: &Path) -> std::io::Result<()> {
    let dst = CString::new(mount_point.as_os_str().as_bytes())?;
    // SAFETY: umount2(2) with a valid NUL-terminated path.
    if unsafe { libc::umount2(dst.as_ptr(), 0) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn remove_if_present(path: &Path, vol: VolumeId) -> Result<(), VolumeError> {
    let removed = if path.is_dir() { fs::remove_dir(path) } else { fs::remove_file(path) };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io(vol, &format!("removing {}", path.display()), e)),
    }
}

/// Empties a directory (the root of an unsealed base) without removing it.
fn empty_dir(root: &Path, vol: VolumeId) -> Result<(), VolumeError> {
    let entries = fs::read_dir(root).map_err(|e| VolumeError::io(vol, "listing the base", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| VolumeError::io(vol, "listing the base", e))?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(|e| VolumeError::io(vol, &format!("emptying {}", path.display()), e))?;
    }
    Ok(())
}

impl VolumeBackend for DmThinBackend {
    fn name(&self) -> &'static str {
        "dmthin"
    }

    fn constant_time_snapshots(&self) -> bool {
        true
    }

    #[tracing::instrument(
        name = "volume.create_base",
        level = "info",
        skip(self),
        fields(backend = "dmthin"),
        err(Display)
    )]
    fn create_base(&self, id: u64) -> Result<(), VolumeError> {
        self.checked(self.create_base_inner(id))
    }

    #[tracing::instrument(
        name = "volume.reset_base",
        level = "info",
        skip(self),
        fields(backend = "dmthin"),
        err(Display)
    )]
    fn reset_base(&self, id: u64) -> Result<PathBuf, VolumeError> {
        self.checked(self.reset_base_inner(id))
    }

    #[tracing::instrument(name = "volume.seal", level = "info", skip(self), fields(backend = "dmthin"), err(Display))]
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

    #[tracing::instrument(
        name = "volume.snapshot",
        level = "info",
        skip(self),
        fields(backend = "dmthin"),
        err(Display)
    )]
    fn snapshot(&self, base: u64, snap: u64) -> Result<(), VolumeError> {
        self.checked(self.snapshot_inner(base, snap))
    }

    #[tracing::instrument(name = "volume.expose", level = "info", skip(self), fields(backend = "dmthin"), err(Display))]
    fn expose(&self, snap: u64) -> Result<PathBuf, VolumeError> {
        self.checked(self.mount(VolumeId::Snap(snap), false))
    }

    #[tracing::instrument(name = "volume.delete", level = "info", skip(self), fields(backend = "dmthin"), err(Display))]
    fn delete(&self, vol: VolumeId) -> Result<(), VolumeError> {
        self.checked(self.delete_inner(vol))
    }

    fn exists(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        self.checked(self.in_pool(vol))
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
        // EBUSY: the id is open elsewhere (maybe closing now): a few short retries, then abort.
        for attempt in 1.. {
            match self.pool.message(&msg) {
                Ok(_) => break,
                Err(e) if errno_is(&e, &[libc::ENODATA]) => break, // already gone
                Err(e) if errno_is(&e, &[libc::EBUSY]) && attempt < DELETE_BUSY_ATTEMPTS => {
                    std::thread::sleep(std::time::Duration::from_millis(50 * attempt as u64));
                }
                Err(e) => return Err(self.fail(vol, e)),
            }
        }
        if let VolumeId::Base(id) = vol {
            remove_if_present(&self.seal_marker(id), vol)?;
        }
        remove_if_present(&self.mount_point(vol), vol)?;
        remove_if_present(&self.root.join("dev").join(self.device_name(vol)), vol)
    }
}

/// The (used, total) metadata and data blocks of a pool status line
/// (`<transaction> <meta used>/<total> <data used>/<total> ...`).
fn parse_pool_usage(status: &str) -> Option<((u64, u64), (u64, u64))> {
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

    use super::*;

    #[test]
    fn thin_id_ranges_are_disjoint_and_bounded() {
        assert_eq!(thin_id(VolumeId::Base(1)).unwrap(), 1);
        assert_eq!(thin_id(VolumeId::Base(SNAP_THIN_ID_BASE - 1)).unwrap(), SNAP_THIN_ID_BASE - 1);
        assert!(thin_id(VolumeId::Base(SNAP_THIN_ID_BASE)).unwrap_err().to_string().contains("base range"));
        assert_eq!(thin_id(VolumeId::Snap(1)).unwrap(), SNAP_THIN_ID_BASE + 1);
        assert_eq!(thin_id(VolumeId::Snap(THIN_ID_LIMIT - SNAP_THIN_ID_BASE - 1)).unwrap(), THIN_ID_LIMIT - 1);
        let err = thin_id(VolumeId::Snap(THIN_ID_LIMIT - SNAP_THIN_ID_BASE)).unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("snapshot range of dm-thin ids is exhausted"), "{err}");
        assert!(thin_id(VolumeId::Base(0)).is_err());
        for vol in [VolumeId::Base(7), VolumeId::Snap(7), VolumeId::Snap(123_456)] {
            assert_eq!(volume_of(thin_id(vol).unwrap()), Some(vol));
        }
        assert_eq!(volume_of(0), None);
        assert_eq!(volume_of(THIN_ID_LIMIT), None);
    }
}
