//! The job message: the wire format upstream schedulers post (published as a JSON Schema in
//! `schema/job.v1.schema.json`, with examples), its validation, and the result message.
//!
//! `{"v":1,"kind":"prepare"|"activate"|"release","family":"web","invocation_id":"inv-1","reply_to":"results"}`
//!
//! Version 2 (`schema/job.v2.schema.json`) adds two optional fields: `digest` pins a version
//! of the family (a manifest digest) for `prepare` and `activate`, and `ttl_secs` lets the
//! worker release an `activate`'s snapshot by itself after that long. A version 1 message
//! means the same as it did; workers of this release accept both.
//!
//! `v` lets the format evolve: a worker accepts the versions it knows and dead-letters the
//! others with a reason naming the versions it accepts. Unknown fields are refused, so a
//! misspelt field is an error, not a silent default.

use serde::{Deserialize, Serialize};

use crate::image::{Digest, validate_family};
use crate::quote::{quote, shorten};

/// Message versions this build understands.
pub const SUPPORTED_VERSIONS: &[u32] = &[1, 2];

/// The longest `ttl_secs` accepted (a year): anything longer is a mistake, not a lease.
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Prepare,
    Activate,
    Release,
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobKind::Prepare => "prepare",
            JobKind::Activate => "activate",
            JobKind::Release => "release",
        })
    }
}

/// A validated job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub v: u32,
    pub kind: JobKind,
    pub family: String,
    /// Required for `activate` and `release`: the activation's identity. A redelivered
    /// message with the same id resumes, never duplicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
    /// Queue to send the result to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Version 2: the family version to use (`sha256:<64 hex>`, a manifest digest). Without
    /// it, `prepare` takes the source's current version and `activate` the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Version 2, `activate` only: the worker releases the snapshot after this many seconds
    /// if no `release` came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Why a message is not a valid job (the dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidJob(pub String);

/// The largest job message accepted (SQS's own limit is 256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

impl Job {
    pub fn new(kind: JobKind, family: &str, invocation_id: Option<&str>) -> Job {
        Job {
            v: 1,
            kind,
            family: family.to_owned(),
            invocation_id: invocation_id.map(str::to_owned),
            reply_to: None,
            digest: None,
            ttl_secs: None,
        }
    }

    /// The lowest message version that can carry this job's fields.
    pub fn versioned(mut self) -> Job {
        self.v = if self.digest.is_some() || self.ttl_secs.is_some() { 2 } else { 1 };
        self
    }

