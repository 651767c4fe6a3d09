//! The HTTP routes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tracing::Instrument;
use uuid::Uuid;

use baton_health::Kind;
use baton_protocol::Mode;
use baton_workflow::{HistoryEvent, SagaStatus};

use crate::gateway::{Gateway, Refusal};
use crate::input::{MAX_BODY, check_headers, validate};
use crate::listing::Listing;

pub(crate) fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/spaces", post(create_space))
        .route("/spaces/{id}", get(get_space))
        .route("/workflows", get(list_workflows))
        .route("/workflows/{id}", get(get_workflow))
        .route("/workflows/{id}/cancel", post(cancel_workflow))
        .merge(crate::console::routes())
        .route("/health", get(ready))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .route(
            "/metrics",
            get(|State(gw): State<Arc<Gateway>>| async move { baton_metrics::answer(&gw.opts.health).await }),
        )
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route; try POST /spaces, GET /spaces/{id}, GET /workflows, GET /workflows/{id}, \
                 POST /workflows/{id}/cancel, POST /workflows/{id}/retry, GET /health/live, GET /health/ready, \
                 GET /metrics, or the console at GET /"
                    .into(),
            )
        })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(head_within_limit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(traced))
        .with_state(gw)
}

/// A request is a span, the root of its trace or the child of the client's `traceparent`
/// header; the message it sends follows it. Its trace id is in every log line of the request.
/// The probes and the scrape are not traced: they would bury the requests. A 5xx answer ends
/// the span with an error status, as OpenTelemetry's HTTP conventions say for a server (a 4xx
/// is the client's mistake, not the server's error).
async fn traced(req: Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/health") || path == "/metrics" {
        return next.run(req).await;
    }
    let route = req.extensions().get::<MatchedPath>().map_or(path, MatchedPath::as_str).to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{} {route}", req.method()),
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(parent) = req.headers().get("traceparent").and_then(|v| v.to_str().ok()) {
        baton_telemetry::follow(&span, &baton_protocol::TraceParent(parent.to_owned()));
    }
    if let Some(own) = baton_telemetry::traceparent_of(&span) {
        span.record("trace_id", own.trace_id());
    }
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if let Some(status) = span_status(response.status()) {
        span.record("otel.status_code", status);
    }
    response
}

/// The span status of a server's answer: `ERROR` for a 5xx, none (unset) otherwise.
fn span_status(code: StatusCode) -> Option<&'static str> {
    code.is_server_error().then_some("ERROR")
}

/// 431 for a head over [`crate::early::MAX_HEAD`] that got past hyper's own check.
async fn head_within_limit(req: Request, next: axum::middleware::Next) -> Response {
    if crate::early::head_size(&req) > crate::early::MAX_HEAD {
        let mut r = error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, crate::early::head_too_large());
        r.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        return r;
    }
    next.run(req).await
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message, "status": status.as_u16() }))).into_response()
}

/// A known path asked with a method it does not take (`GET /spaces`): axum's own answer has
/// no body, which leaves a client that reads JSON with nothing to show.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let hint = match path {
        "/spaces" => "create a space with POST /spaces; read one with GET /spaces/{id}",
        _ => "the `allow` header lists the methods it takes",
    };
    error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} does not take {method}; {hint}"))
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn create_space(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let response = answer_create(&gw, req).await;
    baton_metrics::request(gw.opts.mode.as_str(), response.status().as_u16(), started.elapsed());
    response
}

async fn answer_create(gw: &Gateway, req: Request) -> Response {
    if let Err(invalid) = check_headers(req.headers()) {
        return error(status(invalid.status), invalid.message);
    }
    let key = match idempotency_key(req.headers()) {
        Ok(key) => key,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    // The whole body within the timeout, not each piece of it: a client sending a byte now
    // and then must not hold the connection for ever.
    let limit = gw.opts.limits.body_timeout;
    let body = match tokio::time::timeout(limit, Bytes::from_request(req, &())).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {MAX_BODY} bytes; a space needs only a name and an owner"),
            );
        }
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("the body could not be read: {e}")),
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} ms; send all of it, as long as its content-length says",
                    limit.as_millis()
                ),
            );
            r.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            return r;
        }
    };
    let req = match validate(&body) {
        Ok(r) => r,
        Err(invalid) => return error(status(invalid.status), invalid.message),
    };
    let Ok(_slot) = gw.slots.try_acquire() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{} requests are already waiting for an outcome; retry shortly", gw.opts.max_in_flight),
        );
    };
    let (answer, replayed) = gw.create(req, key).await;
    let mut response = answer_of(answer);
    if replayed {
        baton_metrics::idempotent_replay();
        response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    response
}

