//! Prometheus metrics of every component, at `GET /metrics`.
//!
//! Owns: the process's metrics recorder ([`install`], once per process, with the `instance`
//! label every series carries), the names and labels of every series (the functions below, one
//! per thing counted, so that an instrumented site is one line), the readiness gauge (set from
//! the process's [`Health`] at each scrape), and the endpoint ([`routes`] for a router that
//! serves more, as the gateway's; [`serve`] for a listener of its own, as `--metrics`).
//! Must not touch: what a component does. A component calls these functions and nothing else;
//! before [`install`] they cost next to nothing and record nothing.
//!
//! Every series is labelled `instance` (the process's `--instance`) and `component` (the
//! component that counted it: several run in one process under `baton up`).
//!
//! Layout: `lib.rs` (recorder and endpoint), `names.rs` (the series and their help), `stage.rs`
//! (the timed stages of a hop, [`Stopwatch`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use baton_health::Health;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod names;
pub mod stage;

pub use stage::{Stage, Stopwatch};

use names::*;

/// Bucket bounds, in seconds, of every duration histogram: a hop costs about a millisecond, a
/// saga with retries some seconds, a deadline 30 s.
const BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// How often histograms are drained when nobody scrapes, so that they do not grow.
const UPKEEP: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether this process records metrics ([`install`] went through): what the hot path checks
/// before it reads a clock.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

type Collect = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What sets gauges at each scrape (the outbox's depth), by name, each with the id of its
/// [`Collector`]: a restarted component's replaces its old one.
static COLLECTORS: Mutex<BTreeMap<String, (u64, Collect)>> = Mutex::new(BTreeMap::new());

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A collector registered by [`on_scrape`]; dropping it removes it (unless another took its
/// name since).
#[must_use = "the collector is removed when this is dropped"]
pub struct Collector {
    name: String,
    id: u64,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let mut all = COLLECTORS.lock().expect("metrics collectors");
        if all.get(&self.name).is_some_and(|(id, _)| *id == self.id) {
            all.remove(&self.name);
        }
    }
}

/// Run `collect` at each scrape, before the exposition is rendered, under `name`, while the
/// returned [`Collector`] is held; a scrape waits for it [`COLLECT_PATIENCE`] at most.
pub fn on_scrape<F, Fut>(name: &str, collect: F) -> Collector
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let collect: Collect = Arc::new(move || Box::pin(collect()));
    COLLECTORS.lock().expect("metrics collectors").insert(name.to_owned(), (id, collect));
    Collector { name: name.to_owned(), id }
}

/// How long a scrape waits for the collectors.
const COLLECT_PATIENCE: Duration = Duration::from_secs(2);

/// Install the process's recorder, every series labelled `instance`; later calls (a second
/// component of the process, a restarted one) keep the first. Returns whether metrics are
/// recorded: `false` when another recorder was installed before, by something else.
pub fn install(instance: &str) -> bool {
    // Once, and the others wait for it: two components starting together must not see the
    // recorder set and its handle not yet.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let builder = PrometheusBuilder::new()
            .add_global_label("instance", instance)
            .set_buckets(BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STAGE_SECONDS.into()), stage::STAGE_BUCKETS))
            .expect("the bucket lists are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            return;
        }
        let _ = HANDLE.set(handle.clone());
        names::describe();
        // For the life of the process, as the recorder it drains (which is never uninstalled).
        let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(UPKEEP);
                handle.run_upkeep();
            }
        });
    });
    HANDLE.get().is_some()
}

/// The text exposition of every series now, readiness set from `health` first; `None` before
/// [`install`].
pub async fn render(health: &Health) -> Option<String> {
    let handle = HANDLE.get()?;
    let collectors: Vec<Collect> =
        COLLECTORS.lock().expect("metrics collectors").values().map(|(_, c)| Arc::clone(c)).collect();
    let collected = futures_util::future::join_all(collectors.iter().map(|c| c()));
    let _ = tokio::time::timeout(COLLECT_PATIENCE, collected).await;
    let report = health.report().await;
    let mut ready: std::collections::BTreeMap<&str, bool> = Default::default();
    for c in &report.checks {
        *ready.entry(c.component.as_str()).or_insert(true) &= c.ok;
    }
    for (component, ok) in ready {
        gauge!(READY, "component" => component.to_owned()).set(if ok { 1.0 } else { 0.0 });
    }
    Some(handle.render())
}

