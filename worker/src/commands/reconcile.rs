//! `worker reconcile [--fix]`: the backend's volumes against the host database's records
//! (`thinpipe::reconcile`), printed for people or as JSON.

use std::process::ExitCode;

use anyhow::Context;

use crate::config::Config;

/// Prints the report; exit 0 when nothing is left to fix.
pub fn run(config: &Config, fix: bool, json: bool) -> anyhow::Result<ExitCode> {
    let store = thinpipe::store::Store::open(config.host_db_path())?;
    let (backend, _) = crate::host::open_volumes(config, &store)?;
    let report = thinpipe::reconcile::reconcile(&store, backend.as_ref(), fix).with_context(|| {
        format!("reconciling the {} backend with {}", backend.name(), config.host_db_path().display())
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} backend: {} volumes", backend.name(), report.volumes);
        for o in &report.orphans {
            let fate = if report.deleted.contains(o) { "deleted" } else { "run `worker reconcile --fix` to delete" };
            println!("orphan  {o}  (no record claims it; {fate})");
        }
        for m in &report.missing {
            println!(
                "missing {m}  (a record claims it and it does not exist yet: a prepare or activation between its record and its volume, or one that failed there; it is made if that run goes on, and the claim ends with the invocation's release or the base's collection)"
            );
        }
        for c in &report.contradictions {
            if let Some(why) = report.left.iter().find(|l| l.starts_with(c.as_str())) {
                println!("state   {why}");
                continue;
            }
            let fate = if report.repaired.contains(c) { "repaired" } else { "run `worker reconcile --fix` to repair" };
            println!("state   {c}  ({fate})");
        }
        for u in &report.unexposed {
            if let Some(why) = report.left.iter().find(|l| l.starts_with(u.as_str())) {
                println!("mount   {why}");
                continue;
            }
            let fate = if report.reexposed.contains(u) {
                "exposed again"
            } else {
                "run `worker reconcile --fix`, or start the worker, to expose it again"
            };
            println!("mount   {u}  ({fate})");
        }
        for l in &report.leftovers {
            let fate = if report.leftovers_removed.contains(l) {
                "removed"
            } else if fix {
                "left: its activation may be making it"
            } else {
                "run `worker reconcile --fix` to remove"
            };
            println!("partial {l}  (a half-made volume; {fate})");
        }
        if report.orphans.is_empty()
            && report.missing.is_empty()
            && report.contradictions.is_empty()
            && report.leftovers.is_empty()
            && report.unexposed.is_empty()
        {
            println!("clean: every volume has its record and every record its volume");
        }
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
