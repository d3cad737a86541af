//! The worker's admin API against a real `worker daemon`: health and readiness, drain
//! (readiness false, in-flight count, no new jobs taken, the process stays up until
//! SIGTERM), the runs and workflows endpoints, the bearer token, the refusal to bind a
//! public address without one, and `worker runs list|show`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use thinpipe::image::write_sample_family;
use thinpipe_tests::{Daemon, bin, wait_until};

fn get(url: &str) -> (u16, Value) {
    let r = reqwest::blocking::get(url).unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn post(url: &str) -> (u16, Value) {
    let r = reqwest::blocking::Client::new().post(url).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn enqueue(state: &Path, args: &[&str]) -> std::process::Child {
    Command::new(bin("enqueue"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn worker(state: &Path, args: &[&str]) -> std::process::Output {
    thinpipe_tests::worker().arg("--state-dir").arg(state).args(args).output().unwrap()
}

#[test]
fn health_runs_workflows_and_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let prep = thinpipe_tests::prepare_run(state, "web");
    let daemon = Daemon::start(state, &[]);
    let api = daemon.admin_url();

    assert_eq!(get(&format!("{api}/healthz")).0, 200);
    let (status, ready) = get(&format!("{api}/readyz"));
    assert_eq!((status, &ready["ready"]), (200, &Value::Bool(true)), "{ready}");

    let out = enqueue(state, &["--wait", "--json", "activate", "--family", "web", "--invocation-id", "a1"])
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "{}", daemon.log());

    let (_, workflows) = get(&format!("{api}/api/workflows"));
    let names: Vec<&str> = workflows.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"prepare") && names.contains(&"activate") && names.contains(&"release"), "{names:?}");
    let prepare = workflows.as_array().unwrap().iter().find(|w| w["name"] == "prepare").unwrap();
    let steps: Vec<&str> = prepare["steps"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(steps, ["fetch_manifest", "prepare_thin_base", "stream_into_base"], "{prepare}");

    let (_, runs) = get(&format!("{api}/api/runs"));
    let ids: Vec<&str> = runs.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["activate-a1", prep.as_str()], "newest first");
    let (_, only) = get(&format!("{api}/api/runs?workflow=prepare&status=completed&limit=5"));
    assert_eq!(only.as_array().unwrap().len(), 1);
    assert_eq!(only[0]["id"], prep.as_str());
    let (_, none) = get(&format!("{api}/api/runs?status=failed"));
    assert_eq!(none.as_array().unwrap().len(), 0);
    let (status, bad) = get(&format!("{api}/api/runs?status=sideways"));
    assert_eq!(status, 400, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("sideways"));

    let (status, run) = get(&format!("{api}/api/runs/{}", prep.replace('@', "%40")));
    assert_eq!(status, 200);
    assert_eq!(run["status"], "completed");
    assert_eq!(run["input"]["family"], "web", "{run}");
    let events = run["events"].as_array().unwrap();
    assert_eq!(events.first().unwrap()["event"], "started");
    assert_eq!(events.last().unwrap()["event"], "finished");
    let completed = events.iter().filter(|e| e["event"] == "step_completed").count();
    assert_eq!(completed, prepare["steps"].as_array().unwrap().len(), "one event per step");
    assert!(events.iter().all(|e| e["at_ms"].as_u64().is_some()));
    assert_eq!(run["responses"].as_array().unwrap().len(), completed + 1, "the initial response and one per step");
    assert_eq!(get(&format!("{api}/api/runs/no-such-run")).0, 404);

    // Families and storage, and a garbage collection pass on request.
    let (status, images) = get(&format!("{api}/api/images"));
    assert_eq!(status, 200, "{images}");
    let web = &images["families"][0];
    assert_eq!((web["family"].as_str(), web["current"]["live_snapshots"].as_u64()), (Some("web"), Some(1)), "{images}");
    assert!(images["usage"]["total_bytes"].as_u64().unwrap() > 0, "{images}");
    let (status, gc) = post(&format!("{api}/api/gc?dry_run=true"));
    assert_eq!((status, &gc["dry_run"]), (200, &Value::Bool(true)), "{gc}");
    assert_eq!(gc["deleted"], serde_json::json!([]), "nothing is garbage: {gc}");

    let page = reqwest::blocking::get(format!("{api}/")).unwrap().text().unwrap();
    assert!(page.contains("thinpipe inspector"));
    let js = reqwest::blocking::get(format!("{api}/inspector.js")).unwrap().text().unwrap();
    assert!(js.contains("function render"));

    // The CLI reads the same API.
    let out = worker(state, &["runs", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&prep) && text.contains("completed"), "{text}");
    let out = worker(state, &["runs", "show", &prep]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fetch_manifest completed") && text.contains("finished completed"), "{text}");
    let out = worker(state, &["runs", "show", "nope"]);
    // Naming a run that is not there is a usage error (2), through the API or the log.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run nope"));

    assert!(daemon.stop(Duration::from_secs(60)).success());
    assert!(!state.join("admin.addr").exists(), "the address file goes with the worker");
}

#[test]
fn drain_stops_taking_jobs_lets_running_ones_finish_and_reports_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    // The prepare stays in flight for a few seconds.
    let daemon = Daemon::start(state, &[("THINPIPE_PAUSE", "prepare.unpack@web=3000")]);
    let api = daemon.admin_url();
    let long = enqueue(state, &["--wait", "--json", "prepare", "--family", "web"]);
    // Running, not only received: a job received but not started is handed back by a drain.
    daemon.wait_for_log("pause point prepare.unpack@web", Duration::from_secs(60));

    let (status, drained) = post(&format!("{api}/drain"));
    assert_eq!(status, 202);
    assert_eq!(drained, serde_json::json!({"draining": true, "in_flight": 1}));
    let (status, ready) = get(&format!("{api}/readyz"));
    assert_eq!(status, 503);
    assert!(ready["reasons"].to_string().contains("draining"), "{ready}");
    assert_eq!(get(&format!("{api}/healthz")).0, 200, "alive while draining");

    // A job posted now is not taken.
    let later = enqueue(state, &["release", "--family", "web", "--invocation-id", "x"]).wait_with_output().unwrap();
    assert!(later.status.success());
    let out = long.wait_with_output().unwrap();
    assert!(out.status.success(), "the running job finished: {}", daemon.log());
    wait_until("no job in flight", Duration::from_secs(30), || {
        get(&format!("{api}/drain")).1["in_flight"].as_u64() == Some(0)
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let queue =
        thinpipe::queue::EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5).unwrap();
    assert_eq!(rt.block_on(queue.depth()).unwrap(), 1, "the job posted after the drain waits in the queue");
    assert_eq!(get(&format!("{api}/healthz")).0, 200, "the worker stays up until it is stopped");
    assert!(daemon.stop(Duration::from_secs(60)).success());
}

#[test]
fn a_token_guards_the_api_and_a_public_address_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let refused = worker(state, &["--set", "admin.listen=0.0.0.0:9185", "daemon"]);
    assert_eq!(refused.status.code(), Some(2));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("not a loopback address") && why.contains("admin.allow_public"), "{why}");
    let refused = worker(state, &["--set", "admin.listen=0.0.0.0:9185", "--set", "admin.allow_public=true", "daemon"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin.token"));

    let daemon = Daemon::start(state, &[("THINPIPE_ADMIN_TOKEN", "s3cret")]);
    let api = daemon.admin_url();
    assert_eq!(get(&format!("{api}/healthz")).0, 200, "health needs no token");
    assert_eq!(get(&format!("{api}/api/runs")).0, 401);
    assert_eq!(post(&format!("{api}/drain")).0, 401, "nor can anyone drain it");
    let client = reqwest::blocking::Client::new();
    let ok = client.get(format!("{api}/api/runs")).bearer_auth("s3cret").send().unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let wrong = client.get(format!("{api}/api/runs")).bearer_auth("guess").send().unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    // `worker config` does not print the secret.
    let shown = thinpipe_tests::worker().args(["config"]).env("THINPIPE_ADMIN_TOKEN", "s3cret").output().unwrap();
    assert!(!String::from_utf8_lossy(&shown.stdout).contains("s3cret"));
    assert!(daemon.stop(Duration::from_secs(60)).success());
}
