//! The endpoints: `GET /health/live`, `GET /health/ready`, and `GET /health` (the readiness
//! answer, what scripts and `baton-fleet` wait on). 200 when the checks pass, 503 naming the
//! failing ones.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Health, Kind, Report};

/// The three endpoints over `health`, for a process that serves nothing else.
pub fn routes(health: Health) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(h): State<Health>| async move { answer(&h.report().await, Kind::Ready, Map::new()) }),
        )
        .route(
            "/health/ready",
            get(|State(h): State<Health>| async move { answer(&h.report().await, Kind::Ready, Map::new()) }),
        )
        .route(
            "/health/live",
            get(|State(h): State<Health>| async move { answer(&h.report().await, Kind::Live, Map::new()) }),
        )
        .with_state(health)
}

/// Serve [`routes`] on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, health: Health, cancel: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, routes(health)).with_graceful_shutdown(cancel.cancelled_owned()).await
}

/// The answer to a liveness (`Kind::Live`) or readiness (`Kind::Ready`) question: 200 with
/// every check, or 503 with the failing ones named in `failing` and, as one sentence, in
/// `error`. `extra` fields are added to the body (the gateway adds its mode).
pub fn answer(report: &Report, question: Kind, extra: Map<String, Value>) -> Response {
    let (ok, failing) = match question {
        Kind::Live => (report.live, report.failing(Some(Kind::Live))),
        Kind::Ready => (report.ready, report.failing(None)),
    };
    let mut body = json!({
        "status": if ok { "ok" } else if question == Kind::Live { "not live" } else { "not ready" },
        "live": report.live,
        "ready": report.ready,
        "checks": report.checks,
    });
    if !ok {
        body["error"] = Value::String(format!(
            "not {}: {}",
            if question == Kind::Live { "live" } else { "ready" },
            failing.join("; ")
        ));
        body["failing"] = json!(failing);
    }
    if let Value::Object(map) = &mut body {
        map.extend(extra);
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}
