//! The gateway's request logic: a request handed to the orchestrator (or, in events mode,
//! published as the first event) and its outcome awaited, retries of an `Idempotency-Key`
//! answered from the first request, and outcomes recorded as they arrive.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_amqp::topology::{self, COMMANDS, EVENTS};
use baton_amqp::{Broker, Envelope, HandleError, Identity, Outgoing, PublishError, Publisher, TraceParent};
use baton_protocol::{
    ClientDeadline, Context, Mode, SCHEMA, START, START_REPLY, SagaOutcome, Space, SpaceEvent, StartSaga,
    StepError, events,
};
use baton_store::params;
use baton_store::{Db, StoreError, inbox, now_ms};
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

use crate::idempotency;
use crate::options::Options;
use crate::{COMPONENT, CreateSpace};

/// A client waiting for an outcome: its number, and where to hand the outcome.
pub(crate) type Waiter = (u64, oneshot::Sender<SagaOutcome>);

pub(crate) struct Gateway {
    pub opts: Options,
    pub broker: Broker,
    pub publisher: Publisher,
    pub db: Db,
    /// The clients waiting for each saga's outcome (the first request, and the retries of it
    /// that carry its `Idempotency-Key`), each under a number of its own.
    pub pending: Mutex<HashMap<Uuid, Vec<Waiter>>>,
    pub waiters: AtomicU64,
    pub slots: Semaphore,
    pub reply_key: String,
    /// Who sent a message: an outcome is taken only from an orchestrator, an event that ends a
    /// flow only from a service that may emit it.
    pub identity: Identity,
    /// The queue its outcomes arrive on (this mode's), named once for the reasons of rejected
    /// messages.
    pub incoming: String,
}

impl Gateway {
    /// An outcome arrived: record it, then hand it to the waiting client if there is one.
    pub(crate) async fn on_outcome(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let outcome: SagaOutcome = env.decode(&self.incoming, &[START_REPLY])?;
        self.identity.expect(&env, &["orchestrator"])?;
        self.record(env.message_id, outcome).await
    }

