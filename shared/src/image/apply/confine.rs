//! The root-confinement rule, apart from writing entries: every directory an entry names is
//! opened inside the volume's root and held as a file descriptor; the entry is then made
//! relative to that descriptor (`openat`, `mkdirat`, `symlinkat`, ...), never through a path
//! from `/`. So a layer never writes outside the volume, whatever links earlier entries or
//! layers made.
//!
//! Three lines, in order:
//! 1. lexical (`sanitize`): no absolute paths, no `..`;
//! 2. the kernel: a directory is opened with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)`
//!    from the held root, one call for the whole path (magic links are refused with the
//!    rest); nothing it opens can be outside the root. Where a system-call filter or an old
//!    kernel has no `openat2`, the same answer comes from one `openat(O_NOFOLLOW)` per
//!    component;
//! 3. when a symlink, a missing directory or a file is on the way (the kernel call says
//!    which), the path is walked one component at a time from held descriptors, with the
//!    root as `/`: a symlink is followed as the image would see it (absolute targets from
//!    the root, at most 40 hops), and a target whose `..` climbs above the root is
//!    **refused**, where the kernel's `RESOLVE_IN_ROOT` would clamp it to the root. A layer
//!    that writes through such a link is hostile or broken, and saying so names it.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

use super::Applier;
use crate::image::ImageError;

const MAX_SYMLINK_HOPS: usize = 40;

/// A directory inside the root, held open (`O_PATH`): what an entry is made relative to.
#[derive(Clone)]
pub(super) struct HeldDir {
    /// Where it is, relative to the root, symlinks resolved.
    pub rel: PathBuf,
    pub fd: Rc<OwnedFd>,
}

/// How [`Applier::open_dir`] treats what it finds on the way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// For an entry: create missing directories, replace a file by a directory.
    Create,
    /// For a whiteout: change nothing; stop at anything missing, at a non-directory and at
    /// a symlink this layer wrote (what is beneath it is not a lower layer's).
    Lookup,
}

/// Opens the root itself, to hold while a layer is applied.
pub(super) fn open_root(root: &Path) -> Result<OwnedFd, ImageError> {
    nix::fcntl::open(root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| ImageError::io("opening the volume root", root, e.into()))
}

/// Whether `openat2` may be called: cleared the first time a system-call filter (systemd's
/// `SystemCallFilter=`, a container runtime's seccomp profile) or a kernel older than 5.6
/// answers `ENOSYS` or `EPERM`, after which every open takes the portable walk.
static OPENAT2_AVAILABLE: AtomicBool = AtomicBool::new(true);

/// Opens directory `rel` (already lexically clean) under `root` with no symlink on the way:
/// `ELOOP` or `ENOTDIR` when one is, `ENOENT` when a component is missing.
pub(super) fn open_beneath(root: &impl AsFd, rel: &Path) -> Result<OwnedFd, Errno> {
    if OPENAT2_AVAILABLE.load(Ordering::Relaxed) {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS);
        loop {
            match nix::fcntl::openat2(root, rel, how) {
                // The kernel asks for a retry when a rename elsewhere raced the lookup.
                Err(Errno::EAGAIN) => continue,
                // Filtered out or not in this kernel (an O_PATH open is never refused with
                // EPERM for its own sake).
                Err(Errno::ENOSYS | Errno::EPERM) => {
                    OPENAT2_AVAILABLE.store(false, Ordering::Relaxed);
                    tracing::info!(
                        "openat2 is not available here: unpacking opens directories one component at a time"
                    );
                    break;
                }
                other => return other,
            }
        }
    }
    open_beneath_by_components(root, rel)
}

/// [`open_beneath`] without `openat2`: one `openat(O_NOFOLLOW)` per component, from `root`.
/// The same answers, since `rel` has no `..` and no root (the lexical line).
fn open_beneath_by_components(root: &impl AsFd, rel: &Path) -> Result<OwnedFd, Errno> {
    let mut held: Option<OwnedFd> = None;
    for c in rel.components() {
        let Component::Normal(name) = c else { return Err(Errno::EINVAL) };
        held = Some(match &held {
            None => open_child_dir(root, name)?,
            Some(dir) => open_child_dir(dir, name)?,
        });
    }
    held.ok_or(Errno::ENOENT)
}

