//! Operator safety: what a tired operator's mistake or a full disk must never do to a host.
//!
//! - A forgotten setting (`--config` left out, so another backend or volume directory) is
//!   refused by every command before it touches a volume, naming both places; `reconcile
//!   --fix` never releases a live snapshot it cannot see; the live snapshot and the user's
//!   file in it survive the whole story (on `dir`, and on a loop-mounted btrfs as root).
//! - A `dir` snapshot copy killed half way leaves an in-between artifact that the release
//!   (arriving first after the restart) removes; reconcile and `worker gc` list and sweep
//!   any other.
//! - SIGTERM during a long unpack stops the step at its next entry, within the drain
//!   deadline, and a second worker waiting for the state directory starts only after.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use thinpipe::store::{SnapshotState, Store};
use thinpipe_tests::{bin, tar_of_file, tar_of_files};

/// `worker` on `state` with `settings` (`--set` pairs) and `args`.
fn worker(state: &Path, settings: &[String], args: &[&str]) -> Output {
    let mut cmd = thinpipe_tests::worker();
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
    let mut cmd = thinpipe_tests::worker();
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

fn random_family(source: &Path, name: &str, mib: usize) {
    let dir = source.join("images").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut content = vec![0u8; mib << 20];
    rand::fill(&mut content[..]);
    std::fs::write(dir.join("layer-1.tar"), tar_of_file("data.bin", &content)).unwrap();
}

fn images(api: &str) -> Value {
    reqwest::blocking::get(format!("{api}/api/images")).unwrap().json().unwrap()
}

fn used_percent(api: &str) -> f64 {
    let u = &images(api)["usage"];
    u["used_bytes"].as_f64().unwrap() * 100.0 / u["total_bytes"].as_f64().unwrap()
}

/// The state directory and its volumes on a 64 MiB tmpfs (defaults: high 85%, low 80%,
/// refuse 95%): a prepare too large for it fails clearly before downloading; partial
/// downloads are counted and, above the high watermark, deleted before anything in use;
/// what is not thinpipe's never makes it evict a base; the host heals by itself.
#[test]
fn a_full_disk_heals_itself_without_deleting_what_is_in_use() {
    let Some(fs) = thinpipe_tests::SmallTmpfs::new(64) else { return };
    let source = tempfile::tempdir().unwrap();
    random_family(source.path(), "small", 1);
    random_family(source.path(), "big", 80);
    let state = fs.mount.join("state");
    let src = source.path().to_str().unwrap();
    let env = [
        ("THINPIPE_SOURCE", src),
        ("THINPIPE_CAPACITY_HIGH_PERCENT", "85"),
        ("THINPIPE_CAPACITY_LOW_PERCENT", "80"),
        ("THINPIPE_CAPACITY_REFUSE_PERCENT", "95"),
        ("THINPIPE_GC_INTERVAL_SECS", "1"),
    ];
    std::fs::create_dir_all(&state).unwrap();
    let daemon = thinpipe_tests::Daemon::start(&state, &env);
    let api = daemon.admin_url();
    let enqueue = |args: &[&str]| thinpipe_tests::enqueue_wait(&state, args);
    let r = enqueue(&["activate", "--family", "small", "--invocation-id", "inv-1"]);
    assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());
    let small_base = r["base_vol_id"].clone();

    // Too large for this host: a clear failure before a byte is downloaded.
    let r = enqueue(&["prepare", "--family", "big"]);
    assert_eq!((r["status"].as_str(), r["cause"].as_str()), (Some("failed"), Some("host_full")), "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("refused before downloading") && error.contains("refuse_percent"), "{error}");
    assert_eq!(images(&api)["partial_download_bytes"], 0, "nothing was downloaded");
    let r = enqueue(&["activate", "--family", "small", "--invocation-id", "inv-2"]);
    assert_eq!(r["status"], "succeeded", "the working family keeps activating: {r}");

    // A partial download left by a full disk (as an interrupted download leaves it): counted,
    // and deleted by the maintenance pass before anything in use.
    let partial = state.join("blobs/tmp").join(format!("{}.part", "ab".repeat(32)));
    let free = nix_free_bytes(&fs.mount);
    let fill = free.saturating_sub(1 << 20);
    std::fs::write(&partial, vec![7u8; fill as usize]).unwrap();
    assert!(images(&api)["partial_download_bytes"].as_u64().unwrap() >= fill, "partial downloads are counted");
    thinpipe_tests::wait_until("the partial download deleted", Duration::from_secs(60), || !partial.exists());
    thinpipe_tests::wait_until("usage below the low watermark", Duration::from_secs(60), || used_percent(&api) < 80.0);
    let r = enqueue(&["activate", "--family", "small", "--invocation-id", "inv-3"]);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["base_vol_id"], small_base, "the working family's base was never evicted");

    // Something that is not thinpipe's fills the disk: refused clearly, nothing evicted, and
    // the host heals once it is gone.
    let filler = fs.mount.join("someone-elses-file");
    let fill = nix_free_bytes(&fs.mount).saturating_sub(2 << 20);
    std::fs::write(&filler, vec![1u8; fill as usize]).unwrap();
    thinpipe_tests::wait_until("not ready: host full", Duration::from_secs(30), || {
        reqwest::blocking::get(format!("{api}/readyz")).unwrap().status().as_u16() == 503
    });
    let r = enqueue(&["activate", "--family", "small", "--invocation-id", "inv-4"]);
    assert_eq!((r["status"].as_str(), r["cause"].as_str()), (Some("failed"), Some("host_full")), "{r}");
    daemon.wait_for_log("none is evicted: something else fills it", Duration::from_secs(60));
    std::fs::remove_file(&filler).unwrap();
    thinpipe_tests::wait_until("usage below the low watermark", Duration::from_secs(60), || used_percent(&api) < 80.0);
    let r = enqueue(&["activate", "--family", "small", "--invocation-id", "inv-5"]);
    assert_eq!(r["status"], "succeeded", "the host healed by itself: {r}");
    assert_eq!(r["base_vol_id"], small_base);
    let store = Store::open(state.join("host.db")).unwrap();
    let live = store.list_snapshots().unwrap().into_iter().filter(|s| s.state == SnapshotState::Exposed).count();
    assert_eq!(live, 4, "every live snapshot is still there");
    let r = enqueue(&["release", "--family", "small", "--invocation-id", "inv-4"]);
    assert_eq!(r["status"], "succeeded", "{r}");
    daemon.stop(Duration::from_secs(30));
}

