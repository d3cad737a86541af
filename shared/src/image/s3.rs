//! The S3 blob source: `s3://bucket/prefix` in either layout.
//!
//! - OCI layout: `<prefix>/index.json`, `<prefix>/blobs/sha256/<hex>`;
//! - flat: `<prefix>/images/<family>/<layer>` listed (paginated) and applied in key order;
//!   each layer's sha256 comes from the object's stored SHA-256 checksum (`enqueue publish`
//!   uploads with it) or a `<key>.sha256` object beside it.
//!
//! Blobs are streamed; the cache hashes them on the way. What a failed call means is
//! decided in one place ([`s3_error`]), naming the endpoint, bucket and key: a 404 on a
//! blob the manifest names aborts as missing, a 403 as access denied, a missing bucket, a
//! bucket in another region (301) and other 4xx abort as a misconfigured source; 5xx, 429,
//! throttling, timeouts and unreachable endpoints are transient (the engine retries). The
//! ETag is never trusted for content: the digest decides.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::ChecksumMode;
use base64::Engine as _;
use tokio::io::AsyncReadExt;

use super::digest::Digest;
use super::error::{ImageError, error_chain};
use super::layout::{self, LayerDesc, Manifest};
use super::source::{BlobSource, BlobStream};

#[derive(Clone, Debug)]
pub struct S3Source {
    client: Client,
    bucket: String,
    prefix: String,
    /// Where requests go, for messages (`aws::endpoint_description`).
    endpoint: String,
}

/// What a failed S3 call means, naming `endpoint`, `bucket` and `key` (see the module doc).
pub(crate) fn s3_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    source_desc: String,
    endpoint: &str,
    bucket: &str,
    key: &str,
    what: &str,
    e: SdkError<E>,
) -> ImageError {
    let at = format!("{what} s3://{bucket}/{key} at {endpoint}");
    let SdkError::ServiceError(s) = &e else {
        let chain = error_chain(&e);
        // No credentials anywhere in the chain: retrying changes nothing.
        if chain.contains("loading credentials") || chain.contains("no credentials") {
            let detail = format!(
                "{at}: {chain}; no AWS credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the host an instance role"
            );
            return ImageError::SourceMisconfigured { source_desc, detail };
        }
        let check = match &e {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                "; check the endpoint (aws.endpoint or AWS_ENDPOINT_URL), the network and the region"
            }
            _ => "",
        };
        return ImageError::Unavailable { source_desc, detail: format!("{at}: {chain}{check}") };
    };
    let status = s.raw().status().as_u16();
    let code = s.err().code().unwrap_or("error").to_owned();
    let detail = format!("{at}: HTTP {status} {code}");
    match (status, code.as_str()) {
        (404, "NoSuchBucket") => ImageError::SourceMisconfigured {
            source_desc,
            detail: format!("{detail}: the bucket {bucket} does not exist there; check the s3:// URL and the region"),
        },
        (404, _) => ImageError::BlobMissing { digest: key.to_owned(), source_desc, detail },
        (403, _) => ImageError::AccessDenied { source_desc, detail },
        (301, _) => ImageError::SourceMisconfigured {
            source_desc,
            detail: format!("{detail}: the bucket is in another region; set aws.region (or AWS_REGION) to it"),
        },
        (429, _) | (500..=599, _) => ImageError::Unavailable { source_desc, detail },
        (400..=499, _) => ImageError::SourceMisconfigured { source_desc, detail },
        _ => ImageError::Unavailable { source_desc, detail },
    }
}

/// Splits `s3://bucket/prefix` into bucket and prefix (without trailing `/`).
pub fn parse_s3_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (!bucket.is_empty()).then(|| (bucket.to_owned(), prefix.trim_end_matches('/').to_owned()))
}

impl S3Source {
    pub fn new(client: Client, url: &str) -> Result<Self, ImageError> {
        let (bucket, prefix) = parse_s3_url(url).ok_or_else(|| ImageError::Unavailable {
            source_desc: url.to_owned(),
            detail: "not an s3://bucket/prefix URL".into(),
        })?;
        Ok(Self { client, bucket, prefix, endpoint: "the AWS endpoint".to_owned() })
    }

