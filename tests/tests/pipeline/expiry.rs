//! Forgotten activations, with the real worker: an activation's `ttl_secs`, and the worker's
//! `activations.max_age_secs`, make the worker release the snapshot itself through the
//! release workflow (a log line and the `thinpipe.snapshots.expired` metric); the invocation
//! is then spent like any released one, and its scheduler's late `release` is answered.

use std::path::Path;
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::store::{SnapshotState, Store};
use thinpipe_tests::otlp::Receiver;
use thinpipe_tests::{Daemon, wait_until};

fn released(store: &Store, invocation: &str) -> bool {
    store
        .snapshot_by_run(&format!("activate-{invocation}"))
        .unwrap()
        .is_some_and(|r| r.state == SnapshotState::Released)
}

#[test]
fn an_activation_past_its_ttl_or_the_max_age_is_released_by_the_worker() {
    let receiver = Receiver::start();
    let otel = receiver.env();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let mut env: Vec<(&str, &str)> = otel.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend([("THINPIPE_GC_INTERVAL_SECS", "1"), ("THINPIPE_ACTIVATIONS_MAX_AGE_SECS", "8")]);
    let daemon = Daemon::start(state, &env);
    let store = Store::open(state.join("host.db")).unwrap();

    // A short TTL, a long one, and none (only the worker's max age applies to those two).
    let short = thinpipe_tests::enqueue_wait(
        state,
        &["activate", "--family", "web", "--invocation-id", "short", "--ttl-secs", "2"],
    );
    assert_eq!(short["status"], "succeeded", "{short}\n{}", daemon.log());
    let path = short["snapshot_path"].as_str().unwrap().to_owned();
    let long = thinpipe_tests::enqueue_wait(
        state,
        &["activate", "--family", "web", "--invocation-id", "long", "--ttl-secs", "3600"],
    );
    let plain = thinpipe_tests::enqueue_wait(state, &["activate", "--family", "web", "--invocation-id", "plain"]);
    assert_eq!((&long["status"], &plain["status"]), (&"succeeded".into(), &"succeeded".into()));
    let row = store.snapshot_by_run("activate-short").unwrap().unwrap();
    assert!(row.expires_at_ms.is_some_and(|t| t - row.created_at_ms == 2000), "{row:?}");

    wait_until("the short activation expires", Duration::from_secs(30), || released(&store, "short"));
    assert!(!Path::new(&path).exists(), "its snapshot is gone");
    assert!(!released(&store, "long") && !released(&store, "plain"), "the others are not expired yet");
    // The line is written once the release run returns, a moment after its row changed.
    wait_until("the expiry is logged", Duration::from_secs(30), || {
        daemon.log().contains("released an expired activation")
    });
    wait_until("the expiry metric", Duration::from_secs(30), || {
        receiver.metric("thinpipe.snapshots.expired").iter().any(|a| a.get("why").map(String::as_str) == Some("ttl"))
    });

    // The invocation is spent; the scheduler's late release is answered, not failed.
    let again = thinpipe_tests::enqueue_wait(state, &["activate", "--family", "web", "--invocation-id", "short"]);
    assert_eq!(again["status"], "failed", "{again}");
    assert!(again["error"].as_str().unwrap().contains("invocation short was released at"), "{again}");
    let late = thinpipe_tests::enqueue_wait(state, &["release", "--family", "web", "--invocation-id", "short"]);
    assert_eq!(late["status"], "succeeded", "{late}");
    assert!(late["detail"].as_str().unwrap().contains("already released"), "{late}");

    // The worker's max age takes the others, whatever their own TTL.
    wait_until("the max age releases the rest", Duration::from_secs(60), || {
        released(&store, "long") && released(&store, "plain")
    });
    wait_until("the max-age metric", Duration::from_secs(30), || {
        receiver
            .metric("thinpipe.snapshots.expired")
            .iter()
            .any(|a| a.get("why").map(String::as_str) == Some("max_age"))
    });
    let volumes: Vec<_> = std::fs::read_dir(state.join("volumes/snaps")).unwrap().collect();
    assert!(volumes.is_empty(), "no snapshot left on disk: {volumes:?}");
    let log = daemon.log();
    assert!(daemon.stop(Duration::from_secs(60)).success(), "{log}");
}
