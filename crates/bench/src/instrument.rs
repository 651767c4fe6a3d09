//! What metrics and tracing cost: workflow mode run with each [`Instrumentation`], twice, in
//! mirrored order (off, metrics, traced, traced, metrics, off), so that a machine that speeds
//! up or slows down during the bench weighs on every variant alike.
//!
//! Traces go to an OTLP/HTTP sink in this process ([`Sink`]), which takes every export and
//! counts its bytes: the spans are built, encoded and sent as to a real collector, and the row
//! shows that they were.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use baton_protocol::Mode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{Options, Say, Throughput, sagas};

/// How the components are instrumented in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Instrumentation {
    /// No recorder anywhere (the gateway with `--no-metrics`), no traces.
    Off,
    /// Every component records metrics and serves them (`--metrics 127.0.0.1:0`).
    Metrics,
    /// Metrics, and every span exported over OTLP/HTTP (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    Traced,
}

impl Instrumentation {
    /// The runs, in mirrored order.
    pub const ORDER: [Instrumentation; 6] = [
        Instrumentation::Off,
        Instrumentation::Metrics,
        Instrumentation::Traced,
        Instrumentation::Traced,
        Instrumentation::Metrics,
        Instrumentation::Off,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Instrumentation::Off => "off",
            Instrumentation::Metrics => "metrics",
            Instrumentation::Traced => "metrics + traces exported",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Instrumentation::Off => "off",
            Instrumentation::Metrics => "metrics",
            Instrumentation::Traced => "traced",
        }
    }

    /// `opts` changed to run this way, into `out`, with spans sent to `sink`.
    fn apply(self, opts: &Options, sink: &Sink, round: usize) -> Options {
        let mut run = Options {
            windows: opts.windows.iter().take(1).copied().collect(),
            prefill: 0,
            out_dir: opts.out_dir.join(format!("instrument-{round}-{}", self.slug())),
            // Reading the stages would give every process a recorder: not off.
            stages: false,
            read_metrics: false,
            ..opts.clone()
        };
        match self {
            Instrumentation::Off => run.gateway_args.push("--no-metrics".into()),
            Instrumentation::Metrics | Instrumentation::Traced => {
                run.component_args.extend(["--metrics".into(), "127.0.0.1:0".into()])
            }
        }
        if self == Instrumentation::Traced {
            run.component_env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), sink.endpoint.clone()));
        }
        run
    }
}

/// One instrumentation's figures, the mean of its runs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstrumentRow {
    pub instrumentation: Instrumentation,
    pub runs: usize,
    /// HTTP p50, one at a time.
    pub p50_ms: f64,
    /// Sagas per second with the first window in flight.
    pub sagas_per_second: f64,
    /// The components' CPU per saga in that loaded run.
    pub cpu_ms_per_saga: f64,
    /// `sagas_per_second` over the same of the runs without instrumentation (target: at least
    /// 0.95).
    pub of_off: f64,
    /// Bytes of OTLP exports the sink took during these runs (0 when nothing is traced).
    pub exported_bytes: u64,
}

/// Run workflow mode with each instrumentation, and compare.
pub(crate) async fn measure(opts: &Options, steps: usize, say: &Say) -> anyhow::Result<Vec<InstrumentRow>> {
    for var in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] {
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            bail!(
                "--instrumentation sets where traces go itself, and {var} is set: unset it, or \
                 every run would be traced"
            );
        }
    }
    let sink = Sink::start().await?;
    let mut runs = Vec::new();
    for (round, &how) in Instrumentation::ORDER.iter().enumerate() {
        say(&format!(
            "instrumentation {}/{}: workflow mode, {}",
            round + 1,
            Instrumentation::ORDER.len(),
            how.label()
        ));
        let before = sink.bytes();
        let m = sagas::run_mode(&how.apply(opts, &sink, round), Mode::Workflow, steps, say).await?;
        let loaded = m.http_loaded.first().cloned().unwrap_or_default();
        runs.push(Run { how, p50_ms: m.http_sequential.p50_ms, loaded, bytes: sink.bytes() - before });
    }
    sink.stop();
    Ok(rows(&runs))
}

/// What one run measured.
struct Run {
    how: Instrumentation,
    p50_ms: f64,
    loaded: Throughput,
    bytes: u64,
}

