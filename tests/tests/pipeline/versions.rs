//! A family rolls forward and the old version is collected, end to end with the real
//! `worker` daemon and `enqueue`: v1 prepared and activated; v2 published (new layers); a
//! `prepare` makes v2 current; `activate` gives a v2 tree while the v1 snapshot is untouched;
//! pinned activations of both versions side by side; releasing v1's snapshots lets garbage
//! collection delete base v1 and the blobs only v1 used; `worker images` and `worker
//! reconcile` agree. On `dir` and `btrfs` with the embedded queue (a flat family and an OCI
//! layout built by `umoci`), and with SQS and an S3 source on moto.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use thinpipe::image::{BlobSource, LocalDir, Manifest};
use thinpipe::store::Store;
use thinpipe_tests::aws::{AWS_ENV, Sqs, bucket, sqs};
use thinpipe_tests::{Daemon, To, bin, oci_version, tar_of_file, tree, wait_until};

const FAMILY: &str = "app";

/// Where the family's versions come from.
enum Source {
    /// `images/app/` in the state directory (the default source).
    Flat,
    /// An OCI layout built by umoci, read in place.
    Oci,
    /// The same layout published to S3 with `enqueue publish`.
    S3 { endpoint: String, bucket: String, sqs: Sqs },
}

struct Host {
    dir: tempfile::TempDir,
    state: PathBuf,
    volumes: PathBuf,
    source: Source,
    env: Vec<(String, String)>,
    daemon: Option<Daemon>,
}

