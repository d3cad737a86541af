//! The OCI registry source: images where they live (a Distribution API registry: Docker Hub,
//! ECR, GHCR, Harbor, `docker-registry`), named as users write them.
//!
//! A registry source is a reference with an optional `{family}` placeholder:
//! `registry.example.com/team/{family}:stable` serves every family from its own repository;
//! `docker.io/library/debian:bookworm` (no placeholder) serves one image under whatever family
//! name the job gives. A family's *version* is the digest of the manifest its tag names,
//! resolved once when it is prepared; every later request for that version (`manifest_at`,
//! each blob) goes by digest, so a tag moved meanwhile cannot mix two images.
//!
//! A multi-architecture index resolves to the host's platform (or `registry.platform`); the
//! version is still the index's digest. Manifests may be OCI or Docker v2 schema 2. Every
//! manifest and config is hashed here against the digest it was asked by; every blob is
//! hashed by the blob cache as it arrives: nothing the registry (or a client library) claims
//! is trusted.

mod credentials;
mod http;
mod platform;
mod reference;

use std::sync::Arc;

use async_trait::async_trait;
use oci_spec::distribution::Reference;
use tokio::io::AsyncReadExt;

pub use credentials::{CredentialStore, EcrLogins, default_docker_config};
pub use http::HttpOptions;
pub use platform::Platform;

use self::http::{Got, RegistryHttp};
use super::digest::Digest;
use super::error::ImageError;
use super::layout::{self, LayerDesc, Manifest};
use super::signature::{
    self, MemoryVerifiedCache, PolicyRefusal, Rule, SignatureManifest, SignaturePolicy, VerifiedCache,
};
use super::source::{BlobSource, BlobStream};

/// The placeholder a source names the family's place with.
pub const FAMILY_PLACEHOLDER: &str = "{family}";

const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MANIFEST_TYPES: [&str; 4] = [MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST];

/// Whether `source` is written as a registry reference rather than a path: `docker://…`, or
/// a first component that names a host (`registry.example.com/…`, `127.0.0.1:5000/…`,
/// `localhost/…`), as Docker tells a registry from a Docker Hub namespace. A local directory
/// with a dot in its first component is written `./name` or `dir:name`.
pub fn is_registry_reference(source: &str) -> bool {
    if source.starts_with("docker://") {
        return true;
    }
    let Some((first, _)) = source.split_once('/') else { return false };
    let (host, port) = first.split_once(':').unwrap_or((first, ""));
    let port_ok =
        port.is_empty() && !first.contains(':') || !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    !source.contains("://")
        && port_ok
        && (host.contains('.') && !host.starts_with('.') || !port.is_empty() || host == "localhost")
}

/// A registry source: which reference a family resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryTemplate {
    text: String,
}

impl RegistryTemplate {
    /// Parses a source as written; the error says what is wrong with it.
    pub fn parse(source: &str) -> Result<Self, String> {
        let text = source.strip_prefix("docker://").unwrap_or(source).to_owned();
        let template = Self { text };
        reference::parse(&template.reference_text("family"))
            .map_err(|e| format!("source {source:?} is not a registry reference ({e}); write it as docker pull takes it: registry.example.com/team/app:1.4, docker.io/library/debian:bookworm or …@sha256:<digest>, with {FAMILY_PLACEHOLDER} where the family's name goes"))?;
        if template.text.matches(FAMILY_PLACEHOLDER).count() > 1 {
            return Err(format!("source {source:?} names {FAMILY_PLACEHOLDER} more than once"));
        }
        Ok(template)
    }

    fn reference_text(&self, family: &str) -> String {
        self.text.replace(FAMILY_PLACEHOLDER, family)
    }

    /// The reference `family` resolves to.
    pub fn reference(&self, family: &str) -> Result<Reference, ImageError> {
        layout::validate_family(family)?;
        let text = self.reference_text(family);
        reference::parse(&text).map_err(|e| ImageError::FamilyNotFound {
            family: family.to_owned(),
            source_desc: self.to_string(),
            detail: format!("{text:?} is not a registry reference ({e})"),
        })
    }
}

impl std::fmt::Display for RegistryTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "docker://{}", self.text)
    }
}

