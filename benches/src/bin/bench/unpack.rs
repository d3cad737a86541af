//! `bench unpack`: our layer application beside GNU `tar -x`, and the worker's peak RSS.
//!
//! The same uncompressed layer (~200 MiB, 48,000 small files) applied by our code and by
//! `tar -x`, in rounds alternating which goes first: once with both trees on this disk
//! (where single rounds swing several-fold with the writeback of earlier rounds), and once
//! with the layer and both trees on a tmpfs (`/dev/shm`), where what remains is each
//! program's own cost. Each ratio is the median of its rounds' paired ratios, printed with
//! them: `unpack ratio_vs_tar=<x>` (target <= 1.25) and `unpack ratio_vs_tar_tmpfs=<x>`
//! (target <= 1.0). Then the real Debian image (`scripts/real-image`, four gzip layers):
//! `worker run prepare` of it (blob cache warm) beside `umoci unpack` of the same layout,
//! both on this disk, alternating order: `unpack ratio_vs_umoci=<x>` (target <= 1.0); umoci is
//! what a user would otherwise run. Then the worker's peak RSS while preparing a family with
//! a 1 GiB layer (target <= 32 MiB: blobs are streamed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use thinpipe::image::{ApplyOptions, apply_layer};

use crate::report::{self, Goal};

/// Small-files layer: 48,000 files of 4 KiB in 480 directories (~200 MiB).
const SMALL_FILES: usize = 48_000;
const SMALL_SIZE: usize = 4096;
const FILES_PER_DIR: usize = 100;
/// Big layer for the RSS figure: 64 files of 16 MiB.
const BIG_FILES: usize = 64;
const BIG_SIZE: usize = 16 << 20;
const ROUNDS: usize = 4;

pub fn run(base: &Path) -> anyhow::Result<()> {
    let layer = base.join("small-files.tar");
    if !layer.exists() {
        write_layer(&layer, SMALL_FILES, SMALL_SIZE)?;
    }
    let size = std::fs::metadata(&layer)?.len();
    println!("unpack_layer_size {:.0} MiB", size as f64 / (1 << 20) as f64);
    println!("unpack_layer_files {SMALL_FILES} files");
    let disk = rounds("disk", base, &layer)?;
    report::ratio("unpack", "ratio_vs_tar", disk, Goal::AtMost(1.25));
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = tempfile::Builder::new().prefix("bench-unpack-").tempdir_in(shm)?;
        let on_tmpfs = dir.path().join("small-files.tar");
        std::fs::copy(&layer, &on_tmpfs)?;
        let tmpfs = rounds("tmpfs", dir.path(), &on_tmpfs)?;
        report::ratio("unpack", "ratio_vs_tar_tmpfs", tmpfs, Goal::AtMost(1.0));
    } else {
        println!("unpack ratio_vs_tar_tmpfs skipped: no /dev/shm");
    }
    match real_image() {
        Some(layout) => {
            let ratio = versus_umoci(base, &layout)?;
            report::ratio("unpack", "ratio_vs_umoci", ratio, Goal::AtMost(1.0));
        }
        None => println!(
            "unpack ratio_vs_umoci skipped: needs root and the real image (THINPIPE_REAL_IMAGE=$(scripts/real-image); benches/run sets it as root)"
        ),
    }
    peak_rss(base)?;
    report::peak_rss("unpack");
    Ok(())
}

/// The real image's OCI layout, when we are root and it is built.
fn real_image() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let layout = PathBuf::from(std::env::var_os("THINPIPE_REAL_IMAGE")?).join("layout");
    (root && layout.join("index.json").is_file()).then_some(layout)
}

