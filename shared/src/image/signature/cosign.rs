//! cosign's key-based signatures, as `cosign sign --key` stores them: beside image
//! `repo@sha256:<hex>`, the tag `repo:sha256-<hex>.sig` names an OCI manifest whose layers
//! are "simple signing" payloads (`application/vnd.dev.cosign.simplesigning.v1+json`), each
//! with its signature in the annotation `dev.cosignproject.cosign/signature`: base64 of an
//! ASN.1 DER ECDSA P-256 signature over the payload's bytes (SHA-256). The payload says which
//! manifest digest it signs (`critical.image.docker-manifest-digest`).
//!
//! A version passes if one payload, hashed to the digest its layer names, signed by one of
//! the trusted keys, names the version's digest.

use std::path::PathBuf;

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

use crate::image::digest::Digest;

pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const SIGNATURE_TYPE: &str = "cosign container image signature";

/// The tag cosign stores `digest`'s signatures under.
pub fn signature_tag(digest: &Digest) -> String {
    format!("sha256-{}.sig", digest.hex())
}

/// The simple-signing payload cosign signs for `reference` (`registry/repo`) at `digest`.
pub fn simple_signing_payload(reference: &str, digest: &Digest) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest.to_string()},
            "type": SIGNATURE_TYPE,
        },
        "optional": null,
    }))
    .unwrap_or_default()
}

/// The trusted public keys of a rule, and a fingerprint of the set (the cache's key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<(PathBuf, VerifyingKey)>,
    fingerprint: String,
}

impl KeySet {
    /// Reads PEM public keys (`cosign.pub`: ECDSA P-256, SubjectPublicKeyInfo).
    pub fn load(paths: &[PathBuf]) -> Result<Self, String> {
        let mut keys = Vec::new();
        let mut all_der = Vec::new();
        for path in paths {
            let pem = std::fs::read_to_string(path).map_err(|e| format!("reading key {}: {e}", path.display()))?;
            let key = VerifyingKey::from_public_key_pem(&pem).map_err(|e| {
                format!("key {} is not an ECDSA P-256 public key in PEM (cosign.pub) ({e})", path.display())
            })?;
            all_der.push(key.to_encoded_point(true).as_bytes().to_vec());
            keys.push((path.clone(), key));
        }
        all_der.sort();
        all_der.dedup();
        let fingerprint = Digest::of_bytes(&all_der.concat()).to_string();
        Ok(Self { keys, fingerprint })
    }

    /// Identifies the set (whatever order or files the keys came in).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn paths(&self) -> String {
        self.keys.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// One signed payload named by a signature manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPayload {
    pub digest: Digest,
    pub size: u64,
    pub signature: String,
}

