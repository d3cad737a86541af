//! `bench registry`: the registry source beside the same image read from disk, and what a
//! signature check costs.
//!
//! The real Debian image (`THINPIPE_REAL_IMAGE`, four gzip layers; root) is pushed with
//! `skopeo` to Distribution's `docker-registry` on 127.0.0.1 (plain HTTP, storage on this
//! disk) and signed with a test key as `cosign sign --key` signs.
//! - `registry overhead_ratio=<prepare from the registry / prepare from the OCI layout on
//!   disk>`: `worker run prepare` on a fresh state directory each time, three rounds
//!   alternating which goes first, the median of the rounds' ratios (target <= 1.10): with
//!   the state directory on a fresh loop-mounted ext4 for each side (as `bench prepare`: the
//!   root file system's cost drifts within a run on these VMs), and again on a tmpfs
//!   (`overhead_ratio_tmpfs`: the program's own cost). The registry's own CPU (it shares this
//!   machine's cores) is printed beside.
//! - `registry verify_cpu_ms=`: this process's CPU per newly verified digest (the signature
//!   manifest and payload fetched, the ECDSA check), over 200 checks with nothing remembered
//!   (target <= 10); `registry verify_cached_ms=`: wall time per check of a verified digest
//!   remembered in a host database, over 10,000 (target < 0.1), and the requests they made
//!   (must be 0).
//! - `registry requests_per_version=`: requests a host makes to resolve, verify and fetch a
//!   new version, beyond one GET per blob (target <= 2).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use thinpipe::image::signature::{MemoryVerifiedCache, SignaturePolicy, VerifiedCache};
use thinpipe::image::testregistry::{Registry, RegistrySetup};
use thinpipe::image::{BlobSource, Digest, RegistryOptions, RegistrySource, RegistryTemplate};

use crate::report::{self, Goal};

const FAMILY: &str = "debian";
const ROUNDS: usize = 3;
const NEW_CHECKS: u32 = 200;
const CACHED_CHECKS: u32 = 10_000;

/// Remembers nothing: every check verifies anew.
struct Forgetful;

impl VerifiedCache for Forgetful {
    fn is_verified(&self, _: &Digest, _: &str) -> Result<bool, String> {
        Ok(false)
    }
    fn remember_verified(&self, _: &Digest, _: &str) -> Result<(), String> {
        Ok(())
    }
}

pub fn run(base: &Path) -> anyhow::Result<()> {
    let Some(image) = std::env::var_os("THINPIPE_REAL_IMAGE").map(std::path::PathBuf::from) else {
        println!("registry skipped: needs the real Debian image (THINPIPE_REAL_IMAGE=$(scripts/real-image), root)");
        return Ok(());
    };
    let layout = image.join("layout");
    // The policy file names its keys by absolute path (a relative one is the file's neighbour).
    let base = &base.canonicalize().with_context(|| format!("resolving {}", base.display()))?;
    ensure!(
        thinpipe::image::testregistry::available(),
        "docker-registry and skopeo are needed (scripts/test installs them)"
    );
    let registry = Registry::start(RegistrySetup::default());
    let pushed = registry.push(&layout, FAMILY, &format!("library/{FAMILY}:bookworm"));
    let version = Digest::parse(&pushed).map_err(anyhow::Error::msg)?;
    let key = p256::ecdsa::SigningKey::from_slice(&[42; 32]).context("a test key")?;
    registry.cosign_sign(&format!("library/{FAMILY}"), &pushed, &key);
    let keys = base.join("registry-bench.pub");
    std::fs::write(&keys, thinpipe::image::signature::public_pem(&key))?;
    let policy_file = base.join("registry-bench-policy.toml");
    std::fs::write(
        &policy_file,
        format!("[families.{FAMILY}]\nsignature = \"cosign\"\nkeys = [\"{}\"]\n", keys.display()),
    )?;
    let policy = Arc::new(SignaturePolicy::load(&policy_file).map_err(anyhow::Error::msg)?);
    let source = format!("{}/library/{{family}}:bookworm", registry.host);

    overhead(base, &layout, &registry, &source, &policy_file)?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let open = |cache: Arc<dyn VerifiedCache>| -> anyhow::Result<RegistrySource> {
        let mut options = RegistryOptions::default();
        options.http.plain_http = vec![registry.host.clone()];
        options.http.retry_for = Duration::from_secs(10);
        let template = RegistryTemplate::parse(&source).map_err(anyhow::Error::msg)?;
        Ok(RegistrySource::new(template, options)?.with_signatures(policy.clone(), cache))
    };

    // A new version: resolve (and verify), then every layer blob, as a prepare asks.
    let fresh = open(Arc::new(MemoryVerifiedCache::default()))?;
    let manifest = rt.block_on(fresh.manifest(FAMILY))?;
    ensure!(manifest.digest == version, "resolved {} for the pushed {version}", manifest.digest);
    for layer in &manifest.layers {
        rt.block_on(async {
            let mut blob = fresh.open_blob(layer, 0).await?;
            tokio::io::copy(&mut blob, &mut tokio::io::sink()).await.context("reading a layer")?;
            anyhow::Ok(())
        })?;
    }
    // One GET per blob: each layer, the image config, the signature's payload.
    let blobs = manifest.layers.len() as u64 + 2;
    let beyond = fresh.requests() - blobs;
    println!(
        "registry_requests {} for a new signed version of {} layers: {blobs} blob GETs, {beyond} more (the tag's manifest, the signature manifest)",
        fresh.requests(),
        manifest.layers.len()
    );
    report::ratio("registry", "requests_per_version", beyond as f64, Goal::AtMost(2.0));

    // Newly verified digests: nothing remembered.
    let anew = open(Arc::new(Forgetful))?;
    rt.block_on(anew.verify_signature(FAMILY, &version))?;
    let (cpu, t) = (report::cpu_time(), Instant::now());
    for _ in 0..NEW_CHECKS {
        rt.block_on(anew.verify_signature(FAMILY, &version))?;
    }
    let (cpu, wall) = (report::cpu_time() - cpu, t.elapsed());
    let per = report::ms(cpu) / f64::from(NEW_CHECKS);
    println!(
        "registry_verify_new {NEW_CHECKS} checks: cpu {:.1} ms ({per:.2} ms each), wall {:.1} ms ({:.2} ms each, the registry's time included)",
        report::ms(cpu),
        report::ms(wall),
        report::ms(wall) / f64::from(NEW_CHECKS)
    );
    report::ratio("registry", "verify_cpu_ms", per, Goal::AtMost(10.0));

    // A verified digest, remembered in a host database as the worker remembers it.
    let db = tempfile::tempdir_in(base)?;
    let store = Arc::new(thinpipe::store::Store::open(db.path().join("host.db"))?);
    let cached = open(store)?;
    rt.block_on(cached.verify_signature(FAMILY, &version))?;
    let before = cached.requests();
    let t = Instant::now();
    for _ in 0..CACHED_CHECKS {
        rt.block_on(cached.verify_signature(FAMILY, &version))?;
    }
    let per = report::ms(t.elapsed()) / f64::from(CACHED_CHECKS);
    let asked = cached.requests() - before;
    println!("registry_verify_cached {CACHED_CHECKS} checks: {per:.4} ms each, {asked} requests");
    ensure!(asked == 0, "a remembered verification asked the registry {asked} times");
    report::ratio("registry", "verify_cached_ms", per, Goal::AtMost(0.1));
    report::peak_rss("registry");
    Ok(())
}

