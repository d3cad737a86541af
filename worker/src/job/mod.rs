//! One job's execution: [`executor`] turns a validated job into runs (resolving the version,
//! the per-family prepare gate, making a version current, activation and release) and
//! decides how the job ends; [`prepare_gate`] lets one prepare of a family run at a time in
//! this process and on this host; [`statespace`] is the reserve of the state directory below
//! which new prepares and activations are refused.

pub mod executor;
pub mod prepare_gate;
pub mod statespace;
