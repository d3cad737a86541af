//! The thinpipe worker, by role:
//! - [`daemon`]: the long-running worker: job loop, receivers, per-invocation order, backlog
//!   gauges, signals, and the admin API it serves (`daemon::admin`; its wire types and client
//!   are the library's `thinpipe::admin`, shared with `enqueue`);
//! - [`job`]: one job's execution (the executor, the state directory's reserve);
//! - [`commands`]: one file per one-shot subcommand (`run`, `runs`, `reconcile`, `images`
//!   and `gc`, `demo`, `config`);
//! - [`host`]: opening a host's state (the worker lease, the run log, the volumes), which all
//!   of the above share; [`config`]: the settings.
//!
//! `main.rs` only parses the command line and dispatches here.

pub mod commands;
pub mod config;
pub mod daemon;
pub mod host;
pub mod job;
