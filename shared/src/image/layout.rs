//! What an image family is: its manifest (ordered layer descriptors), read from either
//! layout (below; the README's image families). Parsing only; no I/O beyond what a caller hands in.
//!
//! - flat: `images/<family>/` holds the layer tarballs, applied in key (name) order;
//! - OCI image layout: `index.json` names manifests by the `org.opencontainers.image.ref.name`
//!   annotation (the family); each manifest lists its layers.

use oci_spec::image::{ANNOTATION_REF_NAME, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::error::ImageError;

/// One layer to apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// Where the blob lives in its source (a key or a file name), for messages and fetching.
    pub location: String,
    /// The digest of the layer's uncompressed tar, from the image config's `rootfs.diff_ids`
    /// (an OCI image); the unpacker checks it before the version can be sealed. A flat family
    /// has no config: `None`, and its layers are checked by their blob digests alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
}

/// A family's resolved manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub family: String,
    /// The OCI manifest's digest; for a flat family, the digest of its layer digest list.
    pub digest: Digest,
    pub layers: Vec<LayerDesc>,
}

/// Media type of an uncompressed tar layer.
/// The largest `index.json` or manifest read: real ones are a few KiB; a huge one is an
/// attack or a mistake and is refused before it is read into memory.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

pub const MEDIA_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Family names become path components and run ids: keep them boring.
pub fn validate_family(family: &str) -> Result<(), ImageError> {
    let ok = !family.is_empty()
        && family.len() <= 128
        && !family.starts_with('.')
        && family.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(ImageError::BadFamilyName(family.to_owned())) }
}

/// Media type of a flat-layout layer from its file name; compression is detected again from
/// the content's magic bytes when applying.
pub fn flat_media_type(name: &str) -> String {
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        format!("{MEDIA_TAR}+gzip")
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        format!("{MEDIA_TAR}+zstd")
    } else {
        MEDIA_TAR.to_owned()
    }
}

