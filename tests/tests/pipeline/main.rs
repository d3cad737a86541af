//! The pipeline end to end on one machine with the real worker daemon and enqueue: jobs,
//! versions, invocations, expiry, operator safety and capacity.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod backends;
mod capacity;
mod expiry;
mod invocations;
mod operator_safety;
mod pipeline_e2e;
mod streamed;
mod versions;
