//! The `dir` backend: bases and snapshots are plain directories under one root, snapshots
//! are copies (reflinks where the filesystem has them, so XFS and btrfs share blocks). No
//! root needed: the embedded default for one machine. Snapshots are O(files), not O(1).
//!
//! Layout: `<root>/bases/base-N/` (+ `base-N.sealed` once sealed),
//! `<root>/snaps/snap-N/`. A snapshot is copied into `snaps/.tmp-snap-N` and renamed into
//! place, so `snap-N` existing means it is complete. A `.tmp-snap-N` is the backend's one
//! in-between artifact: deleting `snap-N` removes it too, and `leftovers` lists it for
//! reconcile and garbage collection (a copy killed before its release arrived).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{VolumeBackend, VolumeError, VolumeId};

#[derive(Clone, Debug)]
pub struct DirBackend {
    root: PathBuf,
}

impl DirBackend {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, VolumeError> {
        let root = root.into();
        for d in ["bases", "snaps"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| VolumeError::io(p.display(), "creating the volume root", e))?;
        }
        Ok(Self { root })
    }

    fn path(&self, vol: VolumeId) -> PathBuf {
        match vol {
            VolumeId::Base(_) => self.root.join("bases").join(vol.to_string()),
            VolumeId::Snap(_) => self.root.join("snaps").join(vol.to_string()),
        }
    }

    /// Where a snapshot is copied before it is renamed into place.
    fn copy_path(&self, snap: u64) -> PathBuf {
        self.root.join("snaps").join(format!(".tmp-{}", VolumeId::Snap(snap)))
    }

    fn seal_marker(&self, id: u64) -> PathBuf {
        self.root.join("bases").join(format!("base-{id}.sealed"))
    }
}

fn exists(path: &Path, vol: VolumeId) -> Result<bool, VolumeError> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(m.is_dir()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(VolumeError::io(vol, "inspecting", e)),
    }
}

fn remove_tree(path: &Path, vol: VolumeId) -> Result<(), VolumeError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io(vol, "removing", e)),
    }
}

fn sync_dir(path: &Path, vol: VolumeId) -> Result<(), VolumeError> {
    fs::File::open(path).and_then(|d| d.sync_all()).map_err(|e| VolumeError::io(vol, "syncing", e))
}

impl VolumeBackend for DirBackend {
    fn name(&self) -> &'static str {
        "dir"
    }

    fn constant_time_snapshots(&self) -> bool {
        false
    }

    fn create_base(&self, id: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Base(id);
        let path = self.path(vol);
        match fs::create_dir(&path) {
            Ok(()) => sync_dir(&self.root.join("bases"), vol),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(VolumeError::io(vol, "creating", e)),
        }
    }

    fn reset_base(&self, id: u64) -> Result<PathBuf, VolumeError> {
        let vol = VolumeId::Base(id);
        if self.is_sealed(id)? {
            return Err(VolumeError::Abort {
                volume: vol.to_string(),
                detail: "is sealed; it cannot be written".into(),
            });
        }
        let path = self.path(vol);
        if !exists(&path, vol)? {
            return Err(VolumeError::Abort { volume: vol.to_string(), detail: "does not exist".into() });
        }
        let entries = fs::read_dir(&path).map_err(|e| VolumeError::io(vol, "listing", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| VolumeError::io(vol, "listing", e))?;
            let child = entry.path();
            let is_dir = entry.file_type().map_err(|e| VolumeError::io(vol, "inspecting", e))?.is_dir();
            let removed = if is_dir { fs::remove_dir_all(&child) } else { fs::remove_file(&child) };
            removed.map_err(|e| VolumeError::io(vol, "emptying", e))?;
        }
        Ok(path)
    }

    fn seal_base(&self, id: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Base(id);
        if !exists(&self.path(vol), vol)? {
            return Err(VolumeError::Abort {
                volume: vol.to_string(),
                detail: "cannot seal: it does not exist".into(),
            });
        }
        // Everything written to the base must be on disk before it is called sealed.
        syncfs(&self.path(vol)).map_err(|e| VolumeError::io(vol, "syncing the filesystem", e))?;
        let marker = self.seal_marker(id);
        fs::write(&marker, b"").map_err(|e| VolumeError::io(vol, "writing the seal marker", e))?;
        sync_dir(&self.root.join("bases"), vol)
    }

    fn is_sealed(&self, id: u64) -> Result<bool, VolumeError> {
        match fs::symlink_metadata(self.seal_marker(id)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VolumeError::io(VolumeId::Base(id), "inspecting the seal marker", e)),
        }
    }

    fn snapshot(&self, base: u64, snap: u64) -> Result<(), VolumeError> {
        let vol = VolumeId::Snap(snap);
        let dest = self.path(vol);
        if exists(&dest, vol)? {
            return Ok(());
        }
        if !self.is_sealed(base)? {
            return Err(VolumeError::Abort {
                volume: vol.to_string(),
                detail: format!("its origin base-{base} is missing or not sealed"),
            });
        }
        let tmp = self.copy_path(snap);
        remove_tree(&tmp, vol)?;
        if let Err(e) = copy_tree(&self.path(VolumeId::Base(base)), &tmp) {
            // A failed copy (a full disk, most often) gives its space back at once.
            if let Err(cleanup) = remove_tree(&tmp, vol) {
                tracing::warn!(volume = %vol, error = %cleanup, "could not remove a failed copy; garbage collection removes it");
            }
            return Err(VolumeError::io(vol, "copying the base", e));
        }
        crate::fault::point("dir.before_rename", &vol.to_string());
        fs::rename(&tmp, &dest).map_err(|e| VolumeError::io(vol, "renaming into place", e))?;
        sync_dir(&self.root.join("snaps"), vol)
    }

    fn expose(&self, snap: u64) -> Result<PathBuf, VolumeError> {
        let vol = VolumeId::Snap(snap);
        let path = self.path(vol);
        if !exists(&path, vol)? {
            return Err(VolumeError::Abort {
                volume: vol.to_string(),
                detail: "cannot expose: it does not exist".into(),
            });
        }
        Ok(path)
    }

    fn delete(&self, vol: VolumeId) -> Result<(), VolumeError> {
        remove_tree(&self.path(vol), vol)?;
        if let VolumeId::Snap(id) = vol {
            remove_tree(&self.copy_path(id), vol)?;
        }
        if let VolumeId::Base(id) = vol {
            match fs::remove_file(self.seal_marker(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VolumeError::io(vol, "removing the seal marker", e)),
            }
        }
        Ok(())
    }

    fn exists(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        exists(&self.path(vol), vol)
    }

    fn list(&self) -> Result<Vec<VolumeId>, VolumeError> {
        super::list_layout(&self.root)
    }

    fn usage(&self) -> Result<super::Usage, VolumeError> {
        super::filesystem_usage(&self.root)
    }

    fn place(&self) -> Result<super::Place, VolumeError> {
        super::directory_place("dir", &self.root)
    }

    fn leftovers(&self) -> Result<Vec<super::Leftover>, VolumeError> {
        let snaps = self.root.join("snaps");
        let mut out = Vec::new();
        for entry in fs::read_dir(&snaps).map_err(|e| VolumeError::io(snaps.display(), "listing", e))? {
            let entry = entry.map_err(|e| VolumeError::io(snaps.display(), "listing", e))?;
            let name = entry.file_name();
            let Some(VolumeId::Snap(id)) =
                name.to_str().and_then(|n| n.strip_prefix(".tmp-")).and_then(VolumeId::parse)
            else {
                continue;
            };
            let path = entry.path();
            let bytes =
                disk_bytes(&path).map_err(|e| VolumeError::io(VolumeId::Snap(id), "measuring a half copy", e))?;
            out.push(super::Leftover { of: VolumeId::Snap(id), path, bytes });
        }
        out.sort_by_key(|l| l.of);
        Ok(out)
    }

    fn remove_leftover(&self, leftover: &super::Leftover) -> Result<(), VolumeError> {
        match leftover.of {
            // Only paths this backend names: a leftover is never taken on trust.
            VolumeId::Snap(id) => remove_tree(&self.copy_path(id), leftover.of),
            VolumeId::Base(_) => Ok(()),
        }
    }
}

