//! The gateway's state, its reply consumer and its start-up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_amqp::topology::{self, COMMANDS, EVENTS};
use baton_amqp::{
    Broker, ConsumerConfig, Envelope, HandleError, Outgoing, PublishError, Publisher, TraceParent, consume,
};
use baton_health::{Kind, running};
use baton_protocol::{
    Context, Mode, SCHEMA, START, START_REPLY, SagaOutcome, Space, SpaceEvent, StartSaga, StepError, events,
};
use baton_store::{Db, StoreError, inbox, now_ms};
use rusqlite::params;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{COMPONENT, CreateSpace, MIGRATIONS};

/// How a gateway runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub amqp_url: String,
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    pub mode: Mode,
    /// This instance's name: outcomes come back on `gateway.<instance>.outcomes` (workflow mode)
    /// and `gateway.<instance>.events` (events mode).
    pub instance: String,
    /// The workflow every request runs (`create-space` or `create-space-parallel`).
    pub workflow: String,
    /// How long a client waits for an outcome before a 504.
    pub deadline: Duration,
    /// Requests waiting for an outcome at once; beyond, new ones get a 429 at once instead of
    /// queueing without bound.
    pub max_in_flight: usize,
    /// The liveness and readiness of every component of this process, which `/health/live`
    /// and `/health/ready` answer; the gateway adds its own checks.
    pub health: baton_health::Health,
}

pub(crate) struct Gateway {
    pub opts: Options,
    pub broker: Broker,
    pub publisher: Publisher,
    pub db: Db,
    pub pending: Mutex<HashMap<Uuid, oneshot::Sender<SagaOutcome>>>,
    pub slots: Semaphore,
    pub reply_key: String,
}

/// How long `run` keeps trying to bind a port that is in use: a gateway restarted in the same
/// process (`baton up` after a crash) may find the port of its previous self not yet released.
const BIND_PATIENCE: Duration = Duration::from_secs(3);

/// Bind `opts.http` and serve until `cancel`.
pub async fn run(opts: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let patience = tokio::time::Instant::now() + BIND_PATIENCE;
    let listener = loop {
        match TcpListener::bind(opts.http).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < patience => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot listen on {} ({e}); is another gateway running there? pick another with --http",
                    opts.http
                ));
            }
        }
    };
    serve(listener, opts, cancel).await
}

/// Serve on an already bound listener (tests bind port 0) until `cancel`.
pub async fn serve(listener: TcpListener, opts: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let db = Db::open_async(opts.data_dir.join(format!("{COMPONENT}.db")), MIGRATIONS, opts.instance.clone())
        .await?;
    db.health().register(&opts.health, COMPONENT);
    let broker = Broker::connect(&opts.amqp_url, &format!("{COMPONENT} {}", opts.instance)).await?;
    let _broker_watch = baton_amqp::health::watch_broker(&opts.health, COMPONENT, &broker);
    let outcomes = topology::gateway_outcome_queue(&opts.instance);
    let event_queue = topology::gateway_event_queue(&opts.instance);
    broker.declare_topology(&[outcomes.clone(), event_queue.clone()]).await?;
    // A broker upgraded from the version where outcomes came on baton.replies still binds the
    // old queue there, where any service may publish: remove that binding before serving.
    match topology::retire_legacy_gateway_queue(&broker, &opts.instance).await? {
        topology::Legacy::Absent => {}
        topology::Legacy::Deleted => tracing::info!(
            queue = %topology::reply_queue(COMPONENT, &opts.instance),
            "deleted the reply queue of an earlier version (outcomes now come on baton.outcomes)"
        ),
        topology::Legacy::Unbound { messages } => tracing::warn!(
            queue = %topology::reply_queue(COMPONENT, &opts.instance),
            messages,
            "unbound the reply queue of an earlier version from baton.replies; it is kept because it \
             is not empty or still consumed: look at its messages, then delete it"
        ),
    }
    let publisher = Publisher::new(broker.clone());
    let gw = Arc::new(Gateway {
        slots: Semaphore::new(opts.max_in_flight),
        reply_key: topology::reply_key(COMPONENT, &opts.instance),
        opts,
        broker: broker.clone(),
        publisher: publisher.clone(),
        db,
        pending: Mutex::new(HashMap::new()),
    });
    // The consumer (with its handlers) and the HTTP connections live in sets owned by this
    // future: when it is dropped (its task aborted, as `baton up` does to crash the gateway), so
    // are they, the listener with them (its port is free again) and the broker connection.
    let mut tasks = JoinSet::new();
    let g = Arc::clone(&gw);
    let queue = match gw.opts.mode {
        Mode::Workflow => outcomes.name.clone(),
        Mode::Events => event_queue.name.clone(),
    };
    let health = &gw.opts.health;
    let cfg = ConsumerConfig::new(queue.clone(), 256).attached(health.check(
        COMPONENT,
        &format!("consuming {queue}"),
        Kind::Ready,
    ));
    let alive = health.check(COMPONENT, &format!("consumer of {queue} running"), Kind::Live);
    match gw.opts.mode {
        Mode::Workflow => tasks.spawn(running(
            alive,
            consume(
                broker.clone(),
                publisher,
                cfg,
                move |env| Arc::clone(&g).on_outcome(env),
                cancel.clone(),
            ),
        )),
        Mode::Events => tasks.spawn(running(
            alive,
            consume(broker.clone(), publisher, cfg, move |env| Arc::clone(&g).on_event(env), cancel.clone()),
        )),
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "gateway listening");
    let app = crate::api::router(Arc::clone(&gw));
    http(listener, app, &cancel).await;
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a task of the gateway died");
        }
    }
    broker.close().await;
    Ok(())
}

