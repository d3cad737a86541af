//! Crash tests of the engine with a real process: `fsm_helper` runs a four-step workflow
//! and is killed with SIGKILL at named fault points or at a random instant; a fresh process
//! then resumes (and, like a queue redelivering its jobs, starts every run again). Proves
//! guarantees 1–4 of `shared/src/fsm/DESIGN.md`: after restart every run finishes with its
//! own response chain, a run killed before its first commit left nothing and starts afresh,
//! no step whose completion was committed runs again, side effects happen at least once,
//! and exactly once where the step is guarded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use thinpipe::fsm::{Engine, EngineConfig, EventKind, RunStatus};
use thinpipe_tests::{kill, killed, lines, wait_until};

const STEPS: [&str; 4] = ["record", "allocate", "record2", "finish"];

fn helper(state: &Path, runs: usize, generation: u32, fault: Option<&str>, delay_ms: u64) -> Command {
    helper_with(state, runs, generation, fault, delay_ms, false)
}

fn helper_with(
    state: &Path,
    runs: usize,
    generation: u32,
    fault: Option<&str>,
    delay_ms: u64,
    durable_start: bool,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fsm_helper"));
    if durable_start {
        cmd.arg("--durable-start");
    }
    cmd.arg("--state")
        .arg(state)
        .args(["--runs", &runs.to_string(), "--generation", &generation.to_string()])
        .args(["--step-delay-ms", &delay_ms.to_string()])
        .env_remove("THINPIPE_FAULT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(f) = fault {
        cmd.env("THINPIPE_FAULT", f);
    }
    cmd
}

/// Per run: the steps whose completion is committed in the run log.
fn committed_steps(state: &Path) -> BTreeMap<String, BTreeSet<String>> {
    history(state).into_iter().map(|(id, (done, _))| (id, done)).collect()
}

/// Per run: committed steps, and whether the history records a resume.
fn history(state: &Path) -> BTreeMap<String, (BTreeSet<String>, bool)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = EngineConfig { prune_interval: None, ..EngineConfig::default() };
        let engine = Engine::open(state.join("runs.redb"), config).await.expect("open run log after crash");
        let mut out = BTreeMap::new();
        for run in engine.list_runs(&Default::default()).unwrap() {
            let detail = engine.run_detail(&run.id).unwrap().unwrap();
            let done = detail
                .events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::StepCompleted { step, .. } => Some(step.clone()),
                    _ => None,
                })
                .collect();
            let resumed = detail.events.iter().any(|e| matches!(e.kind, EventKind::Resumed { .. }));
            out.insert(run.id, (done, resumed));
        }
        engine.shutdown().await;
        out
    })
}

struct Effect {
    generation: u32,
    run: String,
    step: String,
    detail: String,
}

fn effects(state: &Path) -> Vec<Effect> {
    lines(&state.join("effects.log"))
        .into_iter()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            Effect {
                generation: p.next().unwrap().parse().unwrap(),
                run: p.next().unwrap().into(),
                step: p.next().unwrap().into(),
                detail: p.next().unwrap_or_default().into(),
            }
        })
        .collect()
}

/// Restarts the helper without faults and checks every invariant.
fn restart_and_check(state: &Path, runs: usize, committed_before: &BTreeMap<String, BTreeSet<String>>) {
    restart_and_check_with(state, runs, committed_before, false)
}

