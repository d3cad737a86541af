//! Image errors: each says whether retrying can help (`is_retryable`). A corrupt or
//! hostile blob is never retryable; an I/O error on our side is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error(
        "image family name {} is invalid: use 1 to 128 letters, digits, '.', '_' and '-', not starting with '.'",
        crate::quote::quote(.0)
    )]
    BadFamilyName(String),
    #[error("image family {family} not found in {source_desc}: {detail}")]
    FamilyNotFound { family: String, source_desc: String, detail: String },
    #[error(
        "version {digest} of image family {family} is not in {source_desc} ({detail}); pin a version the source has, or leave the digest out to use the family's current version"
    )]
    VersionNotFound { family: String, digest: String, source_desc: String, detail: String },
    #[error(
        "image family {family} changed at {source_desc} while version {was} was being prepared (now {now}): its files were rewritten meanwhile, perhaps by a publish in progress. A family listed from its files is only as atomic as its writer (`enqueue publish` writes a manifest object instead); the next prepare takes the version then current"
    )]
    FamilyChanged { family: String, source_desc: String, was: String, now: String },
    #[error("image family {family} in {source_desc} has no layers")]
    NoLayers { family: String, source_desc: String },
    #[error("the manifest of {family} in {source_desc} is malformed: {detail}")]
    BadManifest { family: String, source_desc: String, detail: String },
    #[error("blob {digest} from {source_desc} is missing or not readable: {detail}")]
    BlobMissing { digest: String, source_desc: String, detail: String },
    #[error("{source_desc} is set up wrong: {detail}")]
    SourceMisconfigured { source_desc: String, detail: String },
    #[error("{source_desc} is unavailable: {detail}")]
    Unavailable { source_desc: String, detail: String },
    #[error(
        "{source_desc} refused access ({detail}): the worker's credentials may not read it (on S3: s3:GetObject and s3:ListBucket on the bucket)"
    )]
    AccessDenied { source_desc: String, detail: String },
    #[error(
        "blob {digest} from {source_desc} does not match its digest (its content hashes to {actual}); the source is corrupt or changed"
    )]
    DigestMismatch { digest: String, actual: String, source_desc: String },
    #[error(
        "layer {layer}: its uncompressed content hashes to {actual}, but the image config's rootfs.diff_ids names {expected}: the image is inconsistent (a corrupt or altered config or layer); nothing of this version was sealed: publish the image again"
    )]
    DiffIdMismatch { layer: String, expected: String, actual: String },
    #[error("layer {layer}: entry {entry:?} refused: {rule}")]
    Refused { layer: String, entry: String, rule: String },
    #[error(
        "host full: layer {layer}: entry {entry:?} would take the volumes past the refusal watermark (capacity.refuse_percent; {room} bytes were left below it); the layer was refused before filling the disk: free space, or prepare it on a host with more room"
    )]
    TooLargeForHost { layer: String, entry: String, room: u64 },
    #[error(
        "host full: image family {family}: its layers need {need} more bytes in the blob cache {}, whose filesystem has {room} bytes left below the refusal watermark (capacity.refuse_percent); refused before downloading: free space, or prepare it on a host with more room",
        cache.display()
    )]
    NoRoomToDownload { family: String, cache: PathBuf, need: u64, room: u64 },
    #[error(
        "layer {layer}: entry {entry:?} is owned by {owner}, and this worker runs as {me}, not root, so it cannot keep that owner; run the worker as root, or set images.rootless = true to apply such images owned by this user with their setuid/setgid bits removed"
    )]
    OwnersNeedRoot { layer: String, entry: String, owner: String, me: String },
    #[error(
        "layer {layer}: stopped after {entries} entries (the run was stopped; it is applied again from its first entry when the run resumes)"
    )]
    Stopped { layer: String, entries: u64 },
    #[error("layer {layer} is truncated or corrupt: {detail}")]
    Corrupt { layer: String, detail: String },
    /// The family's signature policy refuses the version (`image/signature`).
    #[error(transparent)]
    Signature(#[from] super::signature::PolicyRefusal),
    // The cause is in the message, and not also a `source()`: `{:#}` would print it twice.
    #[error("{context} {path}: {error}", path = path.display())]
    Io { context: String, path: PathBuf, error: std::io::Error },
}

impl ImageError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            // A full or read-only disk does not heal by retrying at once: fail the run with
            // the reason (a later job starts it again, reusing the half-built base).
            // Nor does a call the host forbids (a system-call filter, permissions).
            Self::Io { error, .. } => !matches!(
                error.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::ENOSYS | libc::EPERM | libc::EACCES)
            ),
            Self::Unavailable { .. } | Self::Stopped { .. } => true,
            // The request or the image is wrong, or the host lacks room or rights: the same
            // call fails the same way until someone changes something.
            Self::BadFamilyName(_)
            | Self::FamilyNotFound { .. }
            | Self::VersionNotFound { .. }
            | Self::FamilyChanged { .. }
            | Self::NoLayers { .. }
            | Self::BadManifest { .. }
            | Self::BlobMissing { .. }
            | Self::SourceMisconfigured { .. }
            | Self::AccessDenied { .. }
            | Self::DigestMismatch { .. }
            | Self::DiffIdMismatch { .. }
            | Self::Refused { .. }
            | Self::TooLargeForHost { .. }
            | Self::NoRoomToDownload { .. }
            | Self::OwnersNeedRoot { .. }
            | Self::Signature(_)
            | Self::Corrupt { .. } => false,
        }
    }

    pub(crate) fn io(context: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), path: path.into(), error: source }
    }
}

/// An error and its sources, each said once, joined by ": " (an SDK's or an HTTP client's own
/// Display says only "dispatch failure" or "error sending request"; its Debug says far too much).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}
