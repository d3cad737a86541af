//! A real OCI registry for tests: Distribution's `docker-registry` (Debian's package) on
//! 127.0.0.1, storing under the test's temporary directory, optionally behind basic auth
//! (an htpasswd file) and TLS (a CA made here, trusted through `registry.ca_file`, never by
//! turning verification off). Images are pushed with `skopeo`. [`RegistryProxy`] stands in
//! front of one to answer with 429s, to pace blobs, and to count what was asked. Everything
//! started here is stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::http::TestServer;

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
        let host = self.host.clone();
        crate::wait_until("the registry to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&host).is_ok()
        });
    }

    /// Stops the registry (SIGKILL, as a crash) and starts it again on the same port and
    /// storage.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::kill(&mut c);
        }
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
        use thinpipe::image::signature;
        let digest = thinpipe::image::Digest::parse(digest).expect("a sha256 digest");
        let payload = signature::simple_signing_payload(&format!("{}/{repository}", self.host), &digest);
        let config = br#"{"architecture":"","config":{},"created":"0001-01-01T00:00:00Z","history":[{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let client = reqwest::blocking::Client::new();
        for blob in [&payload[..], &config[..]] {
            let d = thinpipe::image::Digest::of_bytes(blob);
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
                       "digest": thinpipe::image::Digest::of_bytes(config).to_string()},
            "layers": [{"mediaType": signature::SIMPLE_SIGNING_MEDIA_TYPE, "size": payload.len(),
                        "digest": thinpipe::image::Digest::of_bytes(&payload).to_string(),
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

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::kill(&mut c);
        }
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

/// What the proxy does to requests.
struct Shared {
    upstream: String,
    client: reqwest::Client,
    /// Answer this many requests (from the first) with 429 and `Retry-After: <secs>`.
    throttle: AtomicUsize,
    retry_after_secs: u64,
    throttled: AtomicUsize,
    /// Blob bodies are sent at most this many bytes per 10 ms (0: as fast as they come).
    blob_pace: AtomicU64,
    /// Every request's path and `Range`, in order.
    seen: Mutex<Vec<(String, Option<String>)>>,
    /// Stand in as a token-authenticated registry (Docker Hub's flow): `/v2/` wants a bearer
    /// token, which `/token` gives for this login (`None`: to anyone).
    bearer: Mutex<Option<Option<(String, String)>>>,
    /// Tokens handed out by `/token`.
    tokens: Mutex<Vec<String>>,
}

/// A proxy in front of a registry: 429 storms, paced blobs, and a log of requests.
pub struct RegistryProxy {
    /// `127.0.0.1:<port>`.
    pub host: String,
    shared: Arc<Shared>,
    _server: TestServer,
}

/// The token service of a proxy in bearer mode: a token for a right basic login.
fn token_answer(s: &Shared, req: &Request) -> Response {
    use base64::Engine as _;
    let wanted = s.bearer.lock().unwrap().clone().flatten();
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|raw| String::from_utf8(raw).ok());
    let ok = match &wanted {
        None => true,
        Some((user, pass)) => given.as_deref() == Some(format!("{user}:{pass}").as_str()),
    };
    let query = req.uri().query().unwrap_or_default();
    if !ok || !query.contains("scope=repository") || !query.contains("service=test-registry") {
        return Response::builder().status(StatusCode::UNAUTHORIZED).body(Body::empty()).unwrap();
    }
    let token = format!("tok-{}", rand::random::<u64>());
    s.tokens.lock().unwrap().push(token.clone());
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(serde_json::json!({ "token": token, "expires_in": 300 }).to_string()))
        .unwrap()
}

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let range = req.headers().get("range").and_then(|v| v.to_str().ok()).map(str::to_owned);
    s.seen.lock().unwrap().push((path.clone(), range));
    let bearer = s.bearer.lock().unwrap().is_some();
    if bearer && req.uri().path() == "/token" {
        return token_answer(&s, &req);
    }
    if bearer {
        let given =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|t| s.tokens.lock().unwrap().iter().any(|k| k == t)) {
            let host = req.headers().get("host").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(
                    "www-authenticate",
                    format!(r#"Bearer realm="http://{host}/token",service="test-registry",scope="repository:x:pull""#),
                )
                .body(Body::from(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#))
                .unwrap();
        }
    }
    if s.throttle.load(Ordering::SeqCst) > 0 {
        s.throttle.fetch_sub(1, Ordering::SeqCst);
        s.throttled.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", s.retry_after_secs.to_string())
            .header("content-type", "application/json")
            .body(Body::from(r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}"#))
            .unwrap();
    }
    let method = req.method().clone();
    let mut headers = HeaderMap::new();
    for (k, v) in req.headers() {
        // The registry behind is anonymous: the gateway's token stops here.
        if k != "host" && !(bearer && k == "authorization") {
            headers.append(k, v.clone());
        }
    }
    let body: Bytes = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap_or_default();
    let upstream = s.client.request(method, format!("{}{path}", s.upstream)).headers(headers).body(body).send().await;
    let r = match upstream {
        Ok(r) => r,
        Err(e) => return Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::from(e.to_string())).unwrap(),
    };
    let mut out = Response::builder().status(r.status());
    for (k, v) in r.headers() {
        out = out.header(k, v);
    }
    let pace = s.blob_pace.load(Ordering::SeqCst);
    if pace > 0 && path.contains("/blobs/") {
        use futures::StreamExt as _;
        // Re-chunked to `pace` bytes per 10 ms; a broken upstream breaks the response too.
        let stream = r.bytes_stream().flat_map(move |chunk| {
            let pieces: Vec<Result<Bytes, std::io::Error>> = match chunk {
                Ok(b) => (0..b.len())
                    .step_by(pace as usize)
                    .map(|i| Ok(b.slice(i..(i + pace as usize).min(b.len()))))
                    .collect(),
                Err(e) => vec![Err(std::io::Error::other(e))],
            };
            futures::stream::iter(pieces).then(|piece| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                piece
            })
        });
        return out.body(Body::from_stream(stream)).unwrap();
    }
    out.body(Body::from_stream(r.bytes_stream())).unwrap()
}