/// Serve HTTP/1 on `listener` until `cancel`, as `axum::serve` with a graceful shutdown does
/// (stop accepting, let each connection finish the request it is on, wait for them all), but
/// with every connection's task in a set owned by this future, not detached: dropped, it takes
/// them all down, so that nothing of a crashed gateway answers on a kept-alive connection.
async fn http(listener: TcpListener, app: axum::Router, cancel: &CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "an HTTP connection's task died");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    let cancel = cancel.clone();
                    conns.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .with_upgrades();
                        let mut conn = std::pin::pin!(conn);
                        tokio::select! {
                            r = conn.as_mut() => {
                                if let Err(e) = r {
                                    tracing::trace!(error = %e, "failed to serve a connection");
                                }
                                return;
                            }
                            _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
                        }
                        if let Err(e) = conn.await {
                            tracing::trace!(error = %e, "failed to serve a connection");
                        }
                    });
                }
                // As axum's listener: errors of one connection are skipped; others (too many
                // open files) get a pause, so as not to spin.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) => {}
                Err(e) => {
                    tracing::error!(error = %e, "accepting an HTTP connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
            }
        }
    }
    drop(listener);
    while let Some(done) = conns.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "an HTTP connection's task died");
        }
    }
}

impl Gateway {
    /// An outcome arrived: record it, then hand it to the waiting client if there is one.
    async fn on_outcome(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        if env.kind != START_REPLY {
            return Err(HandleError::Reject(format!(
                "unknown message type `{}` on {}; it takes {START_REPLY}",
                env.kind,
                topology::outcome_queue(&self.opts.instance)
            )));
        }
        let outcome: SagaOutcome = env.json().map_err(HandleError::Reject)?;
        self.record(env.message_id, outcome).await
    }

    /// An event that ends a space's flow arrived (events mode): make it an outcome.
    async fn on_event(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        if env.kind != events::READY && env.kind != events::REJECTED {
            return Err(HandleError::Reject(format!(
                "unknown message type `{}` on {}; it takes {} and {}",
                env.kind,
                topology::gateway_event_queue(&self.opts.instance).name,
                events::READY,
                events::REJECTED
            )));
        }
        let ev: SpaceEvent = env.json().map_err(HandleError::Reject)?;
        let ctx = ev.context;
        let outcome = if env.kind == events::READY {
            SagaOutcome {
                schema: SCHEMA,
                saga_id: ev.space_id,
                space_id: ev.space_id,
                status: 200,
                space: Some(Space {
                    id: ev.space_id,
                    key: ctx.key.unwrap_or_default(),
                    name: ctx.name,
                    owner: ctx.owner,
                    shard: ctx.shard.unwrap_or_default(),
                    licence: ctx.licence.unwrap_or_default(),
                    route: ctx.route.unwrap_or_default(),
                    workflow_id: None,
                }),
                error: None,
            }
        } else {
            let status = ev.status.unwrap_or(409);
            SagaOutcome {
                schema: SCHEMA,
                saga_id: ev.space_id,
                space_id: ev.space_id,
                status,
                space: None,
                error: Some(StepError {
                    error: ev.reason.unwrap_or_else(|| "the request was rejected".into()),
                    step: ev.step,
                    status,
                    workflow_id: None,
                }),
            }
        };
        self.record(env.message_id, outcome).await
    }

    /// Store an outcome (once per message), then hand it to the waiting client if any.
    async fn record(&self, message_id: Uuid, outcome: SagaOutcome) -> Result<(), HandleError> {
        let waiting = self.pending.lock().expect("pending map").contains_key(&outcome.saga_id);
        let json = serde_json::to_string(&outcome).expect("outcomes serialise");
        let (saga_id, status) = (outcome.saga_id, outcome.status);
        self.db
            .transaction(move |tx| {
                if inbox::seen(tx, message_id)?.is_some() {
                    return Ok(());
                }
                inbox::record(tx, message_id, &[])?;
                let now = now_ms();
                tx.execute(
                    "UPDATE requests SET outcome_status = ?2, outcome = ?3, outcome_at = ?4,
                        told_status = CASE WHEN ?5 THEN COALESCE(told_status, ?2) ELSE told_status END,
                        told_at = CASE WHEN ?5 THEN COALESCE(told_at, ?4) ELSE told_at END
                     WHERE saga_id = ?1",
                    params![saga_id.to_string(), status, json, now, waiting],
                )?;
                Ok(())
            })
            .await
            .map_err(|e: StoreError| HandleError::from(e))?;
        if let Some(tx) = self.pending.lock().expect("pending map").remove(&saga_id) {
            let _ = tx.send(outcome);
        }
        Ok(())
    }

