//! The host store under two real OS processes: leases exclude each other across 1,000
//! acquisitions each, and sequences hand every value out exactly once.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

fn store_helper(db: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_store_helper"));
    cmd.arg("--db").arg(db).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

#[test]
fn two_processes_contending_for_one_lease_never_both_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("host.db");
    thinpipe::store::Store::open(&db).unwrap(); // migrate once, before the race
    let marker = dir.path().join("inside");
    let children: Vec<_> = (0..2)
        .map(|_| {
            store_helper(&db)
                .args(["lease", "--key", "prepare/web", "--count", "1000", "--marker"])
                .arg(&marker)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut contended = 0u64;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("held=1000"), "{stdout}");
        contended += stdout.trim().rsplit("contended=").next().unwrap().parse::<u64>().unwrap();
    }
    eprintln!("lease refused {contended} times in all");
    let store = thinpipe::store::Store::open(&db).unwrap();
    assert!(store.lease("prepare/web").unwrap().is_none(), "both released at the end");
}

#[test]
fn concurrent_increments_from_two_processes_hand_out_every_value_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("host.db");
    thinpipe::store::Store::open(&db).unwrap();
    for ns in ["base", "snap"] {
        let children: Vec<_> =
            (0..2).map(|_| store_helper(&db).args(["seq", "--ns", ns, "--count", "500"]).spawn().unwrap()).collect();
        let mut all = Vec::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let values: Vec<u64> = String::from_utf8(out.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect();
            assert!(values.windows(2).all(|w| w[0] < w[1]), "{ns}: each process sees increasing values");
            all.extend(values);
        }
        let set: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(all.len(), 1000, "{ns}");
        assert_eq!(set, (1..=1000).collect(), "{ns}: every value from 1 exactly once");
    }
}
