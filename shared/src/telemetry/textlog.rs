//! The text log line: `TIME LEVEL job:run:step{fields}: target: message fields`. Nested
//! spans carry some fields twice (a step span repeats its run's `run_id`, so that JSON logs
//! and traces have it on every span); a person reading the text needs each once. The span
//! path is printed by name, then every field of the spans in scope, inner values winning.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Separates fields in a span's stored text, so that values with spaces split right.
const SEP: char = '\u{1f}';

/// Span fields as `key=value` joined by [`SEP`] (values as the default formatter writes them).
#[derive(Default)]
pub struct SpanFields;

impl<'w> MakeVisitor<Writer<'w>> for SpanFields {
    type Visitor = Visitor<'w>;
    fn make_visitor(&self, target: Writer<'w>) -> Self::Visitor {
        Visitor { writer: target, first: true, result: Ok(()) }
    }
}

pub struct Visitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl tracing::field::Visit for Visitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let sep = if std::mem::take(&mut self.first) { String::new() } else { SEP.to_string() };
        self.result = write!(self.writer, "{sep}{}={value:?}", field.name());
    }
}

impl VisitOutput<fmt::Result> for Visitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for Visitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// The event formatter (see the module doc).
pub struct TextLine {
    pub ansi: bool,
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let now = jiff::Timestamp::now();
        let level = meta.level();
        if self.ansi {
            let colour = match *level {
                tracing::Level::ERROR => "31",
                tracing::Level::WARN => "33",
                tracing::Level::INFO => "32",
                _ => "34",
            };
            write!(writer, "{now:.6} \x1b[{colour}m{level:>5}\x1b[0m ")?;
        } else {
            write!(writer, "{now:.6} {level:>5} ")?;
        }
        let mut names = Vec::new();
        let mut fields: Vec<(String, String)> = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                names.push(span.name());
                let ext = span.extensions();
                let Some(stored) = ext.get::<FormattedFields<N>>() else { continue };
                for pair in stored.fields.split(SEP).filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    match fields.iter_mut().find(|(k, _)| k == key) {
                        Some(slot) => slot.1 = value.to_owned(),
                        None => fields.push((key.to_owned(), value.to_owned())),
                    }
                }
            }
        }
        if !names.is_empty() {
            write!(writer, "{}", names.join(":"))?;
            if !fields.is_empty() {
                let joined: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(writer, "{{{}}}", joined.join(" "))?;
            }
            write!(writer, ": ")?;
        }
        write!(writer, "{}:", meta.target())?;
        // The event's own fields, less those a span in scope already says.
        let mut own = String::new();
        SpanFields.format_fields(Writer::new(&mut own), event)?;
        for pair in own.split(SEP).filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "message" {
                write!(writer, " {value}")?;
            } else if !fields.iter().any(|(k, v)| k == key && v == value) {
                write!(writer, " {key}={value}")?;
            }
        }
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_field_is_said_once_and_absent_options_not_at_all() {
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(SpanFields)
            .event_format(TextLine { ansi: false })
            .with_writer(move || out.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let none: Option<&str> = None;
            let job = tracing::info_span!("job", kind = "prepare", invocation_id = none, run_id = "prepare-web@abc");
            let _j = job.enter();
            let run = tracing::info_span!("run", run_id = "prepare-web@abc", workflow = "prepare");
            let _r = run.enter();
            let step = tracing::info_span!("step", run_id = "prepare-web@abc", workflow = "prepare", step = "download");
            let _s = step.enter();
            tracing::info!(run_id = "prepare-web@abc", bytes = 5, error = %"no space left", "blobs cached");
        });
        let line = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            line.contains(
                "job:run:step{kind=\"prepare\" run_id=\"prepare-web@abc\" workflow=\"prepare\" step=\"download\"}"
            ),
            "{line}"
        );
        assert_eq!(line.matches("run_id").count(), 1, "{line}");
        assert!(!line.contains("invocation_id") && !line.contains("None") && !line.contains("Some("), "{line}");
        assert!(line.trim_end().ends_with("blobs cached bytes=5 error=no space left"), "{line}");
    }
}
