//! An invocation's snapshot is given back exactly once, whatever the order of its messages.
//!
//! Property-style, against the real `worker` daemon on the embedded queue: many seeded
//! schedules, each a random interleaving of `activate X` / `release X` messages (either first,
//! duplicates of each) for a few invocations, posted back to back, with one job slot and with
//! several. After each schedule, for every invocation: a release was posted → a `released`
//! row and no volume; none → exactly one exposed snapshot whose files are there. Every
//! release succeeds; every activation either succeeds or fails saying the invocation was
//! released (in order with one slot: exactly when a release came before it);
//! `worker reconcile` is clean. A failure prints the seed; replay with
//! `THINPIPE_INVOCATION_SEED=<seed> cargo test -p thinpipe-tests --test pipeline invocations::`.
//!
//! Also here: SIGTERM hands back messages that were received but not started, and `/readyz`
//! is not ready from the moment a signal starts the drain.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use thinpipe::image::write_sample_family;
use thinpipe::queue::{EmbeddedQueue, JobQueue};
use thinpipe::store::{SnapshotState, Store};
use thinpipe::volume::{DirBackend, VolumeBackend, VolumeId};
use thinpipe_tests::{Daemon, wait_until};

const SCHEDULES: usize = 12;
const INVOCATIONS: usize = 3;

fn queue(state: &Path, name: &str) -> EmbeddedQueue {
    EmbeddedQueue::open(state.join("queue.db"), name, Duration::from_secs(60), 5).unwrap()
}

fn body(kind: &str, invocation: Option<&str>) -> String {
    let mut body = serde_json::json!({"v": 1, "kind": kind, "family": "web", "reply_to": "results"});
    if let Some(inv) = invocation {
        body["invocation_id"] = inv.into();
    }
    body.to_string()
}

/// Posts `bodies` in order and returns every result, keyed by message id.
fn run_all(rt: &tokio::runtime::Runtime, state: &Path, bodies: &[String]) -> HashMap<String, serde_json::Value> {
    let jobs = queue(state, "jobs");
    let results = queue(state, "results");
    let mut ids = Vec::new();
    rt.block_on(async {
        for b in bodies {
            ids.push(jobs.send("jobs", b, &BTreeMap::new()).await.unwrap());
        }
    });
    let mut got = HashMap::new();
    wait_until("a result for every job", Duration::from_secs(120), || {
        rt.block_on(async {
            for d in results.receive(10, Duration::ZERO).await.unwrap() {
                let r: serde_json::Value = serde_json::from_str(&d.body).unwrap();
                got.insert(r["job_id"].as_str().unwrap().to_owned(), r);
                results.ack(&d).await.unwrap();
            }
        });
        ids.iter().all(|id| got.contains_key(id))
    });
    ids.iter().map(|id| (id.clone(), got[id].clone())).collect::<HashMap<_, _>>()
}

/// One random schedule: per invocation, 1–2 activates and 0–2 releases, all shuffled together.
fn schedule(rng: &mut rand::rngs::StdRng, tag: &str) -> Vec<(&'static str, String)> {
    let mut msgs = Vec::new();
    for i in 0..INVOCATIONS {
        let inv = format!("{tag}-i{i}");
        for _ in 0..rng.random_range(1..=2) {
            msgs.push(("activate", inv.clone()));
        }
        for _ in 0..rng.random_range(0..=2) {
            msgs.push(("release", inv.clone()));
        }
    }
    msgs.shuffle(rng);
    msgs
}