/// The `Idempotency-Key` of a request, if it has one: 1 to 255 visible ASCII characters, given
/// once. Otherwise one sentence that says what is wrong.
fn idempotency_key(headers: &header::HeaderMap) -> Result<Option<String>, String> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err("Idempotency-Key is given twice; give it once".into());
    }
    let key = value
        .to_str()
        .ok()
        .filter(|k| (1..=MAX_KEY).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_owned())).ok_or_else(|| {
        format!(
            "Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters without spaces (a UUID is a good one)"
        )
    })
}

/// The longest `Idempotency-Key` taken.
const MAX_KEY: usize = 255;

/// The HTTP answer to a request's outcome, or to why it has none.
fn answer_of(answer: Result<baton_protocol::SagaOutcome, Refusal>) -> Response {
    match answer {
        Ok(outcome) if outcome.status == 200 => match outcome.space {
            Some(space) => (StatusCode::OK, axum::Json(space)).into_response(),
            None => error(StatusCode::INTERNAL_SERVER_ERROR, "the orchestrator answered 200 without a space".into()),
        },
        Ok(outcome) => {
            let mut body = outcome.error.map_or_else(
                || json!({ "error": "the request failed", "status": outcome.status }),
                |e| serde_json::to_value(e).expect("errors serialise"),
            );
            // The ids to look the refusal up with (GET /spaces/{id}, GET /workflows/{id}); in
            // events mode there is no workflow, and the outcome's id is the space's.
            body["space_id"] = json!(outcome.space_id);
            if body.get("workflow_id").is_none_or(Value::is_null) {
                body["workflow_id"] = json!((outcome.saga_id != outcome.space_id).then_some(outcome.saga_id));
            }
            (status(outcome.status), axum::Json(body)).into_response()
        }
        Err(Refusal::Unavailable(msg)) => error(StatusCode::SERVICE_UNAVAILABLE, msg),
        Err(Refusal::NoRoom(msg)) => error(StatusCode::INSUFFICIENT_STORAGE, msg),
        Err(Refusal::Deadline { space_id, saga_id, after }) => (
            StatusCode::GATEWAY_TIMEOUT,
            axum::Json(json!({
                "error": format!(
                    "no outcome within {} ms; the request may still complete: GET /spaces/{space_id} tells what happened",
                    after.as_millis()
                ),
                "status": 504,
                "space_id": space_id,
                "workflow_id": (saga_id != space_id).then_some(saga_id),
            })),
        )
            .into_response(),
        Err(Refusal::KeyReused(first)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "error": format!(
                    "this Idempotency-Key was first used for another request (name `{}`, owner `{}`); send a new \
                     request with a new key, or this one's retry with its own body",
                    first.name, first.owner
                ),
                "status": 422,
                "space_id": first.space_id,
                "workflow_id": (first.saga_id != first.space_id).then_some(first.saga_id),
            })),
        )
            .into_response(),
    }
}

// The error is the response itself, built once where the input is read.
#[allow(clippy::result_large_err)]
fn parse_id(id: Result<Path<String>, PathRejection>) -> Result<Uuid, Response> {
    // axum's own rejection (an id not UTF-8 once percent-decoded) is plain text.
    let Path(id) = id.map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "the id in the path is not UTF-8 once percent-decoded; an id is a UUID".into(),
        )
    })?;
    Uuid::parse_str(&id).map_err(|_| error(StatusCode::BAD_REQUEST, format!("`{id}` is not a UUID")))
}

