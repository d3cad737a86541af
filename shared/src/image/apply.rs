//! Applying a layer tarball to a directory tree, per the OCI image-spec: whiteouts
//! (`.wh.<name>`), opaque directories (`.wh..wh..opq`), hardlinks, symlinks, modes,
//! ownership (as root), mtimes and xattrs (where the filesystem takes them); tar, tar+gzip
//! and tar+zstd detected from the content's magic bytes.
//!
//! Whiteouts hide what lower layers have, never the entries of their own layer: a whiteout
//! beneath a file or symlink its layer wrote (what umoci writes when a directory becomes a
//! file or a symlink) does nothing, and a whiteout never creates a directory.
//!
//! Security: every entry path is relative and `..`-free; the root is held open and every
//! entry is made relative to its parent directory's descriptor, which the kernel opens
//! inside the root (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)`); through a symlink, the
//! parent is walked from held descriptors with the root as `/`: an absolute symlink target is
//! resolved from the volume root (as umoci and containerd do), and a target whose `..`
//! would climb above the root is refused (`apply/confine.rs`); an existing final component
//! is removed, never followed; hardlink targets obey the same rules; device nodes are skipped unless
//! [`DevicePolicy`] says otherwise; the layer's total size is capped. A refused entry stops
//! the layer with [`ImageError::Refused`] naming the entry and the rule.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

use super::digest::Digest;
use super::error::ImageError;

/// Limits and permissions for applying layers.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Total uncompressed bytes of file content one layer may write.
    pub max_layer_bytes: u64,
    /// What to do with character and block device nodes.
    pub devices: DevicePolicy,
    /// Set owners from the tar headers (needs root); otherwise files belong to us.
    pub preserve_owners: bool,
    /// Without `preserve_owners`: apply an entry owned by someone else anyway, owned by us
    /// and with its setuid/setgid bits removed (counted). Otherwise such an entry is refused.
    pub rootless: bool,
    /// Bytes of file data one layer may put on the disk: what the host can hold below its
    /// refusal watermark, measured before the layer (`None`: not bounded by the host).
    pub room_bytes: Option<u64>,
    /// The refusal watermark (percent of the volume storage) that `prepare` measures
    /// `room_bytes` against before each layer.
    pub refuse_percent: Option<f64>,
    /// When it fires, the unpacker stops before its next entry ([`ImageError::Stopped`]):
    /// the run's stop signal, so a stopped prepare stops writing into its base.
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            max_layer_bytes: 64 << 30,
            devices: DevicePolicy::default(),
            preserve_owners: running_as_root(),
            rootless: false,
            room_bytes: None,
            refuse_percent: None,
            stop: None,
        }
    }
}

/// Whether this process may give files away (keep their owners): it runs as root.
pub fn running_as_root() -> bool {
    process_owner().0 == 0
}

/// Who this process is, for entries it cannot give away (not root).
fn process_owner() -> (u64, u64) {
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    unsafe { (u64::from(libc::geteuid()), u64::from(libc::getegid())) }
}

/// What a layer's character and block device nodes become. Images made from a bootstrap
/// tarball (`debootstrap`, `mmdebstrap`, `docker import`) carry `dev/console`, `dev/null`, ...;
/// a container runtime mounts its own `/dev`, so skipping them is what their users expect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePolicy {
    /// Not created; counted in [`ApplyStats::devices_skipped`].
    #[default]
    Skip,
    /// Created with `mknod` (needs root).
    Create,
    /// The layer is refused.
    Refuse,
}

impl std::fmt::Display for DevicePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Skip => "skip",
            Self::Create => "create",
            Self::Refuse => "refuse",
        })
    }
}

/// What one layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    /// File content, as the tar headers give its size (holes included).
    pub bytes: u64,
    /// File data written to the disk: runs of zeros become holes, so a sparse file stays
    /// sparse and a layer of zeros costs next to nothing.
    pub written: u64,
    /// Entries owned by someone else, applied owned by us (`rootless`).
    pub owners_dropped: u64,
    /// Setuid/setgid bits removed from such entries (`rootless`).
    pub setid_stripped: u64,
    pub whiteouts: u64,
    /// Device nodes not created ([`DevicePolicy::Skip`]).
    pub devices_skipped: u64,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Applies the layer blob at `blob` (tar, gzip or zstd) onto `root`.