fn reconcile_is_clean(state: &Path) -> (bool, String) {
    let out = thinpipe_tests::worker().arg("--state-dir").arg(state).args(["reconcile", "--json"]).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn interleavings(concurrency: usize) {
    let seed = std::env::var("THINPIPE_INVOCATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("invocations seed={seed} concurrency={concurrency} (replay: THINPIPE_INVOCATION_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let daemon = Daemon::start(state, &[("THINPIPE_WORKER_CONCURRENCY", &concurrency.to_string())]);
    let prepared = run_all(&rt, state, &[body("prepare", None)]);
    assert!(prepared.values().all(|r| r["status"] == "succeeded"), "{prepared:?}\n{}", daemon.log());
    let store = Store::open(state.join("host.db")).unwrap();
    let backend = DirBackend::open(state.join("volumes")).unwrap();

    for n in 0..SCHEDULES {
        let tag = format!("c{concurrency}s{n}");
        let msgs = schedule(&mut rng, &tag);
        let ctx = format!("seed {seed}, concurrency {concurrency}, schedule {n}: {msgs:?}");
        let bodies: Vec<String> = msgs.iter().map(|(kind, inv)| body(kind, Some(inv))).collect();
        let results = run_all(&rt, state, &bodies);
        let ordered: Vec<&serde_json::Value> = {
            let mut v: Vec<(&String, &serde_json::Value)> = results.iter().collect();
            v.sort_by_key(|(id, _)| id.parse::<u64>().unwrap());
            v.into_iter().map(|(_, r)| r).collect()
        };
        for i in 0..INVOCATIONS {
            let inv = format!("{tag}-i{i}");
            let released = msgs.iter().any(|(k, x)| *k == "release" && *x == inv);
            let row = store.snapshot_by_run(&format!("activate-{inv}")).unwrap();
            let mut seen_release = false;
            for r in ordered.iter().filter(|r| r["invocation_id"] == inv.as_str()) {
                match (r["kind"].as_str().unwrap(), r["status"].as_str().unwrap()) {
                    ("release", "succeeded") => seen_release = true,
                    ("activate", "succeeded") => {
                        let path = r["snapshot_path"].as_str().unwrap_or_else(|| panic!("{ctx}: no path in {r}"));
                        assert_eq!(Some(path), row.as_ref().and_then(|s| s.path.as_deref()), "{ctx}: one snapshot");
                        assert!(!(concurrency == 1 && seen_release), "{ctx}: activated after its release: {r}");
                    }
                    ("activate", "failed") => {
                        let err = r["error"].as_str().unwrap();
                        assert!(err.contains(&format!("invocation {inv} was released at")), "{ctx}: {r}");
                        assert_eq!(r["cause"], "released", "{ctx}: {r}");
                        assert!(concurrency > 1 || seen_release, "{ctx}: refused before any release: {r}");
                    }
                    other => panic!("{ctx}: unexpected {other:?}: {r}"),
                }
            }
            let row = row.unwrap_or_else(|| panic!("{ctx}: {inv} has no row"));
            let on_disk = backend.exists(VolumeId::Snap(row.id)).unwrap();
            if released {
                assert_eq!(row.state, SnapshotState::Released, "{ctx}: {inv}");
                assert!(!on_disk, "{ctx}: {inv} was released but its snapshot is on disk");
            } else {
                assert_eq!(row.state, SnapshotState::Exposed, "{ctx}: {inv}");
                assert!(on_disk, "{ctx}: {inv} lost its snapshot");
                let path = Path::new(row.path.as_deref().unwrap());
                assert!(path.join("bin/hello").exists(), "{ctx}: {inv}'s files are there");
            }
        }
        let (clean, report) = reconcile_is_clean(state);
        assert!(clean, "{ctx}: reconcile: {report}\n{}", daemon.log());
    }
    // Exactly the volumes the live rows claim, and one base.
    let live = store.list_snapshots().unwrap().iter().filter(|s| s.state == SnapshotState::Exposed).count();
    assert_eq!(backend.list().unwrap().len(), live + 1, "seed {seed}: no leftover volume");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

#[test]
fn any_order_of_activate_and_release_one_slot() {
    interleavings(1);
}

#[test]
fn any_order_of_activate_and_release_four_slots() {
    interleavings(4);
}

/// SIGTERM while messages are received but not started: they are visible again at once, not
/// after their visibility timeout. Four activations of a family that is not yet prepared
/// are received together; one is paused in its prepare, the others wait for the family's
/// prepare lock. The signal hands those back within a second.
#[test]
fn sigterm_hands_back_received_jobs_at_once_and_readyz_says_draining() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let daemon = Daemon::start(
        state,
        &[
            ("THINPIPE_WORKER_CONCURRENCY", "4"),
            ("THINPIPE_PAUSE", "prepare.download@web=4000"),
            ("THINPIPE_WORKER_DRAIN_DEADLINE_SECS", "30"),
        ],
    );
    let admin = daemon.admin_url();
    let jobs = queue(state, "jobs");
    rt.block_on(async {
        for i in 0..4 {
            jobs.send("jobs", &body("activate", Some(&format!("held-{i}"))), &BTreeMap::new()).await.unwrap();
        }
    });
    wait_until("the four messages to be received", Duration::from_secs(30), || {
        rt.block_on(jobs.visible()).unwrap() == 0
    });
    daemon.wait_for_log("pause point prepare.download@web", Duration::from_secs(30));
    let ready = reqwest::blocking::get(format!("{admin}/readyz")).unwrap();
    assert_eq!(ready.status(), 200, "ready before the signal");

    // SAFETY: kill(2) on the daemon we started.
    assert_eq!(unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) }, 0);
    let signalled = std::time::Instant::now();
    wait_until("/readyz to say draining", Duration::from_secs(5), || {
        reqwest::blocking::get(format!("{admin}/readyz"))
            .is_ok_and(|r| r.status() == 503 && r.text().unwrap_or_default().contains("draining"))
    });
    // The three waiting jobs are visible again at once (the paused one runs on).
    wait_until("the waiting jobs to be handed back", Duration::from_secs(1), || {
        rt.block_on(jobs.visible()).unwrap() == 3
    });
    eprintln!("handed back {:?} after the signal", signalled.elapsed());
    let mut daemon = daemon;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success(), "{}", daemon.log());
    assert!(daemon.log().contains("handed back"), "{}", daemon.log());
}
