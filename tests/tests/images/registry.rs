//! Images from a real registry: Distribution's `docker-registry` on 127.0.0.1 (plain, or
//! with basic auth over TLS), images built by `umoci` and pushed by `skopeo`, prepared by the
//! real `worker` binary. Pull by tag and by digest, a tag moved mid-rollout, a login from a
//! Docker config, an untrusted certificate, a corrupted blob, a 429 storm, a registry killed
//! mid-download, and a multi-architecture index. (The real Debian image pushed to a registry
//! is in `real_images.rs`.)
//!
//! Needs `docker-registry`, `skopeo`, `umoci` and root (`scripts/test` installs them and CI
//! runs as root); outside CI the tests skip without them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thinpipe_tests::registry::{Registry, RegistryProxy, RegistrySetup};
use thinpipe_tests::{oci_version, wait_until};

fn ready() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").is_err(), "the registry tests run as root in CI");
        eprintln!("skipping: the registry tests need root (umoci keeps owners)");
        return false;
    }
    thinpipe_tests::registry::available()
}

/// `worker run <args> --json` on `state` with `settings`: the result and the stderr.
fn worker_run(state: &Path, settings: &[String], args: &[&str]) -> (serde_json::Value, String) {
    let mut cmd = thinpipe_tests::worker();
    cmd.arg("--state-dir").arg(state);
    for s in settings {
        cmd.args(["--set", s]);
    }
    let capacity = [("THINPIPE_CAPACITY_HIGH_PERCENT", "100"), ("THINPIPE_CAPACITY_LOW_PERCENT", "99")];
    cmd.envs(capacity).env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100");
    let out = cmd.arg("run").args(args).arg("--json").envs(thinpipe_tests::aws::AWS_ENV).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("worker run {args:?}: no result ({e}): {stderr}"));
    (result, stderr)
}

fn succeeded(state: &Path, settings: &[String], args: &[&str]) -> serde_json::Value {
    let (result, stderr) = worker_run(state, settings, args);
    assert_eq!(result["status"], "succeeded", "worker run {args:?}: {result}\n{stderr}");
    result
}

/// Activates `family` on `state` and reads `file` from the snapshot.
fn file_in_snapshot(state: &Path, settings: &[String], family: &str, file: &str) -> String {
    // An invocation id is single use: a fresh one each time.
    let invocation = format!("inv-{:x}", rand::random::<u64>());
    let active = succeeded(state, settings, &["activate", "--family", family, "--invocation-id", &invocation]);
    let path = PathBuf::from(active["snapshot_path"].as_str().expect("a snapshot path"));
    let content = std::fs::read_to_string(path.join(file)).unwrap_or_else(|e| panic!("{file} in the snapshot: {e}"));
    succeeded(state, settings, &["release", "--family", family, "--invocation-id", &invocation]);
    content
}

fn with_source(registry_settings: &[String], source: &str) -> Vec<String> {
    let mut s = registry_settings.to_vec();
    s.push(format!("source={source}"));
    s
}

