//! The worker's configuration: one TOML file with every setting; each setting can be
//! overridden by an environment variable `THINPIPE_<SECTION>_<KEY>` (upper case, dots as
//! underscores: `queue.name` → `THINPIPE_QUEUE_NAME`) and by a flag `--set queue.name=jobs`.
//! Precedence: flag > environment > file > default. Unknown keys are errors.
//!
//! This file holds the settings, their defaults and what follows from them; `sources.rs`
//! reads them from the file, the environment and the flags.

mod sources;

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use thinpipe::image::DevicePolicy;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Everything the worker keeps: run log, host database, blob cache, embedded queue.
    pub state_dir: PathBuf,
    /// Where image families come from: `dir:<path>` (or a bare path) or `s3://bucket/prefix`,
    /// holding `images/<family>/` or an OCI layout; or a registry reference
    /// (`registry.example.com/team/{family}:stable`, `docker.io/library/debian:bookworm`,
    /// `docker://…`). Default: the state directory.
    pub source: String,
    /// Volume backend: `auto` (the default: the fastest this host supports, see
    /// `host::choose_backend`), `dir` (plain directories, no root), `overlay` (an overlayfs
    /// mount per snapshot; root), `btrfs` (subvolumes and O(1) snapshots; root, and
    /// `volumes_dir` on a btrfs filesystem) or `dmthin` (thin devices of the device-mapper
    /// pool `dmthin.pool`; root; production hosts).
    pub backend: BackendKind,
    /// Where the backend keeps bases and snapshots (for `dmthin`: mount points, seal
    /// markers and device nodes). Default: `<state_dir>/volumes`.
    pub volumes_dir: String,
    pub dmthin: DmThinConfig,
    pub overlay: OverlayConfig,
    /// `text` or `json`.
    pub log_format: LogFormat,
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    pub images: ImagesConfig,
    pub engine: EngineSettings,
    pub capacity: CapacityConfig,
    pub gc: GcConfig,
    pub activations: ActivationsConfig,
    pub aws: AwsConfig,
    pub registry: RegistryConfig,
    pub admin: AdminConfig,
}

/// The registry source (`source` naming a registry reference).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Docker's `config.json` to take logins from (`auths`, `credHelpers`, `credsStore`).
    /// Default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: String,
    /// A PEM file of CA certificates trusted beside the system's (a private registry's CA).
    pub ca_file: String,
    /// Registries (`host:port`) spoken to over plain HTTP, as Docker's insecure-registries.
    pub plain_http: Vec<String>,
    /// The image of a multi-architecture index to take, `os/arch[/variant]`; default: this
    /// host's.
    pub platform: String,
    /// How long one registry call retries 429s (after their `Retry-After`), 5xx and broken
    /// connections before the step fails and the engine's retry takes over.
    pub retry_secs: u64,
    /// Registries (`host:port`) beyond ECR's own `<account>.dkr.ecr.<region>.amazonaws.com`
    /// names that take ECR logins (GetAuthorizationToken through the AWS credential chain).
    pub ecr_hosts: Vec<String>,
    /// The signature policy (TOML: a rule per family, `none` or `cosign` with its public
    /// keys; README "Signature policy"). Read at start: rotating keys is editing it and
    /// restarting. Empty: no family requires a signature.
    pub policy_file: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            docker_config: String::new(),
            ca_file: String::new(),
            plain_http: Vec::new(),
            platform: String::new(),
            retry_secs: 60,
            ecr_hosts: Vec::new(),
            policy_file: String::new(),
        }
    }
}

impl RegistryConfig {
    /// The signature policy, read from `policy_file` (none if unset).
    pub fn policy(&self) -> anyhow::Result<thinpipe::image::signature::SignaturePolicy> {
        match self.policy_file.as_str() {
            "" => Ok(thinpipe::image::signature::SignaturePolicy::none()),
            path => thinpipe::image::signature::SignaturePolicy::load(std::path::Path::new(path))
                .map_err(|e| anyhow::anyhow!("registry.policy_file: {e}")),
        }
    }