    /// Names where requests go in error messages (`aws::endpoint_description`).
    pub fn with_endpoint(mut self, endpoint: String) -> Self {
        self.endpoint = endpoint;
        self
    }

    fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() { rel.to_owned() } else { format!("{}/{rel}", self.prefix) }
    }

    fn error<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        key: &str,
        what: &str,
        e: SdkError<E>,
    ) -> ImageError {
        s3_error(self.describe(), &self.endpoint, &self.bucket, key, what, e)
    }

    /// The OCI manifest `bytes` (digest `digest`) completed with its image config.
    async fn oci_manifest(&self, bytes: &[u8], digest: Digest, family: &str) -> Result<Manifest, ImageError> {
        let oci = layout::oci_manifest(bytes, digest, family, &self.describe())?;
        let rel = format!("blobs/sha256/{}", oci.config().hex());
        let config = self.get_small(&rel).await?.ok_or_else(|| ImageError::BlobMissing {
            digest: oci.config().to_string(),
            source_desc: self.describe(),
            detail: format!("s3://{}/{}, the image config, does not exist", self.bucket, self.key(&rel)),
        })?;
        oci.with_config(&config)
    }

    /// An object's bytes, `None` if it does not exist.
    async fn get_small(&self, rel: &str) -> Result<Option<Vec<u8>>, ImageError> {
        let key = self.key(rel);
        match self.client.get_object().bucket(&self.bucket).key(&key).send().await {
            Ok(out) => {
                let size = out.content_length().unwrap_or(0).max(0) as u64;
                if size > layout::MAX_MANIFEST_BYTES {
                    return Err(ImageError::BadManifest {
                        family: rel.to_owned(),
                        source_desc: self.describe(),
                        detail: format!(
                            "s3://{}/{key} is {size} bytes, more than the {} a manifest may have",
                            self.bucket,
                            layout::MAX_MANIFEST_BYTES
                        ),
                    });
                }
                let body = out.body.collect().await.map_err(|e| ImageError::Unavailable {
                    source_desc: self.describe(),
                    detail: format!("reading s3://{}/{key}: {e}", self.bucket),
                })?;
                Ok(Some(body.into_bytes().to_vec()))
            }
            Err(SdkError::ServiceError(s)) if s.raw().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(self.error(&key, "getting", e)),
        }
    }

    /// The sha256 of a flat layer: its stored checksum, or a `.sha256` object beside it.
    async fn flat_digest(&self, key: &str) -> Result<Option<Digest>, ImageError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| self.error(key, "inspecting", e))?;
        if let Some(b64) = head.checksum_sha256()
            && let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64)
            && raw.len() == 32
        {
            return Ok(Digest::parse(&format!("sha256:{}", hex::encode(raw))).ok());
        }
        let rel = key.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(key);
        match self.get_small(&format!("{rel}.sha256")).await? {
            Some(text) => {
                let text = String::from_utf8_lossy(&text);
                let hex = text.split_whitespace().next().unwrap_or_default();
                let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
                Ok(Digest::parse(&format!("sha256:{hex}")).ok())
            }
            None => Ok(None),
        }
    }

    async fn flat_manifest(&self, family: &str) -> Result<Manifest, ImageError> {
        if let Some(bytes) = self.get_small(&layout::family_file_path(family)).await? {
            return layout::family_file_manifest(&bytes, family, &self.describe());
        }
        let dir = self.key(&format!("images/{family}/"));
        let mut keys = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(&dir).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(&dir, "listing", e))?;
            for obj in page.contents() {
                if let (Some(key), Some(size)) = (obj.key(), obj.size())
                    && layout::is_flat_layer(key.rsplit('/').next().unwrap_or_default())
                {
                    keys.push((key.to_owned(), size.max(0) as u64));
                }
            }
        }
        if keys.is_empty() {
            return Err(ImageError::FamilyNotFound {
                family: family.to_owned(),
                source_desc: self.describe(),
                detail: format!("neither index.json nor s3://{}/{dir} names it", self.bucket),
            });
        }
        keys.sort();
        let mut layers = Vec::with_capacity(keys.len());
        for (key, size) in keys {
            let digest = self.flat_digest(&key).await?.ok_or_else(|| ImageError::BadManifest {
                family: family.to_owned(),
                source_desc: self.describe(),
                detail: format!(
                    "s3://{}/{key} has no SHA-256 checksum and no {key}.sha256 beside it; publish it with `enqueue publish`",
                    self.bucket
                ),
            })?;
            let name = key.rsplit('/').next().unwrap_or_default();
            let rel = key.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(&key).to_owned();
            layers.push(LayerDesc {
                media_type: layout::flat_media_type(name),
                location: rel,
                digest,
                size,
                diff_id: None,
            });
        }
        layout::flat_manifest(family, &self.describe(), layers)
    }
}

