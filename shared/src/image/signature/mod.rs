//! Who built an image: the signature policy of each family, checked on a registry image's
//! manifest digest before a single blob of it is asked for.
//!
//! A policy file (the worker's `registry.policy_file`, TOML) names a rule per family and a
//! default:
//!
//! ```toml
//! [default]
//! signature = "none"            # the default default: no check
//!
//! [families.web]
//! signature = "cosign"          # fail closed: a valid cosign signature by one of these keys
//! keys = ["/etc/thinpipe/keys/team-2026.pub", "/etc/thinpipe/keys/team-2027.pub"]
//! ```
//!
//! Rotating keys is editing the list (add the new key, re-sign or wait for new versions, drop
//! the old key) and restarting the worker: the file is read at start. A verification is
//! remembered per digest *and key set* ([`VerifiedCache`], the host database's
//! `verified_signatures`), so the 10,000th activation of a verified version costs a lookup
//! and no request, and a changed key set verifies again.
//!
//! `cosign.rs` does cosign's "simple signing" check itself, with RustCrypto's `p256`: the
//! `sigstore` crate would do the same check through a second HTTP stack (`oci-client` on an
//! older reqwest), and this is the one check we need (ECDSA P-256 over a small payload).

mod cosign;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

pub use cosign::{
    COSIGN_SIGNATURE_ANNOTATION, KeySet, SIMPLE_SIGNING_MEDIA_TYPE, SignatureManifest, SignedPayload, signature_tag,
    simple_signing_payload,
};
#[cfg(any(test, feature = "test-support"))]
pub use cosign::{public_pem, sign};

use super::digest::Digest;

/// Why an image is refused; each is a result cause of its own.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyRefusal {
    #[error(
        "image family {family}: version {digest} has no cosign signature ({detail}); its family's policy requires one: sign it (`cosign sign --key …`) or change the policy"
    )]
    Missing { family: String, digest: String, detail: String },
    #[error(
        "image family {family}: version {digest} has no valid cosign signature by a key its policy trusts ({detail}); nothing of it was downloaded"
    )]
    Invalid { family: String, digest: String, detail: String },
    #[error("image family {family}: the signature policy cannot be applied: {detail}")]
    Policy { family: String, detail: String },
}

/// What a family requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    None,
    Cosign(Arc<KeySet>),
}

/// Every family's rule, loaded from a policy file.
#[derive(Clone, Debug, Default)]
pub struct SignaturePolicy {
    default: Option<Rule>,
    families: BTreeMap<String, Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    default: Option<RuleFile>,
    #[serde(default)]
    families: BTreeMap<String, RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    signature: String,
    #[serde(default)]
    keys: Vec<PathBuf>,
}

impl SignaturePolicy {
    /// No check for any family.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads a policy file and every key it names; the error names the file, the family and
    /// what to fix.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("reading the policy file {}: {e}", path.display()))?;
        let file: PolicyFile =
            toml::from_str(&text).map_err(|e| format!("the policy file {} is not valid: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let rule = |name: &str, r: RuleFile| -> Result<Rule, String> {
            match r.signature.as_str() {
                "none" if r.keys.is_empty() => Ok(Rule::None),
                "none" => Err(format!("{name}: signature = \"none\" takes no keys")),
                "cosign" => {
                    if r.keys.is_empty() {
                        return Err(format!("{name}: signature = \"cosign\" needs at least one key in `keys`"));
                    }
                    let keys = r
                        .keys
                        .iter()
                        .map(|k| if k.is_absolute() { k.clone() } else { dir.join(k) })
                        .collect::<Vec<_>>();
                    KeySet::load(&keys).map(|k| Rule::Cosign(Arc::new(k))).map_err(|e| format!("{name}: {e}"))
                }
                other => Err(format!("{name}: signature {other:?} is not one of \"none\", \"cosign\"")),
            }
        };
        let in_file = |e: String| format!("policy file {}: {e}", path.display());
        let default = file.default.map(|r| rule("[default]", r)).transpose().map_err(in_file)?;
        let mut families = BTreeMap::new();
        for (family, r) in file.families {
            super::layout::validate_family(&family).map_err(|e| in_file(e.to_string()))?;
            let parsed = rule(&format!("[families.{family}]"), r).map_err(in_file)?;
            families.insert(family, parsed);
        }
        Ok(Self { default, families })
    }

    /// The rule for `family`: its own, else the default, else none.
    pub fn rule(&self, family: &str) -> &Rule {
        self.families.get(family).or(self.default.as_ref()).unwrap_or(&Rule::None)
    }

    /// The families (and `[default]`, as `*`) that require signatures: a source that cannot
    /// carry them must refuse to serve them.
    pub fn signed_families(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.families.iter().filter(|(_, r)| matches!(r, Rule::Cosign(_))).map(|(f, _)| f.clone()).collect();
        if matches!(self.default, Some(Rule::Cosign(_))) {
            out.push("*".to_owned());
        }
        out
    }
}

/// Digests whose signatures were verified, by key set (the host database keeps them).
pub trait VerifiedCache: Send + Sync {
    fn is_verified(&self, digest: &Digest, keys: &str) -> Result<bool, String>;
    fn remember_verified(&self, digest: &Digest, keys: &str) -> Result<(), String>;
}

/// A cache in memory (tests, and a source without a host database).
#[derive(Debug, Default)]
pub struct MemoryVerifiedCache(std::sync::Mutex<std::collections::HashSet<(Digest, String)>>);

impl VerifiedCache for MemoryVerifiedCache {
    fn is_verified(&self, digest: &Digest, keys: &str) -> Result<bool, String> {
        let set = self.0.lock().map_err(|e| e.to_string())?;
        Ok(set.contains(&(digest.clone(), keys.to_owned())))
    }
    fn remember_verified(&self, digest: &Digest, keys: &str) -> Result<(), String> {
        self.0.lock().map_err(|e| e.to_string())?.insert((digest.clone(), keys.to_owned()));
        Ok(())
    }
}

pub(crate) use cosign::{MAX_PAYLOAD_BYTES, verify};