/// Bytes an unprivileged writer may still write on the filesystem holding `path`.
fn nix_free_bytes(path: &Path) -> u64 {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid path and `st` a valid out-pointer for the call.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

/// The state directory on a 48 MiB tmpfs (the volumes and the queue elsewhere, as on a host
/// whose state partition is small). Filled while a prepare runs: its result or its message
/// survives (never dead-lettered), the worker says why it is not ready, refuses new work
/// with a `host_full` result and, once the run log refused a write, exits for its
/// supervisor (here, the test) to start it again; with the space back, every job gets its
/// result without an operator touching the state.
#[test]
fn a_full_state_directory_never_loses_a_job_and_a_restart_heals_it() {
    let Some(fs) = thinpipe_tests::SmallTmpfs::new(48) else { return };
    let elsewhere = tempfile::tempdir().unwrap();
    random_family(elsewhere.path(), "small", 1);
    random_family(elsewhere.path(), "big", 8);
    let state = fs.mount.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let queue = elsewhere.path().join("queue.db");
    let volumes = elsewhere.path().join("volumes");
    let (src, queue_path, vols) = (
        elsewhere.path().to_str().unwrap().to_owned(),
        queue.to_str().unwrap().to_owned(),
        volumes.to_str().unwrap().to_owned(),
    );
    let env = [
        ("THINPIPE_SOURCE", src.as_str()),
        ("THINPIPE_QUEUE_PATH", queue_path.as_str()),
        ("THINPIPE_VOLUMES_DIR", vols.as_str()),
        ("THINPIPE_PAUSE", "prepare.download@big=3000"),
    ];
    let enqueue_env = |cmd: &mut Command| {
        cmd.env("THINPIPE_QUEUE_PATH", &queue_path);
    };
    let post = |args: &[&str]| {
        let mut cmd = thinpipe_tests::enqueue_waiting(thinpipe_tests::To::State(&state), 120);
        cmd.args(args);
        enqueue_env(&mut cmd);
        cmd.spawn().unwrap()
    };
    let result =
        |child: std::process::Child| -> Value { thinpipe_tests::job_result(&child.wait_with_output().unwrap()) };
    let mut daemon = thinpipe_tests::Daemon::start(&state, &env);
    let r = result(post(&["activate", "--family", "small", "--invocation-id", "inv-1"]));
    assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());

    // The disk fills while the prepare of `big` is held at its download.
    let big = post(&["prepare", "--family", "big"]);
    daemon.wait_for_log("pause point prepare.download@big", Duration::from_secs(60));
    let filler = fs.mount.join("filler");
    std::fs::write(&filler, vec![1u8; nix_free_bytes(&fs.mount) as usize]).unwrap();
    let api = daemon.admin_url();
    thinpipe_tests::wait_until("not ready: the state directory is full", Duration::from_secs(60), || {
        match reqwest::blocking::get(format!("{api}/readyz")) {
            Ok(r) if r.status().as_u16() == 503 => {
                let body: Value = r.json().unwrap();
                body["reasons"].to_string().contains("state directory")
            }
            Ok(_) => false,
            Err(_) => !daemon.is_running(), // it may already have exited
        }
    });
    // A job posted meanwhile is refused (host full) or waits for the restarted worker.
    let waiting = post(&["activate", "--family", "small", "--invocation-id", "inv-2"]);
    // The prepare's failure is recorded (a result for its requester), or the run log refused
    // the write and the worker exits (3) for its supervisor to start it again: both keep the
    // job; losing it is what must not happen.
    let mut big = Some(big);
    let mut big_result = None;
    thinpipe_tests::wait_until("the prepare's result or the worker's exit", Duration::from_secs(120), || {
        if let Some(child) = big.as_mut()
            && child.try_wait().unwrap().is_some()
        {
            big_result = Some(result(big.take().unwrap()));
        }
        big_result.is_some() || !daemon.is_running()
    });
    let exited = !daemon.is_running();
    if exited {
        assert_eq!(daemon.wait_exit(Duration::from_secs(5)).code(), Some(3), "a storage fault exits 3");
    }
    std::fs::remove_file(&filler).unwrap();
    let daemon = if exited { thinpipe_tests::Daemon::start(&state, &env) } else { daemon };
    let r = result(waiting);
    assert!(
        r["status"] == "succeeded" || r["cause"] == "host_full",
        "the job posted while the disk was full ran or was refused: {r}\n{}",
        daemon.log()
    );
    let r = match big_result {
        Some(r) => r,
        None => result(big.take().unwrap()),
    };
    assert!(r["status"] == "succeeded" || r["cause"] == "host_full" || r["cause"] == "host_storage", "{r}");
    eprintln!("the first worker {}; big: {r}", if exited { "exited 3" } else { "stayed up" });
    let q = thinpipe::queue::EmbeddedQueue::open(&queue_path, "jobs", Duration::from_secs(60), 5).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(rt.block_on(q.dead_letters()).unwrap().is_empty(), "nothing dead-lettered for the host's fault");
    daemon.stop(Duration::from_secs(30));
}

