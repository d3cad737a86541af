//! The platforms the worker runs on: dm-thin on a real kernel (QEMU), the Ansible role on
//! network-namespace hosts, and the fleet contract.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod ansible_fleet;
mod dmthin_guest;
mod fleet;
