//! The fleet's blob path against moto's S3: `enqueue publish` of a `umoci`-built layout,
//! then `worker run prepare` from S3 gives the same tree as from the local layout; a blob
//! deleted from the bucket fails clearly, naming bucket and key; a corrupted blob fails its
//! digest after one retry; the S3 server stopped during a download gives retries, then
//! success.

use std::path::Path;
use std::process::{Command, Output};

use thinpipe_tests::{PrivateMoto, bin, tree};

const AWS_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

fn umoci(dir: &Path, args: &[&str]) {
    let out = Command::new("umoci").current_dir(dir).args(args).output().expect("umoci (scripts/test installs it)");
    assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A two-layer OCI layout at `<dir>/oci` with family `fam`.
fn layout(dir: &Path) -> std::path::PathBuf {
    umoci(dir, &["init", "--layout", "oci"]);
    umoci(dir, &["new", "--image", "oci:fam"]);
    umoci(dir, &["unpack", "--image", "oci:fam", "work"]);
    let root = dir.join("work/rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "from-s3\n").unwrap();
    std::fs::write(root.join("etc/old"), "old\n").unwrap();
    umoci(dir, &["repack", "--image", "oci:fam", "work"]);
    std::fs::remove_dir_all(dir.join("work")).unwrap();
    umoci(dir, &["unpack", "--image", "oci:fam", "work"]);
    let root = dir.join("work/rootfs");
    std::fs::remove_file(root.join("etc/old")).unwrap();
    std::fs::write(root.join("etc/new"), "new\n").unwrap();
    umoci(dir, &["repack", "--image", "oci:fam", "work"]);
    std::fs::remove_dir_all(dir.join("work")).unwrap();
    dir.join("oci")
}

fn publish(endpoint: &str, dir: &Path, to: &str) -> serde_json::Value {
    let out = Command::new(bin("enqueue"))
        .args(["--endpoint-url", endpoint, "--json", "publish"])
        .arg(dir)
        .args(["--family", "fam", "--to", to])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    assert!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn prepare(state: &Path, source: &str, endpoint: &str) -> Output {
    thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(state)
        .args(["--set", &format!("aws.endpoint={endpoint}"), "--set", "aws.s3_path_style=true"])
        // One syntax for `--source` and `source`: s3://bucket/prefix or dir:<path> alike.
        .args(["run", "prepare", "--family", "fam", "--source", source, "--json"])
        .envs(AWS_ENV)
        .output()
        .unwrap()
}

/// The sample family `fam` written under `<dir>/src` and published to `s3://<new bucket>/<prefix>`.
fn published_sample(endpoint: &str, prefix: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket) = rt.block_on(bucket(endpoint));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    thinpipe::image::write_sample_family(&src, "fam").unwrap();
    let to = format!("s3://{bucket}/{prefix}");
    rt.block_on(thinpipe::image::publish(&client, endpoint, &src, "fam", &to, &|_| {})).unwrap();
    (dir, src, to)
}

fn result(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no result ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

async fn bucket(endpoint: &str) -> (aws_sdk_s3::Client, String) {
    let (config, opts) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::s3_client(&config, &opts);
    let name = format!("images-{:x}", rand::random::<u64>());
    client.create_bucket().bucket(&name).send().await.unwrap();
    (client, name)
}

#[test]
fn publish_then_prepare_from_s3_equals_prepare_from_the_local_layout() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_client, bucket) = rt.block_on(bucket(&endpoint));
    let dir = tempfile::tempdir().unwrap();
    let oci = layout(dir.path());
    let to = format!("s3://{bucket}/published");
    let first = publish(&endpoint, &oci, &to);
    assert_eq!(first["uploaded"].as_array().unwrap().len(), 5, "manifest, config, 2 layers, index: {first}");
    let again = publish(&endpoint, &oci, &to);
    assert_eq!(again["skipped"].as_array().unwrap().len(), 4, "blobs already there are skipped: {again}");

    let from_s3 = dir.path().join("state-s3");
    let from_dir = dir.path().join("state-dir");
    for (state, source) in [(&from_s3, to.clone()), (&from_dir, format!("dir:{}", oci.display()))] {
        let out = prepare(state, &source, &endpoint);
        let r = result(&out);
        assert_eq!(r["status"], "succeeded", "{source}: {r}");
    }
    let a = tree(&from_s3.join("volumes/bases/base-1"));
    let b = tree(&from_dir.join("volumes/bases/base-1"));
    assert!(a.contains_key("etc/new") && !a.contains_key("etc/old"), "{a:?}");
    assert_eq!(a, b, "the same tree from S3 and from the local layout");
}

#[test]
fn a_deleted_blob_fails_naming_bucket_and_key_and_a_corrupted_one_fails_its_digest_after_one_retry() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket) = rt.block_on(bucket(&endpoint));
    let dir = tempfile::tempdir().unwrap();
    let oci = layout(dir.path());
    let manifest =
        rt.block_on(thinpipe::image::BlobSource::manifest(&thinpipe::image::LocalDir::new(&oci), "fam")).unwrap();
    let layer_key = |prefix: &str| format!("{prefix}/blobs/sha256/{}", manifest.layers[1].digest.hex());

    // Deleted.
    publish(&endpoint, &oci, &format!("s3://{bucket}/deleted"));
    rt.block_on(client.delete_object().bucket(&bucket).key(layer_key("deleted")).send()).unwrap();
    let out = prepare(&dir.path().join("s1"), &format!("s3://{bucket}/deleted"), &endpoint);
    assert_eq!(out.status.code(), Some(1));
    let error = result(&out)["error"].as_str().unwrap().to_owned();
    assert!(error.contains(&bucket) && error.contains(&layer_key("deleted")) && error.contains("404"), "{error}");

    // Corrupted: same key, other bytes.
    publish(&endpoint, &oci, &format!("s3://{bucket}/corrupt"));
    let put = client.put_object().bucket(&bucket).key(layer_key("corrupt")).body(b"not the layer".to_vec().into());
    rt.block_on(put.send()).unwrap();
    let state = dir.path().join("s2");
    let out = prepare(&state, &format!("s3://{bucket}/corrupt"), &endpoint);
    assert_eq!(out.status.code(), Some(1));
    let r = result(&out);
    let error = r["error"].as_str().unwrap().to_owned();
    assert!(error.contains("does not match its digest") && error.contains("stream_into_base"), "{error}");
    let run = r["run_id"].as_str().unwrap().to_owned();
    let attempts = rt.block_on(async {
        let engine = thinpipe::fsm::Engine::open(state.join("runs.redb"), Default::default()).await.unwrap();
        let d = engine.run_detail(&run).unwrap().unwrap();
        engine.shutdown().await;
        d.events.iter().filter(|e| matches!(e.kind, thinpipe::fsm::EventKind::AttemptFailed { .. })).count()
    });
    assert_eq!(attempts, 3, "fetched three times (a torn transfer heals that way), then the digest failure aborts");
}

