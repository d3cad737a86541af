//! Runs inside the dm-thin QEMU guest (`thinpipe_guest`): the dm-thin backend's tests
//! against a real kernel's thin pool. Each check prints one marker line on the serial
//! console for the host-side test to parse (`thinpipe_guest::inside`).
//!
//! Disks: vda/vdb the pool's metadata and data, vdc the worker's state, vdd/vde a tiny
//! second pool that runs out of data space, vdf/vdg a small third pool that garbage
//! collection and the capacity watermarks keep from running out of data space, vdh an XFS
//! with project quotas for the overlay backend's per-snapshot size limits (a kernel with XFS
//! quota support, which the machines that run the tests may lack).
//!
//! Phases (one per boot; the disks persist between boots): `first` makes a fresh pool and
//! runs the backend checks and the pipeline; `crash` prepares a family with the
//! `dmthin.after_create_thin` fault point armed (the process dies there, then `/init` cuts
//! the power); `resume` finishes that run after the "power cut", checks that nothing leaked
//! or was allocated twice, plants an orphan for `reconcile`, and tears the pool down so
//! `thin_check` can read a clean metadata device. (The activate benchmark on dm-thin runs
//! in a guest of its own: `benches`' `dmthin-bench-guest`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinpipe::fsm::{Engine, EngineConfig, Outcome};
use thinpipe::image::{ApplyOptions, BlobCache, LocalDir, write_sample_family};
use thinpipe::pipeline::{Pipeline, PipelineContext};
use thinpipe::reconcile::reconcile;
use thinpipe::store::Store;
use thinpipe::volume::dmthin::device::{DmFailure, Pool};
use thinpipe::volume::dmthin::{SNAP_THIN_ID_BASE, thin_id};
use thinpipe::volume::{DmThinBackend, DmThinOptions, VolumeBackend, VolumeError, VolumeId, conformance};
use thinpipe_guest::inside::{
    Host, POOL, STATE, VOLUME_BYTES, VOLUMES, backend, check, host, marker, mount_state, prepare, setup_pool, sh,
    sys_dev, sys_sectors, zero_metadata,
};

/// A tiny pool (vdd: metadata, vde: 24 MiB of data, `error_if_no_space`) filled past its
/// data: the pool turns `out_of_data_space` and every failing call then fails as the host's
/// storage (the `host_storage` cause), with the pool's status in its message.
fn out_of_data_space() -> Result<(), String> {
    use std::io::Write;
    zero_metadata("vdd")?;
    let pool = Pool::create("tiny", sys_dev("vdd")?, sys_dev("vde")?, sys_sectors("vde")?, 128, &["error_if_no_space"])
        .map_err(|e| e.to_string())?;
    let b = DmThinBackend::open(DmThinOptions {
        pool: "tiny".into(),
        root: Path::new(STATE).join("tiny-volumes"),
        volume_bytes: 64 << 20,
    })
    .map_err(|e| e.to_string())?;
    b.create_base(1).map_err(|e| e.to_string())?;
    let root = b.reset_base(1).map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(root.join("fill")).map_err(|e| e.to_string())?;
    let chunk = vec![7u8; 1 << 20];
    let mut failed = None;
    for _ in 0..48 {
        if let Err(e) = f.write_all(&chunk) {
            failed = Some(e);
            break;
        }
    }
    let failed = failed.or_else(|| f.sync_all().err()).ok_or("48 MiB fitted in a 24 MiB pool")?;
    drop(f);
    let status = pool.status().map_err(|e| e.to_string())?;
    if !status.contains("out_of_data_space") {
        return Err(format!("after {failed}, the pool's status is {status:?}"));
    }
    let err = b.create_base(2).err().ok_or("a new base was made on a pool out of data space")?;
    let msg = err.to_string();
    if !matches!(err, VolumeError::HostStorage { .. }) || err.is_retryable() || !msg.contains("out_of_data_space") {
        return Err(format!("out of data space: expected the host's storage with the pool's status, got {err:?}"));
    }
    if thinpipe::pipeline::Cause::of_volume(&err) != Some(thinpipe::pipeline::Cause::HostStorage) {
        return Err(format!("a full pool must give the host_storage cause: {msg}"));
    }
    for vol in [VolumeId::Base(2), VolumeId::Base(1)] {
        b.delete(vol).map_err(|e| format!("cleaning up {vol}: {e}"))?;
    }
    drop(b);
    pool.remove().map_err(|e| e.to_string())
}