/// A signature manifest's signed payloads.
#[derive(Debug)]
pub struct SignatureManifest {
    pub payloads: Vec<SignedPayload>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layer {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

/// The largest payload fetched: a real one is a few hundred bytes.
pub(crate) const MAX_PAYLOAD_BYTES: u64 = 64 << 10;

impl SignatureManifest {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("the signature manifest is malformed ({e})"))?;
        let mut payloads = Vec::new();
        for l in m.layers {
            let Some(signature) = l.annotations.get(COSIGN_SIGNATURE_ANNOTATION) else { continue };
            if l.media_type != SIMPLE_SIGNING_MEDIA_TYPE || l.size > MAX_PAYLOAD_BYTES {
                continue;
            }
            let digest = Digest::parse(&l.digest)?;
            payloads.push(SignedPayload { digest, size: l.size, signature: signature.clone() });
        }
        Ok(Self { payloads })
    }
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// Whether `payload` (the bytes of `signed`) is a signature of `version` by one of `keys`;
/// the error says what was wrong with it.
pub fn verify(keys: &KeySet, signed: &SignedPayload, payload: &[u8], version: &Digest) -> Result<(), String> {
    let actual = Digest::of_bytes(payload);
    if actual != signed.digest {
        return Err(format!("payload {} hashes to {actual}", signed.digest));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(signed.signature.trim())
        .map_err(|e| format!("payload {}: its signature is not base64 ({e})", signed.digest))?;
    let signature = Signature::from_der(&raw)
        .or_else(|_| Signature::from_slice(&raw))
        .map_err(|e| format!("payload {}: its signature is not an ECDSA signature ({e})", signed.digest))?;
    if !keys.keys.iter().any(|(_, key)| key.verify(payload, &signature).is_ok()) {
        return Err(format!("payload {}: not signed by any trusted key ({})", signed.digest, keys.paths()));
    }
    // Signed by a trusted key: now what it says counts.
    let parsed: Payload = serde_json::from_slice(payload)
        .map_err(|e| format!("payload {}: not a simple-signing payload ({e})", signed.digest))?;
    if parsed.critical.kind != SIGNATURE_TYPE {
        return Err(format!("payload {}: of type {:?}, not {SIGNATURE_TYPE:?}", signed.digest, parsed.critical.kind));
    }
    if parsed.critical.image.digest != version.as_str() {
        return Err(format!(
            "payload {}: a valid signature of {}, not of {version}",
            signed.digest, parsed.critical.image.digest
        ));
    }
    Ok(())
}

/// For tests: the PEM of `key`'s public half, as `cosign generate-key-pair` writes it.
#[cfg(any(test, feature = "test-support"))]
pub fn public_pem(key: &p256::ecdsa::SigningKey) -> String {
    use p256::pkcs8::EncodePublicKey as _;
    key.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap_or_default()
}

/// For tests: `payload` signed by `key`, base64 of DER, as cosign annotates it.
#[cfg(any(test, feature = "test-support"))]
pub fn sign(key: &p256::ecdsa::SigningKey, payload: &[u8]) -> String {
    use p256::ecdsa::signature::Signer as _;
    let signature: Signature = key.sign(payload);
    base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn key(seed: u8) -> p256::ecdsa::SigningKey {
        p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn keyset(dir: &Path, keys: &[&p256::ecdsa::SigningKey]) -> KeySet {
        let paths: Vec<PathBuf> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let p = dir.join(format!("k{i}.pub"));
                std::fs::write(&p, public_pem(k)).unwrap();
                p
            })
            .collect();
        KeySet::load(&paths).unwrap()
    }

    #[test]
    fn a_payload_passes_only_signed_by_a_trusted_key_for_that_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (trusted, other) = (key(7), key(9));
        let keys = keyset(dir.path(), &[&other, &trusted]);
        let version = Digest::of_bytes(b"a manifest");
        let payload = simple_signing_payload("r.example/team/web", &version);
        let signed = |sig: String, payload: &[u8]| SignedPayload {
            digest: Digest::of_bytes(payload),
            size: payload.len() as u64,
            signature: sig,
        };
        verify(&keys, &signed(sign(&trusted, &payload), &payload), &payload, &version).unwrap();

        let only_other = keyset(&dir.path().join(".."), &[&other]);
        let err = verify(&only_other, &signed(sign(&trusted, &payload), &payload), &payload, &version).unwrap_err();
        assert!(err.contains("not signed by any trusted key"), "{err}");

        let elsewhere = Digest::of_bytes(b"another manifest");
        let err = verify(&keys, &signed(sign(&trusted, &payload), &payload), &payload, &elsewhere).unwrap_err();
        assert!(err.contains("not of sha256:"), "{err}");

        let mut tampered = payload.clone();
        tampered[10] ^= 1;
        let claimed = signed(sign(&trusted, &payload), &payload);
        assert!(verify(&keys, &claimed, &tampered, &version).unwrap_err().contains("hashes to"));

        // The same keys in another order or files are the same set.
        assert_eq!(keyset(dir.path(), &[&trusted, &other]).fingerprint(), keys.fingerprint());
        assert_ne!(only_other.fingerprint(), keys.fingerprint());
        assert!(KeySet::load(&[dir.path().join("missing.pub")]).is_err());
    }

    #[test]
    fn a_signature_manifest_names_its_signed_payloads() {
        let m = serde_json::json!({"schemaVersion": 2, "layers": [
            {"mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "digest": Digest::of_bytes(b"p").to_string(), "size": 1,
             "annotations": {COSIGN_SIGNATURE_ANNOTATION: "c2ln"}},
            {"mediaType": "application/octet-stream", "digest": Digest::of_bytes(b"q").to_string(), "size": 1},
        ]});
        let parsed = SignatureManifest::parse(m.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.payloads.len(), 1);
        assert_eq!(parsed.payloads[0].signature, "c2ln");
        assert!(SignatureManifest::parse(b"{").is_err());
    }
}
