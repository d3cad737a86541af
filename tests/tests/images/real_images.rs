//! Real images, file for file: a Debian image built here the way an image build makes one
//! (`scripts/real-image`: mmdebstrap and umoci, four layers with whiteouts of a directory
//! turned into a symlink and into a file, an opaque directory, absolute symlinks, setuid and
//! setgid binaries, hardlinks of files and of a symlink, a file capability) is prepared and
//! activated through `worker run`, and the snapshot must equal `umoci unpack` of the same
//! layout: every path's type, mode, owner, size, content hash, symlink target, hardlink
//! group and extended attributes. From the OCI layout on the `dir` and the `btrfs` backends,
//! from the same layers as a flat family, and from S3 after `enqueue publish`.
//!
//! Needs root and the image (`scripts/test` builds it and sets `THINPIPE_REAL_IMAGE`);
//! outside CI the tests skip without them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use thinpipe_tests::aws::AWS_ENV;
use thinpipe_tests::{bin, fstree};

const FAMILY: &str = "debian";

/// The image's cache folder (its OCI layout in `layout/`), or `None` (skip) outside CI.
fn image() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cache = std::env::var_os("THINPIPE_REAL_IMAGE").map(PathBuf::from);
    match cache {
        Some(c) if root && c.join("layout/index.json").is_file() => Some(c),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "the real-image tests need root and THINPIPE_REAL_IMAGE (scripts/test builds the image with scripts/real-image)"
            );
            eprintln!("skipping: run as root with THINPIPE_REAL_IMAGE=$(scripts/real-image)");
            None
        }
    }
}

/// `umoci unpack` of the layout (as root: owners kept), read once for every test.
fn reference(image: &Path) -> &'static fstree::Tree {
    static TREE: OnceLock<fstree::Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        let out = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{FAMILY}", image.join("layout").display()))
            .arg(&bundle)
            .output()
            .expect("umoci is installed (scripts/test installs it)");
        assert!(out.status.success(), "umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
        let tree = fstree::read(&bundle.join("rootfs"));
        assert!(tree.len() > 5000, "a real rootfs: {} entries", tree.len());
        tree
    })
}

/// `worker run <args> --json` on `state` with `settings`: the result, which must succeed.
fn run(state: &Path, settings: &[String], args: &[&str]) -> serde_json::Value {
    let mut cmd = thinpipe_tests::worker();
    cmd.arg("--state-dir").arg(state);
    for s in settings {
        cmd.args(["--set", s]);
    }
    // The disk the tests run on may be fuller than the default refusal watermark.
    let capacity = [("THINPIPE_CAPACITY_HIGH_PERCENT", "100"), ("THINPIPE_CAPACITY_LOW_PERCENT", "99")];
    cmd.envs(capacity).env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100");
    let out = cmd.arg("run").args(args).arg("--json").envs(AWS_ENV).output().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("worker run {args:?}: no result ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        result["status"],
        "succeeded",
        "worker run {args:?}: {result}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    result
}

/// Prepares and activates the image from `source`; the activation's snapshot, as a tree.
fn snapshot_of(state: &Path, source: &str, settings: &[String]) -> fstree::Tree {
    let prepared = run(state, settings, &["prepare", "--family", FAMILY, "--source", source]);
    assert!(prepared.get("devices_skipped").is_none(), "the image has no device nodes: {prepared}");
    let active =
        run(state, settings, &["activate", "--family", FAMILY, "--invocation-id", "inv-1", "--source", source]);
    let path = active["snapshot_path"].as_str().unwrap_or_else(|| panic!("no snapshot path: {active}"));
    fstree::read(Path::new(path))
}

#[test]
fn oci_layout_on_the_dir_backend_equals_umoci_unpack() {
    let Some(image) = image() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = format!("dir:{}", image.join("layout").display());
    let ours = snapshot_of(&dir.path().join("state"), &source, &[]);
    fstree::assert_same("dir backend vs umoci unpack", reference(&image), &ours);
}

#[test]
fn oci_layout_on_the_btrfs_backend_equals_umoci_unpack() {
    let Some(image) = image() else { return };
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::with(2048, "loop") else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = format!("dir:{}", image.join("layout").display());
    let settings = ["backend=btrfs".to_owned(), format!("volumes_dir={}", fs.mount.join("volumes").display())];
    let ours = snapshot_of(&dir.path().join("state"), &source, &settings);
    fstree::assert_same("btrfs backend vs umoci unpack", reference(&image), &ours);
}

/// The layout's layer blobs, in order, as `images/debian/0001.tar.gz`...: a flat family.
#[test]
fn the_same_layers_as_a_flat_family_equal_umoci_unpack() {
    let Some(image) = image() else { return };
    let dir = tempfile::tempdir().unwrap();
    let layout = image.join("layout");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let manifest =
        rt.block_on(thinpipe::image::BlobSource::manifest(&thinpipe::image::LocalDir::new(&layout), FAMILY)).unwrap();
    assert_eq!(manifest.layers.len(), 4, "the image has four layers");
    let flat = dir.path().join("flat");
    let family = flat.join("images").join(FAMILY);
    std::fs::create_dir_all(&family).unwrap();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let blob = layout.join("blobs/sha256").join(layer.digest.hex());
        std::fs::copy(&blob, family.join(format!("{:04}.tar.gz", i + 1))).unwrap();
    }
    let ours = snapshot_of(&dir.path().join("state"), &format!("dir:{}", flat.display()), &[]);
    fstree::assert_same("flat family vs umoci unpack", reference(&image), &ours);
}

#[test]
fn published_to_s3_and_prepared_from_there_equals_umoci_unpack() {
    let Some(image) = image() else { return };
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_client, bucket) = rt.block_on(thinpipe_tests::aws::bucket(&endpoint));
    let to = format!("s3://{bucket}/images");
    let out = Command::new(bin("enqueue"))
        .args(["--endpoint-url", &endpoint, "publish"])
        .arg(image.join("layout"))
        .args(["--family", FAMILY, "--to", &to])
        .envs(AWS_ENV)
        .output()
        .unwrap();
    assert!(out.status.success(), "enqueue publish: {}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let settings = [format!("aws.endpoint={endpoint}"), "aws.s3_path_style=true".to_owned()];
    let ours = snapshot_of(&dir.path().join("state"), &to, &settings);
    fstree::assert_same("from S3 vs umoci unpack", reference(&image), &ours);
}

#[test]
fn pushed_to_a_registry_and_prepared_from_there_equals_umoci_unpack() {
    let Some(image) = image() else { return };
    if !thinpipe_tests::registry::available() {
        return;
    }
    let registry = thinpipe_tests::registry::Registry::start(Default::default());
    registry.push(&image.join("layout"), FAMILY, "library/debian:bookworm");
    let dir = tempfile::tempdir().unwrap();
    let settings = registry.worker_settings();
    let source = format!("{}/library/{{family}}:bookworm", registry.host);
    let ours = snapshot_of(&dir.path().join("state"), &source, &settings);
    fstree::assert_same("from a registry vs umoci unpack", reference(&image), &ours);
}