fn restart_and_check_with(
    state: &Path,
    runs: usize,
    committed_before: &BTreeMap<String, BTreeSet<String>>,
    durable_start: bool,
) {
    let out = helper_with(state, runs, 2, None, 0, durable_start).output().unwrap();
    assert!(out.status.success(), "restart failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let results: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), runs);
    let effects = effects(state);
    let mut vols_seen = BTreeSet::new();

    for r in &results {
        let id = r["id"].as_str().unwrap();
        let i: usize = id.trim_start_matches("run-").parse().unwrap();
        let chain: Vec<String> =
            serde_json::from_value(r["completed"].clone()).unwrap_or_else(|_| panic!("{id} did not complete: {r}"));
        // Its own response chain, from its own initial response, nothing from other runs.
        let vol = chain
            .get(2)
            .and_then(|c| c.rsplit(':').next())
            .unwrap_or_else(|| panic!("{id}: no allocation in {chain:?}"))
            .to_owned();
        assert!(state.join("vols").join(&vol).exists(), "{id}: its volume {vol} exists");
        assert!(vols_seen.insert(vol.clone()), "{id}: volume {vol} is claimed by two runs");
        let expected = vec![
            format!("init:{id}"),
            format!("{id}:record"),
            format!("{id}:allocate:{vol}"),
            format!("{id}:record2:{i}"),
            format!("{id}:finish"),
        ];
        assert_eq!(chain, expected, "response chain of {id}");

        // No step with a committed completion ran again after the restart.
        let before = committed_before.get(id).cloned().unwrap_or_default();
        for e in effects.iter().filter(|e| e.run == id && e.generation == 2) {
            assert!(!before.contains(&e.step), "{id}: step {} was committed before the crash but ran again", e.step);
        }
        // Every unguarded step's side effect happened at least once. (The guarded one's
        // effect is its volume: exactly one per run, counted below.)
        for step in ["record", "record2", "finish"] {
            let n = effects.iter().filter(|e| e.run == id && e.step == step).count();
            assert!(n >= 1, "{id}: step {step} never ran");
        }
    }
    let vols: BTreeSet<String> =
        std::fs::read_dir(state.join("vols")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(vols, vols_seen, "exactly one volume per run, no orphans");
    let store = thinpipe::store::Store::open(state.join("host.db")).unwrap();
    assert_eq!(store.list_snapshots().unwrap().len(), runs, "one intent row per run");
    // Ids are reserved in batches and bound one per intent: every reserved id is bound once or
    // still reserved (none bound twice, none lost).
    let bound: BTreeSet<u64> = store.list_snapshots().unwrap().iter().map(|s| s.id).collect();
    let unbound: BTreeSet<u64> = store.unbound_snapshot_ids().unwrap().into_iter().collect();
    assert_eq!(bound.len(), runs, "one id per run");
    assert!(bound.is_disjoint(&unbound), "a bound id is not reserved too");
    let reserved = store.next_id("snap").unwrap() - 1;
    let all: Vec<u64> = bound.union(&unbound).copied().collect();
    assert_eq!(all, (1..=reserved).collect::<Vec<_>>(), "no id was allocated twice or lost");
    // The run log agrees: every run completed, and the interrupted ones record the resume.
    for (id, (done, resumed)) in history(state) {
        assert_eq!(done.len(), STEPS.len(), "{id}: {done:?}");
        let was_interrupted = committed_before.get(&id).is_some_and(|s| s.len() < STEPS.len());
        assert_eq!(resumed, was_interrupted, "{id}: the history shows a resume exactly when the run was interrupted");
    }
}

fn crash_at(fault: &str, runs: usize) -> (tempfile::TempDir, BTreeMap<String, BTreeSet<String>>) {
    crash_at_with(fault, runs, false)
}

fn crash_at_with(
    fault: &str,
    runs: usize,
    durable_start: bool,
) -> (tempfile::TempDir, BTreeMap<String, BTreeSet<String>>) {
    let dir = tempfile::tempdir().unwrap();
    let out = helper_with(dir.path(), runs, 1, Some(fault), 0, durable_start).output().unwrap();
    assert!(
        killed(&out.status),
        "fault {fault} did not kill the helper: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = committed_steps(dir.path());
    (dir, committed)
}

fn run_status(state: &Path, id: &str) -> Option<(RunStatus, u32)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = EngineConfig { prune_interval: None, ..EngineConfig::default() };
        let engine = Engine::open(state.join("runs.redb"), config).await.unwrap();
        let s = engine.run_detail(id).unwrap().map(|d| (d.summary.status, d.summary.step_index));
        engine.shutdown().await;
        s
    })
}

