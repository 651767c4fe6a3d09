//! The console: a web UI for operators, served by every gateway at `/`. Its page, script and
//! style are compiled into the binary (nothing from a CDN; it works offline); it reads what
//! it shows through the same API as the CLI (`GET /workflows`, `GET /workflows/{id}`, `POST
//! /workflows/{id}/cancel`, `POST /workflows/{id}/retry`) and a few read-only routes of its own
//! under `/console/api/`, and polls them for live updates. The health page adds what the
//! broker's management API says of every component instance and queue (`health`). It reads other components' stores
//! only through their read models ([`baton_orchestrator::Sagas`],
//! [`baton_services::read::Holdings`]), never writing.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton_protocol::{Mode, Service};
use baton_workflow::{HistoryEvent, SagaStatus};
use serde_json::{Value, json};
use uuid::Uuid;

mod health;

use crate::gateway::Gateway;
use crate::read::{self, Request};

const PAGE: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// The console's routes, merged into the gateway's router.
pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", PAGE) }))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/console/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/console/api/overview", get(overview))
        .route("/console/api/summary", get(summary))
        .route("/console/api/requests", get(requests))
        .route("/console/api/health", get(health))
        .route("/console/api/spaces/{id}", get(space))
        .route("/console/compare", get(compare))
        .route("/workflows/{id}/retry", post(retry))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message, "status": status.as_u16() }))).into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

// The error is the response itself, built once where the input is read.
#[allow(clippy::result_large_err)]
fn path_id(id: Result<Path<String>, PathRejection>) -> Result<Uuid, Response> {
    let Path(id) =
        id.map_err(|_| error(StatusCode::BAD_REQUEST, "the id in the path is not UTF-8".into()))?;
    Uuid::parse_str(&id).map_err(|_| error(StatusCode::BAD_REQUEST, format!("`{id}` is not a UUID")))
}

/// `GET /console/api/summary`: the sagas by state and the stored versions. Apart from the
/// overview, which every page waits for: they count every saga (most of a second with 100,000
/// on SQLite), and only the list's cards and choices show them.
async fn summary(State(gw): State<Arc<Gateway>>) -> Response {
    let (counts, versions) = if gw.opts.mode == Mode::Workflow {
        // A reader of its own, so that the pages' queries do not wait behind these counts on
        // the gateway's one reader thread.
        let sagas = baton_orchestrator::Sagas::at(gw.opts.sagas.location());
        match tokio::try_join!(sagas.counts_by_status(), sagas.versions()) {
            Ok((c, v)) => (c.into_iter().map(|(s, n)| (s.as_str().to_owned(), n)).collect(), v),
            Err(e) => return failed(e),
        }
    } else {
        (std::collections::BTreeMap::new(), Vec::new())
    };
    axum::Json(json!({ "counts": counts, "versions": versions })).into_response()
}

/// `GET /console/api/overview`: the mode and workflow this gateway runs, the health of every
/// component of its process, and where the management UI and the traces are; nothing it
/// reads grows with the store.
async fn overview(State(gw): State<Arc<Gateway>>) -> Response {
    let health = gw.opts.health.report().await;
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    axum::Json(json!({
        "mode": gw.opts.mode,
        "workflow": gw.opts.workflow,
        "instance": gw.opts.instance,
        "services": Service::ALL.map(Service::name),
        "states": SagaStatus::ALL.map(SagaStatus::as_str),
        "health": health,
        "vhost": baton_mgmt::vhost_of(gw.opts.amqp_url.expose()),
        "mgmt_url": env("BATON_MGMT_URL", "http://127.0.0.1:15672"),
        "trace_url": env("BATON_TRACE_URL", "http://127.0.0.1:16686/trace"),
    }))
    .into_response()
}

/// Requests a page of `GET /console/api/requests` holds.
const REQUESTS_PAGE: usize = 50;

/// `GET /console/api/requests?q=&before=`: the requests this gateway took, newest first (50 a
/// page, `before` the `next` of the page before), or those whose space id, saga id, name or
/// owner is `q`.
async fn requests(State(gw): State<Arc<Gateway>>, RawQuery(query): RawQuery) -> Response {
    let (mut q, mut before) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*k {
            "q" if !v.trim().is_empty() => q = Some(v.trim().to_owned()),
            "q" => {}
            "before" => {
                let parsed =
                    v.split_once('.').and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_owned())));
                match parsed {
                    Some(b) => before = Some(b),
                    None => {
                        return error(StatusCode::BAD_REQUEST, format!("`{v}` is not a `next` of a page"));
                    }
                }
            }
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("`{other}` is not a parameter; it takes q and before"),
                );
            }
        }
    }
    let rows = match q {
        Some(text) => {
            let owner = crate::normalise_owner(&text).unwrap_or_else(|_| text.clone());
            gw.db.call(move |tx| read::matching(tx, &text, &owner, REQUESTS_PAGE)).await
        }
        None => gw.db.call(move |tx| read::recent(tx, REQUESTS_PAGE, before)).await,
    };
    match rows {
        Ok(rows) => {
            let next = (rows.len() == REQUESTS_PAGE)
                .then(|| rows.last().map(|r| format!("{}.{}", r.requested_at_ms, r.space_id)))
                .flatten();
            axum::Json(json!({ "requests": rows, "next": next })).into_response()
        }
        Err(e) => failed(e),
    }
}

