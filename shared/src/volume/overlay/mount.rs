//! The raw overlayfs calls: mount a snapshot's layers, unmount them, tell whether a
//! directory is a mount point. No state and no policy: `mod.rs` decides what an errno means.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// The directories of one overlay mount.
pub struct Layers<'a> {
    /// The sealed base (read-only, shared by every snapshot of it).
    pub lower: &'a Path,
    /// The snapshot's own writes.
    pub upper: &'a Path,
    /// overlayfs's scratch directory, on the same filesystem as `upper`.
    pub work: &'a Path,
    /// Skip every sync of the upper layer (`volatile`): faster, but the snapshot does not
    /// survive its mount (a crash or reboot loses its writes, and the kernel refuses to mount
    /// it again).
    pub volatile: bool,
}

/// Characters the kernel's option parser splits on or unescapes: a path holding one cannot be
/// named in the mount options.
pub const UNSAFE_IN_OPTIONS: [char; 3] = [',', ':', '\\'];

/// The mount options: the layers, and the features that make a snapshot independent of every
/// other mount of its base. `index=off` and `redirect_dir=off` keep the kernel from tying the
/// upper layer to one particular lower (a remount after a reboot sees a fresh base inode
/// number and would be refused with `index=on`); `metacopy=off` keeps a copy-up a full copy,
/// so the upper layer alone holds every changed file.
pub fn options(l: &Layers) -> String {
    let mut o = format!(
        "lowerdir={},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off",
        l.lower.display(),
        l.upper.display(),
        l.work.display()
    );
    if l.volatile {
        o.push_str(",volatile");
    }
    o
}

/// Mounts the overlay of `layers` on `target`.
pub fn mount(target: &Path, layers: &Layers) -> nix::Result<()> {
    let opts = options(layers);
    nix::mount::mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
}

/// How an unmount went.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Nothing used the mount: it is gone.
    Clean,
    /// A process still had a file or its working directory there: the mount was detached
    /// from the tree (the process keeps what it holds; nothing new can reach it).
    Detached,
}

/// Unmounts `target`, detaching it if it is busy.
pub fn unmount(target: &Path) -> nix::Result<Unmounted> {
    match nix::mount::umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Clean),
        Err(nix::errno::Errno::EBUSY) => {
            nix::mount::umount2(target, MntFlags::MNT_DETACH).map(|()| Unmounted::Detached)
        }
        Err(e) => Err(e),
    }
}

/// Whether `dir` is a mount point: its device differs from its parent's.
pub fn is_mount_point(dir: &Path, parent: &Path) -> std::io::Result<bool> {
    Ok(std::fs::symlink_metadata(dir)?.dev() != std::fs::symlink_metadata(parent)?.dev())
}

/// The `incompat/volatile` directory overlayfs leaves in a work directory once it was mounted
/// `volatile`: the kernel refuses to mount such a work directory again.
pub fn volatile_marker(work: &Path) -> std::path::PathBuf {
    work.join("work/incompat/volatile")
}