#[test]
fn a_flat_family_published_to_s3_prepares_like_the_local_one() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_client, bucket) = rt.block_on(bucket(&endpoint));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    thinpipe::image::write_sample_family(&src, "fam").unwrap();
    let to = format!("s3://{bucket}/flat");
    let report = publish(&endpoint, &src, &to);
    let uploaded: Vec<&str> = report["uploaded"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(uploaded.len(), 4, "three blobs by digest, then the manifest object: {report}");
    assert!(uploaded[..3].iter().all(|k| k.starts_with("flat/blobs/sha256/")), "{report}");
    assert_eq!(uploaded[3], "flat/families/fam.json", "the version becomes visible last: {report}");
    let again = publish(&endpoint, &src, &to);
    assert_eq!(again["skipped"].as_array().unwrap().len(), 3, "blobs already there by digest are skipped: {again}");
    let from_s3 = dir.path().join("state-s3");
    let from_dir = dir.path().join("state-dir");
    for (state, source) in [(&from_s3, to.clone()), (&from_dir, format!("dir:{}", src.display()))] {
        let r = result(&prepare(state, &source, &endpoint));
        assert_eq!(r["status"], "succeeded", "{source}: {r}");
        assert_eq!(r["digest"], report["version"], "{source}: the same layers are the same version");
    }
    assert_eq!(tree(&from_s3.join("volumes/bases/base-1")), tree(&from_dir.join("volumes/bases/base-1")));
}

#[test]
fn a_layer_too_large_for_one_put_is_published_in_parts_and_prepares_like_the_local_one() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket) = rt.block_on(bucket(&endpoint));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let family = src.join("images/fam");
    std::fs::create_dir_all(&family).unwrap();
    // One incompressible file makes a tar just over the multipart threshold.
    let big: Vec<u8> = (0..thinpipe::image::MULTIPART_THRESHOLD + (1 << 20)).map(|_| rand::random::<u8>()).collect();
    std::fs::write(family.join("0001.tar"), thinpipe_tests::tar_of_file("big.bin", &big)).unwrap();

    let to = format!("s3://{bucket}/large");
    let report = publish(&endpoint, &src, &to);
    assert_eq!(report["uploaded"].as_array().unwrap().len(), 2, "the blob and the manifest object: {report}");
    let digest = thinpipe::image::Digest::of_bytes(&std::fs::read(family.join("0001.tar")).unwrap());
    let key = format!("large/blobs/sha256/{}", digest.hex());
    let head = rt.block_on(client.head_object().bucket(&bucket).key(&key).send()).unwrap();
    let etag = head.e_tag().unwrap_or_default();
    assert!(etag.contains('-'), "uploaded in parts (a multipart ETag ends in -<parts>): {etag}");

    let from_s3 = dir.path().join("state-s3");
    let from_dir = dir.path().join("state-dir");
    for (state, source) in [(&from_s3, to.clone()), (&from_dir, format!("dir:{}", src.display()))] {
        let r = result(&prepare(state, &source, &endpoint));
        assert_eq!(r["status"], "succeeded", "{source}: {r}");
    }
    let copied = std::fs::read(from_s3.join("volumes/bases/base-1/big.bin")).unwrap();
    assert!(copied == big, "the large file came through intact");
    assert_eq!(tree(&from_s3.join("volumes/bases/base-1")), tree(&from_dir.join("volumes/bases/base-1")));
}