#[test]
fn a_release_naming_another_family_is_refused_and_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    family(state, "web");
    family(state, "other");
    let out = worker(state, &[], &["run", "activate", "--family", "web", "--invocation-id", "inv-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = PathBuf::from(json(&out)["snapshot_path"].as_str().unwrap().to_owned());
    let out = worker(state, &[], &["run", "release", "--family", "other", "--invocation-id", "inv-1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let r = json(&out);
    assert_eq!((r["status"].as_str(), r["cause"].as_str()), (Some("failed"), Some("not_found")), "{r}");
    assert!(r["error"].as_str().unwrap().contains("belongs to family web, not other"), "{r}");
    assert!(path.exists(), "nothing was released");
    let row = Store::open(state.join("host.db")).unwrap().snapshot_by_run("activate-inv-1").unwrap().unwrap();
    assert_eq!(row.state, SnapshotState::Exposed);
    let out = worker(state, &[], &["run", "release", "--family", "web", "--invocation-id", "inv-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!path.exists());
}

/// The RFC 3339 time at the start of the first line of `log` containing `text`.
fn logged_at(log: &str, text: &str) -> jiff::Timestamp {
    let line = log.lines().find(|l| l.contains(text)).unwrap_or_else(|| panic!("no {text:?} in the log:\n{log}"));
    line.split_whitespace().next().unwrap().parse().unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// A worker on `state` (with `env`, which paces the unpack by `THINPIPE_PAUSE`) unpacking
/// family `web`'s one layer of 400 files, and the `enqueue --wait` of its prepare; returns
/// once the unpack has begun.
fn long_unpack(state: &Path, env: &[(&str, &str)]) -> (thinpipe_tests::Daemon, std::process::Child) {
    let family_dir = state.join("images/web");
    std::fs::create_dir_all(&family_dir).unwrap();
    let files = (0..400).map(|i| (format!("data/{i:04}"), format!("file {i}\n")));
    std::fs::write(family_dir.join("layer-1.tar"), tar_of_files(files)).unwrap();
    let daemon = thinpipe_tests::Daemon::start(state, env);
    let waiting = thinpipe_tests::enqueue_waiting(thinpipe_tests::To::State(state), 110)
        .args(["prepare", "--family", "web"])
        .spawn()
        .unwrap();
    daemon.wait_for_log("pause point apply.entry", Duration::from_secs(60));
    (daemon, waiting)
}

/// SIGTERM during a long unpack (a layer of 400 entries, each written slowly) with
/// `drain_deadline_secs = 2`: the step is told to stop and stops at its next entry, so the
/// worker exits within the deadline plus a small margin; the job is handed back at once, so
/// the next worker runs it long before the message's visibility timeout. That next worker,
/// started while the first drains, takes the state directory only after the first's step
/// has stopped writing (the worker lease is given back only then).
#[test]
fn sigterm_during_a_long_unpack_stops_the_step_before_the_next_worker_starts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let env = [
        ("THINPIPE_WORKER_DRAIN_DEADLINE_SECS", "2"),
        ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "120"),
        // 400 entries at 50 ms: a 20 s unpack.
        ("THINPIPE_PAUSE", "apply.entry=50"),
    ];
    let (daemon, waiting) = long_unpack(state, &env);
    let first_log = state.join("worker.log");
    let stopping = std::time::Instant::now();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) }, 0);
    // The next worker waits for the state directory while the first drains.
    let next = thinpipe_tests::Daemon::start(state, &[("THINPIPE_WORKER_WAIT_FOR_STATE", "true")]);
    let status = daemon.stop_waited(Duration::from_secs(2 + 3));
    let took = stopping.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(2 + 2), "exit {took:?} after SIGTERM with a 2 s drain deadline");
    let first = std::fs::read_to_string(&first_log).unwrap();
    assert!(first.contains("the step's blocking work stopped"), "the step was not stopped:\n{first}");
    let r = thinpipe_tests::job_result(&waiting.wait_with_output().unwrap());
    assert_eq!(r["status"], "succeeded", "{r}\n{}", next.log());
    assert!(stopping.elapsed() < Duration::from_secs(60), "handed back at once, not after the visibility timeout");
    let second = next.log();
    let stopped = logged_at(&first, "the step's blocking work stopped");
    let started = logged_at(&second, "worker started");
    assert!(stopped < started, "the next worker started at {started} while the first's step wrote until {stopped}");
    next.stop(Duration::from_secs(30));
}

