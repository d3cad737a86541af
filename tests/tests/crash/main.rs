//! Crashes and faults: the crash matrix (every fault point, every backend and queue), the kill
//! soak, and faults of the services around the worker.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod crash_matrix;
mod kill_soak;
mod service_faults;
