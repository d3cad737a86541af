//! The conformance suite every blob source passes (`BlobSource`: the directory, S3 and a
//! registry): what a manifest resolves to (an OCI image's layers with the uncompressed
//! digests its config lists), kept versions, a flat family's layer order (where the source
//! has flat families: a registry has none), byte-exact blobs from any offset (a resumed
//! download), and the errors a caller's mistake must give (not found, bad name, missing
//! blob), none of them retryable.
//!
//! The suite writes each image into a staging directory and hands it to the caller's
//! `publish`, which makes the source serve it (nothing to do for a directory source;
//! `enqueue publish`'s code for S3; a `skopeo` push for a registry).

use std::path::Path;

use tokio::io::AsyncReadExt;

use super::digest::Digest;
use super::error::ImageError;
use super::layout::{LayerDesc, MEDIA_TAR};
use super::source::BlobSource;

/// The family the OCI layout holds (two versions) and the flat one.
pub const OCI_FAMILY: &str = "conformance-app";
pub const FLAT_FAMILY: &str = "conformance-flat";

fn tar_of(name: &str, content: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_path(name).unwrap();
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, content).unwrap();
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes `bytes` as a blob of the OCI layout at `root`; its digest.
fn blob(root: &Path, bytes: &[u8]) -> Digest {
    let digest = Digest::of_bytes(bytes);
    let dir = root.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(digest.hex()), bytes).unwrap();
    digest
}

/// Adds a version of `family` to the OCI layout at `root` (its blobs, and `index.json`
/// naming it as the family's current version); the manifest digest.
fn oci_version(root: &Path, family: &str, layers: &[(&str, &[u8])]) -> Digest {
    let diff_ids: Vec<String> = layers.iter().map(|(_, bytes)| diff_id(bytes).to_string()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config = config.as_slice();
    let config_digest = blob(root, config);
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(media_type, bytes)| {
            serde_json::json!({"mediaType": media_type, "digest": blob(root, bytes).to_string(), "size": bytes.len()})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len()},
        "layers": layers,
    }))
    .unwrap();
    let digest = blob(root, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest.to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": family},
        }],
    });
    std::fs::write(root.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(root.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digest
}

/// Reads a whole blob from `offset` on.
async fn read_blob(source: &dyn BlobSource, layer: &LayerDesc, offset: u64) -> Vec<u8> {
    let mut stream = source.open_blob(layer, offset).await.unwrap_or_else(|e| panic!("opening {}: {e}", layer.digest));
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    out
}

/// The digest of a layer's uncompressed tar (`bytes` may be gzip).
fn diff_id(bytes: &[u8]) -> Digest {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(bytes), &mut tar).unwrap();
        Digest::of_bytes(&tar)
    } else {
        Digest::of_bytes(bytes)
    }
}

/// `got` are the layers `want` in order; with `diff_ids`, each carries its uncompressed digest
/// (an OCI image's config lists them), else none (a flat family has no config).
fn assert_layers(what: &str, got: &[LayerDesc], want: &[&[u8]], diff_ids: bool) {
    let got: Vec<(Digest, u64, Option<Digest>)> =
        got.iter().map(|l| (l.digest.clone(), l.size, l.diff_id.clone())).collect();
    let want: Vec<(Digest, u64, Option<Digest>)> =
        want.iter().map(|b| (Digest::of_bytes(b), b.len() as u64, diff_ids.then(|| diff_id(b)))).collect();
    assert_eq!(got, want, "{what}: the layers, in order");
}