/// `worker run prepare` from the registry and from the layout, alternating, on fresh state:
/// on a fresh ext4 per side, and on a tmpfs.
fn overhead(base: &Path, layout: &Path, registry: &Registry, source: &str, policy: &Path) -> anyhow::Result<()> {
    let shm = Path::new("/dev/shm");
    let on_tmpfs =
        if shm.is_dir() { Some(tempfile::Builder::new().prefix("bench-registry-").tempdir_in(shm)?) } else { None };
    let mut places: Vec<(&str, Option<&Path>)> = vec![("", None)];
    match &on_tmpfs {
        Some(dir) => places.push(("_tmpfs", Some(dir.path()))),
        None => println!("registry overhead_ratio_tmpfs skipped: no /dev/shm"),
    }
    let registry_pid = registry.pid();
    for (place, on) in places {
        let mut ratios = Vec::new();
        for round in 0..ROUNDS {
            let (mut ours, mut baseline, mut server_cpu) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            let order = if report::ours_first(round) { ["registry", "layout"] } else { ["layout", "registry"] };
            for which in order {
                // Each side on a file system of its own (or the tmpfs), on a quiet disk.
                let fresh = if on.is_none() { crate::prepare::fresh_ext4() } else { None };
                let into = on.or(fresh.as_ref().map(|fs| fs.mount.as_path())).unwrap_or(base);
                crate::unpack::syncfs(base)?;
                if which == "registry" {
                    let cpu = process_cpu(registry_pid);
                    let settings = [
                        format!("source={source}"),
                        format!("registry.plain_http={}", registry.host),
                        format!("registry.policy_file={}", policy.display()),
                    ];
                    ours = prepare_once(into, &settings)?;
                    server_cpu = process_cpu(registry_pid).saturating_sub(cpu);
                } else {
                    baseline = prepare_once(into, &[format!("source=dir:{}", layout.display())])?;
                }
            }
            let ratio = ours.as_secs_f64() / baseline.as_secs_f64();
            println!(
                "registry_round{place}_{round} from the registry {:.2} s (the registry's cpu {:.2} s), from the layout {:.2} s, ratio {ratio:.2}; {} first",
                ours.as_secs_f64(),
                server_cpu.as_secs_f64(),
                baseline.as_secs_f64(),
                report::side(round)
            );
            ratios.push(ratio);
        }
        let median = report::median_of_ratios("registry", &format!("overhead{place}"), &ratios);
        report::ratio("registry", &format!("overhead_ratio{place}"), median, Goal::AtMost(1.10));
    }
    Ok(())
}

/// The wall time of one `worker run prepare` of the family on a fresh state directory.
fn prepare_once(base: &Path, settings: &[String]) -> anyhow::Result<Duration> {
    let worker = crate::unpack::worker_bin()?;
    let state = tempfile::tempdir_in(base)?;
    let mut cmd = Command::new(&worker);
    cmd.arg("--state-dir").arg(state.path());
    for s in settings {
        cmd.args(["--set", s]);
    }
    let t = Instant::now();
    let out = cmd
        .args(["run", "prepare", "--family", FAMILY, "--json"])
        .env("RUST_LOG", "warn")
        .env("THINPIPE_CAPACITY_HIGH_PERCENT", "100")
        .env("THINPIPE_CAPACITY_LOW_PERCENT", "99")
        .env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100")
        .output()
        .context("running the worker")?;
    let elapsed = t.elapsed();
    ensure!(out.status.success(), "worker run prepare: {}", String::from_utf8_lossy(&out.stdout));
    Ok(elapsed)
}

/// User + system CPU of process `pid` so far (`/proc/<pid>/stat`).
fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}
