//! The fleet contract on one machine, with moto's SQS and S3: three worker processes (own
//! state directories, own host queues, one shared fleet queue), images published to S3 with
//! `enqueue publish`. A prepare fans out to the host queues (one GET per host per layer);
//! activations go through the fleet queue and every result names its host and host queue;
//! a release sent to the wrong host is answered clearly; releases routed by the results
//! leave no snapshot anywhere; a publish of a new version racing a prepare gives a base of
//! exactly the old or exactly the new version.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use thinpipe_tests::aws::{AWS_ENV, Sqs, bucket, sqs};
use thinpipe_tests::flaky::FlakyProxy;
use thinpipe_tests::{Daemon, bin, tar_of_file, tree};

const HOSTS: usize = 3;

struct Host {
    id: String,
    state: PathBuf,
    queue: Sqs,
    /// Counts this host's blob GETs on their way to moto.
    proxy: FlakyProxy,
    daemon: Option<Daemon>,
}

fn enqueue(endpoint: &str, queue: &str, args: &[&str]) -> Value {
    thinpipe_tests::enqueue_wait_to(thinpipe_tests::To::Sqs { queue, endpoint }, args)
}

/// Writes version `n` of flat family `app` (two layers) into `dir` and publishes it.
fn publish(endpoint: &str, dir: &Path, to: &str, n: u32) -> String {
    let family = dir.join("images/app");
    if family.exists() {
        std::fs::remove_dir_all(&family).unwrap();
    }
    std::fs::create_dir_all(&family).unwrap();
    let mut big = vec![0u8; 2 << 20];
    rand::fill(&mut big[..]);
    std::fs::write(family.join("0001-base.tar"), tar_of_file("data.bin", &big)).unwrap();
    std::fs::write(family.join("0002-version.tar"), tar_of_file("etc/version", format!("v{n}\n").as_bytes())).unwrap();
    let out = Command::new(bin("enqueue"))
        .args(["--endpoint-url", endpoint, "--json", "publish"])
        .arg(dir)
        .args(["--family", "app", "--to", to])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    assert!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["version"].as_str().unwrap().to_owned()
}