    /// The source's options; reads the CA file, so a missing one is named here.
    pub fn options(&self) -> anyhow::Result<thinpipe::image::RegistryOptions> {
        let ca_pem = match self.ca_file.as_str() {
            "" => None,
            path => Some(std::fs::read(path).with_context(|| format!("registry.ca_file: reading {path}"))?),
        };
        let platform = match self.platform.as_str() {
            "" => None,
            p => Some(thinpipe::image::Platform::parse(p).map_err(|e| anyhow::anyhow!("registry.platform: {e}"))?),
        };
        let docker_config = match self.docker_config.as_str() {
            "" => thinpipe::image::default_docker_config(),
            path => Some(PathBuf::from(path)),
        };
        Ok(thinpipe::image::RegistryOptions {
            http: thinpipe::image::RegistryHttpOptions {
                ca_pem,
                plain_http: self.plain_http.clone(),
                retry_for: std::time::Duration::from_secs(self.retry_secs),
            },
            docker_config,
            platform,
            // Filled in by the host, which has the AWS configuration.
            ecr: None,
        })
    }
}

/// Watermarks on the volume storage's usage (dm-thin: the pool's data; btrfs and dir: the
/// volumes filesystem), as kubelet's image GC has them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// Above this, garbage is collected and unused families evicted (least recently used
    /// first) until usage is below `low_percent`.
    pub high_percent: f64,
    pub low_percent: f64,
    /// Above this, new prepares and activations fail with "host full" (and `/readyz` says so).
    pub refuse_percent: f64,
    /// dm-thin: refuse above this much of the pool's metadata.
    pub refuse_metadata_percent: f64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        let w = thinpipe::lifecycle::Watermarks::default();
        Self {
            high_percent: w.high_percent,
            low_percent: w.low_percent,
            refuse_percent: w.refuse_percent,
            refuse_metadata_percent: w.refuse_metadata_percent,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Garbage collection and activation expiry run this often (and after a new version
    /// becomes current, and after releases).
    pub interval_secs: u64,
    /// A version that was never its family's current one (prepared for a pinned activation,
    /// or whose job has not switched to it yet) is kept this long after it was prepared or
    /// last used. Capacity eviction does not wait for it.
    pub grace_secs: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        let s = thinpipe::lifecycle::Settings::default();
        Self { interval_secs: s.interval.as_secs(), grace_secs: s.grace.as_secs() }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivationsConfig {
    /// Live snapshots older than this are released by the worker (0: never). An activate
    /// job's `ttl_secs` sets a deadline for its own snapshot.
    pub max_age_secs: u64,
}

/// The `dmthin` backend: the thin pool the host setup created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmThinConfig {
    /// The pool's device-mapper name (LVM names it `<vg>-<lv>-tpool`).
    pub pool: String,
    /// Virtual size of each base and snapshot, in bytes (never shrink it while bases exist).
    pub volume_bytes: u64,
}

impl Default for DmThinConfig {
    fn default() -> Self {
        Self { pool: String::new(), volume_bytes: 10 << 30 }
    }
}

/// The `overlay` backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlayConfig {
    /// Mount snapshots `volatile` (their writes are never synced): faster for scratch
    /// invocations, but a snapshot that loses its mount (a reboot) is released with the cause
    /// `snapshot_lost` instead of being mounted again. Applies to snapshots made from now on.
    pub volatile: bool,
    /// Limit each snapshot's writes to this many bytes (0: no limit). Needs `volumes_dir` on
    /// XFS mounted with `prjquota` (a project quota per snapshot); refused at start elsewhere.
    pub snapshot_bytes: u64,
}

