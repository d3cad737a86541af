//! thinpipe: the library every thinpipe binary shares.
//!
//! Layout:
//! - [`fsm`]: the generic durable FSM engine on redb (knows nothing of images or queues);
//! - [`store`]: the host's SQLite database: images, snapshots, leases, id sequences;
//! - [`image`]: blob sources, manifests, the blob cache, layer application;
//! - [`volume`]: the `VolumeBackend` trait and its backends;
//! - [`pipeline`]: the prepare, activate, release and retire workflows;
//! - [`lifecycle`]: what decides over time: current versions, garbage collection, capacity,
//!   expiry (the worker's maintenance task);
//! - [`reconcile`]: the backend's volumes against the host database's records;
//! - [`admin`]: the worker's admin API as clients see it: wire types, one client, its address file;
//! - [`progress`]: how far the running steps have got, and the terminal bar that shows it;
//! - [`queue`]: the `JobQueue` trait, the embedded and SQS queues;
//! - [`job`]: the job message schema and results;
//! - [`aws`]: one AWS SDK setup for SQS and S3;
//! - [`quote`]: quoting user input in messages, cut to a readable length;
//! - [`sync`]: the one lock helper and the one group-commit protocol;
//! - [`sigpipe`]: one-shot commands end quietly when their output pipe closes;
//! - [`fault`]: named fault points for crash tests (compiled out of release builds);
//! - [`telemetry`]: logs, OpenTelemetry traces and metrics, trace context propagation.

pub mod admin;
pub mod aws;
pub mod fault;
pub mod fsm;
pub mod image;
pub mod job;
pub mod lifecycle;
pub mod pipeline;
pub mod progress;
pub mod queue;
pub mod quote;
pub mod reconcile;
pub mod sigpipe;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod volume;
