//! Logs, traces and metrics for the binaries.
//!
//! [`init`] installs one `tracing` subscriber: logs to stderr (`text` or `json`, filtered by
//! `RUST_LOG`) and an OpenTelemetry layer, so every span has a W3C trace context whether or
//! not it is exported. Export over OTLP/HTTP happens only when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or the per-signal `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`) is set; the standard
//! `OTEL_*` variables (service name, resource attributes, sampler, export interval) apply.
//! [`Telemetry::shutdown`] flushes what is pending: call it before the process exits.
//! The daemon also reads the same instruments in the Prometheus text format
//! ([`PrometheusMetrics`], served at the admin API's `/metrics`).
//!
//! Trace context crosses process boundaries as a `traceparent` string: `enqueue` puts it in
//! the message, the worker's job span takes it as parent, and the engine stores it with each
//! run so that a run resumed after a crash continues the trace of the job that started it.

mod textlog;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, UpDownCounter};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The attribute (SQS message attribute, run record field) carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one line per event, coloured on a terminal.
    Text,
    /// For machines: one JSON object per line, with the current span and its parents.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The installed providers; [`Telemetry::shutdown`] flushes them.
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: Option<SdkMeterProvider>,
    prometheus: Option<PrometheusMetrics>,
}

/// The process's metrics, read on demand in the Prometheus text format.
#[derive(Clone)]
pub struct PrometheusMetrics {
    registry: prometheus::Registry,
}

impl PrometheusMetrics {
    /// Every instrument's current value, in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, String> {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .map_err(|e| format!("encoding the metrics: {e}"))?;
        Ok(out)
    }
}

/// Whether metrics go out over OTLP (an endpoint is set): then values that cost a request
/// to read (queue backlogs) are read on a timer, not only when `/metrics` is scraped.
pub fn otlp_metrics_enabled() -> bool {
    endpoint_set("METRICS")
}

fn endpoint_set(signal: &str) -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    set("OTEL_EXPORTER_OTLP_ENDPOINT") || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
}

/// Sets up logging and OpenTelemetry for a process named `service` (unless
/// `OTEL_SERVICE_NAME` names it), logging in `log_format`; `default_level` applies
/// when `RUST_LOG` is unset. With `prometheus` the metrics can also be read with
/// [`Telemetry::prometheus`]. Call it outside any async runtime (the blocking HTTP client
/// of the exporter cannot be built inside one).
pub fn init(service: &str, log_format: LogFormat, default_level: &str, prometheus: bool) -> Telemetry {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    let resource = resource.build();
    let mut problems = Vec::new();
    let mut tracer = SdkTracerProvider::builder().with_resource(resource.clone());
    if endpoint_set("TRACES") {
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => tracer = tracer.with_batch_exporter(exporter),
            Err(e) => problems.push(format!("OTLP trace export is off: {e}")),
        }
    }
    let tracer = tracer.build();
    let mut meter = SdkMeterProvider::builder().with_resource(resource);
    let mut readers = 0;
    if endpoint_set("METRICS") {
        match opentelemetry_otlp::MetricExporter::builder().with_http().build() {
            Ok(exporter) => {
                meter = meter.with_periodic_exporter(exporter);
                readers += 1;
            }
            Err(e) => problems.push(format!("OTLP metric export is off: {e}")),
        }
    }
    let mut prometheus_metrics = None;
    if prometheus {
        let registry = prometheus::Registry::new();
        match opentelemetry_prometheus::exporter().with_registry(registry.clone()).build() {
            Ok(reader) => {
                meter = meter.with_reader(reader);
                prometheus_metrics = Some(PrometheusMetrics { registry });
                readers += 1;
            }
            Err(e) => problems.push(format!("the Prometheus metrics are off: {e}")),
        }
    }
    // Without a reader the instruments stay the global no-ops.
    let meter = (readers > 0).then(|| meter.build());
    if let Some(m) = &meter {
        opentelemetry::global::set_meter_provider(m.clone());
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    // Logs follow RUST_LOG; spans for traces are kept at info and above whatever the log
    // level, so a quiet command still carries and exports its trace context.
    // The OpenTelemetry SDK's own log lines (an unreachable collector: an ERROR per export)
    // are left out; an export failure is one WARN line at shutdown.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level))
        .and(tracing_subscriber::filter::filter_fn(|m| !m.target().starts_with("opentelemetry")));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer.tracer("thinpipe"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    // Colour only for a person at a terminal, and never with NO_COLOR: a log file or a
    // journal must not fill with escape codes.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer().with_writer(|| LogWriter).with_ansi(colour);
    let registry = tracing_subscriber::registry().with(otel);
    let installed = if log_format == LogFormat::Json {
        registry.with(fmt.json().with_current_span(true).with_span_list(true).with_filter(filter)).try_init()
    } else {
        let text = fmt.fmt_fields(textlog::SpanFields).event_format(textlog::TextLine { ansi: colour });
        registry.with(text.with_filter(filter)).try_init()
    };
    if let Err(e) = installed {
        eprintln!("logging was already set up: {e}");
    }
    for p in problems {
        tracing::warn!("{p}");
    }
    Telemetry { tracer, meter, prometheus: prometheus_metrics }
}

/// Log lines go to stderr, above the progress bar when one is shown (each event is one write).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        crate::progress::above_the_bar(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// How long a process's exit waits for its last traces and metrics to go out.
pub const EXPORT_BUDGET: Duration = Duration::from_millis(200);

impl Telemetry {
    /// The metrics in the Prometheus format, when [`init`] was asked for them.
    pub fn prometheus(&self) -> Option<PrometheusMetrics> {
        self.prometheus.clone()
    }

    /// Flushes pending spans and metrics and stops the exporters, waiting at most
    /// [`EXPORT_BUDGET`]: a collector that is down or does not answer delays no exit by more,
    /// and costs one WARN line. Call it outside any async runtime, after the work is done.
    pub fn shutdown(self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (tracer, meter) = (self.tracer, self.meter);
        std::thread::spawn(move || {
            let mut failed = Vec::new();
            if let Err(e) = tracer.shutdown() {
                failed.push(format!("traces: {e}"));
            }
            if let Some(m) = meter
                && let Err(e) = m.shutdown()
            {
                failed.push(format!("metrics: {e}"));
            }
            // The waiter may have given up already; then there is no one left to tell.
            let _ = tx.send(failed);
        });
        match rx.recv_timeout(EXPORT_BUDGET) {
            Ok(failed) if failed.is_empty() => {}
            Ok(failed) => {
                tracing::warn!(
                    "the OTLP collector did not take this process's telemetry ({}); it is lost",
                    failed.join("; ")
                )
            }
            Err(_) => tracing::warn!(
                "the OTLP collector did not take this process's telemetry within {} ms; it is lost",
                EXPORT_BUDGET.as_millis()
            ),
        }
    }
}

/// The W3C `traceparent` of `span`, if it has a valid trace context.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The `traceparent` of the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the remote span `traceparent` (ignored if malformed: a bad
/// header from a client must not fail a job, it only starts a new trace).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if !cx.span().span_context().is_valid() {
        tracing::debug!(traceparent, "ignoring a malformed traceparent");
        return;
    }
    if let Err(e) = span.set_parent(cx) {
        tracing::debug!(error = %e, "could not set a span's parent");
    }
}

