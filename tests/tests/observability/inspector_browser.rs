//! The inspector page in headless Chromium (Debian's `chromium`, driven by `playwright-core`
//! from `tests/browser/`) against a worker that ran real jobs: one prepare that retried a
//! step, one that failed, one activation. The checks live in `tests/browser/inspector.mjs`;
//! the screenshot is kept in `target/test-artifacts/inspector.png`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe_tests::Daemon;

#[test]
fn the_inspector_shows_runs_steps_attempts_and_plays_the_history() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let ready = browser_dir.join("node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists();
    if !ready {
        assert!(std::env::var("CI").is_err(), "chromium or playwright-core is missing: scripts/test installs them");
        eprintln!("skipping: chromium or tests/browser/node_modules missing (scripts/test installs them)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let broken = state.join("images/broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("0001.tar"), b"this is not a tar archive at all".repeat(40)).unwrap();
    // The first download of `web` fails once (transiently), so its run shows a retry.
    let daemon = Daemon::start(state, &[("THINPIPE_FAIL", "prepare.download@web*1")]);

    assert_eq!(
        thinpipe_tests::enqueue_wait(state, &["prepare", "--family", "web"])["status"],
        "succeeded",
        "{}",
        daemon.log()
    );
    assert_eq!(thinpipe_tests::enqueue_wait(state, &["prepare", "--family", "broken"])["status"], "failed");
    assert_eq!(
        thinpipe_tests::enqueue_wait(state, &["activate", "--family", "web", "--invocation-id", "inv-1"])["status"],
        "succeeded"
    );

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("inspector.png");
    if screenshot.exists() {
        std::fs::remove_file(&screenshot).unwrap();
    }
    let out = Command::new("node")
        .current_dir(&browser_dir)
        .arg("inspector.mjs")
        .arg(daemon.admin_url())
        .arg(&screenshot)
        .args([thinpipe_tests::prepare_run(state, "web"), thinpipe_tests::prepare_run(state, "broken")])
        .output()
        .expect("node (scripts/test installs it)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "browser checks failed:\n{stdout}\n{stderr}\nworker log:\n{}", daemon.log());
    assert!(stdout.contains("inspector ok"), "{stdout}");
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}