/// The admin HTTP API and the inspector page (daemon only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on; empty disables the API. Port 0 picks a free port; the address
    /// in use is written to `<state_dir>/admin.addr`.
    pub listen: String,
    /// Allow a non-loopback `listen` (then `token` is required).
    pub allow_public: bool,
    /// Bearer token required by every endpoint but `/healthz` and the page's files.
    pub token: String,
    /// Link from a run to its trace, `{trace_id}` replaced: e.g.
    /// `http://jaeger:16686/trace/{trace_id}`. Empty shows the trace id as text.
    pub trace_url: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9185".into(), allow_public: false, token: String::new(), trace_url: String::new() }
    }
}

impl AdminConfig {
    /// The address to listen on, checked against the rules: loopback unless `allow_public`,
    /// and then only with a `token`.
    pub fn listen_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        let listen = &self.listen;
        let addr: std::net::SocketAddr = listen
            .parse()
            .with_context(|| format!("admin.listen {listen:?} is not an address such as 127.0.0.1:9185"))?;
        if !addr.ip().is_loopback() {
            if !self.allow_public {
                bail!(
                    "admin.listen {addr} is not a loopback address: set admin.allow_public=true and admin.token to expose the admin API"
                );
            }
            if self.token.is_empty() {
                bail!("admin.listen {addr} is public: set admin.token (clients send it as a bearer token)");
            }
        }
        Ok(addr)
    }
}

/// AWS access for SQS and S3. Credentials and region come from the standard chain
/// (environment, profile, instance role); `AWS_ENDPOINT_URL[_SQS|_S3]` are honoured too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Endpoint for every AWS service (a local server); empty: AWS itself.
    pub endpoint: String,
    /// Region if the environment names none (then `us-east-1`).
    pub region: String,
    /// Unsigned requests (public buckets).
    pub anonymous: bool,
    /// Path-style S3 addressing (local servers).
    pub s3_path_style: bool,
    /// Limit on connecting to AWS.
    pub connect_timeout_secs: u64,
    /// Limit on the first byte of an AWS response.
    pub read_timeout_secs: u64,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: String::new(),
            anonymous: false,
            s3_path_style: false,
            connect_timeout_secs: 5,
            read_timeout_secs: 30,
        }
    }
}

impl AwsConfig {
    pub fn options(&self) -> thinpipe::aws::AwsOptions {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        thinpipe::aws::AwsOptions {
            endpoint: some(&self.endpoint),
            region: some(&self.region),
            anonymous: self.anonymous,
            s3_path_style: self.s3_path_style,
            static_credentials: None,
            connect_timeout: Some(std::time::Duration::from_secs(self.connect_timeout_secs)),
            read_timeout: Some(std::time::Duration::from_secs(self.read_timeout_secs)),
        }
    }
}

/// The volume backend (`backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Chosen at start-up: the one the host's volumes were made with, else the fastest the
    /// host supports.
    Auto,
    Dir,
    Overlay,
    Btrfs,
    Dmthin,
}

/// Where jobs come from (`queue.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    Embedded,
    Sqs,
}

/// How log lines are written (`log_format`): the telemetry setup's own type.
pub use thinpipe::telemetry::LogFormat;

