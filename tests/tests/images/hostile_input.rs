//! Hostile and malformed input, each with its expected outcome: bad messages are
//! dead-lettered with a reason that names the problem (the worker carries on); bad images
//! fail their run with an error that names the blob or file, and nothing is prepared.
//! The table in `tests/README.md` lists every case.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sha2::Digest as _;
use thinpipe::image::write_sample_family;
use thinpipe::queue::{EmbeddedQueue, JobQueue};
use thinpipe_tests::Daemon;

#[test]
fn bad_messages_are_dead_lettered_with_a_reason_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    write_sample_family(state, "api").unwrap();
    let mut daemon = Daemon::start(state, &[]);
    let huge = format!(r#"{{"v":1,"kind":"prepare","family":"web","pad":"{}"}}"#, "x".repeat(300 * 1024));
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", "this is not json".into(), "not JSON"),
        ("JSON of the wrong shape", r#"{"v":1,"kind":"prepare","family":7}"#.into(), "invalid type"),
        ("unknown kind", r#"{"v":1,"kind":"explode","family":"web"}"#.into(), "unknown variant"),
        ("empty family", r#"{"v":1,"kind":"prepare","family":""}"#.into(), "is invalid"),
        ("family ../x", r#"{"v":1,"kind":"prepare","family":"../x"}"#.into(), "is invalid"),
        ("family a/b", r#"{"v":1,"kind":"prepare","family":"a/b"}"#.into(), "is invalid"),
        ("family with NUL", r#"{"v":1,"kind":"prepare","family":"a\u0000b"}"#.into(), "is invalid"),
        ("a 300 KB message", huge, "at most 262144 bytes"),
        (
            "a 5000-character family",
            format!(r#"{{"v":1,"kind":"prepare","family":"{}"}}"#, "f".repeat(5000)),
            "(5000 bytes) is invalid: use 1 to 128 letters",
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let q = EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5).unwrap();
    let none = BTreeMap::new();
    let ids: Vec<String> = cases.iter().map(|(_, body, _)| rt.block_on(q.send("jobs", body, &none)).unwrap()).collect();

    // An invocation id reused for another family: the second job is refused, not served
    // the first family's snapshot.
    let first = r#"{"v":1,"kind":"activate","family":"web","invocation_id":"inv-r","reply_to":"res"}"#;
    let reused = r#"{"v":1,"kind":"activate","family":"api","invocation_id":"inv-r","reply_to":"res"}"#;
    rt.block_on(q.send("jobs", first, &none)).unwrap();
    let reused_id = rt.block_on(async {
        let res = q.named("res");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(tokio::time::Instant::now() < deadline, "no result: {}", daemon.log());
            if let Some(d) = res.receive(1, Duration::from_millis(500)).await.unwrap().pop() {
                res.ack(&d).await.unwrap();
                break;
            }
        }
        q.send("jobs", reused, &none).await.unwrap()
    });

    let dead = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let dead = q.dead_letters().await.unwrap();
            if dead.len() > cases.len() || tokio::time::Instant::now() > deadline {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    for ((what, _, reason), id) in cases.iter().zip(&ids) {
        let d = dead.iter().find(|d| &d.message_id == id).unwrap_or_else(|| panic!("{what}: not dead-lettered"));
        assert!(d.reason.contains(reason), "{what}: the reason {:?} should say {reason:?}", d.reason);
        assert!(d.reason.len() < 400, "{what}: the reason quotes its input short: {} bytes", d.reason.len());
    }
    // Log lines quote input short too: no line carries a whole hostile message.
    let longest = daemon.log().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1500, "a log line of {longest} bytes:\n{}", daemon.log());
    let d = dead.iter().find(|d| d.message_id == reused_id).expect("the reused invocation id is dead-lettered");
    assert!(d.reason.contains("another input") && d.reason.contains("web"), "{}", d.reason);
    let snaps = std::fs::read_dir(state.join("volumes/snaps")).unwrap().count();
    assert_eq!(snaps, 1, "no snapshot for the refused job");
    assert!(daemon.is_running(), "the worker carries on: {}", daemon.log());
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// An OCI layout at `dir` for family `fam` whose manifest lists `layers` (digest hex,
/// size); `blobs` are written as given (name → content).
fn oci_layout(dir: &Path, manifest: &[u8], blobs: &[(String, Vec<u8>)]) {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).unwrap();
    for (hex, content) in blobs {
        std::fs::write(blob_dir.join(hex), content).unwrap();
    }
    std::fs::write(blob_dir.join(sha(manifest)), manifest).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", sha(manifest)), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "fam"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// An image config listing `diff_ids` (hex digests of the uncompressed layers).
fn config(diff_ids: &[String]) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(|h| format!("sha256:{h}")).collect();
    serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ids}})
        .to_string()
        .into_bytes()
}

/// A manifest of `layers` (digest hex, size) whose config is `config`.
fn manifest(layers: &[(String, usize)], config: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(config)), "size": config.len()},
        "layers": layers.iter().map(|(hex, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{hex}"), "size": size})).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes()
}

/// Writes a hostile image source into the directory it is given.
type BuildSource = Box<dyn Fn(&Path)>;

/// `worker run prepare` of family `fam` from `source`: the JSON result.
fn prepare(state: &Path, source: &Path) -> serde_json::Value {
    let out = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(state)
        .args(["run", "prepare", "--family", "fam", "--json", "--source"])
        .arg(source)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the job fails: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bad_images_fail_naming_the_problem_and_nothing_is_prepared() {
    let layer = thinpipe_tests::tar_of_file("etc/hostname", b"x\n");
    let missing = "ab".repeat(32);
    // An OCI layout of `layer` whose config lists `diff_ids`; with `write_config` false, the
    // config blob is left out.
    let layout_of = |diff_ids: Vec<String>, write_config: bool| -> BuildSource {
        let layer = layer.clone();
        Box::new(move |dir: &Path| {
            let cfg = config(&diff_ids);
            let m = manifest(&[(sha(&layer), layer.len())], &cfg);
            let mut blobs = vec![(sha(&layer), layer.clone())];
            if write_config {
                blobs.push((sha(&cfg), cfg));
            }
            oci_layout(dir, &m, &blobs);
        })
    };
    let cases: Vec<(&str, BuildSource, &str)> = vec![
        (
            "a manifest that references a missing blob",
            Box::new(|dir: &Path| {
                let cfg = config(&["cd".repeat(32)]);
                oci_layout(dir, &manifest(&[("ab".repeat(32), 10)], &cfg), &[(sha(&cfg), cfg)])
            }),
            &missing[..16],
        ),
        (
            "a layer whose uncompressed digest is not the one its config lists",
            layout_of(vec![sha(b"another layer")], true),
            "rootfs.diff_ids names",
        ),
        ("a config listing fewer diff ids than layers", layout_of(vec![], true), "lists 0 rootfs.diff_ids"),
        (
            "a manifest whose config blob is missing",
            layout_of(vec![sha(&layer)], false),
            "the image config, does not exist",
        ),
        (
            "a manifest that loops back to an index",
            Box::new(|dir: &Path| {
                // The index names a "manifest" that is itself an index naming itself.
                let blob_dir = dir.join("blobs/sha256");
                std::fs::create_dir_all(&blob_dir).unwrap();
                let inner = br#"{"schemaVersion":2,"manifests":[]}"#;
                std::fs::write(blob_dir.join(sha(inner)), inner).unwrap();
                let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "digest": format!("sha256:{}", sha(inner)), "size": inner.len(),
                    "annotations": {"org.opencontainers.image.ref.name": "fam"}}]});
                std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
            }),
            "malformed",
        ),
        (
            "an enormous index.json",
            Box::new(|dir: &Path| {
                std::fs::create_dir_all(dir).unwrap();
                let pad = " ".repeat(5 << 20);
                std::fs::write(dir.join("index.json"), format!(r#"{{"schemaVersion":2,"manifests":[]{pad}}}"#))
                    .unwrap();
            }),
            "more than the",
        ),
        (
            "a layer with a wrong digest",
            Box::new(move |dir: &Path| {
                let claimed = sha(b"something else");
                let cfg = config(&[sha(&layer)]);
                let m = manifest(&[(claimed.clone(), layer.len())], &cfg);
                oci_layout(dir, &m, &[(claimed, layer.clone()), (sha(&cfg), cfg)]);
            }),
            "does not match its digest",
        ),
        (
            "a truncated gzip layer",
            Box::new(|dir: &Path| {
                let fam = dir.join("images/fam");
                std::fs::create_dir_all(&fam).unwrap();
                std::fs::write(fam.join("0001.tar.gz"), [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3]).unwrap();
            }),
            "truncated or corrupt",
        ),
    ];
    for (what, build, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        build(&source);
        let state = dir.path().join("state");
        let r = prepare(&state, &source);
        assert_eq!(r["status"], "failed", "{what}: {r}");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{what}: the error {error:?} should say {expected:?}");
        let store = thinpipe::store::Store::open(state.join("host.db")).unwrap();
        let prepared = store.image("fam").unwrap().is_some_and(|i| i.current_base.is_some());
        assert!(!prepared, "{what}: never marked prepared");
        let sealed: Vec<String> = std::fs::read_dir(state.join("volumes/bases"))
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        assert!(sealed.iter().all(|n| !n.ends_with(".sealed")), "{what}: nothing sealed: {sealed:?}");
    }
}
