//! The per-host blob cache: `<dir>/sha256/<hex>`, each file verified before it is named.
//!
//! A blob is streamed from its source into `<dir>/tmp/<hex>.<random>.part` while being
//! hashed, synced, and renamed into place only when the digest matches. A file under its
//! digest name therefore always holds that content, and is reused without re-hashing.
//! Partial files left by a crash are removed when the cache is opened.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::digest::{Digest, Hasher};
use super::error::ImageError;
use super::layout::LayerDesc;
use super::source::BlobSource;

#[derive(Clone, Debug)]
pub struct BlobCache {
    dir: PathBuf,
    /// A download that yields no byte for this long fails (transient) instead of hanging.
    stall_timeout: std::time::Duration,
}

impl BlobCache {
    /// Opens the cache at `dir`, creating it, and removes partial downloads.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        let tmp = dir.join("tmp");
        for d in [dir.join("sha256"), tmp.clone()] {
            std::fs::create_dir_all(&d).map_err(|e| ImageError::io("creating the blob cache", &d, e))?;
        }
        let entries = std::fs::read_dir(&tmp).map_err(|e| ImageError::io("listing", &tmp, e))?;
        for entry in entries {
            let path = entry.map_err(|e| ImageError::io("listing", &tmp, e))?.path();
            std::fs::remove_file(&path).map_err(|e| ImageError::io("removing a partial download", &path, e))?;
        }
        Ok(Self { dir, stall_timeout: std::time::Duration::from_secs(60) })
    }

    /// Sets how long a download may yield no data before it fails as transient.
    pub fn with_stall_timeout(mut self, stall_timeout: std::time::Duration) -> Self {
        self.stall_timeout = stall_timeout;
        self
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("sha256").join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The cached blob of `layer`, downloading it from `source` if it is not cached yet.
    /// Returns the path and the bytes downloaded (0 when it was cached).
    pub async fn ensure(&self, source: &dyn BlobSource, layer: &LayerDesc) -> Result<(PathBuf, u64), ImageError> {
        let dest = self.path(&layer.digest);
        if dest.is_file() {
            return Ok((dest, 0));
        }
        let tmp = self.dir.join("tmp").join(format!("{}.{:016x}.part", layer.digest.hex(), rand::random::<u64>()));
        let result = self.download(source, layer, &tmp, &dest).await;
        if result.is_err() {
            // Best effort: a leftover .part is removed at the next open anyway.
            if let Err(e) = tokio::fs::remove_file(&tmp).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %tmp.display(), error = %e, "could not remove a partial download");
            }
        }
        result.map(|n| (dest, n))
    }

    async fn download(
        &self,
        source: &dyn BlobSource,
        layer: &LayerDesc,
        tmp: &Path,
        dest: &Path,
    ) -> Result<u64, ImageError> {
        let mut reader = source.open_blob(layer).await?;
        let mut file = tokio::fs::File::create(tmp).await.map_err(|e| ImageError::io("creating", tmp, e))?;
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = tokio::time::timeout(self.stall_timeout, reader.read(&mut buf))
                .await
                .map_err(|_| ImageError::Unavailable {
                    source_desc: source.describe(),
                    detail: format!("no data for {:?} while downloading {}", self.stall_timeout, layer.location),
                })?
                .map_err(|e| ImageError::io("downloading", &layer.location, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).await.map_err(|e| ImageError::io("writing", tmp, e))?;
            total += n as u64;
        }
        file.sync_all().await.map_err(|e| ImageError::io("syncing", tmp, e))?;
        drop(file);
        let actual = hasher.finish();
        if actual != layer.digest {
            return Err(ImageError::DigestMismatch {
                digest: layer.digest.to_string(),
                actual: actual.to_string(),
                source_desc: source.describe(),
            });
        }
        tokio::fs::rename(tmp, dest).await.map_err(|e| ImageError::io("renaming into the cache", dest, e))?;
        let dir = self.dir.join("sha256");
        let synced = tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
            .await
            .map_err(|e| ImageError::io("syncing the cache directory", dest, std::io::Error::other(e)))?;
        synced.map_err(|e| ImageError::io("syncing the cache directory", dest, e))?;
        Ok(total)
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
}