#[test]
fn killed_between_a_side_effect_and_its_commit() {
    let (dir, committed) = crash_at("fsm.before_commit@run-0/record2", 1);
    assert_eq!(run_status(dir.path(), "run-0"), Some((RunStatus::Active, 2)));
    assert_eq!(committed["run-0"], BTreeSet::from(["record".into(), "allocate".into()]));
    let first = effects(dir.path());
    assert!(first.iter().any(|e| e.step == "record2"), "the side effect happened before the kill");
    restart_and_check(dir.path(), 1, &committed);
    // record2 ran again (at least once); its earlier effect was not committed.
    let record2 = effects(dir.path()).into_iter().filter(|e| e.step == "record2").count();
    assert_eq!(record2, 2);
}

#[test]
fn killed_right_after_a_commit() {
    let (dir, committed) = crash_at("fsm.after_commit@run-0/allocate", 1);
    assert_eq!(run_status(dir.path(), "run-0"), Some((RunStatus::Active, 2)));
    restart_and_check(dir.path(), 1, &committed);
    let gen2: Vec<String> = effects(dir.path()).into_iter().filter(|e| e.generation == 2).map(|e| e.step).collect();
    assert_eq!(gen2, ["record2", "finish"], "only the steps after the committed one run again");
}

/// With the engine's durable-start option, the start is on disk before the first step.
#[test]
fn killed_before_the_first_step_keeps_the_initial_response() {
    let (dir, committed) = crash_at_with("fsm.before_step@run-0/record", 1, true);
    assert_eq!(run_status(dir.path(), "run-0"), Some((RunStatus::Active, 0)));
    assert!(effects(dir.path()).is_empty());
    restart_and_check_with(dir.path(), 1, &committed, true);
}

/// The default (guarantee 1): a run killed after its first step's side effect and before
/// that step's commit left nothing in the run log; started again, it runs the step again
/// (at least once) and completes with its own initial response.
#[test]
fn killed_before_the_first_commit_leaves_nothing_and_starts_again() {
    let (dir, committed) = crash_at("fsm.before_commit@run-0/record", 1);
    assert_eq!(run_status(dir.path(), "run-0"), None, "nothing of the run is on disk");
    assert_eq!(effects(dir.path()).len(), 1, "its first side effect happened");
    restart_and_check(dir.path(), 1, &committed);
    let record = effects(dir.path()).into_iter().filter(|e| e.step == "record").count();
    assert_eq!(record, 2, "the first step ran again");
}

#[test]
fn guarded_step_killed_between_its_intent_and_the_volume() {
    let (dir, committed) = crash_at("helper.after_intent@run-0", 1);
    assert_eq!(std::fs::read_dir(dir.path().join("vols")).unwrap().count(), 0, "killed before the volume");
    restart_and_check(dir.path(), 1, &committed);
    let allocs: Vec<String> =
        effects(dir.path()).into_iter().filter(|e| e.step == "allocate").map(|e| e.detail).collect();
    assert_eq!(allocs, ["vol-1"], "the resumed step reused the recorded id");
}

#[test]
fn guarded_step_killed_between_the_volume_and_its_commit() {
    let (dir, committed) = crash_at("fsm.before_commit@run-0/allocate", 1);
    assert_eq!(std::fs::read_dir(dir.path().join("vols")).unwrap().count(), 1);
    restart_and_check(dir.path(), 1, &committed);
}

#[test]
fn twenty_runs_in_flight_killed_at_a_random_instant() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u32 = match std::env::var("THINPIPE_SEED") {
        Ok(s) => s.parse().expect("THINPIPE_SEED is a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos(),
    };
    // Kill after between 10 and 59 effects (of 80): some runs done, many mid-way.
    let kill_after = 10 + (seed % 50) as usize;
    eprintln!("kill after {kill_after} effects (replay with THINPIPE_SEED={seed})");
    let mut child = helper(dir.path(), 20, 1, None, 20).spawn().unwrap();
    let log = dir.path().join("effects.log");
    wait_until("effects to pile up", Duration::from_secs(60), || lines(&log).len() >= kill_after);
    let status = kill(&mut child);
    assert!(killed(&status));
    let committed = committed_steps(dir.path());
    let in_flight = committed.values().filter(|s| s.len() < STEPS.len()).count();
    assert!(in_flight > 1, "the kill should catch several runs mid-way, caught {in_flight}");
    restart_and_check(dir.path(), 20, &committed);
}
