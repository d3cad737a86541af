//! The worker's admin HTTP API and the run inspector page, served by the daemon. What it
//! answers is typed in `thinpipe::admin::wire`; clients read it through `thinpipe::admin::client`.
//!
//! Bound to loopback unless `admin.allow_public` is set, which also requires `admin.token`
//! (sent as `Authorization: Bearer <token>`). With a token every endpoint but `/healthz` and
//! the page's static files requires it.
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: store, queue and volume backend usable, not draining, and the host not
//!   full (503 otherwise, with the reasons, e.g. "host full: pool data 96% used (limit 95%)").
//! - `GET /metrics`: the worker's metrics in the Prometheus text format (the instruments that
//!   go out over OTLP, the queues' backlog and dead letters, volume storage, readiness).
//! - `POST /drain`: stop taking jobs; `GET /drain`: whether draining, and jobs in flight.
//! - `GET /api/runs?workflow=&status=&limit=`, `GET /api/runs/{id}`, `GET /api/workflows`.
//! - `GET /api/progress`: the steps running now, with bytes done and total for those that
//!   move bytes (what `enqueue --wait` draws on a terminal).
//! - `GET /api/images`: families, their versions and live snapshots, storage usage (what
//!   `worker images --json` prints); `POST /api/gc?dry_run=true|false`: one garbage
//!   collection pass now, its report.
//! - `GET /`: the inspector page (assets embedded in the binary).
//!
//! The server stops when the worker's shutdown token fires.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use thinpipe::admin::{ADDR_FILE, wire};
use thinpipe::fsm::{RunFilter, RunStatus};
use thinpipe::telemetry::{self, PrometheusMetrics};
use tokio_util::sync::CancellationToken;

use crate::daemon::jobloop::JobLoop;
use crate::host::Host;

const INDEX_HTML: &str = include_str!("assets/index.html");
const INSPECTOR_JS: &str = include_str!("assets/inspector.js");
const INSPECTOR_CSS: &str = include_str!("assets/inspector.css");

#[derive(Clone)]
struct Admin {
    host: Arc<Host>,
    jobs: Arc<JobLoop>,
    prometheus: Option<PrometheusMetrics>,
    token: Option<String>,
}

/// Binds the admin API and serves it until `shutdown` fires. Returns the bound address.
/// `/metrics` answers 404 without `prometheus`.
pub async fn serve(
    host: Arc<Host>,
    jobs: Arc<JobLoop>,
    prometheus: Option<PrometheusMetrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let cfg = &host.config.admin;
    let addr = cfg.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("admin.listen {addr}: cannot listen (in use? set admin.listen to another address)"))?;
    let bound = listener.local_addr().context("the admin listener's address")?;
    let addr_file = host.config.state_dir.join(ADDR_FILE);
    // Written whole then renamed, so a reader never sees a half-written address.
    let tmp = addr_file.with_extension("addr.tmp");
    std::fs::write(&tmp, format!("http://{bound}\n")).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &addr_file)
        .with_context(|| format!("renaming {} to {}", tmp.display(), addr_file.display()))?;
    let token = (!cfg.token.is_empty()).then(|| cfg.token.clone());
    let app = router(Admin { host, jobs, prometheus, token });
    let server = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the admin API stopped");
        }
    });
    tracing::info!(address = %format!("http://{bound}"), "admin API and inspector listening");
    Ok((bound, server))
}

fn router(admin: Admin) -> Router {
    let api = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/drain", get(drain_status).post(drain))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(run_detail))
        .route("/api/workflows", get(workflows))
        .route("/api/progress", get(progress))
        .route("/api/images", get(images))
        .route("/api/gc", axum::routing::post(gc))
        .route("/api/info", get(info))
        .layer(axum::middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok", "version": env!("THINPIPE_VERSION")})) }))
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML) }))
        .route(
            "/inspector.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], INSPECTOR_JS) }),
        )
        .route("/inspector.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], INSPECTOR_CSS) }))
        .merge(api)
        .with_state(admin)
}

