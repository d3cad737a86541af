//! Which volume backend a worker uses, and snapshots across a reboot, through the real
//! worker daemon (as root, as CI runs; each test says why it did nothing elsewhere).
//!
//! - `backend = "auto"` on the test machine's ext4 picks overlay and says why (log, `/readyz`,
//!   `worker images`), and on a loop-mounted btrfs picks btrfs; once the host has volumes, auto
//!   keeps their backend, and an explicit other backend is refused naming the recorded one.
//! - A reboot (the overlay mounts taken away while the worker is down): the next worker mounts
//!   every live snapshot again before it reports ready, with the snapshot's writes, also one
//!   whose `exposed` mark the power loss took.
//! - `overlay.volatile`: a snapshot that lost its mount is released with the cause
//!   `snapshot_lost` at start-up and never handed out again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::volume::OverlayBackend;
use thinpipe_tests::{Daemon, UnmountOverlays, enqueue_wait, wait_until};

/// A state directory on the machine's disk, or `None` (with a message) where overlayfs cannot
/// mount (not root); CI fails instead.
fn overlay_host() -> Option<(tempfile::TempDir, UnmountOverlays)> {
    let dir = tempfile::tempdir().unwrap();
    if let Err(e) = OverlayBackend::probe(dir.path()) {
        assert!(std::env::var("CI").is_err(), "these tests need root to mount overlays: {e}");
        eprintln!("skipped: overlayfs cannot mount here ({e})");
        return None;
    }
    write_sample_family(dir.path(), "web").unwrap();
    let mounts = UnmountOverlays(dir.path().join("volumes"));
    Some((dir, mounts))
}

fn readyz(daemon: &Daemon) -> serde_json::Value {
    let url = format!("{}/readyz", daemon.admin_url());
    let mut body = serde_json::Value::Null;
    wait_until("/readyz to answer", Duration::from_secs(30), || {
        match reqwest::blocking::get(&url).and_then(|r| r.json::<serde_json::Value>()) {
            Ok(b) => {
                body = b;
                true
            }
            Err(_) => false,
        }
    });
    body
}

fn activate(state: &Path, invocation: &str) -> serde_json::Value {
    enqueue_wait(state, &["activate", "--family", "web", "--invocation-id", invocation])
}

fn is_overlay_mount(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
}

/// What a reboot does to a snapshot's mount.
fn unmount(path: &Path) {
    nix::mount::umount2(path, nix::mount::MntFlags::empty())
        .unwrap_or_else(|e| panic!("umount {}: {e}", path.display()));
}

fn worker_config(state: &Path, extra: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = thinpipe_tests::worker();
    cmd.arg("--state-dir").arg(state);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.args(["images", "--json"]).output().unwrap()
}

