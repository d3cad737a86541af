//! What the guest programs share inside the guest: marker lines on the console, checks
//! that turn a panic or an error into a `fail` marker, the thin pool on vda (metadata) and
//! vdb (data), the worker's state on vdc, and a host on them (run log, database, dm-thin
//! backend, pipeline over the family files in the state directory).
//!
//! Markers: `THINPIPE-GUEST ok <check> (<ms> ms)`, `THINPIPE-GUEST fail <check>: <why>`,
//! `THINPIPE-GUEST bench <line>` and, last, `THINPIPE-GUEST done <phase>`.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use thinpipe::fsm::{Engine, EngineConfig, Outcome};
use thinpipe::image::{ApplyOptions, BlobCache, LocalDir};
use thinpipe::pipeline::{Pipeline, PipelineContext};
use thinpipe::store::Store;
use thinpipe::volume::DmThinBackend;
use thinpipe::volume::DmThinOptions;
use thinpipe::volume::dmthin::device::Pool;

pub const POOL: &str = "pool";
pub const STATE: &str = "/state";
/// On the state disk: seal markers must outlive a reboot, as on a real host.
pub const VOLUMES: &str = "/state/volumes";
pub const VOLUME_BYTES: u64 = 256 << 20;

pub fn marker(line: &str) {
    println!("THINPIPE-GUEST {line}");
}

/// Runs one check; a panic or an error is a `fail` marker, not the end of the phase.
pub fn check(name: &str, f: impl FnOnce() -> Result<(), String>) -> bool {
    let started = Instant::now();
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            marker(&format!("ok {name} ({} ms)", started.elapsed().as_millis()));
            true
        }
        Ok(Err(e)) => {
            marker(&format!("fail {name}: {e}"));
            false
        }
        Err(p) => {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            marker(&format!("fail {name}: panicked: {}", why.unwrap_or_default()));
            false
        }
    }
}

pub fn sys_dev(disk: &str) -> Result<thinpipe::volume::dmthin::device::Device, String> {
    let s = std::fs::read_to_string(format!("/sys/block/{disk}/dev")).map_err(|e| format!("/sys/block/{disk}: {e}"))?;
    s.trim().parse().map_err(|e| format!("{disk} dev {s:?}: {e:?}"))
}

pub fn sys_sectors(disk: &str) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/sys/block/{disk}/size")).map_err(|e| format!("{disk}: {e}"))?;
    s.trim().parse().map_err(|e| format!("{disk} size {s:?}: {e}"))
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {args:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

/// The pool on vda (metadata) and vdb (data); `fresh` zeroes the metadata first.
pub fn setup_pool(fresh: bool) -> Result<Pool, String> {
    if fresh {
        zero_metadata("vda")?;
    }
    Pool::create(POOL, sys_dev("vda")?, sys_dev("vdb")?, sys_sectors("vdb")?, 128, &[]).map_err(|e| e.to_string())
}

pub fn zero_metadata(disk: &str) -> Result<(), String> {
    use std::io::Write;
    let path = format!("/dev/{disk}");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| format!("{path}: {e}"))?;
    f.write_all(&[0u8; 4096]).and_then(|()| f.sync_all()).map_err(|e| format!("zeroing {path}: {e}"))
}

/// The worker's state disk (vdc) at /state; `fresh` makes its filesystem.
pub fn mount_state(fresh: bool) -> Result<(), String> {
    if fresh {
        sh("mkfs.ext4", &["-q", "-F", "/dev/vdc"])?;
    }
    std::fs::create_dir_all(STATE).map_err(|e| e.to_string())?;
    sh("mount", &["-t", "ext4", "/dev/vdc", STATE])
}

pub fn backend() -> Result<DmThinBackend, String> {
    DmThinBackend::open(DmThinOptions { pool: POOL.into(), root: VOLUMES.into(), volume_bytes: VOLUME_BYTES })
        .map_err(|e| e.to_string())
}

pub struct Host {
    pub engine: Engine,
    pub pipeline: Pipeline,
    pub store: Arc<Store>,
    pub backend: Arc<DmThinBackend>,
}

pub async fn host() -> Result<Host, String> {
    let state = Path::new(STATE);
    let engine = Engine::open(state.join("runs.redb"), EngineConfig { prune_interval: None, ..Default::default() })
        .await
        .map_err(|e| e.to_string())?;
    let store = Arc::new(Store::open(state.join("host.db")).map_err(|e| e.to_string())?);
    let backend = Arc::new(backend()?);
    let ctx = PipelineContext {
        store: store.clone(),
        backend: backend.clone(),
        cache: BlobCache::open(state.join("blobs")).map_err(|e| e.to_string())?,
        source: Arc::new(LocalDir::new(state.join("images"))),
        apply: ApplyOptions::default(),
        prepare: Default::default(),
        invocations: Default::default(),
        host_id: None,
        progress: Default::default(),
    };
    let pipeline = Pipeline::register(&engine, ctx).map_err(|e| e.to_string())?;
    Ok(Host { engine, pipeline, store, backend })
}

/// Prepares the source's current version of `family`.
pub async fn prepare(h: &Host, family: &str) -> Result<Outcome<thinpipe::pipeline::PrepareState>, String> {
    let manifest = h.pipeline.context().source.manifest(family).await.map_err(|e| e.to_string())?;
    h.pipeline.prepare(&manifest).await.map_err(|e| e.to_string())
}

/// The guest program's runtime; `None` (after a `fail runtime` marker) if it cannot start.
pub fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            marker(&format!("fail runtime: {e}"));
            None
        }
    }
}