/// The trace id of `span` as 32 hex digits, for logs and links.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The metrics the pipeline records (no-ops unless a meter provider is installed).
pub struct Metrics {
    /// Jobs handled, by `kind` and `outcome`.
    pub jobs: Counter<u64>,
    /// Step attempt durations in seconds, by `workflow`, `step` and `outcome`.
    pub step_duration: Histogram<f64>,
    /// Step attempts that will be retried, by `workflow` and `step`.
    pub retries: Counter<u64>,
    /// Runs being driven now, by `workflow`.
    pub runs_in_flight: UpDownCounter<i64>,
    /// Seconds from asking the queue for messages to receiving a non-empty batch.
    pub receive_latency: Histogram<f64>,
    /// Blob bytes downloaded from the image source.
    pub blob_bytes: Counter<u64>,
    /// File bytes the unpacker wrote into bases.
    pub layer_bytes_applied: Counter<u64>,
    /// Seconds from a prepare run's start here to its end, by `outcome` (`succeeded`,
    /// `failed`); a version found prepared already is not counted.
    pub prepare_duration: Histogram<f64>,
    /// Leases taken over from a dead holder, by `lease` kind.
    pub lease_takeovers: Counter<u64>,
    /// Old bases deleted by garbage collection.
    pub gc_bases_deleted: Counter<u64>,
    /// Cached blobs deleted by garbage collection.
    pub gc_blobs_deleted: Counter<u64>,
    /// Bytes garbage collection gave back (blob bytes, plus what the volume storage's usage fell by).
    pub gc_bytes_reclaimed: Counter<u64>,
    /// Snapshots the worker released by itself, by `why`: their activation expired (`ttl`,
    /// `max_age`), or they lost their contents (`snapshot_lost`).
    pub snapshots_expired: Counter<u64>,
    /// Jobs refused because the host is full, by `kind`.
    pub capacity_refusals: Counter<u64>,
    /// The volume storage's usage in percent when last measured, by `what` (`data`, `metadata`).
    pub capacity_used_percent: Gauge<f64>,
    /// The volume storage's used and total bytes when last measured, by `what` (`data`) and
    /// `of` (`used`, `total`).
    pub volume_bytes: Gauge<u64>,
    /// Messages in a queue the worker reads, by `queue` and `state` (`waiting`, `in_flight`),
    /// when last read (SQS: approximate, read at most once a minute).
    pub queue_messages: Gauge<u64>,
    /// Dead letters of a queue the worker reads, by `queue`, when last read.
    pub queue_dead_letters: Gauge<u64>,
    /// 1 while the worker is ready for jobs (what `/readyz` answers), else 0; read at each
    /// scrape of `/metrics`.
    pub ready: Gauge<u64>,
}

