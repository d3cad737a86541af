//! A proxy in front of a server (moto) that answers the first `failures` requests whose
//! path contains `needle` with `503 SlowDown`, the way S3 answers when it is overloaded (or
//! every such request with `403 AccessDenied`, as S3 answers credentials without the right
//! permissions), and forwards everything else unchanged; it counts the requests it saw for
//! the needle (with no failures, a request counter). Stops when dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::http::TestServer;

struct Shared {
    upstream: String,
    needle: String,
    failures: usize,
    failed: AtomicUsize,
    status: StatusCode,
    client: reqwest::Client,
}

pub struct FlakyProxy {
    pub endpoint: String,
    shared: Arc<Shared>,
    _server: TestServer,
}

async fn forward(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    if req.uri().path().contains(&s.needle) && s.failed.fetch_add(1, Ordering::SeqCst) < s.failures {
        let body = if s.status == StatusCode::FORBIDDEN {
            "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        } else {
            "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        };
        return Response::builder().status(s.status).body(Body::from(body)).unwrap();
    }
    let method = req.method().clone();
    let mut headers = HeaderMap::new();
    for (k, v) in req.headers() {
        if k != "host" {
            headers.insert(k, v.clone());
        }
    }
    let body: Bytes = axum::body::to_bytes(req.into_body(), usize::MAX).await.unwrap_or_default();
    let upstream = s.client.request(method, format!("{}{path}", s.upstream)).headers(headers).body(body).send().await;
    match upstream {
        Ok(r) => {
            let mut out = Response::builder().status(r.status());
            for (k, v) in r.headers() {
                out = out.header(k, v);
            }
            out.body(Body::from(r.bytes().await.unwrap_or_default())).unwrap()
        }
        Err(e) => Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::from(e.to_string())).unwrap(),
    }
}

impl FlakyProxy {
    pub fn start(upstream: &str, needle: &str, failures: usize) -> FlakyProxy {
        Self::answering(upstream, needle, failures, StatusCode::SERVICE_UNAVAILABLE)
    }

    /// Answers every request for `needle` with `403 AccessDenied`.
    pub fn denying(upstream: &str, needle: &str) -> FlakyProxy {
        Self::answering(upstream, needle, usize::MAX, StatusCode::FORBIDDEN)
    }

    fn answering(upstream: &str, needle: &str, failures: usize, status: StatusCode) -> FlakyProxy {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            needle: needle.to_owned(),
            failures,
            failed: AtomicUsize::new(0),
            status,
            client: reqwest::Client::new(),
        });
        let server = TestServer::start(axum::Router::new().fallback(forward).with_state(shared.clone()));
        FlakyProxy { endpoint: server.endpoint.clone(), shared, _server: server }
    }

    /// Errors answered so far.
    pub fn errors_served(&self) -> usize {
        self.shared.failed.load(Ordering::SeqCst).min(self.shared.failures)
    }

    /// Requests whose path contained the needle so far (answered or forwarded): with no
    /// failures, a request counter.
    pub fn matching_requests(&self) -> usize {
        self.shared.failed.load(Ordering::SeqCst)
    }
}
