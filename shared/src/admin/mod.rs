//! The worker's admin API as its clients see it: the wire types it answers ([`wire`]), one
//! blocking HTTP client ([`client`]) and the file where a running worker writes its address.
//! The server (in the worker binary) builds the wire types; `worker runs`, `worker images`
//! and `enqueue --wait` read them back through the same client, so what a client sees is
//! defined here, not by the engine's or the store's internals.

pub mod client;
pub mod wire;

pub use client::{AdminClient, AdminError};

/// The file (in the state directory) where a running worker writes its admin address
/// (`http://<ip>:<port>`), for `worker runs`, `enqueue --wait` and scripts. Written whole
/// then renamed; removed when the worker stops (a killed worker leaves it behind, so a
/// client treats "nothing answers there" as "no worker").
pub const ADDR_FILE: &str = "admin.addr";