async fn get_space(State(gw): State<Arc<Gateway>>, id: Result<Path<String>, PathRejection>) -> Response {
    let id = match parse_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let row = gw
        .db
        .call(move |c| {
            use baton_store::OptionalExtension;
            c.query_row(
                "SELECT saga_id, name, owner, mode, requested_at, told_status, outcome_status, outcome FROM requests WHERE space_id = ?1",
                [id.to_string()],
                |r| {
                    Ok(json!({
                        "id": id,
                        "workflow_id": r.get::<String>(0)?,
                        "name": r.get::<String>(1)?,
                        "owner": r.get::<String>(2)?,
                        "mode": r.get::<String>(3)?,
                        "requested_at_ms": r.get::<i64>(4)?,
                        "told_status": r.get::<Option<i64>>(5)?,
                        "outcome_status": r.get::<Option<i64>>(6)?,
                        "outcome": r.get::<Option<String>>(7)?
                            .and_then(|s| serde_json::from_str::<Value>(&s).ok()),
                    }))
                },
            )
            .optional()
        })
        .await;
    match row {
        Ok(Some(v)) => (StatusCode::OK, axum::Json(v)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no space {id} was requested through this gateway")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn get_workflow(State(gw): State<Arc<Gateway>>, id: Result<Path<String>, PathRejection>) -> Response {
    let id = match parse_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match gw.opts.sagas.describe(id).await {
        Ok(Some(view)) => (StatusCode::OK, axum::Json(view)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no workflow {id} in the orchestrator's store")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// How long `POST /workflows/{id}/cancel` waits for the saga to end `cancelled` before it
/// answers 202 (its compensations are still running, or the orchestrator is away).
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// `POST /workflows/{id}/cancel`: stop a running saga. The cancel travels as a message to
/// `orchestrator.commands` (whichever orchestrator instance is alive handles it); the answer waits
/// for the saga to end: 200 `cancelled`, 202 while its steps are still being undone, 409 with
/// why when it cannot be cancelled (it ended otherwise, or is past its last compensable step),
/// 409 in events mode, which has no saga. It is idempotent: a cancel of a saga already being
/// cancelled, or cancelled, gets the same success as the one that stopped it.
async fn cancel_workflow(
    State(gw): State<Arc<Gateway>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    if gw.opts.mode == Mode::Events {
        let message = "this gateway runs the events mode, which has no saga to cancel: each service reacts to \
                       the previous one's event and nobody undoes a flow once it started (baton reconcile cleans \
                       up afterwards); cancelling needs the workflow mode";
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({ "error": message, "status": 409, "mode": "events" })),
        )
            .into_response();
    }
    let id = match parse_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let view = match describe(&gw, id).await {
        Ok(Some(view)) => view,
        Ok(None) => {
            return error(StatusCode::NOT_FOUND, format!("no workflow {id} in this data dir's orchestrator"));
        }
        Err(r) => return r,
    };
    if let Some(why) = view.why_not_cancellable() {
        return refused_cancel(why, &view);
    }
    let (asked, refused) =
        (view.count(HistoryEvent::CancelRequested), view.count(HistoryEvent::CancelRefused));
    // A cancel already stopped it: nothing to send, only its end to wait for.
    if asked == 0 {
        let msg =
            baton_orchestrator::cancel_message(id, &format!("POST /workflows/{id}/cancel"), crate::COMPONENT);
        if let Err(e) = gw.publisher.publish_confirmed(&msg).await {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("could not hand the cancel to RabbitMQ ({e}); nothing was cancelled, try again"),
            );
        }
    }
    let until = tokio::time::Instant::now() + CANCEL_WAIT;
    let mut last = view;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match describe(&gw, id).await {
            Ok(Some(view)) => last = view,
            Ok(None) => {}
            Err(r) => return r,
        }
        // The saga ended, or went on, before the cancel reached it.
        if last.count(HistoryEvent::CancelRefused) > refused {
            let why =
                last.last_detail(HistoryEvent::CancelRefused).unwrap_or("it cannot be cancelled").to_owned();
            return refused_cancel(why, &last);
        }
        if last.status == SagaStatus::Cancelled.as_str() {
            return cancel_answer(StatusCode::OK, "cancelled: every step it had done was undone", &last);
        }
        if tokio::time::Instant::now() >= until {
            let what = if last.count(HistoryEvent::CancelRequested) > 0 {
                format!(
                    "cancel accepted; its completed steps are still being undone after {} ms (GET /workflows/{id} tells when it is cancelled)",
                    CANCEL_WAIT.as_millis()
                )
            } else {
                format!(
                    "cancel sent, but no orchestrator handled it within {} ms; it will when one runs (GET /workflows/{id} tells)",
                    CANCEL_WAIT.as_millis()
                )
            };
            return cancel_answer(StatusCode::ACCEPTED, &what, &last);
        }
    }
}

/// The saga `id`, read through the orchestrator's store; an error is the response.
async fn describe(
    gw: &Gateway,
    id: Uuid,
) -> Result<Option<baton_orchestrator::query::WorkflowView>, Response> {
    gw.opts.sagas.describe(id).await.map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// A 409 for a saga a cancel cannot stop, with why and where it stands.
fn refused_cancel(why: String, view: &baton_orchestrator::query::WorkflowView) -> Response {
    (
        StatusCode::CONFLICT,
        axum::Json(json!({
            "error": why,
            "status": 409,
            "workflow_id": view.id,
            "space_id": view.space_id,
            "state": view.status,
        })),
    )
        .into_response()
}

/// The answer to a cancel that was accepted: what became of it, and the saga as it stands.
fn cancel_answer(
    code: StatusCode,
    message: &str,
    view: &baton_orchestrator::query::WorkflowView,
) -> Response {
    let mut body = serde_json::to_value(view).unwrap_or(Value::Null);
    body["message"] = json!(message);
    (code, axum::Json(body)).into_response()
}

/// `GET /workflows?state=&workflow=&version=&space=&id=&name=&owner=&q=&since=&until=&limit=&cursor=`:
/// a page of sagas, newest first, with the cursor of the next page (`null` on the last). A bad
/// parameter is a 400 that names it.
async fn list_workflows(State(gw): State<Arc<Gateway>>, RawQuery(query): RawQuery) -> Response {
    let asked = match Listing::parse(query.as_deref().unwrap_or("")) {
        Ok(asked) => asked,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match gw.opts.sagas.page(&asked.filter, asked.limit, asked.after).await {
        Ok(page) => (StatusCode::OK, axum::Json(page)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Readiness (`GET /health/ready`, and `GET /health`): every check of every component in this
/// process, 503 naming the failing ones.
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    health(&gw, Kind::Ready).await
}

/// Liveness (`GET /health/live`): the loops and database threads of this process run.
async fn live(State(gw): State<Arc<Gateway>>) -> Response {
    health(&gw, Kind::Live).await
}

async fn health(gw: &Gateway, question: Kind) -> Response {
    let report = gw.opts.health.report().await;
    let mut extra = serde_json::Map::new();
    extra.insert("mode".into(), json!(gw.opts.mode));
    extra.insert("workflow".into(), json!(gw.opts.workflow));
    baton_health::answer(&report, question, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(keys: &[&str]) -> header::HeaderMap {
        let mut h = header::HeaderMap::new();
        for k in keys {
            h.append("idempotency-key", header::HeaderValue::from_str(k).unwrap());
        }
        h
    }

    #[test]
    fn only_a_server_error_is_an_error_span() {
        assert_eq!(span_status(StatusCode::INTERNAL_SERVER_ERROR), Some("ERROR"));
        assert_eq!(span_status(StatusCode::GATEWAY_TIMEOUT), Some("ERROR"));
        for fine in
            [StatusCode::OK, StatusCode::CONFLICT, StatusCode::NOT_FOUND, StatusCode::TOO_MANY_REQUESTS]
        {
            assert_eq!(span_status(fine), None, "{fine}");
        }
    }

    #[test]
    fn an_idempotency_key_is_one_header_of_visible_ascii() {
        assert_eq!(idempotency_key(&headers(&[])), Ok(None));
        let uuid = "0192f0c4-6b1e-7c3a-9f00-1a2b3c4d5e6f";
        assert_eq!(idempotency_key(&headers(&[uuid])), Ok(Some(uuid.to_owned())));
        assert!(idempotency_key(&headers(&["a", "b"])).unwrap_err().contains("twice"));
        for bad in ["", "two words", &"k".repeat(MAX_KEY + 1)] {
            assert!(idempotency_key(&headers(&[bad])).unwrap_err().contains("1 to 255"), "{bad:?}");
        }
        assert_eq!(
            idempotency_key(&headers(&[&"k".repeat(MAX_KEY)])).map(|k| k.map(|k| k.len())),
            Ok(Some(MAX_KEY))
        );
    }
}
