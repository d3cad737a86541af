//! `/metrics` of a real `worker daemon`, scraped and parsed as Prometheus would: jobs by kind
//! and outcome, step durations, the queue's backlog and dead letters, volume storage and
//! readiness, each checked against what the test made happen; and the example alert rules
//! (`prometheus/alerts.yml`): every expression parses as PromQL and names only metrics the
//! worker serves.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use thinpipe::image::write_sample_family;
use thinpipe_tests::{Daemon, bin, wait_until};

fn scrape(api: &str) -> Scrape {
    let r = reqwest::blocking::get(format!("{api}/metrics")).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = r.text().unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The one sample named `name` whose labels include `labels`.
fn sample<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{name}: not a single value: {other:?}"),
    }
}

fn enqueue(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("enqueue")).arg("--state-dir").arg(state).args(args).output().unwrap()
}

#[test]
fn metrics_count_jobs_backlog_dead_letters_storage_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write_sample_family(state, "web").unwrap();
    let daemon = Daemon::start(state, &[]);
    let api = daemon.admin_url();
    let queue = format!("embedded:{}#jobs", state.join("queue.db").display());

    let before = scrape(&api);
    assert_eq!(value(&before, "thinpipe_ready", &[]), 1.0, "a fresh worker is ready");
    for state in ["waiting", "in_flight"] {
        assert_eq!(value(&before, "thinpipe_queue_messages", &[("queue", &queue), ("state", state)]), 0.0);
    }
    assert_eq!(value(&before, "thinpipe_queue_dead_letters", &[("queue", &queue)]), 0.0);
    let used = value(&before, "thinpipe_volume_storage_bytes", &[("of", "used")]);
    let total = value(&before, "thinpipe_volume_storage_bytes", &[("of", "total")]);
    assert!(0.0 < used && used <= total, "used {used} of {total}");
    let percent = value(&before, "thinpipe_capacity_used_percent", &[("what", "data")]);
    assert!((percent - 100.0 * used / total).abs() < 1.0, "{percent}% vs {used}/{total}");

    let ok = enqueue(state, &["--wait", "prepare", "--family", "web"]);
    assert!(ok.status.success(), "{}\n{}", String::from_utf8_lossy(&ok.stderr), daemon.log());
    let unknown = enqueue(state, &["--wait", "prepare", "--family", "nowhere"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", String::from_utf8_lossy(&unknown.stderr));
    // The counters are added before the result goes out; `job done` follows the ack.
    daemon.wait_for_log("nowhere", Duration::from_secs(30));
    wait_until("both jobs to be done", Duration::from_secs(30), || daemon.log().matches("job done").count() == 2);

    let after = scrape(&api);
    assert_eq!(value(&after, "thinpipe_jobs_total", &[("kind", "prepare"), ("outcome", "succeeded")]), 1.0);
    assert_eq!(value(&after, "thinpipe_jobs_total", &[("kind", "prepare"), ("outcome", "dead_lettered")]), 1.0);
    assert_eq!(value(&after, "thinpipe_queue_dead_letters", &[("queue", &queue)]), 1.0);
    // The prepare that ran: its duration, the bytes it downloaded and the bytes it wrote.
    let prepares: Vec<_> = after
        .samples
        .iter()
        .filter(|s| s.metric == "thinpipe_prepare_duration_seconds" && s.labels.get("outcome") == Some("succeeded"))
        .collect();
    assert_eq!(prepares.len(), 1, "one prepare duration histogram: {prepares:?}");
    let Value::Histogram(buckets) = &prepares[0].value else { panic!("{:?} is not a histogram", prepares[0]) };
    assert_eq!(buckets.last().map(|b| b.count), Some(1.0), "one prepare ran: {buckets:?}");
    assert!(value(&after, "thinpipe_blob_bytes_downloaded_bytes_total", &[]) > 0.0, "bytes downloaded");
    assert!(value(&after, "thinpipe_layer_bytes_applied_bytes_total", &[]) > 0.0, "bytes applied");
    let steps = after.samples.iter().filter(|s| s.metric == "thinpipe_step_duration_seconds");
    let completed: Vec<_> = steps.filter(|s| s.labels.get("workflow") == Some("prepare")).collect();
    assert!(!completed.is_empty(), "no prepare step durations");
    for s in &completed {
        let Value::Histogram(buckets) = &s.value else { panic!("{s:?} is not a histogram") };
        assert!(buckets.last().is_some_and(|b| b.count >= 1.0), "{s:?}");
        // Bounds in seconds: sub-millisecond steps and hour-long ones each have a bucket.
        let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
        for bound in [0.0001, 0.001, 1.0, 3600.0] {
            assert!(bounds.contains(&bound), "no bucket at {bound} s: {bounds:?}");
        }
        assert!(!bounds.contains(&10000.0), "millisecond-style buckets: {bounds:?}");
    }

    // Drained: not ready, and what is posted now waits in the queue.
    let drained = reqwest::blocking::Client::new().post(format!("{api}/drain")).send().unwrap();
    assert_eq!(drained.status().as_u16(), 202);
    for n in 0..2 {
        let posted = enqueue(state, &["activate", "--family", "web", "--invocation-id", &format!("m{n}")]);
        assert!(posted.status.success(), "{}", String::from_utf8_lossy(&posted.stderr));
    }
    let drained = scrape(&api);
    assert_eq!(value(&drained, "thinpipe_ready", &[]), 0.0);
    assert_eq!(value(&drained, "thinpipe_queue_messages", &[("queue", &queue), ("state", "waiting")]), 2.0);

    // Every expression of the example alert rules parses, and each thinpipe metric it
    // names is one the worker serves.
    let served: BTreeSet<&str> = drained.samples.iter().map(|s| s.metric.as_str()).collect();
    let rules =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../prometheus/alerts.yml")).unwrap();
    let rules: serde_norway::Value = serde_norway::from_str(&rules).unwrap();
    let mut checked = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let (name, expr) = (rule["alert"].as_str().unwrap(), rule["expr"].as_str().unwrap());
            if let Err(e) = promql_parser::parser::parse(expr) {
                panic!("alert {name}: {expr}: {e}");
            }
            let named = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            for metric in named.filter(|w| w.starts_with("thinpipe_")) {
                assert!(
                    served.contains(metric),
                    "alert {name} names {metric}, which /metrics does not serve: {served:?}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "the rules file's alerts");
    daemon.stop(Duration::from_secs(30));
}
