//! The thinpipe worker: configuration, opening a host's state, the job loop, the one-shot
//! commands and the demo. `main.rs` only parses the command line and calls in here.

pub mod admin;
pub mod config;
pub mod demo;
pub mod executor;
pub mod host;
pub mod inventory;
pub mod jobloop;
pub mod oneshot;
pub mod order;
pub mod runlog;
