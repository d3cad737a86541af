//! `bench dmthin`: the activate benchmark on a real kernel's thin pool, in the QEMU guest
//! (`thinpipe_guest`; TCG, so only the ratio means anything): activations through the
//! pipeline beside the floor, a thin snapshot activated by ioctl plus one durable redb
//! commit. The guest runs `dmthin-bench-guest`, built beside this binary.

use std::time::Duration;

use anyhow::{Context, bail};
use thinpipe_guest::qemu::Guest;

pub fn run() -> anyhow::Result<()> {
    let program = std::env::current_exe().context("locating the bench binary")?.with_file_name("dmthin-bench-guest");
    if !program.is_file() {
        bail!("{} is missing: build it with `cargo build --release -p benches --bins`", program.display());
    }
    let Some(guest) = Guest::prepare(&program) else {
        println!("activate_dmthin_emulated skipped: the dm-thin guest is not set up (scripts/guest-kernel)");
        return Ok(());
    };
    let boot = guest.boot("bench", None, Duration::from_secs(900));
    boot.assert_ok(&["pool", "state disk", "sample family", "bench"]);
    for line in boot.markers().into_iter().filter_map(|m| m.strip_prefix("bench ")) {
        println!("{line}");
    }
    Ok(())
}
