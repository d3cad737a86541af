//! A small OTLP/HTTP receiver for tests: accepts real export requests on `/v1/traces` and
//! `/v1/metrics` (protobuf, as the Rust exporter sends them), decodes them with
//! `opentelemetry-proto`, and keeps the spans and metric names for assertions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

use crate::http::TestServer;

/// One received span, flattened.
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Metric name → the attribute sets of its data points.
    metrics: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

/// The receiver; stops when dropped.
pub struct Receiver {
    pub endpoint: String,
    received: Arc<Mutex<Received>>,
    _server: TestServer,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

async fn traces(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    let req = ExportTraceServiceRequest::decode(body).expect("a valid ExportTraceServiceRequest");
    let mut got = r.lock().unwrap();
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.spans.push(Span {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: attrs(&s.attributes),
                });
            }
        }
    }
    ""
}

async fn metrics(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let req = ExportMetricsServiceRequest::decode(body).expect("a valid ExportMetricsServiceRequest");
    let mut got = r.lock().unwrap();
    for rm in req.resource_metrics {
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let points: Vec<BTreeMap<String, String>> = match &m.data {
                    Some(Data::Sum(s)) => s.data_points.iter().map(|p| attrs(&p.attributes)).collect(),
                    Some(Data::Gauge(g)) => g.data_points.iter().map(|p| attrs(&p.attributes)).collect(),
                    Some(Data::Histogram(h)) => h.data_points.iter().map(|p| attrs(&p.attributes)).collect(),
                    _ => Vec::new(),
                };
                got.metrics.entry(m.name).or_default().extend(points);
            }
        }
    }
    ""
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Receiver {
    pub fn start() -> Receiver {
        let received: Arc<Mutex<Received>> = Arc::default();
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/metrics", post(metrics))
            .with_state(received.clone());
        let server = TestServer::start(app);
        Receiver { endpoint: server.endpoint.clone(), received, _server: server }
    }

    /// The environment that makes a thinpipe process export here, quickly.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500".into()),
        ]
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    /// The attribute sets of every data point received for metric `name`.
    pub fn metric(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.received.lock().unwrap().metrics.get(name).cloned().unwrap_or_default()
    }
}
