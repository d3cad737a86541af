//! Traces and metrics for real, with the `enqueue` and `worker` binaries exporting over
//! OTLP/HTTP to a receiver in this test: one trace links enqueue → job → run → step →
//! volume spans across processes and SQS; a run resumed after a crash keeps the trace of the
//! job that started it; the worker exports its metrics.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use thinpipe::image::write_sample_family;
use thinpipe_tests::otlp::{Receiver, Span};
use thinpipe_tests::{Daemon, bin, wait_until};

const AWS_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

fn enqueue(otel: &[(&'static str, String)], args: &[&str]) -> Output {
    Command::new(bin("enqueue"))
        .args(args)
        .envs(AWS_ENV)
        .envs(otel.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn find<'a>(spans: &'a [Span], name: &str, trace: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name && s.trace_id == trace).collect()
}

#[test]
fn one_trace_follows_a_job_from_enqueue_through_sqs_to_its_steps() {
    let Some(endpoint) = thinpipe::aws::test_endpoint() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (config, _) = rt.block_on(thinpipe::aws::test_config(&endpoint));
    let client = thinpipe::aws::sqs_client(&config);
    let name = format!("traced-{:x}", rand::random::<u64>());
    let jobs = rt.block_on(client.create_queue().queue_name(&name).send()).unwrap().queue_url().unwrap().to_owned();

    let receiver = Receiver::start();
    let otel = receiver.env();
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let prep = thinpipe_tests::prepare_run(dir.path(), "web");
    let mut env: Vec<(&str, &str)> = otel.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend([
        ("THINPIPE_QUEUE_KIND", "sqs"),
        ("THINPIPE_QUEUE_URL", jobs.as_str()),
        ("THINPIPE_AWS_ENDPOINT", endpoint.as_str()),
    ]);
    env.extend(AWS_ENV);
    let daemon = Daemon::start(dir.path(), &env);

    let args = ["--queue-url", &jobs, "--endpoint-url", &endpoint, "--wait", "--json", "--timeout", "120"];
    let out = enqueue(&otel, &[&args[..], &["activate", "--family", "web", "--invocation-id", "inv-1"]].concat());
    assert!(out.status.success(), "{} {}", String::from_utf8_lossy(&out.stderr), daemon.log());
    assert!(daemon.stop(Duration::from_secs(60)).success(), "the worker flushes its spans as it stops");

    let spans = receiver.spans();
    let posted: Vec<&Span> = spans.iter().filter(|s| s.name == "enqueue").collect();
    assert_eq!(posted.len(), 1, "{spans:#?}");
    let (root, trace) = (posted[0], posted[0].trace_id.clone());
    assert_eq!(root.service, "thinpipe-enqueue");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["trace_id"].as_str(), Some(trace.as_str()), "--wait --json names the trace");
    assert_eq!(root.attributes.get("family").map(String::as_str), Some("web"));

    let job = find(&spans, "job", &trace);
    assert_eq!(job.len(), 1, "the worker's job span is in the enqueue trace: {spans:#?}");
    assert_eq!(job[0].service, "thinpipe-worker");
    assert_eq!(job[0].parent_span_id, root.span_id, "the job span is the child of the enqueue span");
    assert_eq!(job[0].attributes.get("outcome").map(String::as_str), Some("succeeded"));

    // The job ran prepare-web (first use of the family) and activate-inv-1, each under it.
    let runs = find(&spans, "run", &trace);
    let run_ids: Vec<&str> = runs.iter().map(|r| r.attributes["run_id"].as_str()).collect();
    assert!(run_ids.contains(&prep.as_str()) && run_ids.contains(&"activate-inv-1"), "{run_ids:?}");
    for run in &runs {
        assert_eq!(run.parent_span_id, job[0].span_id, "runs are children of the job span");
        let steps: Vec<&Span> =
            find(&spans, "step", &trace).into_iter().filter(|s| s.parent_span_id == run.span_id).collect();
        assert!(!steps.is_empty(), "run {} has step spans", run.attributes["run_id"]);
        for s in steps {
            for key in ["run_id", "workflow", "step", "attempt", "outcome"] {
                assert!(s.attributes.contains_key(key), "step span without {key}: {s:?}");
            }
            assert_eq!(s.attributes["run_id"], run.attributes["run_id"]);
            assert_eq!(s.attributes["outcome"], "completed");
        }
    }
    // Each layer of the prepare: a download span and an apply span, under the steps.
    let (downloads, applies) = (find(&spans, "layer.download", &trace), find(&spans, "layer.apply", &trace));
    assert!(!downloads.is_empty() && downloads.len() == applies.len(), "{downloads:#?} {applies:#?}");
    for s in downloads.iter().chain(&applies) {
        assert!(s.attributes.contains_key("digest"), "a layer span names its layer: {s:?}");
    }
    assert!(applies.iter().all(|s| s.attributes.contains_key("written")), "{applies:#?}");
    let snapshot = find(&spans, "volume.snapshot", &trace);
    assert_eq!(snapshot.len(), 1, "the volume operation is traced too");
    let step_ids: Vec<&str> = find(&spans, "step", &trace).iter().map(|s| s.span_id.as_str()).collect();
    assert!(step_ids.contains(&snapshot[0].parent_span_id.as_str()), "under its step");

    // Metrics came out too.
    let jobs_metric = receiver.metric("thinpipe.jobs");
    assert!(
        jobs_metric.iter().any(|a| a.get("kind").map(String::as_str) == Some("activate")
            && a.get("outcome").map(String::as_str) == Some("succeeded")),
        "{jobs_metric:?}"
    );
    assert!(!receiver.metric("thinpipe.step.duration").is_empty());
    rt.block_on(client.delete_queue().queue_url(&jobs).send()).unwrap();
}

#[test]
fn a_run_resumed_after_a_crash_keeps_the_trace_of_the_job_that_started_it() {
    let receiver = Receiver::start();
    let otel = receiver.env();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let prep = thinpipe_tests::prepare_run(state, "web");
    let mut env: Vec<(&str, &str)> = otel.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", "2"));
    let mut armed = env.clone();
    armed.push(("THINPIPE_FAULT", "prepare.after_base_create@web"));
    let mut first = Daemon::start(state, &armed);

    let out = enqueue(&otel, &["--state-dir", state.to_str().unwrap(), "prepare", "--family", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let trace = stderr.split("trace ").nth(1).and_then(|t| t.get(..32)).expect("enqueue names the trace").to_owned();
    wait_until("the worker to die at the fault point", Duration::from_secs(60), || !first.is_running());

    let second = Daemon::start(state, &env);
    second.wait_for_log("job done", Duration::from_secs(60));
    assert!(second.stop(Duration::from_secs(60)).success());

    let spans = receiver.spans();
    let runs: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "run" && s.attributes.get("run_id").map(String::as_str) == Some(prep.as_str()))
        .collect();
    // Only the second worker finished the run, so only it ended (and exported) a run span.
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].trace_id, trace, "the resumed run continues the trace of the job that started it");
    let resumed_steps = find(&spans, "step", &trace);
    assert!(resumed_steps.iter().any(|s| s.parent_span_id == runs[0].span_id), "with its steps");
}

