//! A real OCI registry for tests and benchmarks: Distribution's `docker-registry` (Debian's
//! package) on 127.0.0.1, storing under a temporary directory of its own, optionally behind
//! basic auth (an htpasswd file) and TLS (a CA made here, trusted through `registry.ca_file`,
//! never by turning verification off). Images are pushed with `skopeo`; signatures are made
//! here as `cosign sign --key` makes them. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a test registry is set up.
#[derive(Clone, Debug, Default)]
pub struct RegistrySetup {
    /// Basic auth with this user and password.
    pub login: Option<(String, String)>,
    pub tls: bool,
}

pub struct Registry {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `127.0.0.1:<port>`: what references name.
    pub host: String,
    pub setup: RegistrySetup,
}

/// Whether `docker-registry` and `skopeo` are here; in CI they must be.
pub fn available() -> bool {
    let have = |cmd: &str| Command::new(cmd).arg("--version").output().is_ok_and(|o| o.status.success());
    let ok = have("docker-registry") && have("skopeo");
    if !ok {
        assert!(std::env::var("CI").is_err(), "docker-registry and skopeo are missing: scripts/test installs them");
        eprintln!("skipping: docker-registry or skopeo is missing (scripts/test installs them)");
    }
    ok
}

fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Registry {
    pub fn start(setup: RegistrySetup) -> Registry {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        if setup.tls {
            make_tls(dir.path());
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.crt").display(),
                dir.path().join("server.key").display()
            ));
        }
        if let Some((user, pass)) = &setup.login {
            let out = run_ok(Command::new("htpasswd").args(["-Bbn", user, pass]));
            std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: thinpipe-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut registry = Registry { dir, child: None, host, setup };
        registry.serve();
        registry
    }

    fn serve(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("docker-registry (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on {} (see {})",
                self.host,
                self.dir.path().join("log").display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the registry (SIGKILL, as a crash) and starts it again on the same port and
    /// storage.
    pub fn restart(&mut self) {
        stop(&mut self.child);
        self.serve();
    }

    /// `http(s)://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.setup.tls { "https" } else { "http" }, self.host)
    }

    /// The CA that signed the registry's certificate (TLS only).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The registry process's id (benchmarks read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The registry's log (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The `--set` settings a worker needs to reach this registry (plain HTTP or the CA), and
    /// a Docker config with its login.
    pub fn worker_settings(&self) -> Vec<String> {
        let mut s = Vec::new();
        if self.setup.tls {
            s.push(format!("registry.ca_file={}", self.ca_file().display()));
        } else {
            s.push(format!("registry.plain_http={}", self.host));
        }
        s.push(format!("registry.docker_config={}", self.docker_config().display()));
        s.push("registry.retry_secs=20".to_owned());
        s
    }

    /// A Docker `config.json` holding this registry's login (empty `auths` without one).
    pub fn docker_config(&self) -> PathBuf {
        use base64::Engine as _;
        let path = self.dir.path().join("docker/config.json");
        let mut auths = serde_json::Map::new();
        if let Some((user, pass)) = &self.setup.login {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            auths.insert(self.host.clone(), serde_json::json!({ "auth": auth }));
        }
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::json!({ "auths": auths }).to_string()).unwrap();
        path
    }

    /// Pushes `<layout>:<tag>` (an OCI layout) to `<host>/<repository>`; returns the pushed
    /// manifest's digest.
    pub fn push(&self, layout: &Path, tag: &str, repository: &str) -> String {
        let digest_file = self.dir.path().join("pushed.digest");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--preserve-digests", "--digestfile"]).arg(&digest_file);
        self.skopeo_dest(&mut cmd);
        cmd.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repository}", self.host));
        run_ok(&mut cmd);
        std::fs::read_to_string(digest_file).unwrap().trim().to_owned()
    }

    /// Pushes a multi-architecture index of `images` (an OCI layout holding an index under
    /// `tag`) with all its images.
    pub fn push_all(&self, layout: &Path, tag: &str, repository: &str) -> String {
        let digest_file = self.dir.path().join("pushed.digest");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--all", "--preserve-digests", "--digestfile"]).arg(&digest_file);
        self.skopeo_dest(&mut cmd);
        cmd.arg(format!("oci:{}:{tag}", layout.display())).arg(format!("docker://{}/{repository}", self.host));
        run_ok(&mut cmd);
        std::fs::read_to_string(digest_file).unwrap().trim().to_owned()
    }

    fn skopeo_dest(&self, cmd: &mut Command) {
        if self.setup.tls {
            let certs = self.dir.path().join("skopeo-certs");
            std::fs::create_dir_all(&certs).unwrap();
            std::fs::copy(self.ca_file(), certs.join("ca.crt")).unwrap();
            cmd.arg("--dest-cert-dir").arg(certs);
        } else {
            cmd.arg("--dest-tls-verify=false");
        }
        if let Some((user, pass)) = &self.setup.login {
            cmd.arg("--dest-creds").arg(format!("{user}:{pass}"));
        }
    }

    /// Signs `digest` in `repository` the way `cosign sign --key` does: uploads the
    /// simple-signing payload, signed by `key`, and the signature manifest under the tag
    /// `sha256-<hex>.sig`, through the Distribution API (plain HTTP, no login).
    pub fn cosign_sign(&self, repository: &str, digest: &str, key: &p256::ecdsa::SigningKey) {
        use crate::image::signature;
        let digest = crate::image::Digest::parse(digest).expect("a sha256 digest");
        let payload = signature::simple_signing_payload(&format!("{}/{repository}", self.host), &digest);
        let config = br#"{"architecture":"","config":{},"created":"0001-01-01T00:00:00Z","history":[{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let client = reqwest::blocking::Client::new();
        for blob in [&payload[..], &config[..]] {
            let d = crate::image::Digest::of_bytes(blob);
            // An upload session, then its one PUT with the whole blob.
            let r = client.post(format!("{}/v2/{repository}/blobs/uploads/", self.url())).send().unwrap();
            assert!(r.status().is_success(), "starting an upload: {}", r.status());
            let location = r.headers()["location"].to_str().unwrap().to_owned();
            let location = if location.starts_with("http") { location } else { format!("{}{location}", self.url()) };
            let sep = if location.contains('?') { '&' } else { '?' };
            let r = client
                .put(format!("{location}{sep}digest={d}"))
                .header("content-type", "application/octet-stream")
                .body(blob.to_vec())
                .send()
                .unwrap();
            assert!(r.status().is_success(), "uploading {d}: {}", r.status());
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(),
                       "digest": crate::image::Digest::of_bytes(config).to_string()},
            "layers": [{"mediaType": signature::SIMPLE_SIGNING_MEDIA_TYPE, "size": payload.len(),
                        "digest": crate::image::Digest::of_bytes(&payload).to_string(),
                        "annotations": {signature::COSIGN_SIGNATURE_ANNOTATION: signature::sign(key, &payload)}}],
        });
        let url = format!("{}/v2/{repository}/manifests/{}", self.url(), signature::signature_tag(&digest));
        let r = client
            .put(url)
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(serde_json::to_vec(&manifest).unwrap())
            .send()
            .unwrap();
        let status = r.status();
        assert!(status.is_success(), "putting the signature manifest: {status}: {}", r.text().unwrap_or_default());
    }

    /// The file the registry keeps blob `digest` in (to corrupt it).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

/// SIGKILLs and reaps the registry, if it runs.
fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
        if let Err(e) = c.wait() {
            eprintln!("reaping the registry: {e}");
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed, in `dir` (openssl).
fn make_tls(dir: &Path) {
    let sh = format!(
        "set -e; cd {}; \
         openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=thinpipe-test-ca -keyout ca.key -out ca.crt 2>/dev/null; \
         openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null; \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf; \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out server.crt 2>/dev/null",
        dir.display()
    );
    run_ok(Command::new("sh").args(["-c", &sh]));
}
