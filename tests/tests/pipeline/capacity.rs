//! A host that fills up says so, on a small loop-mounted btrfs (256 MiB, mounted with
//! `commit=1` so deleted subvolumes' space comes back in a second or two) with the real
//! worker: families and versions are prepared up to the high watermark and the least
//! recently used family without a live snapshot is evicted; activations past the refusal
//! limit get a clear failed result (not dead-lettered) and `/readyz` says why; releases bring
//! the space and readiness back. No family with a live snapshot is ever evicted.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use thinpipe::queue::EmbeddedQueue;
use thinpipe::store::Store;
use thinpipe_tests::{Daemon, tar_of_file, wait_until};

/// Each family's one layer: incompressible, about 6% of the filesystem.
const LAYER_MIB: usize = 16;

/// Writes family `name` (one layer of random bytes) into the default source.
fn family(state: &Path, name: &str, layer: &str) {
    let dir = state.join("images").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut content = vec![0u8; LAYER_MIB << 20];
    rand::fill(&mut content[..]);
    std::fs::write(dir.join(layer), tar_of_file("data.bin", &content)).unwrap();
}

fn readyz(api: &str) -> (u16, Value) {
    let r = reqwest::blocking::get(format!("{api}/readyz")).unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

fn used_percent(api: &str) -> f64 {
    let images: Value = reqwest::blocking::get(format!("{api}/api/images")).unwrap().json().unwrap();
    let u = &images["usage"];
    u["used_bytes"].as_f64().unwrap() * 100.0 / u["total_bytes"].as_f64().unwrap()
}

#[test]
fn a_full_host_evicts_unused_families_refuses_clearly_and_recovers_after_releases() {
    let Some(fs) = thinpipe::volume::testfs::LoopBtrfs::with(256, "loop,commit=1") else { return };
    // The state directory (the blob cache, which the refusal limit also guards) gets a file
    // system of its own too, so that how full this machine's disk is cannot decide the test.
    let Some(state_fs) = thinpipe::volume::testfs::LoopBtrfs::with(1024, "loop") else { return };
    let state = &state_fs.mount.join("state");
    std::fs::create_dir(state).unwrap();
    let volumes = fs.mount.join("volumes");
    let env = [
        ("THINPIPE_BACKEND", "btrfs"),
        ("THINPIPE_VOLUMES_DIR", volumes.to_str().unwrap()),
        ("THINPIPE_CAPACITY_HIGH_PERCENT", "40"),
        ("THINPIPE_CAPACITY_LOW_PERCENT", "30"),
        ("THINPIPE_CAPACITY_REFUSE_PERCENT", "60"),
        ("THINPIPE_GC_INTERVAL_SECS", "1"),
    ];
    let daemon = Daemon::start(state, &env);
    let api = daemon.admin_url();
    let started = std::time::Instant::now();
    let phase =
        |what: &str| eprintln!("{:>6.1}s {what} ({:.1}% used)", started.elapsed().as_secs_f64(), used_percent(&api));
    let store = Store::open(state.join("host.db")).unwrap();
    let current = |f: &str| store.image(f).unwrap().and_then(|i| i.current_base);

    // Unused families (no activation) up to the high watermark: the least recently used is
    // evicted whole until usage is below the low watermark.
    let unused = ["u1", "u2", "u3", "u4", "u5", "u6", "u7"];
    let mut prepared = Vec::new();
    for name in unused {
        family(state, name, "0001.tar");
        let r = thinpipe_tests::enqueue_wait(state, &["prepare", "--family", name]);
        assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());
        prepared.push(name);
        if used_percent(&api) >= 40.0 {
            break;
        }
    }
    assert!(used_percent(&api) >= 40.0, "the unused families reached the high watermark");
    phase("unused families prepared");
    wait_until("eviction below the low watermark", Duration::from_secs(120), || used_percent(&api) < 30.0);
    phase("evicted below the low watermark");
    let evicted: Vec<&str> = prepared.iter().copied().filter(|f| current(f).is_none()).collect();
    assert!(!evicted.is_empty(), "a family was evicted");
    assert_eq!(evicted, prepared[..evicted.len()], "least recently used first");
    assert!(current(prepared.last().unwrap()).is_some(), "the newest family is kept");
    assert!(daemon.log().contains("evicting a family to free space"));

    // Live families, and a second version of one (its first kept by the live snapshot), up
    // to the refusal limit: then a clear refusal, not a dead letter, and not ready.
    let mut live = Vec::new();
    let mut refused = None;
    for i in 0..12 {
        let name = format!("live{i}");
        family(state, &name, "0001.tar");
        let r = thinpipe_tests::enqueue_wait(
            state,
            &["activate", "--family", &name, "--invocation-id", &format!("inv-{name}")],
        );
        if r["status"] == "failed" {
            refused = Some(r);
            break;
        }
        assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());
        live.push(name.clone());
        if i == 0 {
            family(state, &name, "0002-v2.tar");
            let v2 = thinpipe_tests::enqueue_wait(state, &["prepare", "--family", &name]);
            assert_eq!(v2["status"], "succeeded", "{v2}");
            assert_ne!(v2["base_vol_id"], r["base_vol_id"], "a second version");
        }
    }
    phase("refused");
    let refused = refused.expect("activations were refused before the filesystem filled");
    let error = refused["error"].as_str().unwrap();
    // Refused at admission, or (a layer larger than the room left) before its data is written.
    assert!(
        error.starts_with("host full: volumes filesystem") && error.contains("(limit 60%)")
            || error.contains("host full: layer") && error.contains("capacity.refuse_percent"),
        "{error}"
    );
    assert_eq!(refused["cause"], "host_full", "a scheduler can act on the cause: {refused}");
    // Past the refusal limit the host is not ready; a layer refused for want of room kept it
    // below the limit (smaller images still fit), so there it may still be ready.
    let (status, ready) = readyz(&api);
    if error.contains("(limit 60%)") {
        assert_eq!(status, 503, "{ready}");
        assert!(
            ready["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("host full")),
            "{ready}"
        );
    }
    for name in &live {
        assert!(current(name).is_some(), "{name} has a live snapshot and is never evicted");
    }
    let queue = EmbeddedQueue::open(state.join("queue.db"), "jobs", Duration::from_secs(60), 5).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dead = rt.block_on(queue.dead_letters()).unwrap();
    assert!(dead.is_empty(), "nothing was dead-lettered: {dead:?}");

    // Releases give the space back: ready again, and the refused activation now works.
    for name in &live {
        let r = thinpipe_tests::enqueue_wait(
            state,
            &["release", "--family", name, "--invocation-id", &format!("inv-{name}")],
        );
        assert_eq!(r["status"], "succeeded", "{r}");
    }
    phase("released");
    // Ready, and room again: the released families were evicted below the high watermark.
    wait_until("ready again, below the high watermark", Duration::from_secs(120), || {
        readyz(&api).0 == 200 && used_percent(&api) < 40.0
    });
    phase("ready again");
    let again = refused["family"].as_str().unwrap();
    let r = thinpipe_tests::enqueue_wait(state, &["activate", "--family", again, "--invocation-id", "after-release"]);
    assert_eq!(r["status"], "succeeded", "{r}\n{}", daemon.log());
    let report = thinpipe_tests::worker()
        .arg("--state-dir")
        .arg(state)
        .args(["--set", "backend=btrfs", "--set", &format!("volumes_dir={}", volumes.display()), "reconcile", "--json"])
        .output()
        .unwrap();
    assert!(report.status.success(), "no orphan: {}", String::from_utf8_lossy(&report.stdout));
    let log = daemon.log();
    assert!(daemon.stop(Duration::from_secs(60)).success(), "{log}");
    eprintln!("{:>6.1}s stopped", started.elapsed().as_secs_f64());
    for line in
        log.lines().filter(|l| l.contains("evicting") || l.contains("come back") || l.contains("garbage collected"))
    {
        eprintln!("{line}");
    }
}
