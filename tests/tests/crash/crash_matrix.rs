//! The crash matrix: for every fault point of `prepare`, `activate`, `release` and the job
//! loop, on the `dir`, `overlay` and `btrfs` backends and the embedded and SQS queues (overlay
//! on the embedded queue: the queue's part is the same), a real worker is
//! killed there (SIGKILL from inside, no cleanup), a fresh worker takes over, and the
//! invariants hold: every job completes exactly once, the family has exactly one base, the
//! invocation exactly one snapshot (none once released), every volume is claimed by a record
//! and every record's volume exists, the run history shows the resume, and no message is
//! lost. The release cells cover a release after its activation, a release posted together
//! with its activation (killed once the release is recorded, wherever the activation is),
//! and a release with no activation (the tombstone, which then refuses the activation).
//! The lifecycle cells roll `web` forward to a second version and collect the first once its
//! snapshot is released, killed at the version switch, at garbage collection's mark, and
//! around the deletion of the old base: no live snapshot's base is ever deleted, nothing is
//! orphaned, and the old base is gone in the end.
//!
//! One fault point: `THINPIPE_CRASH_POINT=gc.before_delete@retire-base-1 cargo test -p
//! thinpipe-tests --test crash crash_matrix::` (the prepare run of the sample family is
//! `prepare-web@<digest prefix>`). A failure names the point, the backend and the queue.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::store::Store;
use thinpipe::volume::{BtrfsBackend, DirBackend, OverlayBackend, OverlayOptions, VolumeBackend, VolumeId};
use thinpipe_tests::{Daemon, wait_until};

const PREPARE_STEPS: [&str; 3] = ["fetch_manifest", "prepare_thin_base", "stream_into_base"];
const ACTIVATE_STEPS: [&str; 1] = ["activate_snapshot"];

/// Every fault point the two jobs (prepare web, activate web/inv-1) pass through, and
/// whether a crash there leaves a run to resume. A run's start is committed with its first
/// transition, so a crash before that commit leaves nothing to resume: the redelivered job
/// starts the run again, and the guards make it find and finish the same base or snapshot.
fn fault_points() -> Vec<(String, bool)> {
    let mut points = Vec::new();
    let prepare = web_run();
    for (run, steps) in [(prepare.as_str(), &PREPARE_STEPS[..]), ("activate-inv-1", &ACTIVATE_STEPS[..])] {
        for (i, step) in steps.iter().enumerate() {
            for at in ["fsm.before_step", "fsm.before_commit", "fsm.after_commit"] {
                let before_first_commit = i == 0 && at != "fsm.after_commit";
                // After the last step's commit the run is finished: nothing to resume.
                let finished = i + 1 == steps.len() && at == "fsm.after_commit";
                points.push((format!("{at}@{run}/{step}"), !before_first_commit && !finished));
            }
        }
    }
    for p in [
        "prepare.after_base_intent@web",
        "prepare.after_base_create@web",
        "prepare.after_layer_applied@web",
        "prepare.after_seal@web",
    ] {
        points.push((p.to_owned(), true));
    }
    // Inside activate's one step: before its first (and only) commit. The first activation on
    // a host reserves a batch of snapshot ids, durably, before it binds one.
    for p in [
        "snapshots.after_reserve@snap",
        "activate.after_snapshot_intent@activate-inv-1",
        "activate.after_snapshot_create@activate-inv-1",
    ] {
        points.push((p.to_owned(), false));
    }
    let switch = format!("lifecycle.before_make_current@web@{}", &prepare["prepare-web@".len()..]);
    for p in [switch.as_str(), "jobloop.before_ack@prepare-web", "jobloop.before_ack@activate-inv-1"] {
        points.push((p.to_owned(), false));
    }
    if let Ok(only) = std::env::var("THINPIPE_CRASH_POINT") {
        points.retain(|(p, _)| *p == only);
    }
    points
}

