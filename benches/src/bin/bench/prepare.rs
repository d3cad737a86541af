//! `bench prepare`: a streamed prepare from S3 beside the two things it overlaps.
//!
//! A three-layer gzip image of about 500 MiB compressed (one layer of 24,000 small files,
//! one of six 32 MiB files, one mixed) is published to moto's S3 on 127.0.0.1 and served
//! through a throttling proxy (a TCP relay in this process that paces moto's replies to a
//! set rate shared by every connection, like a host's link; `tc` on loopback would slow
//! every other server too). At 50 and at 200 MiB/s, in three rounds each (alternating
//! which goes first), it measures:
//! - download only: the layers to a sink through the same S3 client, three at once, as the
//!   worker downloads them;
//! - unpack only: the same layers applied from local files, one after the other;
//! - prepare: `worker run prepare` of the family from S3 through the proxy (a fresh state
//!   directory, nothing cached), its wall time, the bytes it read from the disk (`wait4`'s
//!   `ru_inblock`) and its peak RSS (its `VmHWM`, sampled), and beside its CPU time the CPU
//!   the server side took meanwhile (moto and the relay share this machine's cores with the
//!   worker, where a real S3 would not);
//!
//! each on a quiet disk (`syncfs` before it), timed to its end without a sync, as a prepare is.
//! On the disk, the unpack and the prepare each get a fresh ext4 (a loop device over an image
//! file on this disk, made before the side and removed after it; without root, the
//! benchmark's directory): on these VMs the root file system's cost grows as a run deletes
//! what it made (the same unpack took up to four times the CPU late in a run), and the sides
//! run one after the other; a fresh file system gives each the same one.
//!
//! `prepare stream_ratio_<rate>=<prepare / max(download, unpack)>` (the median of the
//! rounds' ratios; target <= 1.10) on the disk, and `prepare stream_ratio_<rate>_tmpfs=`
//! with the unpacked trees and the worker's state directory (its blob cache, its base) on a
//! tmpfs, where each side's time is its own work and not the file system's;
//! `prepare bytes_read_ratio=<bytes read from disk / compressed size>` (target <= 0.05; the
//! larger of the two runs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use rand::{RngCore, SeedableRng};
use thinpipe::image::{ApplyOptions, BlobSource, S3Source, apply_layer};
use thinpipe::volume::testfs::LoopFs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::moto::moto;
use crate::report::{self, Goal};

const FAMILY: &str = "bench";
const BUCKET: &str = "bench-prepare";
const RATES_MIB: [u64; 2] = [50, 200];
/// Rounds per rate, alternating which goes first: this VM's speed drifts between runs.
const ROUNDS: usize = 3;
/// The layers: (file name, groups of (files, bytes each)).
const LAYERS: [(&str, &[(usize, usize)]); 3] = [
    ("0001-small.tar.gz", &[(24_000, 8 << 10)]),
    ("0002-large.tar.gz", &[(6, 32 << 20)]),
    ("0003-mixed.tar.gz", &[(4_000, 16 << 10), (2, 64 << 20)]),
];