#[test]
fn auto_picks_overlay_here_keeps_it_under_volumes_and_refuses_another_backend() {
    let Some((dir, _mounts)) = overlay_host() else { return };
    let state = dir.path();
    let daemon = Daemon::start(state, &[("THINPIPE_BACKEND", "auto")]);
    let ready = readyz(&daemon);
    assert_eq!(ready["backend"]["name"], "overlay", "{ready}");
    assert!(ready["backend"]["why"].as_str().unwrap().contains("overlayfs mounts under"), "{ready}");
    daemon.wait_for_log("volume backend", Duration::from_secs(10));
    assert!(daemon.log().contains("backend=overlay"), "the choice is logged: {}", daemon.log());

    let r = activate(state, "inv-1");
    assert_eq!(r["status"], "succeeded", "{r}");
    let path = PathBuf::from(r["snapshot_path"].as_str().unwrap());
    assert!(is_overlay_mount(&path), "{} is an overlay mount", path.display());
    assert!(std::fs::read_dir(&path).unwrap().count() > 0, "the image files are there");
    assert!(daemon.stop(Duration::from_secs(60)).success());

    // With volumes, auto keeps their backend; an explicit other one is refused.
    let out = worker_config(state, &[("THINPIPE_BACKEND", "auto")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(images["backend"]["name"], "overlay", "{images}");
    assert!(images["backend"]["why"].as_str().unwrap().contains("volumes were made with it"), "{images}");
    assert!(images["backend"]["snapshot_size_limit"].as_str().unwrap().contains("overlay.snapshot_bytes"), "{images}");
    let out = worker_config(state, &[("THINPIPE_BACKEND", "dir")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("backend overlay") && err.contains("backend=overlay"), "names the recorded backend: {err}");
    assert!(path.join(".").exists() && is_overlay_mount(&path), "the refused command touched nothing");
}

#[test]
fn auto_picks_btrfs_on_btrfs() {
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let volumes = fs.mount.join("volumes");
    let env = [("THINPIPE_BACKEND", "auto"), ("THINPIPE_VOLUMES_DIR", volumes.to_str().unwrap())];
    let out = worker_config(dir.path(), &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(images["backend"]["name"], "btrfs", "{images}");
    assert!(images["backend"]["why"].as_str().unwrap().contains("is on btrfs"), "{images}");
}

#[test]
fn after_a_reboot_every_exposed_snapshot_is_mounted_again_before_the_worker_is_ready() {
    let Some((dir, _mounts)) = overlay_host() else { return };
    let state = dir.path();
    let env = [("THINPIPE_BACKEND", "overlay")];
    let daemon = Daemon::start(state, &env);
    let paths: Vec<PathBuf> = ["inv-1", "inv-2"]
        .iter()
        .map(|inv| {
            let r = activate(state, inv);
            assert_eq!(r["status"], "succeeded", "{r}");
            PathBuf::from(r["snapshot_path"].as_str().unwrap())
        })
        .collect();
    std::fs::write(paths[0].join("written-before-the-reboot"), b"kept").unwrap();
    assert!(daemon.stop(Duration::from_secs(60)).success());
    for p in &paths {
        // syncfs first, as a clean reboot does.
        nix::unistd::syncfs(std::fs::File::open(p).unwrap()).unwrap();
        unmount(p);
        assert!(!is_overlay_mount(p));
    }
    let reconcile = thinpipe_tests::worker()
        .env("THINPIPE_BACKEND", "overlay")
        .arg("--state-dir")
        .arg(state)
        .args(["reconcile", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&reconcile.stdout).unwrap();
    assert_eq!(report["unexposed"].as_array().unwrap().len(), 2, "reconcile reports the unmounted snapshots: {report}");
    assert_eq!(reconcile.status.code(), Some(1), "{report}");
    // The `exposed` mark waits for no fsync: a power loss can leave a finished activation's
    // row `created`. Its snapshot is mounted again all the same.
    let db = rusqlite::Connection::open(state.join("host.db")).unwrap();
    let marked_back = db.execute("UPDATE snapshots SET state = 'created' WHERE run_id = 'activate-inv-2'", []).unwrap();
    assert_eq!(marked_back, 1);
    drop(db);

    let daemon = Daemon::start(state, &env);
    let ready = readyz(&daemon);
    assert_eq!(ready["ready"], true, "{ready}");
    for p in &paths {
        assert!(is_overlay_mount(p), "{} is mounted again once the worker answers", p.display());
    }
    assert_eq!(std::fs::read(paths[0].join("written-before-the-reboot")).unwrap(), b"kept");
    // The same invocation's activation gives the same, usable path.
    let r = activate(state, "inv-2");
    assert_eq!(r["snapshot_path"].as_str().map(PathBuf::from).as_ref(), Some(&paths[1]), "{r}");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

#[test]
fn a_volatile_snapshot_that_lost_its_mount_is_released_with_a_cause_and_never_handed_out() {
    let Some((dir, _mounts)) = overlay_host() else { return };
    let state = dir.path();
    let env = [("THINPIPE_BACKEND", "overlay"), ("THINPIPE_OVERLAY_VOLATILE", "true")];
    let daemon = Daemon::start(state, &env);
    let r = activate(state, "inv-1");
    assert_eq!(r["status"], "succeeded", "{r}");
    let path = PathBuf::from(r["snapshot_path"].as_str().unwrap());
    assert!(daemon.stop(Duration::from_secs(60)).success());
    unmount(&path);

    let daemon = Daemon::start(state, &env);
    assert_eq!(readyz(&daemon)["ready"], true);
    assert!(daemon.log().contains("snapshot_lost"), "the log names the cause: {}", daemon.log());
    let store = thinpipe::store::Store::open(state.join("host.db")).unwrap();
    let row = store.snapshot_by_run("activate-inv-1").unwrap().unwrap();
    assert_eq!(row.state, thinpipe::store::SnapshotState::Released, "{row:?}");
    assert!(!path.exists(), "its volume is gone");
    let again = activate(state, "inv-1");
    assert_eq!((again["status"].as_str(), again["cause"].as_str()), (Some("failed"), Some("released")), "{again}");
    // A new invocation gets a fresh snapshot.
    let fresh = activate(state, "inv-2");
    assert_eq!(fresh["status"], "succeeded", "{fresh}");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}