#[test]
fn a_tag_is_resolved_once_and_hosts_pinned_to_its_digest_survive_the_tag_moving() {
    if !ready() {
        return;
    }
    let registry = Registry::start(RegistrySetup::default());
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "version one\n")], &[("etc/extra", "x\n")]]);
    let one = registry.push(&layout, "web", "team/web:stable");
    let settings = with_source(&registry.worker_settings(), &format!("{}/team/{{family}}:stable", registry.host));

    // Host a resolves the tag.
    let a = dir.path().join("a");
    let prepared = succeeded(&a, &settings, &["prepare", "--family", "web"]);
    assert_eq!(prepared["digest"], one, "the version is the manifest digest the tag named");
    assert_eq!(prepared["image"], format!("{}/team/web@{one}", registry.host), "and where it lives");
    let images = thinpipe_tests::run(thinpipe_tests::worker().arg("--state-dir").arg(&a).arg("images"));
    let images = String::from_utf8_lossy(&images.stdout);
    assert!(images.contains(&format!("source docker://{}/team/web:stable", registry.host)), "{images}");
    assert!(images.contains(&one), "{images}");
    assert_eq!(file_in_snapshot(&a, &settings, "web", "etc/app"), "version one\n");

    // The tag moves mid-rollout.
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "version two\n")]]);
    let two = registry.push(&layout, "web", "team/web:stable");
    assert_ne!(one, two);

    // Host b was sent the version host a resolved: it gets that image, not the tag's new one.
    let b = dir.path().join("b");
    let pinned = succeeded(&b, &settings, &["prepare", "--family", "web", "--digest", &one]);
    assert_eq!(pinned["digest"], one);
    assert_eq!(file_in_snapshot(&b, &settings, "web", "etc/app"), "version one\n");

    // A host that resolves the tag now gets the new version.
    let c = dir.path().join("c");
    assert_eq!(succeeded(&c, &settings, &["prepare", "--family", "web"])["digest"], two);
    assert_eq!(file_in_snapshot(&c, &settings, "web", "etc/app"), "version two\n");

    // One image as the source (no placeholder), by digest: any family name takes it.
    let d = dir.path().join("d");
    let by_digest = with_source(&registry.worker_settings(), &format!("docker://{}/team/web@{one}", registry.host));
    assert_eq!(succeeded(&d, &by_digest, &["prepare", "--family", "pinned"])["digest"], one);

    // A version the registry never had, and a family it has no repository for.
    let missing = format!("sha256:{}", "0".repeat(64));
    let (result, _) =
        worker_run(&dir.path().join("e"), &settings, &["prepare", "--family", "web", "--digest", &missing]);
    assert_eq!(result["cause"], "not_found", "{result}");
    let (result, _) = worker_run(&dir.path().join("e"), &settings, &["prepare", "--family", "nothere"]);
    assert_eq!(result["cause"], "not_found", "{result}");
    assert!(result["error"].as_str().unwrap().contains("team/nothere has no tag stable"), "{result}");
}

#[test]
fn a_login_from_the_docker_config_over_tls_with_the_ca_from_settings() {
    if !ready() {
        return;
    }
    let password = "pw-never-printed-7731";
    let registry = Registry::start(RegistrySetup { login: Some(("tester".into(), password.into())), tls: true });
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "app", &[&[("srv/index.html", "<h1>hi</h1>\n")]]);
    let pushed = registry.push(&layout, "app", "team/app:1.4");
    let source = format!("{}/team/app:1.4", registry.host);
    let settings = with_source(&registry.worker_settings(), &source);

    let state = dir.path().join("ok");
    let (result, stderr) = worker_run(&state, &settings, &["prepare", "--family", "app"]);
    assert_eq!(result["status"], "succeeded", "{result}\n{stderr}");
    assert_eq!(result["digest"], pushed);
    assert!(!result.to_string().contains(password) && !stderr.contains(password), "the password is never printed");

    // No login for it: refused, saying how to give one, and never retried as if it could help.
    let empty = dir.path().join("empty-config.json");
    std::fs::write(&empty, r#"{"auths":{}}"#).unwrap();
    let mut anonymous = settings.clone();
    anonymous.push(format!("registry.docker_config={}", empty.display()));
    let (result, _) = worker_run(&dir.path().join("anon"), &anonymous, &["prepare", "--family", "app"]);
    assert_eq!(result["cause"], "access_denied", "{result}");
    assert!(result["error"].as_str().unwrap().contains("docker login"), "{result}");

    // Without the CA: the certificate is not trusted, and the message says where the CA goes.
    let untrusted: Vec<String> = settings.iter().filter(|s| !s.starts_with("registry.ca_file=")).cloned().collect();
    let (result, _) = worker_run(&dir.path().join("untrusted"), &untrusted, &["prepare", "--family", "app"]);
    assert_eq!(result["status"], "failed", "{result}");
    assert!(result["error"].as_str().unwrap().contains("registry.ca_file"), "{result}");
}

