//! `enqueue`: posts a job to a worker's queue (the embedded one, or SQS with `--queue-url`)
//! with a W3C `traceparent` attribute and, with `--wait`, waits for its result.
//!
//! Exit codes: 0 posted (or, with --wait, succeeded); 1 the job failed or was refused
//! (dead-lettered); 2 usage error; 3 the queue could not be used, or --wait timed out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thinpipe::admin::AdminClient;
use thinpipe::job::{Job, JobKind, JobResult, JobStatus};
use thinpipe::queue::{EmbeddedQueue, JobQueue};

const EXIT_CODES: &str = "Exit codes: 0 posted (with --wait: succeeded); 1 the job failed or was refused \
(dead-lettered), or a dead letter named does not exist; 2 usage error; 3 the queue could not be used, or --wait \
timed out.";

#[derive(Parser)]
#[command(version, about = "Post thinpipe jobs and wait for their results", after_help = EXIT_CODES)]
struct Cli {
    /// The worker's state directory (its embedded queue is <state-dir>/queue.db).
    #[arg(long, env = "THINPIPE_STATE_DIR", default_value = ".thinpipe", global = true)]
    state_dir: PathBuf,
    /// The embedded queue file, if not in the state directory.
    #[arg(long, env = "THINPIPE_QUEUE_PATH", global = true)]
    queue_path: Option<PathBuf>,
    /// The job queue's name (embedded queue).
    #[arg(long, env = "THINPIPE_QUEUE_NAME", default_value = "jobs", global = true)]
    queue: String,
    /// Post to this SQS queue instead of the embedded one. Credentials and region come from
    /// the standard AWS chain; AWS_ENDPOINT_URL points at another endpoint.
    #[arg(long, env = "THINPIPE_QUEUE_URL", global = true)]
    queue_url: Option<String>,
    /// With --wait on SQS: the queue results come back on (default: a temporary queue,
    /// created and deleted by this command).
    #[arg(long, global = true)]
    reply_queue_url: Option<String>,
    /// AWS endpoint for SQS and S3 (a local server such as moto).
    #[arg(long, env = "THINPIPE_AWS_ENDPOINT", global = true)]
    endpoint_url: Option<String>,
    /// Wait for the result and print it.
    #[arg(long, global = true)]
    wait: bool,
    /// How long --wait waits for the job's result, in seconds.
    #[arg(long, default_value_t = 600, global = true)]
    timeout: u64,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// With --wait on a terminal: the worker's admin API, read for the job's progress
    /// (default with the embedded queue: the address the worker wrote in <state-dir>/admin.addr;
    /// THINPIPE_ADMIN_TOKEN is sent as its bearer token when set).
    #[arg(long, global = true)]
    admin_url: Option<String>,
    #[command(subcommand)]
    kind: Kind,
}

