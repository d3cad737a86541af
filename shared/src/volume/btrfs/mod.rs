//! The `btrfs` backend: each base is a subvolume, sealed by making it read-only; each
//! snapshot is a writable snapshot of its base, taken by ioctl in O(1) whatever the tree's
//! size; deleting is one ioctl too (the kernel's cleaner frees the blocks later). Needs root
//! and a btrfs filesystem at the volume root.
//!
//! Layout: `<root>/bases/base-N` and `<root>/snaps/snap-N`, each a subvolume. Creating a
//! subvolume or snapshot is atomic: if the name exists, the volume is complete.
//!
//! `ioctl.rs` holds the raw calls; this file decides what an errno means: `EEXIST` on
//! create is a race or a re-run (checked, then fine), `ENOSPC`, `EROFS`, `EPERM` and
//! `ENOTTY` (not btrfs) abort, anything else is transient.

pub mod ioctl;

use std::ffi::CString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::{VolumeBackend, VolumeError, VolumeId};

#[derive(Clone, Debug)]
pub struct BtrfsBackend {
    root: PathBuf,
}

fn classify(vol: impl std::fmt::Display, what: &str, e: std::io::Error) -> VolumeError {
    match e.raw_os_error() {
        Some(libc::ENOTTY | libc::EOPNOTSUPP) => VolumeError::Abort {
            volume: vol.to_string(),
            detail: format!("{what}: {e} (is the volume root on btrfs?)"),
        },
        _ => VolumeError::io(vol, what, e),
    }
}

fn open_dir(path: &Path, vol: impl std::fmt::Display) -> Result<File, VolumeError> {
    File::open(path).map_err(|e| classify(vol, &format!("opening {}", path.display()), e))
}

/// Runs a btrfs-progs command, killed after `timeout` (a transient failure).
fn run_within(cmd: &mut std::process::Command, timeout: std::time::Duration, root: &str) -> Result<(), VolumeError> {
    let what = format!("{cmd:?}");
    let fail = |detail: String| VolumeError::Transient { volume: root.to_owned(), detail };
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("{what}: {e} (btrfs-progs is needed to wait for deleted space)")))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    // The message is only for the error; a failed read leaves it empty.
                    std::io::Read::read_to_string(&mut e, &mut err).unwrap_or_default();
                }
                return Err(fail(format!("{what}: {status}: {}", err.trim())));
            }
            Ok(None) if std::time::Instant::now() >= deadline => {
                // Killing a child we spawned; it may have exited meanwhile, which is fine.
                child.kill().unwrap_or_default();
                child.wait().map_err(|e| fail(format!("{what}: {e}")))?;
                return Err(fail(format!("{what} did not finish within {timeout:?}")));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => return Err(fail(format!("{what}: {e}"))),
        }
    }
}

fn c_name(vol: VolumeId) -> CString {
    // `base-N` / `snap-N` never contain NUL.
    CString::new(vol.to_string()).unwrap_or_default()
}

impl BtrfsBackend {
    /// Opens the backend at `root`, which must be on a btrfs filesystem.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, VolumeError> {
        let root = root.into();
        for d in ["bases", "snaps"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| VolumeError::io(p.display(), "creating the volume root", e))?;
        }
        let dir = open_dir(&root, root.display())?;
        let fs_type = ioctl::fs_type(&dir).map_err(|e| VolumeError::io(root.display(), "statfs", e))?;
        if fs_type != ioctl::BTRFS_SUPER_MAGIC {
            return Err(VolumeError::Abort {
                volume: root.display().to_string(),
                detail: format!(
                    "not on a btrfs filesystem (statfs type {fs_type:#x}): mount btrfs there, or use backend = \"dir\""
                ),
            });
        }
        Ok(Self { root })
    }

    fn parent(&self, vol: VolumeId) -> PathBuf {
        match vol {
            VolumeId::Base(_) => self.root.join("bases"),
            VolumeId::Snap(_) => self.root.join("snaps"),
        }
    }

    fn path(&self, vol: VolumeId) -> PathBuf {
        self.parent(vol).join(vol.to_string())
    }

    fn exists_at(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        match fs::symlink_metadata(self.path(vol)) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VolumeError::io(vol, "inspecting", e)),
        }
    }

    fn create_subvol(&self, vol: VolumeId) -> Result<(), VolumeError> {
        let parent = open_dir(&self.parent(vol), vol)?;
        match ioctl::subvol_create(&parent, &c_name(vol)) {
            Ok(()) => Ok(()),
            // A re-run or a race: fine if it is really there now.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && self.exists_at(vol)? => Ok(()),
            Err(e) => Err(classify(vol, "creating the subvolume", e)),
        }
    }

    fn destroy(&self, vol: VolumeId) -> Result<(), VolumeError> {
        let parent = open_dir(&self.parent(vol), vol)?;
        match ioctl::subvol_destroy(&parent, &c_name(vol)) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(classify(vol, "deleting the subvolume", e)),
        }
    }
}

impl VolumeBackend for BtrfsBackend {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn constant_time_snapshots(&self) -> bool {
        true
    }

    fn create_base(&self, id: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Base(id);
        if self.exists_at(vol)? {
            return Ok(());
        }
        self.create_subvol(vol)
    }

    fn reset_base(&self, id: u64) -> Result<PathBuf, VolumeError> {
        let vol = VolumeId::Base(id);
        if self.is_sealed(id)? {
            return Err(VolumeError::Abort { volume: vol.to_string(), detail: "sealed: it cannot be written".into() });
        }
        // Deleting the subvolume and making a new one empties it in O(1).
        self.destroy(vol)?;
        self.create_subvol(vol)?;
        Ok(self.path(vol))
    }