async fn require_token(State(admin): State<Admin>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if let Some(token) = &admin.token {
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer <admin.token>)");
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let reasons = not_ready_because(&admin).await;
    let ready = reasons.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let backend = &admin.host.backend_choice;
    (status, Json(json!({"ready": ready, "reasons": reasons, "backend": backend}))).into_response()
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let Some(prometheus) = &admin.prometheus else {
        return error(StatusCode::NOT_FOUND, "this process does not collect metrics for Prometheus");
    };
    // What costs a call to read is read now (each queue no more often than it allows);
    // readiness also measures the volume storage (at most every few seconds).
    admin.jobs.backlog().refresh().await;
    let ready = not_ready_because(&admin).await.is_empty();
    telemetry::metrics().ready.record(u64::from(ready), &[]);
    match prometheus.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Why the worker should not get jobs now (empty: ready).
async fn not_ready_because(admin: &Admin) -> Vec<String> {
    let mut reasons = Vec::new();
    if admin.jobs.is_draining() {
        reasons.push("draining".to_owned());
    }
    if admin.jobs.queue_failing() {
        reasons.push("the job queue cannot be reached (its last receive failed)".to_owned());
    }
    let host = admin.host.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let mut reasons = Vec::new();
        if let Err(e) = host.store.image("readyz-probe") {
            reasons.push(format!("host database: {e}"));
        }
        if let Err(e) = host.pipeline.context().backend.list() {
            reasons.push(format!("volume backend: {e}"));
        }
        reasons
    })
    .await;
    match checks {
        Ok(r) => reasons.extend(r),
        Err(e) => reasons.push(format!("readiness check failed: {e}")),
    }
    if admin.host.lease_lost.is_cancelled() {
        reasons.push("the worker lease was lost".to_owned());
    }
    if let Some(fault) = admin.host.engine.storage_fault() {
        reasons.push(format!("{fault}; the worker restarts to open it again"));
    }
    if let Some(short) = admin.jobs.state_space().shortage() {
        reasons.push(short);
    }
    if let Some(full) = admin.host.lifecycle.full().await {
        reasons.push(full);
    }
    reasons
}

fn drain_body(admin: &Admin) -> serde_json::Value {
    json!({"draining": admin.jobs.is_draining(), "in_flight": admin.jobs.in_flight()})
}

async fn drain(State(admin): State<Admin>) -> Response {
    admin.jobs.drain();
    (StatusCode::ACCEPTED, Json(drain_body(&admin))).into_response()
}

async fn drain_status(State(admin): State<Admin>) -> Response {
    Json(drain_body(&admin)).into_response()
}

#[derive(Deserialize)]
struct RunsQuery {
    workflow: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(State(admin): State<Admin>, Query(q): Query<RunsQuery>) -> Response {
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match serde_json::from_value::<RunStatus>(json!(s)) {
            Ok(s) => Some(s),
            Err(_) => {
                return error(StatusCode::BAD_REQUEST, format!("status {s:?}: expected active, completed or failed"));
            }
        },
    };
    let filter = RunFilter {
        workflow: q.workflow.filter(|w| !w.is_empty()),
        status,
        limit: Some(q.limit.unwrap_or(100).min(10_000)),
    };
    let engine = admin.host.engine.clone();
    match tokio::task::spawn_blocking(move || engine.list_runs(&filter)).await {
        Ok(Ok(runs)) => Json(runs.into_iter().map(wire::RunLine::from).collect::<Vec<_>>()).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run_detail(State(admin): State<Admin>, Path(id): Path<String>) -> Response {
    let engine = admin.host.engine.clone();
    let lookup = id.clone();
    match tokio::task::spawn_blocking(move || engine.run_detail(&lookup)).await {
        Ok(Ok(Some(run))) => Json(wire::RunView::new(run, &admin.host.config.worker.host_id)).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no run {id}")),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn progress(State(admin): State<Admin>) -> Response {
    let running = admin.host.pipeline.context().progress.current();
    Json(running.into_iter().map(wire::StepProgress::from).collect::<Vec<_>>()).into_response()
}

async fn workflows(State(admin): State<Admin>) -> Response {
    Json(admin.host.engine.workflows().into_iter().map(wire::Workflow::from).collect::<Vec<_>>()).into_response()
}

async fn images(State(admin): State<Admin>) -> Response {
    let usage = admin.host.lifecycle.usage().await.map_err(|e| e.to_string());
    let host = admin.host.clone();
    let gathered = tokio::task::spawn_blocking(move || {
        let ctx = host.pipeline.context();
        let mut images = wire::Images::gather(&host.store, &ctx.cache, usage, host.config.watermarks())?;
        images.backend = Some(host.backend_choice.clone());
        Ok::<_, wire::ImagesError>(images)
    })
    .await;
    match gathered {
        Ok(Ok(images)) => Json(images).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct GcQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn gc(State(admin): State<Admin>, Query(q): Query<GcQuery>) -> Response {
    match admin.host.lifecycle.collect(q.dry_run).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn info(State(admin): State<Admin>) -> Response {
    Json(json!({
        "version": env!("THINPIPE_VERSION"),
        "state_dir": admin.host.config.state_dir,
        "host_id": admin.host.config.worker.host_id,
        "host_queue": admin.host.config.worker.host_queue_url,
        "trace_url": admin.host.config.admin.trace_url,
    }))
    .into_response()
}