/// Bucket bounds of the duration histograms, in seconds (the SDK's defaults assume
/// milliseconds): from a sub-millisecond activation step to an hour-long prepare.
pub const SECONDS_BUCKETS: [f64; 23] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The process's instruments, created on first use from the global meter provider (so
/// after [`init`]).
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = opentelemetry::global::meter("thinpipe");
        Metrics {
            jobs: m.u64_counter("thinpipe.jobs").with_description("Jobs handled, by kind and outcome").build(),
            step_duration: m
                .f64_histogram("thinpipe.step.duration")
                .with_unit("s")
                .with_description("Step attempt durations")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            retries: m.u64_counter("thinpipe.step.retries").with_description("Step attempts to be retried").build(),
            runs_in_flight: m
                .i64_up_down_counter("thinpipe.runs.in_flight")
                .with_description("Runs being driven now")
                .build(),
            receive_latency: m
                .f64_histogram("thinpipe.queue.receive_latency")
                .with_unit("s")
                .with_description("Time from a receive call to the messages it returned")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            blob_bytes: m
                .u64_counter("thinpipe.blob.bytes_downloaded")
                .with_unit("By")
                .with_description("Blob bytes downloaded")
                .build(),
            layer_bytes_applied: m
                .u64_counter("thinpipe.layer.bytes_applied")
                .with_unit("By")
                .with_description("File bytes the unpacker wrote into bases")
                .build(),
            prepare_duration: m
                .f64_histogram("thinpipe.prepare.duration")
                .with_unit("s")
                .with_description("Prepare runs, from their start here to their end")
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build(),
            gc_bases_deleted: m
                .u64_counter("thinpipe.gc.bases_deleted")
                .with_description("Old bases deleted by garbage collection")
                .build(),
            gc_blobs_deleted: m
                .u64_counter("thinpipe.gc.blobs_deleted")
                .with_description("Cached blobs deleted by garbage collection")
                .build(),
            gc_bytes_reclaimed: m
                .u64_counter("thinpipe.gc.bytes_reclaimed")
                .with_unit("By")
                .with_description("Bytes garbage collection gave back")
                .build(),
            snapshots_expired: m
                .u64_counter("thinpipe.snapshots.expired")
                .with_description("Snapshots the worker released by itself (expired, or lost their contents)")
                .build(),
            capacity_refusals: m
                .u64_counter("thinpipe.capacity.refusals")
                .with_description("Jobs refused because the host is full")
                .build(),
            capacity_used_percent: m
                .f64_gauge("thinpipe.capacity.used")
                .with_unit("%")
                .with_description("Volume storage used, in percent, when last measured")
                .build(),
            volume_bytes: m
                .u64_gauge("thinpipe.volume.storage")
                .with_unit("By")
                .with_description("Volume storage used and total, in bytes, when last measured")
                .build(),
            queue_messages: m
                .u64_gauge("thinpipe.queue.messages")
                .with_description("Messages waiting or in flight in a queue the worker reads, when last read")
                .build(),
            queue_dead_letters: m
                .u64_gauge("thinpipe.queue.dead_letters")
                .with_description("Dead letters of a queue the worker reads, when last read")
                .build(),
            ready: m.u64_gauge("thinpipe.ready").with_description("1 while the worker is ready for jobs").build(),
            lease_takeovers: m
                .u64_counter("thinpipe.lease.takeovers")
                .with_description("Leases taken over from a holder that is gone")
                .build(),
        }
    })
}

/// Shorthand for metric attributes.
pub fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_a_span() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let span = tracing::info_span!("job");
            set_parent(&span, parent);
            assert_eq!(trace_id_of(&span).as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
            let child = span.in_scope(|| tracing::info_span!("run"));
            let tp = traceparent_of(&child).unwrap();
            assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{tp}");
            assert!(!tp.contains("b7ad6b7169203331"), "the child has its own span id: {tp}");

            let fresh = tracing::info_span!("other");
            set_parent(&fresh, "garbage");
            assert_ne!(trace_id_of(&fresh).as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        });
    }
}
