//! Which image of a multi-architecture index a host takes: its own OS, architecture and
//! variant in OCI's names (`linux/amd64`, `linux/arm64/v8`), or the one `registry.platform`
//! names.

use serde::Deserialize;

use crate::image::digest::Digest;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This host's platform, in OCI's (Go's) names.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform { os: std::env::consts::OS.to_owned(), architecture: architecture.to_owned(), variant: None }
    }

    /// `os/architecture[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform { os: (*os).to_owned(), architecture: (*arch).to_owned(), variant: None })
            }
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: Some((*variant).to_owned()),
            }),
            _ => Err(format!("platform {s:?}: expected os/architecture[/variant], as linux/arm64/v8")),
        }
    }

    /// Whether an index entry for `other` runs here: the same OS and architecture, and the
    /// same variant when both name one (arm64's `v8` is what arm64 means without one).
    fn runs(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        let norm = |v: Option<&str>| match (architecture, v) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_owned),
        };
        self.os == os
            && self.architecture == architecture
            && match (norm(self.variant.as_deref()), norm(variant)) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What an index offers a platform.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// The document is an image manifest, not an index.
    NotAnIndex,
    Chose(Digest),
    /// No entry runs here; the platforms it has.
    NoneFor(Vec<String>),
    Malformed(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    media_type: Option<String>,
    manifests: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
struct Entry {
    digest: String,
    #[serde(default)]
    platform: Option<EntryPlatform>,
}

#[derive(Deserialize)]
struct EntryPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

/// The entry of the index `bytes` for `platform`: the first that runs there (an exact variant
/// is preferred over an entry naming none). Entries without a platform (attestations,
/// signatures) are never picked.
pub(crate) fn index_pick(bytes: &[u8], platform: &Platform) -> Pick {
    let index: Index = match serde_json::from_slice(bytes) {
        Ok(i) => i,
        // Not our business here: the manifest parser says what is wrong with it.
        Err(_) => return Pick::NotAnIndex,
    };
    let Some(entries) = index.manifests else { return Pick::NotAnIndex };
    if index.media_type.as_deref().is_some_and(|m| m.contains("manifest.v") && !m.contains("list")) {
        return Pick::NotAnIndex;
    }
    let mut offered = Vec::new();
    let mut fallback = None;
    for entry in &entries {
        let Some(p) = &entry.platform else { continue };
        if p.os == "unknown" {
            continue;
        }
        let name = Platform { os: p.os.clone(), architecture: p.architecture.clone(), variant: p.variant.clone() };
        offered.push(name.to_string());
        if platform.runs(&p.os, &p.architecture, p.variant.as_deref()) {
            let exact = p.variant == platform.variant;
            if exact || fallback.is_none() {
                match Digest::parse(&entry.digest) {
                    Ok(d) if exact => return Pick::Chose(d),
                    Ok(d) => fallback = Some(d),
                    Err(e) => return Pick::Malformed(e),
                }
            }
        }
    }
    match fallback {
        Some(d) => Pick::Chose(d),
        None => Pick::NoneFor(offered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>, char)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, variant, fill)| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = (*v).into();
                }
                serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1,
                    "digest": format!("sha256:{}", fill.to_string().repeat(64)), "platform": p})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})).unwrap()
    }

    fn digest(fill: char) -> Digest {
        Digest::parse(&format!("sha256:{}", fill.to_string().repeat(64))).unwrap()
    }

    #[test]
    fn an_index_resolves_to_the_hosts_platform_or_the_one_named() {
        let i = index(&[
            ("unknown", "unknown", None, 'f'),
            ("linux", "arm", Some("v7"), 'a'),
            ("linux", "arm64", Some("v8"), 'b'),
            ("linux", "amd64", None, 'c'),
        ]);
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert_eq!(index_pick(&i, &amd64), Pick::Chose(digest('c')));
        assert_eq!(index_pick(&i, &Platform::parse("linux/arm64").unwrap()), Pick::Chose(digest('b')));
        assert_eq!(index_pick(&i, &Platform::parse("linux/arm/v7").unwrap()), Pick::Chose(digest('a')));
        let Pick::NoneFor(offered) = index_pick(&i, &Platform::parse("linux/s390x").unwrap()) else { panic!() };
        assert_eq!(offered, ["linux/arm/v7", "linux/arm64/v8", "linux/amd64"]);
        assert_eq!(index_pick(br#"{"schemaVersion":2,"config":{},"layers":[]}"#, &amd64), Pick::NotAnIndex);
        assert!(Platform::parse("linux").is_err() && Platform::parse("linux/arm64/v8/x").is_err());
        assert_eq!(Platform::host().os, "linux");
    }
}