/// Another process taking the family's prepare lease (here: the test, as a holder whose pid
/// is alive) stops the prepare's run, its unpack included, within a renewal period, long
/// before that lease would let anyone else write; the job is not answered as failed but
/// retried, and once the other holder's lease ends the run resumes and completes.
#[test]
fn a_stolen_prepare_lease_stops_the_unpack_and_the_job_completes_later() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let env = [
        // Renewed every second.
        ("THINPIPE_WORKER_LEASE_TTL_SECS", "3"),
        ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "5"),
        // 400 entries at 20 ms: an 8 s unpack.
        ("THINPIPE_PAUSE", "apply.entry=20"),
    ];
    let (daemon, waiting) = long_unpack(state, &env);
    // Another live process (pid 1) takes the lease for 4 s.
    let stolen_at = jiff::Timestamp::now();
    let expires = stolen_at.as_millisecond() + 4000;
    let changed = rusqlite::Connection::open(state.join("host.db"))
        .unwrap()
        .execute("UPDATE leases SET v = 'pid:1:0000000000000000', expires_at = ?1 WHERE k = 'prepare/web'", [expires])
        .unwrap();
    assert_eq!(changed, 1, "the prepare holds its family's lease while it unpacks");
    daemon.wait_for_log("the step's blocking work stopped", Duration::from_secs(30));
    let log = daemon.log();
    assert!(log.contains("lost the prepare lease of web"), "{log}");
    let stopped = logged_at(&log, "the step's blocking work stopped");
    assert!(
        stopped < stolen_at + jiff::SignedDuration::from_secs(3),
        "the unpack wrote until {stopped}, past a renewal period after the lease was taken at {stolen_at}"
    );
    let r = thinpipe_tests::job_result(&waiting.wait_with_output().unwrap());
    assert_eq!(r["status"], "succeeded", "retried after the other holder's lease ended: {r}\n{}", daemon.log());
    let run = r["run_id"].as_str().unwrap();
    let out = thinpipe_tests::worker().arg("--state-dir").arg(state).args(["runs", "show", run]).output().unwrap();
    let history = String::from_utf8_lossy(&out.stdout);
    assert!(history.contains("resumed at stream_into_base"), "the same run resumed:\n{history}");
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// `enqueue --wait` that times out says the job is still queued, names it, and `enqueue
/// cancel` takes it back while no worker has started it.
#[test]
fn a_wait_that_times_out_names_the_queued_job_and_cancel_takes_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    family(state, "web");
    // No worker runs: the job waits.
    let out = Command::new(bin("enqueue"))
        .arg("--state-dir")
        .arg(state)
        .args(["--wait", "--timeout", "1", "prepare", "--family", "web"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("The job is still queued and runs when a worker takes it"), "{err}");
    let id = err.split("no result for job ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().to_owned();
    assert!(err.contains(&format!("`enqueue cancel --id {id}`")), "{err}");
    let cancel = |id: &str| {
        Command::new(bin("enqueue")).arg("--state-dir").arg(state).args(["cancel", "--id", id]).output().unwrap()
    };
    let out = cancel(&id);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let q = thinpipe::queue::EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(q.depth()).unwrap(), 0, "taken back: no worker will run it");
    let again = cancel(&id);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains(&format!("no job {id} waits")));
    let wrong = Command::new(bin("enqueue"))
        .arg("--state-dir")
        .arg(state)
        .args(["cancel", "--id", &id, "--wait"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2), "a job option is refused: {}", String::from_utf8_lossy(&wrong.stderr));
}