/// Runs the suite against `source`, which serves what `publish(staging, family)` puts there;
/// `flat`: whether it has flat families.
pub async fn run(source: &dyn BlobSource, flat: bool, publish: impl AsyncFn(&Path, &str)) {
    let describe = source.describe();
    assert!(!describe.is_empty() && describe == source.describe(), "describe is stable: {describe}");
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path();

    // An OCI layout: version 1, then version 2 (sharing its first layer).
    let shared = gzip(&tar_of("etc/os-release", b"NAME=conformance\n"));
    let one = tar_of("app/v", b"1\n");
    let two = gzip(&tar_of("app/v", b"2\n"));
    let gz = format!("{MEDIA_TAR}+gzip");
    let v1 = oci_version(root, OCI_FAMILY, &[(&gz, &shared), (MEDIA_TAR, &one)]);
    publish(root, OCI_FAMILY).await;
    let m = source.manifest(OCI_FAMILY).await.unwrap();
    assert_eq!((m.family.as_str(), &m.digest), (OCI_FAMILY, &v1), "the index names version 1");
    assert_layers("version 1", &m.layers, &[&shared, &one], true);
    assert_eq!(m.layers[0].media_type, gz, "media types as the manifest gives them");
    assert_eq!(source.manifest(OCI_FAMILY).await.unwrap(), m, "resolving twice gives the same manifest");

    let v2 = oci_version(root, OCI_FAMILY, &[(&gz, &shared), (&gz, &two)]);
    publish(root, OCI_FAMILY).await;
    let m2 = source.manifest(OCI_FAMILY).await.unwrap();
    assert_eq!(m2.digest, v2, "the index now names version 2");
    assert_layers("version 2", &m2.layers, &[&shared, &two], true);
    let kept = source.manifest_at(OCI_FAMILY, &v1).await.unwrap();
    assert_eq!(kept, m, "an earlier version is still served by its digest");
    assert_eq!(source.manifest_at(OCI_FAMILY, &v2).await.unwrap(), m2);

    // A flat family: layers applied in file-name order.
    let blobs: Vec<(&LayerDesc, &Vec<u8>)> = m2.layers.iter().zip([&shared, &two]).collect();
    let flat = flat_family(source, root, &publish, flat, &m2.digest).await;
    let flat_blobs = flat.as_ref().map(|(m, bytes)| m.layers.iter().zip(bytes.iter()).collect::<Vec<_>>());
    // Blobs: byte for byte, from any offset (a resumed download), the empty rest at the end.
    for (layer, bytes) in blobs.into_iter().chain(flat_blobs.into_iter().flatten()) {
        assert_eq!(&read_blob(source, layer, 0).await, bytes, "blob {}", layer.digest);
        let mid = layer.size / 2;
        assert_eq!(read_blob(source, layer, mid).await, bytes[mid as usize..], "blob {} from {mid}", layer.digest);
        assert!(read_blob(source, layer, layer.size).await.is_empty(), "blob {} from its end", layer.digest);
    }

    // A caller's mistakes: clear errors, none retryable.
    let not_retryable = |what: &str, e: &ImageError| assert!(!e.is_retryable(), "{what}: {e} is not retryable");
    let e = source.manifest("no-such-family").await.unwrap_err();
    assert!(matches!(e, ImageError::FamilyNotFound { .. }), "an unknown family: {e}");
    assert!(e.to_string().contains("no-such-family") && e.to_string().contains(&describe), "names both: {e}");
    not_retryable("an unknown family", &e);
    for bad in ["../etc", "", ".hidden", "a/b"] {
        let e = source.manifest(bad).await.unwrap_err();
        assert!(matches!(e, ImageError::BadFamilyName(_)), "{bad:?}: {e}");
        let e = source.manifest_at(bad, &v1).await.unwrap_err();
        assert!(matches!(e, ImageError::BadFamilyName(_)), "{bad:?} at a digest: {e}");
    }
    let unknown = Digest::of_bytes(b"a version nobody published");
    let families = if flat.is_some() { vec![OCI_FAMILY, FLAT_FAMILY] } else { vec![OCI_FAMILY] };
    for family in families {
        let e = source.manifest_at(family, &unknown).await.unwrap_err();
        assert!(matches!(e, ImageError::VersionNotFound { .. }), "{family}@unknown: {e}");
        assert!(e.to_string().contains(&unknown.to_string()), "names the digest: {e}");
        not_retryable("an unknown version", &e);
    }
    // Where a blob the source lacks would be, beside one it has.
    let known = &m2.layers[0];
    let missing = LayerDesc {
        digest: unknown.clone(),
        size: 10,
        media_type: MEDIA_TAR.to_owned(),
        location: known.location.replace(known.digest.hex(), unknown.hex()),
        diff_id: None,
    };
    let Err(e) = source.open_blob(&missing, 0).await else { panic!("a blob the source does not have was opened") };
    assert!(matches!(&e, ImageError::BlobMissing { digest, .. } if *digest == unknown.to_string()), "{e}");
    not_retryable("a missing blob", &e);
}