/// The mean of each instrumentation's runs, and its throughput over that of the runs without.
fn rows(runs: &[Run]) -> Vec<InstrumentRow> {
    let mean = |how: Instrumentation, f: &dyn Fn(&Run) -> f64| {
        let of: Vec<f64> = runs.iter().filter(|r| r.how == how).map(f).collect();
        of.iter().sum::<f64>() / of.len().max(1) as f64
    };
    let off = mean(Instrumentation::Off, &|r| r.loaded.per_second);
    [Instrumentation::Off, Instrumentation::Metrics, Instrumentation::Traced]
        .into_iter()
        .map(|how| {
            let sagas_per_second = mean(how, &|r| r.loaded.per_second);
            InstrumentRow {
                instrumentation: how,
                runs: runs.iter().filter(|r| r.how == how).count(),
                p50_ms: mean(how, &|r| r.p50_ms),
                sagas_per_second,
                cpu_ms_per_saga: mean(how, &|r| r.loaded.cpu_ms_per_op),
                of_off: if off > 0.0 { sagas_per_second / off } else { 0.0 },
                exported_bytes: runs.iter().filter(|r| r.how == how).map(|r| r.bytes).sum(),
            }
        })
        .collect()
}

/// An OTLP/HTTP receiver that takes every trace export and counts its bytes.
struct Sink {
    endpoint: String,
    bytes: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Sink {
    async fn start() -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the OTLP sink")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let bytes = Arc::new(AtomicU64::new(0));
        let app = Router::new()
            .route(
                "/v1/traces",
                post(|State(bytes): State<Arc<AtomicU64>>, body: Bytes| async move {
                    bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    // An empty ExportTraceServiceResponse: everything accepted.
                    ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Bytes::new())
                }),
            )
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::clone(&bytes));
        let cancel = CancellationToken::new();
        let stop = cancel.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::warn!(error = %e, "the bench's OTLP sink stopped");
            }
        });
        Ok(Sink { endpoint, bytes, cancel })
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(how: Instrumentation, per_second: f64, bytes: u64) -> Run {
        let loaded = Throughput { per_second, cpu_ms_per_op: 2.0, ..Throughput::default() };
        Run { how, p50_ms: 10.0, loaded, bytes }
    }

    #[test]
    fn each_row_is_the_mean_of_its_runs_over_the_runs_without() {
        let runs = [
            run(Instrumentation::Off, 100.0, 0),
            run(Instrumentation::Metrics, 97.0, 0),
            run(Instrumentation::Traced, 90.0, 500),
            run(Instrumentation::Traced, 94.0, 700),
            run(Instrumentation::Metrics, 95.0, 0),
            run(Instrumentation::Off, 102.0, 0),
        ];
        let rows = rows(&runs);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].sagas_per_second, rows[0].of_off), (101.0, 1.0));
        assert_eq!(rows[1].sagas_per_second, 96.0);
        assert!((rows[1].of_off - 96.0 / 101.0).abs() < 1e-9);
        assert_eq!((rows[2].sagas_per_second, rows[2].exported_bytes, rows[2].runs), (92.0, 1200, 2));
    }

    #[test]
    fn off_is_the_gateway_without_metrics_and_traced_sends_spans_to_the_sink() {
        let sink = Sink {
            endpoint: "http://127.0.0.1:9".into(),
            bytes: Arc::default(),
            cancel: CancellationToken::new(),
        };
        let opts = Options::new(
            "baton".into(),
            "amqp://x".into(),
            baton_mgmt::Mgmt::new("http://127.0.0.1:15672", "guest", "guest"),
            "out".into(),
        );
        let off = Instrumentation::Off.apply(&opts, &sink, 0);
        assert_eq!(off.gateway_args, ["--no-metrics"]);
        assert!(off.component_env.is_empty() && !off.component_args.contains(&"--metrics".to_owned()));
        let traced = Instrumentation::Traced.apply(&opts, &sink, 2);
        assert!(traced.component_args.windows(2).any(|w| w == ["--metrics", "127.0.0.1:0"]));
        assert_eq!(traced.component_env, [("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), sink.endpoint.clone())]);
        assert_eq!(traced.out_dir, std::path::Path::new("out/instrument-2-traced"));
    }
}