    /// An event that ends a space's flow arrived (events mode): make it an outcome.
    pub(crate) async fn on_event(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let ev: SpaceEvent = env.decode(&self.incoming, &[events::READY, events::REJECTED])?;
        self.identity.expect(&env, &events::emitters(&env.kind, Mode::Events))?;
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
            .transaction_retrying(move |tx| {
                if inbox::seen(tx, message_id)?.is_some() {
                    return Ok(());
                }
                inbox::record(tx, message_id)?;
                let now = now_ms();
                tx.write(
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
        for (_, tx) in self.pending.lock().expect("pending map").remove(&saga_id).unwrap_or_default() {
            let _ = tx.send(outcome.clone());
        }
        Ok(())
    }

    /// Wait for the outcome of `saga_id` (with every other client waiting for it).
    fn wait(&self, saga_id: Uuid) -> (u64, oneshot::Receiver<SagaOutcome>) {
        let (tx, rx) = oneshot::channel();
        let me = self.waiters.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().expect("pending map").entry(saga_id).or_default().push((me, tx));
        (me, rx)
    }

    /// Stop waiting for `saga_id` (waiter `me`).
    fn forget(&self, saga_id: Uuid, me: u64) {
        let mut pending = self.pending.lock().expect("pending map");
        if let Some(waiting) = pending.get_mut(&saga_id) {
            waiting.retain(|(w, _)| *w != me);
            if waiting.is_empty() {
                pending.remove(&saga_id);
            }
        }
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

    /// Hand a request to the orchestrator and wait for its outcome, up to the deadline. With an
    /// `Idempotency-Key` already seen (within its time to live) for the same body, it is that
    /// request again: its outcome, or a wait on the same saga ([`Gateway::replay`]); for another
    /// body, a refusal. Returns whether the answer is a replay.
    pub(crate) async fn create(
        &self,
        req: CreateSpace,
        key: Option<String>,
    ) -> (Result<SagaOutcome, Refusal>, bool) {
        // Counted from the request's arrival, and kept here: no database write, connection
        // attempt, publish or confirm below may hold the answer past it.
        let deadline = tokio::time::Instant::now() + self.opts.deadline;
        let space_id = Uuid::new_v4();
        // The id the outcome comes back under: the saga's, or in events mode the space's.
        let saga_id = match self.opts.mode {
            Mode::Workflow | Mode::Hybrid => Uuid::new_v4(),
            Mode::Events => space_id,
        };
        let (name, owner, mode) = (req.name.clone(), req.owner.clone(), self.opts.mode.as_str());
        let ttl_ms = i64::try_from(self.opts.idempotency_ttl.as_millis()).unwrap_or(i64::MAX);
        // A retry needs only the gateway's database: a client that retries because the broker
        // is away still learns an outcome that was recorded. New work needs the broker.
        let known = match &key {
            Some(key) => {
                let key = key.clone();
                let since = now_ms().saturating_sub(ttl_ms);
                let find = self.db.transaction_retrying(move |tx| idempotency::find(tx, &key, since));
                match tokio::time::timeout_at(deadline, find).await {
                    Ok(found) => found,
                    Err(_) => return (Err(self.store_too_slow()), false),
                }
            }
            None => Ok(None),
        };
        match known {
            Ok(Some(first)) if first.name == req.name && first.owner == req.owner => {}
            Ok(Some(first)) => return (Err(Refusal::KeyReused(first)), false),
            Ok(None) => {
                if let Err(refusal) = self.take_new_work(deadline).await {
                    return (Err(refusal), false);
                }
            }
            Err(e) => return (Err(Refusal::store_failed(&e)), false),
        }
        // Looked up again in the transaction that records a new request: two tries of one key
        // at once make one request.
        let record = self.db.transaction_retrying(move |tx| {
                let now = now_ms();
                if let Some(key) = &key {
                    if let Some(first) = idempotency::find(tx, key, now.saturating_sub(ttl_ms))? {
                        if first.name == name && first.owner == owner {
                            idempotency::replayed(tx, key)?;
                            return Ok(Seen::Again(first));
                        }
                        return Ok(Seen::OtherBody(first));
                    }
                    idempotency::remember(tx, key, space_id, saga_id, &name, &owner, now)?;
                }
                tx.write(
                    "INSERT INTO requests (space_id, saga_id, name, owner, mode, requested_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![space_id.to_string(), saga_id.to_string(), name, owner, mode, now],
                )?;
                Ok(Seen::New)
            });
        // Nothing is published before this commits: past the deadline, nothing started.
        let seen = match tokio::time::timeout_at(deadline, record).await {
            Ok(seen) => seen,
            Err(_) => return (Err(self.store_too_slow()), false),
        };
        match seen {
            Ok(Seen::New) => (self.start(req, space_id, saga_id, deadline).await, false),
            Ok(Seen::Again(first)) => (self.replay(first.space_id, first.saga_id, deadline).await, true),
            Ok(Seen::OtherBody(first)) => (Err(Refusal::KeyReused(first)), false),
            Err(e) => (Err(Refusal::store_failed(&e)), false),
        }
    }

    /// Whether to take new work, decided before the deadline: the broker is there, and the
    /// gateway's store has room to record it (a full disk is answered at once, with nothing
    /// started, rather than by a request that waits out its deadline).
    async fn take_new_work(&self, deadline: tokio::time::Instant) -> Result<(), Refusal> {
        if let Some(why) = self.db.out_of_room() {
            return Err(Refusal::NoRoom(why));
        }
        match tokio::time::timeout_at(deadline, self.ready()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(Refusal::Unavailable(format!("not taking new work: {reason}"))),
            Err(_) => {
                Err(Refusal::Unavailable("not taking new work: RabbitMQ did not answer in time".into()))
            }
        }
    }

    /// The gateway's own store did not answer before the deadline: nothing was published.
    fn store_too_slow(&self) -> Refusal {
        Refusal::Unavailable(format!(
            "the gateway's database did not answer within {} ms; nothing was started",
            self.opts.deadline.as_millis()
        ))
    }

    /// The request of an `Idempotency-Key` again: the outcome its space got, or, while it is
    /// still running, a wait for it beside the first client, up to the deadline. What the
    /// client is told is recorded: a client that was told 504 now knows.
    async fn replay(
        &self,
        space_id: Uuid,
        saga_id: Uuid,
        deadline: tokio::time::Instant,
    ) -> Result<SagaOutcome, Refusal> {
        // Waiting before reading: an outcome arriving in between is either in the row read
        // below or handed to this waiter.
        let (me, rx) = self.wait(saga_id);
        // Gone once it has answered (or its sender was dropped): then only the row is read.
        let mut rx = Some(rx);
        let mut logged = false;
        loop {
            // The row too, and again while waiting: the outcome may come to another gateway
            // instance on this data dir (the one that sent the request), which records it.
            let stored = match tokio::time::timeout_at(deadline, self.stored_outcome(saga_id)).await {
                Ok(Ok(stored)) => stored,
                Ok(Err(e)) => {
                    self.forget(saga_id, me);
                    return Err(Refusal::store_failed(&e));
                }
                Err(_) => {
                    self.forget(saga_id, me);
                    return Err(Refusal::Deadline { space_id, saga_id, after: self.opts.deadline });
                }
            };
            let outcome = match stored {
                Some(outcome) => Some(outcome),
                None => {
                    if !logged {
                        tracing::debug!(%saga_id, "a retry waits on the running request of its idempotency key");
                        logged = true;
                    }
                    let next = (tokio::time::Instant::now() + REPLAY_POLL).min(deadline);
                    match rx.as_mut() {
                        Some(waiting) => tokio::select! {
                            got = waiting => {
                                rx = None;
                                got.ok()
                            }
                            _ = tokio::time::sleep_until(next) => None,
                        },
                        None => {
                            tokio::time::sleep_until(next).await;
                            None
                        }
                    }
                }
            };
            if let Some(outcome) = outcome {
                self.forget(saga_id, me);
                self.tell(saga_id, outcome.status);
                return Ok(outcome);
            }
            if tokio::time::Instant::now() >= deadline {
                self.forget(saga_id, me);
                return Err(Refusal::Deadline { space_id, saga_id, after: self.opts.deadline });
            }
        }
    }

    /// The outcome recorded for `saga_id`, if one came.
    async fn stored_outcome(&self, saga_id: Uuid) -> Result<Option<SagaOutcome>, StoreError> {
        let json = self
            .db
            .transaction_retrying(move |c| {
                use baton_store::OptionalExtension;
                Ok(c.query_row(
                    "SELECT outcome FROM requests WHERE saga_id = ?1",
                    [saga_id.to_string()],
                    |r| r.get::<Option<String>>(0),
                )
                .optional()?
                .flatten())
            })
            .await?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }

    /// Send a new request (its row is written) and wait for its outcome, up to the deadline.
    async fn start(
        &self,
        req: CreateSpace,
        space_id: Uuid,
        saga_id: Uuid,
        deadline: tokio::time::Instant,
    ) -> Result<SagaOutcome, Refusal> {
        let input = Context { name: req.name, owner: req.owner, ..Default::default() };
        // The request's span (`api::traced`) is the start's parent.
        let trace = baton_telemetry::traceparent(TraceParent::new_root);
        tracing::debug!(%saga_id, %space_id, mode = %self.opts.mode, "request accepted");
        let msg = match self.opts.mode {
            Mode::Workflow | Mode::Hybrid => {
                let start = StartSaga {
                    schema: SCHEMA,
                    saga_id,
                    space_id,
                    workflow: self.opts.workflow.clone(),
                    input,
                    deadline: Some(saga_deadline(deadline)),
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
        let (me, rx) = self.wait(saga_id);
        let mut backoff = Duration::from_millis(50);
        loop {
            // Bounded by the deadline too: a connection attempt to a node that froze, or a
            // confirm that never comes, must not hold the client past it.
            let published =
                match tokio::time::timeout_at(deadline, self.publisher.publish_confirmed(&msg)).await {
                    Ok(published) => published,
                    Err(_) => break,
                };
            let refused = match published {
                Ok(()) => break,
                // No queue is bound for it: nothing started, and sending it again cannot help.
                Err(e @ PublishError::Returned(_)) => e,
                // A nack (a cluster still electing the queue's leader after losing a node) or a
                // channel that failed before the confirm (the message may or may not have gone
                // out): sent again on a fresh channel under the same id, while the deadline
                // allows; the receiver's inbox drops a double.
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %e, %saga_id, "publish not confirmed; sending it again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                // Out of time, refused to the end: nothing started.
                Err(e @ PublishError::Nacked) => e,
                // Out of time after a failed channel: the request may be running; the client
                // hears the deadline below, as for any request without an outcome.
                Err(_) => break,
            };
            self.forget(saga_id, me);
            self.tell(saga_id, 503);
            // Nothing started: a retry with the same key starts it anew.
            self.forget_key(saga_id).await;
            return Err(Refusal::Unavailable(format!("could not hand the request to RabbitMQ: {refused}")));
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => {
                self.forget(saga_id, me);
                self.tell(saga_id, 504);
                Err(Refusal::Deadline { space_id, saga_id, after: self.opts.deadline })
            }
        }
    }

    /// Forget the idempotency key of a request that never started, so that its retry starts it.
    async fn forget_key(&self, saga_id: Uuid) {
        if let Err(e) = self.db.transaction_retrying(move |tx| idempotency::forget(tx, saga_id)).await {
            tracing::error!(error = %e, %saga_id, "forgetting the idempotency key of a request that did not start failed");
        }
    }

    /// Record what the client was told when it was not the outcome itself. In the
    /// background: the answer goes out now, whatever the database is doing.
    fn tell(&self, saga_id: Uuid, status: u16) {
        let db = self.db.clone();
        tokio::spawn(async move {
            let r = db
                .transaction_retrying(move |c| {
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
        });
    }
}

/// How often a retry waiting on a running request reads its row, for an outcome recorded by
/// another gateway instance.
const REPLAY_POLL: Duration = Duration::from_millis(500);

/// What a request's `Idempotency-Key` says of it.
enum Seen {
    /// No key, or one not seen within its time to live: a new request.
    New,
    /// The key's request again, with the same body.
    Again(idempotency::First),
    /// The key came first with another body.
    OtherBody(idempotency::First),
}

/// When the saga must give up, for a client this gateway answers 504 at `deadline`: a margin
/// before it ([`saga_margin`]), so that a saga that gives up has time to roll back and tell
/// the client so (a definite answer) before the gateway's own timer would. As the budget left
/// now, and the wall-clock instant it ends at.
fn saga_deadline(deadline: tokio::time::Instant) -> ClientDeadline {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let budget = left.saturating_sub(saga_margin(left));
    let budget_ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
    let now = u64::try_from(now_ms()).unwrap_or(0);
    ClientDeadline { at_ms: now.saturating_add(budget_ms), budget_ms }
}

/// How long before the client's deadline a saga gives up: a sixth of the budget, between 200 ms
/// and 5 s (5 s of a 30 s deadline), which is what a rollback of four steps takes on a broker
/// that is slow but there.
fn saga_margin(budget: Duration) -> Duration {
    (budget / 6).clamp(Duration::from_millis(200), Duration::from_secs(5)).min(budget / 2)
}

impl Refusal {
    /// The gateway's own store failed before anything was published: nothing started. A full
    /// disk is a 507 (free some space), anything else a 503 (try again).
    fn store_failed(e: &StoreError) -> Refusal {
        if e.is_disk_full() {
            Refusal::NoRoom(format!("the gateway's disk is full ({e}); nothing was started; free some space"))
        } else {
            Refusal::Unavailable(format!("the gateway's database failed: {e}; nothing was started"))
        }
    }
}

/// Why a request got no outcome.
pub(crate) enum Refusal {
    Unavailable(String),
    /// The store has no room to record new work (a full disk): 507, nothing started.
    NoRoom(String),
    Deadline {
        space_id: Uuid,
        saga_id: Uuid,
        after: Duration,
    },
    /// The `Idempotency-Key` came first with another body.
    KeyReused(idempotency::First),
}
