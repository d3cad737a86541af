//! The moto server the AWS benchmarks talk to: `THINPIPE_TEST_AWS_ENDPOINT` if set, else
//! one started from the workspace's `.venv` (made by `./scripts/test`) and stopped on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::ensure;

pub struct Moto(Option<Child>);

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0
            && let Err(e) = child.kill().and_then(|()| child.wait().map(drop))
        {
            eprintln!("stopping moto_server: {e}");
        }
    }
}

impl Moto {
    /// The CPU time the server this process started has used so far (user and system, from
    /// `/proc/<pid>/stat`); `None` for a server started elsewhere.
    pub fn cpu_time(&self) -> Option<Duration> {
        let child = self.0.as_ref()?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).ok()?;
        // Fields after the command name (which may hold spaces), from field 3: utime is the
        // 14th field, stime the 15th.
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
    }
}

/// The workspace's `.venv` (made by `./scripts/test`), wherever the bench runs from.
pub fn venv(tool: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin").join(tool);
    ensure!(
        path.exists(),
        "{} is missing: run ./scripts/test once (it makes .venv with moto and boto3), then run the benchmark again",
        path.display()
    );
    Ok(path)
}

pub fn moto() -> anyhow::Result<(Moto, String)> {
    venv("python")?;
    if let Ok(e) = std::env::var("THINPIPE_TEST_AWS_ENDPOINT") {
        return Ok((Moto(None), e));
    }
    let bin = venv("moto_server")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let moto = Moto(Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((moto, format!("http://127.0.0.1:{port}")))
}