/// `GET /metrics` over `health` (for the readiness gauge).
pub fn routes(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(|State(health): State<Health>| async move { answer(&health).await }))
        .with_state(health)
}

/// The answer to `GET /metrics`: the exposition, or a 404 before [`install`].
pub async fn answer(health: &Health) -> axum::response::Response {
    match render(health).await {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        None => {
            (axum::http::StatusCode::NOT_FOUND, "metrics are not recorded by this process\n").into_response()
        }
    }
}

/// Serve [`routes`] on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, health: Health, cancel: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, routes(health)).with_graceful_shutdown(cancel.cancelled_owned()).await
}

/// Bind `addr` for [`serve`], with a sentence naming the flag when it cannot be.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
}

/// The metrics address is taken or not ours: the user picks another.
#[derive(Debug, thiserror::Error)]
#[error("--metrics {addr}: cannot listen there ({source}); pick a free address")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

// --- The gateway ---

/// A `POST /spaces` answered with `status` after `took`, in `mode`.
pub fn request(mode: &str, status: u16, took: Duration) {
    let (mode, status) = (mode.to_owned(), status.to_string());
    counter!(REQUESTS, "component" => "gateway", "mode" => mode.clone(), "status" => status.clone())
        .increment(1);
    histogram!(REQUEST_SECONDS, "component" => "gateway", "mode" => mode, "status" => status)
        .record(took.as_secs_f64());
}

/// A request with a known `Idempotency-Key` got the first one's outcome (or waited on it).
pub fn idempotent_replay() {
    counter!(IDEMPOTENT_REPLAYS, "component" => "gateway").increment(1);
}

// --- The orchestrator ---

/// One event of a saga's history (`started`, `done`, `timed_out`, `compensated`, ...), as the
/// orchestrator records it, once its transaction committed. `service` is the step's.
pub fn saga_event(workflow: &str, version: &str, service: Option<&str>, event: &str) {
    let (wf, v) = (workflow.to_owned(), version.to_owned());
    let svc = || service.unwrap_or("").to_owned();
    let c = "orchestrator";
    match event {
        "started" => counter!(SAGAS_STARTED, "component" => c, "workflow" => wf, "version" => v).increment(1),
        "completed" | "rolled_back" | "cancelled" | "compensation_failed" | "definition_missing" => {
            counter!(SAGAS_FINISHED, "component" => c, "workflow" => wf.clone(), "version" => v, "outcome" => event.to_owned())
                .increment(1)
        }
        _ => {}
    }
    match event {
        "compensated" => counter!(COMPENSATIONS, "component" => c, "service" => svc()).increment(1),
        "compensation_failed" => {
            counter!(COMPENSATION_FAILURES, "component" => c, "service" => svc()).increment(1)
        }
        "timed_out" => counter!(STEP_TIMEOUTS, "component" => c, "service" => svc()).increment(1),
        "retry_scheduled" => counter!(STEP_RETRIES, "component" => c, "service" => svc()).increment(1),
        "late_reply_ignored" => counter!(LATE_REPLIES, "component" => c, "service" => svc()).increment(1),
        "cancel_requested" => counter!(CANCELS, "component" => c, "result" => "accepted").increment(1),
        "cancel_refused" => counter!(CANCELS, "component" => c, "result" => "refused").increment(1),
        _ => {}
    }
}

/// A step's command (`action` `do` or `undo`) of `service` answered `took` after it was sent.
pub fn step_duration(workflow: &str, service: &str, action: &str, took: Duration) {
    histogram!(STEP_SECONDS, "component" => "orchestrator", "workflow" => workflow.to_owned(),
        "service" => service.to_owned(), "action" => action.to_owned())
    .record(took.as_secs_f64());
}

// --- Every component that consumes ---

