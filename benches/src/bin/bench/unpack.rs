//! `bench unpack`: our layer application against GNU tar, and the worker's peak RSS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use thinpipe::image::{ApplyOptions, apply_layer};

/// Small-files layer: 48,000 files of 4 KiB in 480 directories (~200 MiB).
const SMALL_FILES: usize = 48_000;
const SMALL_SIZE: usize = 4096;
const FILES_PER_DIR: usize = 100;
/// Big layer for the RSS figure: 64 files of 16 MiB.
const BIG_FILES: usize = 64;
const BIG_SIZE: usize = 16 << 20;
const ROUNDS: usize = 3;

pub fn run(base: &Path) -> anyhow::Result<()> {
    let layer = base.join("small-files.tar");
    if !layer.exists() {
        write_layer(&layer, SMALL_FILES, SMALL_SIZE)?;
    }
    let size = std::fs::metadata(&layer)?.len();
    println!("unpack_layer_size {:.0} MiB", size as f64 / (1 << 20) as f64);
    println!("unpack_layer_files {SMALL_FILES} files");
    // Each timed run starts with no dirty pages (syncfs before it), so neither pays for the
    // other's writeback; the order alternates between rounds.
    let (mut ours, mut tar) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for which in if round % 2 == 0 { ["ours", "tar"] } else { ["tar", "ours"] } {
            let dir = tempfile::tempdir_in(base)?;
            let into = mk(dir.path(), which)?;
            syncfs(base)?;
            let t = Instant::now();
            if which == "ours" {
                let stats = apply_layer(&into, &layer, "bench", &ApplyOptions::default())?;
                ours.push(t.elapsed());
                ensure!(stats.entries as usize >= SMALL_FILES, "applied only {} entries", stats.entries);
            } else {
                let status =
                    Command::new("tar").arg("-xf").arg(&layer).arg("-C").arg(&into).status().context("running tar")?;
                tar.push(t.elapsed());
                ensure!(status.success(), "tar -x failed: {status}");
            }
            drop(dir);
        }
        eprintln!("round {round}: ours {:?}, tar {:?}", ours[round], tar[round]);
    }
    // The disk's speed drifts a lot between rounds here; the ratio is the median of each
    // round's paired ratio, which the drift affects least.
    let mut ratios: Vec<f64> = ours.iter().zip(&tar).map(|(o, t)| o.as_secs_f64() / t.as_secs_f64()).collect();
    ratios.sort_by(f64::total_cmp);
    let ratio = ratios[ratios.len() / 2];
    let (ours, tar) = (median(ours), median(tar));
    println!("unpack_ours {:.3} s", ours.as_secs_f64());
    println!("unpack_gnu_tar {:.3} s", tar.as_secs_f64());
    println!("unpack ratio_vs_tar={ratio:.2}");
    peak_rss(base)
}

fn syncfs(path: &Path) -> anyhow::Result<()> {
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
    v[v.len() / 2]
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
    let worker = std::env::current_exe()?.parent().context("bench has no directory")?.join("worker");
    if !worker.exists() {
        bail!("{} is not built: run `cargo build --release -p worker` (benches/run does)", worker.display());
    }
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
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // SAFETY: waiting on our own child pid with valid pointers.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(rc == pid, "wait4 failed: {}", std::io::Error::last_os_error());
    ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "worker run prepare failed (status {status})");
    let rss_mib = usage.ru_maxrss as f64 / 1024.0;
    let layer_mib = size as f64 / (1 << 20) as f64;
    println!("prepare_layer_size {layer_mib:.0} MiB");
    println!("prepare_peak_rss {rss_mib:.1} MiB");
    println!("prepare rss_vs_layer={:.3} rss_mib={rss_mib:.1}", rss_mib / layer_mib);
    Ok(())
}