/// How the registry source is set up (the worker's `registry.*` settings).
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    pub http: HttpOptions,
    /// Docker's `config.json` to read logins from (`None`: anonymous only).
    pub docker_config: Option<std::path::PathBuf>,
    /// The platform an index resolves to (default: this host's).
    pub platform: Option<Platform>,
    /// ECR logins through the AWS SDK (`None`: ECR registries only through the Docker config).
    pub ecr: Option<EcrLogins>,
}

pub struct RegistrySource {
    template: RegistryTemplate,
    http: Arc<RegistryHttp>,
    platform: Platform,
    policy: Arc<SignaturePolicy>,
    verified: Arc<dyn VerifiedCache>,
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySource").field("template", &self.template).field("platform", &self.platform).finish()
    }
}

impl RegistrySource {
    pub fn new(template: RegistryTemplate, options: RegistryOptions) -> Result<Self, ImageError> {
        let mut credentials = CredentialStore::new(options.docker_config);
        if let Some(ecr) = options.ecr {
            credentials = credentials.with_ecr(ecr);
        }
        let http = RegistryHttp::new(options.http, credentials)?;
        Ok(Self {
            template,
            http: Arc::new(http),
            platform: options.platform.unwrap_or_else(Platform::host),
            policy: Arc::new(SignaturePolicy::none()),
            verified: Arc::new(MemoryVerifiedCache::default()),
        })
    }

    /// Checks each version against `policy` before any of its blobs is asked for, and
    /// remembers what passed in `verified`.
    pub fn with_signatures(mut self, policy: Arc<SignaturePolicy>, verified: Arc<dyn VerifiedCache>) -> Self {
        self.policy = policy;
        self.verified = verified;
        self
    }

    /// Checks `version` of `family` against the family's signature policy, as a prepare does
    /// before fetching anything of it (benchmarks time it).
    pub async fn verify_signature(&self, family: &str, version: &Digest) -> Result<(), ImageError> {
        let reference = self.template.reference(family)?;
        self.check_signature(family, &reference, version).await
    }

    /// Whether `version` of `family` (from `reference`'s repository) may be fetched under the
    /// family's policy. Asks only for the signature manifest and its payloads (a few hundred
    /// bytes each), never for a blob of the image.
    async fn check_signature(&self, family: &str, reference: &Reference, version: &Digest) -> Result<(), ImageError> {
        let Rule::Cosign(keys) = self.policy.rule(family) else { return Ok(()) };
        let policy_error = |detail: String| PolicyRefusal::Policy { family: family.to_owned(), detail };
        if self.verified.is_verified(version, keys.fingerprint()).map_err(policy_error)? {
            return Ok(());
        }
        let (registry, repository) = (reference.registry(), reference.repository());
        let tag = signature::signature_tag(version);
        let missing =
            |detail: String| PolicyRefusal::Missing { family: family.to_owned(), digest: version.to_string(), detail };
        let invalid =
            |detail: String| PolicyRefusal::Invalid { family: family.to_owned(), digest: version.to_string(), detail };
        let accept = [MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST];
        let bytes = match self.http.get(registry, repository, &format!("manifests/{tag}"), &accept, 0).await? {
            Got::Found(response) => self.read_small(family, response, &format!("signature manifest {tag}")).await?,
            Got::NotFound | Got::PastEnd => {
                return Err(missing(format!("{} has no tag {tag}", repo_name(reference))).into());
            }
        };
        let signatures = SignatureManifest::parse(&bytes).map_err(invalid)?;
        if signatures.payloads.is_empty() {
            return Err(missing(format!("{tag} holds no simple-signing payload")).into());
        }
        let mut why = Vec::new();
        for signed in &signatures.payloads {
            let path = format!("blobs/{}", signed.digest);
            let payload =
                match self.http.get(registry, repository, &path, &["application/octet-stream", "*/*"], 0).await? {
                    Got::Found(response) => {
                        self.read_small(family, response, &format!("signature payload {}", signed.digest)).await?
                    }
                    Got::NotFound | Got::PastEnd => {
                        why.push(format!("payload {} is missing", signed.digest));
                        continue;
                    }
                };
            if payload.len() as u64 > signature::MAX_PAYLOAD_BYTES {
                why.push(format!("payload {} is larger than a signature payload may be", signed.digest));
                continue;
            }
            match signature::verify(keys, signed, &payload, version) {
                Ok(()) => {
                    self.verified.remember_verified(version, keys.fingerprint()).map_err(policy_error)?;
                    tracing::info!(%family, %version, "cosign signature verified");
                    return Ok(());
                }
                Err(e) => why.push(e),
            }
        }
        Err(invalid(why.join("; ")).into())
    }

