//! Operator safety: what a tired operator's mistake or a full disk must never do to a host.
//!
//! - A forgotten setting (`--config` left out, so another backend or volume directory) is
//!   refused by every command before it touches a volume, naming both places; `reconcile
//!   --fix` never releases a live snapshot it cannot see; the live snapshot and the user's
//!   file in it survive the whole story (on `dir`, and on a loop-mounted btrfs as root).
//! - A `dir` snapshot copy killed half way leaves an in-between artifact that the release
//!   (arriving first after the restart) removes; reconcile and `worker gc` list and sweep
//!   any other.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use thinpipe::store::{SnapshotState, Store};
use thinpipe_tests::{bin, tar_of_file};

/// `worker` on `state` with `settings` (`--set` pairs) and `args`.
fn worker(state: &Path, settings: &[String], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("worker"));
    cmd.arg("--state-dir").arg(state);
    for s in settings {
        cmd.args(["--set", s]);
    }
    // The watermarks are tested on filesystems of their own; this disk is shared.
    cmd.args(["--set", "capacity.high_percent=100", "--set", "capacity.low_percent=99"]);
    cmd.args(["--set", "capacity.refuse_percent=100"]);
    cmd.args(args).env_remove("THINPIPE_FAULT").output().unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

fn family(state: &Path, name: &str) {
    let dir = state.join("images").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("layer-1.tar"), tar_of_file("etc/os-release", b"ID=safety\n")).unwrap();
}

/// The story of the issue, with `right` the settings the host was set up with and `wrong`
/// what a forgotten `--config` gives.
fn forgotten_settings_story(state: &Path, right: &[String], wrong: &[String]) {
    family(state, "web");
    let mut paths = Vec::new();
    for inv in ["inv-1", "inv-2", "inv-3"] {
        let out = worker(state, right, &["run", "activate", "--family", "web", "--invocation-id", inv, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        paths.push(PathBuf::from(json(&out)["snapshot_path"].as_str().unwrap()));
    }
    std::fs::write(paths[0].join("user-file"), b"the user's work").unwrap();
    let rows_before = Store::open(state.join("host.db")).unwrap().list_snapshots().unwrap();

    // Every command with the wrong settings is refused, naming both places, and changes nothing.
    let refused: [&[&str]; 6] = [
        &["reconcile"],
        &["reconcile", "--fix"],
        &["images"],
        &["gc"],
        &["run", "activate", "--family", "web", "--invocation-id", "inv-4"],
        &["run", "release", "--family", "web", "--invocation-id", "inv-1"],
    ];
    for args in refused {
        let out = worker(state, wrong, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} with the wrong settings: {err}");
        assert!(
            err.contains("keeps its volumes on backend") && err.contains("but these settings name backend"),
            "{args:?}: {err}"
        );
        assert!(err.contains("nothing was changed"), "{args:?}: {err}");
    }
    let rows_after = Store::open(state.join("host.db")).unwrap().list_snapshots().unwrap();
    assert_eq!(rows_after, rows_before, "no row was added, released or changed");
    assert_eq!(std::fs::read(paths[0].join("user-file")).unwrap(), b"the user's work");

    // With the right settings all is well, and stays so after a --fix.
    let out = worker(state, right, &["reconcile", "--fix", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let report = json(&out);
    assert_eq!(report["deleted"], serde_json::json!([]), "{report}");
    assert_eq!(report["contradictions"], serde_json::json!([]), "{report}");
    let store = Store::open(state.join("host.db")).unwrap();
    assert!(store.list_snapshots().unwrap().iter().all(|s| s.state == SnapshotState::Exposed));
    assert_eq!(std::fs::read(paths[0].join("user-file")).unwrap(), b"the user's work");
    let out = worker(state, right, &["run", "release", "--family", "web", "--invocation-id", "inv-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!paths[0].exists(), "the release with the right settings deletes the snapshot");
}

#[test]
fn a_forgotten_volume_directory_is_refused_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (state, volumes) = (dir.path().join("state"), dir.path().join("elsewhere"));
    let right = [format!("volumes_dir={}", volumes.display())];
    forgotten_settings_story(&state, &right, &[]);
}

#[test]
fn a_forgotten_btrfs_backend_is_refused_and_loses_nothing() {
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::with(256, "loop") else { return };
    let dir = tempfile::tempdir().unwrap();
    let right = ["backend=btrfs".to_string(), format!("volumes_dir={}", fs.mount.join("volumes").display())];
    forgotten_settings_story(dir.path(), &right, &[]);
}

#[test]
fn a_database_that_predates_the_record_is_checked_against_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (state, volumes) = (dir.path().join("state"), dir.path().join("elsewhere"));
    let right = [format!("volumes_dir={}", volumes.display())];
    family(&state, "web");
    let out = worker(&state, &right, &["run", "activate", "--family", "web", "--invocation-id", "inv-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // As a database written before places were recorded.
    rusqlite::Connection::open(state.join("host.db")).unwrap().execute("DELETE FROM volume_place", []).unwrap();
    let out = worker(&state, &[], &["reconcile", "--fix"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("records 2 volumes") && err.contains("holds none of them"), "{err}");
    let out = worker(&state, &right, &["reconcile"]);
    assert!(out.status.success(), "the right settings are recorded: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_snapshot_copy_killed_half_way_leaves_nothing_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    family(state, "web");
    let out = worker(state, &[], &["run", "prepare", "--family", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Killed before the copy is renamed into place (as a kill or a full disk mid-copy leaves it).
    let mut cmd = Command::new(bin("worker"));
    let out = cmd
        .arg("--state-dir")
        .arg(state)
        .args(["--set", "capacity.high_percent=100", "--set", "capacity.low_percent=99"])
        .args(["--set", "capacity.refuse_percent=100"])
        .args(["run", "activate", "--family", "web", "--invocation-id", "inv-1"])
        .env("THINPIPE_FAULT", "dir.before_rename")
        .output()
        .unwrap();
    assert!(thinpipe_tests::killed(&out.status), "{}", String::from_utf8_lossy(&out.stderr));
    let snaps = state.join("volumes/snaps");
    let half: Vec<String> = std::fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert_eq!(half.len(), 1, "the kill left a half copy: {half:?}");
    std::fs::write(snaps.join(&half[0]).join("partial"), vec![1u8; 1 << 20]).unwrap();

    // reconcile sees it (and leaves it: the activation is still intended).
    let report = json(&worker(state, &[], &["reconcile", "--json"]));
    assert_eq!(report["leftovers"].as_array().unwrap().len(), 1, "{report}");

    // The release is handled before the activation comes back.
    let out = worker(state, &[], &["run", "release", "--family", "web", "--invocation-id", "inv-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(&snaps).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing of the snapshot is left: {left:?}");
    let report = json(&worker(state, &[], &["reconcile", "--json"]));
    assert_eq!(report["leftovers"], serde_json::json!([]), "{report}");
}
