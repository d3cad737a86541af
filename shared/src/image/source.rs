//! Where blobs come from. A [`BlobSource`] resolves a family to its manifest and opens each
//! layer blob as a stream; the cache hashes and stores it. `LocalDir` reads a directory in
//! either layout; S3 comes with its own module.

use std::path::PathBuf;
use std::pin::Pin;

use async_trait::async_trait;
use tokio::io::AsyncRead;

use super::digest::Digest;
use super::error::ImageError;
use super::layout::{self, LayerDesc, Manifest};
use super::memo::{self, DigestMemo};

pub type BlobStream = Pin<Box<dyn AsyncRead + Send>>;

#[async_trait]
pub trait BlobSource: Send + Sync {
    /// How this source is named in messages and in the `images` table (`dir:/srv/images`).
    fn describe(&self) -> String;
    /// Resolves `family` to its ordered layers (its current version at the source).
    async fn manifest(&self, family: &str) -> Result<Manifest, ImageError>;
    /// Resolves version `digest` of `family`. An OCI layout keeps every version it was given
    /// (its manifests are blobs, found by digest); a flat family has only its current one.
    async fn manifest_at(&self, family: &str, digest: &Digest) -> Result<Manifest, ImageError> {
        current_version_if(self, family, digest).await
    }
    /// Where version `digest` of `family` lives, as users name it (a registry's
    /// `registry/repository@sha256:…`), for results; `None` where the source's own name says it.
    fn reference_of(&self, _family: &str, _digest: &str) -> Option<String> {
        None
    }
    /// Opens one layer blob for streaming from byte `offset` on (to resume a partial download);
    /// at or past its end the stream is empty. A blob the source lacks is `BlobMissing`.
    async fn open_blob(&self, layer: &LayerDesc, offset: u64) -> Result<BlobStream, ImageError>;
}

/// The family's current version if it is `digest`; otherwise "not found".
pub(crate) async fn current_version_if<S: BlobSource + ?Sized>(
    source: &S,
    family: &str,
    digest: &Digest,
) -> Result<Manifest, ImageError> {
    let current = source.manifest(family).await?;
    if current.digest == *digest {
        return Ok(current);
    }
    Err(ImageError::VersionNotFound {
        family: family.to_owned(),
        digest: digest.to_string(),
        source_desc: source.describe(),
        detail: format!("its current version is {}, and no manifest blob has that digest", current.digest),
    })
}

/// A local directory holding `index.json` + `blobs/` (OCI layout), `images/<family>/` (flat),
/// or both. A family named in `index.json` is read from the OCI layout.
#[derive(Clone)]
pub struct LocalDir {
    root: PathBuf,
    /// Where the digests of flat layer files are remembered, if anywhere (`memo.rs`).
    memo: Option<std::sync::Arc<dyn DigestMemo>>,
}