    /// Requests sent so far (registry and token service), for benchmarks and tests.
    pub fn requests(&self) -> u64 {
        self.http.requests()
    }

    /// A manifest's bytes by tag or digest, capped at [`layout::MAX_MANIFEST_BYTES`].
    async fn get_manifest(&self, family: &str, reference: &Reference, target: &str) -> Result<Vec<u8>, ImageError> {
        let got = self
            .http
            .get(reference.registry(), reference.repository(), &format!("manifests/{target}"), &MANIFEST_TYPES, 0)
            .await?;
        match got {
            Got::Found(response) => self.read_small(family, response, &format!("manifest {target}")).await,
            Got::NotFound | Got::PastEnd if target.starts_with("sha256:") => Err(ImageError::VersionNotFound {
                family: family.to_owned(),
                digest: target.to_owned(),
                source_desc: self.describe(),
                detail: format!("{} has no manifest {target}", repo_name(reference)),
            }),
            Got::NotFound | Got::PastEnd => Err(ImageError::FamilyNotFound {
                family: family.to_owned(),
                source_desc: self.describe(),
                detail: format!("{} has no tag {target}", repo_name(reference)),
            }),
        }
    }

    async fn read_small(&self, family: &str, response: reqwest::Response, what: &str) -> Result<Vec<u8>, ImageError> {
        let too_big = |size: u64| ImageError::BadManifest {
            family: family.to_owned(),
            source_desc: self.describe(),
            detail: format!("{what} is {size} bytes, more than the {} a manifest may have", layout::MAX_MANIFEST_BYTES),
        };
        if let Some(len) = response.content_length().filter(|l| *l > layout::MAX_MANIFEST_BYTES) {
            return Err(too_big(len));
        }
        let mut body = Vec::new();
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(|e| ImageError::Unavailable {
            source_desc: self.describe(),
            detail: format!("reading {what}: {}", super::error::error_chain(&e)),
        })? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > layout::MAX_MANIFEST_BYTES {
                return Err(too_big(body.len() as u64));
            }
        }
        Ok(body)
    }

    /// Resolves `target` (a tag or a digest) of `family` to its manifest; the version is the
    /// digest of what `target` names (an index's, if it is one).
    async fn resolve(&self, family: &str, target: &str) -> Result<Manifest, ImageError> {
        Ok(self.resolve_image(family, target).await?.manifest)
    }

    /// [`Self::resolve`], keeping the platform image's own documents as the registry gave them.
    async fn resolve_image(&self, family: &str, target: &str) -> Result<Resolved, ImageError> {
        let reference = self.template.reference(family)?;
        let top_bytes = self.get_manifest(family, &reference, target).await?;
        let top = Digest::of_bytes(&top_bytes);
        if target.starts_with("sha256:") && top.as_str() != target {
            return Err(ImageError::DigestMismatch {
                digest: target.to_owned(),
                actual: top.to_string(),
                source_desc: self.describe(),
            });
        }
        // Before anything else of the image is asked for.
        self.check_signature(family, &reference, &top).await?;
        let (image_bytes, image_digest) = match platform::index_pick(&top_bytes, &self.platform) {
            platform::Pick::NotAnIndex => (top_bytes, top.clone()),
            platform::Pick::Chose(digest) => {
                let bytes = self.get_manifest(family, &reference, digest.as_str()).await?;
                (bytes, digest)
            }
            platform::Pick::NoneFor(offered) => {
                return Err(ImageError::BadManifest {
                    family: family.to_owned(),
                    source_desc: self.describe(),
                    detail: format!(
                        "index {top} has no image for {} (it has {}); set registry.platform to one of them, or push one for this platform",
                        self.platform,
                        if offered.is_empty() { "none".to_owned() } else { offered.join(", ") }
                    ),
                });
            }
            platform::Pick::Malformed(detail) => {
                return Err(ImageError::BadManifest {
                    family: family.to_owned(),
                    source_desc: self.describe(),
                    detail: format!("index {top}: {detail}"),
                });
            }
        };
        let oci = layout::oci_manifest(&image_bytes, image_digest.clone(), family, &self.describe())?;
        let config_digest = oci.config().clone();
        let config = match self
            .http
            .get(
                reference.registry(),
                reference.repository(),
                &format!("blobs/{config_digest}"),
                &["application/octet-stream", "*/*"],
                0,
            )
            .await?
        {
            Got::Found(response) => self.read_small(family, response, &format!("image config {config_digest}")).await?,
            Got::NotFound | Got::PastEnd => {
                return Err(ImageError::BlobMissing {
                    digest: config_digest.to_string(),
                    source_desc: self.describe(),
                    detail: format!("{} has no blob {config_digest}, the image config", repo_name(&reference)),
                });
            }
        };
        let mut manifest = oci.with_config(&config)?;
        manifest.digest = top;
        for layer in &mut manifest.layers {
            layer.location = blob_location(&reference, &layer.digest);
        }
        Ok(Resolved { manifest, image_bytes, image_digest, config_digest, config })
    }

    /// Copies `family`'s current version (its platform image, as the registry serves it, after
    /// the signature policy's check) into the OCI layout `dir` under the ref name `family`:
    /// what `enqueue publish` mirrors to S3. Every blob is hashed against its digest on the
    /// way. Returns the image manifest's digest (the mirror's version) and the bytes copied.
    pub async fn copy_to_layout(
        &self,
        family: &str,
        dir: &std::path::Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(Digest, u64), ImageError> {
        use tokio::io::AsyncWriteExt as _;
        let reference = self.template.reference(family)?;
        let target = reference.digest().or(reference.tag()).unwrap_or("latest").to_owned();
        let resolved = self.resolve_image(family, &target).await?;
        let blobs = dir.join("blobs/sha256");
        tokio::fs::create_dir_all(&blobs).await.map_err(|e| ImageError::io("creating", &blobs, e))?;
        let write = |digest: &Digest, bytes: &[u8]| {
            let path = blobs.join(digest.hex());
            std::fs::write(&path, bytes).map_err(|e| ImageError::io("writing", path, e))
        };
        write(&resolved.image_digest, &resolved.image_bytes)?;
        write(&resolved.config_digest, &resolved.config)?;
        let mut copied = 0;
        for layer in &resolved.manifest.layers {
            let path = blobs.join(layer.digest.hex());
            let mut reader = self.open_blob(layer, 0).await?;
            let mut file = tokio::fs::File::create(&path).await.map_err(|e| ImageError::io("creating", &path, e))?;
            let mut hasher = super::digest::Hasher::default();
            let mut buf = vec![0; 256 << 10];
            loop {
                let n = reader.read(&mut buf).await.map_err(|e| ImageError::Unavailable {
                    source_desc: self.describe(),
                    detail: format!("downloading {}: {e}", layer.location),
                })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(|e| ImageError::io("writing", &path, e))?;
                copied += n as u64;
                progress(n as u64);
            }
            file.flush().await.map_err(|e| ImageError::io("writing", &path, e))?;
            let actual = hasher.finish();
            if actual != layer.digest {
                return Err(ImageError::DigestMismatch {
                    digest: layer.digest.to_string(),
                    actual: actual.to_string(),
                    source_desc: self.describe(),
                });
            }
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&resolved.image_bytes)
            .ok()
            .and_then(|m| m["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_owned());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [{
                "mediaType": media_type,
                "digest": resolved.image_digest.to_string(),
                "size": resolved.image_bytes.len(),
                "annotations": {oci_spec::image::ANNOTATION_REF_NAME: family},
            }],
        });
        let index_path = dir.join("index.json");
        std::fs::write(&index_path, index.to_string()).map_err(|e| ImageError::io("writing", index_path, e))?;
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(|e| ImageError::io("writing", dir.join("oci-layout"), e))?;
        Ok((resolved.image_digest, copied))
    }
}

