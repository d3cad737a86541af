//! The pipeline end to end on one machine with the real `worker` daemon and `enqueue`
//! binaries and the embedded queue: prepare once, concurrent activations, a redelivered
//! activation, release; bad messages dead-lettered with their reason; a corrupt layer that
//! fails naming its blob and never marks the family prepared; `worker reconcile` finding and
//! deleting a planted orphan.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::queue::{EmbeddedQueue, JobQueue};
use thinpipe::store::Store;
use thinpipe::volume::{VolumeBackend, VolumeId};
use thinpipe_tests::{Daemon, bin, tree, wait_until};

fn enqueue(state: &Path, args: &[&str]) -> Command {
    let mut cmd = thinpipe_tests::enqueue_waiting(thinpipe_tests::To::State(state), 120);
    cmd.args(args);
    cmd
}

fn result(out: &Output) -> serde_json::Value {
    thinpipe_tests::job_result(out)
}

#[test]
fn prepare_once_activate_concurrently_redeliver_and_release_on_the_dir_backend() {
    let dir = tempfile::tempdir().unwrap();
    prepare_once_activate_concurrently_redeliver_and_release(dir.path(), &dir.path().join("volumes"), &[]);
}

#[test]
fn prepare_once_activate_concurrently_redeliver_and_release_on_btrfs() {
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let volumes = fs.mount.join("volumes");
    let env = [("THINPIPE_BACKEND", "btrfs"), ("THINPIPE_VOLUMES_DIR", volumes.to_str().unwrap())];
    prepare_once_activate_concurrently_redeliver_and_release(dir.path(), &volumes, &env);
}