    fn seal_base(&self, id: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Base(id);
        let dir = open_dir(&self.path(vol), vol)?;
        let flags = ioctl::subvol_flags(&dir).map_err(|e| classify(vol, "reading its flags", e))?;
        if flags & ioctl::SUBVOL_RDONLY != 0 {
            return Ok(());
        }
        // The unpacked tree is durable before the base is declared sealed.
        // SAFETY: syncfs on an open fd.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(classify(vol, "syncing", std::io::Error::last_os_error()));
        }
        ioctl::set_subvol_flags(&dir, flags | ioctl::SUBVOL_RDONLY).map_err(|e| classify(vol, "making it read-only", e))
    }

    fn is_sealed(&self, id: u64) -> Result<bool, VolumeError> {
        let vol = VolumeId::Base(id);
        if !self.exists_at(vol)? {
            return Ok(false);
        }
        let dir = open_dir(&self.path(vol), vol)?;
        let flags = ioctl::subvol_flags(&dir).map_err(|e| classify(vol, "reading its flags", e))?;
        Ok(flags & ioctl::SUBVOL_RDONLY != 0)
    }

    fn snapshot(&self, base: u64, snap: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Snap(snap);
        if self.exists_at(vol)? {
            return Ok(());
        }
        if !self.is_sealed(base)? {
            return Err(VolumeError::Abort {
                volume: vol.to_string(),
                detail: format!("its origin base-{base} is missing or not sealed"),
            });
        }
        let source = open_dir(&self.path(VolumeId::Base(base)), vol)?;
        let parent = open_dir(&self.parent(vol), vol)?;
        match ioctl::snapshot_create(&parent, &c_name(vol), &source, false) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && self.exists_at(vol)? => Ok(()),
            Err(e) => Err(classify(vol, &format!("snapshotting base-{base}"), e)),
        }
    }

    fn expose(&self, snap: u64) -> Result<PathBuf, VolumeError> {
        let vol = VolumeId::Snap(snap);
        if !self.exists_at(vol)? {
            return Err(VolumeError::Abort {
                volume: vol.to_string(),
                detail: "cannot expose: it does not exist".into(),
            });
        }
        Ok(self.path(vol))
    }

    fn delete(&self, vol: VolumeId) -> Result<(), VolumeError> {
        self.destroy(vol)
    }

    fn exists(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        self.exists_at(vol)
    }

    fn list(&self) -> Result<Vec<VolumeId>, VolumeError> {
        super::list_layout(&self.root)
    }

    fn usage(&self) -> Result<super::Usage, VolumeError> {
        super::filesystem_usage(&self.root)
    }

    fn place(&self) -> Result<super::Place, VolumeError> {
        super::directory_place("btrfs", &self.root)
    }

    fn wait_reclaimed(&self, timeout: std::time::Duration) -> Result<(), VolumeError> {
        // `btrfs subvolume sync` waits for the cleaner to finish every deleted subvolume
        // (polling each second); a commit then makes their blocks count as free in statvfs.
        // The CLI works on every kernel; the wait ioctl needs 6.13.
        let root = self.root.display().to_string();
        let mut wait = std::process::Command::new("btrfs");
        wait.args(["subvolume", "sync", &root]).stdout(std::process::Stdio::null());
        run_within(&mut wait, timeout, &root)?;
        let mut commit = std::process::Command::new("btrfs");
        commit.args(["filesystem", "sync", &root]).stdout(std::process::Stdio::null());
        run_within(&mut commit, timeout, &root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btrfs_backend_passes_the_conformance_suite() {
        let Some(fs) = crate::volume::testfs::LoopBtrfs::new() else { return };
        let b = BtrfsBackend::open(fs.mount.join("volumes")).unwrap();
        super::super::conformance::run(&b);
    }

    #[test]
    fn a_root_that_is_not_btrfs_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let err = BtrfsBackend::open(dir.path()).unwrap_err();
        // The test dir may itself be on btrfs on some machines; then there is nothing to refuse.
        if let VolumeError::Abort { detail, .. } = &err {
            assert!(detail.contains("not on a btrfs filesystem"), "{detail}");
        }
        assert!(!err.is_retryable());
    }

    #[test]
    fn snapshots_are_writable_and_independent_and_the_base_is_read_only() {
        let Some(fs) = crate::volume::testfs::LoopBtrfs::new() else { return };
        let b = BtrfsBackend::open(fs.mount.join("volumes")).unwrap();
        b.create_base(1).unwrap();
        let root = b.reset_base(1).unwrap();
        std::fs::write(root.join("f"), b"base").unwrap();
        b.seal_base(1).unwrap();
        let err = std::fs::write(root.join("g"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "a sealed base is read-only in the kernel");
        for snap in 1..=50 {
            b.snapshot(1, snap).unwrap();
        }
        let p7 = b.expose(7).unwrap();
        std::fs::write(p7.join("f"), b"seven").unwrap();
        for snap in (1..=50).filter(|s| *s != 7) {
            assert_eq!(std::fs::read(b.expose(snap).unwrap().join("f")).unwrap(), b"base");
        }
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"base");
        assert_eq!(b.list().unwrap().len(), 51);
        for snap in 1..=50 {
            b.delete(VolumeId::Snap(snap)).unwrap();
        }
        b.delete(VolumeId::Base(1)).unwrap();
        assert!(b.list().unwrap().is_empty());
    }
}