/// A resolved version, with its platform image's manifest and config as the registry gave them.
struct Resolved {
    manifest: Manifest,
    image_bytes: Vec<u8>,
    image_digest: Digest,
    config_digest: Digest,
    config: Vec<u8>,
}

fn repo_name(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

#[async_trait]
impl BlobSource for RegistrySource {
    fn describe(&self) -> String {
        self.template.to_string()
    }

    fn reference_of(&self, family: &str, digest: &str) -> Option<String> {
        let reference = self.template.reference(family).ok()?;
        Some(format!("{}@{digest}", repo_name(&reference)))
    }

    async fn manifest(&self, family: &str) -> Result<Manifest, ImageError> {
        let reference = self.template.reference(family)?;
        // A reference with a digest is pinned: that is the family's version.
        let target = match (reference.digest(), reference.tag()) {
            (Some(digest), _) => digest.to_owned(),
            (None, Some(tag)) => tag.to_owned(),
            (None, None) => "latest".to_owned(),
        };
        self.resolve(family, &target).await
    }

    async fn manifest_at(&self, family: &str, digest: &Digest) -> Result<Manifest, ImageError> {
        self.resolve(family, digest.as_str()).await
    }

    async fn open_blob(&self, layer: &LayerDesc, offset: u64) -> Result<BlobStream, ImageError> {
        use futures::TryStreamExt as _;
        let repository =
            layer.location.split_once("/blobs/").map(|(repo, _)| repo).ok_or_else(|| ImageError::BlobMissing {
                digest: layer.digest.to_string(),
                source_desc: self.describe(),
                detail: format!("{} is not a registry blob location", layer.location),
            })?;
        let reference = reference::parse(repository).map_err(|e| ImageError::BlobMissing {
            digest: layer.digest.to_string(),
            source_desc: self.describe(),
            detail: format!("{repository:?} is not a repository ({e})"),
        })?;
        let path = format!("blobs/{}", layer.digest);
        let got = self
            .http
            .get(reference.registry(), reference.repository(), &path, &["application/octet-stream", "*/*"], offset)
            .await?;
        let response = match got {
            Got::Found(response) => response,
            Got::PastEnd => return Ok(Box::pin(tokio::io::empty())),
            Got::NotFound => {
                return Err(ImageError::BlobMissing {
                    digest: layer.digest.to_string(),
                    source_desc: self.describe(),
                    detail: format!("{} has no blob {}", repo_name(&reference), layer.digest),
                });
            }
        };
        // A registry that ignores `Range` answers 200 with the whole blob: skip what we have.
        let skip = if offset > 0 && response.status() == reqwest::StatusCode::OK { offset } else { 0 };
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        let mut reader = tokio_util::io::StreamReader::new(stream);
        if skip > 0 {
            let skipped = tokio::io::copy(&mut (&mut reader).take(skip), &mut tokio::io::sink())
                .await
                .map_err(|e| ImageError::Unavailable { source_desc: self.describe(), detail: e.to_string() })?;
            if skipped < skip {
                return Ok(Box::pin(tokio::io::empty()));
            }
        }
        Ok(Box::pin(reader))
    }
}

/// Where a layer of `reference`'s repository lives, in [`LayerDesc::location`]: the
/// repository, so the blob is fetched from where its manifest was.
pub(crate) fn blob_location(reference: &Reference, digest: &Digest) -> String {
    format!("{}/blobs/{digest}", repo_name(reference))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_told_from_paths_as_docker_tells_them() {
        for r in [
            "registry.example.com/team/app:1.4",
            "docker.io/library/debian:bookworm",
            "127.0.0.1:5000/team/{family}",
            "localhost/x",
            "docker://debian:bookworm",
        ] {
            assert!(is_registry_reference(r), "{r}");
        }
        for p in ["/srv/images", "images", "./my.dir/x", "../x.y/z", "dir:/x", "dir:/x.y/z", "s3://b/p", "images/x"] {
            assert!(!is_registry_reference(p), "{p}");
        }
    }

    #[test]
    fn a_template_names_each_familys_repository() {
        let t = RegistryTemplate::parse("127.0.0.1:5000/team/{family}:stable").unwrap();
        let r = t.reference("web").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("127.0.0.1:5000", "team/web", Some("stable")));
        let one = RegistryTemplate::parse("docker://debian:bookworm").unwrap();
        let r = one.reference("anything").unwrap();
        assert_eq!((r.registry(), r.repository(), r.tag()), ("docker.io", "library/debian", Some("bookworm")));
        assert!(matches!(t.reference("../x"), Err(ImageError::BadFamilyName(_))));
        assert!(RegistryTemplate::parse("Reg.example.com/UPPER/x").is_err());
        assert!(RegistryTemplate::parse("r.example/{family}/{family}").is_err());
        assert_eq!(t.to_string(), "docker://127.0.0.1:5000/team/{family}:stable");
    }
}