/// Rounds of `worker run prepare` (a fresh state directory whose blob cache already holds the
/// layers) and `umoci unpack`, alternating which goes first; the median of the rounds' ratios.
fn versus_umoci(base: &Path, layout: &Path) -> anyhow::Result<f64> {
    let worker = worker_bin()?;
    let blobs: Vec<PathBuf> =
        std::fs::read_dir(layout.join("blobs/sha256"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let (mut ours, mut umoci) = (Duration::ZERO, Duration::ZERO);
        let order = if report::ours_first(round) { ["ours", "umoci"] } else { ["umoci", "ours"] };
        for which in order {
            let dir = tempfile::tempdir_in(base)?;
            let elapsed = if which == "ours" {
                // The cache warm: the layout's blobs copied in where the worker keeps them.
                let cache = dir.path().join("blobs/sha256");
                std::fs::create_dir_all(&cache)?;
                for blob in &blobs {
                    std::fs::copy(blob, cache.join(blob.file_name().context("a blob has a name")?))?;
                }
                syncfs(base)?;
                let t = Instant::now();
                let out = Command::new(&worker)
                    .arg("--state-dir")
                    .arg(dir.path())
                    .args(["run", "prepare", "--family", "debian", "--json", "--source"])
                    .arg(format!("dir:{}", layout.display()))
                    .env("RUST_LOG", "warn")
                    // The disk may be fuller than the default refusal watermark.
                    .env("THINPIPE_CAPACITY_HIGH_PERCENT", "100")
                    .env("THINPIPE_CAPACITY_LOW_PERCENT", "99")
                    .env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100")
                    .output()
                    .context("running worker run prepare")?;
                let elapsed = t.elapsed();
                ensure!(out.status.success(), "worker run prepare failed: {}", String::from_utf8_lossy(&out.stderr));
                elapsed
            } else {
                syncfs(base)?;
                let t = Instant::now();
                let out = Command::new("umoci")
                    .args(["unpack", "--image"])
                    .arg(format!("{}:debian", layout.display()))
                    .arg(dir.path().join("bundle"))
                    .output()
                    .context("running umoci (apt-get install umoci)")?;
                let elapsed = t.elapsed();
                ensure!(out.status.success(), "umoci unpack failed: {}", String::from_utf8_lossy(&out.stderr));
                elapsed
            };
            if which == "ours" {
                ours = elapsed
            } else {
                umoci = elapsed
            }
            drop(dir);
        }
        let ratio = ours.as_secs_f64() / umoci.as_secs_f64();
        println!(
            "unpack_debian_round{round} first={} ours {:.3} s umoci {:.3} s ratio {ratio:.2}",
            order[0],
            ours.as_secs_f64(),
            umoci.as_secs_f64()
        );
        ratios.push(ratio);
    }
    Ok(report::median_of_ratios("unpack", "ratio_vs_umoci", &ratios))
}

pub(crate) fn worker_bin() -> anyhow::Result<PathBuf> {
    let worker = std::env::current_exe()?.parent().context("bench has no directory")?.join("worker");
    if !worker.exists() {
        bail!("{} is not built: run `cargo build --release -p worker` (benches/run does)", worker.display());
    }
    Ok(worker)
}

/// Rounds of (ours, tar) into `base`, alternating which goes first; returns the median of
/// the per-round ratios after printing every round.
fn rounds(place: &str, base: &Path, layer: &Path) -> anyhow::Result<f64> {
    // Each timed run starts with no dirty pages (syncfs before it), so neither pays for the
    // other's writeback.
    let mut ratios = Vec::new();
    let (mut ours_all, mut tar_all) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (mut ours, mut tar) = (Duration::ZERO, Duration::ZERO);
        let order = if report::ours_first(round) { ["ours", "tar"] } else { ["tar", "ours"] };
        for which in order {
            let dir = tempfile::tempdir_in(base)?;
            let into = mk(dir.path(), which)?;
            syncfs(base)?;
            let t = Instant::now();
            if which == "ours" {
                let stats = apply_layer(&into, layer, "bench", &ApplyOptions::default())?;
                ours = t.elapsed();
                ensure!(stats.entries as usize >= SMALL_FILES, "applied only {} entries", stats.entries);
            } else {
                let status =
                    Command::new("tar").arg("-xf").arg(layer).arg("-C").arg(&into).status().context("running tar")?;
                tar = t.elapsed();
                ensure!(status.success(), "tar -x failed: {status}");
            }
            drop(dir);
        }
        let ratio = ours.as_secs_f64() / tar.as_secs_f64();
        println!(
            "unpack_{place}_round{round} first={} ours {:.3} s tar {:.3} s ratio {ratio:.2}",
            if report::ours_first(round) { "ours" } else { "tar" },
            ours.as_secs_f64(),
            tar.as_secs_f64()
        );
        ratios.push(ratio);
        ours_all.push(ours);
        tar_all.push(tar);
    }
    println!(
        "unpack_{place} ours median {:.3} s, tar median {:.3} s (the ratio is not their quotient: it is the median of the rounds' ratios, which the drift between rounds affects least)",
        median(ours_all).as_secs_f64(),
        median(tar_all).as_secs_f64()
    );
    Ok(report::median_of_ratios("unpack", &format!("ratio_vs_tar_{place}"), &ratios))
}

pub(crate) fn syncfs(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: the fd is open for the duration of the call.
    ensure!(unsafe { libc::syncfs(f.as_raw_fd()) } == 0, "syncfs: {}", std::io::Error::last_os_error());
    Ok(())
}

fn mk(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::create_dir(&p)?;
    Ok(p)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2
}

fn write_layer(path: &Path, files: usize, size: usize) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(&tmp)?));
    let mut data = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..files {
        if i % FILES_PER_DIR == 0 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(0);
            h.set_path(format!("d{:04}/", i / FILES_PER_DIR))?;
            h.set_cksum();
            b.append(&h, std::io::empty())?;
        }
        // Different content per file (xorshift), cheap to make.
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size as u64);
        h.set_path(format!("d{:04}/f{i:06}", i / FILES_PER_DIR))?;
        h.set_cksum();
        b.append(&h, data.as_slice())?;
    }
    b.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs `worker run prepare` on a family with one 1 GiB layer and reads its peak RSS.
fn peak_rss(base: &Path) -> anyhow::Result<()> {
    let worker = worker_bin()?;
    let source = base.join("big-source");
    let family = source.join("images/big");
    let layer = family.join("0001-big.tar");
    if !layer.exists() {
        std::fs::create_dir_all(&family)?;
        write_layer(&layer, BIG_FILES, BIG_SIZE)?;
    }
    let size = std::fs::metadata(&layer)?.len();
    let state = tempfile::tempdir_in(base)?;
    let child = Command::new(&worker)
        .arg("--state-dir")
        .arg(state.path())
        .args(["run", "prepare", "--family", "big", "--source"])
        .arg(&source)
        .stdout(std::process::Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the worker")?;
    let rss_mib = report::wait_with_usage(&child, "worker run prepare")?.peak_rss_mib;
    let layer_mib = size as f64 / (1 << 20) as f64;
    println!("prepare_layer_size {layer_mib:.0} MiB");
    println!("prepare_peak_rss {rss_mib:.1} MiB");
    println!(
        "prepare rss_vs_layer={:.3} (peak RSS of `worker run prepare` over the layer's size)",
        rss_mib / layer_mib
    );
    report::ratio("prepare", "peak_rss_mib", rss_mib, Goal::AtMost(32.0));
    Ok(())
}
