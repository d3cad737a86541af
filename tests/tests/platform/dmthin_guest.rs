//! The dm-thin backend on a real kernel: Debian's kernel in QEMU (see `thinpipe_tests::guest`)
//! with a thin pool on two virtio disks. Three boots share the disks:
//!
//! 1. `first`: the conformance suite, a base with 50 snapshots and copy-on-write checked
//!    (and one unmounted by hand: not exposed, then exposed again with its writes),
//!    every error case with its errno, a second pool run out of data space, the pipeline
//!    (prepare, 60 activations, 30 releases, reconcile clean), and a third, small pool driven
//!    through the lifecycle (a collected version's blocks come back; admission refuses with
//!    "host full" while the pool is still `rw`; releases bring admission back); and the
//!    overlay backend's per-snapshot size limits on an XFS with project quotas (this
//!    machine's kernel has no XFS quota support; the guest's Debian kernel has);
//! 2. `crash`: a prepare dies at `dmthin.after_create_thin` (between the thin device's
//!    creation and the step's checkpoint) and the guest loses power without a sync;
//! 3. `resume`: the run resumes with no orphan and no id allocated twice, `reconcile` finds
//!    and deletes a planted orphan, the pool is torn down.
//!
//! Then `thin_check` reads the metadata disks of the main and the small pool on the host.

use std::time::Duration;

use thinpipe_tests::guest::Guest;
use thinpipe_tests::{bin, run};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn a_thin_pool_on_a_real_kernel_survives_the_pipeline_a_power_cut_and_reconcile() {
    let Some(guest) = Guest::prepare(&bin("dmthin-guest")) else { return };

    let first = guest.boot("first", None, BOOT_TIMEOUT);
    first.assert_ok(&[
        "pool",
        "state disk",
        "conformance",
        "fifty snapshots, copy-on-write, mounted again after an unmount, release",
        "error cases by errno",
        "a pool out of data space aborts with its status",
        "pipeline: prepare, 60 activations, 30 releases, reconcile",
        "a small pool: garbage collection gives blocks back, admission refuses before it fills",
        "overlay on XFS with project quotas: each snapshot's size limit is enforced",
    ]);
    assert!(first.markers().contains(&"done first"), "console:\n{}", first.console);

    let crash = guest.boot("crash", Some("dmthin.after_create_thin"), BOOT_TIMEOUT);
    assert!(
        crash.console.contains("fault point dmthin.after_create_thin@base-2 armed"),
        "the crash boot never reached the fault point; console:\n{}",
        crash.console
    );
    assert!(!crash.markers().contains(&"done crash"), "the guest binary outlived its fault point");

    let resume = guest.boot("resume", None, BOOT_TIMEOUT);
    resume.assert_ok(&["resume after a power cut: no orphan, no duplicate id", "teardown"]);

    for disk in ["meta.img", "small-meta.img"] {
        let check = run(std::process::Command::new("thin_check").arg(guest.disk(disk)));
        assert!(
            check.status.success(),
            "thin_check on {disk}: {}\n{}{}",
            check.status,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}
