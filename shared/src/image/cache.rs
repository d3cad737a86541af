//! The per-host blob cache: `<dir>/sha256/<hex>`, each file verified before it is named.
//!
//! A blob is streamed from its source into `<dir>/tmp/<hex>.part` while being hashed, synced,
//! and renamed into place only when the digest matches. A file under its digest name
//! therefore always holds that content, and is reused without re-hashing. `tee` passes the
//! bytes on to an unpacker as they arrive (`feed.rs`) and syncs and names the copy in the
//! background.
//!
//! A partial download is kept: the next attempt (after a dropped connection, a stall or a
//! crash) hashes the bytes it already has and asks the source for the rest only (a ranged
//! GET on S3). The digest still decides: if the finished file does not match and it was
//! resumed, the partial is discarded and the error is transient, because the stale part may
//! be what was wrong; a fresh download that does not match is a corrupt source. Partials
//! untouched for a day are removed when the cache is opened. One download per blob at a time
//! in this process; the worker lease makes the process the only user of the cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::digest::{Digest, Hasher};
use super::error::ImageError;
use super::feed::{FEED_CHUNK, Feed};
use super::layout::LayerDesc;
use super::source::BlobSource;

/// Times a blob being fed to an unpacker is opened again after its connection broke, per
/// attempt of the step.
const REOPENS: u32 = 3;

