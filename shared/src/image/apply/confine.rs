//! The root-confinement rule, apart from writing entries: every path an entry names is
//! resolved inside the volume's root, one component at a time, with the root as `/`.
//! Lexically first (`sanitize`: no absolute paths, no `..`), then on the disk (`walk_dir`:
//! symlinks are followed as the image would see them, absolute targets from the root, at
//! most 40 hops, and a target whose `..` climbs above the root is refused). So a layer never
//! writes outside the volume, whatever links earlier entries or layers made.

use std::fs;
use std::path::{Component, Path, PathBuf};

use super::Applier;
use crate::image::ImageError;

const MAX_SYMLINK_HOPS: usize = 40;

/// How [`Applier::walk_dir`] treats what it finds on the way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// For an entry: create missing directories, replace a file by a directory.
    Create,
    /// For a whiteout: change nothing; stop at anything missing, at a non-directory and at
    /// a symlink this layer wrote (what is beneath it is not a lower layer's).
    Lookup,
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

    /// Resolves relative directory `rel` inside the root, creating missing directories.
    pub(super) fn resolve_dir(&mut self, entry: &Path, rel: &Path) -> Result<PathBuf, ImageError> {
        match self.walk_dir(entry, rel, Walk::Create)? {
            Some(dir) => Ok(dir),
            None => Err(self.refuse(entry, "its directory could not be made")),
        }
    }

    /// Resolves relative directory `rel` inside the root one component at a time, with the
    /// root as `/`: symlinks are followed (absolute targets from the root), and a target
    /// whose `..` climbs above the root is refused. Returns the absolute path, or `None`
    /// when `mode` is [`Walk::Lookup`] and there is no such directory to look into.
    pub(super) fn walk_dir(&mut self, entry: &Path, rel: &Path, mode: Walk) -> Result<Option<PathBuf>, ImageError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(Some(self.root.join(rel)));
        }
        let mut pending: Vec<std::ffi::OsString> = rel.components().rev().map(|c| c.as_os_str().to_owned()).collect();
        let mut cur = PathBuf::new();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            let next_rel = cur.join(&comp);
            let next = self.root.join(&next_rel);
            match fs::symlink_metadata(&next) {
                Ok(m) if m.is_dir() => cur = next_rel,
                Ok(m) if m.file_type().is_symlink() => {
                    if mode == Walk::Lookup && self.written.contains(&next_rel) {
                        return Ok(None);
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(self.refuse(entry, "too many levels of symlinks"));
                    }
                    let target = fs::read_link(&next).map_err(|e| ImageError::io("reading symlink", &next, e))?;
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
                    let mut base: Vec<std::ffi::OsString> =
                        cur.components().map(|c| c.as_os_str().to_owned()).collect();
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
                    for c in base.into_iter().rev() {
                        pending.push(c);
                    }
                    cur = PathBuf::new();
                }
                Ok(_) if mode == Walk::Lookup => return Ok(None),
                Ok(_) => {
                    // A file where the layer needs a directory: the later layer wins.
                    self.remove_existing(&next)?;
                    self.mkdir(&next)?;
                    cur = next_rel;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && mode == Walk::Lookup => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.mkdir(&next)?;
                    cur = next_rel;
                }
                Err(e) => return Err(ImageError::io("inspecting", &next, e)),
            }
        }
        if cur == rel {
            self.known_dirs.insert(cur.clone());
        }
        Ok(Some(self.root.join(cur)))
    }
}
