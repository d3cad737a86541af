//! The filesystem inside each thin device: `mkfs.ext4`, mount and unmount by syscall, and
//! the small file operations the backend needs around them.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use crate::volume::{VolumeError, VolumeId};

pub(super) fn c_path(path: &Path) -> Result<CString, VolumeError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VolumeError::Abort { volume: path.display().to_string(), detail: "path contains NUL".into() })
}

pub(super) fn mkfs_ext4(vol: VolumeId, node: &Path) -> Result<(), VolumeError> {
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

pub(super) fn mount_ext4(node: &Path, mount_point: &Path) -> std::io::Result<()> {
    let src = CString::new(node.as_os_str().as_bytes())?;
    let dst = CString::new(mount_point.as_os_str().as_bytes())?;
    // SAFETY: mount(2) with valid NUL-terminated strings and a NULL data pointer.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), c"ext4".as_ptr(), libc::MS_NOATIME, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub(super) fn umount(mount_point: &Path) -> std::io::Result<()> {
    let dst = CString::new(mount_point.as_os_str().as_bytes())?;
    // SAFETY: umount2(2) with a valid NUL-terminated path.
    if unsafe { libc::umount2(dst.as_ptr(), 0) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub(super) fn remove_if_present(path: &Path, vol: VolumeId) -> Result<(), VolumeError> {
    let removed = if path.is_dir() { fs::remove_dir(path) } else { fs::remove_file(path) };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io(vol, &format!("removing {}", path.display()), e)),
    }
}

/// Empties a directory (the root of an unsealed base) without removing it.
pub(super) fn empty_dir(root: &Path, vol: VolumeId) -> Result<(), VolumeError> {
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