/// The digest of the first layer of `family` in the OCI layout `layout`.
fn first_layer(layout: &Path, family: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let manifest =
        rt.block_on(thinpipe::image::BlobSource::manifest(&thinpipe::image::LocalDir::new(layout), family)).unwrap();
    manifest.layers[0].digest.to_string()
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_is_sealed() {
    if !ready() {
        return;
    }
    let registry = Registry::start(RegistrySetup::default());
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "good\n")]]);
    registry.push(&layout, "web", "team/web:1");
    let blob = registry.blob_file(&first_layer(&layout, "web"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();

    let settings = with_source(&registry.worker_settings(), &format!("{}/team/web:1", registry.host));
    let state = dir.path().join("state");
    let (result, _) = worker_run(&state, &settings, &["prepare", "--family", "web"]);
    assert_eq!(result["cause"], "bad_source", "{result}");
    assert!(result["error"].as_str().unwrap().contains("does not match its digest"), "{result}");
    let images = thinpipe_tests::run(thinpipe_tests::worker().arg("--state-dir").arg(&state).arg("images"));
    assert!(!String::from_utf8_lossy(&images.stdout).contains("sealed"), "nothing was sealed");
}

#[test]
fn a_429_storm_is_waited_out_as_retry_after_says() {
    if !ready() {
        return;
    }
    let registry = Registry::start(RegistrySetup::default());
    let proxy = RegistryProxy::start(&registry.url());
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "throttled\n")], &[("etc/more", "y\n")]]);
    let pushed = registry.push(&layout, "web", "team/web:1");
    let settings = vec![
        format!("source={}/team/web:1", proxy.host),
        format!("registry.plain_http={}", proxy.host),
        "registry.retry_secs=30".to_owned(),
    ];
    proxy.throttle_next(4);
    let started = Instant::now();
    let prepared = succeeded(&dir.path().join("state"), &settings, &["prepare", "--family", "web"]);
    assert_eq!(prepared["digest"], pushed);
    assert_eq!(proxy.throttled(), 4, "every 429 was answered");
    // Each 429 said "Retry-After: 1"; the backoff's own first waits are a fraction of that.
    assert!(started.elapsed() >= Duration::from_secs(4), "waited as told: {:?}", started.elapsed());
    // One manifest request once the storm passed, one per blob: nothing asked twice.
    let asked: Vec<String> = proxy.seen().into_iter().skip(4).map(|(path, _)| path).collect();
    assert_eq!(asked.iter().filter(|p| p.contains("/manifests/")).count(), 1, "{asked:?}");
}

#[test]
fn a_registry_killed_mid_download_is_resumed_from_where_it_stopped() {
    if !ready() {
        return;
    }
    let mut registry = Registry::start(RegistrySetup::default());
    let proxy = RegistryProxy::start(&registry.url());
    let dir = tempfile::tempdir().unwrap();
    // 24 MiB of random printable text (gzip keeps ~80% of it), sent at ~25 MB/s: about a second of download.
    let noise: String = (0..24 << 20).map(|_| char::from(rand::random_range(33u8..127))).collect();
    let layout = oci_version(dir.path(), "big", &[&[("srv/noise", noise.as_str())]]);
    let layer = first_layer(&layout, "big");
    registry.push(&layout, "big", "team/big:1");
    proxy.pace_blobs(256 << 10);

    let state = dir.path().join("state");
    let mut cmd = thinpipe_tests::worker();
    cmd.arg("--state-dir").arg(&state);
    for s in [
        format!("source={}/team/big:1", proxy.host),
        format!("registry.plain_http={}", proxy.host),
        "registry.retry_secs=30".to_owned(),
    ] {
        cmd.args(["--set", &s]);
    }
    cmd.envs([("THINPIPE_CAPACITY_HIGH_PERCENT", "100"), ("THINPIPE_CAPACITY_LOW_PERCENT", "99")])
        .env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100");
    let child = cmd
        .args(["run", "prepare", "--family", "big", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = state.join("blobs/tmp").join(format!("{}.part", layer.trim_start_matches("sha256:")));
    wait_until("a few MiB of the layer downloaded", Duration::from_secs(60), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 2 << 20)
    });
    registry.restart();
    let out = child.wait_with_output().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "succeeded", "{result}\n{}", String::from_utf8_lossy(&out.stderr));
    let resumed = proxy.seen().into_iter().any(|(path, range)| {
        path.ends_with(&format!("/blobs/{layer}"))
            && range.is_some_and(|r| {
                r.strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0))
            })
    });
    assert!(resumed, "the layer was asked again from an offset: {:?}", proxy.seen());
}