impl Host {
    fn new(source: Source, volumes: Option<PathBuf>, mut env: Vec<(String, String)>) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let volumes = volumes.unwrap_or_else(|| state.join("volumes"));
        match &source {
            Source::Flat => {}
            Source::Oci => env.push(("THINPIPE_SOURCE".into(), format!("dir:{}", dir.path().join("oci").display()))),
            Source::S3 { endpoint, bucket, sqs } => {
                env.push(("THINPIPE_SOURCE".into(), format!("s3://{bucket}/images")));
                env.push(("THINPIPE_AWS_S3_PATH_STYLE".into(), "true".into()));
                for (k, v) in sqs.worker_env("10") {
                    env.push((k.into(), v.into()));
                }
                env.push(("THINPIPE_AWS_ENDPOINT".into(), endpoint.clone()));
            }
        }
        Host { dir, state, volumes, source, env, daemon: None }
    }

    fn start(&mut self) {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.daemon = Some(Daemon::start(&self.state, &env));
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Publishes version `n` (1 or 2) of the family and returns its manifest as resolved
    /// from the local files.
    fn publish(&self, n: u32) -> Manifest {
        let local = match self.source {
            Source::Flat => {
                let family = self.state.join("images").join(FAMILY);
                std::fs::create_dir_all(&family).unwrap();
                let put = |name: &str, path: &str, content: &str| {
                    std::fs::write(family.join(name), tar_of_file(path, content.as_bytes())).unwrap()
                };
                if n == 1 {
                    put("0001-base.tar", "etc/version", "v1\n");
                    put("0002-extra.tar", "etc/v1-only", "old\n");
                } else {
                    std::fs::remove_file(family.join("0002-extra.tar")).unwrap();
                    put("0002-extra.tar", "etc/v2-added", "new\n");
                    put("0003-update.tar", "etc/version", "v2\n");
                }
                self.state.clone()
            }
            Source::Oci | Source::S3 { .. } => {
                let v1: &[&[(&str, &str)]] = &[&[("etc/version", "v1\n"), ("etc/v1-only", "old\n")]];
                let v2: &[&[(&str, &str)]] = &[&[("etc/version", "v2\n")], &[("etc/v2-added", "new\n")]];
                oci_version(self.dir.path(), FAMILY, if n == 1 { v1 } else { v2 })
            }
        };
        if let Source::S3 { endpoint, bucket, .. } = &self.source {
            let out = Command::new(bin("enqueue"))
                .args(["--endpoint-url", endpoint, "--json", "publish"])
                .arg(&local)
                .args(["--family", FAMILY, "--to", &format!("s3://{bucket}/images")])
                .envs(AWS_ENV)
                .output()
                .unwrap();
            assert!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(LocalDir::new(&local).manifest(FAMILY)).unwrap()
    }

    /// Posts a job with `enqueue --wait` and returns its result.
    fn send(&self, args: &[&str]) -> Value {
        let to = match &self.source {
            Source::S3 { endpoint, sqs, .. } => To::Sqs { queue: &sqs.jobs, endpoint },
            Source::Flat | Source::Oci => To::State(&self.state),
        };
        let out = thinpipe_tests::enqueue_waiting(to, 120).args(args).output().unwrap();
        if out.stdout.is_empty() {
            eprintln!("worker log:\n{}", self.log());
        }
        thinpipe_tests::job_result(&out)
    }

    fn activate(&self, invocation: &str, digest: Option<&str>) -> (Value, PathBuf) {
        let mut args = vec!["activate", "--family", FAMILY, "--invocation-id", invocation];
        if let Some(d) = digest {
            args.extend(["--digest", d]);
        }
        let r = self.send(&args);
        assert_eq!(r["status"], "succeeded", "activate {invocation}: {r}\n{}", self.log());
        let path = PathBuf::from(r["snapshot_path"].as_str().unwrap());
        (r, path)
    }

    /// A read-only command of the worker (safe while the daemon runs), as JSON.
    fn worker_json(&self, args: &[&str]) -> Value {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = thinpipe_tests::worker().arg("--state-dir").arg(&self.state).args(args).envs(env).output().unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("worker {args:?} ({e}): {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn cached(&self, digest: &thinpipe::image::Digest) -> bool {
        self.state.join("blobs/sha256").join(digest.hex()).exists()
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rollout(h: &mut Host) {
    let m1 = h.publish(1);
    h.start();
    let p1 = h.send(&["prepare", "--family", FAMILY]);
    assert_eq!(p1["status"], "succeeded", "{p1}\n{}", h.log());
    let d1 = p1["digest"].as_str().unwrap().to_owned();
    assert_eq!(d1, m1.digest.as_str(), "the version is the manifest digest");
    assert_eq!(p1["run_id"].as_str().unwrap(), format!("prepare-{FAMILY}@{}", &m1.digest.hex()[..12]));
    let base1 = p1["base_vol_id"].as_u64().unwrap();
    let (a1, path1) = h.activate("on-v1", None);
    assert_eq!(a1["digest"].as_str(), Some(d1.as_str()));
    assert_eq!(read(&path1.join("etc/version")), "v1\n");
    let v1_tree = tree(&path1);

    // v2: a prepare makes it current; activations use it; the v1 snapshot is untouched.
    let m2 = h.publish(2);
    let v1_only: Vec<_> =
        m1.layers.iter().map(|l| l.digest.clone()).filter(|d| !m2.layers.iter().any(|l| l.digest == *d)).collect();
    assert!(!v1_only.is_empty(), "v1 has a blob v2 does not use");
    assert!(v1_only.iter().all(|d| h.cached(d)));
    let p2 = h.send(&["prepare", "--family", FAMILY]);
    assert_eq!(p2["status"], "succeeded", "{p2}\n{}", h.log());
    let d2 = p2["digest"].as_str().unwrap().to_owned();
    assert_eq!(d2, m2.digest.as_str());
    let base2 = p2["base_vol_id"].as_u64().unwrap();
    assert_ne!(base1, base2, "a new version gets a new base");
    let again = h.send(&["prepare", "--family", FAMILY]);
    assert_eq!(again["base_vol_id"].as_u64(), Some(base2), "once per version per host: {again}");
    let (a2, path2) = h.activate("on-v2", None);
    assert_eq!((a2["digest"].as_str(), a2["base_vol_id"].as_u64()), (Some(d2.as_str()), Some(base2)));
    assert_eq!(read(&path2.join("etc/version")), "v2\n");
    assert!(path2.join("etc/v2-added").exists() && !path2.join("etc/v1-only").exists());
    assert_eq!(tree(&path1), v1_tree, "the v1 snapshot is untouched");

    // Pinned activations of both versions, side by side.
    let (pin1, pin1_path) = h.activate("pin-v1", Some(&d1));
    let (pin2, pin2_path) = h.activate("pin-v2", Some(&d2));
    assert_eq!(pin1["base_vol_id"].as_u64(), Some(base1));
    assert_eq!(pin2["base_vol_id"].as_u64(), Some(base2));
    assert_eq!(read(&pin1_path.join("etc/version")), "v1\n");
    assert_eq!(read(&pin2_path.join("etc/version")), "v2\n");

    // What an operator sees.
    let images = h.worker_json(&["images", "--json"]);
    let family = &images["families"][0];
    assert_eq!(family["current"]["digest"], d2.as_str(), "{images}");
    assert_eq!(family["others"][0]["digest"], d1.as_str(), "{images}");
    assert_eq!(family["others"][0]["live_snapshots"], 2, "{images}");
    assert_eq!(family["live_snapshots"], 4, "{images}");

    // Releasing v1's snapshots lets garbage collection take base v1 and its own blobs.
    for inv in ["on-v1", "pin-v1"] {
        let r = h.send(&["release", "--family", FAMILY, "--invocation-id", inv]);
        assert_eq!(r["status"], "succeeded", "{r}");
    }
    let store = Store::open(h.state.join("host.db")).unwrap();
    wait_until("base v1 collected", Duration::from_secs(60), || store.base(base1).unwrap().is_none());
    assert!(!h.volumes.join(format!("bases/base-{base1}")).exists(), "the volume is gone");
    wait_until("v1's own blobs collected", Duration::from_secs(60), || v1_only.iter().all(|d| !h.cached(d)));
    assert!(m2.layers.iter().all(|l| h.cached(&l.digest)), "v2's blobs are kept");
    assert_eq!(read(&path2.join("etc/version")), "v2\n", "v2's snapshots are untouched");
    assert_eq!(read(&pin2_path.join("etc/version")), "v2\n");
    let report = h.worker_json(&["reconcile", "--json"]);
    assert_eq!(report["orphans"], serde_json::json!([]), "{report}");
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");

    // v1 pinned again after it was collected: an OCI layout still has it and it is
    // prepared anew; a flat family has only its current version, and says so.
    let r = h.send(&["activate", "--family", FAMILY, "--invocation-id", "late-v1", "--digest", &d1]);
    match h.source {
        Source::Flat => {
            assert_eq!(r["status"], "failed", "{r}");
            let error = r["error"].as_str().unwrap();
            assert!(error.contains(&d1) && error.contains("is not in"), "{error}");
        }
        Source::Oci | Source::S3 { .. } => {
            assert_eq!(r["status"], "succeeded", "{r}\n{}", h.log());
            assert_ne!(r["base_vol_id"].as_u64(), Some(base1), "a new base for the re-prepared version");
            assert_eq!(read(&Path::new(r["snapshot_path"].as_str().unwrap()).join("etc/version")), "v1\n");
            assert_eq!(
                store.current_base(FAMILY).unwrap().unwrap().id,
                base2,
                "a pinned activation keeps the current version"
            );
        }
    }
    let daemon = h.daemon.take().unwrap();
    let log = daemon.log();
    assert!(daemon.stop(Duration::from_secs(60)).success(), "{log}");
}

#[test]
fn a_flat_family_rolls_forward_on_the_dir_backend() {
    let mut h = Host::new(Source::Flat, None, Vec::new());
    rollout(&mut h);
}

#[test]
fn an_oci_family_rolls_forward_on_btrfs() {
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::new() else { return };
    let volumes = fs.mount.join("volumes");
    let env = vec![
        ("THINPIPE_BACKEND".to_owned(), "btrfs".to_owned()),
        ("THINPIPE_VOLUMES_DIR".to_owned(), volumes.display().to_string()),
    ];
    let mut h = Host::new(Source::Oci, Some(volumes), env);
    rollout(&mut h);
}

#[test]
fn a_family_published_to_s3_rolls_forward_through_sqs() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_client, bucket) = rt.block_on(bucket(&endpoint));
    let sqs = rt.block_on(sqs(endpoint.clone()));
    let mut h = Host::new(Source::S3 { endpoint, bucket, sqs }, None, Vec::new());
    rollout(&mut h);
}

/// A flat family listed from its files is only as atomic as its writer: one rewritten while a
/// prepare downloads it is never sealed as a mix. The prepare sees the change, the job is
/// retried, and the version then current is prepared whole.
#[test]
fn a_flat_family_rewritten_during_its_prepare_is_never_sealed_as_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let family = state.join("images/mix");
    std::fs::create_dir_all(&family).unwrap();
    std::fs::write(family.join("0001-a.tar"), tar_of_file("etc/a", b"1\n")).unwrap();
    std::fs::write(family.join("0002-b.tar"), tar_of_file("etc/b", b"1\n")).unwrap();
    let daemon = Daemon::start(state, &[("THINPIPE_PAUSE", "prepare.download@mix=1500")]);
    let waiting =
        thinpipe_tests::enqueue_waiting(To::State(state), 120).args(["prepare", "--family", "mix"]).spawn().unwrap();
    daemon.wait_for_log("pause point prepare.download@mix", Duration::from_secs(60));
    // The second layer is rewritten while the first attempt waits to download.
    std::fs::write(family.join("0002-b.tar"), tar_of_file("etc/b", b"2\n")).unwrap();
    let out = waiting.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());
    let now = thinpipe_tests::prepare_run(state, "mix");
    assert_eq!(r["run_id"].as_str(), Some(now.as_str()), "the version current after the rewrite: {r}");
    let base = r["base_vol_id"].as_u64().unwrap();
    assert_eq!(read(&state.join(format!("volumes/bases/base-{base}/etc/b"))), "2\n");
    assert!(daemon.log().contains("changed at"), "the change was seen and the job retried:\n{}", daemon.log());
    let store = Store::open(state.join("host.db")).unwrap();
    let sealed: Vec<_> =
        store.list_bases().unwrap().into_iter().filter(|b| b.state == thinpipe::store::BaseState::Sealed).collect();
    assert_eq!(sealed.len(), 1, "one sealed base, of the whole new version: {sealed:?}");
    let log = daemon.log();
    assert!(daemon.stop(Duration::from_secs(60)).success(), "{log}");
}