pub fn run(base: &Path) -> anyhow::Result<()> {
    let source = base.join("prepare-source");
    let layers = write_image(&source)?;
    let compressed: u64 = layers.iter().map(|l| std::fs::metadata(l).map(|m| m.len())).sum::<Result<_, _>>()?;
    let files: usize = LAYERS.iter().flat_map(|(_, groups)| groups.iter().map(|(n, _)| n)).sum();
    println!("prepare_image_size {:.0} MiB compressed, 3 gzip layers, {files} files", mib(compressed));
    let (moto, endpoint) = moto()?;
    // What the server side (moto, and the relay in this process) costs the same two cores.
    let server_cpu = || moto.cpu_time().unwrap_or_default() + report::cpu_time();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(publish(&endpoint, &source))?;
    let mut bytes_read_ratio: f64 = 0.0;
    // On this disk, and again with the unpacked trees and the worker's state on a tmpfs:
    // there each side's time is its own work, not the file system's (on these VMs the same
    // unpack takes up to twice the CPU as a run goes on, and the sides run at different times).
    let shm = Path::new("/dev/shm");
    let on_tmpfs =
        if shm.is_dir() { Some(tempfile::Builder::new().prefix("bench-prepare-").tempdir_in(shm)?) } else { None };
    let mut places = vec![("", base)];
    if let Some(dir) = &on_tmpfs {
        places.push(("_tmpfs", dir.path()));
    } else {
        println!("prepare stream_ratio_*_tmpfs skipped: no /dev/shm");
    }
    for (place, into) in places {
        for rate in RATES_MIB {
            let proxy = rt.block_on(Proxy::start(&endpoint, rate << 20))?;
            let mut ratios = Vec::new();
            for round in 0..ROUNDS {
                let (mut download, mut unpack, mut unpack_cpu, mut prepare, mut prepare_server_cpu) =
                    (Duration::ZERO, Duration::ZERO, Duration::ZERO, None, Duration::ZERO);
                let order = if report::ours_first(round) {
                    ["prepare", "download", "unpack"]
                } else {
                    ["unpack", "download", "prepare"]
                };
                for which in order {
                    let fresh = if place.is_empty() && which != "download" { fresh_ext4() } else { None };
                    let into = fresh.as_ref().map_or(into, |fs| fs.mount.as_path());
                    // Each starts on a quiet disk: the writeback of what ran before is done.
                    crate::unpack::syncfs(base)?;
                    match which {
                        "download" => download = rt.block_on(download_only(&proxy.url))?,
                        "unpack" => (unpack, unpack_cpu) = unpack_only(into, &layers)?,
                        _ => {
                            let before = server_cpu();
                            prepare = Some(prepare_once(into, &proxy.url)?);
                            prepare_server_cpu = server_cpu() - before;
                        }
                    }
                }
                let prepare = prepare.context("the prepare ran")?;
                println!(
                    "prepare_round_{rate}{place}_{round} prepare {:.2} s (cpu {:.2} s; the server and relay {:.2} s), download only {:.2} s ({:.0} MiB/s), unpack only {:.2} s (cpu {:.2} s); read from disk {:.1} MiB, peak RSS {:.1} MiB; {} first",
                    prepare.elapsed.as_secs_f64(),
                    prepare.cpu.as_secs_f64(),
                    prepare_server_cpu.as_secs_f64(),
                    download.as_secs_f64(),
                    mib(compressed) / download.as_secs_f64(),
                    unpack.as_secs_f64(),
                    unpack_cpu.as_secs_f64(),
                    mib(prepare.read_bytes),
                    prepare.peak_rss_mib,
                    report::side(round)
                );
                ratios.push(prepare.elapsed.as_secs_f64() / download.max(unpack).as_secs_f64());
                if place.is_empty() {
                    bytes_read_ratio = bytes_read_ratio.max(prepare.read_bytes as f64 / compressed as f64);
                }
            }
            let name = format!("stream_ratio_{rate}{place}");
            let ratio = report::median_of_ratios("prepare", &name, &ratios);
            report::ratio("prepare", &name, ratio, Goal::AtMost(1.10));
        }
    }
    report::ratio("prepare", "bytes_read_ratio", bytes_read_ratio, Goal::AtMost(0.05));
    report::peak_rss("prepare");
    Ok(())
}

/// A fresh ext4 on a loop device whose image is on this disk, for one side of one round
/// (`None` without root or `mkfs.ext4`: then the side runs in the benchmark's directory).
pub(crate) fn fresh_ext4() -> Option<LoopFs> {
    if !thinpipe::image::running_as_root()
        || !Path::new("/usr/sbin/mkfs.ext4").exists() && !Path::new("/sbin/mkfs.ext4").exists()
    {
        return None;
    }
    LoopFs::ext4(4096, "loop")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Writes the family (once; kept under `base` for later runs); returns its layer files.
fn write_image(source: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = source.join("images").join(FAMILY);
    std::fs::create_dir_all(&dir)?;
    let mut paths = Vec::new();
    for (seed, (name, groups)) in LAYERS.iter().enumerate() {
        let path = dir.join(name);
        if !path.exists() {
            write_layer(&path, groups, seed as u64)?;
        }
        paths.push(path);
    }
    Ok(paths)
}

/// A gzip layer of `groups` of files, 100 to a directory, their bytes random but for the
/// top bit (so gzip saves about a tenth, as it does on binaries).
fn write_layer(path: &Path, groups: &[(usize, usize)], seed: u64) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(&tmp)?, flate2::Compression::fast());
    let mut b = tar::Builder::new(std::io::BufWriter::new(gz));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let header = |kind, size: usize, path: &str| -> anyhow::Result<tar::Header> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size as u64);
        h.set_path(path)?;
        h.set_cksum();
        Ok(h)
    };
    let mut index = 0;
    for (g, &(files, size)) in groups.iter().enumerate() {
        let mut data = vec![0u8; size];
        for i in 0..files {
            if i % 100 == 0 {
                let dir = format!("g{g}/d{:04}/", i / 100);
                b.append(&header(tar::EntryType::Directory, 0, &dir)?, std::io::empty())?;
            }
            rng.fill_bytes(&mut data);
            data.iter_mut().for_each(|byte| *byte &= 0x7f);
            let name = format!("g{g}/d{:04}/f{index:06}", i / 100);
            b.append(&header(tar::EntryType::Regular, size, &name)?, data.as_slice())?;
            index += 1;
        }
    }
    let mut gz = b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    gz.flush()?;
    gz.finish()?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Publishes the family to `s3://bench-prepare/img` (a new bucket each run: moto forgets).