/// An image index in the layout of two images with different files, one per platform.
fn multi_arch_layout(dir: &Path) -> PathBuf {
    let layout = oci_version(dir, "amd", &[&[("etc/arch", "amd64\n")]]);
    oci_version(dir, "arm", &[&[("etc/arch", "arm64\n")]]);
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let entry = |name: &str, arch: &str| {
        let mut d = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .unwrap()
            .clone();
        d.as_object_mut().unwrap().remove("annotations");
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        d
    };
    let image_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("amd", "amd64"), entry("arm", "arm64")],
    });
    let bytes = serde_json::to_vec(&image_index).unwrap();
    let digest = thinpipe::image::Digest::of_bytes(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(digest.hex()), &bytes).unwrap();
    index["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest.to_string(),
        "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    layout
}

#[test]
fn an_index_resolves_to_the_hosts_platform_or_the_one_set() {
    if !ready() {
        return;
    }
    let registry = Registry::start(RegistrySetup::default());
    let dir = tempfile::tempdir().unwrap();
    let layout = multi_arch_layout(dir.path());
    let index = registry.push_all(&layout, "multi", "team/multi:1");
    let settings = with_source(&registry.worker_settings(), &format!("{}/team/multi:1", registry.host));

    let host_arch = thinpipe::image::Platform::host().architecture;
    let amd = dir.path().join("amd");
    let mut on_amd = settings.clone();
    on_amd.push("registry.platform=linux/amd64".to_owned());
    assert_eq!(
        succeeded(&amd, &on_amd, &["prepare", "--family", "multi"])["digest"],
        index,
        "the version is the index"
    );
    assert_eq!(file_in_snapshot(&amd, &on_amd, "multi", "etc/arch"), "amd64\n");

    let arm = dir.path().join("arm");
    let mut on_arm = settings.clone();
    on_arm.push("registry.platform=linux/arm64".to_owned());
    assert_eq!(succeeded(&arm, &on_arm, &["prepare", "--family", "multi"])["digest"], index);
    assert_eq!(file_in_snapshot(&arm, &on_arm, "multi", "etc/arch"), "arm64\n");

    // Unset, the host's own platform.
    if host_arch == "amd64" || host_arch == "arm64" {
        let own = dir.path().join("own");
        succeeded(&own, &settings, &["prepare", "--family", "multi"]);
        assert_eq!(file_in_snapshot(&own, &settings, "multi", "etc/arch"), format!("{host_arch}\n"));
    }

    let mut on_s390x = settings.clone();
    on_s390x.push("registry.platform=linux/s390x".to_owned());
    let (result, _) = worker_run(&dir.path().join("s390x"), &on_s390x, &["prepare", "--family", "multi"]);
    assert_eq!(result["cause"], "bad_source", "{result}");
    assert!(
        result["error"].as_str().unwrap().contains("has no image for linux/s390x (it has linux/amd64, linux/arm64)"),
        "{result}"
    );
}

/// A P-256 key from `seed` and its public half written as `cosign.pub` would be.
fn cosign_key(dir: &Path, name: &str, seed: u8) -> (p256::ecdsa::SigningKey, PathBuf) {
    let key = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, thinpipe::image::signature::public_pem(&key)).unwrap();
    (key, path)
}

