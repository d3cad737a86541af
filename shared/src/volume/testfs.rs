//! Filesystems on loop devices for tests (btrfs for its backend, XFS with project quotas for
//! overlay's size limits, a fresh ext4 for each side a benchmark compares), mounted for a test and removed when dropped (unmounted, loop device
//! detached, image deleted), even when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct LoopFs {
    pub mount: PathBuf,
    _dir: tempfile::TempDir,
}

/// The loop-mounted btrfs of the btrfs tests.
pub type LoopBtrfs = LoopFs;

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl LoopFs {
    /// A 512 MiB btrfs; `None` (test skipped) without root or `mkfs.btrfs`, unless `CI` is set.
    pub fn new() -> Option<LoopFs> {
        Self::with(512, "loop")
    }

    /// A btrfs of `mib` MiB mounted with `options` (which must include `loop`), e.g.
    /// `loop,commit=1` so that deleted subvolumes' space comes back within a second or two.
    pub fn with(mib: u64, options: &str) -> Option<LoopFs> {
        Self::make("mkfs.btrfs", &[], "btrfs-progs", mib, options)
    }

    /// An XFS of `mib` MiB (at least 300) mounted with `options`, e.g. `loop,prjquota`.
    pub fn xfs(mib: u64, options: &str) -> Option<LoopFs> {
        Self::make("mkfs.xfs", &[], "xfsprogs", mib, options)
    }

    /// An ext4 of `mib` MiB mounted with `options`, its inode tables and journal written at
    /// once (no lazy initialisation left to run in the background while it is measured).
    pub fn ext4(mib: u64, options: &str) -> Option<LoopFs> {
        Self::make("mkfs.ext4", &["-E", "lazy_itable_init=0,lazy_journal_init=0"], "e2fsprogs", mib, options)
    }

    fn make(mkfs: &str, args: &[&str], package: &str, mib: u64, options: &str) -> Option<LoopFs> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let tools = ["/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(mkfs).exists());
        if !root || !tools {
            assert!(std::env::var("CI").is_err(), "{mkfs} tests need root and {package} (scripts/test installs it)");
            eprintln!("skipping: {mkfs} tests need root and {package}");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("sparse image");
        run(Command::new(mkfs).arg("-q").args(args).arg(&image)).unwrap_or_else(|e| panic!("{mkfs}: {e}"));
        // `mount -o loop` attaches a loop device that umount detaches again (autoclear).
        run(Command::new("mount").args(["-o", options]).arg(&image).arg(&mount)).expect("mount");
        Some(LoopFs { mount, _dir: dir })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // A failed test may leave a killed worker's files open for a moment: then the mount
        // is detached lazily (and its loop device freed when the last file closes).
        if let Err(e) = run(Command::new("umount").arg(&self.mount))
            && let Err(lazy) = run(Command::new("umount").arg("-l").arg(&self.mount))
        {
            eprintln!("cleaning up the test filesystem: {e}; lazily: {lazy}");
        }
    }
}
