//! `prepare` version 2 against a source that counts, cuts and corrupts what it serves (a
//! real `LocalDir` underneath): one pass, resumes without fetching a byte twice, nothing
//! unverified sealed, version 1's runs finished after an upgrade.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use crate::fsm::{Engine, EngineConfig, EventKind, Outcome};
use crate::image::{
    ApplyOptions, BlobCache, BlobSource, BlobStream, Digest, ImageError, LayerDesc, LocalDir, Manifest,
};
use crate::pipeline::{Pipeline, PipelineContext, PrepareSettings, PrepareState};
use crate::store::Store;
use crate::volume::DirBackend;

/// What the source does to one blob's first `n` opens.
#[derive(Clone, Copy, Debug)]
enum Trouble {
    /// The connection drops after this many bytes.
    CutAfter(u64),
    /// One byte (at this offset) is flipped.
    FlipAt(u64),
    /// The open waits until the gate opens.
    Held,
}

#[derive(Default)]
struct Served {
    /// (blob, offset) of every open, in order.
    opens: Vec<(Digest, u64)>,
    trouble: HashMap<Digest, (Trouble, u32)>,
}

/// A `LocalDir` that records what it serves and misbehaves as told.
struct Troubled {
    inner: LocalDir,
    served: Mutex<Served>,
    bytes: Arc<AtomicU64>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Troubled {
    fn new(root: &Path) -> Arc<Self> {
        Arc::new(Self {
            inner: LocalDir::new(root),
            served: Mutex::default(),
            bytes: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        })
    }
    /// The next `times` opens of `digest` get `trouble`.
    fn trouble(&self, digest: &Digest, trouble: Trouble, times: u32) {
        self.served.lock().unwrap().trouble.insert(digest.clone(), (trouble, times));
    }
    fn opens(&self) -> Vec<(Digest, u64)> {
        self.served.lock().unwrap().opens.clone()
    }
}

#[async_trait::async_trait]
impl BlobSource for Troubled {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn manifest(&self, family: &str) -> Result<Manifest, ImageError> {
        self.inner.manifest(family).await
    }
    async fn open_blob(&self, layer: &LayerDesc, offset: u64) -> Result<BlobStream, ImageError> {
        let trouble = {
            let mut served = self.served.lock().unwrap();
            served.opens.push((layer.digest.clone(), offset));
            match served.trouble.get_mut(&layer.digest) {
                Some((t, n)) if *n > 0 => {
                    *n -= 1;
                    Some(*t)
                }
                _ => None,
            }
        };
        if let Some(Trouble::Held) = trouble {
            let _permit =
                self.gate.acquire().await.map_err(|e| ImageError::io("gate", "gate", std::io::Error::other(e)))?;
        }
        let inner = self.inner.open_blob(layer, offset).await?;
        Ok(Box::pin(Counted { inner, at: offset, trouble, bytes: self.bytes.clone() }))
    }
}

struct Counted {
    inner: BlobStream,
    at: u64,
    trouble: Option<Trouble>,
    bytes: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if let Some(Trouble::CutAfter(n)) = self.trouble
            && self.at >= n
        {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        // Never past a cut: the bytes before it are what the client got.
        let limit = match this.trouble {
            Some(Trouble::CutAfter(n)) => (n - this.at) as usize,
            _ => usize::MAX,
        };
        let mut sub = buf.take(limit);
        let polled = this.inner.as_mut().poll_read(cx, &mut sub);
        let n = sub.filled().len();
        // SAFETY: `sub` wrote (initialised) `n` bytes into `buf`'s unfilled part.
        unsafe { buf.assume_init(before + n) };
        buf.advance(n);
        if let Some(Trouble::FlipAt(at)) = this.trouble
            && (this.at..this.at + n as u64).contains(&at)
        {
            let i = before + (at - this.at) as usize;
            buf.filled_mut()[i] ^= 0xff;
        }
        this.at += n as u64;
        this.bytes.fetch_add(n as u64, Ordering::SeqCst);
        polled
    }
}

struct Env {
    dir: tempfile::TempDir,
    engine: Engine,
    pipeline: Pipeline,
    source: Arc<Troubled>,
}

/// The pipeline's context on `dir`, reading through a fresh [`Troubled`] source.
fn context(dir: &Path, settings: PrepareSettings) -> (PipelineContext, Arc<Troubled>) {
    let source = Troubled::new(&images(dir));
    let ctx = PipelineContext {
        store: Arc::new(Store::open(dir.join("host.db")).unwrap()),
        backend: Arc::new(DirBackend::open(dir.join("volumes")).unwrap()),
        cache: BlobCache::open(dir.join("blobs")).unwrap(),
        source: source.clone(),
        apply: ApplyOptions::default(),
        prepare: settings,
        invocations: Default::default(),
        host_id: None,
        progress: Default::default(),
    };
    (ctx, source)
}

async fn open_engine(dir: &Path) -> Engine {
    Engine::open(dir.join("runs.redb"), EngineConfig { prune_interval: None, ..Default::default() }).await.unwrap()
}

fn images(dir: &Path) -> PathBuf {
    dir.join("images-src")
}

async fn env_at(dir: tempfile::TempDir, settings: PrepareSettings) -> Env {
    let engine = open_engine(dir.path()).await;
    let (ctx, source) = context(dir.path(), settings);
    let pipeline = Pipeline::register(&engine, ctx).unwrap();
    Env { dir, engine, pipeline, source }
}

/// A family `big` of two uncompressed layers, each holding one file of `len` bytes that no
/// two chunks repeat.
fn write_big_family(dir: &Path, len: usize) -> Vec<Vec<u8>> {
    let family = images(dir).join("images/big");
    std::fs::create_dir_all(&family).unwrap();
    let mut contents = Vec::new();
    for (i, name) in ["one", "two"].iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| ((j * 31 + i * 7) % 251) as u8).collect();
        std::fs::write(family.join(format!("000{i}-{name}.tar")), one_file_tar(&format!("data/{name}"), &data))
            .unwrap();
        contents.push(data);
    }
    contents
}