fn prepare_once_activate_concurrently_redeliver_and_release(state: &Path, volumes: &Path, env: &[(&str, &str)]) {
    write_sample_family(state, "web").unwrap();
    let daemon = Daemon::start(state, env);

    let out = enqueue(state, &["prepare", "--family", "web"]).output().unwrap();
    assert!(out.status.success(), "{}", daemon.log());
    let prepared = result(&out);
    assert_eq!(prepared["status"], "succeeded");
    let base = prepared["base_vol_id"].as_u64().unwrap();

    // Three activations at once, each from its own enqueue process.
    let children: Vec<_> = (1..=3)
        .map(|i| {
            enqueue(state, &["activate", "--family", "web", "--invocation-id", &format!("inv-{i}")]).spawn().unwrap()
        })
        .collect();
    let mut paths = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", daemon.log());
        let r = result(&out);
        assert_eq!(r["base_vol_id"].as_u64(), Some(base), "all from the one base");
        paths.push(r["snapshot_path"].as_str().unwrap().to_owned());
    }
    let mut distinct = paths.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three distinct snapshots: {paths:?}");
    let base_tree = tree(&volumes.join(format!("bases/base-{base}")));
    assert!(base_tree.contains_key("etc/motd"));
    for p in &paths {
        assert_eq!(tree(Path::new(p)), base_tree, "{p} shares the base's content");
    }

    // A redelivered activation (same invocation id): the same snapshot, not a fourth.
    let again = result(&enqueue(state, &["activate", "--family", "web", "--invocation-id", "inv-1"]).output().unwrap());
    assert_eq!(again["snapshot_path"].as_str(), Some(paths[0].as_str()));
    let snaps = std::fs::read_dir(volumes.join("snaps")).unwrap().count();
    assert_eq!(snaps, 3);

    // Release one: only that one goes.
    let out = enqueue(state, &["release", "--family", "web", "--invocation-id", "inv-2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!Path::new(&paths[1]).exists());
    assert!(Path::new(&paths[0]).exists() && Path::new(&paths[2]).exists());

    assert!(daemon.stop(Duration::from_secs(60)).success());
    let store = Store::open(state.join("host.db")).unwrap();
    let image = store.image("web").unwrap().unwrap();
    assert!(image.current_base.is_some(), "the job loop made the version current");
    let snapshots = store.list_snapshots().unwrap();
    assert_eq!(snapshots.len(), 3, "one row per invocation");
    assert_eq!(store.next_id("base").unwrap(), 2, "one base was ever allocated");

    // `worker reconcile`: clean, then a planted orphan found, then deleted by --fix.
    let reconcile = |args: &[&str]| {
        let mut cmd = thinpipe_tests::worker();
        cmd.arg("--state-dir").arg(state).arg("reconcile").args(args).envs(env.iter().copied());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = reconcile(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("clean"), "{out}");
    let backend: Box<dyn VolumeBackend> = if env.iter().any(|(_, v)| *v == "btrfs") {
        Box::new(thinpipe::volume::BtrfsBackend::open(volumes).unwrap())
    } else {
        Box::new(thinpipe::volume::DirBackend::open(volumes).unwrap())
    };
    backend.snapshot(base, 9999).unwrap();
    let (code, out, err) = reconcile(&[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("orphan  snap-9999") && out.contains("--fix"), "{out}");
    assert!(backend.exists(VolumeId::Snap(9999)).unwrap(), "no --fix: nothing deleted");
    let (code, out, err) = reconcile(&["--fix", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("deleted an orphan volume"), "the deletion is logged: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["deleted"], serde_json::json!(["snap-9999"]));
    assert!(!backend.exists(VolumeId::Snap(9999)).unwrap());
    assert!(backend.exists(VolumeId::Base(base)).unwrap(), "a claimed volume is never deleted");
}

#[test]
fn bad_messages_are_dead_lettered_with_their_reason_and_the_worker_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let mut daemon = Daemon::start(state, &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let q = EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5).unwrap();
        let none = BTreeMap::new();
        let bad = [
            ("this is not json", "not JSON"),
            (r#"{"v":1,"kind":"explode","family":"web"}"#, "unknown variant `explode`"),
            (r#"{"v":1,"kind":"prepare"}"#, "missing field `family`"),
            (r#"{"v":1,"kind":"activate","family":"web","invocation_id":"../x"}"#, "invocation_id"),
            (r#"{"v":1,"kind":"prepare","family":"ghost","reply_to":"res"}"#, "ghost"),
        ];
        let mut ids = Vec::new();
        for (body, _) in &bad {
            ids.push(q.send("jobs", body, &none).await.unwrap());
        }
        // A good job after the bad ones: the worker carries on.
        q.send("jobs", r#"{"v":1,"kind":"prepare","family":"web","reply_to":"res"}"#, &none).await.unwrap();
        let res = q.named("res");
        let mut results = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while results.len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "results never came: {}", daemon.log());
            for d in res.receive(10, Duration::from_millis(500)).await.unwrap() {
                results.push(serde_json::from_str::<serde_json::Value>(&d.body).unwrap());
                res.ack(&d).await.unwrap();
            }
        }
        let ghost = results.iter().find(|r| r["family"] == "ghost").unwrap();
        assert_eq!(ghost["status"], "failed");
        assert!(results.iter().any(|r| r["family"] == "web" && r["status"] == "succeeded"));

        let dead = q.dead_letters().await.unwrap();
        assert_eq!(dead.len(), bad.len(), "{dead:?}");
        for ((body, reason), id) in bad.iter().zip(&ids) {
            let d = dead.iter().find(|d| &d.message_id == id).unwrap_or_else(|| panic!("{body} not dead-lettered"));
            assert_eq!(&d.body, body, "the message is kept as sent");
            assert!(d.reason.contains(reason), "{body}: reason {:?} should mention {reason:?}", d.reason);
        }
        assert_eq!(q.depth().await.unwrap(), 0, "nothing left behind, nothing silently dropped");
    });
    assert!(daemon.is_running(), "bad input crashed the worker: {}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("invalid job message"), "the worker logs what it refused: {log}");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

#[test]
fn a_corrupt_layer_fails_naming_the_blob_and_the_family_is_never_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let family = state.join("images/broken");
    std::fs::create_dir_all(&family).unwrap();
    // A gzip header, then garbage: a truncated, corrupt layer.
    std::fs::write(family.join("0001-base.tar.gz"), [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4, 5]).unwrap();
    let out = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(state)
        .args(["run", "prepare", "--family", "broken", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "exit code 1 = the job failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stderr.is_empty() && !out.stderr.contains(&0x1b), "logs to a pipe carry no colour codes");
    let r = result(&out);
    assert_eq!(r["status"], "failed");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("0001-base.tar.gz") && error.contains("stream_into_base"), "{error}");
    let store = Store::open(state.join("host.db")).unwrap();
    assert_eq!(store.image("broken").unwrap().unwrap().current_base, None);
    let base = store.list_bases().unwrap()[0].id;
    assert!(!state.join(format!("volumes/bases/base-{base}.sealed")).exists(), "the half-built base is not sealed");
}

#[test]
fn a_second_worker_refuses_naming_the_holder_and_a_dead_workers_lease_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let first = Daemon::start(state, &[]);
    first.wait_for_log("worker started", Duration::from_secs(30));
    let out = thinpipe_tests::worker().arg("--state-dir").arg(state).arg("daemon").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let holder = format!("pid:{}:", first.pid());
    assert!(stderr.contains("is in use by worker") && stderr.contains(&holder), "names the holder: {stderr}");

    // SIGKILL leaves the lease behind; the next worker takes it over at once.
    // One told to wait for the state directory waits, and a SIGTERM ends the wait cleanly.
    let patient = Daemon::start(state, &[("THINPIPE_WORKER_WAIT_FOR_STATE", "true")]);
    patient.wait_for_log("the state directory is in use; waiting", Duration::from_secs(30));
    let log = patient.log();
    let stopped = patient.stop(Duration::from_secs(30));
    assert!(stopped.success(), "a waiting worker stopped with {stopped:?}; its log:\n{log}");

    first.kill();
    let second = Daemon::start(state, &[]);
    second.wait_for_log("worker started", Duration::from_secs(30));
    assert!(second.log().contains("took over the worker lease"), "{}", second.log());
    assert!(second.stop(Duration::from_secs(60)).success());
}

#[test]
fn a_worker_stalled_past_its_lease_is_replaced_and_stops_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let common = [("THINPIPE_WORKER_LEASE_TTL_SECS", "3"), ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "2")];
    let mut armed = common.to_vec();
    armed.push(("THINPIPE_PAUSE", "prepare.unpack@web=3000"));
    let mut first = Daemon::start(state, &armed);
    let waiting = enqueue(state, &["prepare", "--family", "web"]).spawn().unwrap();
    first.wait_for_log("pause point prepare.unpack@web", Duration::from_secs(60));

    // Stalled (SIGSTOP) past its lease: a second worker that is told to wait takes over.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(first.pid() as libc::pid_t, libc::SIGSTOP) }, 0);
    let mut waiting_env = common.to_vec();
    waiting_env.push(("THINPIPE_WORKER_WAIT_FOR_STATE", "true"));
    let second_dir = state.to_path_buf();
    let second = Daemon::start(&second_dir, &waiting_env);
    second.wait_for_log("the state directory is in use; waiting", Duration::from_secs(30));
    second.wait_for_log("waiting for the previous worker to release the run log", Duration::from_secs(30));

    // Woken, the first notices it lost the lease and stops (exit 3), freeing the run log.
    assert_eq!(unsafe { libc::kill(first.pid() as libc::pid_t, libc::SIGCONT) }, 0);
    let status = first.wait_exit(Duration::from_secs(60));
    let first_log = first.log();
    assert!(first_log.contains("lost the worker lease"), "{first_log}");
    assert_eq!(status.code(), Some(3), "{first_log}");

    let out = waiting.wait_with_output().unwrap();
    let r = result(&out);
    assert_eq!(r["status"], "succeeded", "the second worker finished the job: {}", second.log());
    let log = second.log();
    let stopped = second.stop(Duration::from_secs(60));
    assert!(stopped.success(), "the second worker stopped with {stopped:?}; its log:\n{log}");
    let store = Store::open(state.join("host.db")).unwrap();
    assert!(store.image("web").unwrap().unwrap().current_base.is_some());
    assert_eq!(store.next_id("base").unwrap(), 2, "one base, whoever finished it");
}

/// On a fresh host the daemon makes its state directory, as `run` and `demo` do.
#[test]
fn the_daemon_makes_its_state_directory_on_a_fresh_host() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("srv/thinpipe");
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut child = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(&state)
        .args(["--set", "admin.listen=127.0.0.1:0", "daemon"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    thinpipe_tests::wait_until("the daemon to listen", Duration::from_secs(60), || state.join("admin.addr").exists());
    // SAFETY: kill(2) on the child we spawned, with a valid signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(status.success(), "{status:?}: {log}");
    assert!(state.join("host.db").exists() && state.join("queue.db").exists(), "{log}");
}

/// `enqueue` refuses a state directory that does not exist instead of making a queue that no
/// worker reads.
#[test]
fn enqueue_refuses_a_state_directory_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("thinpipee");
    let out = Command::new(bin("enqueue"))
        .arg("--state-dir")
        .arg(&typo)
        .args(["prepare", "--family", "web"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(!typo.exists(), "nothing was created");
}

/// `worker --version` names the commit and says when the binary is a test build (these
/// tests run binaries built with the fault points in).
#[test]
fn the_version_names_the_commit_and_a_test_build() {
    let out = thinpipe_tests::worker().arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("worker 0.") && text.contains("(commit "), "{text}");
    assert!(text.contains("TEST BUILD: fault points compiled in"), "{text}");
}

/// A bootstrap-made image (`debootstrap`, `mmdebstrap`, `docker import`) carries device nodes
/// in `dev/`: skipped by default, with one warning naming how many, and counted in the
/// result; `images.devices = "refuse"` fails the prepare naming the entry.
#[test]
fn device_nodes_are_skipped_with_one_warning_and_counted_or_refused_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let family = state.join("images/bootstrap");
    std::fs::create_dir_all(&family).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, minor) in [("dev/null", 3), ("dev/zero", 5), ("dev/console", 1)] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Char);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_device_major(if name == "dev/console" { 5 } else { 1 }).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_size(0);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(5);
    h.set_path("etc/hostname").unwrap();
    h.set_cksum();
    b.append(&h, &b"boot\n"[..]).unwrap();
    std::fs::write(family.join("0001-rootfs.tar"), b.into_inner().unwrap()).unwrap();
    let prepare = |state: &Path, extra: &[&str]| {
        thinpipe_tests::worker()
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .args(["run", "prepare", "--family", "bootstrap", "--source"])
            .arg(dir.path())
            .arg("--json")
            .output()
            .unwrap()
    };

    let out = prepare(&state.join("skip"), &[]);
    let r = result(&out);
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["devices_skipped"], 3, "{r}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("device nodes")).collect();
    assert_eq!(warnings.len(), 1, "one warning line: {stderr}");
    assert!(warnings[0].contains("skipped 3 device nodes") && warnings[0].contains("images.devices"), "{stderr}");
    let base = state.join("skip/volumes/bases/base-1");
    assert_eq!(std::fs::read_to_string(base.join("etc/hostname")).unwrap(), "boot\n");
    assert!(!base.join("dev/null").exists());

    let out = prepare(&state.join("refuse"), &["--set", "images.devices=refuse"]);
    let r = result(&out);
    assert_eq!(r["status"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("dev/null") && error.contains("device nodes are refused"), "{error}");
}

/// `worker runs list --json | head -c 100` and the like: a command whose output pipe is
/// closed ends quietly (SIGPIPE, as Unix tools do), never with a panic and a backtrace.
#[test]
fn commands_end_quietly_when_their_output_pipe_is_closed() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let s = state.to_str().unwrap();
    let commands: [(&str, Vec<&str>); 4] = [
        ("worker", vec!["--state-dir", s, "config"]),
        ("worker", vec!["--state-dir", s, "run", "prepare", "--family", "web", "--json"]),
        ("worker", vec!["--state-dir", s, "images", "--json"]),
        ("enqueue", vec!["--state-dir", s, "prepare", "--family", "web"]),
    ];
    for (binary, args) in commands {
        // A pipe whose reading end is closed before the command starts: its first write fails.
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created and are owned here alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let out = Command::new(bin(binary)).args(&args).stdout(Stdio::from(write)).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{binary} {args:?}: {stderr}");
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{binary} {args:?} ended with {:?}: {stderr}",
            out.status
        );
    }
}

/// A job dead-lettered for a cause since fixed (its family did not exist yet) is sent back
/// with `enqueue dead-letters redrive` and runs; `list` and `purge` show and delete.
#[test]
fn dead_letters_are_listed_redriven_after_a_fix_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let daemon = Daemon::start(state, &[]);
    let run = |args: &[&str]| Command::new(bin("enqueue")).arg("--state-dir").arg(state).args(args).output().unwrap();
    let list = || -> Vec<serde_json::Value> {
        let out = run(&["--json", "dead-letters", "list"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    for family in ["ghost", "phantom"] {
        assert!(run(&["prepare", "--family", family]).status.success());
    }
    wait_until("both jobs dead-lettered", Duration::from_secs(30), || list().len() == 2);
    let dead = list();
    let id_of = |family: &str| {
        let d = dead.iter().find(|d| d["reason"].as_str().unwrap().contains(family));
        d.unwrap_or_else(|| panic!("the reason names the family {family}: {dead:?}"))["message_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (ghost, phantom) = (id_of("ghost"), id_of("phantom"));
    let (ghost, phantom) = (ghost.as_str(), phantom.as_str());

    write_sample_family(state, "ghost").unwrap();
    let out = run(&["--json", "dead-letters", "redrive", "--id", ghost]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["redriven"], 1);
    let store = Store::open(state.join("host.db")).unwrap();
    wait_until("the redriven prepare to run", Duration::from_secs(60), || {
        store.image("ghost").unwrap().is_some_and(|i| i.current_base.is_some())
    });
    assert_eq!(list().len(), 1, "the other stays");

    // Mistakes: neither --id nor --all, an unknown id, an SQS queue.
    assert_eq!(run(&["dead-letters", "purge"]).status.code(), Some(2));
    assert_eq!(run(&["dead-letters", "purge", "--id", "424242"]).status.code(), Some(1));
    let sqs = run(&["--queue-url", "https://sqs.example/q", "dead-letters", "list"]);
    assert_eq!(sqs.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&sqs.stderr).contains("start-message-move-task"));

    let out = run(&["dead-letters", "purge", "--id", phantom]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(list().is_empty());

    // Every job is logged when received and when done (outcome, duration); failures of any
    // cause at WARN: dead-lettered above, failed here (an activation of a released invocation).
    let wait = |args: &[&str]| enqueue(state, args).output().unwrap();
    assert!(wait(&["release", "--family", "ghost", "--invocation-id", "gone"]).status.success());
    assert_eq!(wait(&["activate", "--family", "ghost", "--invocation-id", "gone"]).status.code(), Some(1));
    // "job done" is written after the result is sent and the message acked: waited for.
    let logged = |log: &str| {
        let at = |level: &str, outcome: &str| {
            log.lines().any(|l| {
                l.contains("job done")
                    && l.contains(level)
                    && l.contains(&format!("outcome=\"{outcome}\""))
                    && l.contains("duration_ms")
            })
        };
        log.lines().filter(|l| l.contains("job received")).count() >= 5
            && at("INFO", "succeeded")
            && at("WARN", "failed")
            && at("WARN", "dead_lettered")
    };
    wait_until("every job logged when received and done", Duration::from_secs(30), || logged(&daemon.log()));
    assert!(daemon.stop(Duration::from_secs(30)).success());
}

/// `enqueue --json` without `--wait` prints what it posted (message id, run id, queue) as JSON.
#[test]
fn enqueue_json_without_wait_prints_the_posted_message() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let out = Command::new(bin("enqueue"))
        .arg("--state-dir")
        .arg(state)
        .args(["--json", "activate", "--family", "web", "--invocation-id", "inv-9"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let posted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((posted["kind"].as_str(), posted["run_id"].as_str()), (Some("activate"), Some("activate-inv-9")));
    let queue = EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got = rt.block_on(queue.receive(10, Duration::ZERO)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(posted["message_id"].as_str(), Some(got[0].message_id.as_str()));
}

/// The README's first command: the demo prepares and activates, says how to release the
/// snapshots it leaves, and the printed command releases them.
#[test]
fn the_demo_runs_and_says_how_to_release_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = thinpipe_tests::worker().arg("--state-dir").arg(&state).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let releases: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("worker --state-dir")).collect();
    assert_eq!(releases.len(), 2, "{stdout}");
    let store = Store::open(state.join("host.db")).unwrap();
    let live = || {
        store.list_snapshots().unwrap().iter().filter(|s| s.state == thinpipe::store::SnapshotState::Exposed).count()
    };
    assert_eq!(live(), 2);
    for line in releases {
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = thinpipe_tests::worker().args(&words[1..]).output().unwrap();
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(live(), 0, "the printed commands released both snapshots");

    // The same as JSON on stdout (the narration on stderr), and the configuration too.
    let out = thinpipe_tests::worker().arg("--state-dir").arg(&state).args(["demo", "--json"]).output().unwrap();
    let demo: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(demo["ok"], true, "{demo}");
    assert_eq!((demo["results"].as_array().unwrap().len(), demo["release_commands"].as_array().unwrap().len()), (3, 2));
    let out = thinpipe_tests::worker().arg("--state-dir").arg(&state).args(["config", "--json"]).output().unwrap();
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["state_dir"].as_str(), state.to_str());
}

/// Mistakes in where images come from are named as such, before anything else is tried.
#[test]
fn a_missing_source_directory_and_bad_publish_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["run", "prepare", "--family", "web", "--json", "--source"])
        .arg(&missing)
        .output()
        .unwrap();
    let r = result(&out);
    let error = r["error"].as_str().unwrap();
    assert!(error.contains(&format!("the source directory {} does not exist", missing.display())), "{error}");

    write_sample_family(dir.path(), "web").unwrap();
    let publish = |src: &Path, to: &str| {
        Command::new(bin("enqueue")).args(["publish"]).arg(src).args(["--family", "web", "--to", to]).output().unwrap()
    };
    for (src, to, says) in [
        (dir.path(), "./out", "expected s3://bucket/prefix"),
        (missing.as_path(), "s3://bucket/p", "is not a directory"),
        (&dir.path().join("images"), "s3://bucket/p", "neither an OCI layout"),
    ] {
        let out = publish(src, to);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{src:?} {to}: {stderr}");
        assert!(stderr.contains(says) && stderr.lines().count() == 1, "one line naming the mistake: {stderr}");
    }

    // `publish` takes its own options; the job options are neither in its help nor accepted.
    let help = Command::new(bin("enqueue")).args(["publish", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let listed = help.split_once("Options:").map_or("", |(_, options)| options);
    let options: Vec<&str> = listed.split_whitespace().filter(|w| w.starts_with("--")).collect();
    let own = ["--family", "--to", "--plain-http", "--ca-file", "--docker-config", "--endpoint-url"];
    let own_too = ["--platform", "--policy-file", "--json", "--help"];
    assert_eq!(options, [&own[..], &own_too[..]].concat(), "{help}");
    for misplaced in [&["--wait", "publish"][..], &["publish", "--queue-url", "https://sqs.example/q"]] {
        let out = Command::new(bin("enqueue"))
            .args(misplaced)
            .arg(dir.path())
            .args(["--family", "web", "--to", "s3://bucket/p"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{misplaced:?}: {stderr}");
        assert!(stderr.contains("does not apply to `enqueue publish`"), "{stderr}");
    }
}

/// `worker runs list|show` with no worker running (after `worker run` or the demo, or with
/// the address file a killed worker left) reads the run log itself.
#[test]
fn runs_list_and_show_work_without_a_running_worker() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let worker = |args: &[&str]| thinpipe_tests::worker().arg("--state-dir").arg(state).args(args).output().unwrap();
    let out = worker(&["runs", "list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run log"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!state.join("runs.redb").exists(), "reading creates nothing");

    let prepared = result(&worker(&["run", "prepare", "--family", "web", "--json"]));
    let run_id = prepared["run_id"].as_str().unwrap();
    // A worker killed earlier left its address file; nothing answers there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for stale in [false, true] {
        if stale {
            std::fs::write(state.join("admin.addr"), format!("http://{closed}")).unwrap();
        }
        let out = worker(&["runs", "list", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert!(runs.iter().any(|r| r["id"] == run_id && r["status"] == "completed"), "{runs:?}");
        let out = worker(&["runs", "show", run_id]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(run_id) && text.contains("completed"), "{text}");
    }
    let out = worker(&["runs", "show", "no-such-run"]);
    // Naming a run that is not there is a usage error (2), through the API or the log.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run no-such-run"));
}

/// An error's cause is said once: `worker --state-dir /proc/x demo` names the path and the
/// OS error, not the OS error twice.
#[test]
fn an_error_says_its_cause_once() {
    let out = thinpipe_tests::worker().args(["--state-dir", "/proc/thinpipe-no-such-dir", "demo"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("/proc/thinpipe-no-such-dir"), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}