/// A small pool (vdf: metadata, vdg: 128 MiB of data, `error_if_no_space` so that running out
/// would fail writes instead of queueing them) driven through the lifecycle: a collected old
/// version gives its data blocks back to the pool; families activated (each snapshot
/// written to) up to the refusal limit are refused with "host full" while the pool is still
/// `rw`, never out of data space; releases and a collection pass bring admission back.
async fn small_pool_lifecycle() -> Result<(), String> {
    use thinpipe::lifecycle::{Lifecycle, Settings, Target, Want, Watermarks};
    let e = |e: &dyn std::fmt::Display| e.to_string();
    zero_metadata("vdf")?;
    let pool =
        Pool::create("small", sys_dev("vdf")?, sys_dev("vdg")?, sys_sectors("vdg")?, 128, &["error_if_no_space"])
            .map_err(|x| e(&x))?;
    let dir = Path::new(STATE).join("small");
    std::fs::create_dir_all(dir.join("images")).map_err(|x| e(&x))?;
    let backend = Arc::new(
        DmThinBackend::open(DmThinOptions { pool: "small".into(), root: dir.join("volumes"), volume_bytes: 32 << 20 })
            .map_err(|x| e(&x))?,
    );
    let engine = Engine::open(dir.join("runs.redb"), EngineConfig { prune_interval: None, ..Default::default() })
        .await
        .map_err(|x| e(&x))?;
    let ctx = PipelineContext {
        store: Arc::new(Store::open(dir.join("host.db")).map_err(|x| e(&x))?),
        backend: backend.clone(),
        cache: BlobCache::open(dir.join("blobs")).map_err(|x| e(&x))?,
        source: Arc::new(LocalDir::new(dir.join("images"))),
        apply: ApplyOptions::default(),
        prepare: Default::default(),
        invocations: Default::default(),
        host_id: None,
        progress: Default::default(),
    };
    let pipeline = Pipeline::register(&engine, ctx).map_err(|x| e(&x))?;
    let watermarks =
        Watermarks { high_percent: 50.0, low_percent: 35.0, refuse_percent: 70.0, refuse_metadata_percent: 90.0 };
    let lifecycle = Lifecycle::new(pipeline.clone(), Settings { watermarks, ..Settings::default() });
    let status_ok = || -> Result<(), String> {
        let status = pool.status().map_err(|x| e(&x))?;
        if status.split_whitespace().nth(4) == Some("rw") { Ok(()) } else { Err(format!("pool status {status:?}")) }
    };
    // A family version: one layer of `mib` MiB of random bytes (a new layer file each call).
    let mut layer_no = 0;
    let mut publish = |family: &str, mib: usize| -> Result<(), String> {
        layer_no += 1;
        let mut content = vec![0u8; mib << 20];
        rand::fill(&mut content[..]);
        let fam = dir.join("images/images").join(family);
        std::fs::create_dir_all(&fam).map_err(|x| e(&x))?;
        std::fs::write(fam.join(format!("{layer_no:04}.tar")), thinpipe_tests::tar_of_file("data.bin", &content))
            .map_err(|x| e(&x))
    };
    // Prepares the source's current version and makes it current, as the job executor does.
    let prepare = |family: String| {
        let (lifecycle, pipeline) = (&lifecycle, &pipeline);
        async move {
            let version = lifecycle.resolve(&family, &Want::Latest).await.map_err(|x| e(&x))?;
            let base = match version.target {
                Target::Sealed(row) => row,
                Target::Prepare(manifest) => match pipeline.prepare(&manifest).await.map_err(|x| e(&x))? {
                    Outcome::Completed(w) => {
                        let id = w.base_vol_id.ok_or("no base")?;
                        pipeline.context().store.base(id).map_err(|x| e(&x))?.ok_or("no base row")?
                    }
                    Outcome::Failed(f) => return Err(format!("prepare {family}: {f}")),
                },
            };
            lifecycle.make_current(&base, true).await.map_err(|x| e(&x))?;
            Ok::<_, String>(base.id)
        }
    };

    // An old version, collected: its blocks go back to the pool.
    publish("g", 12)?;
    prepare("g".into()).await?;
    publish("g", 1)?;
    prepare("g".into()).await?;
    let before = lifecycle.measure().await.map_err(|x| e(&x))?;
    let report = lifecycle.collect(false).await.map_err(|x| e(&x))?;
    if report.deleted.len() != 1 {
        return Err(format!("the old version was not collected: {report:?}"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = lifecycle.measure().await.map_err(|x| e(&x))?;
        if now.used_bytes + (10 << 20) <= before.used_bytes {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the pool's data blocks did not come back: {before:?} then {now:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Families activated (and written to) until admission refuses: never out of data space.
    let mut refused = None;
    let mut live = Vec::new();
    for i in 0..20 {
        if let Err(full) = lifecycle.admit().await {
            refused = Some(full);
            break;
        }
        let family = format!("f{i}");
        publish(&family, 8)?;
        let base = prepare(family.clone()).await?;
        let inv = format!("small-{i}");
        let path = match pipeline.activate(&family, &inv, base, None).await.map_err(|x| e(&x))? {
            Outcome::Completed(w) => PathBuf::from(w.path.ok_or("no path")?),
            Outcome::Failed(f) => return Err(format!("activation {inv}: {f}")),
        };
        let mut junk = vec![0u8; 4 << 20];
        rand::fill(&mut junk[..]);
        std::fs::write(path.join("written"), &junk).map_err(|x| e(&x))?;
        sh("sync", &[])?;
        status_ok()?;
        live.push((family, inv));
    }
    let refused = refused.ok_or("twenty families fitted in a 128 MiB pool")?;
    if !refused.starts_with("host full: pool data") {
        return Err(format!("refused with {refused:?}"));
    }
    status_ok()?;
    // Releases, then a pass: unused families are evicted and admission comes back.
    for (family, inv) in &live {
        pipeline.release(family, inv).await.map_err(|x| e(&x))?;
    }
    lifecycle.collect(false).await.map_err(|x| e(&x))?;
    lifecycle.admit().await.map_err(|why| format!("still refused after releases: {why}"))?;
    status_ok()?;
    engine.shutdown().await;
    for vol in backend.list().map_err(|x| e(&x))? {
        backend.delete(vol).map_err(|x| format!("cleaning up {vol}: {x}"))?;
    }
    drop(backend);
    drop(lifecycle);
    drop(pipeline);
    pool.remove().map_err(|x| e(&x))
}

fn errno_of(r: Result<Option<String>, DmFailure>) -> Option<i32> {
    r.err().and_then(|e| e.errno)
}

fn expect_errno(what: &str, got: Option<i32>, want: i32) -> Result<(), String> {
    if got == Some(want) {
        Ok(())
    } else {
        Err(format!("{what}: expected errno {want} ({}), got {got:?}", std::io::Error::from_raw_os_error(want)))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Base, a tree, seal, 50 snapshots, copy-on-write, release.
fn fifty_snapshots(b: &DmThinBackend) -> Result<(), String> {
    let e = |e: thinpipe::volume::VolumeError| e.to_string();
    b.create_base(10).map_err(e)?;
    let root = b.reset_base(10).map_err(e)?;
    std::fs::create_dir_all(root.join("etc/app")).map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/app/config"), "base\n").map_err(|e| e.to_string())?;
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(root.join("blob"), &big).map_err(|e| e.to_string())?;
    b.seal_base(10).map_err(e)?;
    let snaps: Vec<u64> = (101..151).collect();
    let mut paths = Vec::new();
    for &s in &snaps {
        b.snapshot(10, s).map_err(e)?;
        paths.push(b.expose(s).map_err(e)?);
    }
    std::fs::write(paths[0].join("etc/app/config"), "changed in snap-101\n").map_err(|e| e.to_string())?;
    std::fs::write(paths[0].join("blob"), b"overwritten").map_err(|e| e.to_string())?;
    for p in &paths[1..] {
        if read(&p.join("etc/app/config"))? != "base\n" {
            return Err(format!("{}: a write to snap-101 showed through", p.display()));
        }
    }
    if std::fs::read(paths[49].join("blob")).map_err(|e| e.to_string())? != big {
        return Err("snap-150's blob changed".into());
    }
    // Exposed means mounted: a snapshot unmounted by hand (as by a reboot) is not, until
    // it is exposed again, with its writes.
    let exposed = |s: u64| b.is_exposed(s).map_err(e);
    if !exposed(101)? {
        return Err("snap-101 is mounted but not reported exposed".into());
    }
    sh("umount", &[&paths[0].to_string_lossy()])?;
    if exposed(101)? {
        return Err("snap-101 was unmounted but is reported exposed".into());
    }
    if b.expose(101).map_err(e)? != paths[0] || !exposed(101)? {
        return Err("snap-101 was not exposed again at its path".into());
    }
    if read(&paths[0].join("etc/app/config"))? != "changed in snap-101\n" {
        return Err("snap-101 lost its write across the unmount".into());
    }
    // The base itself, seen through a snapshot taken after the write.
    b.snapshot(10, 151).map_err(e)?;
    if exposed(151)? {
        return Err("snap-151 is reported exposed before it was".into());
    }
    let after = b.expose(151).map_err(e)?;
    if read(&after.join("etc/app/config"))? != "base\n" {
        return Err("the base changed after a write to a snapshot".into());
    }
    if read(&paths[0].join("etc/app/config"))? != "changed in snap-101\n" {
        return Err("snap-101 lost its own write".into());
    }
    for s in snaps.iter().copied().chain([151]) {
        b.delete(VolumeId::Snap(s)).map_err(e)?;
    }
    let left = b.list().map_err(e)?;
    if left != [VolumeId::Base(10)] {
        return Err(format!("after release the pool holds {left:?}"));
    }
    b.delete(VolumeId::Base(10)).map_err(e)?;
    Ok(())
}

/// Every error case, with the kernel's errno and the backend's classification.
fn error_cases(b: &DmThinBackend) -> Result<(), String> {
    let pool = b.pool();
    let base = thin_id(VolumeId::Base(20)).map_err(|e| e.to_string())?;
    b.create_base(20).map_err(|e| e.to_string())?;
    expect_errno("create_thin of an id in use", errno_of(pool.message(&format!("create_thin {base}"))), libc::EEXIST)?;
    b.create_base(20).map_err(|e| format!("create_base again (EEXIST, verified, a re-run): {e}"))?;
    expect_errno(
        "create_snap from a missing origin",
        errno_of(pool.message(&format!("create_snap {} 4242", SNAP_THIN_ID_BASE + 900))),
        libc::ENODATA,
    )?;
    expect_errno("delete of a missing id", errno_of(pool.message("delete 4243")), libc::ENODATA)?;
    b.delete(VolumeId::Snap(4243)).map_err(|e| format!("backend delete of a missing volume: {e}"))?;
    // Base 20 is mounted (active): the kernel refuses to delete it.
    expect_errno("delete of an active device", errno_of(pool.message(&format!("delete {base}"))), libc::EBUSY)?;
    expect_errno("create_thin with an id >= 2^24", errno_of(pool.message("create_thin 16777216")), libc::EINVAL)?;
    expect_errno("an unknown message", errno_of(pool.message("frobnicate 1")), libc::EINVAL)?;

    // A sealed base whose thin device is gone: the snapshot aborts with ENODATA and the status.
    b.seal_base(20).map_err(|e| e.to_string())?;
    pool.message(&format!("delete {base}")).map_err(|e| e.to_string())?;
    let err = b.snapshot(20, 300).err().ok_or("a snapshot of a deleted origin succeeded")?;
    let msg = err.to_string();
    if err.is_retryable() || !msg.contains("No data available") || !msg.contains("status:") {
        return Err(format!("missing origin: expected an abort naming ENODATA and the pool status, got {msg}"));
    }
    b.delete(VolumeId::Base(20)).map_err(|e| e.to_string())?;

    // One thin id, one name: the uuid derived from the thin id is refused under a second name.
    b.create_base(21).map_err(|e| e.to_string())?;
    b.seal_base(21).map_err(|e| e.to_string())?;
    b.snapshot(21, 301).map_err(|e| e.to_string())?;
    b.expose(301).map_err(|e| e.to_string())?;
    let snap_tid = thin_id(VolumeId::Snap(301)).map_err(|e| e.to_string())?;
    let dev = pool.device();
    let uuid = format!("THINPIPE-{}-{}-{snap_tid}", dev.major, dev.minor);
    let second = pool.activate("second-name", &uuid, snap_tid, VOLUME_BYTES / 512);
    if second.is_ok() {
        return Err("one thin id was activated under a second name".into());
    }
    // A device made by someone else for one of our ids is reported.
    pool.activate("intruder", "SOMEONE-ELSE", snap_tid, VOLUME_BYTES / 512).map_err(|e| e.to_string())?;
    let foreign = b.foreign_activations().map_err(|e| e.to_string())?;
    pool.deactivate("intruder").map_err(|e| e.to_string())?;
    if foreign != [("intruder".to_owned(), snap_tid)] {
        return Err(format!("foreign activations: {foreign:?}"));
    }
    b.delete(VolumeId::Snap(301)).map_err(|e| e.to_string())?;
    b.delete(VolumeId::Base(21)).map_err(|e| e.to_string())?;

    // A read-only pool: creating aborts, and the message says the pool is ro.
    pool.set_read_only(true).map_err(|e| e.to_string())?;
    let ro = b.create_base(22);
    pool.set_read_only(false).map_err(|e| e.to_string())?;
    let err = ro.err().ok_or("create_base on a read-only pool succeeded")?;
    if err.is_retryable() || !err.to_string().contains(" ro ") {
        return Err(format!("read-only pool: expected an abort with the pool's ro status, got {err}"));
    }
    // The id ranges: exhausted is a clear abort.
    let err = b.create_base(SNAP_THIN_ID_BASE).err().ok_or("a base id past its range was accepted")?;
    if err.is_retryable() || !err.to_string().contains("exhausted") {
        return Err(format!("range exhausted: {err}"));
    }
    let left = b.list().map_err(|e| e.to_string())?;
    if !left.is_empty() {
        return Err(format!("error cases left volumes behind: {left:?}"));
    }
    Ok(())
}

async fn pipeline_runs(h: &Host) -> Result<(), String> {
    write_sample_family(&Path::new(STATE).join("images"), "web").map_err(|e| e.to_string())?;
    let base = match prepare(h, "web").await? {
        Outcome::Completed(w) => w.base_vol_id.ok_or("no base")?,
        Outcome::Failed(f) => return Err(format!("prepare failed: {f}")),
    };
    let mut paths = Vec::new();
    for i in 0..60 {
        match h.pipeline.activate("web", &format!("inv-{i}"), base, None).await.map_err(|e| e.to_string())? {
            Outcome::Completed(w) => paths.push(PathBuf::from(w.path.ok_or("no path")?)),
            Outcome::Failed(f) => return Err(format!("activation {i} failed: {f}")),
        }
    }
    if read(&paths[7].join("bin/hello"))? != "#!/bin/sh\necho hello from thinpipe\n" {
        return Err("an activated snapshot does not hold the image".into());
    }
    for i in 0..30 {
        if let Outcome::Failed(f) =
            h.pipeline.release("web", &format!("inv-{i}")).await.map_err(|e| e.to_string())?.outcome
        {
            return Err(format!("release {i} failed: {f}"));
        }
    }
    let report = reconcile(&h.store, h.backend.as_ref(), false).map_err(|e| e.to_string())?;
    if !report.orphans.is_empty() || !report.missing.is_empty() || report.volumes != 31 {
        return Err(format!("after the pipeline: {report:?}"));
    }
    Ok(())
}

async fn resume_after_power_cut(h: &Host) -> Result<(), String> {
    let report = h.engine.resume_all().await.map_err(|e| e.to_string())?;
    if !report.resumed.iter().any(|r| r.starts_with("prepare-api@")) {
        return Err(format!("prepare-api was not resumed: {report:?}"));
    }
    // Join the resumed run with the version it recorded (the source files written just
    // before the power cut may not have survived it; the run's input did).
    let run = report.resumed.iter().find(|r| r.starts_with("prepare-api@")).ok_or("no prepare-api run")?;
    let detail = h.engine.run_detail(run).map_err(|e| e.to_string())?.ok_or("the resumed run is gone")?;
    let input: thinpipe::pipeline::PrepareInput = serde_json::from_value(detail.input).map_err(|e| e.to_string())?;
    let manifest = input.manifest.ok_or("the resumed run recorded no manifest")?;
    let base = match h.pipeline.prepare(&manifest).await.map_err(|e| e.to_string())? {
        Outcome::Completed(w) => w.base_vol_id.ok_or("no base")?,
        Outcome::Failed(f) => return Err(format!("the resumed prepare failed: {f}")),
    };
    // web took base 1 on the first boot; api's intent (base 2) survived the power cut.
    if base != 2 {
        let bases = h.store.list_bases().map_err(|e| e.to_string())?;
        return Err(format!(
            "api's base is {base}, expected 2 (the id recorded before the crash); resumed {:?}; bases {bases:?}",
            report.resumed
        ));
    }
    let next = h.store.next_id("base").map_err(|e| e.to_string())?;
    if next != 3 {
        return Err(format!("the base sequence is at {next}: an id was allocated twice"));
    }
    if !h.backend.is_sealed(base).map_err(|e| e.to_string())? {
        return Err("api's base is not sealed".into());
    }
    let report = reconcile(&h.store, h.backend.as_ref(), false).map_err(|e| e.to_string())?;
    if !report.orphans.is_empty() || !report.missing.is_empty() {
        return Err(format!("after the resume: {report:?}"));
    }
    Ok(())
}

fn reconcile_finds_a_planted_orphan(h: &Host) -> Result<(), String> {
    let planted = thin_id(VolumeId::Snap(5000)).map_err(|e| e.to_string())?;
    h.backend.pool().message(&format!("create_thin {planted}")).map_err(|e| e.to_string())?;
    let found = reconcile(&h.store, h.backend.as_ref(), false).map_err(|e| e.to_string())?;
    if found.orphans != ["snap-5000"] || !found.deleted.is_empty() {
        return Err(format!("reconcile: {found:?}"));
    }
    let fixed = reconcile(&h.store, h.backend.as_ref(), true).map_err(|e| e.to_string())?;
    if fixed.deleted != ["snap-5000"] {
        return Err(format!("reconcile --fix: {fixed:?}"));
    }
    let after = reconcile(&h.store, h.backend.as_ref(), false).map_err(|e| e.to_string())?;
    if !after.orphans.is_empty() {
        return Err(format!("after --fix: {after:?}"));
    }
    Ok(())
}

/// Unmounts and deactivates every thin device, then removes the pool: the metadata device
/// is then clean for `thin_check`.
fn teardown(b: DmThinBackend) -> Result<(), String> {
    for vol in b.list().map_err(|e| e.to_string())? {
        let name = b.device_name(vol);
        let mp = match vol {
            VolumeId::Base(_) => Path::new(VOLUMES).join("bases").join(vol.to_string()),
            VolumeId::Snap(_) => Path::new(VOLUMES).join("snaps").join(vol.to_string()),
        };
        if b.pool().active(&name).map_err(|e| e.to_string())?.is_some() {
            // Not every volume is mounted; a failed umount of an unmounted one is fine.
            if let Err(e) = sh("umount", &[&mp.to_string_lossy()]) {
                eprintln!("{e}");
            }
            b.pool().deactivate(&name).map_err(|e| e.to_string())?;
        }
    }
    let pool = Pool::open(POOL).map_err(|e| e.to_string())?;
    drop(b);
    pool.remove().map_err(|e| e.to_string())?;
    sh("umount", &[STATE])
}

/// The overlay backend's size limits on a fresh XFS on vdh, mounted with `prjquota`.
fn overlay_size_limits() -> Result<(), String> {
    const XFS: &str = "/xfs";
    sh("mkfs.xfs", &["-q", "-f", "/dev/vdh"])?;
    std::fs::create_dir_all(XFS).map_err(|e| format!("{XFS}: {e}"))?;
    sh("mount", &["-t", "xfs", "-o", "prjquota", "/dev/vdh", XFS])?;
    let suite = std::panic::catch_unwind(|| conformance::overlay_size_limits(&Path::new(XFS).join("vols")));
    if let Err(p) = suite {
        let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        // What it left mounted stays: the guest powers off next.
        return Err(format!("the overlay size-limit suite failed: {}", why.unwrap_or_default()));
    }
    sh("umount", &[XFS])
}

fn main() {
    let phase = std::env::args().nth(1).unwrap_or_default();
    let Some(rt) = thinpipe_guest::inside::runtime() else { return };
    let fresh = phase == "first";
    if !check("pool", || setup_pool(fresh).map(drop)) || !check("state disk", || mount_state(fresh)) {
        marker(&format!("done {phase}"));
        return;
    }
    match phase.as_str() {
        "first" => {
            let Ok(b) = backend() else {
                marker("fail backend: cannot open");
                return;
            };
            check("conformance", || {
                conformance::run(&b);
                Ok(())
            });
            check("fifty snapshots, copy-on-write, mounted again after an unmount, release", || fifty_snapshots(&b));
            check("error cases by errno", || error_cases(&b));
            check("a pool out of data space aborts with its status", out_of_data_space);
            drop(b);
            check("pipeline: prepare, 60 activations, 30 releases, reconcile", || {
                rt.block_on(async {
                    let h = host().await?;
                    let r = pipeline_runs(&h).await;
                    h.engine.shutdown().await;
                    r
                })
            });
            check("a small pool: garbage collection gives blocks back, admission refuses before it fills", || {
                rt.block_on(small_pool_lifecycle())
            });
            check("overlay on XFS with project quotas: each snapshot's size limit is enforced", overlay_size_limits);
            // Volumes stay mounted, as on a host that powers off; /init syncs first.
        }
        "crash" => {
            // THINPIPE_FAULT=dmthin.after_create_thin kills this process inside create_base.
            check("prepare until the fault point", || {
                rt.block_on(async {
                    write_sample_family(&Path::new(STATE).join("images"), "api").map_err(|e| e.to_string())?;
                    // The source is on the disk before the cut, as a published family is long
                    // before a host prepares it: the cut takes only what the worker did. (A
                    // streamed prepare reads the source again when it resumes.)
                    // SAFETY: sync has no preconditions.
                    unsafe { libc::sync() };
                    let h = host().await?;
                    let outcome = prepare(&h, "api").await;
                    Err(format!("the fault point did not fire: {outcome:?}"))
                })
            });
        }
        "resume" => {
            check("resume after a power cut: no orphan, no duplicate id", || {
                rt.block_on(async {
                    let h = host().await?;
                    let r = resume_after_power_cut(&h).await;
                    let r = r.and_then(|()| reconcile_finds_a_planted_orphan(&h));
                    h.engine.shutdown().await;
                    r
                })
            });
            match backend() {
                Ok(b) => {
                    check("teardown", || teardown(b));
                }
                Err(e) => marker(&format!("fail teardown: {e}")),
            }
        }
        other => marker(&format!("fail phase: unknown phase {other:?}")),
    }
    marker(&format!("done {phase}"));
}
