//! The engine and the host store under real processes: crashes of the run log at every engine
//! fault point, and leases and sequences across two OS processes.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod fsm_crash;
mod run_log_full;
mod store_processes;
