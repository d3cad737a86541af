//! Remembered digests of a directory source's layer files. A flat family is listed from its
//! files, and every listing (each prepare resolves its family twice) would hash every layer
//! again: gigabytes read to learn what is already known. A file's digest is remembered by
//! what identifies its content on the disk: device, inode, size, mtime and ctime. ctime
//! matters: the kernel sets it on every write and nobody can set it back, so a file
//! rewritten in place with the same size and a restored mtime is still hashed again.
//!
//! The kernel's clock for ctime is coarse (a few ms), so a file rewritten within the same
//! tick as its last change could keep its ctime: a file is remembered only once it has been
//! left alone for [`SETTLE`] (as git treats a "racily clean" file), so any later change
//! lands on a later tick.
//!
//! A remembered digest only names which blob to fetch: the blob cache hashes every byte it
//! stores, so a stale memory can fail a prepare, never seal wrong bytes.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::digest::{Digest, Hasher};

/// How long a file must be left unchanged before its digest is remembered.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What identifies a file's content on the disk without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &Metadata) -> FileIdentity {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Where remembered digests are kept (the host database: `store/file_digests.rs`). Errors
/// are the memory's own: the caller hashes the file instead.
pub trait DigestMemo: Send + Sync {
    /// The digest remembered for `path` if the file there still has identity `id`.
    fn recall(&self, path: &Path, id: &FileIdentity) -> Result<Option<Digest>, String>;
    /// Remembers `digest` for `path` with identity `id`.
    fn remember(&self, path: &Path, id: &FileIdentity, digest: &Digest) -> Result<(), String>;
}

/// The digest and size of the file at `path`: remembered by `memo` if it knows this file as
/// it is, else hashed (and remembered if the file did not change while it was read and had
/// been left alone for [`SETTLE`] by `now`).
pub fn digest_of(path: &Path, memo: Option<&dyn DigestMemo>, now: SystemTime) -> std::io::Result<(Digest, u64)> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let before = FileIdentity::of(&file.metadata()?);
    if let Some(memo) = memo {
        match memo.recall(path, &before) {
            Ok(Some(digest)) => return Ok((digest, before.size)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not look up a remembered digest; hashing the file")
            }
        }
    }
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let digest = h.finish();
    let settled = i128::try_from(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos())
        .is_ok_and(|now_ns| now_ns - before.ctime_ns >= SETTLE.as_nanos() as i128);
    if let Some(memo) = memo
        && settled
        && FileIdentity::of(&file.metadata()?) == before
        && size == before.size
        && let Err(e) = memo.remember(path, &before, &digest)
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remember a file's digest; it is hashed again next time");
    }
    Ok((digest, size))
}