/// Bytes a tree holds on disk (allocated blocks, so sparse files count what they use).
fn disk_bytes(path: &Path) -> std::io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            match disk_bytes(&entry?.path()) {
                Ok(n) => total += n,
                // A half copy still being written (or removed) changes under us.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

/// syncfs(2) on the filesystem holding `path`.
fn syncfs(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = fs::File::open(path)?;
    // SAFETY: the fd is open for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies a tree preserving types, modes, owners (as root), mtimes and hardlinks; file
/// contents by reflink where the filesystem supports it.
fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs = Vec::new();
    copy_entry(src, dst, as_root, &mut links, &mut dirs)?;
    // Directory times last, deepest first.
    for (path, meta) in dirs.into_iter().rev() {
        let t = filetime::FileTime::from_last_modification_time(&meta);
        filetime::set_symlink_file_times(&path, t, t)?;
    }
    Ok(())
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    as_root: bool,
    links: &mut HashMap<(u64, u64), PathBuf>,
    dirs: &mut Vec<(PathBuf, fs::Metadata)>,
) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        fs::create_dir(dst)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_entry(&entry.path(), &dst.join(entry.file_name()), as_root, links, dirs)?;
        }
        if as_root {
            std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
        }
        copy_xattrs(src, dst)?;
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        dirs.push((dst.to_path_buf(), meta));
        return Ok(());
    }
    // Hardlinks of every kind of non-directory (symlinks too: `ln` links a symlink itself).
    if meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = links.get(&key) {
            return fs::hard_link(first, dst);
        }
        links.insert(key, dst.to_path_buf());
    }
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else if ft.is_file() {
        reflink_copy::reflink_or_copy(src, dst)?;
    } else {
        // FIFOs and device nodes: recreate them.
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dst.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::mknod(c.as_ptr(), meta.mode(), meta.rdev()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if as_root {
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    // After the owner: chown drops file capabilities (security.capability).
    copy_xattrs(src, dst)?;
    if !ft.is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    let t = filetime::FileTime::from_last_modification_time(&meta);
    filetime::set_symlink_file_times(dst, t, t)
}

/// Copies `src`'s extended attributes (capabilities, ACLs, user attributes) to `dst`, never
/// following a symlink. A filesystem without xattr support has none to copy.
fn copy_xattrs(src: &Path, dst: &Path) -> std::io::Result<()> {
    let names = match xattr::list(src) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        if let Some(value) = xattr::get(src, &name)? {
            xattr::set(dst, &name, &value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_backend_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::open(dir.path().join("vols")).unwrap();
        super::super::conformance::run(&backend);
    }
}
