//! thinpipe benchmarks. Each figure is printed beside its baseline measured in the same run,
//! on the same disk, as `name value unit`: every round's paired figures (and which side went
//! first; rounds alternate), then each ratio with what it is made of, its target and
//! `PASS`/`MISS` (`report.rs`), and the process's peak RSS.
//!
//! `bench fsm`: see `fsm.rs` (durable transitions/s, sequential and 64 runs at once, beside
//! redb's own commit rate and its like-for-like batched floor).
//!
//! `bench unpack`: see `unpack.rs` (our layer application beside GNU `tar -x`, on the disk and
//! on a tmpfs; the worker's peak RSS while preparing a 1 GiB layer).
//!
//! `bench prepare`: see `prepare.rs` (a streamed prepare from S3 behind a throttling proxy,
//! beside download-only and unpack-only of the same image; bytes read back from the disk).
//!
//! `bench sqs`: see `sqs.rs` (jobs/s through SQS beside a boto3 consumer; idle requests).
//!
//! `bench activate`: see `activate.rs` (activation latency on btrfs beside the snapshot
//! ioctl plus one durable commit; root).
//!
//! `bench registry`: see `registry.rs` (a prepare from a local registry beside the same image
//! from an OCI layout on disk; the CPU of a signature check, new and remembered; requests per
//! new version).
//!
//! `bench dmthin`: see `dmthin.rs` (the same on dm-thin, in the QEMU guest; emulated).
//!
//! Scratch files go under `$BENCH_DIR` (default `target/bench`), on the disk the state
//! directory would use, never on a tmpfs.

use std::path::PathBuf;

use anyhow::{Context, bail};

mod activate;
mod dmthin;
mod fsm;
mod moto;
mod prepare;
mod registry;
mod report;
mod sqs;
mod unpack;

fn main() -> anyhow::Result<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    if which.is_empty() {
        bail!("usage: bench fsm|unpack|prepare|sqs|activate|registry|dmthin ...");
    }
    // The child process `bench activate` traces to count syncs.
    if which[0] == "activate-syncs" {
        return activate::syncs_child(&which[1..]);
    }
    let base = std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    for name in which {
        match name.as_str() {
            "fsm" => fsm::run(&base)?,
            "unpack" => unpack::run(&base)?,
            "prepare" => prepare::run(&base)?,
            "sqs" => sqs::run(&base)?,
            "activate" => activate::run(&base)?,
            "registry" => registry::run(&base)?,
            "dmthin" => dmthin::run()?,
            other => {
                bail!("unknown benchmark {other:?}: expected fsm, unpack, prepare, sqs, activate, registry or dmthin")
            }
        }
    }
    Ok(())
}