#[test]
fn a_partial_download_is_resumed_with_a_ranged_get() {
    use thinpipe::image::{BlobCache, Digest, LayerDesc, MEDIA_TAR, S3Source};
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket) = rt.block_on(bucket(&endpoint));
    let blob: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let digest = Digest::of_bytes(&blob);
    let location = format!("blobs/sha256/{}", digest.hex());
    let put = client.put_object().bucket(&bucket).key(format!("p/{location}")).body(blob.clone().into());
    rt.block_on(put.send()).unwrap();
    let layer = LayerDesc {
        media_type: MEDIA_TAR.into(),
        location,
        digest: digest.clone(),
        size: blob.len() as u64,
        diff_id: None,
    };
    let source = S3Source::new(client, &format!("s3://{bucket}/p")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(dir.path()).unwrap();
    // What a worker killed after 2 MB of the download left behind.
    std::fs::write(cache.partial_path(&digest), &blob[..2_000_000]).unwrap();

    let cache = BlobCache::open(dir.path()).unwrap();
    let (path, fetched) = rt.block_on(cache.ensure(&source, &layer)).unwrap();
    assert_eq!(fetched, 3_000_000, "only the missing bytes were fetched");
    assert!(std::fs::read(path).unwrap() == blob);
}

#[test]
fn the_s3_server_stopped_during_a_download_gives_retries_then_success() {
    if thinpipe::aws::test_endpoint().is_none() {
        return;
    }
    let Some(moto) = PrivateMoto::start() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket) = rt.block_on(bucket(&moto.endpoint));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    thinpipe::image::write_sample_family(&src, "fam").unwrap();
    let to = format!("s3://{bucket}/flat");
    rt.block_on(thinpipe::image::publish(&client, &moto.endpoint, &src, "fam", &to, &|_| {})).unwrap();

    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let log = state.join("worker.log");
    let mut worker = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(&state)
        .args(["--set", &format!("source={to}"), "--set", &format!("aws.endpoint={}", moto.endpoint)])
        .args([
            "--set",
            "aws.s3_path_style=true",
            "--set",
            "aws.read_timeout_secs=1",
            "--set",
            "aws.connect_timeout_secs=1",
        ])
        .args(["--set", "images.stall_timeout_secs=2"])
        .args(["run", "prepare", "--family", "fam", "--json"])
        .envs(AWS_ENV)
        .env("THINPIPE_PAUSE", "prepare.download@fam=300")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let minute = std::time::Duration::from_secs(60);
    thinpipe_tests::wait_until("the download to be about to start", minute, || {
        read_log().contains("pause point prepare.download")
    });
    moto.signal(libc::SIGSTOP);
    thinpipe_tests::wait_until("a failed download attempt", minute, || read_log().contains("step attempt failed"));
    moto.signal(libc::SIGCONT);
    let mut stdout = String::new();
    std::io::Read::read_to_string(worker.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let status = worker.wait().unwrap();
    assert!(status.success(), "{stdout} {}", read_log());
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["status"], "succeeded");
    let failed_attempts = rt.block_on(async {
        let engine = thinpipe::fsm::Engine::open(state.join("runs.redb"), Default::default()).await.unwrap();
        let d = engine.run_detail(r["run_id"].as_str().unwrap()).unwrap().unwrap();
        engine.shutdown().await;
        d.events
            .iter()
            .filter(
                |e| matches!(&e.kind, thinpipe::fsm::EventKind::AttemptFailed { step, .. } if step == "stream_into_base"),
            )
            .count()
    });
    assert!(failed_attempts >= 1, "the outage was retried");
}