/// Whether a flat-layout file name is a layer (not a sidecar or hidden file).
pub fn is_flat_layer(name: &str) -> bool {
    !name.starts_with('.') && [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst"].iter().any(|ext| name.ends_with(ext))
}

/// A flat family's manifest from its layers, already in key order with their digests.
pub fn flat_manifest(family: &str, source_desc: &str, layers: Vec<LayerDesc>) -> Result<Manifest, ImageError> {
    if layers.is_empty() {
        return Err(ImageError::NoLayers { family: family.to_owned(), source_desc: source_desc.to_owned() });
    }
    let list: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    Ok(Manifest { family: family.to_owned(), digest: Digest::of_bytes(list.join("\n").as_bytes()), layers })
}

/// Where a published flat family's manifest object lives: `families/<family>.json`. It names
/// the family's layers in order, by digest, each stored once under `blobs/sha256/<hex>`;
/// `enqueue publish` writes it last, in one object write, so a reader sees the old version
/// or the new one, never a mix.
pub fn family_file_path(family: &str) -> String {
    format!("families/{family}.json")
}

/// A published flat family's manifest object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyFile {
    pub schema_version: u32,
    pub family: String,
    pub layers: Vec<FamilyLayer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyLayer {
    /// The layer's file name where it was published from (for messages and media type).
    pub name: String,
    pub digest: Digest,
    pub size: u64,
}

/// A flat family's manifest from its manifest object; the version is the digest of the
/// layer list, as for a listed flat family, so the same layers are the same version however
/// they are read.
pub fn family_file_manifest(bytes: &[u8], family: &str, source_desc: &str) -> Result<Manifest, ImageError> {
    let file: FamilyFile = serde_json::from_slice(bytes).map_err(|e| ImageError::BadManifest {
        family: family.to_owned(),
        source_desc: source_desc.to_owned(),
        detail: format!("{}: {e}", family_file_path(family)),
    })?;
    if file.schema_version != 1 || file.family != family {
        return Err(ImageError::BadManifest {
            family: family.to_owned(),
            source_desc: source_desc.to_owned(),
            detail: format!(
                "{} is schema {} of family {:?}; expected schema 1 of {family:?}",
                family_file_path(family),
                file.schema_version,
                file.family
            ),
        });
    }
    let layers = file
        .layers
        .into_iter()
        .map(|l| LayerDesc {
            media_type: flat_media_type(&l.name),
            location: format!("blobs/sha256/{}", l.digest.hex()),
            digest: l.digest,
            size: l.size,
            diff_id: None,
        })
        .collect();
    flat_manifest(family, source_desc, layers)
}

/// Whether a manifest came from listing a flat family's files (`images/<family>/`): such a
/// source is only as atomic as its writer, so a prepare checks it did not change meanwhile.
pub fn is_listed(manifest: &Manifest) -> bool {
    manifest.layers.iter().any(|l| l.location.starts_with("images/"))
}

/// Finds `family` in an OCI `index.json`: the manifest descriptor's digest.
pub fn oci_find_manifest(index_json: &[u8], family: &str, source_desc: &str) -> Result<Digest, ImageError> {
    let bad = |detail: String| ImageError::BadManifest {
        family: family.to_owned(),
        source_desc: source_desc.to_owned(),
        detail,
    };
    let index = ImageIndex::from_reader(index_json).map_err(|e| bad(format!("index.json: {e}")))?;
    let mut names = Vec::new();
    for desc in index.manifests() {
        let name = desc.annotations().as_ref().and_then(|a| a.get(ANNOTATION_REF_NAME));
        if let Some(name) = name {
            if name == family {
                return Digest::parse(desc.digest().as_ref()).map_err(bad);
            }
            names.push(name.clone());
        }
    }
    Err(ImageError::FamilyNotFound {
        family: family.to_owned(),
        source_desc: source_desc.to_owned(),
        detail: format!("index.json names {names:?}"),
    })
}

/// An OCI image manifest, parsed and checked against its digest: the family's manifest
/// still without its layers' uncompressed digests, and the image config that holds them.
/// [`OciManifest::with_config`] completes it once the caller has fetched the config blob.
#[derive(Debug)]
pub struct OciManifest {
    manifest: Manifest,
    config: Digest,
    source_desc: String,
}

impl OciManifest {
    /// The image config blob to fetch (where the layers' `rootfs.diff_ids` are).
    pub fn config(&self) -> &Digest {
        &self.config
    }

    /// The family's manifest, each layer with its `diff_id` from `config_json`, which must be
    /// the config blob the manifest names and list exactly one diff id per layer.
    pub fn with_config(self, config_json: &[u8]) -> Result<Manifest, ImageError> {
        let Self { mut manifest, config, source_desc } = self;
        let actual = Digest::of_bytes(config_json);
        if actual != config {
            return Err(ImageError::DigestMismatch {
                digest: config.to_string(),
                actual: actual.to_string(),
                source_desc,
            });
        }
        let bad = |detail: String| ImageError::BadManifest {
            family: manifest.family.clone(),
            source_desc: source_desc.clone(),
            detail,
        };
        let parsed =
            ImageConfiguration::from_reader(config_json).map_err(|e| bad(format!("image config {config}: {e}")))?;
        let diff_ids = parsed.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers.len() {
            return Err(bad(format!(
                "image config {config} lists {} rootfs.diff_ids for the manifest's {} layers; rebuild the image",
                diff_ids.len(),
                manifest.layers.len()
            )));
        }
        for (layer, diff_id) in manifest.layers.iter_mut().zip(diff_ids) {
            layer.diff_id = Some(Digest::parse(diff_id).map_err(|e| bad(format!("image config {config}: {e}")))?);
        }
        Ok(manifest)
    }
}

/// Parses an OCI image manifest into a family's manifest, to be completed with its config.
pub fn oci_manifest(
    manifest_json: &[u8],
    digest: Digest,
    family: &str,
    source_desc: &str,
) -> Result<OciManifest, ImageError> {
    let bad = |detail: String| ImageError::BadManifest {
        family: family.to_owned(),
        source_desc: source_desc.to_owned(),
        detail,
    };
    let actual = Digest::of_bytes(manifest_json);
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            digest: digest.to_string(),
            actual: actual.to_string(),
            source_desc: source_desc.to_owned(),
        });
    }
    let manifest = ImageManifest::from_reader(manifest_json).map_err(|e| bad(format!("manifest {digest}: {e}")))?;
    let config = Digest::parse(manifest.config().digest().as_ref()).map_err(bad)?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let d = Digest::parse(l.digest().as_ref()).map_err(bad)?;
        let media_type = l.media_type().to_string();
        // OCI's layer types, and Docker v2 schema 2's (`…rootfs.diff.tar.gzip`); a Windows
        // "foreign" layer, which lives elsewhere and holds no Linux tree, is not one.
        let is_layer = (media_type.contains("layer")
            || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar"))
            && !media_type.contains("foreign");
        if !is_layer {
            return Err(bad(format!("layer {d} has media type {media_type}, not a layer")));
        }
        layers.push(LayerDesc {
            location: format!("blobs/sha256/{}", d.hex()),
            digest: d,
            size: l.size(),
            media_type,
            diff_id: None,
        });
    }
    if layers.is_empty() {
        return Err(ImageError::NoLayers { family: family.to_owned(), source_desc: source_desc.to_owned() });
    }
    Ok(OciManifest {
        manifest: Manifest { family: family.to_owned(), digest, layers },
        config,
        source_desc: source_desc.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_names_cannot_become_paths() {
        for bad in ["", ".hidden", "a/b", "..", "a b", "x\0"] {
            assert!(validate_family(bad).is_err(), "{bad:?}");
        }
        for good in ["web", "web-1.2_x"] {
            validate_family(good).unwrap();
        }
    }

    #[test]
    fn flat_names_and_media_types() {
        assert!(is_flat_layer("0001-base.tar.gz") && !is_flat_layer(".part.tar") && !is_flat_layer("x.sha256"));
        assert_eq!(flat_media_type("a.tar.zst"), format!("{MEDIA_TAR}+zstd"));
    }

    #[test]
    fn an_index_without_the_family_names_what_it_has() {
        let index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1,"annotations":{"org.opencontainers.image.ref.name":"other"}}]}"#;
        let err = oci_find_manifest(index, "web", "dir:/x").unwrap_err();
        assert!(matches!(err, ImageError::FamilyNotFound { .. }));
        assert!(err.to_string().contains("other"), "{err}");
        assert!(matches!(oci_find_manifest(b"{", "web", "dir:/x"), Err(ImageError::BadManifest { .. })));
    }

    /// An OCI manifest of `layers` (digests) whose config is `config`.
    fn oci(layers: &[&Digest], config: &[u8]) -> (Vec<u8>, Digest) {
        let layers: Vec<serde_json::Value> = layers
            .iter()
            .map(|d| serde_json::json!({"mediaType": MEDIA_TAR, "digest": d.to_string(), "size": 1}))
            .collect();
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of_bytes(config).to_string(), "size": config.len()},
            "layers": layers,
        }))
        .unwrap();
        let d = Digest::of_bytes(&m);
        (m, d)
    }

    fn config(diff_ids: &[&Digest]) -> Vec<u8> {
        let ids: Vec<String> = diff_ids.iter().map(|d| d.to_string()).collect();
        serde_json::to_vec(
            &serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ids}}),
        )
        .unwrap()
    }

    #[test]
    fn an_oci_manifest_takes_each_layers_diff_id_from_its_config() {
        let (a, b) = (Digest::of_bytes(b"a.tar.gz"), Digest::of_bytes(b"b.tar"));
        let (da, db) = (Digest::of_bytes(b"a.tar"), Digest::of_bytes(b"b.tar"));
        let cfg = config(&[&da, &db]);
        let (m, d) = oci(&[&a, &b], &cfg);
        let parsed = oci_manifest(&m, d.clone(), "web", "dir:/x").unwrap();
        assert_eq!(parsed.config(), &Digest::of_bytes(&cfg));
        let manifest = parsed.with_config(&cfg).unwrap();
        let ids: Vec<Option<Digest>> = manifest.layers.iter().map(|l| l.diff_id.clone()).collect();
        assert_eq!(ids, [Some(da.clone()), Some(db)]);

        // Another config than the manifest names: refused by its digest.
        let other = config(&[&da, &da]);
        let err = oci_manifest(&m, d.clone(), "web", "dir:/x").unwrap().with_config(&other).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");

        // A config that does not list one diff id per layer.
        let short = config(&[&da]);
        let (m, d) = oci(&[&a, &b], &short);
        let err = oci_manifest(&m, d, "web", "dir:/x").unwrap().with_config(&short).unwrap_err();
        assert!(matches!(err, ImageError::BadManifest { .. }), "{err}");
        assert!(err.to_string().contains("lists 1 rootfs.diff_ids for the manifest's 2 layers"), "{err}");

        // A config without rootfs at all.
        let bare = br#"{"architecture":"amd64","os":"linux"}"#;
        let (m, d) = oci(&[&a], bare);
        let err = oci_manifest(&m, d, "web", "dir:/x").unwrap().with_config(bare).unwrap_err();
        assert!(matches!(err, ImageError::BadManifest { .. }) && !err.is_retryable(), "{err}");
    }
}
