//! The raw XFS project-quota calls that bound one overlay snapshot's writes: a project id on
//! its upper and work directories (inherited by everything made under them) and a block
//! limit for that project. No state and no policy: `mod.rs` decides when to use them.
//!
//! `quotactl_fd(2)` names the filesystem by any open file on it (no block device path to
//! find); the structures are the kernel's (`linux/fs.h` `fsxattr`, `linux/dqblk_xfs.h`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct fsxattr`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
/// New entries under the directory take its project id.
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

/// `struct fs_disk_quota`.
#[repr(C)]
struct FsDiskQuota {
    version: i8,
    flags: i8,
    fieldmask: u16,
    id: u32,
    blk_hardlimit: u64,
    blk_softlimit: u64,
    ino_hardlimit: u64,
    ino_softlimit: u64,
    bcount: u64,
    icount: u64,
    itimer: i32,
    btimer: i32,
    iwarns: u16,
    bwarns: u16,
    itimer_hi: i8,
    btimer_hi: i8,
    rtbtimer_hi: i8,
    padding2: i8,
    rtb_hardlimit: u64,
    rtb_softlimit: u64,
    rtbcount: u64,
    rtbtimer: i32,
    rtbwarns: u16,
    padding3: i16,
    padding4: [u8; 8],
}

const PRJQUOTA: u32 = 2;
const fn xqm_cmd(n: u32) -> u32 {
    (('X' as u32) << 8) + n
}
const fn qcmd(cmd: u32, kind: u32) -> u32 {
    (cmd << 8) | (kind & 0xff)
}
const Q_XSETQLIM: u32 = xqm_cmd(4);
const Q_XGETQSTATV: u32 = xqm_cmd(8);
const FS_DQUOT_VERSION: i8 = 1;
const FS_PROJ_QUOTA: i8 = 2;
const FS_DQ_BSOFT: u16 = 1 << 2;
const FS_DQ_BHARD: u16 = 1 << 3;
const FS_QSTATV_VERSION1: i8 = 1;
const FS_QUOTA_PDQ_ACCT: u16 = 1 << 4;
const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;

fn quotactl_fd(on: &File, cmd: u32, id: u32, addr: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: the fd is open for the call; `addr` points at a structure of the size the
    // command reads or writes, owned by the caller for the call's duration.
    let r = unsafe { libc::syscall(libc::SYS_quotactl_fd, on.as_raw_fd(), qcmd(cmd, PRJQUOTA), id, addr) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the filesystem holding `dir` accounts and enforces project quotas (XFS mounted
/// with `prjquota`).
pub fn enforced(dir: &Path) -> std::io::Result<bool> {
    let on = File::open(dir)?;
    // `struct fs_quota_statv` is under 256 bytes; its version byte goes first, flags at offset 2.
    let mut statv = [0u8; 256];
    statv[0] = FS_QSTATV_VERSION1 as u8;
    match quotactl_fd(&on, Q_XGETQSTATV, 0, statv.as_mut_ptr().cast()) {
        Ok(()) => {
            let flags = u16::from_ne_bytes([statv[2], statv[3]]);
            Ok(flags & (FS_QUOTA_PDQ_ACCT | FS_QUOTA_PDQ_ENFD) == (FS_QUOTA_PDQ_ACCT | FS_QUOTA_PDQ_ENFD))
        }
        // Not XFS, or no quotas on this mount.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EINVAL | libc::ENOTTY | libc::ESRCH | libc::EOPNOTSUPP)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Puts directory `dir` in project `id`, inherited by what is made under it.
pub fn set_project(dir: &Path, id: u32) -> std::io::Result<()> {
    let f = File::open(dir)?;
    let mut attr = FsXattr::default();
    // SAFETY: the fd is open; `attr` is a `struct fsxattr` the ioctl fills.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, &mut attr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    attr.projid = id;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: as above; the ioctl reads `attr`.
    if unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR, &attr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Limits project `id` to `bytes` (0: no limit) on the filesystem holding `dir`.
pub fn set_limit(dir: &Path, id: u32, bytes: u64) -> std::io::Result<()> {
    let on = File::open(dir)?;
    let blocks = bytes.div_ceil(512);
    let mut q = FsDiskQuota {
        version: FS_DQUOT_VERSION,
        flags: FS_PROJ_QUOTA,
        fieldmask: FS_DQ_BSOFT | FS_DQ_BHARD,
        id,
        blk_hardlimit: blocks,
        blk_softlimit: blocks,
        ino_hardlimit: 0,
        ino_softlimit: 0,
        bcount: 0,
        icount: 0,
        itimer: 0,
        btimer: 0,
        iwarns: 0,
        bwarns: 0,
        itimer_hi: 0,
        btimer_hi: 0,
        rtbtimer_hi: 0,
        padding2: 0,
        rtb_hardlimit: 0,
        rtb_softlimit: 0,
        rtbcount: 0,
        rtbtimer: 0,
        rtbwarns: 0,
        padding3: 0,
        padding4: [0; 8],
    };
    quotactl_fd(&on, Q_XSETQLIM, id, (&raw mut q).cast())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_structures_have_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<super::FsXattr>(), 28);
        assert_eq!(std::mem::size_of::<super::FsDiskQuota>(), 112);
    }
}
