//! thinpipe's end-to-end test support: helper binaries (`src/bin/`) that the tests in
//! `tests/` run as real processes and kill, and small shared utilities for those tests.

pub mod aws;
pub mod flaky;
pub mod fstree;
/// The dm-thin QEMU guest (its own crate, shared with the benchmarks).
pub use thinpipe_guest::qemu as guest;
pub mod http;
pub mod otlp;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// Waits for `cond` to hold, polling, up to `timeout`; panics naming `what` otherwise.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a command to completion, returning its output; panics with stderr if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// SIGKILLs a child we started and reaps it.
pub fn kill(child: &mut Child) -> ExitStatus {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
    child.wait().expect("reap child")
}

/// Whether a process ended by SIGKILL.
pub fn killed(status: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGKILL)
}

/// Lines of a text file, empty if it does not exist.
pub fn lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

/// Path of a workspace binary (`worker`, `enqueue`) next to the test executable's
/// directory. `scripts/test` builds them before running the tests.
/// The `worker` binary, on the `dir` backend unless the test names another (`--set
/// backend=...` or `THINPIPE_BACKEND`): left to `auto`, a worker running as root would mount
/// overlay snapshots inside the test's temporary directories. The tests of the choice itself
/// remove the variable.
pub fn worker() -> Command {
    let mut cmd = Command::new(bin("worker"));
    cmd.env("THINPIPE_BACKEND", "dir");
    cmd
}

pub fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// A tar archive holding one regular file `name` (mode 0644, owned by root, mtime 0).
pub fn tar_of_file(name: &str, content: &[u8]) -> Vec<u8> {
    tar_of_files([(name, content)])
}

/// A tar archive of regular files, in the order given (mode 0644, owned by root, mtime 0).
pub fn tar_of_files<N: AsRef<str>, C: AsRef<[u8]>>(files: impl IntoIterator<Item = (N, C)>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let content = content.as_ref();
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name.as_ref(), content).expect("appending to an in-memory tar");
    }
    b.into_inner().expect("finishing an in-memory tar")
}

/// The run id of the prepare of `family`'s current version in the local source `source`
/// (`prepare-<family>@<digest prefix>`).
pub fn prepare_run(source: &Path, family: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let source = thinpipe::image::LocalDir::new(source);
    let manifest = rt
        .block_on(thinpipe::image::BlobSource::manifest(&source, family))
        .unwrap_or_else(|e| panic!("resolving {family}: {e}"));
    thinpipe::job::prepare_run_id(family, manifest.digest.as_str())
}