#[test]
fn json_logs_carry_the_run_and_step_on_every_line_inside_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let prep = thinpipe_tests::prepare_run(state, "web");
    let out = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(state)
        .args(["--log-format", "json", "run", "prepare", "--family", "web"])
        .env("THINPIPE_FAIL", "prepare.download@web*1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_steps: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["spans"].to_string().contains("\"name\":\"step\"")).collect();
    assert!(in_steps.len() >= 2, "the retried attempt and the steps log: {lines:#?}");
    for l in &in_steps {
        assert_eq!(l["span"]["run_id"], prep.as_str(), "{l}");
        assert!(l["span"]["step"].is_string(), "{l}");
    }
    let retried =
        in_steps.iter().find(|l| l["fields"]["message"] == "step attempt failed").expect("the failed attempt");
    assert_eq!(retried["span"]["step"], "stream_into_base");
}

/// A collector that takes connections but never answers: a one-shot command still exits
/// promptly (within the export budget, not the exporter's timeout), with one WARN line and
/// none of the SDK's own ERROR lines.
#[test]
fn an_unresponsive_collector_costs_one_warning_and_no_wait() {
    // Connections complete in the kernel's backlog; nothing ever reads or answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    write_sample_family(dir.path(), "web").unwrap();
    let run = |state: &str, otel: Option<&str>| {
        let mut cmd = thinpipe_tests::worker();
        cmd.arg("--state-dir").arg(dir.path().join(state)).args(["run", "prepare", "--family", "web", "--source"]);
        cmd.arg(dir.path()).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        if let Some(e) = otel {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", e);
        }
        let started = std::time::Instant::now();
        let out = cmd.output().unwrap();
        (out, started.elapsed())
    };
    let (plain, plain_took) = run("plain", None);
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let (out, took) = run("silent", Some(&endpoint));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("ERROR") && !stderr.contains("opentelemetry"), "the SDK's own lines: {stderr}");
    let warnings = stderr.lines().filter(|l| l.contains("OTLP collector")).count();
    assert_eq!(warnings, 1, "one warning: {stderr}");
    // The exporter's own timeout is 10 s; the exit waits at most the budget (200 ms). The
    // margin covers the run itself varying between the two commands.
    assert!(
        took < plain_took + Duration::from_secs(2),
        "the exit waited for the collector: {took:?} against {plain_took:?} without one"
    );
    drop(silent);
}
