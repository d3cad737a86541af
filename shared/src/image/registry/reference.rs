//! Image references as `docker pull` reads them (`registry.example.com/team/app:1.4`,
//! `debian`, `…@sha256:<hex>`), into `oci-spec`'s `Reference`.
//!
//! The grammar and normalisation are Distribution's (`reference/regexp.go`, `normalize.go`:
//! Docker Hub's `docker.io` and its `library/` namespace), as `oci-spec` has them, with one
//! difference: the tag's `\w` is ASCII, as in Go. `oci-spec`'s own parser compiles its
//! expression with Unicode classes, which took 40 ms of every `worker run` on these machines;
//! this one compiles in well under one.

use std::sync::LazyLock;

use oci_spec::distribution::Reference;
use regex::Regex;

static REFERENCE: LazyLock<Result<Regex, regex::Error>> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?-u)^(",
        // domain: host components and an optional port, then '/'
        r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*(?::[0-9]+)?/)?",
        // path components
        r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
        r")(?::([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?",
        r"(?:@([A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$",
    ))
});

/// Parses `s` as Docker does; the error says what is wrong.
pub fn parse(s: &str) -> Result<Reference, String> {
    let re = REFERENCE.as_ref().map_err(|e| format!("the reference grammar does not compile: {e}"))?;
    let caps = re.captures(s).ok_or_else(|| "invalid reference format".to_owned())?;
    let name = caps.get(1).map_or("", |m| m.as_str());
    if name.len() > 255 {
        return Err("repository name must not be more than 255 characters".into());
    }
    let (registry, repository) = split_domain(name);
    // A first component without a dot or port is part of the repository, which Docker wants
    // in lower case.
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".into());
    }
    let tag = caps.get(2).map(|m| m.as_str().to_owned());
    let digest = caps.get(3).map(|m| m.as_str().to_owned());
    if let Some(d) = &digest
        && let Some(hex) = d.strip_prefix("sha256:")
        && hex.len() != 64
    {
        return Err(format!("digest {d} does not have 64 hex digits"));
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => Reference::with_tag_and_digest(registry, repository, tag, digest),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag),
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest),
        (None, None) => Reference::with_tag(registry, repository, "latest".to_owned()),
    })
}

/// The registry and the repository of `name`: a first component that names a host (a dot, a
/// port, `localhost`) is the registry; otherwise Docker Hub, whose one-component names live
/// under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut rest) = match name.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (first.to_owned(), rest.to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".to_owned();
    }
    if domain == "docker.io" && !rest.contains('/') {
        rest = format!("library/{rest}");
    }
    (domain, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_normalises_them() {
        let d = format!("sha256:{}", "a".repeat(64));
        // (text, (registry, repository, tag, digest))
        type Parsed<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let cases: [(&str, Parsed); 7] = [
            ("debian", ("docker.io", "library/debian", Some("latest"), None)),
            ("debian:bookworm", ("docker.io", "library/debian", Some("bookworm"), None)),
            ("team/app", ("docker.io", "team/app", Some("latest"), None)),
            ("index.docker.io/library/debian:12", ("docker.io", "library/debian", Some("12"), None)),
            ("registry.example.com/team/app:1.4", ("registry.example.com", "team/app", Some("1.4"), None)),
            ("localhost:5000/a/b__c-d.e", ("localhost:5000", "a/b__c-d.e", Some("latest"), None)),
            ("127.0.0.1:5000/x@DIGEST", ("127.0.0.1:5000", "x", None, Some("DIGEST"))),
        ];
        for (text, (registry, repository, tag, digest)) in cases {
            let text = text.replace("DIGEST", &d);
            let r = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let digest = digest.map(|_| d.as_str());
            assert_eq!(
                (r.registry(), r.repository(), r.tag(), r.digest()),
                (registry, repository, tag, digest),
                "{text}"
            );
        }
        let both = parse(&format!("r.example/x:1@{d}")).unwrap();
        assert_eq!((both.tag(), both.digest()), (Some("1"), Some(d.as_str())));
        for bad in ["", "UPPER/x", "r.example/x:", "r.example/x:t\u{e9}g", "r.example//x", "x@sha256:abc", "-x", "a b"]
        {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&format!("r.example/{}", "a".repeat(256))).is_err());
    }
}