/// The names the settings take, for messages and for the telemetry setup.
macro_rules! names {
    ($($t:ty { $($v:ident => $n:literal),* })*) => {$(
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $n),* }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
names! {
    BackendKind { Auto => "auto", Dir => "dir", Overlay => "overlay", Btrfs => "btrfs", Dmthin => "dmthin" }
    QueueKind { Embedded => "embedded", Sqs => "sqs" }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `embedded` (SQLite, one machine) or `sqs`.
    pub kind: QueueKind,
    /// SQS: the URL of the queue jobs are received from.
    pub url: String,
    /// SQS: further queues received from at the same time, e.g. a fleet-wide queue beside
    /// the host's own. From text (environment, `--set`): comma-separated.
    pub extra_urls: Vec<String>,
    /// SQS: the dead-letter queue's URL; empty leaves invalid messages to the queue's
    /// redrive policy.
    pub dead_letter_url: String,
    /// The embedded queue's file. Default: `<state_dir>/queue.db`.
    pub path: String,
    /// The queue jobs are received from.
    pub name: String,
    /// Where invalid jobs go, with their reason.
    pub dead_letter: String,
    /// How long a received job stays invisible before a heartbeat must extend it.
    pub visibility_timeout_secs: u64,
    /// Deliveries after which the queue itself dead-letters a message.
    pub max_receives: u32,
    /// Long-poll wait per receive.
    pub wait_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Jobs run at once.
    pub concurrency: usize,
    /// On SIGTERM, how long in-flight jobs may take before their messages are released.
    pub drain_deadline_secs: u64,
    /// TTL of the per-family prepare lease and of the worker's own lease (renewed at a third).
    pub lease_ttl_secs: u64,
    /// A job that failed transiently becomes visible again after this long.
    pub retry_delay_secs: u64,
    /// When another worker holds the state directory: false refuses at once, naming the
    /// holder; true waits until its lease expires (it died or hangs) and its run log is
    /// free, then takes over.
    pub wait_for_state: bool,
    /// This host's name in every result, snapshot record, trace and log line (default: the
    /// machine's hostname).
    pub host_id: String,
    /// The queue that reaches this host alone, named in every result so a scheduler sends
    /// an invocation's release there (default: `queue.url` for SQS).
    pub host_queue_url: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Total file bytes one layer may write.
    pub max_layer_bytes: u64,
    /// Device nodes in layers (`dev/console`, ... of bootstrap-made images): `skip` (counted
    /// and named in one warning), `create` (needs root) or `refuse` (the prepare fails).
    pub devices: DevicePolicy,
    /// The older switch: `true` means `devices = "create"`.
    pub allow_devices: bool,
    /// A blob download that yields no data this long fails (and is retried).
    pub stall_timeout_secs: u64,
    /// For a worker that does not run as root: apply images whose entries belong to other
    /// users owned by the worker's user, with setuid/setgid bits removed (counted in the
    /// prepare's result). Without it such an image is refused (`cause: host_setup`). As root,
    /// owners are always kept and this changes nothing.
    pub rootless: bool,
    /// Download and verify every blob of a version into the cache before applying any
    /// (the order before streamed prepare): no unverified byte is ever written, even to the
    /// unsealed base, and a prepare takes the sum of download and unpack instead of the
    /// longer of the two. The default applies each layer as it arrives and seals nothing
    /// before every digest matched.
    pub verify_before_unpack: bool,
    /// Layers downloaded at once while a version is prepared, the earliest first.
    pub parallel_downloads: usize,
    /// MiB of one layer held in memory ahead of the unpacker; a download that far ahead
    /// waits. Peak memory for reading ahead: `parallel_downloads` x this.
    pub read_ahead_mib: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Finished runs are pruned after this many days; unfinished ones never are.
    pub retention_days: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(".thinpipe"),
            source: String::new(),
            backend: BackendKind::Auto,
            volumes_dir: String::new(),
            dmthin: DmThinConfig::default(),
            overlay: OverlayConfig::default(),
            log_format: LogFormat::Text,
            queue: QueueConfig::default(),
            worker: WorkerConfig::default(),
            images: ImagesConfig::default(),
            engine: EngineSettings::default(),
            capacity: CapacityConfig::default(),
            gc: GcConfig::default(),
            activations: ActivationsConfig::default(),
            aws: AwsConfig::default(),
            registry: RegistryConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            kind: QueueKind::Embedded,
            url: String::new(),
            extra_urls: Vec::new(),
            dead_letter_url: String::new(),
            path: String::new(),
            name: "jobs".into(),
            dead_letter: "jobs-dlq".into(),
            visibility_timeout_secs: 60,
            max_receives: 5,
            wait_secs: 20,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            drain_deadline_secs: 60,
            lease_ttl_secs: 30,
            retry_delay_secs: 10,
            wait_for_state: false,
            host_id: String::new(),
            host_queue_url: String::new(),
        }
    }
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            max_layer_bytes: 64 << 30,
            devices: DevicePolicy::Skip,
            allow_devices: false,
            stall_timeout_secs: 60,
            rootless: false,
            verify_before_unpack: false,
            parallel_downloads: 3,
            read_ahead_mib: 2,
        }
    }
}