/// Runs `umoci` in `dir` (scripts/test installs it).
pub fn umoci(dir: &Path, args: &[&str]) {
    let out = Command::new("umoci").current_dir(dir).args(args).output().expect("umoci (scripts/test installs it)");
    assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes `family` in the OCI layout `<dir>/oci` (created if needed) a new image with no layer
/// of an earlier version: one layer per entry of `layers`, each writing its (path, content)
/// files. Earlier versions' manifests and blobs stay in the layout.
pub fn oci_version(dir: &Path, family: &str, layers: &[&[(&str, &str)]]) -> std::path::PathBuf {
    if !dir.join("oci/index.json").exists() {
        umoci(dir, &["init", "--layout", "oci"]);
    }
    let image = format!("oci:{family}");
    umoci(dir, &["new", "--image", &image]);
    for files in layers {
        umoci(dir, &["unpack", "--image", &image, "work"]);
        for (path, content) in *files {
            let p = dir.join("work/rootfs").join(path);
            std::fs::create_dir_all(p.parent().expect("a file in a directory")).expect("creating a directory");
            std::fs::write(&p, content).expect("writing a file");
        }
        umoci(dir, &["repack", "--image", &image, "work"]);
        std::fs::remove_dir_all(dir.join("work")).expect("removing the work tree");
    }
    dir.join("oci")
}

/// Unmounts every overlay snapshot under a volume directory when dropped (a killed worker
/// leaves its snapshots mounted), so the test's temporary directory can be removed.
pub struct UnmountOverlays(pub std::path::PathBuf);

impl Drop for UnmountOverlays {
    fn drop(&mut self) {
        use thinpipe::volume::{OverlayBackend, OverlayOptions, VolumeBackend, VolumeId};
        let Ok(b) = OverlayBackend::open(&self.0, OverlayOptions::default()) else { return };
        for vol in b.list().unwrap_or_default() {
            if let VolumeId::Snap(_) = vol {
                b.delete(vol).unwrap_or_else(|e| eprintln!("cleaning up {vol}: {e}"));
            }
        }
    }
}

/// Log files of the daemons this test process has running.
static LOGS_IN_USE: std::sync::Mutex<std::collections::BTreeSet<std::path::PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A `worker daemon` process on a state directory, stopped with SIGTERM (or killed when
/// dropped, so a failing test leaves nothing behind).
pub struct Daemon {
    child: Option<Child>,
    pub state: std::path::PathBuf,
    /// `<state>/worker.log`, or `worker-N.log` for the Nth worker started on the same
    /// state directory while earlier ones still run.
    log: std::path::PathBuf,
}

impl Daemon {
    pub fn start(state: &Path, extra_env: &[(&str, &str)]) -> Daemon {
        Self::start_logging(state, &state.join("worker.log"), extra_env)
    }

    /// [`Daemon::start`], its log at `log` (outside a filesystem a test fills, say).
    pub fn start_logging(state: &Path, log: &Path, extra_env: &[(&str, &str)]) -> Daemon {
        let mut log_path = log.to_path_buf();
        let mut n = 1;
        {
            let mut in_use = LOGS_IN_USE.lock().unwrap_or_else(|p| p.into_inner());
            while in_use.contains(&log_path) {
                n += 1;
                log_path = log.with_file_name(format!("worker-{n}.log"));
            }
            in_use.insert(log_path.clone());
        }
        let log = std::fs::File::create(&log_path).expect("worker log");
        let mut cmd = worker();
        cmd.arg("--state-dir")
            .arg(state)
            .arg("daemon")
            .env("THINPIPE_QUEUE_WAIT_SECS", "1")
            .env("THINPIPE_WORKER_RETRY_DELAY_SECS", "1")
            // Tests run side by side: each worker's admin API on a free port.
            .env("THINPIPE_ADMIN_LISTEN", "127.0.0.1:0")
            // The `dir` backend's volumes share the machine's disk with everything else: the
            // watermarks are tested by capacity.rs on a filesystem of its own, not here.
            .env("THINPIPE_CAPACITY_HIGH_PERCENT", "100")
            .env("THINPIPE_CAPACITY_LOW_PERCENT", "99")
            .env("THINPIPE_CAPACITY_REFUSE_PERCENT", "100")
            .env_remove("THINPIPE_FAULT")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start worker daemon");
        Daemon { child: Some(child), state: state.to_path_buf(), log: log_path }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().expect("try_wait").is_none())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits up to `timeout` for the process to end by itself and returns how it ended.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not exit within {timeout:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no destructors.
    pub fn kill(mut self) -> ExitStatus {
        kill(self.child.as_mut().expect("running"))
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        wait_until(&format!("worker log to show {text:?}"), timeout, || self.log().contains(text));
    }

    /// The admin API's base URL, once the worker has bound it.
    pub fn admin_url(&self) -> String {
        let file = self.state.join("admin.addr");
        wait_until("the admin API to listen", Duration::from_secs(60), || file.exists());
        std::fs::read_to_string(file).expect("admin.addr").trim().to_owned()
    }

    /// The worker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `timeout` for the drain and exit.
    pub fn stop(self, timeout: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) }, 0);
        self.stop_waited(timeout)
    }

    /// After a signal already sent: waits up to `timeout` for the exit (then kills it).
    pub fn stop_waited(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                kill(&mut child);
                panic!("worker did not stop within {timeout:?} of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && child.try_wait().ok().flatten().is_none()
        {
            kill(&mut child);
        }
        LOGS_IN_USE.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.log);
    }
}