    /// Parses and validates a message body.
    pub fn parse(body: &str) -> Result<Job, InvalidJob> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(InvalidJob(format!(
                "the message is {} bytes; a job message is at most {MAX_MESSAGE_BYTES} bytes",
                body.len()
            )));
        }
        let value: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| InvalidJob(format!("the message is not JSON: {}", shorten(&e.to_string(), 300))))?;
        let v = value.get("v").and_then(serde_json::Value::as_u64);
        match v {
            None => return Err(InvalidJob("field \"v\" (the message version) is missing or not a number".into())),
            Some(v) if !SUPPORTED_VERSIONS.contains(&(v as u32)) => {
                return Err(InvalidJob(format!(
                    "message version {v} is not supported; this worker accepts {SUPPORTED_VERSIONS:?}"
                )));
            }
            Some(_) => {}
        }
        let job: Job = serde_json::from_value(value)
            .map_err(|e| InvalidJob(format!("invalid job: {}", shorten(&e.to_string(), 300))))?;
        job.validate()?;
        Ok(job)
    }

    pub fn validate(&self) -> Result<(), InvalidJob> {
        validate_family(&self.family).map_err(|e| InvalidJob(e.to_string()))?;
        match (&self.kind, &self.invocation_id) {
            (JobKind::Activate | JobKind::Release, None) => {
                return Err(InvalidJob(format!("a {} job needs an invocation_id", self.kind)));
            }
            (_, Some(id)) if !valid_id(id) => {
                return Err(InvalidJob(format!(
                    "invocation_id {} is invalid: use 1 to 128 letters, digits, '.', '_' or '-'",
                    quote(id)
                )));
            }
            _ => {}
        }
        if let Some(r) = &self.reply_to
            && (r.is_empty() || r.len() > 1024)
        {
            return Err(InvalidJob("reply_to is empty or longer than 1024 bytes".into()));
        }
        let new_fields: Vec<&str> = [("digest", self.digest.is_some()), ("ttl_secs", self.ttl_secs.is_some())]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
        if self.v < 2 && !new_fields.is_empty() {
            return Err(InvalidJob(format!(
                "field(s) {} need message version 2: send \"v\":2 (and upgrade workers before schedulers send it)",
                new_fields.join(", ")
            )));
        }
        if let Some(d) = &self.digest {
            if self.kind == JobKind::Release {
                return Err(InvalidJob(
                    "a release job takes no digest: it releases the invocation's snapshot, whatever its version".into(),
                ));
            }
            Digest::parse(d).map_err(|_| {
                InvalidJob(format!(
                    "digest {} is not a manifest digest: use sha256:<64 lowercase hex digits>",
                    quote(d)
                ))
            })?;
        }
        match self.ttl_secs {
            Some(_) if self.kind != JobKind::Activate => {
                return Err(InvalidJob(format!("ttl_secs applies to activate jobs only, not {}", self.kind)));
            }
            Some(t) if t == 0 || t > MAX_TTL_SECS => {
                return Err(InvalidJob(format!("ttl_secs {t} is out of range: use 1 to {MAX_TTL_SECS} seconds")));
            }
            _ => {}
        }
        Ok(())
    }

    /// The pinned version, if the job names one (valid after `validate`).
    pub fn pinned(&self) -> Option<Digest> {
        self.digest.as_deref().and_then(|d| Digest::parse(d).ok())
    }

    /// The run id of the durable run this job drives.
    pub fn run_id(&self) -> String {
        match self.kind {
            // Until the version is resolved, the family's runs are named by their prefix.
            JobKind::Prepare => match &self.digest {
                Some(d) => prepare_run_id(&self.family, d),
                None => format!("prepare-{}", self.family),
            },
            JobKind::Activate => activate_run_id(self.invocation_id.as_deref().unwrap_or_default()),
            JobKind::Release => release_run_id(self.invocation_id.as_deref().unwrap_or_default()),
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `prepare-<family>@<first 12 hex digits of the version's digest>`.
pub fn prepare_run_id(family: &str, digest: &str) -> String {
    format!("prepare-{family}@{}", crate::store::short_digest(digest))
}

/// The run of a release before versions existed: `prepare-<family>`.
pub fn legacy_prepare_run_id(family: &str) -> String {
    format!("prepare-{family}")
}

pub fn retire_run_id(base_vol_id: u64) -> String {
    format!("retire-base-{base_vol_id}")
}

pub fn activate_run_id(invocation_id: &str) -> String {
    format!("activate-{invocation_id}")
}

pub fn release_run_id(invocation_id: &str) -> String {
    format!("release-{invocation_id}")
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Outcome of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Succeeded,
    Failed,
}

/// The result message sent to `reply_to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// The queue's message id of the job.
    pub job_id: String,
    pub kind: JobKind,
    pub family: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
    pub status: JobStatus,
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_vol_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a failed job failed, as a code (`pipeline::Cause`: `not_found`, `access_denied`,
    /// `host_full`, `released`, ...), when one applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// What a successful job did when it was not the obvious (a release of an invocation
    /// that had no snapshot, or that was already released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Device nodes the image's layers carried that its prepare did not create
    /// (`images.devices = "skip"`); only on the job that ran the prepare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices_skipped: Option<u64>,
    /// Under `images.rootless` (a worker not running as root): entries owned by other users
    /// that the prepare applied owned by the worker's user, and how many of them lost their
    /// setuid/setgid bits; only on the job that ran the prepare, and only when not zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owners_dropped: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setid_stripped: Option<u64>,
    /// The version (manifest digest) of the base the job prepared or its snapshot came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Where that version lives, for a registry source: `registry/repository@sha256:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The host that ran the job (`worker.host_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    /// The queue that reaches that host alone (`worker.host_queue_url`): where anything
    /// about this invocation goes next, its release included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_queue: Option<String>,
}

/// One line for people: `<kind> <run id> [on <host>] ok: <what>` or `... FAILED: <error>`.
impl std::fmt::Display for JobResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ", self.kind, self.run_id)?;
        if let Some(host) = &self.host_id {
            write!(f, "on {host} ")?;
        }
        if let (JobStatus::Failed, Some(e)) = (self.status, &self.error) {
            return write!(f, "FAILED: {e}");
        }
        if self.status == JobStatus::Failed {
            return f.write_str("FAILED");
        }
        f.write_str("ok")?;
        // The invocation is what its release names: said, not left to be read out of the run id.
        if let (JobKind::Activate, Some(inv)) = (self.kind, &self.invocation_id) {
            write!(f, " (invocation {inv})")?;
        }
        match (&self.snapshot_path, &self.detail, self.base_vol_id) {
            (Some(path), _, _) => write!(f, ": {path}")?,
            (None, Some(detail), _) => write!(f, ": {detail}")?,
            (None, None, Some(base)) => write!(f, ": base-{base}")?,
            (None, None, None) => {}
        }
        match &self.digest {
            Some(d) if self.kind != JobKind::Release => write!(f, " (version {d})"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_activation_result_names_its_invocation() {
        let r: JobResult = serde_json::from_value(serde_json::json!({
            "job_id": "7", "kind": "activate", "family": "web", "invocation_id": "inv-1712",
            "status": "succeeded", "run_id": "activate-inv-1712", "snapshot_path": "/v/snap-3", "host_id": "h1"
        }))
        .unwrap();
        assert_eq!(r.to_string(), "activate activate-inv-1712 on h1 ok (invocation inv-1712): /v/snap-3");
    }

    #[test]
    fn the_published_examples_are_valid_jobs() {
        for (name, body) in [
            ("prepare", include_str!("../../schema/examples/prepare.json")),
            ("activate", include_str!("../../schema/examples/activate.json")),
            ("release", include_str!("../../schema/examples/release.json")),
            ("activate", include_str!("../../schema/examples/activate-pinned.v2.json")),
            ("prepare", include_str!("../../schema/examples/prepare-pinned.v2.json")),
        ] {
            let job = Job::parse(body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(job.kind.to_string(), name);
        }
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let cases = [
            ("not json", "not JSON"),
            ("{}", "\"v\""),
            (r#"{"v":3,"kind":"prepare","family":"web"}"#, "version 3 is not supported"),
            (r#"{"v":1,"kind":"activate","family":"web","invocation_id":"a","ttl_secs":5}"#, "need message version 2"),
            (r#"{"v":2,"kind":"activate","family":"web","invocation_id":"a","digest":"sha256:12"}"#, "digest"),
            (r#"{"v":2,"kind":"release","family":"web","invocation_id":"a","digest":"sha256:12"}"#, "takes no digest"),
            (r#"{"v":2,"kind":"prepare","family":"web","ttl_secs":5}"#, "activate jobs only"),
            (r#"{"v":2,"kind":"activate","family":"web","invocation_id":"a","ttl_secs":0}"#, "out of range"),
            (r#"{"v":1,"kind":"explode","family":"web"}"#, "unknown variant `explode`"),
            (r#"{"v":1,"kind":"prepare"}"#, "missing field `family`"),
            (r#"{"v":1,"kind":"prepare","family":"../etc"}"#, "family name"),
            (r#"{"v":1,"kind":"activate","family":"web"}"#, "needs an invocation_id"),
            (r#"{"v":1,"kind":"activate","family":"web","invocation_id":"a/b"}"#, "invocation_id"),
            (r#"{"v":1,"kind":"prepare","family":"web","familly":"x"}"#, "unknown field `familly`"),
            (r#"{"v":1,"kind":"prepare","family":7}"#, "invalid type"),
        ];
        // Over-long input is quoted short; the explanation stays.
        let long = format!(r#"{{"v":1,"kind":"prepare","family":"{}"}}"#, "f".repeat(5000));
        let err = Job::parse(&long).unwrap_err();
        assert!(err.0.len() < 300 && err.0.contains("(5000 bytes) is invalid: use 1 to 128 letters"), "{err}");
        let long = format!(r#"{{"v":1,"kind":"{}","family":"web"}}"#, "k".repeat(5000));
        let err = Job::parse(&long).unwrap_err();
        assert!(err.0.len() < 400 && err.0.contains("expected one of `prepare`"), "{err}");
        for (body, expect) in cases {
            let err = Job::parse(body).unwrap_err();
            assert!(err.0.contains(expect), "{body}: {err}");
        }
    }

    #[test]
    fn the_published_result_example_is_a_result() {
        let r: JobResult = serde_json::from_str(include_str!("../../schema/examples/result-activate.json")).unwrap();
        assert_eq!((r.host_id.as_deref(), r.status), (Some("worker-eu1-017"), JobStatus::Succeeded));
        assert!(r.host_queue.unwrap().ends_with("thinpipe-worker-eu1-017"));
    }

    #[test]
    fn run_ids_are_deterministic() {
        let j = Job::new(JobKind::Activate, "web", Some("inv-1"));
        assert_eq!(j.run_id(), "activate-inv-1");
        assert_eq!(Job::new(JobKind::Prepare, "web", None).run_id(), "prepare-web");
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(prepare_run_id("web", &d), "prepare-web@abababababab");
        assert_eq!(Job::parse(&j.to_json()).unwrap(), j);
    }
}
