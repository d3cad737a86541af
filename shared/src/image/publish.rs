//! Publishing a local image (an OCI layout built by `umoci`, `skopeo` or `buildah`, or a
//! flat `images/<family>/` directory) to `s3://bucket/prefix`, so workers can prepare it.
//!
//! Blobs already present (by key, which names their digest) are skipped. Flat layers are
//! uploaded with their SHA-256 as the object's checksum (a `.sha256` object beside the
//! ones large enough to need multipart upload, whose checksum is not the whole object's).
//! The OCI `index.json` is merged: the family's entry is replaced, the others kept.

use std::path::{Path, PathBuf};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use oci_spec::image::{ANNOTATION_REF_NAME, ImageIndex};

use super::digest::Digest;
use super::error::ImageError;
use super::layout;
use super::s3::parse_s3_url;

/// Blobs at least this large go up in parts.
pub const MULTIPART_THRESHOLD: u64 = 64 << 20;
const PART_SIZE: usize = 16 << 20;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub uploaded: Vec<String>,
    pub skipped: Vec<String>,
    pub bytes: u64,
    /// The version published (an OCI layout's manifest digest: what a job's `digest` pins).
    pub version: Option<String>,
}

struct Target<'a> {
    client: &'a Client,
    bucket: String,
    prefix: String,
    url: String,
    endpoint: &'a str,
}

impl Target<'_> {
    fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() { rel.to_owned() } else { format!("{}/{rel}", self.prefix) }
    }

    fn err(&self, key: &str, what: &str, e: impl std::fmt::Display) -> ImageError {
        ImageError::Unavailable {
            source_desc: self.url.clone(),
            detail: format!("{what} s3://{}/{key} at {}: {e}", self.bucket, self.endpoint),
        }
    }

    /// A failed S3 call, classified like a source's (a missing bucket fails at once).
    fn sdk_err<E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        key: &str,
        what: &str,
        e: aws_sdk_s3::error::SdkError<E>,
    ) -> ImageError {
        super::s3::s3_error(self.url.clone(), self.endpoint, &self.bucket, key, what, e)
    }

    async fn exists(&self, key: &str) -> Result<bool, ImageError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(aws_sdk_s3::error::SdkError::ServiceError(s)) if s.raw().status().as_u16() == 404 => Ok(false),
            Err(e) => Err(self.sdk_err(key, "inspecting", e)),
        }
    }

    /// Uploads `path` to `key`; `checksum` (sha256) is stored with single-part uploads.
    async fn upload(
        &self,
        path: &Path,
        key: &str,
        checksum: Option<&Digest>,
        progress: &dyn Fn(u64),
    ) -> Result<u64, ImageError> {
        let size = std::fs::metadata(path).map_err(|e| ImageError::io("inspecting", path, e))?.len();
        if size < MULTIPART_THRESHOLD {
            let body = ByteStream::from_path(path).await.map_err(|e| self.err(key, "reading for upload", e))?;
            let mut req = self.client.put_object().bucket(&self.bucket).key(key).body(body);
            if let Some(d) = checksum {
                let raw = hex::decode(d.hex()).map_err(|e| self.err(key, "encoding checksum", e))?;
                req = req
                    .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Sha256)
                    .checksum_sha256(base64::engine::general_purpose::STANDARD.encode(raw));
            }
            req.send().await.map_err(|e| self.sdk_err(key, "uploading", e))?;
            progress(size);
            return Ok(size);
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_err(key, "starting a multipart upload", e))?;
        let upload_id =
            created.upload_id().ok_or_else(|| self.err(key, "starting a multipart upload", "no upload id"))?;
        let mut file = tokio::fs::File::open(path).await.map_err(|e| ImageError::io("opening", path, e))?;
        let mut parts = Vec::new();
        let mut buf = vec![0u8; PART_SIZE];
        for number in 1.. {
            let n = read_full(&mut file, &mut buf).await.map_err(|e| ImageError::io("reading", path, e))?;
            if n == 0 {
                break;
            }
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf[..n].to_vec()))
                .send()
                .await
                .map_err(|e| self.sdk_err(key, &format!("uploading part {number} of"), e))?;
            parts.push(CompletedPart::builder().part_number(number).set_e_tag(out.e_tag().map(str::to_owned)).build());
            progress(n as u64);
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| self.sdk_err(key, "completing the multipart upload of", e))?;
        Ok(size)
    }
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Publishes family `family` from `dir` to `to` (`s3://bucket/prefix`) through `client`,
/// whose endpoint `endpoint` describes for messages. `progress` is told each chunk of bytes
/// uploaded.
pub async fn publish(
    client: &Client,
    endpoint: &str,
    dir: &Path,
    family: &str,
    to: &str,
    progress: &dyn Fn(u64),
) -> Result<PublishReport, ImageError> {
    layout::validate_family(family)?;
    let (bucket, prefix) = parse_s3_url(to).ok_or_else(|| ImageError::Unavailable {
        source_desc: to.to_owned(),
        detail: "not an s3://bucket/prefix URL".into(),
    })?;
    let target = Target { client, bucket, prefix, url: to.to_owned(), endpoint };
    let mut report = PublishReport::default();
    // The OCI layout when its index names the family (or there is no flat family of that
    // name beside it), as a directory source reads them.
    let index_path = dir.join("index.json");
    let oci = match std::fs::read(&index_path) {
        Ok(index) => {
            layout::oci_find_manifest(&index, family, &dir.display().to_string()).is_ok()
                || !dir.join("images").join(family).is_dir()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(ImageError::io("reading", index_path, e)),
    };
    if oci {
        publish_oci(&target, dir, family, &mut report, progress).await?;
    } else {
        publish_flat(&target, dir, family, &mut report, progress).await?;
    }
    Ok(report)
}

async fn publish_oci(
    t: &Target<'_>,
    dir: &Path,
    family: &str,
    report: &mut PublishReport,
    progress: &dyn Fn(u64),
) -> Result<(), ImageError> {
    let desc_of = |detail: String| ImageError::BadManifest {
        family: family.to_owned(),
        source_desc: dir.display().to_string(),
        detail,
    };
    let index_bytes =
        std::fs::read(dir.join("index.json")).map_err(|e| ImageError::io("reading", dir.join("index.json"), e))?;
    let index = ImageIndex::from_reader(index_bytes.as_slice()).map_err(|e| desc_of(e.to_string()))?;
    let entry = index
        .manifests()
        .iter()
        .find(|d| d.annotations().as_ref().and_then(|a| a.get(ANNOTATION_REF_NAME)).is_some_and(|n| n == family))
        .ok_or_else(|| ImageError::FamilyNotFound {
            family: family.to_owned(),
            source_desc: dir.display().to_string(),
            detail: "not in index.json".into(),
        })?
        .clone();
    let manifest_digest = Digest::parse(entry.digest().as_ref()).map_err(desc_of)?;
    report.version = Some(manifest_digest.to_string());
    let blob = |d: &Digest| -> PathBuf { dir.join("blobs/sha256").join(d.hex()) };
    let manifest_bytes =
        std::fs::read(blob(&manifest_digest)).map_err(|e| ImageError::io("reading", blob(&manifest_digest), e))?;
    let manifest =
        oci_spec::image::ImageManifest::from_reader(manifest_bytes.as_slice()).map_err(|e| desc_of(e.to_string()))?;
    let mut digests = vec![manifest_digest, Digest::parse(manifest.config().digest().as_ref()).map_err(desc_of)?];
    for l in manifest.layers() {
        digests.push(Digest::parse(l.digest().as_ref()).map_err(desc_of)?);
    }
    for d in digests {
        let key = t.key(&format!("blobs/sha256/{}", d.hex()));
        if t.exists(&key).await? {
            report.skipped.push(key);
            continue;
        }
        report.bytes += t.upload(&blob(&d), &key, None, progress).await?;
        report.uploaded.push(key);
    }
    // Merge index.json: replace this family's entry, keep the others.
    let index_key = t.key("index.json");
    let mut remote: serde_json::Value = match t.client.get_object().bucket(&t.bucket).key(&index_key).send().await {
        Ok(out) => {
            let bytes = out.body.collect().await.map_err(|e| t.err(&index_key, "reading", e))?.into_bytes();
            serde_json::from_slice(&bytes).map_err(|e| desc_of(format!("the published index.json is not JSON: {e}")))?
        }
        Err(aws_sdk_s3::error::SdkError::ServiceError(s)) if s.raw().status().as_u16() == 404 => {
            serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []})
        }
        Err(e) => return Err(t.sdk_err(&index_key, "getting", e)),
    };
    let entry = serde_json::to_value(&entry).map_err(|e| desc_of(e.to_string()))?;
    let manifests = remote["manifests"]
        .as_array_mut()
        .ok_or_else(|| desc_of("the published index.json has no manifests list".into()))?;
    manifests.retain(|m| m["annotations"][ANNOTATION_REF_NAME] != family);
    manifests.push(entry);
    let body = serde_json::to_vec_pretty(&remote).map_err(|e| desc_of(e.to_string()))?;
    t.client
        .put_object()
        .bucket(&t.bucket)
        .key(&index_key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| t.sdk_err(&index_key, "uploading", e))?;
    report.uploaded.push(index_key);
    Ok(())
}