fn one_file_tar(path: &str, data: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, path, data).unwrap();
    tar.into_inner().unwrap()
}

fn completed(outcome: Outcome<PrepareState>, what: &str) -> PrepareState {
    match outcome {
        Outcome::Completed(w) => w,
        Outcome::Failed(f) => panic!("{what}: {f:?}"),
    }
}

async fn prepare(p: &Pipeline, family: &str) -> Outcome<PrepareState> {
    let manifest = p.context().source.manifest(family).await.unwrap();
    p.prepare(&manifest).await.unwrap()
}

fn base_root(env: &Env, base: u64) -> PathBuf {
    env.dir.path().join(format!("volumes/bases/base-{base}"))
}

/// Until the background naming of the cache copies is done (or the deadline).
async fn wait_cached(cache: &BlobCache, digests: &[Digest]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !digests.iter().all(|d| cache.contains(d)) {
        assert!(tokio::time::Instant::now() < deadline, "the verified blobs were never named in the cache");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_cut_mid_stream_is_picked_up_where_it_stopped_and_no_byte_is_fetched_twice() {
    let dir = tempfile::tempdir().unwrap();
    let contents = write_big_family(dir.path(), 3 << 20);
    let env = env_at(dir, PrepareSettings::default()).await;
    let manifest = env.source.manifest("big").await.unwrap();
    let (one, two) = (&manifest.layers[0], &manifest.layers[1]);
    env.source.trouble(&two.digest, Trouble::CutAfter(1 << 20), 1);

    let w = completed(prepare(&env.pipeline, "big").await, "the cut is picked up");
    let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
    assert_eq!(env.source.bytes.load(Ordering::SeqCst), total, "no byte fetched twice: {:?}", env.source.opens());
    assert_eq!(w.downloaded_bytes, total);
    // Picked up inside the attempt: what was applied stays applied.
    let run = crate::job::prepare_run_id("big", manifest.digest.as_str());
    let events = env.engine.run_detail(&run).unwrap().unwrap().events;
    assert!(!events.iter().any(|e| matches!(e.kind, EventKind::AttemptFailed { .. })), "{events:?}");
    let opens = env.source.opens();
    assert!(opens.contains(&(two.digest.clone(), 1 << 20)), "the cut layer resumed at the cut: {opens:?}");
    assert_eq!(opens.iter().filter(|(d, at)| *d == one.digest && *at == 0).count(), 1, "{opens:?}");
    let base = w.base_vol_id.unwrap();
    assert!(env.pipeline.context().backend.is_sealed(base).unwrap());
    let root = base_root(&env, base);
    assert_eq!(std::fs::read(root.join("data/one")).unwrap(), contents[0]);
    assert_eq!(std::fs::read(root.join("data/two")).unwrap(), contents[1]);
    wait_cached(&env.pipeline.context().cache, &[one.digest.clone(), two.digest.clone()]).await;
    assert!(env.pipeline.context().cache.partials().unwrap().is_empty(), "no partial left");
    env.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_is_fetched_again_and_a_source_that_stays_wrong_seals_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_big_family(dir.path(), 600 << 10);
    let env = env_at(dir, PrepareSettings::default()).await;
    let manifest = env.source.manifest("big").await.unwrap();
    let two = &manifest.layers[1];

    // Torn once: the next attempt fetches it again and the version is sealed.
    env.source.trouble(&two.digest, Trouble::FlipAt(1000), 1);
    let w = completed(prepare(&env.pipeline, "big").await, "one bad transfer is retried");
    assert!(env.pipeline.context().backend.is_sealed(w.base_vol_id.unwrap()).unwrap());

    // Wrong every time: the run fails after its attempts, naming them, and nothing is sealed.
    let dir = tempfile::tempdir().unwrap();
    write_big_family(dir.path(), 600 << 10);
    let env = env_at(dir, PrepareSettings::default()).await;
    env.source.trouble(&two.digest, Trouble::FlipAt(1000), u32::MAX);
    let Outcome::Failed(f) = prepare(&env.pipeline, "big").await else { panic!("a corrupt source fails") };
    assert_eq!((f.step.as_str(), f.code.as_deref()), ("stream_into_base", Some("bad_source")), "{f:?}");
    assert!(f.error.contains(two.digest.as_str()) && f.error.contains("fetched 3 times"), "{}", f.error);
    let bases = env.pipeline.context().store.list_bases().unwrap();
    assert!(bases.iter().all(|b| !env.pipeline.context().backend.is_sealed(b.id).unwrap()), "{bases:?}");
    assert!(!env.pipeline.context().cache.contains(&two.digest), "a blob that did not match is never cached");
    env.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_before_unpack_writes_nothing_into_the_base_until_every_blob_matched() {
    for verify_before_unpack in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_big_family(dir.path(), 600 << 10);
        let settings = PrepareSettings { verify_before_unpack, ..PrepareSettings::default() };
        let env = env_at(dir, settings).await;
        let manifest = env.source.manifest("big").await.unwrap();
        // The second layer never matches: streamed, the first is in the unsealed base by
        // then; verified first, nothing is.
        env.source.trouble(&manifest.layers[1].digest, Trouble::FlipAt(10), u32::MAX);
        let Outcome::Failed(_) = prepare(&env.pipeline, "big").await else { panic!("a corrupt source fails") };
        let bases = env.pipeline.context().store.list_bases().unwrap();
        let [row] = bases.as_slice() else { panic!("{bases:?}") };
        let applied = base_root(&env, row.id).join("data/one").exists();
        assert_eq!(applied, !verify_before_unpack, "verify_before_unpack = {verify_before_unpack}");
        assert!(!env.pipeline.context().backend.is_sealed(row.id).unwrap());
        env.engine.shutdown().await;
    }
}

/// Guarantee 11 on the real workflow: a run version 1 left in `download_blobs` finishes with
/// version 1's steps under a build whose `prepare` is version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_version_1_started_finishes_with_its_own_steps_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let contents = write_big_family(dir.path(), 300 << 10);
    // What a build before version 2 registered: version 1 alone, as current.
    let engine = open_engine(dir.path()).await;
    let (ctx, source) = context(dir.path(), PrepareSettings::default());
    let v1 = engine.register(super::workflow_v1(Arc::new(ctx))).unwrap();
    let manifest = source.manifest("big").await.unwrap();
    source.trouble(&manifest.layers[0].digest, Trouble::Held, 1);
    let run = crate::job::prepare_run_id("big", manifest.digest.as_str());
    let input = super::PrepareInput { family: "big".into(), manifest: Some(manifest.clone()) };
    v1.start(&run, &input, &PrepareState::default()).await.unwrap();
    // Held in its download: the run is at version 1's second step.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !source.opens().iter().any(|(d, _)| *d == manifest.layers[0].digest) {
        assert!(tokio::time::Instant::now() < deadline, "the download never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.shutdown().await;
    source.gate.add_permits(1);
    drop((engine, v1));

    let env = env_at(dir, PrepareSettings::default()).await;
    let report = env.engine.resume_all().await.unwrap();
    assert_eq!(report.resumed, std::slice::from_ref(&run), "{report:?}");
    // The job, delivered again, joins the resumed run.
    let w = completed(env.pipeline.prepare(&manifest).await.unwrap(), "v1 run failed");
    let steps: Vec<String> = env
        .engine
        .run_detail(&run)
        .unwrap()
        .unwrap()
        .events
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::StepCompleted { step, .. } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, ["fetch_manifest", "download_blobs", "prepare_thin_base", "unpack_into_base"]);
    let root = base_root(&env, w.base_vol_id.unwrap());
    assert_eq!(std::fs::read(root.join("data/two")).unwrap(), contents[1]);

    // A new version of the family takes version 2's steps.
    std::fs::write(images(env.dir.path()).join("images/big/0009-three.tar"), one_file_tar("three", b"3")).unwrap();
    completed(prepare(&env.pipeline, "big").await, "v2 run failed");
    let v2 = crate::job::prepare_run_id("big", env.source.manifest("big").await.unwrap().digest.as_str());
    let detail = env.engine.run_detail(&v2).unwrap().unwrap();
    assert!(
        detail
            .events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::StepCompleted { step, .. } if step == "stream_into_base")),
        "{:?}",
        detail.events
    );
    env.engine.shutdown().await;
}