impl ImagesConfig {
    /// How `prepare` moves a version's bytes.
    pub fn prepare_settings(&self) -> thinpipe::pipeline::PrepareSettings {
        thinpipe::pipeline::PrepareSettings {
            verify_before_unpack: self.verify_before_unpack,
            parallel_downloads: self.parallel_downloads,
            read_ahead_chunks: self.read_ahead_mib * ((1 << 20) / thinpipe::image::FEED_CHUNK),
        }
    }

    /// What device nodes become, `allow_devices` included.
    pub fn device_policy(&self) -> DevicePolicy {
        if self.allow_devices { DevicePolicy::Create } else { self.devices }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { retention_days: 7 }
    }
}

impl Config {
    fn resolve_paths(&mut self) {
        if self.state_dir.is_relative()
            && let Ok(cwd) = std::env::current_dir()
        {
            self.state_dir = cwd.join(&self.state_dir);
        }
        let state = self.state_dir.clone();
        if self.source.is_empty() {
            // Flat families then live in <state_dir>/images/<family>/.
            self.source = format!("dir:{}", state.display());
        }
        if self.volumes_dir.is_empty() {
            self.volumes_dir = state.join("volumes").display().to_string();
        }
        if self.queue.path.is_empty() {
            self.queue.path = state.join("queue.db").display().to_string();
        }
        if self.worker.host_id.is_empty() {
            // A machine without a readable hostname keeps the empty id; validate says so.
            if let Ok(name) = nix::unistd::gethostname() {
                self.worker.host_id = name.to_string_lossy().into_owned();
            }
        }
        if self.worker.host_queue_url.is_empty() && self.queue.kind == QueueKind::Sqs {
            self.worker.host_queue_url = self.queue.url.clone();
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.worker.concurrency == 0 {
            bail!("worker.concurrency must be at least 1");
        }
        if self.images.allow_devices
            && self.images.devices != DevicePolicy::Create
            && self.images.devices != DevicePolicy::Skip
        {
            bail!(
                "images.allow_devices = true contradicts images.devices = \"{}\": remove images.allow_devices and keep images.devices",
                self.images.devices
            );
        }
        if self.images.parallel_downloads == 0 || self.images.read_ahead_mib == 0 {
            bail!(
                "images.parallel_downloads ({}) and images.read_ahead_mib ({}) must be at least 1",
                self.images.parallel_downloads,
                self.images.read_ahead_mib
            );
        }
        if self.queue.kind == QueueKind::Sqs && self.queue.url.is_empty() {
            bail!("queue.kind is sqs but queue.url is empty: set the job queue's URL")
        }
        if self.queue.kind != QueueKind::Sqs && !self.queue.extra_urls.is_empty() {
            bail!("queue.extra_urls is set but queue.kind is \"{}\": extra queues are SQS queues", self.queue.kind);
        }
        if let Some(blank) = self.queue.extra_urls.iter().find(|u| u.trim().is_empty()) {
            bail!("queue.extra_urls contains an empty URL ({blank:?}); remove it");
        }
        let queues = self.queue_urls().len().max(1);
        if self.worker.concurrency < queues {
            bail!(
                "worker.concurrency ({}) must be at least the number of queues ({queues}): each queue's long poll holds a job slot",
                self.worker.concurrency
            );
        }
        if !self.admin.listen.is_empty() {
            self.admin.listen_addr()?;
        }
        if self.backend == BackendKind::Dmthin && self.dmthin.pool.trim().is_empty() {
            bail!("backend = \"dmthin\" needs dmthin.pool: the device-mapper name of the host's thin pool");
        }
        if self.queue.visibility_timeout_secs < 2 {
            bail!("queue.visibility_timeout_secs must be at least 2 (the heartbeat runs at a third of it)");
        }
        if self.worker.lease_ttl_secs < 3 {
            bail!("worker.lease_ttl_secs must be at least 3 (leases are renewed at a third of it)");
        }
        self.watermarks().validate().map_err(|e| anyhow::anyhow!("{e}: fix the [capacity] settings"))?;
        let policy = self.registry.policy()?;
        match self.source_spec()? {
            SourceSpec::Registry(_) => {
                self.registry.options()?;
            }
            other => {
                // Fail closed: signatures live in registries; no other source can show one.
                let signed = policy.signed_families();
                if !signed.is_empty() {
                    let source = match other {
                        SourceSpec::Dir(p) => p.display().to_string(),
                        SourceSpec::S3(url) => url,
                        SourceSpec::Registry(t) => t.to_string(),
                    };
                    bail!(
                        "registry.policy_file requires cosign signatures for {} but source {source} is not a registry, where signatures live: set source to the registry, or change the policy",
                        signed.join(", ")
                    );
                }
            }
        }
        let h = &self.worker.host_id;
        if h.is_empty() || h.len() > 255 || h.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("worker.host_id {h:?}: set a name of 1 to 255 characters without spaces (default: the hostname)");
        }
        if self.gc.interval_secs == 0 {
            bail!("gc.interval_secs must be at least 1");
        }
        Ok(())
    }