/// Every entry under `root`: relative path → (type, permission bits, link target, content hash).
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, (char, u32, String, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            let value = if ft.is_dir() {
                stack.push(path.clone());
                ('d', mode, String::new(), String::new())
            } else if ft.is_symlink() {
                ('l', 0, std::fs::read_link(&path).unwrap().display().to_string(), String::new())
            } else if ft.is_file() {
                let digest = thinpipe::image::Digest::of_bytes(&std::fs::read(&path).unwrap());
                ('f', mode, String::new(), digest.to_string())
            } else {
                ('o', mode, String::new(), String::new())
            };
            out.insert(rel, value);
        }
    }
    out
}

/// A moto server of the test's own, for a test that stops it (the shared one keeps serving
/// the others). Killed when dropped.
pub struct PrivateMoto {
    child: std::process::Child,
    pub endpoint: String,
}

impl PrivateMoto {
    pub fn start() -> Option<PrivateMoto> {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
        if !bin.exists() {
            assert!(std::env::var("CI").is_err(), "{} is missing: scripts/test installs it", bin.display());
            eprintln!("skipping: {} is missing (scripts/test installs it)", bin.display());
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        wait_until("the private moto server to listen", std::time::Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Some(PrivateMoto { child, endpoint: format!("http://{addr}") })
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }
}

impl Drop for PrivateMoto {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        kill(&mut self.child);
    }
}

/// Where `enqueue` posts a job.
#[derive(Clone, Copy, Debug)]
pub enum To<'a> {
    /// The state directory's embedded queue.
    State(&'a Path),
    /// An SQS queue at an endpoint (moto), with moto's credentials.
    Sqs { queue: &'a str, endpoint: &'a str },
}

/// `enqueue <to> --wait --json --timeout <secs>`, its output piped: the caller adds the job
/// (and any environment), runs or spawns it, and reads the result with [`job_result`].
pub fn enqueue_waiting(to: To<'_>, timeout_secs: u64) -> Command {
    let mut cmd = Command::new(bin("enqueue"));
    match to {
        To::State(state) => {
            cmd.arg("--state-dir").arg(state);
        }
        To::Sqs { queue, endpoint } => {
            cmd.args(["--queue-url", queue, "--endpoint-url", endpoint]).envs(aws::AWS_ENV);
        }
    }
    cmd.args(["--wait", "--json", "--timeout"]).arg(timeout_secs.to_string());
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd
}

/// The job result `enqueue --wait --json` printed; panics with its stderr when there is none.
pub fn job_result(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "enqueue printed no result ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Posts the job `args` to `to`, waits up to 120 s, and returns its result.
pub fn enqueue_wait_to(to: To<'_>, args: &[&str]) -> serde_json::Value {
    let out = enqueue_waiting(to, 120).args(args).output().unwrap_or_else(|e| panic!("cannot run enqueue: {e}"));
    job_result(&out)
}

/// [`enqueue_wait_to`] the state directory's embedded queue.
pub fn enqueue_wait(state: &Path, args: &[&str]) -> serde_json::Value {
    enqueue_wait_to(To::State(state), args)
}

/// A tmpfs of `mib` MiB mounted at a new temporary directory, unmounted when dropped;
/// `None` (test skipped) without root, unless `CI` is set.
pub struct SmallTmpfs {
    pub mount: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallTmpfs {
    pub fn new(mib: u64) -> Option<SmallTmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "small-filesystem tests need root");
            eprintln!("skipping: small-filesystem tests need root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).expect("mount point");
        let out = run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(&mount));
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Some(SmallTmpfs { mount, _dir: dir })
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let out = run(Command::new("umount").arg("-l").arg(&self.mount));
        if !out.status.success() {
            eprintln!("unmounting {}: {}", self.mount.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Appends the `.rs` files under `dir` (recursively, skipping `target` and `node_modules`).
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && name != "node_modules" {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