#[test]
fn s3_answering_errors_for_a_while_gives_retries_then_success() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let (dir, src, to) = published_sample(&endpoint, "flat");
    // Every layer GET fails with 503 at first: more failures than the SDK's own retries.
    let proxy = thinpipe_tests::flaky::FlakyProxy::start(&endpoint, "/flat/blobs/sha256/", 8);
    let state = dir.path().join("state");
    let out = prepare(&state, &to, &proxy.endpoint);
    let r = result(&out);
    assert_eq!(r["status"], "succeeded", "{r}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(proxy.errors_served(), 8);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The manifest's lookup (before the run) and the blob download (its step) both retry.
    let retried = stderr.contains("step attempt failed") || stderr.contains("at its source failed; retrying");
    assert!(retried && stderr.contains("503"), "the outage was retried: {stderr}");
    let from_dir = dir.path().join("state-dir");
    let local = result(&prepare(&from_dir, &format!("dir:{}", src.display()), &endpoint));
    assert_eq!(local["status"], "succeeded");
    assert_eq!(tree(&state.join("volumes/bases/base-1")), tree(&from_dir.join("volumes/bases/base-1")));
}

/// A bucket the worker may not read (HTTP 403) is a permissions mistake of the fleet, not of
/// the job: the prepare gives a failed result naming the refusal, and is not dead-lettered
/// (a family that does not exist is).
#[test]
fn access_denied_fails_the_job_without_dead_lettering_it() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let (dir, _, to) = published_sample(&endpoint, "denied");
    // The family's manifest object is refused; the rest of the bucket answers.
    let proxy = thinpipe_tests::flaky::FlakyProxy::denying(&endpoint, "/denied/families/fam.json");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let env: Vec<(&str, String)> = AWS_ENV
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .chain([
            ("THINPIPE_SOURCE", to.clone()),
            ("THINPIPE_AWS_ENDPOINT", proxy.endpoint.clone()),
            ("THINPIPE_AWS_S3_PATH_STYLE", "true".to_owned()),
        ])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = thinpipe_tests::Daemon::start(&state, &env);
    let enqueue =
        |args: &[&str]| Command::new(bin("enqueue")).arg("--state-dir").arg(&state).args(args).output().unwrap();
    let out = enqueue(&["--wait", "--json", "prepare", "--family", "fam"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", String::from_utf8_lossy(&out.stderr), daemon.log());
    let r = result(&out);
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("refused access") && error.contains("403"), "{r}");
    assert_eq!(r["cause"], "access_denied", "{r}");
    let dead = enqueue(&["--json", "dead-letters", "list"]);
    assert_eq!(String::from_utf8_lossy(&dead.stdout).trim(), "[]", "not dead-lettered: {}", daemon.log());
    assert!(proxy.matching_requests() >= 1);

    let unknown = enqueue(&["--wait", "--json", "prepare", "--family", "nowhere"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert_eq!(result(&unknown)["cause"], "not_found");
    let dead = enqueue(&["--json", "dead-letters", "list"]);
    assert!(String::from_utf8_lossy(&dead.stdout).contains("nowhere"), "an unknown family is dead-lettered");
    daemon.stop(std::time::Duration::from_secs(30));
}

/// What cannot succeed fails at once and says what to check, naming the endpoint, bucket
/// and key: a missing bucket (publish and prepare), and a worker without credentials. An
/// unreachable endpoint is retried, each line naming it.
#[test]
fn a_missing_bucket_or_missing_credentials_fail_at_once_naming_endpoint_bucket_and_key() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    thinpipe::image::write_sample_family(&src, "fam").unwrap();
    let bucket = format!("no-such-bucket-{}", std::process::id());
    let started = std::time::Instant::now();
    let out = Command::new(bin("enqueue"))
        .args(["--endpoint-url", &endpoint, "publish"])
        .arg(&src)
        .args(["--family", "fam", "--to", &format!("s3://{bucket}/p")])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("the bucket {bucket} does not exist there")) && err.contains(&endpoint), "{err}");
    assert!(!err.contains("service error"), "{err}");

    let state = dir.path().join("state");
    let out = prepare(&state, &format!("s3://{bucket}/p"), &endpoint);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no result ({e}): {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!((r["status"].as_str(), r["cause"].as_str()), (Some("failed"), Some("bad_source")), "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains(&format!("s3://{bucket}/p/")) && error.contains(&endpoint), "{error}");

    // No credentials at all (and no instance metadata service here).
    let out = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(&state)
        .args(["--set", &format!("aws.endpoint={endpoint}"), "--set", "aws.region=us-east-1"])
        .args(["run", "prepare", "--family", "fam", "--source", &format!("s3://{bucket}/p"), "--json"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("no result ({e}): {}", String::from_utf8_lossy(&out.stderr));
    });
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("no AWS credentials were found") && error.contains(&endpoint), "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "failed at once: {:?}", started.elapsed());
}
