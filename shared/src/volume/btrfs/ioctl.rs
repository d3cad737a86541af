//! Raw btrfs ioctls (from `linux/btrfs.h`), nothing else: each call is one syscall on a
//! directory fd and returns the OS error as is. State, idempotency and error classification
//! live in the backend above.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const BTRFS_IOCTL_MAGIC: u64 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
/// `BTRFS_SUBVOL_RDONLY`: the subvolume (or snapshot) is read-only.
pub const SUBVOL_RDONLY: u64 = 1 << 1;
/// `statfs(2)` `f_type` of a btrfs filesystem.
pub const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` (the unions flattened to their byte sizes).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}

const IOC_SUBVOL_CREATE: u64 = iow(14, size_of::<VolArgs>());
const IOC_SNAP_DESTROY: u64 = iow(15, size_of::<VolArgs>());
const IOC_SNAP_CREATE_V2: u64 = iow(23, size_of::<VolArgsV2>());
const IOC_SUBVOL_GETFLAGS: u64 = ior(25, size_of::<u64>());
const IOC_SUBVOL_SETFLAGS: u64 = iow(26, size_of::<u64>());

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn copy_name(dst: &mut [u8], name: &CStr) -> io::Result<()> {
    let bytes = name.to_bytes_with_nul();
    if bytes.len() > dst.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    dst[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Creates subvolume `name` in directory `parent`.
pub fn subvol_create(parent: &File, name: &CStr) -> io::Result<()> {
    let mut args = VolArgs { fd: 0, name: [0; BTRFS_PATH_NAME_MAX + 1] };
    copy_name(&mut args.name, name)?;
    // SAFETY: `args` is a valid, initialised `btrfs_ioctl_vol_args` that outlives the call.
    check(unsafe { libc::ioctl(parent.as_raw_fd(), IOC_SUBVOL_CREATE as _, &mut args) })
}

/// Snapshots subvolume `source` as `name` in directory `parent`, read-only if `readonly`.
pub fn snapshot_create(parent: &File, name: &CStr, source: &File, readonly: bool) -> io::Result<()> {
    let mut args = VolArgsV2 {
        fd: i64::from(source.as_raw_fd()),
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    };
    copy_name(&mut args.name, name)?;
    // SAFETY: as above, for `btrfs_ioctl_vol_args_v2`.
    check(unsafe { libc::ioctl(parent.as_raw_fd(), IOC_SNAP_CREATE_V2 as _, &mut args) })
}

/// Deletes subvolume `name` in directory `parent` (read-only ones too, as root).
pub fn subvol_destroy(parent: &File, name: &CStr) -> io::Result<()> {
    let mut args = VolArgs { fd: 0, name: [0; BTRFS_PATH_NAME_MAX + 1] };
    copy_name(&mut args.name, name)?;
    // SAFETY: as above.
    check(unsafe { libc::ioctl(parent.as_raw_fd(), IOC_SNAP_DESTROY as _, &mut args) })
}

/// The subvolume's flags (`SUBVOL_RDONLY`).
pub fn subvol_flags(subvol: &File) -> io::Result<u64> {
    let mut flags = 0u64;
    // SAFETY: the kernel writes one u64 into `flags`.
    check(unsafe { libc::ioctl(subvol.as_raw_fd(), IOC_SUBVOL_GETFLAGS as _, &mut flags) })?;
    Ok(flags)
}

pub fn set_subvol_flags(subvol: &File, flags: u64) -> io::Result<()> {
    let mut flags = flags;
    // SAFETY: the kernel reads one u64 from `flags`.
    check(unsafe { libc::ioctl(subvol.as_raw_fd(), IOC_SUBVOL_SETFLAGS as _, &mut flags) })
}

/// The `f_type` of the filesystem holding `dir`.
pub fn fs_type(dir: &File) -> io::Result<i64> {
    // SAFETY: fstatfs fills the zeroed struct; the fd is open for the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) })?;
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_header() {
        // Values as the C macros compute them on x86_64 (checked against linux/btrfs.h).
        assert_eq!(size_of::<VolArgs>(), 4096);
        assert_eq!(size_of::<VolArgsV2>(), 4096);
        assert_eq!(IOC_SUBVOL_CREATE, 0x5000_940E);
        assert_eq!(IOC_SNAP_DESTROY, 0x5000_940F);
        assert_eq!(IOC_SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(IOC_SUBVOL_GETFLAGS, 0x8008_9419);
        assert_eq!(IOC_SUBVOL_SETFLAGS, 0x4008_941A);
    }
}
