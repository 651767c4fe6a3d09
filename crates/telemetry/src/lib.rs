//! Logs and traces of a process, set up once.
//!
//! Owns: the process's tracing subscriber ([`init`]: log lines on stderr as text or JSON, and
//! the OpenTelemetry layer that gives every span a trace context), the OTLP export that the
//! standard `OTEL_*` variables turn on and its flush at exit ([`Telemetry`]), and the one
//! translation between a message's W3C `traceparent` and a span's context ([`follow`],
//! [`traceparent`]), so that the spans of one request form one tree across processes.
//! Must not touch: which spans exist or what they say; each component opens its own.
//!
//! Every span gets a trace context whether or not anything is exported: the `traceparent` of
//! every message, and so the trace id in logs and in `GET /workflows/{id}`, is the span's own.
//! Only with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set are
//! spans sent, over OTLP/HTTP with protobuf bodies, in batches (`OTEL_BSP_*`).

use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::str::FromStr;

use baton_protocol::TraceParent;
use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, filter_fn};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One line of text per event, its spans' fields before it.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields`, `span` and `spans`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{s}` is not a log format; write text or json")),
        }
    }
}

/// The export, while the process runs: dropping it sends the spans still waiting. Hold it in
/// `main`, and drop it outside any async runtime (the export's HTTP client blocks).
#[must_use = "dropping it stops the export"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if self.exporting {
            // A collector that is gone costs the export timeout at most; nothing to report.
            let _ = self.provider.shutdown();
        }
    }
}

/// Set up logging and tracing for this process: log lines filtered by `filter` (an
/// `EnvFilter` directive, already checked) on stderr, colour only when stderr is a terminal;
/// every span at INFO or above recorded for its trace context; spans exported when the
/// `OTEL_*` variables say where, as `service` unless `OTEL_SERVICE_NAME` names it. A second
/// call leaves the first subscriber in place.
pub fn init(filter: &str, format: LogFormat, service: &str) -> Telemetry {
    let (provider, exporting) = provider(service);
    let tracer = provider.tracer("baton");
    // Spans whatever the log filter, so that `--log warn` keeps the traces whole; events only
    // when they say something went wrong. Nothing here reads `Context::current()` (a hop's
    // context is taken from its span), and a span's busy and idle times are not worth a clock
    // read at every poll of every instrumented future: entering a span costs nothing.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_filter(
            filter_fn(|m| if m.is_span() { *m.level() <= Level::INFO } else { *m.level() <= Level::WARN })
                // Said, so that a DEBUG call site (and a `log` record of a library, such as
                // tokio-postgres' at every statement) is skipped where it stands unless the
                // log filter asks for it, instead of built and offered to every layer.
                .with_max_level_hint(LevelFilter::INFO),
        );
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    // A failed write is not reported: its default `eprintln!` panics when stderr is a closed
    // pipe (EPIPE), which used to kill the signal task.
    let fmt = match format {
        LogFormat::Text if ansi => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .with_target(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .fmt_fields(PlainFields)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .log_internal_errors(false)
            .with_target(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .with_target(false)
            .with_filter(filter)
            .boxed(),
    };
    let _ = Registry::default().with(fmt).with(otel).try_init();
    Telemetry { provider, exporting }
}

/// The fields of log lines without colour: what the default formatter writes with its styles
/// off, written directly. Every span's fields are formatted as it opens, in case a log line
/// comes from inside it, and the default formatter's styling (a no-op without colour, still
/// three `Display`s a field) was half of that cost on every hop.
struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes `name=value` pairs, space-separated; an event's message bare and with terminal
/// control characters escaped, as the default formatter does; the `log.*` metadata of a
/// `log` record skipped (the line shows it already).
struct PlainVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else if !needs_escape(value) {
            // What `{value:?}` writes for a string it has nothing to escape in, without its
            // check of every character: the ids and names of every span's fields.
            self.write(Some(field.name()), |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            })
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error and its sources, escaped like a message: their text may quote a client's.
        let mut text = String::new();
        let _ = write!(Escaped(&mut text), "{value}");
        if let Some(first) = value.source() {
            let _ = write!(text, " {}.sources=[", field.name());
            let mut source = Some(first);
            while let Some(s) = source {
                let _ = write!(Escaped(&mut text), "{s}");
                source = s.source();
                text.push_str(if source.is_some() { ", " } else { "]" });
            }
        }
        self.record_debug(field, &format_args!("{text}"))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.write(None, |w| write!(Escaped(w), "{value:?}")),
            name => self.write(Some(name), |w| write!(w, "{value:?}")),
        }
    }
}