/// A message already in `component`'s inbox came again and was dropped.
pub fn inbox_duplicate(component: &str) {
    counter!(INBOX_DUPLICATES, "component" => component.to_owned()).increment(1);
}

/// A command for a saga step already compensated (its tombstone) was made a no-op.
pub fn tombstone_hit(component: &str) {
    counter!(TOMBSTONE_HITS, "component" => component.to_owned()).increment(1);
}

/// A delivery of `queue` dead-lettered, for `reason` (a class: `invalid`, `too_old`,
/// `rejected`); the component is the queue's owner, the first part of its name.
pub fn dead_lettered(queue: &str, reason: &str) {
    let component = queue.split('.').next().unwrap_or(queue);
    counter!(DEAD_LETTERED, "component" => component.to_owned(), "queue" => queue.to_owned(),
        "reason" => reason.to_owned())
    .increment(1);
}

/// A PostgreSQL transaction of `component` that conflicted with another instance's, tried again.
pub fn store_conflict_retried(component: &str) {
    counter!(STORE_CONFLICTS, "component" => component.to_owned()).increment(1);
}

// --- The outbox relay ---

/// Outbox rows published by `component`'s relay: `confirmed`, `nacked` (or returned) or
/// `failed` (the channel failed before the confirm).
pub fn relay(component: &str, result: &'static str, rows: u64) {
    counter!(RELAY, "component" => component.to_owned(), "result" => result).increment(rows);
}

/// `component`'s outbox: rows not yet published, and how long the oldest has waited.
pub fn outbox(component: &str, depth: u64, oldest: Duration) {
    gauge!(OUTBOX_DEPTH, "component" => component.to_owned()).set(depth as f64);
    gauge!(OUTBOX_OLDEST, "component" => component.to_owned()).set(oldest.as_secs_f64());
}

/// Rows of another instance's outbox, left unpublished past their lease, taken over.
pub fn outbox_taken_over(component: &str, rows: u64) {
    counter!(OUTBOX_TAKEN_OVER, "component" => component.to_owned()).increment(rows);
}

// --- Retention and reconcile ---

/// Rows of `what` (finished sagas, inbox rows, ...) purged by `component`'s retention.
pub fn purged(component: &str, what: &str, rows: u64) {
    counter!(PURGED, "component" => component.to_owned(), "what" => what.to_owned()).increment(rows);
}

/// Findings of one `baton reconcile` run in events mode, by `kind` (orphans found, fixed...).
pub fn reconcile_findings(kind: &str, count: u64) {
    counter!(RECONCILE_FINDINGS, "component" => "reconcile", "kind" => kind.to_owned()).increment(count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_series_carries_its_instance_and_component() {
        assert!(install("test-1"));
        assert!(install("test-2"), "a second install keeps the first recorder");
        request("workflow", 200, Duration::from_millis(3));
        saga_event("create-space", "abc", Some("routing"), "compensated");
        let health = Health::default();
        health.check("records", "store writable", baton_health::Kind::Ready).pass();
        let text = render(&health).await.unwrap();
        assert!(
            text.contains(r#"baton_requests_total{instance="test-1",component="gateway",mode="workflow",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"baton_request_duration_seconds_bucket{instance="test-1",component="gateway",mode="workflow",status="200",le="0.005"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"baton_compensations_total{instance="test-1",component="orchestrator",service="routing"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"baton_ready{instance="test-1",component="records"} 1"#), "{text}");
    }

    #[tokio::test]
    async fn a_stage_is_timed_in_microsecond_buckets_once_installed() {
        assert!(install("test-1"));
        let watch = Stopwatch::start();
        assert!(watch.running());
        watch.record("records", Stage::Commit);
        let text = render(&Health::default()).await.unwrap();
        let bucket = r#"baton_stage_duration_seconds_bucket{instance="test-1",component="records",stage="commit",le="0.00001"}"#;
        assert!(text.contains(bucket), "{text}");
        assert!(
            text.contains(r#"baton_stage_duration_seconds_count{instance="test-1",component="records",stage="commit"} 1"#),
            "{text}"
        );
    }
}