/// The image blobs (config and layers) asked for: everything under `/blobs/` but `allowed`.
fn image_blob_gets(proxy: &RegistryProxy, allowed: &[String]) -> Vec<String> {
    proxy
        .seen()
        .into_iter()
        .map(|(path, _)| path)
        .filter(|p| p.contains("/blobs/") && !allowed.iter().any(|a| p.ends_with(a.as_str())))
        .collect()
}

#[test]
fn a_cosign_policy_refuses_unsigned_and_wrongly_signed_images_before_any_blob_is_fetched() {
    if !ready() {
        return;
    }
    let registry = Registry::start(RegistrySetup::default());
    let proxy = RegistryProxy::start(&registry.url());
    let dir = tempfile::tempdir().unwrap();
    let (team, team_pub) = cosign_key(dir.path(), "team", 11);
    let (stranger, _) = cosign_key(dir.path(), "stranger", 12);
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "signed\n")]]);
    let signed = registry.push(&layout, "web", "team/web:1");
    registry.cosign_sign("team/web", &signed, &team);
    let layout = oci_version(dir.path(), "forged", &[&[("etc/app", "forged\n")]]);
    let forged = registry.push(&layout, "forged", "team/forged:1");
    registry.cosign_sign("team/forged", &forged, &stranger);
    let layout = oci_version(dir.path(), "plain", &[&[("etc/app", "unsigned\n")]]);
    registry.push(&layout, "plain", "team/plain:1");

    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[default]\nsignature = \"cosign\"\nkeys = [\"{}\"]\n\n[families.open]\nsignature = \"none\"\n",
            team_pub.display()
        ),
    )
    .unwrap();
    let settings = vec![
        format!("source={}/team/{{family}}:1", proxy.host),
        format!("registry.plain_http={}", proxy.host),
        format!("registry.policy_file={}", policy.display()),
        "registry.retry_secs=20".to_owned(),
    ];
    // The signature payloads may be fetched; no blob of a refused image may.
    let payloads: Vec<String> = [(&signed, "team/web"), (&forged, "team/forged")]
        .iter()
        .map(|(d, repo)| {
            let d = thinpipe::image::Digest::parse(d).unwrap();
            let payload = thinpipe::image::signature::simple_signing_payload(&format!("{}/{repo}", registry.host), &d);
            thinpipe::image::Digest::of_bytes(&payload).to_string()
        })
        .collect();

    let state = dir.path().join("state");
    let (result, _) = worker_run(&state, &settings, &["prepare", "--family", "forged"]);
    assert_eq!(result["cause"], "signature_invalid", "{result}");
    assert!(result["error"].as_str().unwrap().contains("not signed by any trusted key"), "{result}");
    let (result, _) = worker_run(&state, &settings, &["prepare", "--family", "plain"]);
    assert_eq!(result["cause"], "signature_missing", "{result}");
    assert_eq!(image_blob_gets(&proxy, &payloads), Vec::<String>::new(), "refused images: no blob was fetched");

    // Signed by the trusted key: prepared, and verified once for the host.
    assert_eq!(succeeded(&state, &settings, &["prepare", "--family", "web"])["digest"], signed);
    let sig_tag = |p: &String| p.contains("/manifests/sha256-");
    let tag = |p: &String| p.ends_with("/team/web/manifests/1");
    let count = |f: &dyn Fn(&String) -> bool| proxy.seen().iter().filter(|(p, _)| f(p)).count();
    let (asked, resolved) = (count(&sig_tag), count(&tag));
    succeeded(&state, &settings, &["prepare", "--family", "web"]);
    assert_eq!(file_in_snapshot(&state, &settings, "web", "etc/app"), "signed\n");
    assert!(count(&tag) > resolved, "the second prepare resolved the tag again");
    assert_eq!(count(&sig_tag), asked, "a verified version is not verified again");

    // A family whose rule is "none" needs no signature.
    registry.push(&oci_version(dir.path(), "open", &[&[("etc/app", "open\n")]]), "open", "team/open:1");
    succeeded(&state, &settings, &["prepare", "--family", "open"]);

    // Through the daemon, a refused version is dead-lettered with its reason.
    let daemon_state = dir.path().join("daemon");
    std::fs::create_dir_all(&daemon_state).unwrap();
    let env = [
        ("THINPIPE_SOURCE", format!("{}/team/{{family}}:1", proxy.host)),
        ("THINPIPE_REGISTRY_PLAIN_HTTP", proxy.host.clone()),
        ("THINPIPE_REGISTRY_POLICY_FILE", policy.display().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = thinpipe_tests::Daemon::start(&daemon_state, &env);
    let enqueue = |args: &[&str]| {
        std::process::Command::new(thinpipe_tests::bin("enqueue"))
            .arg("--state-dir")
            .arg(&daemon_state)
            .args(args)
            .output()
            .unwrap()
    };
    let out = enqueue(&["--wait", "--json", "prepare", "--family", "forged"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", String::from_utf8_lossy(&out.stderr), daemon.log());
    let refused: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(refused["cause"], "signature_invalid", "{refused}");
    let dead = String::from_utf8_lossy(&enqueue(&["--json", "dead-letters", "list"]).stdout).into_owned();
    assert!(
        dead.contains("forged") && dead.contains("not signed by any trusted key"),
        "dead-lettered with its reason: {dead}"
    );
    daemon.stop(Duration::from_secs(30));

    // A policy that requires signatures refuses a source that cannot carry them, at start.
    let mut on_dir = settings.clone();
    on_dir.push(format!("source=dir:{}", dir.path().display()));
    let out = thinpipe_tests::run(
        thinpipe_tests::worker()
            .arg("--state-dir")
            .arg(dir.path().join("dir-state"))
            .args(on_dir.iter().flat_map(|s| ["--set", s.as_str()]).chain(["run", "prepare", "--family", "web"])),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a registry, where signatures live"), "{out:?}");
}

#[test]
fn a_bearer_token_is_fetched_from_the_realm_the_registry_names_with_the_login() {
    if !ready() {
        return;
    }
    use base64::Engine as _;
    let registry = Registry::start(RegistrySetup::default());
    let proxy = RegistryProxy::start(&registry.url());
    proxy.require_bearer(Some(("robot", "hub-secret-5519")));
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "behind a token\n")], &[("etc/b", "b\n")]]);
    let pushed = registry.push(&layout, "web", "team/web:1");
    let config = |user: &str, pass: &str| {
        let path = dir.path().join(format!("docker-{user}.json"));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        std::fs::write(&path, serde_json::json!({"auths": {proxy.host.clone(): {"auth": auth}}}).to_string()).unwrap();
        path
    };
    let settings = |docker_config: &Path| {
        vec![
            format!("source={}/team/web:1", proxy.host),
            format!("registry.plain_http={}", proxy.host),
            format!("registry.docker_config={}", docker_config.display()),
            "registry.retry_secs=10".to_owned(),
        ]
    };
    let good = settings(&config("robot", "hub-secret-5519"));
    let (result, stderr) = worker_run(&dir.path().join("a"), &good, &["prepare", "--family", "web"]);
    assert_eq!(result["status"], "succeeded", "{result}\n{stderr}");
    assert_eq!(result["digest"], pushed);
    assert_eq!(proxy.tokens_issued(), 1, "one token serves every request of the repository");
    assert!(!stderr.contains("hub-secret-5519") && !result.to_string().contains("tok-"), "no secret is printed");

    let wrong = settings(&config("robot", "not-it"));
    let (result, _) = worker_run(&dir.path().join("b"), &wrong, &["prepare", "--family", "web"]);
    assert_eq!(result["cause"], "access_denied", "{result}");
    assert!(result["error"].as_str().unwrap().contains("the configured login was refused"), "{result}");
}