impl<'w> PlainVisitor<'w> {
    /// The separator, then `name=` (none for the message), then what `value` writes: written
    /// as they are, not through a format string.
    fn write(&mut self, name: Option<&str>, value: impl FnOnce(&mut Writer<'w>) -> fmt::Result) {
        if self.result.is_err() || name.is_some_and(|n| n.starts_with("log.")) {
            return;
        }
        let space = if std::mem::take(&mut self.first) { "" } else { " " };
        let w = &mut self.writer;
        self.result = (|| {
            w.write_str(space)?;
            if let Some(name) = name {
                w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
                w.write_char('=')?;
            }
            value(w)
        })();
    }
}

/// Whether `{s:?}` would write anything but `s` between quotes: any byte outside printable
/// ASCII, a quote or a backslash. Every byte is looked at, with no early exit, so that the
/// loop runs on vectors: span fields are short and almost never need it.
fn needs_escape(s: &str) -> bool {
    s.bytes().fold(false, |found, b| found | !(b' '..=b'~').contains(&b) | (b == b'"') | (b == b'\\'))
}

/// Escapes the characters a terminal reads as control sequences (ESC, BEL, BS, FF, DEL, C1),
/// so that a message quoting what a client sent cannot rewrite the operator's screen.
struct Escaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let control = |c: char| matches!(c, '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}');
        let mut rest = s;
        while let Some(at) = rest.find(control) {
            let c = rest[at..].chars().next().expect("a character was found there");
            self.0.write_str(&rest[..at])?;
            match c as u32 {
                n @ 0x80..=0x9f => write!(self.0, "\\u{{{n:x}}}")?,
                n => write!(self.0, "\\x{n:02x}")?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// The tracer provider: with a batch exporter when the environment names a collector.
fn provider(service: &str) -> (SdkTracerProvider, bool) {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_owned());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    if !export_asked() {
        return (builder.build(), false);
    }
    match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(exporter) => (builder.with_batch_exporter(exporter).build(), true),
        Err(e) => {
            // Before the subscriber exists: said on stderr, and the process runs without it.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "warning: traces are not exported: {e}");
            (builder.build(), false)
        }
    }
}

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// Whether the environment asks for an export: a collector's address, and no
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
fn export_asked() -> bool {
    let is = |var: &str, value: &str| std::env::var(var).is_ok_and(|v| v.eq_ignore_ascii_case(value));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The span context a `traceparent` names, if it is well formed (version 00 or a later one,
/// 32 and 16 lowercase hex digits, neither all zeros, two hex digits of flags).
pub fn span_context(tp: &TraceParent) -> Option<SpanContext> {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = tp.0.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    let cx = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        flags,
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Make the hop `parent` names the parent of `span`, a span opened for what a message or a
/// request asks, before it is first entered. A malformed `parent` leaves `span` a root.
pub fn follow(span: &Span, parent: &TraceParent) {
    if let Some(cx) = span_context(parent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(cx));
    }
}

/// The `traceparent` of `span`, for a message sent from within it: `None` when no trace
/// layer records it (no [`init`] in this process, or a span filtered out).
pub fn traceparent_of(span: &Span) -> Option<TraceParent> {
    let cx = span.context();
    let hop = cx.span();
    let sc = hop.span_context();
    sc.is_valid().then(|| {
        TraceParent::new(sc.trace_id().to_bytes(), sc.span_id().to_bytes(), sc.trace_flags().to_u8())
    })
}

/// The `traceparent` for a message sent from the current span, or `fallback()` when no
/// trace layer records one.
pub fn traceparent(fallback: impl FnOnce() -> TraceParent) -> TraceParent {
    traceparent_of(&Span::current()).unwrap_or_else(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(s: &str) -> TraceParent {
        TraceParent(s.into())
    }

    #[test]
    fn a_well_formed_traceparent_names_its_trace_and_hop() {
        let cx = span_context(&tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).unwrap();
        assert_eq!(cx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        let root = TraceParent::new_root();
        assert_eq!(span_context(&root).unwrap().trace_id().to_string(), root.trace_id());
    }

    #[test]
    fn a_malformed_traceparent_names_nothing() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(span_context(&tp(bad)).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_span_follows_its_parent_and_passes_its_own_hop_on() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            Registry::default().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
            let span = tracing::info_span!("consume");
            follow(&span, &parent);
            let own = span.in_scope(|| traceparent(TraceParent::new_root));
            assert_eq!(own.trace_id(), parent.trace_id());
            assert_ne!(own, parent);
            assert_eq!(span_context(&own).map(|c| c.is_valid()), Some(true));
        });
        assert_eq!(traceparent_of(&tracing::info_span!("unrecorded")), None);
    }

    /// What a layer wrote, for the test to read.
    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug)]
    struct Failed(&'static str, Option<Box<Failed>>);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn plain_fields_write_what_the_default_formatter_writes_without_colour() {
        let (default, plain) = (Lines::default(), Lines::default());
        let (d, p) = (default.clone(), plain.clone());
        let subscriber = Registry::default()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .without_time()
                    .with_writer(move || d.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(PlainFields)
                    .with_ansi(false)
                    .without_time()
                    .with_writer(move || p.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            let id = "0190a3c4-1b2c-7d3e-8f40-5a6b7c8d9e0f";
            let span = tracing::info_span!("handle", saga_id = %id, step = "records", attempt = 2u32, r#type = ?Some(1), later = tracing::field::Empty, otel.name = "handle records.create", quoted = "say \"hi\" it's a\\b", tab = "a\tb", accented = "café ☕", bell = "\x07", empty = "", edge = " ~");
            let _in = span.enter();
            span.record("later", true);
            let chained = Failed(
                "the commit failed",
                Some(Box::new(Failed("disk \x1b full", Some(Box::new(Failed("ENOSPC", None)))))),
            );
            tracing::warn!(
                why = &chained as &dyn std::error::Error,
                n = -3i64,
                "stopped: {}",
                "a \x1b[31mred\x07 \u{9b} word"
            );
            tracing::warn!(why = &Failed("alone \u{85}", None) as &dyn std::error::Error, "no sources");
            tracing::warn!(message = "a \x1b message given as a str", kind = "x");
        });
        let (default, plain) = (default.0.lock().unwrap().clone(), plain.0.lock().unwrap().clone());
        let (default, plain) = (String::from_utf8(default).unwrap(), String::from_utf8(plain).unwrap());
        assert_eq!(plain, default);
        assert!(plain.contains("\\x1b[31mred\\x07 \\u{9b} word"), "control characters escaped: {plain}");
        assert!(plain.contains("why.sources=[disk \\x1b full, ENOSPC]"), "{plain}");
        assert_eq!(plain.lines().count(), 3, "{plain}");
    }

    #[test]
    fn a_string_left_unescaped_is_one_debug_writes_as_it_is() {
        let mut samples: Vec<String> = (0u8..=0x7f).map(|b| format!("id-{}-x", b as char)).collect();
        samples.extend(
            ["", " ~", "0190a3c4-1b2c-7d3e-8f40-5a6b7c8d9e0f", "a'b", "café", "\u{85}"].map(String::from),
        );
        for s in samples {
            let plain = format!("{s:?}") == format!("\"{s}\"");
            if s.is_ascii() {
                assert_eq!(needs_escape(&s), !plain, "{s:?}");
            } else {
                // Beyond ASCII, Debug's own tables decide: the slow path, whatever it writes.
                assert!(needs_escape(&s), "{s:?}");
            }
        }
    }

    #[test]
    fn log_formats_are_named_text_and_json() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("text or json"));
    }
}