async fn publish_flat(
    t: &Target<'_>,
    dir: &Path,
    family: &str,
    report: &mut PublishReport,
    progress: &dyn Fn(u64),
) -> Result<(), ImageError> {
    let src = dir.join("images").join(family);
    let entries = std::fs::read_dir(&src).map_err(|e| ImageError::io("listing", &src, e))?;
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        let name = e.map_err(|e| ImageError::io("listing", &src, e))?.file_name().to_string_lossy().into_owned();
        if layout::is_flat_layer(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(ImageError::NoLayers { family: family.to_owned(), source_desc: src.display().to_string() });
    }
    names.sort();
    // Content-addressed blobs first (one copy per digest, skipped when already there), then
    // the manifest object that makes the version visible, in one write.
    let mut layers = Vec::with_capacity(names.len());
    for name in names {
        let path = src.join(&name);
        let (digest, size) = super::memo::digest_of(&path, None, std::time::SystemTime::now())
            .map_err(|e| ImageError::io("hashing", &path, e))?;
        let key = t.key(&format!("blobs/sha256/{}", digest.hex()));
        if t.exists(&key).await? {
            report.skipped.push(key);
        } else {
            report.bytes += t.upload(&path, &key, Some(&digest), progress).await?;
            report.uploaded.push(key);
        }
        layers.push(layout::FamilyLayer { name, digest, size });
    }
    let file = layout::FamilyFile { schema_version: 1, family: family.to_owned(), layers };
    let manifest = layout::family_file_manifest(
        &serde_json::to_vec(&file).map_err(|e| t.err(family, "encoding the manifest of", e))?,
        family,
        &t.url,
    )?;
    let key = t.key(&layout::family_file_path(family));
    let body = serde_json::to_vec_pretty(&file).map_err(|e| t.err(&key, "encoding", e))?;
    t.client
        .put_object()
        .bucket(&t.bucket)
        .key(&key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| t.sdk_err(&key, "uploading", e))?;
    report.uploaded.push(key);
    report.version = Some(manifest.digest.to_string());
    Ok(())
}