/// Opens directory `name` in `dir`, not following a symlink.
pub(super) fn open_child_dir(dir: &impl AsFd, name: &std::ffi::OsStr) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// What is at `name` in `dir` (not following a symlink); `None` when nothing is.
pub(super) fn kind_at(dir: &impl AsFd, name: &std::ffi::OsStr) -> Result<Option<SFlag>, Errno> {
    match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Applier<'_> {
    /// The entry's path as clean relative components: no root, no `..`.
    pub(super) fn sanitize(&self, entry: &Path, path: &Path) -> Result<PathBuf, ImageError> {
        let mut out = PathBuf::new();
        for c in path.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.refuse(entry, "absolute paths are not allowed"));
                }
                Component::ParentDir => return Err(self.refuse(entry, "'..' components are not allowed")),
            }
        }
        Ok(out)
    }

    pub(super) fn root_dir(&self) -> HeldDir {
        HeldDir { rel: PathBuf::new(), fd: self.root_fd.clone() }
    }

    /// Opens directory `rel` inside the root, creating missing directories.
    pub(super) fn resolve_dir(&mut self, entry: &Path, rel: &Path) -> Result<HeldDir, ImageError> {
        match self.open_dir(entry, rel, Walk::Create)? {
            Some(dir) => Ok(dir),
            None => Err(self.refuse(entry, "its directory could not be made")),
        }
    }

    /// Opens directory `rel` inside the root (see the module's three lines). Returns `None`
    /// when `mode` is [`Walk::Lookup`] and there is no such directory to look into.
    pub(super) fn open_dir(&mut self, entry: &Path, rel: &Path, mode: Walk) -> Result<Option<HeldDir>, ImageError> {
        if rel.as_os_str().is_empty() {
            return Ok(Some(self.root_dir()));
        }
        // A tar lists a directory's entries together: the last one's directory is held. A
        // lookup takes it only if no symlink led there (it must not follow this layer's).
        if let Some((last, dir)) = &self.last_dir
            && last == rel
            && (mode == Walk::Create || dir.rel == rel)
        {
            return Ok(Some(dir.clone()));
        }
        let found = match open_beneath(self.root_fd.as_ref(), rel) {
            Ok(fd) => Some(HeldDir { rel: rel.to_owned(), fd: Rc::new(fd) }),
            Err(Errno::ELOOP | Errno::ENOENT | Errno::ENOTDIR) => self.walk_dir(entry, rel, mode)?,
            Err(e) => return Err(ImageError::io("opening directory", self.root.join(rel), e.into())),
        };
        if let Some(dir) = &found {
            self.last_dir = Some((rel.to_owned(), dir.clone()));
        }
        Ok(found)
    }

    /// Walks `rel` one component at a time from held descriptors, with the root as `/`:
    /// symlinks are followed (absolute targets from the root), and a target whose `..`
    /// climbs above the root is refused.
    fn walk_dir(&mut self, entry: &Path, rel: &Path, mode: Walk) -> Result<Option<HeldDir>, ImageError> {
        let mut pending: Vec<OsString> = rel.components().rev().map(|c| c.as_os_str().to_owned()).collect();
        let mut cur = self.root_dir();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            let next_rel = cur.rel.join(&comp);
            let inspecting = |e: Errno| ImageError::io("inspecting", self.root.join(&next_rel), e.into());
            match kind_at(cur.fd.as_ref(), &comp).map_err(inspecting)? {
                Some(SFlag::S_IFDIR) => {}
                Some(SFlag::S_IFLNK) => {
                    if mode == Walk::Lookup && self.written.contains(&next_rel) {
                        return Ok(None);
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(self.refuse(entry, "too many levels of symlinks"));
                    }
                    let target = PathBuf::from(
                        nix::fcntl::readlinkat(cur.fd.as_ref(), comp.as_os_str())
                            .map_err(|e| ImageError::io("reading symlink", self.root.join(&next_rel), e.into()))?,
                    );
                    let escapes = || {
                        self.refuse(
                            entry,
                            format!(
                                "it is written through symlink {} -> {}, which points outside the volume root",
                                next_rel.display(),
                                target.display()
                            ),
                        )
                    };
                    // Lexically resolve the target against the symlink's directory, or
                    // against the root when it is absolute.
                    let mut base: Vec<OsString> = cur.rel.components().map(|c| c.as_os_str().to_owned()).collect();
                    for c in target.components() {
                        match c {
                            Component::Normal(n) => base.push(n.to_owned()),
                            Component::CurDir => {}
                            Component::RootDir => base.clear(),
                            Component::ParentDir => {
                                if base.pop().is_none() {
                                    return Err(escapes());
                                }
                            }
                            Component::Prefix(_) => return Err(escapes()),
                        }
                    }
                    // Restart from the root with the target's components, then what remained.
                    pending.extend(base.into_iter().rev());
                    cur = self.root_dir();
                    continue;
                }
                Some(_) | None if mode == Walk::Lookup => return Ok(None),
                Some(_) => {
                    // A file where the layer needs a directory: the later layer wins.
                    self.remove_at(&cur, &comp)?;
                    self.mkdir_at(&cur, &comp)?;
                }
                None => self.mkdir_at(&cur, &comp)?,
            }
            let fd = open_child_dir(cur.fd.as_ref(), &comp)
                .map_err(|e| ImageError::io("opening directory", self.root.join(&next_rel), e.into()))?;
            cur = HeldDir { rel: next_rel, fd: Rc::new(fd) };
        }
        Ok(Some(cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walk_without_openat2_gives_the_kernels_answers() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path();
        std::fs::create_dir_all(root_path.join("a/b")).unwrap();
        std::fs::write(root_path.join("a/f"), b"").unwrap();
        std::os::unix::fs::symlink("b", root_path.join("a/l")).unwrap();
        std::os::unix::fs::symlink("/", root_path.join("up")).unwrap();
        let root = open_root(root_path).unwrap();
        let not_a_directory = |r: Result<OwnedFd, Errno>| matches!(r, Err(Errno::ELOOP | Errno::ENOTDIR));
        for (rel, expect_dir) in
            [("a", true), ("a/b", true), ("a/l", false), ("a/l/x", false), ("up", false), ("a/f", false)]
        {
            let rel = Path::new(rel);
            let by_components = open_beneath_by_components(&root, rel);
            assert_eq!(by_components.is_ok(), expect_dir, "{rel:?}: {by_components:?}");
            if !expect_dir {
                assert!(not_a_directory(by_components), "{rel:?}");
            }
            // The kernel's call, where this kernel has it, agrees.
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS);
            match nix::fcntl::openat2(&root, rel, how) {
                Err(Errno::ENOSYS | Errno::EPERM) => {}
                kernel if expect_dir => assert!(kernel.is_ok(), "{rel:?}: {kernel:?}"),
                kernel => assert!(not_a_directory(kernel), "{rel:?}"),
            }
        }
        assert_eq!(open_beneath_by_components(&root, Path::new("a/missing")).err(), Some(Errno::ENOENT));
        assert_eq!(open_beneath_by_components(&root, Path::new("../a")).err(), Some(Errno::EINVAL));
    }
}