#[test]
fn an_ecr_registry_is_logged_in_to_with_a_token_from_ecr() {
    if !ready() {
        return;
    }
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    // What moto's GetAuthorizationToken gives its default account.
    let registry =
        Registry::start(RegistrySetup { login: Some(("AWS".into(), "123456789012-auth-token".into())), tls: false });
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "from ecr\n")]]);
    let pushed = registry.push(&layout, "web", "team/web:1");
    let no_docker_login = dir.path().join("config.json");
    std::fs::write(&no_docker_login, "{}").unwrap();
    let settings = vec![
        format!("source={}/team/web:1", registry.host),
        format!("registry.plain_http={}", registry.host),
        format!("registry.docker_config={}", no_docker_login.display()),
        format!("aws.endpoint={endpoint}"),
        "registry.retry_secs=10".to_owned(),
    ];
    let mut ecr = settings.clone();
    ecr.push(format!("registry.ecr_hosts={}", registry.host));
    let (result, stderr) = worker_run(&dir.path().join("a"), &ecr, &["prepare", "--family", "web"]);
    assert_eq!(result["status"], "succeeded", "{result}\n{stderr}");
    assert_eq!(result["digest"], pushed);
    assert!(!stderr.contains("auth-token"), "the token is never printed");

    // Not an ECR host, and no other login: refused.
    let (result, _) = worker_run(&dir.path().join("b"), &settings, &["prepare", "--family", "web"]);
    assert_eq!(result["cause"], "access_denied", "{result}");
}