    pub fn watermarks(&self) -> thinpipe::lifecycle::Watermarks {
        let c = &self.capacity;
        thinpipe::lifecycle::Watermarks {
            high_percent: c.high_percent,
            low_percent: c.low_percent,
            refuse_percent: c.refuse_percent,
            refuse_metadata_percent: c.refuse_metadata_percent,
        }
    }

    pub fn lifecycle_settings(&self) -> thinpipe::lifecycle::Settings {
        thinpipe::lifecycle::Settings {
            watermarks: self.watermarks(),
            max_activation_age: (self.activations.max_age_secs > 0)
                .then(|| std::time::Duration::from_secs(self.activations.max_age_secs)),
            interval: std::time::Duration::from_secs(self.gc.interval_secs),
            grace: std::time::Duration::from_secs(self.gc.grace_secs),
            // A failed family goes when its failed runs' history goes.
            forget_failed_after: std::time::Duration::from_secs(self.engine.retention_days * 24 * 3600),
        }
    }

    /// The configuration as it may be shown: secrets replaced.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if !c.admin.token.is_empty() {
            c.admin.token = "(set)".into();
        }
        c
    }

    /// The SQS queues jobs are received from, the main one first.
    pub fn queue_urls(&self) -> Vec<String> {
        std::iter::once(&self.queue.url).chain(&self.queue.extra_urls).filter(|u| !u.is_empty()).cloned().collect()
    }

    pub fn runs_path(&self) -> PathBuf {
        self.state_dir.join("runs.redb")
    }
    pub fn host_db_path(&self) -> PathBuf {
        self.state_dir.join("host.db")
    }
    pub fn blob_cache_dir(&self) -> PathBuf {
        self.state_dir.join("blobs")
    }
    /// Where image families come from, parsed: one syntax for `source` and `--source`.
    pub fn source_spec(&self) -> anyhow::Result<SourceSpec> {
        SourceSpec::parse(&self.source)
    }

    /// The source's directory, for a local source.
    pub fn source_dir(&self) -> anyhow::Result<PathBuf> {
        match self.source_spec()? {
            SourceSpec::Dir(path) => Ok(path),
            SourceSpec::S3(url) => bail!("source {url:?} is not a local directory: this needs a path or dir:<path>"),
            SourceSpec::Registry(t) => bail!("source {t} is not a local directory: this needs a path or dir:<path>"),
        }
    }
}

/// Where image families come from: `<path>`, `dir:<path>`, `s3://bucket/prefix` or a
/// registry reference, the same in the `source` setting and in `--source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Dir(PathBuf),
    S3(String),
    Registry(thinpipe::image::RegistryTemplate),
}