#[test]
fn a_fleet_routes_by_host_and_never_prepares_a_half_published_image() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_client, bucket) = rt.block_on(bucket(&endpoint));
    let fleet = rt.block_on(sqs(endpoint.clone()));
    let dir = tempfile::tempdir().unwrap();
    let to = format!("s3://{bucket}/images");
    let v1 = publish(&endpoint, &dir.path().join("src"), &to, 1);

    let mut hosts: Vec<Host> = (1..=HOSTS)
        .map(|i| Host {
            id: format!("h{i}"),
            state: dir.path().join(format!("h{i}")),
            queue: rt.block_on(sqs(endpoint.clone())),
            proxy: FlakyProxy::start(&endpoint, "/blobs/sha256/", 0),
            daemon: None,
        })
        .collect();
    for h in &mut hosts {
        std::fs::create_dir_all(&h.state).unwrap();
        let mut env = h.queue.worker_env("10");
        env.retain(|(k, _)| *k != "THINPIPE_AWS_ENDPOINT");
        let source = format!("s3://{bucket}/images");
        env.extend([
            ("THINPIPE_AWS_ENDPOINT", h.proxy.endpoint.as_str()),
            ("THINPIPE_AWS_S3_PATH_STYLE", "true"),
            ("THINPIPE_QUEUE_EXTRA_URLS", fleet.jobs.as_str()),
            ("THINPIPE_WORKER_HOST_ID", h.id.as_str()),
            ("THINPIPE_SOURCE", source.as_str()),
        ]);
        h.daemon = Some(Daemon::start(&h.state, &env));
    }
    let log = |hosts: &[Host]| hosts.iter().map(|h| h.daemon.as_ref().unwrap().log()).collect::<Vec<_>>().join("\n");

    // A prepare fans out to every host's queue: each fetches each layer once.
    for h in &hosts {
        let r = enqueue(&endpoint, &h.queue.jobs, &["prepare", "--family", "app"]);
        assert_eq!((r["status"].as_str(), r["host_id"].as_str()), (Some("succeeded"), Some(h.id.as_str())), "{r}");
        assert_eq!(r["digest"], v1.as_str(), "{r}");
        assert_eq!(r["host_queue"], h.queue.jobs.as_str(), "{r}");
        assert_eq!(h.proxy.matching_requests(), 2, "{}: one GET per layer", h.id);
    }

    // Activations through the fleet queue: any host takes each, and says which.
    let mut activated = Vec::new();
    for i in 0..9 {
        let inv = format!("inv-{i}");
        let r = enqueue(&endpoint, &fleet.jobs, &["activate", "--family", "app", "--invocation-id", &inv]);
        assert_eq!(r["status"], "succeeded", "{r}\n{}", log(&hosts));
        let host = hosts.iter().find(|h| Some(h.id.as_str()) == r["host_id"].as_str()).expect("a known host");
        assert_eq!(r["host_queue"], host.queue.jobs.as_str(), "{r}");
        let path = PathBuf::from(r["snapshot_path"].as_str().unwrap());
        assert!(path.starts_with(&host.state), "{r}: the snapshot is on the host the result names");
        activated.push((inv, r));
    }

    // A release sent to a host that never saw the invocation is answered there, clearly.
    let (inv, first) = &activated[0];
    let wrong = hosts.iter().find(|h| Some(h.id.as_str()) != first["host_id"].as_str()).unwrap();
    let r = enqueue(&endpoint, &wrong.queue.jobs, &["release", "--family", "app", "--invocation-id", inv]);
    assert_eq!((r["status"].as_str(), r["host_id"].as_str()), (Some("failed"), Some(wrong.id.as_str())), "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains(&format!("invocation {inv} is not on host {}", wrong.id)), "{error}");
    assert_eq!(r["cause"], "wrong_host", "{r}");

    // Releases routed by each activation's result leave no snapshot anywhere.
    for (inv, a) in &activated {
        let queue = a["host_queue"].as_str().unwrap();
        let r = enqueue(&endpoint, queue, &["release", "--family", "app", "--invocation-id", inv]);
        assert_eq!((r["status"].as_str(), &r["host_id"]), (Some("succeeded"), &a["host_id"]), "{r}");
        assert!(!Path::new(a["snapshot_path"].as_str().unwrap()).exists(), "{inv}'s snapshot is gone");
    }
    for h in &hosts {
        let left: Vec<_> = std::fs::read_dir(h.state.join("volumes/snaps")).unwrap().collect();
        assert!(left.is_empty(), "{}: no snapshot left: {left:?}", h.id);
    }

    // A new version published while a host prepares: the base is exactly one version.
    let racing = std::thread::spawn({
        let (endpoint, queue) = (endpoint.clone(), hosts[0].queue.jobs.clone());
        move || enqueue(&endpoint, &queue, &["prepare", "--family", "app"])
    });
    let v2 = publish(&endpoint, &dir.path().join("src2"), &to, 2);
    let r = racing.join().unwrap();
    assert_eq!(r["status"], "succeeded", "{r}");
    let prepared = r["digest"].as_str().unwrap();
    assert!(prepared == v1 || prepared == v2, "{r}");
    let base = hosts[0].state.join(format!("volumes/bases/base-{}", r["base_vol_id"]));
    let version = std::fs::read_to_string(base.join("etc/version")).unwrap();
    assert_eq!(version, if prepared == v1 { "v1\n" } else { "v2\n" }, "the base holds exactly its version");
    let again = enqueue(&endpoint, &hosts[0].queue.jobs, &["prepare", "--family", "app"]);
    assert_eq!(again["digest"], v2.as_str(), "{again}");
    let new_base = hosts[0].state.join(format!("volumes/bases/base-{}", again["base_vol_id"]));
    assert_eq!(std::fs::read_to_string(new_base.join("etc/version")).unwrap(), "v2\n");
    assert!(tree(&new_base).contains_key("data.bin"));

    for h in &mut hosts {
        let daemon = h.daemon.take().unwrap();
        let log = daemon.log();
        assert!(daemon.stop(Duration::from_secs(60)).success(), "{}: {log}", h.id);
    }
}