/// The prepare run of the sample family `web` (its digest is fixed).
fn web_run() -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        write_sample_family(dir.path(), "web").unwrap();
        thinpipe_tests::prepare_run(dir.path(), "web")
    })
    .clone()
}

/// The lifecycle cells: v1 prepared and activated (inv-1), v2 published, prepared (the
/// switch) and activated (inv-2), inv-1 released, base 1 collected.
fn lifecycle_points() -> Vec<String> {
    let mut points = vec![
        "gc.after_mark@retire-base-1".to_owned(),
        "fsm.before_step@retire-base-1/delete_base_volume".to_owned(),
        "gc.before_delete@retire-base-1".to_owned(),
        "gc.after_delete@retire-base-1".to_owned(),
        "fsm.after_commit@retire-base-1/delete_base_volume".to_owned(),
        "fsm.before_commit@retire-base-1/forget_base".to_owned(),
    ];
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    publish_v2(dir.path());
    let v2 = thinpipe_tests::prepare_run(dir.path(), "web");
    points.push(format!("lifecycle.before_make_current@web@{}", &v2["prepare-web@".len()..]));
    if let Ok(only) = std::env::var("THINPIPE_CRASH_POINT") {
        points.retain(|p| *p == only);
    }
    points
}

/// Adds a layer to the sample family `web` in `state`: its second version.
fn publish_v2(state: &Path) {
    let layer = thinpipe_tests::tar_of_file("etc/version", b"v2\n");
    std::fs::write(state.join("images/web/0099-v2.tar"), layer).unwrap();
}

/// How a release cell posts its jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReleaseCase {
    /// Activate inv-1, wait for it, then release it.
    After,
    /// Activate and release inv-1 at the same time.
    Together,
    /// Release inv-1 that was never activated (a tombstone), then activate it.
    Tombstone,
}

/// The release cells: fault point, case.
fn release_points() -> Vec<(String, ReleaseCase)> {
    let mut points = Vec::new();
    for at in [
        "release.after_request@release-inv-1",
        "fsm.before_step@release-inv-1/release_snapshot",
        "release.after_delete@release-inv-1",
        "fsm.before_commit@release-inv-1/release_snapshot",
        "fsm.after_commit@release-inv-1/release_snapshot",
        "jobloop.before_ack@release-inv-1",
    ] {
        points.push((at.to_owned(), ReleaseCase::After));
    }
    points.push(("release.after_request@release-inv-1".to_owned(), ReleaseCase::Together));
    points.push(("release.after_request@release-inv-1".to_owned(), ReleaseCase::Tombstone));
    points.push(("fsm.after_commit@release-inv-1/release_snapshot".to_owned(), ReleaseCase::Tombstone));
    if let Ok(only) = std::env::var("THINPIPE_CRASH_POINT") {
        points.retain(|(p, _)| *p == only);
    }
    points
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Dir,
    Overlay,
    Btrfs,
}

/// Where jobs go: the embedded queue, or SQS queues on moto.
enum Queue {
    Embedded,
    Sqs { endpoint: String, jobs: String },
}

const AWS_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

impl Queue {
    fn sqs(endpoint: String) -> Queue {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (config, _) = rt.block_on(thinpipe::aws::test_config(&endpoint));
        let client = thinpipe::aws::sqs_client(&config);
        let name = format!("crash-{:x}", rand::random::<u64>());
        let out = rt.block_on(client.create_queue().queue_name(name).send()).unwrap();
        Queue::Sqs { endpoint, jobs: out.queue_url().unwrap().to_owned() }
    }

