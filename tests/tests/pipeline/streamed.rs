//! Streamed prepare through the real worker: the settings that shape it are honoured, a
//! wrong one is refused naming it, and the stricter order (`images.verify_before_unpack`)
//! prepares the same tree. (The stream's own behaviour, cut connections, corrupt blobs and
//! version 1's runs after an upgrade, is proven in `shared/src/pipeline/prepare/tests.rs`;
//! its crash points in `crash_matrix.rs`.)

use std::path::Path;
use std::process::Output;

use thinpipe::image::write_sample_family;

fn prepare(state: &Path, settings: &[&str]) -> Output {
    let mut cmd = thinpipe_tests::worker();
    cmd.arg("--state-dir").arg(state);
    for s in settings {
        cmd.args(["--set", s]);
    }
    cmd.args(["run", "prepare", "--family", "web", "--json", "--source"]).arg(state.join("src"));
    cmd.output().unwrap()
}

/// The tree a prepare made: every path under the family's base with its content.
fn tree(state: &Path) -> Vec<(String, Vec<u8>)> {
    let bases = state.join("volumes/bases");
    let base = std::fs::read_dir(&bases).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    let mut out = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(&base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
                out.push((rel, Vec::new()));
            } else if meta.is_file() {
                out.push((rel, std::fs::read(&path).unwrap()));
            } else {
                out.push((rel, std::fs::read_link(&path).unwrap().display().to_string().into_bytes()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_stricter_order_and_the_read_ahead_settings_prepare_the_same_tree() {
    let mut trees = Vec::new();
    for settings in [
        &[][..],
        &["images.verify_before_unpack=true"][..],
        &["images.parallel_downloads=1", "images.read_ahead_mib=1"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_sample_family(&dir.path().join("src"), "web").unwrap();
        let out = prepare(dir.path(), settings);
        assert!(out.status.success(), "{settings:?}: {}", String::from_utf8_lossy(&out.stderr));
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(result["status"], "succeeded", "{settings:?}: {result}");
        trees.push(tree(dir.path()));
    }
    assert!(trees[0].len() > 5, "{:?}", trees[0]);
    assert_eq!(trees[0], trees[1], "verify_before_unpack prepares the same tree");
    assert_eq!(trees[0], trees[2], "a small read-ahead prepares the same tree");
}

#[test]
fn a_read_ahead_of_nothing_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(&dir.path().join("src"), "web").unwrap();
    for wrong in ["images.parallel_downloads=0", "images.read_ahead_mib=0"] {
        let out = prepare(dir.path(), &[wrong]);
        assert!(!out.status.success(), "{wrong} is refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let key = wrong.split('=').next().unwrap();
        assert!(stderr.contains(key) && stderr.contains("at least 1"), "{wrong}: {stderr}");
    }
}
