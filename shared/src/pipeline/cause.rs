//! Why a job failed, as a machine-readable code: an aborting step stores it in its run's
//! failure ([`crate::fsm::Failure::code`]), the job executor decides on it, not on a step
//! name or a message (a job that names what does not exist is dead-lettered; a source that
//! refuses access or holds bad data gives a failed result), and the job's result carries it
//! (`cause`) for schedulers to act on.

use crate::fsm::Failure;
use crate::image::ImageError;
use crate::image::signature::PolicyRefusal;
use crate::store::StoreError;
use crate::volume::VolumeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The job names a family or a version the source does not have.
    NotFound,
    /// The job names a family with an invalid name.
    InvalidName,
    /// The source refused access (HTTP 403): the fleet's permissions, not the job.
    AccessDenied,
    /// The source's data is wrong: a malformed manifest, a missing or corrupt blob, a layer
    /// that breaks the layer rules.
    BadSource,
    /// The source changed while the version was prepared.
    SourceChanged,
    /// This host's disk: full, or read-only.
    HostStorage,
    /// The host is above its refusal watermark: place the job on another host.
    HostFull,
    /// This host is set up so it cannot run the job as asked (a worker not running as root,
    /// without `images.rootless`, given an image whose owners only root can keep).
    HostSetup,
    /// The invocation was released: an invocation id is single use.
    Released,
    /// The invocation's snapshot lost its contents (a `volatile` overlay snapshot after a
    /// reboot): the worker released it; activate a new invocation.
    SnapshotLost,
    /// A release reached a fleet host that never saw its invocation: send it to the host
    /// queue in the activation's result.
    WrongHost,
    /// The family's signature policy requires a signature the version does not have.
    SignatureMissing,
    /// The version's signatures are not valid, or not by a key the policy trusts.
    SignatureInvalid,
    /// The family's signature policy cannot be applied (its source cannot carry signatures).
    PolicyError,
    /// Anything else that retrying does not mend.
    Other,
}

impl Cause {
    /// Every cause, for tests and documentation.
    pub const ALL: [Cause; 15] = [
        Cause::NotFound,
        Cause::InvalidName,
        Cause::AccessDenied,
        Cause::BadSource,
        Cause::SourceChanged,
        Cause::HostStorage,
        Cause::HostFull,
        Cause::HostSetup,
        Cause::Released,
        Cause::SnapshotLost,
        Cause::WrongHost,
        Cause::SignatureMissing,
        Cause::SignatureInvalid,
        Cause::PolicyError,
        Cause::Other,
    ];