/// A family whose prepare failed shows its last error in `worker images`, and is forgotten
/// once that is older than the run retention (here 0 days: at the next collection).
#[test]
fn a_failed_family_shows_its_error_and_ages_out() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let bad = state.join("images/bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("layer-1.tar"), b"this is not a tar archive, not even close....").unwrap();
    let out = worker(state, &[], &["run", "prepare", "--family", "bad", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let images = json(&worker(state, &[], &["images", "--json"]));
    let family = &images["families"][0];
    assert_eq!(family["family"], "bad", "{images}");
    assert!(family["last_error"].as_str().unwrap().contains("truncated or corrupt"), "{images}");
    let text = worker(state, &[], &["images"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("FAILED   last prepare at"), "{text:?}");
    // Kept within the retention, forgotten past it.
    let kept = json(&worker(state, &[], &["gc", "--json"]));
    assert_eq!(kept["families_forgotten"], serde_json::json!([]), "{kept}");
    let gone = json(&worker(state, &["engine.retention_days=0".into()], &["gc", "--json"]));
    assert_eq!(gone["families_forgotten"], serde_json::json!(["bad"]), "{gone}");
    let images = json(&worker(state, &[], &["images", "--json"]));
    assert_eq!(images["families"], serde_json::json!([]), "{images}");
}

/// Where the soak puts the state directory and the volumes.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// The state directory on a small filesystem; the volumes on the machine's disk.
    SmallState,
    /// The volumes on a small filesystem; the state directory on the disk.
    SmallVolumes,
    /// Both on one small filesystem (the default layout: volumes inside the state directory).
    Together,
}

/// The full-disk soak. Seeded (`THINPIPE_FULL_DISK_SEED` replays one; a failure prints it):
/// a daemon with its state directory and volumes on small filesystems of random sizes
/// (separately and together) gets a random mix of prepares of random sizes, activations and
/// releases while the filesystems are filled and freed at random moments. At the end, with
/// the space back: no live snapshot or sealed base lost or changed, no in-between artifact,
/// every job has its result (nothing dead-lettered for the host's fault), and the worker is
/// ready, unless the live snapshots and their bases fill the disk by themselves (then it
/// says `host full` and a collection pass finds nothing it may delete). A worker whose run
/// log refused a write exits 3 and is started again, as its supervisor would (at any
/// moment, the last wait for readiness included); nothing else restarts it.
#[test]
fn full_disk_soak() {
    use rand::{Rng, SeedableRng};
    use sha2::Digest as _;
    use thinpipe::queue::JobQueue;
    use thinpipe::volume::VolumeBackend;

    if thinpipe_tests::SmallTmpfs::new(1).is_none() {
        return;
    }
    let seed: u64 = match std::env::var("THINPIPE_FULL_DISK_SEED") {
        Ok(s) => s.parse().expect("THINPIPE_FULL_DISK_SEED is a number"),
        Err(_) => rand::random(),
    };
    eprintln!("full-disk soak seed {seed} (replay: THINPIPE_FULL_DISK_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let layout = [Layout::SmallState, Layout::SmallVolumes, Layout::Together][rng.random_range(0..3)];
    let size_mib = rng.random_range(48..=96);
    let small = thinpipe_tests::SmallTmpfs::new(size_mib).unwrap();
    let disk = tempfile::tempdir().unwrap();
    let (state, volumes) = match layout {
        Layout::SmallState => (small.mount.join("state"), disk.path().join("volumes")),
        Layout::SmallVolumes => (disk.path().join("state"), small.mount.join("volumes")),
        Layout::Together => (small.mount.join("state"), small.mount.join("state/volumes")),
    };
    std::fs::create_dir_all(&state).unwrap();
    eprintln!("seed {seed}: {layout:?}, {size_mib} MiB");
    // Families of random sizes; a version's content hash, to check snapshots against.
    let source = disk.path().join("src");
    let mut versions: std::collections::HashMap<String, String> = Default::default();
    let mut new_version = |rng: &mut rand::rngs::StdRng, family: &str| {
        let mib = rng.random_range(1..=(size_mib / 8).max(2)) as usize;
        let mut data = vec![0u8; mib << 20];
        rng.fill(&mut data[..]);
        let dir = source.join("images").join(family);
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(old.unwrap().path()).unwrap();
        }
        std::fs::write(dir.join(format!("layer-{}.tar", rng.random::<u32>())), tar_of_file("data.bin", &data)).unwrap();
        let digest = thinpipe_tests::prepare_run(&source, family);
        versions.insert(digest, hex::encode(sha2::Sha256::digest(&data)));
    };
    let families = ["web", "api", "db"];
    for f in families {
        new_version(&mut rng, f);
    }
    let queue_path = disk.path().join("queue.db");
    let env = [
        ("THINPIPE_SOURCE", source.to_str().unwrap().to_owned()),
        ("THINPIPE_VOLUMES_DIR", volumes.to_str().unwrap().to_owned()),
        ("THINPIPE_QUEUE_PATH", queue_path.to_str().unwrap().to_owned()),
        ("THINPIPE_CAPACITY_HIGH_PERCENT", "85".to_owned()),
        ("THINPIPE_CAPACITY_LOW_PERCENT", "80".to_owned()),
        ("THINPIPE_CAPACITY_REFUSE_PERCENT", "95".to_owned()),
        ("THINPIPE_GC_INTERVAL_SECS", "1".to_owned()),
        ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "5".to_owned()),
        ("THINPIPE_QUEUE_MAX_RECEIVES", "5".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let jobs = thinpipe::queue::EmbeddedQueue::open(&queue_path, "jobs", Duration::from_secs(5), 5).unwrap();
    let results = jobs.named("results");
    let log = disk.path().join("worker.log");
    let mut daemon = thinpipe_tests::Daemon::start_logging(&state, &log, &env);
    let mut restarts = 0;
    // A worker whose run log refused a write drains and exits 3, and its supervisor starts
    // it again (it may do so at any moment, the last results already sent included).
    let supervise = |daemon: &mut thinpipe_tests::Daemon, restarts: &mut u32| {
        if !daemon.is_running() {
            let status = daemon.wait_exit(Duration::from_secs(5));
            assert_eq!(status.code(), Some(3), "seed {seed}: the worker ended by itself: {status:?}\n{}", daemon.log());
            *restarts += 1;
            *daemon = thinpipe_tests::Daemon::start_logging(&state, &log, &env);
        }
    };

    // The actions, at random moments.
    let mut posted: Vec<(String, &str, String)> = Vec::new(); // message id, kind, invocation
    let mut live: Vec<(String, &str)> = Vec::new(); // invocation, family
    let mut fills: Vec<PathBuf> = Vec::new();
    let fill_targets = [small.mount.clone()];
    for n in 0..40 {
        let family = families[rng.random_range(0..families.len())];
        let roll = rng.random_range(0..100);
        let (kind, invocation) = if roll < 15 {
            if rng.random_bool(0.3) {
                new_version(&mut rng, family);
            }
            ("prepare", String::new())
        } else if roll < 55 {
            let inv = format!("inv-{n}");
            live.push((inv.clone(), family));
            ("activate", inv)
        } else if roll < 75 && !live.is_empty() {
            let (inv, _) = &live[rng.random_range(0..live.len())];
            ("release", inv.clone())
        } else if roll < 90 {
            // Fill the small filesystem, leaving a random little room.
            let target = &fill_targets[0];
            let leave = rng.random_range(0..4u64) << 20;
            let free = nix_free_bytes(target);
            let path = target.join(format!("filler-{n}"));
            if free > leave {
                // A write cut short by the full disk still fills it: keep whatever landed.
                let written = std::fs::write(&path, vec![9u8; (free - leave) as usize]);
                if written.is_ok() || path.exists() {
                    fills.push(path);
                }
            }
            continue;
        } else {
            for f in fills.drain(..) {
                std::fs::remove_file(f).unwrap();
            }
            continue;
        };
        // A release goes to its activation's family (a release naming another is refused).
        let family = match live.iter().position(|(i, _)| *i == invocation) {
            Some(at) if kind == "release" => live.swap_remove(at).1,
            _ => family,
        };
        let mut body = serde_json::json!({"v": 1, "kind": kind, "family": family, "reply_to": "results"});
        if !invocation.is_empty() {
            body["invocation_id"] = invocation.clone().into();
        }
        let id = rt.block_on(jobs.send("jobs", &body.to_string(), &Default::default())).unwrap();
        posted.push((id, kind, invocation));
        // Now and then, a moment for the worker (a condition, not a sleep: a result arrives).
        if rng.random_bool(0.3) {
            let seen = rt.block_on(results.stats()).map(|s| s.waiting).unwrap_or(0);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while rt.block_on(results.stats()).map(|s| s.waiting).unwrap_or(0) == seen
                && std::time::Instant::now() < deadline
                && daemon.is_running()
            {
                std::thread::yield_now();
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        supervise(&mut daemon, &mut restarts);
    }

    // The space comes back; the host heals and every job gets its result.
    for f in fills.drain(..) {
        std::fs::remove_file(f).unwrap();
    }
    let mut got: std::collections::HashMap<String, serde_json::Value> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while got.len() < posted.len() {
        supervise(&mut daemon, &mut restarts);
        for d in rt.block_on(results.receive(10, Duration::from_millis(200))).unwrap() {
            let r: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            got.insert(r["job_id"].as_str().unwrap().to_owned(), r);
            rt.block_on(results.ack(&d)).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: {} of {} jobs have no result; dead letters {:?}\non the small filesystem: {}\n{}",
            posted.len() - got.len(),
            posted.len(),
            rt.block_on(jobs.dead_letters()).unwrap(),
            String::from_utf8_lossy(&Command::new("du").args(["-a", "-k"]).arg(&small.mount).output().unwrap().stdout),
            daemon.log()
        );
    }
    assert!(rt.block_on(jobs.dead_letters()).unwrap().is_empty(), "seed {seed}: nothing dead-lettered");
    // Ready again, unless what the host must keep (live snapshots, on `dir` whole copies,
    // and their bases) fills it by itself: then "host full" is the truth, and a collection
    // pass finds nothing it may delete.
    let ready_by = std::time::Instant::now() + Duration::from_secs(60);
    let api = loop {
        supervise(&mut daemon, &mut restarts);
        // The address is there once the (restarted) worker listens.
        let Ok(api) = std::fs::read_to_string(state.join("admin.addr")).map(|a| a.trim().to_owned()) else {
            assert!(
                std::time::Instant::now() < ready_by,
                "seed {seed}: the worker never listened again\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let answer = reqwest::blocking::get(format!("{api}/readyz")).ok();
        let status = answer.as_ref().map(|r| r.status().as_u16());
        if status == Some(200) {
            break api;
        }
        if std::time::Instant::now() >= ready_by {
            let why = answer.map(|r| r.text().unwrap_or_default()).unwrap_or_else(|| "no answer".into());
            let du = Command::new("du").args(["-a", "-k"]).arg(&small.mount).output().unwrap().stdout;
            let du = String::from_utf8_lossy(&du);
            let reasons: Value = serde_json::from_str(&why).unwrap_or_default();
            let full_only = reasons["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().all(|x| x.as_str().is_some_and(|x| x.starts_with("host full: "))));
            assert!(
                full_only,
                "seed {seed}: not ready again within 60 s: {why}\non the small filesystem: {du}\n{}",
                daemon.log()
            );
            let gc: Value =
                reqwest::blocking::Client::new().post(format!("{api}/api/gc")).send().unwrap().json().unwrap();
            let nothing_to_delete = gc["deleted"].as_array().is_some_and(Vec::is_empty)
                && gc["blobs_deleted"] == 0
                && gc["evicted_families"].as_array().is_some_and(Vec::is_empty)
                && gc["eviction_skipped"].is_string();
            assert!(
                nothing_to_delete,
                "seed {seed}: still full with something to delete: {gc}\non the small filesystem: {du}\n{}",
                daemon.log()
            );
            eprintln!("seed {seed}: full of live snapshots and their bases, and says so: {why}");
            break api;
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    // Nothing live lost or changed; every sealed base whole; no in-between artifact.
    let store = Store::open(state.join("host.db")).unwrap();
    let mut checked = 0;
    for (id, kind, invocation) in &posted {
        let r = &got[id];
        if *kind != "activate" || r["status"] != "succeeded" {
            continue;
        }
        let row = store.snapshot_by_run(&format!("activate-{invocation}")).unwrap().unwrap();
        if row.state != SnapshotState::Exposed {
            continue; // released later in the soak
        }
        let path = Path::new(r["snapshot_path"].as_str().unwrap());
        let data = std::fs::read(path.join("data.bin"))
            .unwrap_or_else(|e| panic!("seed {seed}: live snapshot {invocation} lost: {e}"));
        let version = thinpipe::job::prepare_run_id(row.family.as_str(), r["digest"].as_str().unwrap());
        assert_eq!(
            versions.get(&version),
            Some(&hex::encode(sha2::Sha256::digest(&data))),
            "seed {seed}: {invocation} changed"
        );
        checked += 1;
    }
    let backend = thinpipe::volume::DirBackend::open(&volumes).unwrap();
    for base in store.list_bases().unwrap().iter().filter(|b| b.state == thinpipe::store::BaseState::Sealed) {
        assert!(backend.is_sealed(base.id).unwrap(), "seed {seed}: sealed base-{} lost", base.id);
    }
    let gc = reqwest::blocking::Client::new().post(format!("{api}/api/gc")).send().unwrap();
    assert!(gc.status().is_success(), "seed {seed}: gc: {}", gc.text().unwrap_or_default());
    assert_eq!(backend.leftovers().unwrap(), Vec::new(), "seed {seed}: in-between artifacts left");
    let failed = got.values().filter(|r| r["status"] == "failed").count();
    eprintln!(
        "seed {seed}: {} jobs, {failed} failed with a result, {checked} live snapshots checked, {restarts} restarts after a storage fault",
        posted.len()
    );
    daemon.stop(Duration::from_secs(30));
}

/// The worker as a real unprivileged user (`nobody`, through setpriv): an image with a
/// setuid file owned by uid 1000 is refused (`cause: host_setup`, naming the entry) unless
/// `images.rootless = true`, which applies it owned by the worker's user without the setuid
/// bit and says so in the result.
#[test]
fn a_worker_without_root_refuses_owners_it_cannot_keep_unless_rootless() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").is_err(), "the rootless test switches to nobody: it needs root");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    // The worker binary and the state directory where `nobody` can reach them.
    let worker_bin = home.join("worker");
    std::fs::copy(bin("worker"), &worker_bin).unwrap();
    let family = home.join("state/images/web");
    std::fs::create_dir_all(&family).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (path, uid, mode) in [("usr/bin/su", 1000u64, 0o4755u32), ("etc/motd", 0, 0o644)] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mode(mode);
        h.set_size(2);
        b.append_data(&mut h, path, &b"#!"[..]).unwrap();
    }
    std::fs::write(family.join("layer-1.tar"), b.into_inner().unwrap()).unwrap();
    let chown = Command::new("chown").args(["-R", "65534:65534"]).arg(home).status().unwrap();
    assert!(chown.success());
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |extra: &[&str], args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(&worker_bin);
        cmd.arg("--state-dir").arg(home.join("state")).args(extra).args(args);
        cmd.env("HOME", home).env_remove("THINPIPE_FAULT").output().unwrap()
    };
    let out = as_nobody(&[], &["run", "prepare", "--family", "web", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let r = json(&out);
    assert_eq!(r["cause"], "host_setup", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("owned by 1000:1000") && error.contains("images.rootless = true"), "{error}");

    let rootless = ["--set", "images.rootless=true"];
    let out = as_nobody(&rootless, &["run", "activate", "--family", "web", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = json(&out);
    assert_eq!((r["owners_dropped"].as_u64(), r["setid_stripped"].as_u64()), (Some(2), Some(1)), "{r}");
    assert!(r["detail"].as_str().unwrap().contains("images.rootless"), "{r}");
    let su = PathBuf::from(r["snapshot_path"].as_str().unwrap()).join("usr/bin/su");
    let meta = std::fs::metadata(&su).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (65534, 0o755), "owned by the worker's user, no setuid bit");
}