/// Partial downloads older than this are not worth resuming.
const STALE_PARTIAL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug)]
pub struct BlobCache {
    dir: PathBuf,
    /// A download that yields no byte for this long fails (transient) instead of hanging.
    stall_timeout: Duration,
    /// One download per digest at a time (they share the `.part` file).
    downloading: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl BlobCache {
    /// Opens the cache at `dir`, creating it, and removes stale or foreign partial files.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        let tmp = dir.join("tmp");
        for d in [dir.join("sha256"), tmp.clone()] {
            std::fs::create_dir_all(&d).map_err(|e| ImageError::io("creating the blob cache", &d, e))?;
        }
        let entries = std::fs::read_dir(&tmp).map_err(|e| ImageError::io("listing", &tmp, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("listing", &tmp, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let resumable =
                name.strip_suffix(".part").is_some_and(|hex| Digest::parse(&format!("sha256:{hex}")).is_ok());
            let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if !resumable || age.is_none_or(|a| a > STALE_PARTIAL) {
                std::fs::remove_file(&path).map_err(|e| ImageError::io("removing a partial download", &path, e))?;
            }
        }
        Ok(Self { dir, stall_timeout: Duration::from_secs(60), downloading: Arc::default() })
    }

    /// Sets how long a download may yield no data before it fails as transient.
    pub fn with_stall_timeout(mut self, stall_timeout: Duration) -> Self {
        self.stall_timeout = stall_timeout;
        self
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    /// Where a download of `digest` in progress (or interrupted) is kept.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("tmp").join(format!("{}.part", digest.hex()))
    }

    /// Every complete blob in the cache, with its size in bytes.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, ImageError> {
        let dir = self.dir.join("sha256");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| ImageError::io("listing", &dir, e))? {
            let entry = entry.map_err(|e| ImageError::io("listing", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(digest) = Digest::parse(&format!("sha256:{name}")) {
                let size = entry.metadata().map_err(|e| ImageError::io("reading", entry.path(), e))?.len();
                out.push((digest, size));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a cached blob; a later prepare that needs it downloads it again. Missing:
    /// nothing to do.
    pub fn remove(&self, digest: &Digest) -> Result<(), ImageError> {
        let path = self.path(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("removing", path, e)),
        }
    }

    /// Bytes held by complete blobs.
    pub fn size(&self) -> Result<u64, ImageError> {
        Ok(self.list()?.iter().map(|(_, n)| n).sum())
    }

    /// Every partial download kept for resuming, with its size in bytes.
    pub fn partials(&self) -> Result<Vec<(Digest, u64)>, ImageError> {
        let tmp = self.dir.join("tmp");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&tmp).map_err(|e| ImageError::io("listing", &tmp, e))? {
            let entry = entry.map_err(|e| ImageError::io("listing", &tmp, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(digest) = name.strip_suffix(".part").and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
            else {
                continue;
            };
            match entry.metadata() {
                Ok(m) => out.push((digest, m.len())),
                // Finished or removed while we listed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("reading", entry.path(), e)),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the partial download of `digest` unless a download of it is running now
    /// (then `false`). A later download of the blob starts from its first byte.
    pub fn remove_idle_partial(&self, digest: &Digest) -> Result<bool, ImageError> {
        let lock = {
            let mut map = crate::sync::lock(&self.downloading);
            map.entry(digest.hex().to_owned()).or_default().clone()
        };
        let Ok(_idle) = lock.try_lock() else { return Ok(false) };
        let part = self.partial_path(digest);
        match std::fs::remove_file(&part) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ImageError::io("removing a partial download", part, e)),
        }
    }

    /// Bytes still to download for `layers`: each one's size, less what is cached or kept
    /// from an interrupted download.
    pub fn missing_bytes(&self, layers: &[LayerDesc]) -> u64 {
        layers
            .iter()
            .filter(|l| !self.contains(&l.digest))
            .map(|l| {
                let have = std::fs::metadata(self.partial_path(&l.digest)).map_or(0, |m| m.len());
                l.size.saturating_sub(have)
            })
            .sum()
    }

    /// Where the cache lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes that can still be written on the cache's filesystem before it reaches
    /// `limit_percent` full (as `df` counts: used over used plus available).
    pub fn room_below(&self, limit_percent: f64) -> Result<u64, ImageError> {
        let st = nix::sys::statvfs::statvfs(&self.dir)
            .map_err(|e| ImageError::io("measuring the filesystem of", &self.dir, e.into()))?;
        let unit = st.fragment_size() as u64;
        let used = (st.blocks() as u64).saturating_sub(st.blocks_free() as u64) * unit;
        let total = used + st.blocks_available() as u64 * unit;
        Ok(((total as f64 * limit_percent / 100.0) as u64).saturating_sub(used))
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The cached blob of `layer`, downloading (the rest of) it from `source` if it is not
    /// cached yet. Returns the path and the bytes downloaded now (0 when it was cached).
    #[tracing::instrument(
        name = "blob.ensure",
        skip_all,
        fields(digest = %layer.digest, size = layer.size, fetched = tracing::field::Empty),
        err(Display)
    )]
    pub async fn ensure(&self, source: &dyn BlobSource, layer: &LayerDesc) -> Result<(PathBuf, u64), ImageError> {
        self.ensure_reporting(source, layer, &|_| {}).await
    }

    /// [`BlobCache::ensure`], calling `on_bytes` with each chunk's size as it is downloaded.
    pub async fn ensure_reporting(
        &self,
        source: &dyn BlobSource,
        layer: &LayerDesc,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(PathBuf, u64), ImageError> {
        let dest = self.path(&layer.digest);
        if dest.is_file() {
            return Ok((dest, 0));
        }
        let _only_download = self.lock_of(&layer.digest).lock_owned().await;
        if dest.is_file() {
            return Ok((dest, 0)); // another task finished it while we waited
        }
        let part = self.partial_path(&layer.digest);
        // On error the partial stays for the next attempt, unless it failed its digest.
        let (file, fetched) =
            self.fetch_verified(source, layer, &part, None, on_bytes).await.map_err(TeeError::into_image)?;
        file.sync_all().await.map_err(|e| ImageError::io("syncing", &part, e))?;
        drop(file);
        self.name(&part, &dest).await?;
        tracing::Span::current().record("fetched", fetched);
        Ok((dest, fetched))
    }

    /// Streams `layer` to `feed` while caching it (one pass: the bytes are hashed, written to
    /// the cache and sent on, never read back), then sends [`Feed::Verified`] once the whole
    /// blob matched its digest. The cache copy is synced and named in the background: it is
    /// an optimisation, and a blob whose copy did not reach the disk before a crash is
    /// downloaded again. A blob already cached is sent from the cache. Returns the bytes
    /// downloaded now.
    pub async fn tee(
        &self,
        source: &dyn BlobSource,
        layer: &LayerDesc,
        feed: &mpsc::Sender<Feed>,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, TeeError> {
        let only_download = self.lock_of(&layer.digest).lock_owned().await;
        let dest = self.path(&layer.digest);
        if dest.is_file() {
            // Named while we waited for the lock (an earlier attempt's copy, synced meanwhile).
            send_file(&dest, feed, on_bytes).await?;
            feed.send(Feed::Verified).await.map_err(|_| TeeError::ReaderGone)?;
            return Ok(0);
        }
        let part = self.partial_path(&layer.digest);
        let (file, fetched) = self.fetch_verified(source, layer, &part, Some(feed), on_bytes).await?;
        let sent = feed.send(Feed::Verified).await.map_err(|_| TeeError::ReaderGone);
        // Named in the background, holding the blob's lock until then: a download of the same
        // blob meanwhile waits for it and then finds it named.
        let cache = self.clone();
        tokio::spawn(async move {
            let _held = only_download;
            let synced = file.sync_all().await.map_err(|e| ImageError::io("syncing", &part, e));
            drop(file);
            if let Err(e) = async {
                synced?;
                cache.name(&part, &dest).await
            }
            .await
            {
                tracing::warn!(error = %e, "a verified blob was not kept in the cache; a later prepare that needs it downloads it again");
            }
        });
        sent?;
        Ok(fetched)
    }

    /// The lock that makes one download per blob at a time (they share the `.part` file).
    fn lock_of(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = crate::sync::lock(&self.downloading);
        map.entry(digest.hex().to_owned()).or_default().clone()
    }

    /// Renames a verified, synced partial `part` into place at `dest`, durably.
    async fn name(&self, part: &Path, dest: &Path) -> Result<(), ImageError> {
        tokio::fs::rename(part, dest).await.map_err(|e| ImageError::io("renaming into the cache", dest, e))?;
        let dir = self.dir.join("sha256");
        let synced = tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
            .await
            .map_err(|e| ImageError::io("syncing the cache directory", dest, std::io::Error::other(e)))?;
        synced.map_err(|e| ImageError::io("syncing the cache directory", dest, e))
    }

    /// Completes the partial `part` of `layer` from `source` (hashing what it already has
    /// first), sending every byte of the blob to `feed` if given, and checks the digest.
    /// Returns the partial, flushed but not synced, and the bytes downloaded now.
    async fn fetch_verified(
        &self,
        source: &dyn BlobSource,
        layer: &LayerDesc,
        part: &Path,
        feed: Option<&mpsc::Sender<Feed>>,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(tokio::fs::File, u64), TeeError> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(part)
            .await
            .map_err(|e| ImageError::io("opening", part, e))?;
        let mut hasher = Hasher::default();
        let mut have = 0u64;
        // Hash (and pass on) what an earlier attempt already fetched.
        loop {
            // Not zeroed: `read_buf` fills the spare capacity (this runs over every byte).
            let mut buf = Vec::with_capacity(FEED_CHUNK);
            let n = file.read_buf(&mut buf).await.map_err(|e| ImageError::io("reading", part, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf);
            have += n as u64;
            if let Some(feed) = feed {
                feed.send(Feed::Bytes(buf)).await.map_err(|_| TeeError::ReaderGone)?;
            }
        }
        let resumed = have > 0;
        if have > layer.size {
            return Err(self.discard(part, "a partial download is longer than the blob").await.into());
        }
        if resumed {
            tracing::info!(digest = %layer.digest, have, size = layer.size, "resuming a partial download");
        }
        let mut fetched = 0u64;
        if have < layer.size || layer.size == 0 {
            let streamed =
                self.stream_into(source, layer, have, &mut file, part, &mut hasher, &mut fetched, feed, on_bytes).await;
            // tokio's File writes in the background: flush before anyone reopens the partial,
            // error or not, so the next attempt sees every byte counted in `fetched`.
            let flushed = file.flush().await.map_err(|e| ImageError::io("writing", part, e));
            streamed?;
            flushed?;
        }
        let actual = hasher.finish();
        if actual != layer.digest {
            if resumed {
                return Err(self.discard(part, "a resumed download did not match its digest").await.into());
            }
            self.remove_partial(part).await;
            return Err(ImageError::DigestMismatch {
                digest: layer.digest.to_string(),
                actual: actual.to_string(),
                source_desc: source.describe(),
            }
            .into());
        }
        Ok((file, fetched))
    }

    /// Appends the blob from byte `from` on to `file`, hashing it and passing it to `feed`.
    /// While feeding an unpacker, a connection that breaks or stalls (a server may close one
    /// that waited while the unpacker was behind) is opened again where it stopped, up to
    /// [`REOPENS`] times, instead of failing the attempt and the unpacking with it.
    #[allow(clippy::too_many_arguments)]
    async fn stream_into(
        &self,
        source: &dyn BlobSource,
        layer: &LayerDesc,
        from: u64,
        file: &mut tokio::fs::File,
        part: &Path,
        hasher: &mut Hasher,
        fetched: &mut u64,
        feed: Option<&mpsc::Sender<Feed>>,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), TeeError> {
        let mut at = from;
        let mut reopened = 0;
        let mut reader = source.open_blob(layer, at).await?;
        loop {
            // A fresh chunk each time (the feed owns the ones it was sent), not zeroed, and
            // filled before it is passed on: one read gives what one network frame held (a
            // few KiB), and the read-ahead is counted in chunks.
            let mut buf = Vec::with_capacity(FEED_CHUNK);
            let (mut failure, mut ended) = (None, false);
            while buf.len() < buf.capacity() {
                match tokio::time::timeout(self.stall_timeout, reader.read_buf(&mut buf)).await {
                    Ok(Ok(0)) => {
                        ended = true;
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        failure = Some(format!("downloading {}: {e}", layer.location));
                        break;
                    }
                    Err(_) => {
                        failure =
                            Some(format!("no data for {:?} while downloading {}", self.stall_timeout, layer.location));
                        break;
                    }
                }
            }
            // What arrived before a failure counts: a reopened connection starts after it.
            if !buf.is_empty() {
                let n = buf.len() as u64;
                hasher.update(&buf);
                file.write_all(&buf).await.map_err(|e| ImageError::io("writing", part, e))?;
                at += n;
                *fetched += n;
                on_bytes(n);
                crate::telemetry::metrics().blob_bytes.add(n, &[]);
                if let Some(feed) = feed {
                    feed.send(Feed::Bytes(buf)).await.map_err(|_| TeeError::ReaderGone)?;
                }
            }
            match failure {
                Some(detail) if feed.is_some() && reopened < REOPENS => {
                    reopened += 1;
                    tracing::warn!(digest = %layer.digest, at, reopened, %detail, "the blob's connection broke while an unpacker applies it; opening it again where it stopped");
                    tokio::time::sleep(Duration::from_millis(200 << reopened)).await;
                    reader = source.open_blob(layer, at).await?;
                }
                Some(detail) => {
                    return Err(ImageError::Unavailable { source_desc: source.describe(), detail }.into());
                }
                None if ended => return Ok(()),
                None => {}
            }
        }
    }

    /// Drops a partial that cannot be trusted; the error is transient (start over).
    async fn discard(&self, part: &Path, why: &str) -> ImageError {
        self.remove_partial(part).await;
        ImageError::Unavailable {
            source_desc: format!("blob cache {}", self.dir.display()),
            detail: format!("{why} ({}); discarded it, the next attempt downloads it whole", part.display()),
        }
    }

    async fn remove_partial(&self, part: &Path) {
        if let Err(e) = tokio::fs::remove_file(part).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %part.display(), error = %e, "could not remove a partial download");
        }
    }
}

/// Why [`BlobCache::tee`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The unpacker stopped reading (it failed, or the prepare stopped): its error is the cause.
    #[error("the unpacker stopped reading the layer")]
    ReaderGone,
}

impl TeeError {
    fn into_image(self) -> ImageError {
        match self {
            Self::Image(e) => e,
            // `ensure` has no reader.
            Self::ReaderGone => ImageError::Unavailable { source_desc: "blob cache".into(), detail: self.to_string() },
        }
    }
}

/// Sends the cached blob at `path` to `feed`.
async fn send_file(
    path: &Path,
    feed: &mpsc::Sender<Feed>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), TeeError> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| ImageError::io("opening", path, e))?;
    loop {
        let mut buf = Vec::with_capacity(FEED_CHUNK);
        let n = file.read_buf(&mut buf).await.map_err(|e| ImageError::io("reading", path, e))?;
        if n == 0 {
            return Ok(());
        }
        on_bytes(n as u64);
        feed.send(Feed::Bytes(buf)).await.map_err(|_| TeeError::ReaderGone)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::LocalDir;

    #[tokio::test]
    async fn a_blob_that_fails_its_digest_is_never_cached() {
        let dir = tempfile::tempdir().unwrap();
        let family = dir.path().join("src/images/web");
        std::fs::create_dir_all(&family).unwrap();
        std::fs::write(family.join("0001.tar"), vec![0u8; 2048]).unwrap();
        let source = LocalDir::new(dir.path().join("src"));
        let manifest = source.manifest("web").await.unwrap();
        let cache = BlobCache::open(dir.path().join("cache")).unwrap();

        // The source changes after the manifest was resolved.
        std::fs::write(family.join("0001.tar"), vec![1u8; 2048]).unwrap();
        let err = cache.ensure(&source, &manifest.layers[0]).await.unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(manifest.layers[0].digest.as_str()), "names the blob: {err}");
        assert!(!cache.contains(&manifest.layers[0].digest));
        assert_eq!(std::fs::read_dir(dir.path().join("cache/tmp")).unwrap().count(), 0, "no partial file left");

        // Restored: downloaded once, then reused by digest.
        std::fs::write(family.join("0001.tar"), vec![0u8; 2048]).unwrap();
        let (path, n) = cache.ensure(&source, &manifest.layers[0]).await.unwrap();
        assert_eq!((n, std::fs::read(&path).unwrap().len()), (2048, 2048));
        assert_eq!(cache.ensure(&source, &manifest.layers[0]).await.unwrap().1, 0, "cached");
    }

    /// Serves a blob from memory, dropping the connection after `cut` bytes of the first
    /// request, and records the offset of every request.
    struct DroppingSource {
        blob: Vec<u8>,
        cut: usize,
        offsets: std::sync::Mutex<Vec<u64>>,
    }

    #[async_trait::async_trait]
    impl BlobSource for DroppingSource {
        fn describe(&self) -> String {
            "dropping".into()
        }
        async fn manifest(&self, _: &str) -> Result<crate::image::Manifest, ImageError> {
            unreachable!()
        }
        async fn open_blob(&self, _: &LayerDesc, offset: u64) -> Result<super::super::source::BlobStream, ImageError> {
            let first = {
                let mut offsets = self.offsets.lock().unwrap();
                offsets.push(offset);
                offsets.len() == 1
            };
            let rest = self.blob[offset as usize..].to_vec();
            if first {
                let head = std::io::Cursor::new(rest[..self.cut].to_vec());
                Ok(Box::pin(tokio::io::AsyncReadExt::chain(head, Reset)))
            } else {
                Ok(Box::pin(std::io::Cursor::new(rest)))
            }
        }
    }

    /// A connection that was reset.
    struct Reset;

    impl tokio::io::AsyncRead for Reset {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")))
        }
    }

    fn layer_of(blob: &[u8]) -> LayerDesc {
        LayerDesc {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            location: "blob".into(),
            digest: Digest::of_bytes(blob),
            size: blob.len() as u64,
            diff_id: None,
        }
    }

    #[tokio::test]
    async fn a_dropped_connection_is_resumed_from_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let source = DroppingSource { blob: blob.clone(), cut: 1_000_000, offsets: Default::default() };
        let layer = layer_of(&blob);
        let cache = BlobCache::open(dir.path()).unwrap();

        let err = cache.ensure(&source, &layer).await.unwrap_err();
        assert!(err.is_retryable(), "a reset connection is transient: {err}");
        assert_eq!(std::fs::metadata(cache.partial_path(&layer.digest)).unwrap().len(), 1_000_000, "partial kept");

        // A crash here changes nothing: reopening the cache keeps a fresh partial.
        let cache = BlobCache::open(dir.path()).unwrap();
        let (path, fetched) = cache.ensure(&source, &layer).await.unwrap();
        assert_eq!(*source.offsets.lock().unwrap(), [0, 1_000_000], "the retry asked only for the rest");
        assert_eq!(fetched, 2_000_000);
        assert_eq!(std::fs::read(path).unwrap(), blob);
        assert!(!cache.partial_path(&layer.digest).exists());
    }

    #[tokio::test]
    async fn a_resumed_partial_that_fails_its_digest_is_discarded_and_retried_whole() {
        let dir = tempfile::tempdir().unwrap();
        let blob = vec![7u8; 100_000];
        let layer = layer_of(&blob);
        let family = dir.path().join("src");
        std::fs::create_dir_all(&family).unwrap();
        std::fs::write(family.join("blob"), &blob).unwrap();
        let source = LocalDir::new(&family);
        let cache = BlobCache::open(dir.path().join("cache")).unwrap();
        // Garbage where the first bytes should be (say, a torn write before a power cut).
        std::fs::write(cache.partial_path(&layer.digest), vec![0u8; 40_000]).unwrap();

        let err = cache.ensure(&source, &layer).await.unwrap_err();
        assert!(err.is_retryable(), "the stale part may be what was wrong, not the source: {err}");
        assert!(!cache.partial_path(&layer.digest).exists(), "discarded");
        let (path, fetched) = cache.ensure(&source, &layer).await.unwrap();
        assert_eq!((fetched, std::fs::read(path).unwrap()), (100_000, blob));
    }
}