impl std::fmt::Debug for LocalDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDir").field("root", &self.root).field("memo", &self.memo.is_some()).finish()
    }
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), memo: None }
    }

    /// Remembers the digests of flat layer files in `memo`, so a listing hashes only the
    /// files that changed since the last one.
    pub fn with_memo(mut self, memo: std::sync::Arc<dyn DigestMemo>) -> Self {
        self.memo = Some(memo);
        self
    }

    /// A small metadata file (`index.json`, a manifest), `None` if missing.
    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, ImageError> {
        let path = self.root.join(rel);
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.len() > layout::MAX_MANIFEST_BYTES
        {
            return Err(ImageError::BadManifest {
                family: rel.to_owned(),
                source_desc: self.describe(),
                detail: format!(
                    "{rel} is {} bytes, more than the {} a manifest may have",
                    meta.len(),
                    layout::MAX_MANIFEST_BYTES
                ),
            });
        }
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("reading", path, e)),
        }
    }

    /// The OCI manifest `bytes` (digest `digest`) completed with its image config.
    fn oci_manifest(&self, bytes: &[u8], digest: Digest, family: &str) -> Result<Manifest, ImageError> {
        let oci = layout::oci_manifest(bytes, digest, family, &self.describe())?;
        let rel = format!("blobs/sha256/{}", oci.config().hex());
        let config = self.read(&rel)?.ok_or_else(|| ImageError::BlobMissing {
            digest: oci.config().to_string(),
            source_desc: self.describe(),
            detail: format!("{rel}, the image config, does not exist"),
        })?;
        oci.with_config(&config)
    }

    fn flat_manifest(&self, family: &str) -> Result<Manifest, ImageError> {
        if let Some(bytes) = self.read(&layout::family_file_path(family))? {
            return layout::family_file_manifest(&bytes, family, &self.describe());
        }
        let dir = self.root.join("images").join(family);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let detail = if self.root.is_dir() {
                    format!("neither index.json nor {} names it", dir.display())
                } else {
                    format!("the source directory {} does not exist: check `source` (or --source)", self.root.display())
                };
                return Err(ImageError::FamilyNotFound {
                    family: family.to_owned(),
                    source_desc: self.describe(),
                    detail,
                });
            }
            Err(e) => return Err(ImageError::io("listing", dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("listing", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if layout::is_flat_layer(&name) {
                names.push(name);
            }
        }
        names.sort();
        let mut layers = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(&name);
            let (digest, size) = memo::digest_of(&path, self.memo.as_deref(), std::time::SystemTime::now())
                .map_err(|e| ImageError::io("hashing", &path, e))?;
            layers.push(LayerDesc {
                media_type: layout::flat_media_type(&name),
                location: format!("images/{family}/{name}"),
                digest,
                size,
                diff_id: None,
            });
        }
        layout::flat_manifest(family, &self.describe(), layers)
    }
}

#[async_trait]
impl BlobSource for LocalDir {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    async fn manifest(&self, family: &str) -> Result<Manifest, ImageError> {
        layout::validate_family(family)?;
        let this = self.clone();
        let family = family.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Some(index) = this.read("index.json")? {
                match layout::oci_find_manifest(&index, &family, &this.describe()) {
                    Ok(digest) => {
                        let rel = format!("blobs/sha256/{}", digest.hex());
                        let bytes = this.read(&rel)?.ok_or_else(|| ImageError::BlobMissing {
                            digest: digest.to_string(),
                            source_desc: this.describe(),
                            detail: format!("{rel} does not exist"),
                        })?;
                        return this.oci_manifest(&bytes, digest, &family);
                    }
                    Err(ImageError::FamilyNotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            this.flat_manifest(&family)
        })
        .await
        .map_err(|e| ImageError::io("resolving the manifest", &self.root, std::io::Error::other(e)))?
    }

    async fn manifest_at(&self, family: &str, digest: &Digest) -> Result<Manifest, ImageError> {
        layout::validate_family(family)?;
        let this = self.clone();
        let (f, d) = (family.to_owned(), digest.clone());
        let stored = tokio::task::spawn_blocking(move || match this.read(&format!("blobs/sha256/{}", d.hex()))? {
            Some(bytes) => this.oci_manifest(&bytes, d, &f).map(Some),
            None => Ok(None),
        })
        .await
        .map_err(|e| ImageError::io("reading a manifest", &self.root, std::io::Error::other(e)))??;
        match stored {
            Some(manifest) => Ok(manifest),
            None => current_version_if(self, family, digest).await,
        }
    }

    async fn open_blob(&self, layer: &LayerDesc, offset: u64) -> Result<BlobStream, ImageError> {
        use tokio::io::AsyncSeekExt;
        // `location` came from our own manifest resolution: a relative path without `..`.
        let path = self.root.join(&layer.location);
        match tokio::fs::File::open(&path).await {
            Ok(mut f) => {
                f.seek(std::io::SeekFrom::Start(offset)).await.map_err(|e| ImageError::io("seeking in", &path, e))?;
                Ok(Box::pin(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ImageError::BlobMissing {
                digest: layer.digest.to_string(),
                source_desc: self.describe(),
                detail: format!("{} does not exist", path.display()),
            }),
            Err(e) => Err(ImageError::io("opening blob", path, e)),
        }
    }
}