/// `GET /console/api/spaces/{id}`: the chain of one space, rebuilt from every service's store:
/// the row each holds for it, the messages each handled that produced a message about it,
/// what each still has to publish, and what was undone later (by a saga's compensation or by
/// `baton reconcile`). With the request its client made, when this gateway took it.
async fn space(State(gw): State<Arc<Gateway>>, id: Result<Path<String>, PathRejection>) -> Response {
    let id = match path_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let request: Option<Request> = match gw.db.call(move |tx| read::request_of(tx, &id.to_string())).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let at = request.as_ref().map_or_else(baton_store::now_ms, |r| r.requested_at_ms);
    let deadline = i64::try_from(gw.opts.deadline.as_millis()).unwrap_or(i64::MAX / 4);
    let window = (at - 5_000, at.saturating_add(deadline).saturating_add(60_000));
    let mut links = Vec::new();
    for service in Service::ALL {
        let link = match baton_services::read::Holdings::at(&gw.opts.store, service).link(id, window).await {
            Ok(link) => link,
            Err(e) => return failed(e),
        };
        let link = link.unwrap_or_default();
        links.push(json!({
            "service": service.name(),
            "held_at_ms": link.held.map(|h| h.at_ms),
            "handled": link.handled.iter().map(|h| json!({
                "message_id": h.message_id,
                "at_ms": h.at_ms,
                "sent": h.replies.iter().map(message).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "waiting": link.waiting.iter().map(message).collect::<Vec<_>>(),
            "undone": link.undone.iter().map(|(step, at)| json!({ "step": step, "at_ms": at })).collect::<Vec<_>>(),
        }));
    }
    axum::Json(json!({ "space_id": id, "mode": gw.opts.mode, "request": request, "links": links }))
        .into_response()
}

/// A message as the chain shows it.
fn message(m: &baton_protocol::Outgoing) -> Value {
    json!({
        "kind": m.kind,
        "exchange": m.exchange,
        "routing_key": m.routing_key,
        "app_id": m.app_id,
        "at_ms": m.created_at_ms,
        "body": serde_json::from_str::<Value>(m.body.as_str()).unwrap_or(Value::Null),
    })
}

/// `GET /console/compare`: the latest `baton compare` report (`$BATON_COMPARE_REPORT`, by
/// default `reports/compare.html` under the gateway's working directory), both modes side by
/// side; a 404 that says how to make one when there is none.
async fn compare() -> Response {
    let path = std::env::var("BATON_COMPARE_REPORT").unwrap_or_else(|_| "reports/compare.html".into());
    let read = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await
    };
    match read.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            format!(
                "<p>No comparison at <code>{}</code> ({e}). Run <code>baton compare</code> (it writes \
                 reports/compare.html), or point <code>BATON_COMPARE_REPORT</code> at its report.</p>",
                html_escape(&path)
            ),
        )
            .into_response(),
    }
}

/// `GET /console/api/health`: this process's checks, and, from the broker's management API,
/// every component instance connected to the vhost (whatever process runs it) and every queue's
/// depth; the management API's failure is said in words beside this process's checks.
async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let report = gw.opts.health.report().await;
    let broker = health::broker(gw.opts.amqp_url.expose()).await;
    let mut body = serde_json::to_value(&broker).unwrap_or(Value::Null);
    body["process"] = serde_json::to_value(&report).unwrap_or(Value::Null);
    axum::Json(body).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// How long `POST /workflows/{id}/retry` waits for the saga to move before it answers 202.
const RETRY_WAIT: Duration = Duration::from_secs(10);

/// `POST /workflows/{id}/retry`: what `baton workflows retry` does, over HTTP. A saga in
/// `compensation_failed` finishes its rollback; one in `definition_missing` goes on once an
/// orchestrator has its definition again. The retry travels as a message to
/// `orchestrator.commands`; the answer waits for the saga to move: 200 with where it stands,
/// 202 while it has not yet, 409 for a saga in any other state (nothing to retry) and in events
/// mode.
async fn retry(State(gw): State<Arc<Gateway>>, id: Result<Path<String>, PathRejection>) -> Response {
    if gw.opts.mode == Mode::Events {
        return error(
            StatusCode::CONFLICT,
            "this gateway runs the events mode, which has no saga to retry; baton reconcile undoes what a \
             stopped chain left"
                .into(),
        );
    }
    let id = match path_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let view = match gw.opts.sagas.describe(id).await {
        Ok(Some(view)) => view,
        Ok(None) => {
            return error(StatusCode::NOT_FOUND, format!("no workflow {id} in the orchestrator's store"));
        }
        Err(e) => return failed(e),
    };
    let before = view.status.clone();
    if before != SagaStatus::CompensationFailed.as_str() && before != SagaStatus::DefinitionMissing.as_str() {
        return error(
            StatusCode::CONFLICT,
            format!(
                "workflow {id} is {before}, neither compensation_failed nor definition_missing: there is nothing to retry"
            ),
        );
    }
    let missing_before = view.count(HistoryEvent::DefinitionMissing);
    let msg = baton_orchestrator::retry_message(id, crate::COMPONENT);
    if let Err(e) = gw.publisher.publish_confirmed(&msg).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not hand the retry to RabbitMQ ({e}); nothing was retried, try again"),
        );
    }
    let until = tokio::time::Instant::now() + RETRY_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let view = match gw.opts.sagas.describe(id).await {
            Ok(Some(view)) => view,
            Ok(None) => continue,
            Err(e) => return failed(e),
        };
        let moved = view.status != before || view.count(HistoryEvent::DefinitionMissing) > missing_before;
        if moved || tokio::time::Instant::now() >= until {
            let code = if moved { StatusCode::OK } else { StatusCode::ACCEPTED };
            let mut body = serde_json::to_value(&view).unwrap_or(Value::Null);
            body["message"] = json!(if moved {
                format!("retried: {} now", view.status)
            } else {
                format!("retry sent; no orchestrator moved it within {} ms", RETRY_WAIT.as_millis())
            });
            return (code, axum::Json(body)).into_response();
        }
    }
}