/// The flat family's part of the suite, where the source has flat families: its manifest and
/// its layers' bytes.
async fn flat_family(
    source: &dyn BlobSource,
    root: &Path,
    publish: &impl AsyncFn(&Path, &str),
    flat: bool,
    oci_version: &Digest,
) -> Option<(super::layout::Manifest, Vec<Vec<u8>>)> {
    if !flat {
        return None;
    }
    let flat_dir = root.join("images").join(FLAT_FAMILY);
    std::fs::create_dir_all(&flat_dir).unwrap();
    let (base, top) = (gzip(&tar_of("base", b"flat base\n")), tar_of("top", b"flat top\n"));
    std::fs::write(flat_dir.join("10-top.tar"), &top).unwrap();
    std::fs::write(flat_dir.join("01-base.tar.gz"), &base).unwrap();
    publish(root, FLAT_FAMILY).await;
    let flat = source.manifest(FLAT_FAMILY).await.unwrap();
    assert_layers("the flat family", &flat.layers, &[&base, &top], false);
    assert_eq!(
        (flat.layers[0].media_type.as_str(), flat.layers[1].media_type.as_str()),
        (format!("{MEDIA_TAR}+gzip").as_str(), MEDIA_TAR)
    );
    assert_eq!(source.manifest_at(FLAT_FAMILY, &flat.digest).await.unwrap(), flat, "its current version by digest");
    assert_ne!(&flat.digest, oci_version);
    Some((flat, vec![base, top]))
}

#[cfg(test)]
mod tests {
    use crate::image::{LocalDir, S3Source};

    #[tokio::test]
    async fn the_directory_source_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let source = LocalDir::new(dir.path());
        // The source reads the staging directory's files as they are written.
        let served = dir.path().to_owned();
        super::run(&source, true, async |staging, _family| {
            copy_tree(staging, &served);
        })
        .await;
    }

    /// Copies the staging tree into the served directory (what an operator's `cp -r` does).
    fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn the_s3_source_passes_the_conformance_suite_against_moto() {
        let Some(endpoint) = crate::aws::test_endpoint() else { return };
        let (config, opts) = crate::aws::test_config(&endpoint).await;
        let client = crate::aws::s3_client(&config, &opts);
        let bucket = format!("conformance-{:x}", rand::random::<u64>());
        client.create_bucket().bucket(&bucket).send().await.unwrap();
        let url = format!("s3://{bucket}/images");
        let source = S3Source::new(client.clone(), &url).unwrap();
        // What `enqueue publish` does.
        super::run(&source, true, async |staging, family| {
            crate::image::publish(&client, &endpoint, staging, family, &url, &|_| {}).await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_registry_source_passes_the_conformance_suite_against_docker_registry() {
        if !crate::image::testregistry::available() {
            return;
        }
        let registry = crate::image::testregistry::Registry::start(Default::default());
        let template =
            crate::image::RegistryTemplate::parse(&format!("{}/conformance/{{family}}", registry.host)).unwrap();
        let mut options = crate::image::RegistryOptions::default();
        options.http.plain_http = vec![registry.host.clone()];
        options.http.retry_for = std::time::Duration::from_secs(5);
        let source = crate::image::RegistrySource::new(template, options).unwrap();
        // What a build pipeline's push does: the layout's image under the family's tag.
        super::run(&source, false, async |staging, family| {
            let staging = staging.to_owned();
            let (registry, family) = (&registry, family.to_owned());
            tokio::task::block_in_place(|| registry.push(&staging, &family, &format!("conformance/{family}:latest")));
        })
        .await;
    }
}