    /// Whether to take new work: the broker is there. A connection being recovered (a dropped
    /// connection comes back within a second or two) is waited for, briefly; a broker that is
    /// away is reported at once after that, never waited on until the client gives up.
    pub(crate) async fn ready(&self) -> Result<(), String> {
        let patience = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match self.broker.health().await {
                Ok(()) => return Ok(()),
                Err(reason) if tokio::time::Instant::now() >= patience => return Err(reason),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Hand a request to the orchestrator and wait for its outcome, up to the deadline.
    pub(crate) async fn create(&self, req: CreateSpace) -> Result<SagaOutcome, Refusal> {
        let space_id = Uuid::new_v4();
        // The id the outcome comes back under: the saga's, or in events mode the space's.
        let saga_id = match self.opts.mode {
            Mode::Workflow => Uuid::new_v4(),
            Mode::Events => space_id,
        };
        let (name, owner, mode) = (req.name.clone(), req.owner.clone(), self.opts.mode.as_str());
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO requests (space_id, saga_id, name, owner, mode, requested_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![space_id.to_string(), saga_id.to_string(), name, owner, mode, now_ms()],
                )?;
                Ok(())
            })
            .await
            .map_err(|e| Refusal::Unavailable(format!("the gateway's database failed: {e}")))?;
        let input = Context { name: req.name, owner: req.owner, ..Default::default() };
        let trace = TraceParent::new_root();
        tracing::debug!(%saga_id, %space_id, trace_id = trace.trace_id(), mode = %self.opts.mode, "request accepted");
        let msg = match self.opts.mode {
            Mode::Workflow => {
                let start = StartSaga {
                    schema: SCHEMA,
                    saga_id,
                    space_id,
                    workflow: self.opts.workflow.clone(),
                    input,
                    // Filled in by the deadline work (the saga's side of the client's 504).
                    deadline: None,
                };
                Outgoing::new(COMMANDS, topology::ORCHESTRATOR, START, saga_id, COMPONENT, trace, &start)
                    .reply_to(self.reply_key.as_str())
                    .mode("workflow")
            }
            Mode::Events => {
                let ev = SpaceEvent {
                    schema: SCHEMA,
                    space_id,
                    context: input,
                    step: None,
                    status: None,
                    reason: None,
                };
                Outgoing::new(EVENTS, events::REQUESTED, events::REQUESTED, space_id, COMPONENT, trace, &ev)
                    .mode("events")
            }
        };
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending map").insert(saga_id, tx);
        let deadline = tokio::time::Instant::now() + self.opts.deadline;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.publisher.publish_confirmed(&msg).await {
                Ok(()) => break,
                // The broker said no for sure: nothing was started.
                Err(e @ (PublishError::Returned(_) | PublishError::Nacked)) => {
                    self.pending.lock().expect("pending map").remove(&saga_id);
                    self.tell(saga_id, 503).await;
                    return Err(Refusal::Unavailable(format!("could not hand the request to RabbitMQ: {e}")));
                }
                // The channel failed before the confirm: the message may or may not have gone
                // out. Send it again under the same id (the receiver's inbox drops the double)
                // rather than tell the client it failed when it may be running.
                Err(e) => {
                    if tokio::time::Instant::now() + backoff >= deadline {
                        break;
                    }
                    tracing::warn!(error = %e, %saga_id, "publish not confirmed; sending it again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => {
                self.pending.lock().expect("pending map").remove(&saga_id);
                self.tell(saga_id, 504).await;
                Err(Refusal::Deadline { space_id, saga_id, after: self.opts.deadline })
            }
        }
    }

    /// Record what the client was told when it was not the outcome itself.
    async fn tell(&self, saga_id: Uuid, status: u16) {
        let r = self
            .db
            .call(move |c| {
                c.execute(
                    "UPDATE requests SET told_status = ?2, told_at = ?3 WHERE saga_id = ?1",
                    params![saga_id.to_string(), status, now_ms()],
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, %saga_id, "recording the answer failed");
        }
    }
}

/// Why a request got no outcome.
pub(crate) enum Refusal {
    Unavailable(String),
    Deadline { space_id: Uuid, saga_id: Uuid, after: Duration },
}