    fn worker_env(&self) -> Vec<(&str, &str)> {
        match self {
            Queue::Embedded => Vec::new(),
            Queue::Sqs { endpoint, jobs } => {
                let mut env = vec![
                    ("THINPIPE_QUEUE_KIND", "sqs"),
                    ("THINPIPE_QUEUE_URL", jobs.as_str()),
                    ("THINPIPE_AWS_ENDPOINT", endpoint.as_str()),
                ];
                env.extend(AWS_ENV);
                env
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Queue::Embedded => "embedded",
            Queue::Sqs { .. } => "sqs",
        }
    }

    /// Posts a job and waits for its result in the background.
    fn post(&self, state: &Path, job: &[&str]) -> Child {
        let mut cmd = thinpipe_tests::enqueue_waiting(thinpipe_tests::To::State(state), 120);
        if let Queue::Sqs { endpoint, jobs } = self {
            cmd.args(["--queue-url", jobs, "--endpoint-url", endpoint]).envs(AWS_ENV);
        }
        cmd.args(job).spawn().unwrap()
    }

    /// Messages left: visible, in flight, or dead-lettered.
    fn leftovers(&self, state: &Path) -> u64 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        match self {
            Queue::Embedded => {
                let q =
                    thinpipe::queue::EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5)
                        .unwrap();
                rt.block_on(q.depth()).unwrap() + rt.block_on(q.dead_letters()).unwrap().len() as u64
            }
            Queue::Sqs { endpoint, jobs } => {
                use aws_sdk_sqs::types::QueueAttributeName as A;
                let (config, _) = rt.block_on(thinpipe::aws::test_config(endpoint));
                let client = thinpipe::aws::sqs_client(&config);
                let out =
                    rt.block_on(client.get_queue_attributes().queue_url(jobs).attribute_names(A::All).send()).unwrap();
                let attrs = out.attributes().unwrap();
                let n = |a: A| attrs.get(&a).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                n(A::ApproximateNumberOfMessages) + n(A::ApproximateNumberOfMessagesNotVisible)
            }
        }
    }
}

/// A state directory and its volume root (on a loop-mounted btrfs for that backend).
struct Host {
    /// Killed workers leave overlay snapshots mounted: unmounted here, pass or fail, before
    /// the state directory goes (fields drop in order).
    _mounts: Option<thinpipe_tests::UnmountOverlays>,
    state: tempfile::TempDir,
    volumes: PathBuf,
    backend: Backend,
    _btrfs: Option<thinpipe::volume::testfs::LoopBtrfs>,
}

impl Host {
    fn new(backend: Backend) -> Option<Host> {
        let state = tempfile::tempdir().unwrap();
        let (volumes, btrfs) = match backend {
            Backend::Dir => (state.path().join("volumes"), None),
            Backend::Overlay => {
                if let Err(e) = OverlayBackend::probe(state.path()) {
                    assert!(std::env::var("CI").is_err(), "the overlay crash matrix needs root: {e}");
                    eprintln!("skipped: overlayfs cannot mount here ({e})");
                    return None;
                }
                (state.path().join("volumes"), None)
            }
            Backend::Btrfs => {
                let fs = thinpipe::volume::testfs::LoopBtrfs::new()?;
                (fs.mount.join("volumes"), Some(fs))
            }
        };
        write_sample_family(state.path(), "web").unwrap();
        let _mounts = matches!(backend, Backend::Overlay).then(|| thinpipe_tests::UnmountOverlays(volumes.clone()));
        Some(Host { _mounts, state, volumes, backend, _btrfs: btrfs })
    }

