//! thinpipe: the library every thinpipe binary shares.
//!
//! Layout:
//! - [`fsm`]: the generic durable FSM engine on redb (knows nothing of images or queues);
//! - [`store`]: the host's SQLite database: images, snapshots, leases, id sequences;
//! - [`fault`]: named fault points for crash tests (compiled out of release builds).

pub mod fault;
pub mod fsm;
pub mod image;
pub mod job;
pub mod pipeline;
pub mod queue;
pub mod store;
pub mod volume;