#[derive(Subcommand)]
enum Kind {
    /// Prepare a family's version (the source's current one, or --digest) and make it the
    /// family's current version on the worker's host.
    Prepare {
        /// The image family (its name at the source).
        #[arg(long)]
        family: String,
        /// The version (manifest digest, sha256:...); sends a version 2 message.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Activate a fresh snapshot for one invocation.
    Activate {
        /// The image family (its name at the source).
        #[arg(long)]
        family: String,
        /// The invocation this snapshot is for: single use; its release names it again.
        #[arg(long)]
        invocation_id: String,
        /// The version (default: the host's current one); sends a version 2 message.
        #[arg(long)]
        digest: Option<String>,
        /// The worker releases the snapshot after this many seconds unless released before;
        /// sends a version 2 message.
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// Release the snapshot of one invocation.
    Release {
        /// The image family of the activation.
        #[arg(long)]
        family: String,
        /// The invocation whose snapshot to release.
        #[arg(long)]
        invocation_id: String,
    },
    /// The embedded queue's dead letters: list them, send them back, or delete them (an SQS
    /// dead-letter queue has its own redrive: the SQS console's "Start DLQ redrive" or
    /// `aws sqs start-message-move-task`).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Take back a job of the embedded queue that no worker has started (an id that
    /// `--wait` printed). A running job is left alone. SQS cannot withdraw a sent message.
    Cancel {
        /// The job's message id.
        #[arg(long)]
        id: String,
    },
    /// Upload an image to S3: an OCI layout directory, a directory holding
    /// images/<family>/, or a registry image (registry.example.com/team/app:1.4, docker://…),
    /// which is mirrored: its tag resolved once, its signature checked under --policy-file,
    /// its platform image copied and every blob re-hashed.
    Publish {
        /// The OCI layout directory, the directory holding images/<family>/, or a registry
        /// reference.
        source: String,
        /// The family to publish (the OCI layout's ref name, or images/<family>/; for a
        /// registry image, the name it gets in S3).
        #[arg(long)]
        family: String,
        /// Destination: s3://bucket/prefix.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// How `publish` reads a registry image (the worker's `registry.*` settings).
#[derive(clap::Args, Debug, Default)]
struct RegistryArgs {
    /// A registry (host:port) spoken to over plain HTTP (repeatable).
    #[arg(long = "plain-http", value_name = "HOST:PORT")]
    plain_http: Vec<String>,
    /// PEM CA certificates to trust beside the system's.
    #[arg(long = "ca-file")]
    ca_file: Option<PathBuf>,
    /// Docker's config.json to take logins from (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long = "docker-config")]
    docker_config: Option<PathBuf>,
    /// The image of a multi-architecture index to mirror, os/arch[/variant] (default: this
    /// machine's).
    #[arg(long)]
    platform: Option<String>,
    /// The signature policy the image must pass (the workers' registry.policy_file).
    #[arg(long = "policy-file")]
    policy_file: Option<PathBuf>,
}

/// The options each subcommand that is not a job takes; the job options it does not take
/// are hidden from its help and refused on its command line.
const OWN_OPTIONS: [(&str, &[&str]); 3] = [
    ("publish", &["endpoint_url", "json"]),
    ("dead-letters", &["state_dir", "queue_path", "queue", "queue_url", "json"]),
    ("cancel", &["state_dir", "queue_path", "queue", "queue_url"]),
];

/// The job options: global, so that they may come before or after the job's name.
const JOB_OPTIONS: [&str; 10] = [
    "state_dir",
    "queue_path",
    "queue",
    "queue_url",
    "reply_queue_url",
    "endpoint_url",
    "wait",
    "timeout",
    "json",
    "admin_url",
];

/// The command line, with each subcommand's help listing only the options it takes.
fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let globals: Vec<clap::Arg> = cmd.get_arguments().filter(|a| a.is_global_set()).cloned().collect();
    for (name, own) in OWN_OPTIONS {
        // A hidden copy in the subcommand takes the place of the global option clap would
        // copy in (and passes on to the subcommand's own subcommands, hidden).
        let hidden = globals.iter().filter(|a| !own.contains(&a.get_id().as_str())).map(|a| a.clone().hide(true));
        let hidden: Vec<clap::Arg> = hidden.collect();
        cmd = cmd.mut_subcommand(name, |c| c.args(hidden));
    }
    cmd
}

/// A job option given on the command line to a subcommand that does not take it.
fn misplaced_option(matches: &clap::ArgMatches) -> Option<String> {
    let (name, mut sub) = matches.subcommand()?;
    let (_, own) = OWN_OPTIONS.iter().find(|(n, _)| *n == name)?;
    loop {
        for id in JOB_OPTIONS.iter().filter(|id| !own.contains(id)) {
            if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                return Some(format!(
                    "--{} does not apply to `enqueue {name}` (see `enqueue {name} --help`)",
                    id.replace('_', "-")
                ));
            }
        }
        match sub.subcommand() {
            Some((_, deeper)) => sub = deeper,
            None => return None,
        }
    }
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    if let Some(usage) = misplaced_option(&matches) {
        eprintln!("enqueue: {usage}");
        return ExitCode::from(2);
    }
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    thinpipe::sigpipe::end_quietly_on_broken_pipe();
    let telemetry = thinpipe::telemetry::init("thinpipe-enqueue", thinpipe::telemetry::LogFormat::Text, "warn", false);
    let code = run(&cli);
    // The enqueue span goes out before the process ends.
    telemetry.shutdown();
    code
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Each dead letter: its message id, why it was dead-lettered, how often it was received,
    /// its body.
    List,
    /// Move dead letters back into the queue (visible now, receive count reset, same ids).
    Redrive {
        /// The one message to move (an id from `list`).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Move every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good.
    Purge {
        /// The one message to delete (an id from `list`).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

fn run(cli: &Cli) -> ExitCode {
    if let Kind::DeadLetters { action } = &cli.kind {
        if cli.queue_url.is_some() {
            eprintln!(
                "enqueue: dead-letters manages the embedded queue; an SQS dead-letter queue is redriven by SQS itself (the console's \"Start DLQ redrive\", or `aws sqs start-message-move-task --source-arn <DLQ ARN>`)"
            );
            return ExitCode::from(2);
        }
        return run_async(dead_letters(cli, action));
    }
    if let Kind::Cancel { id } = &cli.kind {
        if cli.queue_url.is_some() {
            eprintln!(
                "enqueue: cancel takes jobs back from the embedded queue; SQS cannot withdraw a sent message (it runs when a worker receives it; purging the queue drops every job)"
            );
            return ExitCode::from(2);
        }
        return run_async(cancel(cli, id));
    }
    if let Kind::Publish { source, family, to, registry } = &cli.kind {
        let span = tracing::info_span!("publish", family = %family, to = %to);
        if thinpipe::image::is_registry_reference(source) {
            return run_async(tracing::Instrument::instrument(mirror(cli, source, family, to, registry), span));
        }
        let dir = std::path::Path::new(source.strip_prefix("dir:").unwrap_or(source));
        return run_async(tracing::Instrument::instrument(publish(cli, dir, family, to), span));
    }
    let job = match &cli.kind {
        Kind::Prepare { family, digest } => {
            Job { digest: digest.clone(), ..Job::new(JobKind::Prepare, family, None) }.versioned()
        }
        Kind::Activate { family, invocation_id, digest, ttl_secs } => Job {
            digest: digest.clone(),
            ttl_secs: *ttl_secs,
            ..Job::new(JobKind::Activate, family, Some(invocation_id))
        }
        .versioned(),
        Kind::Release { family, invocation_id } => Job::new(JobKind::Release, family, Some(invocation_id)),
        Kind::Publish { .. } | Kind::DeadLetters { .. } | Kind::Cancel { .. } => unreachable!("handled above"),
    };
    if let Err(e) = job.validate() {
        eprintln!("enqueue: {e}");
        return ExitCode::from(2);
    }
    // The job's trace starts here: the worker's job span is a child of this one.
    let span = tracing::info_span!(
        "enqueue",
        kind = %job.kind,
        family = %job.family,
        invocation_id = job.invocation_id.as_deref().unwrap_or_default(),
        run_id = %job.run_id(),
    );
    run_async(tracing::Instrument::instrument(post(cli, job), span))
}

fn run_async(f: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("enqueue: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("enqueue: {e:#}");
            ExitCode::from(3)
        }
    }
}

async fn cancel(cli: &Cli, id: &str) -> anyhow::Result<ExitCode> {
    let queue = match embedded_queue(cli) {
        Ok(q) => q,
        Err(code) => return Ok(code),
    };
    Ok(match queue.cancel(id).await? {
        thinpipe::queue::Cancelled::Removed => {
            println!("job {id} taken back from {}: no worker will run it", queue.describe());
            ExitCode::SUCCESS
        }
        thinpipe::queue::Cancelled::Running => {
            eprintln!("enqueue: job {id} is being run by a worker; it was left alone (its result comes as usual)");
            ExitCode::from(1)
        }
        thinpipe::queue::Cancelled::NotQueued => {
            eprintln!(
                "enqueue: no job {id} waits in {} (it ran, was dead-lettered, or was never sent there)",
                queue.describe()
            );
            ExitCode::from(1)
        }
    })
}

async fn dead_letters(cli: &Cli, action: &DeadLetterAction) -> anyhow::Result<ExitCode> {
    let queue = match embedded_queue(cli) {
        Ok(q) => q,
        Err(code) => return Ok(code),
    };
    match action {
        DeadLetterAction::List => {
            let dead = queue.dead_letters().await?;
            if cli.json {
                let rows: Vec<serde_json::Value> = dead
                    .iter()
                    .map(|d| {
                        serde_json::json!({"message_id": d.message_id, "reason": d.reason, "receive_count": d.receive_count, "body": d.body})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if dead.is_empty() {
                println!("no dead letters in {}", queue.describe());
            } else {
                for d in &dead {
                    println!("{}  received {}x  {}\n    {}", d.message_id, d.receive_count, d.reason, d.body);
                }
            }
        }
        DeadLetterAction::Redrive { id, .. } | DeadLetterAction::Purge { id, .. } => {
            let redrive = matches!(action, DeadLetterAction::Redrive { .. });
            let n = if redrive {
                queue.redrive(id.as_deref()).await
            } else {
                queue.purge_dead_letters(id.as_deref()).await
            };
            let n = match n {
                Ok(n) => n,
                Err(e @ thinpipe::queue::QueueError::Invalid { .. }) => {
                    eprintln!("enqueue: {e}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            };
            if let (Some(id), 0) = (id, n) {
                eprintln!(
                    "enqueue: no dead letter {id} in {}; `enqueue dead-letters list` shows them",
                    queue.describe()
                );
                return Ok(ExitCode::from(1));
            }
            let verb = if redrive { "redriven" } else { "purged" };
            if cli.json {
                println!("{}", serde_json::json!({ verb: n }));
            } else {
                println!("{n} dead letters {verb}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `publish` is given, checked before any AWS call: a usage error says what to pass.
fn check_publish_args(dir: &std::path::Path, family: &str, to: &str) -> Result<(), String> {
    thinpipe::image::validate_family(family).map_err(|e| e.to_string())?;
    if thinpipe::image::parse_s3_url(to).is_none() {
        return Err(format!("--to {}: expected s3://bucket/prefix", thinpipe::quote::quote(to)));
    }
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a directory: pass an OCI layout or a directory holding images/{family}/",
            dir.display()
        ));
    }
    if !dir.join("index.json").is_file() && !dir.join("images").join(family).is_dir() {
        return Err(format!(
            "{} is neither an OCI layout (no index.json) nor a directory holding images/{family}/",
            dir.display()
        ));
    }
    Ok(())
}

async fn publish(cli: &Cli, dir: &std::path::Path, family: &str, to: &str) -> anyhow::Result<ExitCode> {
    if let Err(usage) = check_publish_args(dir, family, to) {
        eprintln!("enqueue: {usage}");
        return Ok(ExitCode::from(2));
    }
    let opts = thinpipe::aws::AwsOptions {
        endpoint: cli.endpoint_url.clone(),
        s3_path_style: cli.endpoint_url.is_some(),
        ..Default::default()
    };
    let sdk = thinpipe::aws::sdk_config(&opts).await;
    let client = thinpipe::aws::s3_client(&sdk, &opts);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {bytes} uploaded ({bytes_per_sec})")
            .context("progress template")?,
    );
    let endpoint = thinpipe::aws::endpoint_description(&sdk);
    let report = thinpipe::image::publish(&client, &endpoint, dir, family, to, &|n| bar.inc(n)).await?;
    bar.finish_and_clear();
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"uploaded": report.uploaded, "skipped": report.skipped, "bytes": report.bytes, "version": report.version})
        );
    } else {
        println!(
            "published {family} to {to}: {} uploaded, {} already there, {} bytes{}",
            report.uploaded.len(),
            report.skipped.len(),
            report.bytes,
            report.version.as_deref().map(|v| format!("; version {v}")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `publish` of a registry image: copied into a temporary OCI layout (signature checked
/// first, blobs re-hashed), then published from there like a local one.
async fn mirror(cli: &Cli, source: &str, family: &str, to: &str, args: &RegistryArgs) -> anyhow::Result<ExitCode> {
    if let Err(e) = thinpipe::image::validate_family(family) {
        eprintln!("enqueue: {e}");
        return Ok(ExitCode::from(2));
    }
    if thinpipe::image::parse_s3_url(to).is_none() {
        eprintln!("enqueue: --to {}: expected s3://bucket/prefix", thinpipe::quote::quote(to));
        return Ok(ExitCode::from(2));
    }
    let template = match thinpipe::image::RegistryTemplate::parse(source) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("enqueue: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let ca_pem = match &args.ca_file {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("--ca-file: reading {}", p.display()))?),
        None => None,
    };
    let platform = match args.platform.as_deref().map(thinpipe::image::Platform::parse).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("enqueue: --platform: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let policy = match &args.policy_file {
        Some(p) => {
            thinpipe::image::signature::SignaturePolicy::load(p).map_err(|e| anyhow::anyhow!("--policy-file: {e}"))?
        }
        None => thinpipe::image::signature::SignaturePolicy::none(),
    };
    let opts = thinpipe::aws::AwsOptions {
        endpoint: cli.endpoint_url.clone(),
        s3_path_style: cli.endpoint_url.is_some(),
        ..Default::default()
    };
    let sdk = thinpipe::aws::sdk_config(&opts).await;
    let options = thinpipe::image::RegistryOptions {
        http: thinpipe::image::RegistryHttpOptions {
            ca_pem,
            plain_http: args.plain_http.clone(),
            retry_for: Duration::from_secs(60),
        },
        docker_config: args.docker_config.clone().or_else(thinpipe::image::default_docker_config),
        platform,
        ecr: Some(thinpipe::image::EcrLogins::with_sdk(sdk.clone(), Vec::new())),
    };
    let registry = thinpipe::image::RegistrySource::new(template, options)?.with_signatures(
        std::sync::Arc::new(policy),
        std::sync::Arc::new(thinpipe::image::signature::MemoryVerifiedCache::default()),
    );
    let scratch = tempfile::tempdir().context("a temporary directory for the copy")?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {bytes} downloaded ({bytes_per_sec})")
            .context("progress template")?,
    );
    let copied = registry.copy_to_layout(family, scratch.path(), &|n| bar.inc(n)).await;
    bar.finish_and_clear();
    let (version, bytes) = match copied {
        Ok(v) => v,
        Err(e) => {
            let cause = thinpipe::pipeline::Cause::of_image(&e);
            eprintln!("enqueue: {source}: {e} (cause: {})", cause.as_str());
            return Ok(ExitCode::from(1));
        }
    };
    tracing::info!(%version, bytes, "copied from the registry");
    publish(cli, scratch.path(), family, to).await
}

async fn post(cli: &Cli, job: Job) -> anyhow::Result<ExitCode> {
    match &cli.queue_url {
        Some(url) => post_sqs(cli, job, url).await,
        None => post_embedded(cli, job).await,
    }
}

/// The message attributes of a job: the W3C trace context of the current (enqueue) span.
fn trace_attributes() -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    if let Some(tp) = thinpipe::telemetry::current_traceparent() {
        attrs.insert(thinpipe::telemetry::TRACEPARENT.to_owned(), tp);
    }
    attrs
}

/// `trace <id>` for messages, so a person can find the job in a trace backend.
/// Without --wait, what was posted: a line on stderr, and with --json the message id, run
/// id, queue and trace id on stdout.
fn posted(cli: &Cli, job: &Job, id: &str, queue: &str) {
    eprintln!("posted {} job {id} ({}{}) to {queue}", job.kind, job.run_id(), trace_note());
    if cli.json && !cli.wait {
        let trace = thinpipe::telemetry::trace_id_of(&tracing::Span::current());
        println!(
            "{}",
            serde_json::json!({"message_id": id, "kind": job.kind, "run_id": job.run_id(), "queue": queue, "trace_id": trace})
        );
    }
}

fn trace_note() -> String {
    thinpipe::telemetry::trace_id_of(&tracing::Span::current()).map(|t| format!(", trace {t}")).unwrap_or_default()
}

async fn post_sqs(cli: &Cli, mut job: Job, url: &str) -> anyhow::Result<ExitCode> {
    let opts = thinpipe::aws::AwsOptions { endpoint: cli.endpoint_url.clone(), ..Default::default() };
    let sdk = thinpipe::aws::sdk_config(&opts).await;
    let client = thinpipe::aws::sqs_client(&sdk);
    let settings = |u: &str| thinpipe::queue::SqsSettings {
        queue_url: u.to_owned(),
        dead_letter_url: None,
        visibility: Duration::from_secs(30),
    };
    let queue = thinpipe::queue::SqsQueue::new(client.clone(), settings(url));
    // A temporary reply queue, deleted when we are done with it.
    let mut temporary = None;
    if cli.wait {
        let reply = match &cli.reply_queue_url {
            Some(u) => u.clone(),
            None => {
                let name = format!("thinpipe-reply-{}-{:08x}", std::process::id(), rand::random::<u32>());
                let out = client.create_queue().queue_name(&name).send().await.context("creating a reply queue")?;
                let u = out.queue_url().context("no reply queue URL")?.to_owned();
                temporary = Some(u.clone());
                u
            }
        };
        job.reply_to = Some(reply);
    }
    let id = queue.send(url, &job.to_json(), &trace_attributes()).await?;
    posted(cli, &job, &id, url);
    let outcome = match &job.reply_to {
        None => Ok(ExitCode::SUCCESS),
        Some(reply) => {
            let replies = thinpipe::queue::SqsQueue::new(client.clone(), settings(reply));
            with_progress(cli, &job, false, wait_for_result(cli, &replies, &id, url, None)).await
        }
    };
    if let Some(u) = temporary
        && let Err(e) = client.delete_queue().queue_url(&u).send().await
    {
        eprintln!("enqueue: could not delete the temporary reply queue {u}: {e}");
    }
    outcome
}

async fn wait_for_result(
    cli: &Cli,
    replies: &dyn JobQueue,
    id: &str,
    jobs: &str,
    embedded: Option<&EmbeddedQueue>,
) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cli.timeout);
    loop {
        if let Some(d) = replies.receive(1, Duration::from_secs(1)).await?.pop() {
            let result: JobResult = serde_json::from_str(&d.body).context("decoding the result")?;
            replies.ack(&d).await?;
            print(&result, cli.json)?;
            return Ok(if result.status == JobStatus::Succeeded { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        // Refused before any result could be sent (a message that is not a job).
        if let Some(q) = embedded
            && let Some(dead) = q.dead_letter_of(id).await?
        {
            eprintln!("enqueue: job {id} was dead-lettered: {}", dead.reason);
            return Ok(ExitCode::from(1));
        }
        if tokio::time::Instant::now() > deadline {
            let later = if embedded.is_some() {
                format!("`enqueue cancel --id {id}` takes it back if no worker has started it")
            } else {
                "SQS cannot withdraw it; its result will go to a reply queue nobody reads once this command ends"
                    .to_owned()
            };
            eprintln!(
                "enqueue: no result for job {id} after {}s (--timeout); is a worker reading {jobs}? The job is still queued and runs when a worker takes it; {later}. (results were awaited on {})",
                cli.timeout,
                replies.describe()
            );
            return Ok(ExitCode::from(3));
        }
    }
}

/// The embedded queue `cli` names, or the exit code of a usage error (said on stderr).
fn embedded_queue(cli: &Cli) -> Result<EmbeddedQueue, ExitCode> {
    if cli.queue_path.is_none() && !cli.state_dir.is_dir() {
        // A mistyped directory would get a new queue that no worker reads.
        eprintln!(
            "enqueue: the state directory {} does not exist: pass the worker's --state-dir (or start the worker there first)",
            cli.state_dir.display()
        );
        return Err(ExitCode::from(2));
    }
    let path = cli.queue_path.clone().unwrap_or_else(|| cli.state_dir.join("queue.db"));
    let opened = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or(Ok(()), |dir| std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())))
        .and_then(|()| Ok(EmbeddedQueue::open(&path, &cli.queue, Duration::from_secs(60), 5)?));
    opened.map_err(|e| {
        eprintln!("enqueue: {e:#}");
        ExitCode::from(3)
    })
}

async fn post_embedded(cli: &Cli, mut job: Job) -> anyhow::Result<ExitCode> {
    let queue = match embedded_queue(cli) {
        Ok(q) => q,
        Err(code) => return Ok(code),
    };
    let reply_to = cli.wait.then(|| format!("reply-{}-{}", std::process::id(), job.run_id()));
    job.reply_to = reply_to.clone();
    let id = queue.send(&cli.queue, &job.to_json(), &trace_attributes()).await?;
    if !cli.json || !cli.wait {
        posted(cli, &job, &id, &queue.describe());
    }
    let Some(reply_to) = reply_to else { return Ok(ExitCode::SUCCESS) };
    let (replies, described) = (queue.named(&reply_to), queue.describe());
    with_progress(cli, &job, true, wait_for_result(cli, &replies, &id, &described, Some(&queue))).await
}

/// Awaits `waited` while a terminal shows the job's progress, read from the worker's admin
/// API (`--admin-url`, or for the embedded queue the address in the state directory).
async fn with_progress<T>(cli: &Cli, job: &Job, embedded: bool, waited: impl std::future::Future<Output = T>) -> T {
    let view = thinpipe::progress::ProgressView::on_terminal(
        &job.family,
        &format!("waiting for {} (no progress from the worker yet)", job.run_id()),
    );
    let given = cli.admin_url.clone();
    let state_dir = embedded.then(|| cli.state_dir.clone());
    let read = async || {
        let (given, state_dir) = (given.clone(), state_dir.clone());
        // Progress is only shown: when the worker cannot be asked, the bar waits.
        tokio::task::spawn_blocking(move || worker_progress(given.as_deref(), state_dir.as_deref()))
            .await
            .unwrap_or_default()
    };
    thinpipe::progress::while_running(view, read, waited).await
}

/// The steps the worker is running, from its admin API (`--admin-url`, else the address the
/// worker on the embedded queue's state directory wrote); empty when it cannot be asked.
fn worker_progress(given: Option<&str>, state_dir: Option<&std::path::Path>) -> Vec<thinpipe::progress::StepProgress> {
    let address = match (given, state_dir) {
        (Some(url), _) => Some(url.to_owned()),
        (None, Some(dir)) => AdminClient::address(None, dir).unwrap_or_default(),
        (None, None) => None,
    };
    let Some(address) = address else { return Vec::new() };
    // A worker with `admin.token` set wants it: the same variable the worker reads.
    let token = std::env::var("THINPIPE_ADMIN_TOKEN").ok();
    let running = AdminClient::new(&address, token.as_deref(), Duration::from_secs(1)).and_then(|c| c.progress());
    running.unwrap_or_default().into_iter().map(Into::into).collect()
}

/// The result; as JSON with the trace id of this job (`trace_id`) beside its fields.
fn print(r: &JobResult, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(r)?;
        if let Some(trace) = thinpipe::telemetry::trace_id_of(&tracing::Span::current()) {
            v["trace_id"] = trace.into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every option, argument and command says what it is, and `--help` ends with the exit
    /// codes.
    #[test]
    fn every_argument_has_help_and_the_exit_codes_are_in_help() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if !["help", "version"].contains(&id) && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                check(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        let mut missing = Vec::new();
        check(&cmd, cmd.get_name(), &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
        let help = cmd.clone().render_long_help().to_string();
        assert!(help.contains("Exit codes: 0"), "{help}");
    }
}