pub fn apply_layer(root: &Path, blob: &Path, layer: &str, opts: &ApplyOptions) -> Result<ApplyStats, ImageError> {
    apply_layer_reporting(root, blob, layer, None, opts, &|_| {}, &|_| {})
}

/// [`apply_layer`], checking the uncompressed tar against `diff_id` (the image config's
/// digest of it) when given, and calling `on_read` with the number of blob bytes read as it
/// goes, and `on_entry` with the file bytes written after each entry applied (a layer of many
/// small files is read long before it is applied: the entries say how far it is). A
/// mismatch is [`ImageError::DiffIdMismatch`] after the entries were applied: the caller
/// must not seal what it applied them to.
pub fn apply_layer_reporting(
    root: &Path,
    blob: &Path,
    layer: &str,
    diff_id: Option<&Digest>,
    opts: &ApplyOptions,
    on_read: &dyn Fn(u64),
    on_entry: &dyn Fn(u64),
) -> Result<ApplyStats, ImageError> {
    let file = fs::File::open(blob).map_err(|e| ImageError::io("opening layer", blob, e))?;
    apply_layer_from(root, file, blob, layer, diff_id, opts, on_read, on_entry).map(|(stats, _)| stats)
}

/// [`apply_layer_reporting`] on the layer's bytes as `input` yields them (a download in
/// progress: `feed.rs`); `origin` names where they come from in I/O errors. A gzip or
/// zstd layer is decompressed on a thread of its own (`inflate.rs`); `input` comes back read
/// to its end.
#[allow(clippy::too_many_arguments)]
pub fn apply_layer_from<R: Read + Send + 'static>(
    root: &Path,
    input: R,
    origin: &Path,
    layer: &str,
    diff_id: Option<&Digest>,
    opts: &ApplyOptions,
    on_read: &dyn Fn(u64),
    on_entry: &dyn Fn(u64),
) -> Result<(ApplyStats, R), ImageError> {
    let blob = origin;
    let reading = |e| ImageError::io("reading layer", blob, e);
    let mut tar = inflate::spawn(input, diff_id.is_some(), on_read).map_err(reading)?;
    let stats = Applier {
        root,
        root_fd: Rc::new(confine::open_root(root)?),
        layer,
        opts,
        stats: ApplyStats::default(),
        written: Written::default(),
        last_dir: None,
        buf: vec![0u8; COPY_BUF],
        on_entry,
    }
    .run(Box::new(&mut tar))?;
    let (actual, input) = tar.finish().map_err(reading)?;
    if let (Some(expected), Some(actual)) = (diff_id, actual)
        && actual != *expected
    {
        return Err(ImageError::DiffIdMismatch {
            layer: layer.to_owned(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok((stats, input))
}

struct Applier<'a> {
    /// The volume root, for messages: every call is relative to `root_fd`.
    root: &'a Path,
    /// The root, held open for the whole layer (`confine.rs`).
    root_fd: Rc<OwnedFd>,
    layer: &'a str,
    opts: &'a ApplyOptions,
    stats: ApplyStats,
    /// Entries this layer wrote (relative paths), which an opaque marker must keep.
    written: Written,
    /// The directory the last entry went into, as the entry named it, held open. Dropped
    /// whenever a directory or a symlink is removed (what a name resolves to may change).
    last_dir: Option<(PathBuf, HeldDir)>,
    /// Told the file bytes written after each entry.
    on_entry: &'a dyn Fn(u64),
    /// The copy buffer, one for the layer (not one per file: most files are small).
    buf: Vec<u8>,
}

/// The entries a layer wrote, by their path as the layer names it (relative, clean), kept as
/// bytes: hashing a `Path` walks its components, and this is asked of every entry. (std's
/// keyed hasher stays: the paths are the layer's, and a layer may be hostile.)
#[derive(Default)]
struct Written(HashSet<Box<[u8]>>);

impl Written {
    fn insert(&mut self, rel: &Path) {
        self.0.insert(rel.as_os_str().as_bytes().into());
    }
    fn remove(&mut self, rel: &Path) {
        self.0.remove(rel.as_os_str().as_bytes());
    }
    fn contains(&self, rel: &Path) -> bool {
        self.0.contains(rel.as_os_str().as_bytes())
    }
}

/// Bytes of the layer read at a time. Small enough to stay in the CPU's cache between the
/// read that fills it and the write that empties it: with 1 MiB, copying the layer in from
/// the kernel cost four times what it costs GNU tar with its 10 KiB records.
const READ_BUF: usize = 64 << 10;

/// Bytes copied from the tar to a file at a time.
const COPY_BUF: usize = 128 << 10;

/// The process's umask, read once (Linux reports it in /proc/self/status; setting it to
/// read it would race with other threads creating files). Unknown: every bit, so that the
/// mode is always set explicitly.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0o7777)
    })
}

