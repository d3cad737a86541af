//! Faults in the services around the worker: the SQS server stopped for 10 s while a job
//! runs (the worker waits it out and carries on without a restart), and the disk holding
//! the volumes filling up during an unpack (the run fails with the reason, the family is
//! never marked prepared, and once there is room the next prepare reuses the same base).
//! S3 errors during downloads are in `s3_e2e.rs`.

use std::path::Path;
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe::store::Store;
use thinpipe_tests::{Daemon, PrivateMoto};

const AWS_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

fn enqueue(endpoint: &str, url: &str, job: &[&str]) -> std::process::Child {
    thinpipe_tests::enqueue_waiting(thinpipe_tests::To::Sqs { queue: url, endpoint }, 180).args(job).spawn().unwrap()
}

fn result(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_sqs_server_stopped_for_ten_seconds_is_waited_out_without_a_restart() {
    if thinpipe::aws::test_endpoint().is_none() {
        return;
    }
    let Some(moto) = PrivateMoto::start() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (config, _) = rt.block_on(thinpipe::aws::test_config(&moto.endpoint));
    let client = thinpipe::aws::sqs_client(&config);
    let url = rt.block_on(client.create_queue().queue_name("jobs").send()).unwrap().queue_url().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let mut env = vec![
        ("THINPIPE_QUEUE_KIND", "sqs"),
        ("THINPIPE_QUEUE_URL", url.as_str()),
        ("THINPIPE_AWS_ENDPOINT", moto.endpoint.as_str()),
        ("THINPIPE_AWS_READ_TIMEOUT_SECS", "5"),
        // A result that could not be sent in the outage comes back after this; keep it short.
        ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "6"),
        ("THINPIPE_PAUSE", "prepare.unpack@web=2000"),
    ];
    env.extend(AWS_ENV);
    let mut daemon = Daemon::start(dir.path(), &env);
    let running = enqueue(&moto.endpoint, &url, &["prepare", "--family", "web"]);
    daemon.wait_for_log("pause point prepare.unpack@web", Duration::from_secs(60));

    // The server goes away while the job runs; the job finishes meanwhile and its result
    // and ack wait for the server (retried, not lost).
    moto.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(10)); // the outage itself, not a synchronisation
    moto.signal(libc::SIGCONT);

    let r = result(running);
    assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());
    assert!(daemon.is_running(), "no restart: {}", daemon.log());
    let after = result(enqueue(&moto.endpoint, &url, &["activate", "--family", "web", "--invocation-id", "after"]));
    assert_eq!(after["status"], "succeeded", "the same worker takes new jobs: {}", daemon.log());
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

fn prepare(state: &Path, volumes: &Path) -> (Option<i32>, serde_json::Value) {
    let out = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(state)
        .args(["--set", &format!("volumes_dir={}", volumes.display())])
        .args(["run", "prepare", "--family", "big", "--json"])
        .output()
        .unwrap();
    let r = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), r)
}

#[test]
fn a_full_disk_during_unpack_fails_the_run_clearly_and_the_retry_reuses_the_base() {
    let Some(disk) = thinpipe_tests::SmallTmpfs::new(32) else { return };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    // A 12 MiB layer; the disk has 32 MiB, 24 of them taken by ballast.
    let family = state.join("images/big");
    std::fs::create_dir_all(&family).unwrap();
    let content: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(family.join("0001.tar"), thinpipe_tests::tar_of_file("data.bin", &content)).unwrap();
    let ballast = disk.mount.join("ballast");
    std::fs::write(&ballast, vec![0u8; 24 << 20]).unwrap();
    let volumes = disk.mount.join("volumes");

    let (code, r) = prepare(state, &volumes);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["status"], "failed");
    let error = r["error"].as_str().unwrap();
    // Refused before the disk fills (the layer's data would pass the refusal watermark), or,
    // racing another writer, by the full disk itself: either way the step says so.
    assert!(
        error.contains("stream_into_base")
            && (error.contains("No space left on device") || error.contains("past the refusal watermark")),
        "{error}"
    );
    assert!(r["cause"] == "host_storage" || r["cause"] == "host_full", "a host cause a scheduler acts on: {r}");
    let store = Store::open(state.join("host.db")).unwrap();
    assert_eq!(store.image("big").unwrap().unwrap().current_base, None, "never made current");
    let bases = store.list_bases().unwrap();
    let [row] = bases.as_slice() else { panic!("{bases:?}") };
    assert_eq!(row.state, thinpipe::store::BaseState::Preparing);
    let base = row.id;
    drop(store);

    // Room again: the next prepare starts over on the same base, emptied first.
    std::fs::remove_file(&ballast).unwrap();
    let (code, r) = prepare(state, &volumes);
    assert_eq!((code, &r["status"]), (Some(0), &serde_json::json!("succeeded")), "{r}");
    assert_eq!(r["base_vol_id"].as_u64(), Some(base), "the half-built base is reused, not leaked");
    let store = Store::open(state.join("host.db")).unwrap();
    assert_eq!(store.image("big").unwrap().unwrap().current_base, Some(base));
    assert_eq!(store.next_id("base").unwrap(), base + 1, "no second base was allocated");
    assert_eq!(std::fs::read(volumes.join(format!("bases/base-{base}/data.bin"))).unwrap().len(), 12 << 20);
}
