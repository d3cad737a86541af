//! What an image family is: its manifest (ordered layer descriptors), read from either
//! layout (below; the README's image families). Parsing only; no I/O beyond what a caller hands in.
//!
//! - flat: `images/<family>/` holds the layer tarballs, applied in key (name) order;
//! - OCI image layout: `index.json` names manifests by the `org.opencontainers.image.ref.name`
//!   annotation (the family); each manifest lists its layers.

use oci_spec::image::{ANNOTATION_REF_NAME, ImageIndex, ImageManifest};
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

/// Parses an OCI image manifest into a family's manifest.
pub fn oci_manifest(
    manifest_json: &[u8],
    digest: Digest,
    family: &str,
    source_desc: &str,
) -> Result<Manifest, ImageError> {
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
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let d = Digest::parse(l.digest().as_ref()).map_err(bad)?;
        let media_type = l.media_type().to_string();
        if !media_type.contains("layer") {
            return Err(bad(format!("layer {d} has media type {media_type}, not a layer")));
        }
        layers.push(LayerDesc { location: format!("blobs/sha256/{}", d.hex()), digest: d, size: l.size(), media_type });
    }
    if layers.is_empty() {
        return Err(ImageError::NoLayers { family: family.to_owned(), source_desc: source_desc.to_owned() });
    }
    Ok(Manifest { family: family.to_owned(), digest, layers })
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
}
