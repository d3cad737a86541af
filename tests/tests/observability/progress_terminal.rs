//! Progress on a terminal: `worker run prepare` and `enqueue --wait` (reading the worker's
//! `/api/progress`) draw the running step and its bytes when stderr is a terminal (a real
//! pseudo-terminal, made by util-linux `script`), and nothing of the kind into a pipe.
//! The download step is held for 1.5 s by a pause point so that the bar is drawn while it runs.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe_tests::{Daemon, bin};

/// Runs `args` under a pseudo-terminal 200 columns wide (the bar's message is cut at the
/// terminal's width); returns what the terminal showed.
fn on_terminal(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let line: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let line = format!("stty cols 200 rows 50; {}", line.join(" "));
    let mut cmd = Command::new("script");
    cmd.args(["--quiet", "--return", "--command", &line, "/dev/null"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("util-linux script");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, shown)
}

fn state(dir: &Path) -> String {
    dir.to_str().unwrap().to_owned()
}

#[test]
fn worker_run_prepare_draws_its_steps_and_bytes_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let worker = bin("worker");
    let pause = [("THINPIPE_PAUSE", "prepare.download@web=1500")];
    let (out, shown) = on_terminal(
        &[worker.to_str().unwrap(), "--state-dir", &state(dir.path()), "run", "prepare", "--family", "web"],
        &pause,
    );
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("stream_into_base (prepare-web@"), "the step is named: {shown}");
    assert!(shown.contains("] 0 B/"), "a bar with bytes done of the total: {shown}");
    assert!(shown.contains(": 0 of 3 layers done"), "and its layers: {shown}");
    assert!(shown.contains("ok: base-"), "the result follows: {shown}");

    // Into a pipe: the result and the log, no bar.
    let again = tempfile::tempdir().unwrap();
    write_sample_family(again.path(), "web").unwrap();
    let piped = Command::new(&worker)
        .arg("--state-dir")
        .arg(again.path())
        .args(["run", "prepare", "--family", "web"])
        .env("THINPIPE_PAUSE", "prepare.download@web=1500")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(!stderr.contains("stream_into_base (") && !stderr.contains('\u{1b}'), "no bar, no escapes: {stderr}");
}

/// The worker's admin API wants a token here: `enqueue` sends the one in its environment.
#[test]
fn enqueue_wait_draws_the_workers_progress_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let token = ("THINPIPE_ADMIN_TOKEN", "progress-secret");
    let daemon = Daemon::start(dir.path(), &[("THINPIPE_PAUSE", "prepare.download@web=1500"), token]);
    let api = daemon.admin_url();
    let enqueue = bin("enqueue");
    // While the download is held: /api/progress lists the step with each of its layers.
    let polled = std::thread::spawn(move || {
        let client = reqwest::blocking::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let steps: serde_json::Value = client
                .get(format!("{api}/api/progress"))
                .bearer_auth("progress-secret")
                .send()
                .and_then(|r| r.json())
                .unwrap_or_default();
            if let Some(step) = steps.as_array().and_then(|s| s.first()).filter(|s| s["step"] == "stream_into_base") {
                return step.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no download step in /api/progress: {steps}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (out, shown) = on_terminal(
        &[enqueue.to_str().unwrap(), "--state-dir", &state(dir.path()), "--wait", "prepare", "--family", "web"],
        &[token],
    );
    assert!(out.status.success(), "{shown}\n{}", daemon.log());
    assert!(shown.contains("stream_into_base (prepare-web@"), "the worker's step is shown: {shown}");
    assert!(shown.contains("] 0 B/"), "with its bytes: {shown}");
    assert!(shown.contains("of 3 layers done"), "and its layers: {shown}");
    let step = polled.join().unwrap();
    let layers = step["layers"].as_array().unwrap_or_else(|| panic!("no layers: {step}"));
    assert_eq!(layers.len(), 3, "{step}");
    let sizes: u64 = layers.iter().map(|l| l["size"].as_u64().unwrap()).sum();
    assert_eq!(step["total_bytes"].as_u64(), Some(sizes), "the layers make the total: {step}");
    assert!(layers.iter().all(|l| l["digest"].as_str().is_some_and(|d| d.starts_with("sha256:"))), "{step}");
    daemon.stop(Duration::from_secs(30));
}