#[async_trait]
impl BlobSource for S3Source {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    #[tracing::instrument(name = "s3.manifest", skip(self), fields(bucket = %self.bucket, prefix = %self.prefix), err(Display))]
    async fn manifest(&self, family: &str) -> Result<Manifest, ImageError> {
        layout::validate_family(family)?;
        if let Some(index) = self.get_small("index.json").await? {
            match layout::oci_find_manifest(&index, family, &self.describe()) {
                Ok(digest) => {
                    let rel = format!("blobs/sha256/{}", digest.hex());
                    let bytes = self.get_small(&rel).await?.ok_or_else(|| ImageError::BlobMissing {
                        digest: digest.to_string(),
                        source_desc: self.describe(),
                        detail: format!("s3://{}/{} does not exist", self.bucket, self.key(&rel)),
                    })?;
                    return self.oci_manifest(&bytes, digest, family).await;
                }
                Err(ImageError::FamilyNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.flat_manifest(family).await
    }

    async fn manifest_at(&self, family: &str, digest: &Digest) -> Result<Manifest, ImageError> {
        layout::validate_family(family)?;
        match self.get_small(&format!("blobs/sha256/{}", digest.hex())).await? {
            Some(bytes) => self.oci_manifest(&bytes, digest.clone(), family).await,
            None => super::source::current_version_if(self, family, digest).await,
        }
    }

    #[tracing::instrument(
        name = "s3.get_object",
        skip(self, layer),
        fields(bucket = %self.bucket, key = %self.key(&layer.location), offset),
        err(Display)
    )]
    async fn open_blob(&self, layer: &LayerDesc, offset: u64) -> Result<BlobStream, ImageError> {
        let key = self.key(&layer.location);
        if offset > 0 && offset >= layer.size {
            // Nothing is left to read; S3 would answer a range past the end with 416.
            return Ok(Box::pin(tokio::io::empty()));
        }
        let mut get = self.client.get_object().bucket(&self.bucket).key(&key);
        if offset > 0 {
            get = get.range(format!("bytes={offset}-"));
        }
        let out = get.send().await.map_err(|e| match self.error(&key, "getting", e) {
            ImageError::BlobMissing { source_desc, detail, .. } => {
                ImageError::BlobMissing { digest: layer.digest.to_string(), source_desc, detail }
            }
            other => other,
        })?;
        let ranged = out.content_range().is_some_and(|r| r.starts_with(&format!("bytes {offset}-")));
        let mut body = out.body.into_async_read();
        if offset > 0 && !ranged {
            // The server sent the whole object: skip what we already have.
            let skipped =
                tokio::io::copy(&mut (&mut body).take(offset), &mut tokio::io::sink()).await.map_err(|e| {
                    ImageError::Unavailable {
                        source_desc: self.describe(),
                        detail: format!("reading s3://{}/{key}: {e}", self.bucket),
                    }
                })?;
            if skipped != offset {
                return Err(ImageError::Unavailable {
                    source_desc: self.describe(),
                    detail: format!(
                        "s3://{}/{key} is shorter ({skipped} bytes) than the part already downloaded",
                        self.bucket
                    ),
                });
            }
        }
        Ok(Box::pin(body))
    }
}