/// Whether `block` is all zero bytes (16 at a time: this runs over every byte of a layer).
fn all_zero(block: &[u8]) -> bool {
    let (chunks, rest) = block.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|b| *b == 0)
}

impl Applier<'_> {
    fn refuse(&self, entry: &Path, rule: impl Into<String>) -> ImageError {
        ImageError::Refused { layer: self.layer.to_owned(), entry: entry.display().to_string(), rule: rule.into() }
    }

    fn corrupt(&self, detail: impl std::fmt::Display) -> ImageError {
        // A corrupt header's bytes end up in the tar crate's messages: never print them raw.
        let detail = crate::quote::escape_unprintable(&detail.to_string());
        ImageError::Corrupt { layer: self.layer.to_owned(), detail: crate::quote::shorten(&detail, 300) }
    }

    fn run(mut self, stream: Box<dyn Read + '_>) -> Result<ApplyStats, ImageError> {
        let mut archive = tar::Archive::new(stream);
        let mut dir_times = Vec::new();
        let entries = archive.entries().map_err(|e| self.corrupt(e))?;
        // The entry's path, copied out of it (the entry is read while the path is used):
        // one buffer for the layer, not an allocation per entry.
        let mut raw = Vec::new();
        for entry in entries {
            if self.opts.stop.as_ref().is_some_and(|t| t.is_cancelled()) {
                return Err(ImageError::Stopped { layer: self.layer.to_owned(), entries: self.stats.entries });
            }
            // A slow disk, for the tests of stopping a long unpack.
            crate::fault::pause_blocking("apply.entry", self.layer);
            let mut entry = entry.map_err(|e| self.corrupt(e))?;
            raw.clear();
            raw.extend_from_slice(&entry.path_bytes());
            let before = self.stats.written;
            let applied = self.apply_entry(Path::new(OsStr::from_bytes(&raw)), &mut entry)?;
            (self.on_entry)(self.stats.written - before);
            if let Some(dir) = applied {
                dir_times.push(dir);
            }
        }
        // Directory mtimes last, deepest first: writing children changes them. A directory a
        // later entry of the layer replaced (by a file, a symlink) is left as that entry made it.
        dir_times.sort_by_key(|(rel, _): &(PathBuf, filetime::FileTime)| std::cmp::Reverse(rel.components().count()));
        for (rel, mtime) in dir_times {
            let (parent, name) = (rel.parent().unwrap_or(Path::new("")), rel.file_name().unwrap_or_default());
            // Never through a symlink: `rel` is the path the directory was made at, symlinks
            // resolved, so one found on it now was put there by a later entry.
            let parent = if parent.as_os_str().is_empty() {
                self.root_dir()
            } else {
                match confine::open_beneath(self.root_fd.as_ref(), parent) {
                    Ok(fd) => HeldDir { rel: parent.to_owned(), fd: Rc::new(fd) },
                    Err(Errno::ELOOP | Errno::ENOENT | Errno::ENOTDIR) => continue,
                    Err(e) => return Err(self.io("opening directory", parent, e)),
                }
            };
            if confine::kind_at(parent.fd.as_ref(), name).map_err(|e| self.io("inspecting", &rel, e))?
                != Some(SFlag::S_IFDIR)
            {
                continue;
            }
            self.set_times_at(&parent, name, mtime, &rel, "setting directory times")?;
        }
        Ok(self.stats)
    }

    /// Applies one entry; returns a directory whose mtime is to be set at the end.
    fn apply_entry<R: Read>(
        &mut self,
        raw: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Option<(PathBuf, filetime::FileTime)>, ImageError> {
        let rel = self.sanitize(raw, raw)?;
        let Some(name) = rel.file_name() else {
            return Ok(None); // the root itself ("./"): keep the volume root as it is
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let name_bytes = name.as_bytes();
        self.stats.entries += 1;

        if name_bytes == OPAQUE.as_bytes() {
            if let Some(dir) = self.open_dir(raw, parent_rel, Walk::Lookup)? {
                self.clear_unwritten(&dir, parent_rel)?;
            }
            return Ok(None);
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let hidden = OsStr::from_bytes(hidden);
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(self.refuse(raw, "whiteout names no entry"));
            }
            self.stats.whiteouts += 1;
            // Only lower layers' entries are hidden: this layer's own entry stays.
            if self.written.contains(&parent_rel.join(hidden)) {
                return Ok(None);
            }
            if let Some(dir) = self.open_dir(raw, parent_rel, Walk::Lookup)? {
                self.remove_at(&dir, hidden)?;
            }
            return Ok(None);
        }
        if matches!(entry.header().entry_type(), tar::EntryType::Char | tar::EntryType::Block) {
            match self.opts.devices {
                DevicePolicy::Create => {}
                DevicePolicy::Skip => {
                    self.stats.devices_skipped += 1;
                    return Ok(None);
                }
                DevicePolicy::Refuse => {
                    return Err(self.refuse(
                        raw,
                        "device nodes are refused (images.devices = \"refuse\"; \"skip\" leaves them out, \"create\" makes them)",
                    ));
                }
            }
        }

        let header = entry.header();
        let kind = header.entry_type();
        let mut mode = header.mode().map_err(|e| self.corrupt(e))? & 0o7777;
        let uid = header.uid().map_err(|e| self.corrupt(e))?;
        let gid = header.gid().map_err(|e| self.corrupt(e))?;
        if uid > u64::from(u32::MAX) || gid > u64::from(u32::MAX) {
            return Err(self.refuse(raw, format!("owner {uid}:{gid} is outside the 32-bit range of Linux ids")));
        }
        if !self.opts.preserve_owners && (uid, gid) != process_owner() && kind != tar::EntryType::Link {
            if !self.opts.rootless {
                let (me, my_group) = process_owner();
                return Err(ImageError::OwnersNeedRoot {
                    layer: self.layer.to_owned(),
                    entry: raw.display().to_string(),
                    owner: format!("{uid}:{gid}"),
                    me: format!("{me}:{my_group}"),
                });
            }
            self.stats.owners_dropped += 1;
            if mode & 0o6000 != 0 {
                mode &= !0o6000;
                self.stats.setid_stripped += 1;
            }
        }
        let mtime = filetime::FileTime::from_unix_time(header.mtime().map_err(|e| self.corrupt(e))? as i64, 0);
        let size = entry.size();

        let parent = self.resolve_dir(raw, parent_rel)?;
        // Where the entry lands, symlinks resolved: for messages, and for directory times.
        let dest = parent.rel.join(name);
        self.written.insert(&rel);
        let mut dir_time = None;
        match kind {
            tar::EntryType::Directory => {
                match confine::kind_at(parent.fd.as_ref(), name).map_err(|e| self.io("inspecting", &dest, e))? {
                    Some(SFlag::S_IFDIR) => {}
                    Some(_) => {
                        self.remove_at(&parent, name)?;
                        self.mkdir_at(&parent, name)?;
                    }
                    None => self.mkdir_at(&parent, name)?,
                }
                // Owner before mode: chown clears set-id bits.
                self.chown_at(&parent, name, uid, gid)?;
                nix::sys::stat::fchmodat(
                    parent.fd.as_ref(),
                    name,
                    Mode::from_bits_truncate(mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| self.io("setting the mode of", &dest, e))?;
                dir_time = Some((dest, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.stats.bytes += size;
                if self.stats.bytes > self.opts.max_layer_bytes {
                    let cap = self.opts.max_layer_bytes;
                    return Err(self.refuse(
                        raw,
                        format!(
                            "the layer's files add up to more than the cap of {cap} bytes (images.max_layer_bytes)"
                        ),
                    ));
                }
                // Create first, remove only if something is there (one syscall fewer per file
                // than looking first; an existing final component is replaced, never followed).
                // Created with its mode: when the umask keeps every bit and no chown will
                // clear set-id bits, no chmod is needed after.
                let create = || {
                    nix::fcntl::openat(
                        parent.fd.as_ref(),
                        name,
                        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(mode),
                    )
                };
                let file = match create() {
                    Ok(fd) => fd,
                    Err(Errno::EEXIST) => {
                        self.remove_at(&parent, name)?;
                        create().map_err(|e| self.io("creating", &dest, e))?
                    }
                    Err(e) => return Err(self.io("creating", &dest, e)),
                };
                let mut file = fs::File::from(file);
                let copied = self.write_content(raw, entry, &mut file, &dest)?;
                if copied != size {
                    return Err(self.corrupt(format!("{} ends after {copied} of {size} bytes", raw.display())));
                }
                // Owner before mode: chown clears set-id bits.
                if self.opts.preserve_owners {
                    std::os::unix::fs::fchown(&file, Some(uid as u32), Some(gid as u32))
                        .map_err(|e| ImageError::io("setting the owner of", self.root.join(&dest), e))?;
                }
                if umask() & mode != 0 || mode & 0o6000 != 0 {
                    file.set_permissions(fs::Permissions::from_mode(mode))
                        .map_err(|e| ImageError::io("setting the mode of", self.root.join(&dest), e))?;
                }
                file.set_modified(
                    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(mtime.unix_seconds() as u64),
                )
                .map_err(|e| ImageError::io("setting the mtime of", self.root.join(&dest), e))?;
                self.apply_xattrs(entry, &file, &dest)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.corrupt(e))?
                    .ok_or_else(|| self.refuse(raw, "symlink without a target"))?
                    .into_owned();
                self.remove_at(&parent, name)?;
                nix::unistd::symlinkat(&target, parent.fd.as_ref(), name)
                    .map_err(|e| self.io("creating symlink", &dest, e))?;
                self.chown_at(&parent, name, uid, gid)?;
                self.set_times_at(&parent, name, mtime, &dest, "setting the mtime of")?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(|e| self.corrupt(e))?
                    .ok_or_else(|| self.refuse(raw, "hardlink without a target"))?
                    .into_owned();
                let target_rel = self.sanitize(raw, &target_raw).map_err(|_| {
                    self.refuse(raw, format!("hardlink to {} points outside the volume root", target_raw.display()))
                })?;
                let target_parent = self.resolve_dir(raw, target_rel.parent().unwrap_or(Path::new("")))?;
                let target_name = target_rel.file_name().unwrap_or_default();
                match confine::kind_at(target_parent.fd.as_ref(), target_name) {
                    Ok(Some(kind)) if kind != SFlag::S_IFDIR => {}
                    _ => {
                        return Err(self
                            .refuse(raw, format!("hardlink target {} is not an existing file", target_raw.display())));
                    }
                }
                if target_parent.rel.join(target_name) != dest {
                    self.remove_at(&parent, name)?;
                    nix::unistd::linkat(
                        target_parent.fd.as_ref(),
                        target_name,
                        parent.fd.as_ref(),
                        name,
                        nix::fcntl::AtFlags::empty(),
                    )
                    .map_err(|e| self.io("creating hardlink", &dest, e))?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                // Device nodes reach here only under DevicePolicy::Create.
                self.remove_at(&parent, name)?;
                let (node, dev) = if kind == tar::EntryType::Fifo {
                    (SFlag::S_IFIFO, 0)
                } else {
                    let major = header.device_major().map_err(|e| self.corrupt(e))?.unwrap_or(0);
                    let minor = header.device_minor().map_err(|e| self.corrupt(e))?.unwrap_or(0);
                    let node = if kind == tar::EntryType::Char { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                    (node, libc::makedev(major, minor))
                };
                nix::sys::stat::mknodat(parent.fd.as_ref(), name, node, Mode::from_bits_truncate(mode), dev)
                    .map_err(|e| self.io("creating node", &dest, e))?;
                self.chown_at(&parent, name, uid, gid)?;
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {
                self.written.remove(&rel);
                self.stats.entries -= 1;
            }
            other => {
                return Err(self.refuse(raw, format!("unsupported tar entry type {other:?}")));
            }
        }
        Ok(dir_time)
    }

    /// An I/O error of a call on `rel` (relative to the root), naming the whole path.
    fn io(&self, what: &'static str, rel: &Path, e: Errno) -> ImageError {
        ImageError::io(what, self.root.join(rel), e.into())
    }

    fn mkdir_at(&self, dir: &HeldDir, name: &OsStr) -> Result<(), ImageError> {
        nix::sys::stat::mkdirat(dir.fd.as_ref(), name, Mode::from_bits_truncate(0o755))
            .map_err(|e| self.io("creating directory", &dir.rel.join(name), e))
    }

    /// Removes whatever is at `name` in `dir` (never following a symlink); nothing there is
    /// fine.
    fn remove_at(&mut self, dir: &HeldDir, name: &OsStr) -> Result<(), ImageError> {
        let rel = dir.rel.join(name);
        let kind = confine::kind_at(dir.fd.as_ref(), name).map_err(|e| self.io("inspecting", &rel, e))?;
        if matches!(kind, Some(SFlag::S_IFDIR | SFlag::S_IFLNK)) {
            // What a held name resolves to may be what is removed, or beneath it.
            self.last_dir = None;
        }
        match kind {
            None => Ok(()),
            Some(SFlag::S_IFDIR) => remove_tree(dir.fd.as_ref(), name).map_err(|e| self.io("removing", &rel, e)),
            Some(_) => nix::unistd::unlinkat(dir.fd.as_ref(), name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(|e| self.io("removing", &rel, e)),
        }
    }

    /// Opaque directory: removes every child of `dir` (named `rel` by the layer) that this
    /// layer did not write, recursing into directories it did write.
    fn clear_unwritten(&mut self, dir: &HeldDir, rel: &Path) -> Result<(), ImageError> {
        let children = open_listing(dir.fd.as_ref(), OsStr::new("."))
            .and_then(|mut listing| names_in(&mut listing))
            .map_err(|e| self.io("listing", &dir.rel, e))?;
        for child in children {
            let child_rel = rel.join(&child);
            if !self.written.contains(&child_rel) {
                self.remove_at(dir, &child)?;
            } else if confine::kind_at(dir.fd.as_ref(), &child).is_ok_and(|k| k == Some(SFlag::S_IFDIR)) {
                let fd = confine::open_child_dir(dir.fd.as_ref(), &child)
                    .map_err(|e| self.io("opening directory", &dir.rel.join(&child), e))?;
                self.clear_unwritten(&HeldDir { rel: dir.rel.join(&child), fd: Rc::new(fd) }, &child_rel)?;
            }
        }
        Ok(())
    }

    fn chown_at(&self, dir: &HeldDir, name: &OsStr, uid: u64, gid: u64) -> Result<(), ImageError> {
        if !self.opts.preserve_owners {
            return Ok(());
        }
        nix::unistd::fchownat(
            dir.fd.as_ref(),
            name,
            Some(nix::unistd::Uid::from_raw(uid as u32)),
            Some(nix::unistd::Gid::from_raw(gid as u32)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io("setting the owner of", &dir.rel.join(name), e))
    }

    /// Sets the access and modification times of `name` in `dir` (itself, if a symlink).
    fn set_times_at(
        &self,
        dir: &HeldDir,
        name: &OsStr,
        mtime: filetime::FileTime,
        rel: &Path,
        what: &'static str,
    ) -> Result<(), ImageError> {
        let time = nix::sys::time::TimeSpec::new(mtime.unix_seconds(), 0);
        nix::sys::stat::utimensat(dir.fd.as_ref(), name, &time, &time, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
            .map_err(|e| self.io(what, rel, e))
    }

    /// Copies an entry's content into `file`, leaving holes where it is zeros, and refuses
    /// the layer as soon as its data would not fit in the host's room. Returns the bytes read.
    fn write_content<R: Read>(
        &mut self,
        raw: &Path,
        entry: &mut tar::Entry<'_, R>,
        file: &mut fs::File,
        dest: &Path,
    ) -> Result<u64, ImageError> {
        let mut buf = std::mem::take(&mut self.buf);
        let copied = self.copy_content(raw, entry, file, dest, &mut buf);
        self.buf = buf;
        copied
    }

    fn copy_content<R: Read>(
        &mut self,
        raw: &Path,
        entry: &mut tar::Entry<'_, R>,
        file: &mut fs::File,
        dest: &Path,
        buf: &mut [u8],
    ) -> Result<u64, ImageError> {
        use std::io::{Seek, SeekFrom, Write};
        const BLOCK: usize = 4096;
        let (mut copied, mut hole) = (0u64, false);
        loop {
            let n = match entry.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(match e.kind() {
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData => {
                            self.corrupt(format!("{}: {e}", raw.display()))
                        }
                        _ => ImageError::io("reading the layer for", self.root.join(dest), e),
                    });
                }
            };
            copied += n as u64;
            // Runs of whole zero blocks are skipped (a hole); everything else is written.
            let mut at = 0;
            while at < n {
                let end = (at + BLOCK).min(n);
                let zeros = end - at == BLOCK && all_zero(&buf[at..end]);
                let mut run_end = end;
                while run_end < n {
                    let next = (run_end + BLOCK).min(n);
                    let next_zeros = next - run_end == BLOCK && all_zero(&buf[run_end..next]);
                    if next_zeros != zeros {
                        break;
                    }
                    run_end = next;
                }
                if zeros {
                    file.seek(SeekFrom::Current((run_end - at) as i64))
                        .map_err(|e| ImageError::io("writing", self.root.join(dest), e))?;
                    hole = true;
                } else {
                    let len = (run_end - at) as u64;
                    if let Some(room) = self.opts.room_bytes
                        && self.stats.written + len > room
                    {
                        return Err(ImageError::TooLargeForHost {
                            layer: self.layer.to_owned(),
                            entry: raw.display().to_string(),
                            room,
                        });
                    }
                    file.write_all(&buf[at..run_end])
                        .map_err(|e| ImageError::io("writing", self.root.join(dest), e))?;
                    self.stats.written += len;
                    hole = false;
                }
                at = run_end;
            }
        }
        // A file that ends in a hole gets its length from set_len.
        if hole {
            file.set_len(copied).map_err(|e| ImageError::io("writing", self.root.join(dest), e))?;
        }
        Ok(copied)
    }

    fn apply_xattrs<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        file: &fs::File,
        dest: &Path,
    ) -> Result<(), ImageError> {
        use xattr::FileExt;
        let Some(exts) = entry.pax_extensions().map_err(|e| self.corrupt(e))? else {
            return Ok(());
        };
        for ext in exts {
            let ext = ext.map_err(|e| self.corrupt(e))?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                // "Where the filesystem allows": tmpfs and others refuse some namespaces.
                if let Err(e) = file.set_xattr(name, ext.value_bytes()) {
                    tracing::debug!(path = %dest.display(), xattr = name, error = %e, "xattr not applied");
                }
            }
        }
        Ok(())
    }
}

/// Opens directory `name` of `dir` to list it, not following a symlink.
fn open_listing(dir: &impl AsFd, name: &OsStr) -> Result<nix::dir::Dir, Errno> {
    nix::dir::Dir::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The names in `listing`, but `.` and `..`.
fn names_in(listing: &mut nix::dir::Dir) -> Result<Vec<std::ffi::OsString>, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    for e in listing.iter() {
        let e = e?;
        let bytes = e.file_name().to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsStr::from_bytes(bytes).to_owned());
        }
    }
    Ok(names)
}

/// Removes directory `name` of `dir` and everything in it, never following a symlink.
fn remove_tree(dir: &impl AsFd, name: &OsStr) -> Result<(), Errno> {
    let mut inner = open_listing(dir, name)?;
    for child in names_in(&mut inner)? {
        if confine::kind_at(&inner, &child)? == Some(SFlag::S_IFDIR) {
            remove_tree(&inner, &child)?;
        } else {
            nix::unistd::unlinkat(&inner, child.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        }
    }
    drop(inner);
    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir)
}

mod confine;
mod inflate;

use confine::{HeldDir, Walk};

#[cfg(test)]
mod tests;
