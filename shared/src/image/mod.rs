//! Images: where layer blobs come from, how a family resolves to its manifest, the per-host
//! blob cache, and applying layers to a directory tree.
//!
//! Parsing and verification (`layout`, `digest`) are apart from writing to disk (`cache`,
//! `apply`). Errors say whether a retry can help: corrupt or hostile input never.

mod apply;
mod cache;
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
mod digest;
mod error;
mod feed;
mod layout;
mod memo;
mod publish;
mod registry;
mod s3;
mod sample;
pub mod signature;
mod source;
#[cfg(any(test, feature = "test-support"))]
pub mod testregistry;

pub use apply::{
    ApplyOptions, ApplyStats, DevicePolicy, apply_layer, apply_layer_from, apply_layer_reporting, running_as_root,
};
pub use cache::{BlobCache, TeeError};
pub use digest::{Digest, Hasher};
pub use error::ImageError;
pub use feed::{FEED_CHUNK, Feed, FeedReader};
pub use layout::{
    FamilyFile, FamilyLayer, LayerDesc, MEDIA_TAR, Manifest, family_file_path, is_listed, validate_family,
};
pub use memo::{DigestMemo, FileIdentity, SETTLE as DIGEST_MEMO_SETTLE};
pub use publish::{MULTIPART_THRESHOLD, PublishReport, publish};
pub use registry::{
    CredentialStore, EcrLogins, FAMILY_PLACEHOLDER, HttpOptions as RegistryHttpOptions, Platform, RegistryOptions,
    RegistrySource, RegistryTemplate, default_docker_config, is_registry_reference,
};
pub use s3::{S3Source, parse_s3_url};
pub use sample::write_sample_family;
pub use source::{BlobSource, BlobStream, LocalDir};