async fn publish(endpoint: &str, source: &Path) -> anyhow::Result<()> {
    let (config, opts) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::s3_client(&config, &opts);
    client.create_bucket().bucket(BUCKET).send().await.context("creating the bucket")?;
    thinpipe::image::publish(&client, endpoint, source, FAMILY, &format!("s3://{BUCKET}/img"), &|_| {}).await?;
    Ok(())
}

/// Every layer to a sink through the S3 client, three at once (the worker's default).
async fn download_only(endpoint: &str) -> anyhow::Result<Duration> {
    let (config, opts) = thinpipe::aws::test_config(endpoint).await;
    let source = S3Source::new(thinpipe::aws::s3_client(&config, &opts), &format!("s3://{BUCKET}/img"))?;
    let manifest = source.manifest(FAMILY).await?;
    let t = Instant::now();
    futures::stream::iter(manifest.layers.iter())
        .map(|layer| {
            let source = &source;
            async move {
                let mut blob = source.open_blob(layer, 0).await?;
                let n = tokio::io::copy(&mut blob, &mut tokio::io::sink()).await?;
                ensure!(n == layer.size, "downloaded {n} bytes of {}, expected {}", layer.digest, layer.size);
                Ok(())
            }
        })
        .buffer_unordered(3)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(t.elapsed())
}

/// The layers applied one after the other from local files into a fresh tree on this disk.
/// Returns the wall time and this process's CPU time it took.
fn unpack_only(base: &Path, layers: &[PathBuf]) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::tempdir_in(base)?;
    let root = dir.path().join("root");
    std::fs::create_dir(&root)?;
    let (t, cpu) = (Instant::now(), report::cpu_time());
    for layer in layers {
        apply_layer(&root, layer, &layer.display().to_string(), &ApplyOptions::default())?;
    }
    Ok((t.elapsed(), report::cpu_time() - cpu))
}

struct Prepared {
    elapsed: Duration,
    cpu: Duration,
    read_bytes: u64,
    peak_rss_mib: f64,
}

/// `worker run prepare` of the family from S3 through the proxy, nothing cached.
fn prepare_once(base: &Path, endpoint: &str) -> anyhow::Result<Prepared> {
    let worker = crate::unpack::worker_bin()?;
    let state = tempfile::tempdir_in(base)?;
    let t = Instant::now();
    let child = Command::new(&worker)
        .arg("--state-dir")
        .arg(state.path())
        .args(["--set", &format!("aws.endpoint={endpoint}"), "--set", "aws.s3_path_style=true"])
        .args(["run", "prepare", "--family", FAMILY, "--json", "--source", &format!("s3://{BUCKET}/img")])
        .envs([("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")])
        .env("RUST_LOG", "warn")
        // The disk may be fuller than the default refusal watermark.
        .env("THINPIPE_CAPACITY_HIGH_PERCENT", "100")
        .env("THINPIPE_CAPACITY_LOW_PERCENT", "99")
        .env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the worker")?;
    let used = report::wait_with_usage(&child, "worker run prepare")?;
    let elapsed = t.elapsed();
    let usage = used.rusage;
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    // ru_inblock: 512-byte blocks this process read from a disk (not from the page cache).
    Ok(Prepared {
        elapsed,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        read_bytes: usage.ru_inblock as u64 * 512,
        peak_rss_mib: used.peak_rss_mib,
    })
}

/// A TCP relay to moto that paces moto's replies to `rate` bytes/s across all connections.
struct Proxy {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When the next bytes may go: one schedule shared by every connection.
struct Pacer {
    rate: f64,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    async fn take(&self, n: usize) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + Duration::from_secs_f64(n as f64 / self.rate);
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

impl Proxy {
    async fn start(upstream: &str, rate: u64) -> anyhow::Result<Proxy> {
        let upstream = upstream.strip_prefix("http://").context("moto's endpoint is http://host:port")?.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let pacer = Arc::new(Pacer { rate: rate as f64, next: Mutex::new(tokio::time::Instant::now()) });
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (pacer, upstream) = (pacer.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A client that closes mid-reply is no failure of the relay.
                    if let Err(e) = relay(client, &upstream, &pacer).await
                        && !matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
                    {
                        eprintln!("bench prepare: the throttling proxy dropped a connection: {e}");
                    }
                });
            }
        });
        Ok(Proxy { url, task })
    }
}

async fn relay(client: tokio::net::TcpStream, upstream: &str, pacer: &Pacer) -> std::io::Result<()> {
    let server = tokio::net::TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
    // Large enough that pacing is never the cap of one connection: each read waits for its
    // turn on the timer (a 1 ms tick), so 64 KiB reads held one connection to ~60 MiB/s
    // whatever the rate, and a prepare (one layer's connection busy at a time) looked
    // slower than three downloads at once.
    let mut buf = vec![0u8; 1 << 20];
    let replies = async {
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            pacer.take(n).await;
            client_write.write_all(&buf[..n]).await?;
        }
    };
    let replied = replies.await;
    requests.abort();
    replied
}