    /// The code as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::NotFound => "not_found",
            Cause::InvalidName => "invalid_name",
            Cause::AccessDenied => "access_denied",
            Cause::BadSource => "bad_source",
            Cause::SourceChanged => "source_changed",
            Cause::HostStorage => "host_storage",
            Cause::HostFull => "host_full",
            Cause::HostSetup => "host_setup",
            Cause::Released => "released",
            Cause::SnapshotLost => "snapshot_lost",
            Cause::WrongHost => "wrong_host",
            Cause::SignatureMissing => "signature_missing",
            Cause::SignatureInvalid => "signature_invalid",
            Cause::PolicyError => "policy_error",
            Cause::Other => "other",
        }
    }

    /// The cause a stored code names.
    pub fn parse(code: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The cause a failed run recorded, if its failing step gave one.
    pub fn of_failure(f: &Failure) -> Option<Cause> {
        f.code.as_deref().and_then(Cause::parse)
    }

    /// The cause of an image error.
    pub fn of_image(e: &ImageError) -> Cause {
        match e {
            ImageError::FamilyNotFound { .. } | ImageError::VersionNotFound { .. } => Cause::NotFound,
            ImageError::BadFamilyName(_) => Cause::InvalidName,
            ImageError::AccessDenied { .. } => Cause::AccessDenied,
            ImageError::NoLayers { .. }
            | ImageError::BadManifest { .. }
            | ImageError::BlobMissing { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::DiffIdMismatch { .. }
            | ImageError::Refused { .. }
            | ImageError::Corrupt { .. }
            | ImageError::SourceMisconfigured { .. } => Cause::BadSource,
            ImageError::FamilyChanged { .. } => Cause::SourceChanged,
            ImageError::Io { .. } => Cause::HostStorage,
            ImageError::TooLargeForHost { .. } | ImageError::NoRoomToDownload { .. } => Cause::HostFull,
            ImageError::OwnersNeedRoot { .. } => Cause::HostSetup,
            ImageError::Unavailable { .. } | ImageError::Stopped { .. } => Cause::Other,
            ImageError::Signature(refusal) => match refusal {
                PolicyRefusal::Missing { .. } => Cause::SignatureMissing,
                PolicyRefusal::Invalid { .. } => Cause::SignatureInvalid,
                PolicyRefusal::Policy { .. } => Cause::PolicyError,
            },
        }
    }

    /// The cause of a volume error, if it has one a scheduler can act on.
    pub fn of_volume(e: &VolumeError) -> Option<Cause> {
        match e {
            VolumeError::HostStorage { .. } => Some(Cause::HostStorage),
            VolumeError::Lost { .. } => Some(Cause::SnapshotLost),
            VolumeError::Abort { .. } | VolumeError::Transient { .. } => None,
        }
    }

    /// The cause of a host database error, if it has one a scheduler can act on.
    pub fn of_store(e: &StoreError) -> Option<Cause> {
        match e {
            StoreError::ReadOnly { .. } | StoreError::DiskFull { .. } => Some(Cause::HostStorage),
            StoreError::Locked { .. }
            | StoreError::CannotOpen { .. }
            | StoreError::Corrupt { .. }
            | StoreError::TooNew { .. }
            | StoreError::LeaseLost { .. }
            | StoreError::Invalid { .. }
            | StoreError::Interrupted { .. }
            | StoreError::Sqlite { .. } => None,
        }
    }

    /// Whether the job as written can never succeed (it names what does not exist, or
    /// cannot exist, or an image its family's policy refuses): it is dead-lettered with its
    /// reason.
    pub fn job_is_wrong(self) -> bool {
        matches!(
            self,
            Cause::NotFound
                | Cause::InvalidName
                | Cause::SignatureMissing
                | Cause::SignatureInvalid
                | Cause::PolicyError
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_schema_lists_exactly_these_causes() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../schema/result.schema.json")).unwrap();
        let listed: Vec<&str> =
            schema["properties"]["cause"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let ours: Vec<&str> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(listed, ours);
    }

    #[test]
    fn codes_round_trip_and_only_a_wrong_job_is_dead_lettered() {
        for cause in Cause::ALL {
            assert_eq!(Cause::parse(cause.as_str()), Some(cause));
        }
        let source = "s3://images/prod".to_owned();
        let cases = [
            (
                ImageError::FamilyNotFound { family: "web".into(), source_desc: source.clone(), detail: String::new() },
                true,
            ),
            (ImageError::BadFamilyName("../web".into()), true),
            (ImageError::AccessDenied { source_desc: source.clone(), detail: "HTTP 403".into() }, false),
            (
                ImageError::BadManifest { family: "web".into(), source_desc: source.clone(), detail: String::new() },
                false,
            ),
            (ImageError::Unavailable { source_desc: source, detail: "timeout".into() }, false),
            (
                ImageError::Signature(PolicyRefusal::Invalid {
                    family: "web".into(),
                    digest: "sha256:00".into(),
                    detail: "not signed by any trusted key".into(),
                }),
                true,
            ),
        ];
        for (e, dead_letter) in cases {
            assert_eq!(Cause::of_image(&e).job_is_wrong(), dead_letter, "{e}");
        }
    }
}
