//! The thinpipe worker: configuration, opening a host's state, the daemon (job loop and
//! admin API), the one-shot commands and the demo. `main.rs` only parses the command line,
//! turns signals into a shutdown token and calls in here.

pub mod admin;
pub mod backlog;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod executor;
pub mod host;
pub mod inventory;
pub mod jobloop;
pub mod oneshot;
pub mod order;
pub mod receiver;
pub mod runlog;
pub mod statespace;