#[test]
fn enqueue_publish_mirrors_a_registry_image_to_s3_after_the_same_signature_check() {
    if !ready() {
        return;
    }
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket) = rt.block_on(thinpipe_tests::aws::bucket(&endpoint));
    let registry = Registry::start(RegistrySetup::default());
    let dir = tempfile::tempdir().unwrap();
    let (team, team_pub) = cosign_key(dir.path(), "team", 21);
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "mirrored\n")], &[("etc/b", "b\n")]]);
    let signed = registry.push(&layout, "web", "team/web:1.4");
    registry.cosign_sign("team/web", &signed, &team);
    let layout = oci_version(dir.path(), "plain", &[&[("etc/app", "unsigned\n")]]);
    registry.push(&layout, "plain", "team/plain:1");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, format!("[default]\nsignature = \"cosign\"\nkeys = [\"{}\"]\n", team_pub.display()))
        .unwrap();
    let to = format!("s3://{bucket}/mirror");
    let publish = |reference: &str, family: &str| {
        thinpipe_tests::run(
            std::process::Command::new(thinpipe_tests::bin("enqueue"))
                .args(["--endpoint-url", &endpoint, "publish", reference, "--family", family, "--to", &to])
                .args(["--plain-http", &registry.host, "--policy-file"])
                .arg(&policy)
                .envs(thinpipe_tests::aws::AWS_ENV),
        )
    };

    // Unsigned: refused before anything is copied or uploaded.
    let out = publish(&format!("{}/team/plain:1", registry.host), "plain");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature_missing"), "{out:?}");
    let listed = rt.block_on(client.list_objects_v2().bucket(&bucket).send()).unwrap();
    assert_eq!(listed.key_count(), Some(0), "nothing was uploaded");

    // Signed: mirrored, and workers reading S3 prepare the same version.
    let out = publish(&format!("{}/team/web:1.4", registry.host), "web");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("version {signed}")), "{out:?}");
    let settings =
        vec![format!("source={to}"), format!("aws.endpoint={endpoint}"), "aws.s3_path_style=true".to_owned()];
    let state = dir.path().join("state");
    assert_eq!(succeeded(&state, &settings, &["prepare", "--family", "web"])["digest"], signed);
    assert_eq!(file_in_snapshot(&state, &settings, "web", "etc/app"), "mirrored\n");
}