impl RegistryProxy {
    /// A plain-HTTP proxy to `upstream` (`http://127.0.0.1:<port>`).
    pub fn start(upstream: &str) -> RegistryProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::new(),
            throttle: AtomicUsize::new(0),
            retry_after_secs: 1,
            throttled: AtomicUsize::new(0),
            blob_pace: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            bearer: Mutex::new(None),
            tokens: Mutex::new(Vec::new()),
        });
        let server = TestServer::start(axum::Router::new().fallback(forward).with_state(shared.clone()));
        let host = server.endpoint.trim_start_matches("http://").to_owned();
        RegistryProxy { host, shared, _server: server }
    }

    /// Answers the next `n` requests with 429 and `Retry-After: 1`.
    pub fn throttle_next(&self, n: usize) {
        self.shared.throttle.store(n, Ordering::SeqCst);
    }

    pub fn throttled(&self) -> usize {
        self.shared.throttled.load(Ordering::SeqCst)
    }

    /// Sends blob bodies at about `bytes_per_10ms` (0: full speed).
    pub fn pace_blobs(&self, bytes_per_10ms: u64) {
        self.shared.blob_pace.store(bytes_per_10ms, Ordering::SeqCst);
    }

    /// From now on, wants a bearer token from its own `/token` (which asks for `login`, if
    /// any), as Docker Hub does.
    pub fn require_bearer(&self, login: Option<(&str, &str)>) {
        *self.shared.bearer.lock().unwrap() = Some(login.map(|(u, p)| (u.to_owned(), p.to_owned())));
    }

    /// Tokens the proxy's token service handed out.
    pub fn tokens_issued(&self) -> usize {
        self.shared.tokens.lock().unwrap().len()
    }

    /// Every request so far: its path and `Range` header.
    pub fn seen(&self) -> Vec<(String, Option<String>)> {
        self.shared.seen.lock().unwrap().clone()
    }
}
