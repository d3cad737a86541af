//! [`RegistryProxy`] stands in front of a test registry ([`Registry`], from the library's
//! test support) to answer with 429s, to pace blobs, to play a token-authenticated registry,
//! and to count what was asked. Stopped when dropped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
pub use thinpipe::image::testregistry::{Registry, RegistrySetup, available};

use crate::http::TestServer;

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