#[test]
fn docker_schema_2_zstd_and_uncompressed_layers_prepare_alike() {
    if !ready() {
        return;
    }
    let registry = Registry::start(RegistrySetup::default());
    let dir = tempfile::tempdir().unwrap();
    let layout = oci_version(dir.path(), "web", &[&[("etc/app", "same\n")], &[("usr/bin/tool", "#!/bin/sh\n")]]);
    // The same image with its layers uncompressed, and with them in zstd (skopeo 1.9 writes
    // neither to a registry by itself), pushed as they are.
    let plain = recompressed_layout(&layout, &dir.path().join("plain-layout"), false);
    let zstd = recompressed_layout(&layout, &dir.path().join("zstd-layout"), true);
    // (name, skopeo's options, the layers' media type the registry then holds)
    let forms: [(&str, &[&str], &str); 3] = [
        ("docker", &["--format", "v2s2"], "application/vnd.docker.image.rootfs.diff.tar.gzip"),
        ("zstd", &["--preserve-digests", "--format", "oci"], "application/vnd.oci.image.layer.v1.tar+zstd"),
        ("plain", &["--preserve-digests", "--format", "oci"], "application/vnd.oci.image.layer.v1.tar"),
    ];
    for (i, (name, args, media_type)) in forms.into_iter().enumerate() {
        let repository = format!("forms/{name}:1");
        let out = thinpipe_tests::run(
            std::process::Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false"])
                .args(args)
                .arg(format!("oci:{}:web", [&layout, &zstd, &plain][i].display()))
                .arg(format!("docker://{}/{repository}", registry.host)),
        );
        assert!(out.status.success(), "skopeo {name}: {}", String::from_utf8_lossy(&out.stderr));
        let manifest: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}/v2/forms/{name}/manifests/1", registry.url()))
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .and_then(|r| r.json())
            .unwrap();
        assert_eq!(manifest["layers"][0]["mediaType"], media_type, "{name}: {manifest}");
        let settings = with_source(&registry.worker_settings(), &format!("{}/{repository}", registry.host));
        let state = dir.path().join(name);
        succeeded(&state, &settings, &["prepare", "--family", "web"]);
        assert_eq!(file_in_snapshot(&state, &settings, "web", "etc/app"), "same\n", "{name}");
        assert_eq!(file_in_snapshot(&state, &settings, "web", "usr/bin/tool"), "#!/bin/sh\n", "{name}");
    }
}

/// A copy of the OCI layout `from` (gzip layers, image `web`) at `to` with each layer
/// uncompressed, or compressed with zstd.
fn recompressed_layout(from: &Path, to: &Path, zstd: bool) -> PathBuf {
    use thinpipe::image::Digest;
    let blobs = to.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let read = |d: &str| std::fs::read(from.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
    let write = |bytes: &[u8]| {
        let d = Digest::of_bytes(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
        d
    };
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(from.join("index.json")).unwrap()).unwrap();
    let mut entry = index["manifests"][0].clone();
    let mut manifest: serde_json::Value = serde_json::from_slice(&read(entry["digest"].as_str().unwrap())).unwrap();
    write(&read(manifest["config"]["digest"].as_str().unwrap()));
    for layer in manifest["layers"].as_array_mut().unwrap() {
        let gz = read(layer["digest"].as_str().unwrap());
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(gz.as_slice()), &mut tar).unwrap();
        let (bytes, media_type) = if zstd {
            (zstd::encode_all(tar.as_slice(), 3).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd")
        } else {
            (tar, "application/vnd.oci.image.layer.v1.tar")
        };
        layer["digest"] = write(&bytes).to_string().into();
        layer["size"] = bytes.len().into();
        layer["mediaType"] = media_type.into();
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    entry["digest"] = write(&bytes).to_string().into();
    entry["size"] = bytes.len().into();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
    std::fs::write(to.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(to.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    to.to_owned()
}
