//! The dm-thin guest: Debian's kernel booted in QEMU with a thin pool on virtio disks, for
//! what needs device-mapper, which this machine's kernel lacks. Two halves:
//!
//! - [`qemu`], on the host: builds an initramfs around one guest program, boots it for a
//!   phase, and collects the `THINPIPE-GUEST ...` marker lines it prints on the console;
//! - [`inside`], in the guest programs: markers and checks, the pool and the state disk, and
//!   a host (run log, database, dm-thin backend, pipeline) on them.
//!
//! Two programs use it: the platform test's `dmthin-guest` (tests crate, fault points
//! compiled in) and the benchmark's `dmthin-bench-guest` (benches crate, none).

pub mod inside;
pub mod qemu;
