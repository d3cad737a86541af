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