impl SourceSpec {
    pub fn parse(source: &str) -> anyhow::Result<SourceSpec> {
        if source.starts_with("s3://") {
            if thinpipe::image::parse_s3_url(source).is_none() {
                bail!("source {source:?}: expected s3://bucket/prefix");
            }
            return Ok(SourceSpec::S3(source.to_owned()));
        }
        if thinpipe::image::is_registry_reference(source) {
            return thinpipe::image::RegistryTemplate::parse(source)
                .map(SourceSpec::Registry)
                .map_err(|e| anyhow::anyhow!(e));
        }
        let path = source.strip_prefix("dir:").unwrap_or(source);
        if path.contains("://") || path.is_empty() {
            bail!(
                "source {source:?}: expected a path, dir:<path>, s3://bucket/prefix or a registry reference (registry.example.com/team/{{family}}:tag, docker://…)"
            );
        }
        Ok(SourceSpec::Dir(PathBuf::from(path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_syntax() {
        assert_eq!(SourceSpec::parse("/srv/images").unwrap(), SourceSpec::Dir("/srv/images".into()));
        assert_eq!(SourceSpec::parse("dir:/srv/images").unwrap(), SourceSpec::Dir("/srv/images".into()));
        assert_eq!(SourceSpec::parse("s3://b/p").unwrap(), SourceSpec::S3("s3://b/p".into()));
        let reg = SourceSpec::parse("registry.example.com/team/{family}:1.4").unwrap();
        assert!(
            matches!(&reg, SourceSpec::Registry(t) if t.to_string() == "docker://registry.example.com/team/{family}:1.4")
        );
        assert!(matches!(SourceSpec::parse("docker://debian:bookworm").unwrap(), SourceSpec::Registry(_)));
        assert_eq!(SourceSpec::parse("./my.images/x").unwrap(), SourceSpec::Dir("./my.images/x".into()));
        for bad in ["http://x/y", "s3://", "dir:", "", "registry.example.com/Team:x:y"] {
            assert!(SourceSpec::parse(bad).is_err(), "{bad}");
        }
        let config = Config::load(None, [], &["source=ftp://nope".to_owned()]).unwrap_err();
        assert!(
            format!("{config:#}").contains("expected a path, dir:<path>, s3://bucket/prefix or a registry reference"),
            "{config:#}"
        );
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(&file, "state_dir = \"/srv/tp\"\n[worker]\nconcurrency = 8\n[queue]\nname = \"from-file\"\n")
            .unwrap();
        let env = [
            ("THINPIPE_QUEUE_NAME".to_owned(), "from-env".to_owned()),
            ("THINPIPE_WORKER_CONCURRENCY".to_owned(), "2".into()),
        ];
        let c = Config::load(Some(&file), env.clone(), &["worker.concurrency=3".into()]).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/tp"));
        assert_eq!(c.queue.name, "from-env");
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.queue.path, "/srv/tp/queue.db", "derived from the state dir");
        assert_eq!(c.source, "dir:/srv/tp");
    }

    #[test]
    fn several_queues_from_text() {
        let env = [("THINPIPE_QUEUE_EXTRA_URLS".to_owned(), "http://q/fleet, http://q/other".to_owned())];
        let sets = ["queue.kind=sqs".into(), "queue.url=http://q/host".into()];
        let c = Config::load(None, env, &sets).unwrap();
        assert_eq!(c.queue_urls(), ["http://q/host", "http://q/fleet", "http://q/other"]);
        let err = Config::load(
            None,
            [],
            &[
                "queue.kind=sqs".into(),
                "queue.url=http://q/a".into(),
                "queue.extra_urls=http://q/b".into(),
                "worker.concurrency=1".into(),
            ],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("number of queues (2)"), "{err:#}");
    }

    #[test]
    fn mistakes_name_the_setting() {
        let err = Config::load(None, [], &["worker.concurency=3".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("unknown setting (did you mean worker.concurrency?)"), "{err:#}");
        let err = Config::load(None, [], &["nothing.like.it=3".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("known settings: activations.max_age_secs"), "{err:#}");
        let err = Config::load(None, [("THINPIPE_WORKER_CONCURRENCY".into(), "many".into())], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("THINPIPE_WORKER_CONCURRENCY"), "{err:#}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[worker]\nspeed = 1\n").unwrap();
        let err = Config::load(Some(&file), [], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("speed"), "{err:#}");
        let err = Config::load(None, [], &["backend=lvm".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("expected one of `auto`, `dir`, `overlay`, `btrfs`, `dmthin`"), "{err:#}");
        let err = Config::load(None, [], &["queue.kind=kafka".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("expected `embedded` or `sqs`"), "{err:#}");
        let err = Config::load(None, [], &["log_format=xml".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("expected `text` or `json`"), "{err:#}");
        let err = Config::load(None, [], &["backend=dmthin".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("needs dmthin.pool"), "{err:#}");
        let c =
            Config::load(None, [("THINPIPE_DMTHIN_POOL".into(), "vg0-pool-tpool".into())], &["backend=dmthin".into()])
                .unwrap();
        assert_eq!((c.dmthin.pool.as_str(), c.dmthin.volume_bytes), ("vg0-pool-tpool", 10 << 30));
    }

    #[test]
    fn public_admin_addresses_need_the_flag_and_a_token() {
        let check = |listen: &str, allow_public: bool, token: &str| {
            AdminConfig { listen: listen.into(), allow_public, token: token.into(), ..AdminConfig::default() }
                .listen_addr()
                .map_err(|e| e.to_string())
        };
        assert!(check("127.0.0.1:0", false, "").is_ok());
        assert!(check("[::1]:9185", false, "").is_ok());
        assert!(check("0.0.0.0:9185", false, "").unwrap_err().contains("allow_public"));
        assert!(check("0.0.0.0:9185", true, "").unwrap_err().contains("admin.token"));
        assert!(check("0.0.0.0:9185", true, "s3cret").is_ok());
        assert!(check("localhost", false, "").is_err(), "an address, not a name");
    }

    #[test]
    fn a_misspelt_environment_variable_is_refused_naming_the_setting() {
        let err = Config::load(None, [("THINPIPE_QUEUE_NMAE".into(), "x".into())], &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("THINPIPE_QUEUE_NMAE is not a setting") && msg.contains("THINPIPE_QUEUE_NAME"), "{msg}");
        let err = Config::load(None, [("THINPIPE_BACKNED".into(), "btrfs".into())], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("did you mean THINPIPE_BACKEND"), "{err:#}");
        let err = Config::load(None, [("THINPIPE_CAPACITY_WHATEVER".into(), "1".into())], &[]).unwrap_err();
        assert!(format!("{err:#}").contains("THINPIPE_CAPACITY_WHATEVER"), "{err:#}");
        // Variables of other tools and of the tests, far from any setting, pass.
        let fine = [("THINPIPE_TEST_AWS_ENDPOINT", "x"), ("THINPIPE_CONFIG", "x"), ("THINPIPE_FAULT", "x")];
        Config::load(None, fine.map(|(k, v)| (k.to_owned(), v.to_owned())), &[]).unwrap();
    }

    #[test]
    fn device_nodes_are_skipped_unless_set_and_the_old_switch_still_creates_them() {
        assert_eq!(Config::default().images.device_policy(), DevicePolicy::Skip);
        let c = Config::load(None, [("THINPIPE_IMAGES_DEVICES".into(), "refuse".into())], &[]).unwrap();
        assert_eq!(c.images.device_policy(), DevicePolicy::Refuse);
        let c = Config::load(None, [], &["images.allow_devices=true".into()]).unwrap();
        assert_eq!(c.images.device_policy(), DevicePolicy::Create);
        let err =
            Config::load(None, [], &["images.allow_devices=true".into(), "images.devices=refuse".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("contradicts"), "{err:#}");
        let err = Config::load(None, [], &["images.devices=maybe".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("skip"), "names the choices: {err:#}");
    }
}