    fn env<'a>(&'a self, queue: &'a Queue) -> Vec<(&'a str, &'a str)> {
        let mut env = queue.worker_env();
        env.push(("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "2"));
        env.push(("THINPIPE_VOLUMES_DIR", self.volumes.to_str().unwrap()));
        match self.backend {
            Backend::Dir => env.push(("THINPIPE_BACKEND", "dir")),
            Backend::Overlay => env.push(("THINPIPE_BACKEND", "overlay")),
            Backend::Btrfs => env.push(("THINPIPE_BACKEND", "btrfs")),
        }
        env
    }

    /// A worker that SIGKILLs itself at fault `point`.
    fn armed_worker(&self, queue: &Queue, point: &str) -> Daemon {
        let mut armed = self.env(queue);
        armed.push(("THINPIPE_FAULT", point));
        Daemon::start(self.state.path(), &armed)
    }

    fn backend(&self) -> Box<dyn VolumeBackend> {
        match self.backend {
            Backend::Dir => Box::new(DirBackend::open(&self.volumes).unwrap()),
            Backend::Overlay => Box::new(OverlayBackend::open(&self.volumes, OverlayOptions::default()).unwrap()),
            Backend::Btrfs => Box::new(BtrfsBackend::open(&self.volumes).unwrap()),
        }
    }
}

fn result(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

/// One cell of the matrix.
fn crash_at(point: &str, resumes: bool, backend: Backend, queue: &Queue) {
    let Some(host) = Host::new(backend) else { return };
    let state = host.state.path();
    let ctx = format!("fault point {point}, backend {backend:?}, queue {}", queue.name());
    let mut first = host.armed_worker(queue, point);
    let prepare = queue.post(state, &["prepare", "--family", "web"]);
    let activate = queue.post(state, &["activate", "--family", "web", "--invocation-id", "inv-1"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while first.is_running() {
        if std::time::Instant::now() > deadline {
            let posted: Vec<String> = [prepare, activate]
                .into_iter()
                .map(|mut c| {
                    thinpipe_tests::kill(&mut c);
                    let out = c.wait_with_output().unwrap();
                    String::from_utf8_lossy(&out.stderr).into_owned()
                })
                .collect();
            panic!("{ctx}: the worker never reached the fault point:\n{}\nenqueue: {posted:#?}", first.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(first.log().contains(&format!("fault point {point} armed")), "{ctx}: died elsewhere:\n{}", first.log());

    let second = Daemon::start(state, &host.env(queue));
    let (prepared, activated) = (result(prepare), result(activate));
    // A message whose result went out before the crash comes back after its visibility
    // timeout; the new worker returns the stored outcome and acks it. Nothing stays behind.
    wait_until(&format!("{ctx}: every message acked"), Duration::from_secs(60), || queue.leftovers(state) == 0);
    let log = second.log();
    assert!(second.stop(Duration::from_secs(60)).success(), "{ctx}");
    assert_eq!(prepared["status"], "succeeded", "{ctx}: {prepared}\n{log}");
    assert_eq!(activated["status"], "succeeded", "{ctx}: {activated}\n{log}");

    // Exactly one base and one snapshot, each claimed by its record, and nothing else.
    let store = Store::open(state.join("host.db")).unwrap();
    let base = store.image("web").unwrap().unwrap().current_base.unwrap_or_else(|| panic!("{ctx}: no current version"));
    assert_eq!(store.next_id("base").unwrap(), 2, "{ctx}: one base id was ever allocated");
    let snaps = store.list_snapshots().unwrap();
    assert_eq!(snaps.len(), 1, "{ctx}: one snapshot row for inv-1");
    assert_eq!(snaps[0].run_id, "activate-inv-1");
    assert_eq!(activated["snapshot_path"].as_str(), snaps[0].path.as_deref(), "{ctx}");
    let volumes = host.backend().list().unwrap();
    assert_eq!(volumes, [VolumeId::Base(base), VolumeId::Snap(snaps[0].id)], "{ctx}: no orphan, nothing missing");
    assert!(host.backend().is_sealed(base).unwrap(), "{ctx}");

    // The history shows one run: picked up again where it had committed something, or
    // started afresh by the redelivered job where it had not.
    let prepare = web_run();
    let run = if point.contains("inv-1") { "activate-inv-1" } else { prepare.as_str() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let engine = rt.block_on(thinpipe::fsm::Engine::open(state.join("runs.redb"), Default::default())).unwrap();
    let detail = engine.run_detail(run).unwrap().unwrap();
    let events: Vec<String> = detail.events.iter().map(|e| format!("{:?}", e.kind)).collect();
    // The switch to the new version may come from the activation, which can find the base
    // sealed (its step marks it in SQLite before the run's last commit) and make it current
    // while the prepare run is one commit short: then the run resumes, finds the base sealed
    // and only commits. Either history is right there; everywhere else it is exact.
    if !point.starts_with("lifecycle.before_make_current") {
        assert_eq!(events.iter().any(|e| e.starts_with("Resumed")), resumes, "{ctx}: {run} resumed: {events:#?}");
    }
    assert_eq!(events.iter().filter(|e| e.starts_with("Started")).count(), 1, "{ctx}: one run, not a new one");
    rt.block_on(engine.shutdown());
    assert!(!log.contains("dead-lettering"), "{ctx}: nothing was dead-lettered:\n{log}");
}

/// One release cell: the worker dies at `point` while releasing inv-1 (see [`ReleaseCase`]).
fn release_crash_at(point: &str, case: ReleaseCase, backend: Backend, queue: &Queue) {
    let Some(host) = Host::new(backend) else { return };
    let state = host.state.path();
    let ctx = format!("fault point {point} ({case:?}), backend {backend:?}, queue {}", queue.name());
    let mut first = host.armed_worker(queue, point);
    let prepared = result(queue.post(state, &["prepare", "--family", "web"]));
    assert_eq!(prepared["status"], "succeeded", "{ctx}: {prepared}");
    let activate = ["activate", "--family", "web", "--invocation-id", "inv-1"];
    let release = ["release", "--family", "web", "--invocation-id", "inv-1"];
    let (activating, releasing) = match case {
        ReleaseCase::After => {
            let activated = result(queue.post(state, &activate));
            assert_eq!(activated["status"], "succeeded", "{ctx}: {activated}");
            (None, queue.post(state, &release))
        }
        ReleaseCase::Together => (Some(queue.post(state, &activate)), queue.post(state, &release)),
        ReleaseCase::Tombstone => (None, queue.post(state, &release)),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while first.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "{ctx}: the worker never reached the fault point:\n{}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(first.log().contains(&format!("fault point {point} armed")), "{ctx}: died elsewhere:\n{}", first.log());

    let second = Daemon::start(state, &host.env(queue));
    let released = result(releasing);
    assert_eq!(released["status"], "succeeded", "{ctx}: {released}\n{}", second.log());
    if let Some(activating) = activating {
        let activated = result(activating);
        let refused = activated["error"].as_str().is_some_and(|e| e.contains("invocation inv-1 was released at"));
        assert!(activated["status"] == "succeeded" || refused, "{ctx}: {activated}");
    }
    if case == ReleaseCase::Tombstone {
        // The invocation id is spent: a later activation is refused, naming the release.
        let activated = result(queue.post(state, &activate));
        assert_eq!(activated["status"], "failed", "{ctx}: {activated}");
        let err = activated["error"].as_str().unwrap_or_default();
        assert!(err.contains("invocation inv-1 was released at") && err.contains("new invocation id"), "{ctx}: {err}");
    }
    wait_until(&format!("{ctx}: every message acked"), Duration::from_secs(60), || queue.leftovers(state) == 0);
    let log = second.log();
    assert!(second.stop(Duration::from_secs(60)).success(), "{ctx}");

    // The invocation's row is released and nothing of it is on disk: only the base is left.
    let store = Store::open(state.join("host.db")).unwrap();
    let base = store.image("web").unwrap().unwrap().current_base.unwrap();
    let snaps = store.list_snapshots().unwrap();
    assert_eq!(snaps.len(), 1, "{ctx}: one row for inv-1: {snaps:?}");
    assert_eq!(snaps[0].state, thinpipe::store::SnapshotState::Released, "{ctx}");
    match case {
        ReleaseCase::After => assert!(!snaps[0].is_tombstone(), "{ctx}: {:?}", snaps[0]),
        ReleaseCase::Tombstone => assert!(snaps[0].is_tombstone(), "{ctx}: {:?}", snaps[0]),
        ReleaseCase::Together => {} // either came first
    }
    assert_eq!(host.backend().list().unwrap(), [VolumeId::Base(base)], "{ctx}: the snapshot is gone, nothing orphaned");
    let report = thinpipe::reconcile::reconcile(&store, host.backend().as_ref(), false).unwrap();
    assert!(report.is_clean() && report.missing.is_empty(), "{ctx}: {report:?}");
    assert!(!log.contains("dead-lettering"), "{ctx}: nothing was dead-lettered:\n{log}");
}

/// One lifecycle cell: the worker dies at `point` while a second version rolls out and the
/// first is collected.
fn lifecycle_crash_at(point: &str, backend: Backend, queue: &Queue) {
    let Some(host) = Host::new(backend) else { return };
    let state = host.state.path();
    let ctx = format!("lifecycle fault point {point}, backend {backend:?}, queue {}", queue.name());
    let mut worker = host.armed_worker(queue, point);
    let mut restarted = false;
    // Once the armed worker has died at the fault point, a fresh one takes over.
    let take_over = |worker: &mut Daemon, restarted: &mut bool| {
        if !*restarted && !worker.is_running() {
            assert!(
                worker.log().contains(&format!("fault point {point} armed")),
                "{ctx}: died elsewhere:\n{}",
                worker.log()
            );
            *worker = Daemon::start(state, &host.env(queue));
            *restarted = true;
        }
    };
    // Runs one job to its result, the worker taken over if it dies meanwhile.
    let job = |args: &[&str], worker: &mut Daemon, restarted: &mut bool| -> serde_json::Value {
        let mut child = queue.post(state, args);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            take_over(worker, restarted);
            assert!(std::time::Instant::now() < deadline, "{ctx}: {args:?} never finished:\n{}", worker.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = result(child);
        assert_eq!(r["status"], "succeeded", "{ctx}: {args:?}: {r}\n{}", worker.log());
        r
    };
    let v1 = job(&["prepare", "--family", "web"], &mut worker, &mut restarted);
    job(&["activate", "--family", "web", "--invocation-id", "inv-1"], &mut worker, &mut restarted);
    publish_v2(state);
    let v2 = job(&["prepare", "--family", "web"], &mut worker, &mut restarted);
    let (base1, base2) = (v1["base_vol_id"].as_u64().unwrap(), v2["base_vol_id"].as_u64().unwrap());
    assert_eq!((base1, base2), (1, 2), "{ctx}");
    let inv2 = job(&["activate", "--family", "web", "--invocation-id", "inv-2"], &mut worker, &mut restarted);
    assert_eq!(inv2["base_vol_id"].as_u64(), Some(2), "{ctx}: the new version is current");
    job(&["release", "--family", "web", "--invocation-id", "inv-1"], &mut worker, &mut restarted);
    // Garbage collection runs after the release, beside the jobs: the fault may fire now.
    let store = Store::open(state.join("host.db")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Every lifecycle point is on this path, so the cell waits for both: the fault fired
    // (and a fresh worker took over), and base 1 is gone.
    while !restarted || store.base(base1).unwrap().is_some() {
        take_over(&mut worker, &mut restarted);
        assert!(
            std::time::Instant::now() < deadline,
            "{ctx}: the fault never fired (restarted: {restarted}) or base 1 was never collected:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_until(&format!("{ctx}: every message acked"), Duration::from_secs(60), || queue.leftovers(state) == 0);
    let log = worker.log();
    assert!(worker.stop(Duration::from_secs(60)).success(), "{ctx}");

    // v2 current with its live snapshot; base 1 and inv-1's snapshot gone; nothing orphaned.
    assert_eq!(store.image("web").unwrap().unwrap().current_base, Some(base2), "{ctx}");
    assert_eq!(store.next_id("base").unwrap(), 3, "{ctx}: one base per version, ever");
    let live = store.list_snapshots().unwrap().into_iter().find(|s| s.run_id == "activate-inv-2").unwrap();
    assert_eq!(host.backend().list().unwrap(), [VolumeId::Base(base2), VolumeId::Snap(live.id)], "{ctx}");
    let report = thinpipe::reconcile::reconcile(&store, host.backend().as_ref(), false).unwrap();
    assert!(report.is_clean() && report.missing.is_empty(), "{ctx}: {report:?}");
    assert!(!log.contains("dead-lettering"), "{ctx}: nothing was dead-lettered:\n{log}");
}

fn matrix(backend: Backend, queue: impl Fn() -> Option<Queue>) {
    if !matches!(backend, Backend::Dir) && Host::new(backend).is_none() {
        return; // skipped with a message (not root, no btrfs-progs, no overlayfs); CI fails instead
    }
    let (points, releases, lifecycle) = (fault_points(), release_points(), lifecycle_points());
    assert!(
        !points.is_empty() || !releases.is_empty() || !lifecycle.is_empty(),
        "THINPIPE_CRASH_POINT names no fault point of this matrix"
    );
    for (point, resumes) in points {
        let Some(q) = queue() else { return };
        crash_at(&point, resumes, backend, &q);
    }
    for (point, case) in releases {
        let Some(q) = queue() else { return };
        release_crash_at(&point, case, backend, &q);
    }
    for point in lifecycle {
        let Some(q) = queue() else { return };
        lifecycle_crash_at(&point, backend, &q);
    }
}

fn sqs() -> Option<Queue> {
    thinpipe::aws::test_endpoint().map(Queue::sqs)
}

#[test]
fn crash_matrix_dir_embedded() {
    matrix(Backend::Dir, || Some(Queue::Embedded));
}

#[test]
fn crash_matrix_overlay_embedded() {
    matrix(Backend::Overlay, || Some(Queue::Embedded));
}

#[test]
fn crash_matrix_btrfs_embedded() {
    matrix(Backend::Btrfs, || Some(Queue::Embedded));
}

#[test]
fn crash_matrix_dir_sqs() {
    matrix(Backend::Dir, sqs);
}

#[test]
fn crash_matrix_btrfs_sqs() {
    matrix(Backend::Btrfs, sqs);
}

/// Every fault point in the code is armed by some test: a point no test reaches proves
/// nothing and rots. A test that arms a kill point (`fault::point`) is a crash test by
/// definition; pauses and injected failures are armed by the tests that need a job held
/// or failed. The names are read from the sources, so a new point fails this test until a
/// test arms it.
#[test]
fn every_fault_point_is_armed_by_a_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut code = Vec::new();
    for dir in ["shared/src", "worker/src", "enqueue/src"] {
        thinpipe_tests::rust_files(&root.join(dir), &mut code);
    }
    let mut tests = Vec::new();
    thinpipe_tests::rust_files(&root.join("tests"), &mut tests);
    let tests: Vec<String> = tests.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    let mut points = std::collections::BTreeMap::new();
    for file in &code {
        let text = std::fs::read_to_string(file).unwrap();
        for kind in ["point", "pause", "pause_blocking", "fail"] {
            let call = format!("fault::{kind}(\"");
            for (at, _) in text.match_indices(&call) {
                let rest = &text[at + call.len()..];
                let name = &rest[..rest.find('"').unwrap()];
                points.insert(name.to_owned(), (kind, file.strip_prefix(&root).unwrap().display().to_string()));
            }
        }
    }
    assert!(points.len() >= 20, "found only {} fault points: is the scan still right?", points.len());
    let mut unarmed = Vec::new();
    for (name, (kind, file)) in &points {
        let quoted = format!("\"{name}");
        if !tests.iter().any(|t| t.contains(&quoted)) {
            unarmed.push(format!("{name} ({kind} in {file})"));
        }
    }
    assert!(unarmed.is_empty(), "fault points armed by no test: {unarmed:?}");
}
