//! Handlers, timer and start-up of the orchestrator.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_amqp::topology::{self, COMMANDS, EVENTS, OUTCOMES};
use baton_amqp::{
    Broker, ConsumerConfig, Envelope, HandleError, Identity, Outgoing, Publisher, TraceParent, consume,
};
use baton_health::{Health, Kind, running};
use baton_protocol::{
    Action, CANCEL, CancelSaga, Context, RETRY, RetrySaga, SCHEMA, START, START_REPLY, SagaOutcome, Service,
    Space, SpaceEvent, StartSaga, StepCommand, StepError, StepReply,
};
use baton_store::relay::{self, Wake};
use baton_store::retention::{self, Retention};
use baton_store::{Db, StoreError, Tx, inbox, now_ms, outbox};
use baton_workflow::{
    Deadline, Effect, HistoryEvent, Reply, Saga, SagaStatus, Workflow, answer_as_reply, undone_reply,
};

use crate::definitions::{self, Definitions, SagaClock};
use baton_store::{OptionalExtension, params};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{COMPONENT, MIGRATIONS};

/// How an orchestrator instance runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker (its password never shown).
    pub amqp_url: baton_amqp::AmqpUrl,
    /// Where the sagas are kept: shared by every instance, which can then continue any saga.
    pub store: baton_store::Location,
    /// This instance's name: the owner of the outbox rows it writes. Keep it
    /// stable across restarts, so that the instance finds the replies of the sagas it owns.
    pub instance: String,
    pub prefetch: u16,
    /// The workflows this instance runs, by name (the bundled ones by default).
    pub workflows: Vec<Workflow>,
    /// Hybrid mode: the follow-ups' queues, where its `space.created` goes, are made if missing
    /// when it starts, so that an announcement made before a follow-up ever started waits for it.
    pub announces: bool,
    /// Where the orchestrator reports its liveness and readiness.
    pub health: Health,
    /// How long finished sagas (with their history), inbox rows and tombstones are kept; older
    /// messages are dead-lettered on arrival ([`baton_store::retention`]).
    pub retain: Duration,
    /// The kind of the work queues it declares (`--queue-type`), the same for every component.
    pub queue_type: baton_amqp::topology::QueueType,
}

/// Run the orchestrator until `cancel`.
pub async fn run(opts: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let health = &opts.health;
    let consumer = |queue: String| {
        let attached = health.check(COMPONENT, &format!("consuming {queue}"), Kind::Ready);
        ConsumerConfig::new(queue, opts.prefetch).attached(attached).max_age(opts.retain)
    };
    // Registered first (failing until attached): a readiness asked while the orchestrator is
    // still starting does not pass without it.
    let commands = consumer(topology::command_queue(COMPONENT));
    let reply_consumer = consumer(topology::ORCHESTRATOR_REPLIES.into());
    let db = Db::open(&opts.store, COMPONENT, MIGRATIONS, &opts.instance).await?;
    db.health().register(health, COMPONENT);
    let broker = Broker::connect(opts.amqp_url.expose(), &format!("{COMPONENT} {}", opts.instance)).await?;
    let _broker_watch = baton_amqp::health::watch_broker(health, COMPONENT, &broker);
    let replies = topology::orchestrator_reply_queue();
    // The follow-ups' queues are theirs: checked (made only if missing), so that an orchestrator
    // under its own broker user, who may not declare them, starts on the imported topology.
    let followups = if opts.announces { topology::followup_queues() } else { Vec::new() };
    let own: Vec<_> = topology::queues_of(COMPONENT).into_iter().chain([replies.clone()]).collect();
    broker.declare_topology_needing(&own, &followups, opts.queue_type).await?;
    let publisher = Publisher::new(broker.clone());
    let workflows: HashMap<String, Workflow> =
        opts.workflows.iter().map(|w| (w.name.clone(), w.clone())).collect();
    // Before anything is consumed: the sagas it starts are pinned to these hashes, and any
    // orchestrator sharing the store can read them back to finish those sagas.
    let current = definitions::record(&db, &workflows).await?;
    let core = Arc::new(Core::new(db.clone(), Identity::of_url(COMPONENT, broker.url()), workflows, current));
    db.feed(core.wake.clone());
    let db_purge = db.clone();
    let in_flight = core.resume().await?;
    tracing::info!(instance = %opts.instance, in_flight, "orchestrator running");

    // The relay, the timer and the consumers (with their handlers), waited for until they have
    // stopped. After a crash the sagas they were driving are in the database; the next
    // incarnation picks them up (`resume`, the replies kept on its queue).
    let mut tasks = JoinSet::new();
    let live = |what: &str| health.check(COMPONENT, what, Kind::Live);
    tasks.spawn(running(
        live("relay running"),
        relay::run(db, publisher.clone(), core.wake.clone(), cancel.clone()),
    ));
    tasks.spawn(running(live("timer running"), Arc::clone(&core).timer_loop(cancel.clone())));
    tasks.spawn(running(
        live("retention running"),
        retention::run(db_purge, Retention::new(opts.retain), purges(), cancel.clone()),
    ));
    let c = Arc::clone(&core);
    tasks.spawn(running(
        live(&format!("consumer of {} running", commands.queue)),
        consume(
            broker.clone(),
            publisher.clone(),
            commands,
            move |env| {
                let c = Arc::clone(&c);
                async move {
                    match env.kind.as_str() {
                        CANCEL => c.on_cancel(env).await,
                        RETRY => c.on_retry(env, Arrived::Commands).await,
                        _ => c.on_start(env).await,
                    }
                }
            },
            cancel.clone(),
        ),
    ));
    let c = Arc::clone(&core);
    tasks.spawn(running(
        live(&format!("consumer of {} running", reply_consumer.queue)),
        consume(
            broker.clone(),
            publisher,
            reply_consumer,
            move |env| {
                let c = Arc::clone(&c);
                async move {
                    if env.kind == RETRY {
                        c.on_retry(env, Arrived::Replies).await
                    } else {
                        c.on_reply(env).await
                    }
                }
            },
            cancel.clone(),
        ),
    ));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a task of the orchestrator died");
        }
    }
    broker.close().await;
    tracing::info!("orchestrator stopped");
    Ok(())
}

/// The earliest `wake_at` the timer knows of; transitions lower it and wake the timer.
#[derive(Default)]
struct Timer {
    next: AtomicU64,
    notify: Notify,
}

impl Timer {
    /// Make sure the timer wakes by `at` (0 in `next` means "nothing scheduled").
    fn schedule(&self, at: Option<u64>) {
        let Some(at) = at else { return };
        let mut cur = self.next.load(Ordering::Acquire);
        loop {
            if cur != 0 && cur <= at {
                return;
            }
            match self.next.compare_exchange_weak(cur, at, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.notify.notify_one();
                    return;
                }
                Err(seen) => cur = seen,
            }
        }
    }
}

struct Core {
    db: Db,
    wake: Wake,
    timer: Timer,
    reply_key: String,
    /// This instance's reply queue, and the message types it takes.
    /// The queues it consumes, named once for the reasons of rejected messages.
    commands: String,
    replies: String,
    reply_kinds: Vec<String>,
    /// Who sent a message: a start is taken only from a gateway, a step's reply only from that
    /// step's service.
    identity: Identity,
    /// The workflows new sagas start on, by name.
    workflows: HashMap<String, Workflow>,
    /// The content hash of each loaded workflow, pinned to every saga it starts.
    current: HashMap<String, String>,
    /// Every definition a saga in flight may run on, read from the store by hash.
    definitions: Definitions,
    /// Every time a transition sees; never the wall clock, which may jump.
    clock: SagaClock,
    /// The sagas this instance moved last, as it stored them.
    recent: Arc<Recent>,
}

/// What a saga row carries besides its state.
#[derive(Clone)]
struct Meta {
    reply_to: Option<String>,
    trace: TraceParent,
    /// The hash of the definition the saga started on.
    definition: Option<String>,
    /// A child saga's parent, and the parent's action it runs for.
    parent: Option<(Uuid, usize)>,
}

/// A saga as this instance stored it, and its `version` then.
struct Known {
    saga: Saga,
    meta: Meta,
    version: i64,
}

/// How many sagas [`Recent`] keeps: far more than are in flight at once under load, and a few
/// megabytes at most.
const RECENT_MAX: usize = 2_048;

/// The sagas this instance moved last, each as it stored it, the least recent dropped first.
///
/// A reply that such a state awaits ([`Saga::awaits`]) moves the saga from it, without reading
/// it back: on PostgreSQL the reply's transaction then waits for no answer before its commit.
/// Another instance, a timer or an operator may have moved the saga since (replies go to any
/// instance), so the write names the version it started from ([`apply`]'s guard) and fails if
/// the row is not at it any more; the reply is then handled again from the row.
struct Recent(Mutex<hashlink::LruCache<Uuid, Known>>);

impl Recent {
    fn new(max: usize) -> Recent {
        Recent(Mutex::new(hashlink::LruCache::new(max)))
    }

    /// Saga `id` as this instance stored it last, taken out: whoever moves it next, here or
    /// elsewhere, leaves this copy behind.
    fn take(&self, id: Uuid) -> Option<Known> {
        self.0.lock().expect("recent sagas").remove(&id)
    }

    /// Keep `known` as this instance stored it, while it still has replies to wait for.
    fn keep(&self, known: Known) {
        if known.saga.status.is_in_flight() {
            self.0.lock().expect("recent sagas").insert(known.saga.id, known);
        }
    }
}

/// The only sender of starts: the gateway (`baton_gateway::COMPONENT`, which this crate may not
/// depend on).
const GATEWAY: &str = topology::GATEWAY;

/// What `orchestrator.commands` takes: the gateway's starts, and operators' cancels and retries
/// (there, rather than on an instance's own queue, so that whichever instance is alive handles
/// them).
const COMMAND_KINDS: [&str; 3] = [START, CANCEL, RETRY];

/// The queue an operator's retry came on: `orchestrator.commands` (the CLI and the console), or
/// the shared reply queue (where retries were sent before).
#[derive(Debug, Clone, Copy)]
enum Arrived {
    Commands,
    Replies,
}

/// What an instance's reply queue takes: the replies to every step's commands, and operators'
/// retries.
fn reply_kinds() -> Vec<String> {
    Service::ALL
        .into_iter()
        .flat_map(|s| std::iter::once(s.do_type()).chain(s.undo_type()))
        .map(baton_protocol::reply_type)
        .chain([RETRY.to_owned()])
        .collect()
}

fn corrupt(cause: impl Into<baton_store::Cause>) -> StoreError {
    StoreError::Corrupt { table: "sagas", cause: cause.into() }
}

impl Core {
    /// The handlers of an instance on `db`, running `workflows` (`current`: their hashes, as
    /// [`definitions::record`] stored them).
    fn new(
        db: Db,
        identity: Identity,
        workflows: HashMap<String, Workflow>,
        current: HashMap<String, String>,
    ) -> Core {
        let definitions = Definitions::with(&workflows);
        Core {
            db,
            wake: Wake::default(),
            timer: Timer::default(),
            reply_key: topology::ORCHESTRATOR.into(),
            commands: topology::command_queue(COMPONENT),
            replies: topology::orchestrator_reply_queue().name,
            reply_kinds: reply_kinds(),
            identity,
            workflows,
            current,
            definitions,
            clock: SagaClock::start(),
            recent: Arc::new(Recent::new(RECENT_MAX)),
        }
    }

    /// Re-arm the sagas in flight on this process's clock ([`Saga::rearm`]: the previous
    /// process's times may be off by any clock jump), count them and arm the timer. Each saga
    /// is re-armed in a transaction of its own, retried on a conflict: other instances may be
    /// moving the same sagas on meanwhile (one transaction over them all would conflict with
    /// every one of their commits, and a failed start is a lost instance).
    async fn resume(self: &Arc<Self>) -> Result<i64, StoreError> {
        let ids = self.db.read_committed(crate::query::in_flight_ids).await?;
        let rearmed = ids.iter().map(|&id| {
            let core = Arc::clone(self);
            self.db.transaction_retrying(move |tx| {
                let now = core.clock.now();
                let Some((mut saga, meta)) = load(tx, id)? else { return Ok(false) };
                let (effects, missing) = match core.definitions.get(tx, meta.definition.as_deref())? {
                    Ok(wf) => {
                        saga.rearm(&wf, now);
                        (Vec::new(), false)
                    }
                    Err(why) => (saga.definition_missing(why.to_string()), true),
                };
                core.settle(tx, &saga, effects, &meta, &meta.trace, now, None)?;
                Ok(missing)
            })
        });
        let missing = futures_util::future::try_join_all(rearmed).await?.into_iter().filter(|m| *m).count();
        let n = ids.len() as i64;
        let next: Option<i64> = self
            .db
            .read_committed(|tx| tx.query_row("SELECT MIN(wake_at) FROM sagas", (), |r| r.get(0)))
            .await?;
        if missing > 0 {
            tracing::warn!(
                sagas = missing,
                "sagas in flight stopped as definition_missing: the definitions they started on are not in the store; \
                 start an orchestrator with those workflow files, then `baton workflows retry <id>` \
                 (`baton workflows list --state definition_missing` lists them)"
            );
        }
        self.timer.schedule(next.map(|n: i64| n as u64));
        Ok(n)
    }

    /// A request to start a saga, read before its span opens, as `on_reply` reads a reply.
    async fn on_start(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let start: StartSaga = env.decode(&self.commands, &COMMAND_KINDS)?;
        self.handle_start(env, start).await
    }

    #[tracing::instrument(skip_all, fields(saga_id = %start.saga_id, message_id = %env.message_id, otel.name = "saga start"))]
    async fn handle_start(self: Arc<Self>, env: Envelope, start: StartSaga) -> Result<(), HandleError> {
        self.identity.expect(&env, &[GATEWAY])?;
        let wf = self.workflows.get(&start.workflow).cloned();
        let definition = self.current.get(&start.workflow).cloned();
        let meta =
            Meta { reply_to: env.reply_to.clone(), trace: env.traceparent.clone(), definition, parent: None };
        let hop = baton_telemetry::traceparent(|| env.traceparent.child());
        let core = Arc::clone(&self);
        let clock = self.clock;
        let wake_at = self
            .db
            .transaction(move |tx| {
                // Sent ahead of the inbox's check and read with its answer: one round trip.
                let exists = tx.prefetch("SELECT 1 FROM sagas WHERE saga_id = ?1", [start.saga_id.to_string()])?;
                if inbox::seen(tx, env.message_id)?.is_some() || exists.first(tx)?.is_some() {
                    return Ok(None);
                }
                inbox::record(tx, env.message_id)?;
                let now = clock.now();
                let Some(wf) = wf else {
                    // Nothing started, nothing to undo: answer at once.
                    let outcome = SagaOutcome {
                        schema: SCHEMA,
                        saga_id: start.saga_id,
                        space_id: start.space_id,
                        status: 422,
                        space: None,
                        error: Some(StepError {
                            error: format!("no workflow is named `{}`", start.workflow),
                            step: None,
                            status: 422,
                            workflow_id: Some(start.saga_id),
                        }),
                    };
                    if let Some(to) = &meta.reply_to {
                        outbox::push(tx, answer_message(to, &outcome, &hop))?;
                    }
                    return Ok(None);
                };
                let wall_now = now_ms() as u64;
                if let Some(d) = start.deadline
                    && d.at_ms <= wall_now
                {
                    tracing::warn!(
                        saga_id = %start.saga_id, late_ms = wall_now - d.at_ms,
                        "a start arrived past its client's deadline: it waited in a queue, or this host's \
                         clock is ahead of the gateway's; it starts no step and answers 503"
                    );
                }
                let deadline = start.deadline.map(|d| Deadline::of(d, now, wall_now));
                let (saga, effects) =
                    Saga::start(&wf, start.saga_id, start.space_id, start.input, deadline, now);
                tx.write(
                    "INSERT INTO sagas (saga_id, space_id, workflow, status, state, reply_to, traceparent, created_at, updated_at,
                                        definition_hash, deadline_at, name, owner)
                     VALUES (?1, ?2, ?3, 'running', '{}', ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        saga.id.to_string(),
                        saga.space_id.to_string(),
                        wf.name,
                        meta.reply_to,
                        meta.trace.0,
                        now as i64,
                        meta.definition,
                        saga.deadline.map(|d| d.at_ms as i64),
                        saga.context.name,
                        saga.context.owner
                    ],
                )?;
                let wake = core.settle(tx, &saga, effects, &meta, &hop, now, None)?;
                // Inserted at version 0, moved once by its first transition.
                let recent = Arc::clone(&core.recent);
                tx.on_commit(move || recent.keep(Known { saga, meta, version: 1 }));
                Ok(wake)
            })
            .await
            .map_err(HandleError::from)?;
        self.timer.schedule(wake_at);
        self.wake.wake();
        Ok(())
    }

    /// A step's reply, read before its span opens so that the span starts with the saga's id
    /// (a field recorded later is one more call through every layer). A body that cannot be
    /// read is logged by the consumer, in the delivery's span, as every handler's error is.
    async fn on_reply(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let reply: StepReply = env.decode(&self.replies, &self.reply_kinds)?;
        self.handle_reply(env, reply).await
    }

    #[tracing::instrument(skip_all, fields(saga_id = %reply.saga_id, step = reply.step.name(), message_id = %env.message_id, otel.name = format!("saga {}", env.kind)))]
    async fn handle_reply(self: Arc<Self>, env: Envelope, reply: StepReply) -> Result<(), HandleError> {
        let expected = match reply.action {
            Action::Do => Some(reply.step.do_type()),
            Action::Undo => reply.step.undo_type(),
        }
        .map(baton_protocol::reply_type);
        if expected.as_deref() != Some(env.kind.as_str()) {
            return Err(HandleError::reject(format!(
                "message type `{}` does not match its body (a {} {} reply)",
                env.kind,
                reply.step,
                reply.action.as_str()
            )));
        }
        self.identity.expect(&env, &[reply.step.name()])?;
        let (step, action, index) = (reply.step, reply.action, reply.index.map(|i| i as usize));
        let saga_id = reply.saga_id;
        let input = Reply::from(reply);
        let known = self.recent.take(saga_id).filter(|k| k.saga.awaits(&input));
        let crash_at = self
            .advance(env.message_id, saga_id, known, hop(&env), move |saga, wf, now| {
                let effects = saga.on_reply(wf, input, now);
                let at = crate::crash_points::dangerous_instant(saga, step, index, action)
                    .or_else(|| crate::crash_points::announcing(&effects));
                (effects, at)
            })
            .await?;
        baton_crash::crash_point!(crash_at);
        Ok(())
    }

    /// An operator asks to finish a rollback (`baton workflows retry`).
    #[tracing::instrument(skip_all, fields(saga_id, message_id = %env.message_id))]
    async fn on_retry(self: Arc<Self>, env: Envelope, arrived: Arrived) -> Result<(), HandleError> {
        let req: RetrySaga = match arrived {
            Arrived::Commands => env.decode(&self.commands, &COMMAND_KINDS)?,
            Arrived::Replies => env.decode(&self.replies, &self.reply_kinds)?,
        };
        tracing::Span::current().record("saga_id", tracing::field::display(req.saga_id));
        let _moved = self.recent.take(req.saga_id);
        self.advance(env.message_id, req.saga_id, None, hop(&env), |saga, wf, now| {
            let effects = saga.retry_compensation(wf, now);
            if effects.is_empty() {
                tracing::info!(
                    status = saga.status.as_str(),
                    "retry of a saga not in compensation_failed; nothing to do"
                );
            }
            (effects, None::<()>)
        })
        .await?;
        Ok(())
    }

    /// An operator cancels a running saga (`POST /workflows/{id}/cancel`, `baton workflows
    /// cancel`): [`Saga::cancel`] undoes what it did, leaves a saga already cancelled as it is,
    /// or records why it cannot.
    #[tracing::instrument(skip_all, fields(saga_id, message_id = %env.message_id))]
    async fn on_cancel(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let req: CancelSaga = env.decode(&self.commands, &COMMAND_KINDS)?;
        tracing::Span::current().record("saga_id", tracing::field::display(req.saga_id));
        let _moved = self.recent.take(req.saga_id);
        self.advance(env.message_id, req.saga_id, None, hop(&env), move |saga, wf, now| {
            match saga.why_not_cancellable() {
                Some(why) => tracing::info!(%why, by = %req.by, "cancel refused"),
                None if saga.cancelled => {
                    tracing::info!(by = %req.by, "saga already cancelled; nothing more to do")
                }
                None => tracing::info!(by = %req.by, "saga cancelled; undoing its steps"),
            }
            (saga.cancel(wf, &req.by, now), None::<()>)
        })
        .await?;
        Ok(())
    }

    /// One transition of one saga for message `message_id`, in one transaction: skip a
    /// duplicate, load the saga, let `step` decide, carry out its effects, store the new state;
    /// then arm the timer and wake the relay. Returns what `step` returned beside its effects.
    /// `hop` is the handling's trace context: the parent of the commands and answer it sends.
    ///
    /// `known`: the saga as this instance stored it last, when the message is a reply that
    /// state awaits. The transition then starts from it, unread; if the saga moved since, its
    /// write fails, and the message is handled again from the row.
    ///
    /// A saga not found in a group commit's transaction is looked for again in a transaction
    /// of its own before the message is dead-lettered: on PostgreSQL a group's snapshot dates
    /// from its first member, and another instance may have committed the saga's start since
    /// (the reply in hand proves it did).
    async fn advance<T, F>(
        self: &Arc<Self>,
        message_id: Uuid,
        saga_id: Uuid,
        known: Option<Known>,
        hop: TraceParent,
        step: F,
    ) -> Result<Option<T>, HandleError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Saga, &Workflow, u64) -> (Vec<Effect>, Option<T>) + Clone + Send + 'static,
    {
        let spare = known.is_some().then(|| (step.clone(), hop.clone()));
        let core = Arc::clone(self);
        let again = hop.clone();
        let first =
            self.db.transaction(move |tx| core.transition(tx, message_id, saga_id, &hop, known, step)).await;
        let first = match (first, spare) {
            (Err(e), Some((step, hop))) => {
                // The guard's refusal: another instance (or this one's timer) moved the saga
                // meanwhile. An outage, or a neighbour's failure, is only tried again.
                if !e.is_transient() {
                    baton_metrics::store_conflict_retried(COMPONENT);
                }
                tracing::debug!(error = %e, "moving the saga from the state this instance kept failed; reading it");
                let core = Arc::clone(self);
                self.db.transaction(move |tx| core.transition(tx, message_id, saga_id, &hop, None, step)).await
            }
            (first, _) => first,
        }
        .map_err(HandleError::from)?;
        let (wake_at, extra) = match first {
            Ok(done) => done,
            Err(step) => {
                let core = Arc::clone(self);
                self.db
                    .call(move |tx| core.transition(tx, message_id, saga_id, &again, None, step))
                    .await
                    .map_err(HandleError::from)?
                    .map_err(|_| {
                        HandleError::reject(format!(
                            "saga {saga_id} is not one of this orchestrator instance's"
                        ))
                    })?
            }
        };
        self.timer.schedule(wake_at);
        self.wake.wake();
        Ok(extra)
    }

    /// [`Core::advance`]'s transaction: the timer's new deadline and what `step` returned, or
    /// `step` back when the saga is not in this transaction's view.
    // The nested result reads as the doc above says; an alias would only hide `step` coming back.
    #[allow(clippy::type_complexity)]
    fn transition<T, F>(
        &self,
        tx: &Tx<'_>,
        message_id: Uuid,
        saga_id: Uuid,
        hop: &TraceParent,
        known: Option<Known>,
        step: F,
    ) -> Result<Result<(Option<u64>, Option<T>), F>, StoreError>
    where
        F: FnOnce(&mut Saga, &Workflow, u64) -> (Vec<Effect>, Option<T>),
    {
        // A known state awaits this very message: it cannot have been handled (that would have
        // moved the saga), and the guard on the write checks that nothing else moved it.
        let (mut saga, meta, version, guard) = match known {
            Some(Known { saga, meta, version }) => (saga, meta, version, Some(version)),
            None => {
                // Sent ahead of the inbox's check and read with its answer: one round trip.
                let saga = fetch(tx, saga_id)?;
                if inbox::seen(tx, message_id)?.is_some() {
                    tx.on_commit(|| baton_metrics::inbox_duplicate(COMPONENT));
                    return Ok(Ok((None, None)));
                }
                let Some((saga, meta, version)) = saga.first(tx)?.map(|r| saga_of(&r)).transpose()? else {
                    return Ok(Err(step));
                };
                (saga, meta, version, None)
            }
        };
        let now = self.clock.now();
        let (effects, extra) = match self.definitions.get(tx, meta.definition.as_deref())? {
            Ok(wf) => step(&mut saga, &wf, now),
            // Stopped for an operator, and the message is handled: never a DLQ.
            Err(why) => {
                tracing::warn!(saga_id = %saga.id, workflow = %saga.workflow, why = &why as &dyn std::error::Error, "saga stopped: its definition is missing");
                (saga.definition_missing(why.to_string()), None)
            }
        };
        let wake = self.settle(tx, &saga, effects, &meta, hop, now, guard)?;
        // Recorded only once the message is known to be handled here (a message rejected to
        // the DLQ must still count as new when an operator replays it), and after the guarded
        // write: a known state's stale guess fails there first.
        inbox::record(tx, message_id)?;
        let recent = Arc::clone(&self.recent);
        tx.on_commit(move || recent.keep(Known { saga, meta, version: version + 1 }));
        Ok(Ok((wake, extra)))
    }

    /// Fire due timeouts and retries in rounds ([`Core::fire_due`]). A round the store cannot
    /// commit (a full disk) is tried again with a growing pause, said once when the trouble
    /// starts and once when it is over.
    async fn timer_loop(self: Arc<Self>, cancel: CancellationToken) {
        // Since when rounds fail, their pauses, and whether that was said (a conflict with
        // another instance is not worth a warning; it is waited out all the same, with growing
        // pauses, so that rounds and handlers conflicting again and again do not spin).
        let mut trouble: Option<(std::time::Instant, backon::ExponentialBackoff, bool)> = None;
        loop {
            let next = self.timer.next.load(Ordering::Acquire);
            let now = self.clock.now();
            let sleep = if next == 0 {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(next.saturating_sub(now))
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.timer.notify.notified() => continue,
                _ = tokio::time::sleep(sleep.min(Duration::from_secs(1))) => {}
            }
            if next == 0 || next > self.clock.now() {
                continue;
            }
            // Forget the fired deadline; the round below computes the next one.
            self.timer.next.store(0, Ordering::Release);
            match self.fire_due().await {
                Ok(next) => {
                    if let Some((since, _, true)) = trouble.take() {
                        tracing::info!(after = ?since.elapsed(), "timer rounds commit again");
                    }
                    self.timer.schedule(next);
                    self.wake.wake();
                }
                Err(e) => {
                    let (_, waits, said) =
                        trouble.get_or_insert_with(|| (std::time::Instant::now(), timer_backoff(), false));
                    if !*said && !e.is_conflict() {
                        *said = true;
                        if e.is_transient() {
                            tracing::warn!(error = %e, "a timer round cannot commit; trying again with a growing pause");
                        } else {
                            tracing::error!(error = %e, "a timer round failed; trying again with a growing pause");
                        }
                    }
                    let wait = waits.next().unwrap_or(TIMER_RETRY_MAX);
                    tracing::debug!(error = %e, retry_in = ?wait, "timer round failed");
                    self.timer.schedule(Some(self.clock.now() + wait.as_millis() as u64));
                }
            }
        }
    }

    /// One timer round: which sagas are due, and then when the next one is, are read apart
    /// ([`Db::read_committed`]: on PostgreSQL a read over every saga's wake time would make
    /// the round conflict with every other instance's transitions); each due saga is fired in
    /// a transaction of its own (members of one group commit), which reads it again: a saga
    /// another instance moved on meanwhile has nothing due, so no timer fires twice.
    async fn fire_due(self: &Arc<Self>) -> Result<Option<u64>, StoreError> {
        let now = self.clock.now();
        let due: Vec<String> = self
            .db
            .read_committed(move |tx| {
                tx.query_map(
                    "SELECT saga_id FROM sagas WHERE wake_at <= ?1 ORDER BY wake_at LIMIT 1000",
                    [now as i64],
                    |r| r.get(0),
                )
            })
            .await?;
        let fired = due.into_iter().map(|id| {
            let core = Arc::clone(self);
            self.db.transaction(move |tx| core.fire(tx, &id, now))
        });
        futures_util::future::try_join_all(fired).await?;
        let next: Option<i64> = self
            .db
            .read_committed(|tx| tx.query_row("SELECT MIN(wake_at) FROM sagas", (), |r| r.get(0)))
            .await?;
        Ok(next.map(|n| n as u64))
    }

    /// Fire saga `id`'s timers due at `now`, if it is still there and still has any.
    fn fire(&self, tx: &Tx<'_>, id: &str, now: u64) -> Result<(), StoreError> {
        let id = Uuid::parse_str(id).map_err(corrupt)?;
        // Moved here: the state this instance stored last is no longer the saga's.
        let _moved = self.recent.take(id);
        let Some((mut saga, meta)) = load(tx, id)? else { return Ok(()) };
        let effects = match self.definitions.get(tx, meta.definition.as_deref())? {
            Ok(wf) => saga.on_tick(&wf, now),
            Err(why) => {
                tracing::warn!(saga_id = %id, workflow = %saga.workflow, why = &why as &dyn std::error::Error, "saga stopped: its definition is missing");
                saga.definition_missing(why.to_string())
            }
        };
        // A timer's retry or compensation follows the saga's start: no message is at hand.
        self.settle(tx, &saga, effects, &meta, &meta.trace, now, None)?;
        Ok(())
    }

    /// Carry out a transition's effects ([`apply`]), then what they set off in other sagas of
    /// the same store, in the same transaction: a child saga started or asked to undo itself,
    /// a parent told how its child ended. Each saga is stored before the next is loaded, so a
    /// parent and its child never see each other half-moved. Returns the earliest wake-up.
    /// `guard`: `saga`'s version as it was read, when it was not ([`apply`]).
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        tx: &Tx<'_>,
        saga: &Saga,
        effects: Vec<Effect>,
        meta: &Meta,
        hop: &TraceParent,
        now: u64,
        guard: Option<i64>,
    ) -> Result<Option<u64>, StoreError> {
        let first = apply(tx, saga, effects, meta, hop, &self.reply_key, now, guard)?;
        let mut wake = first.wake;
        let mut work: std::collections::VecDeque<Cascade> = first.cascade.into();
        while let Some(next) = work.pop_front() {
            let told_parent = matches!(next, Cascade::ToParent { .. });
            let Some(done) = (match next {
                Cascade::StartChild(start) => self.start_child(tx, start, now)?,
                Cascade::UndoChild { parent, index } => self.undo_child(tx, parent, index, now)?,
                Cascade::ToParent { parent, reply } => self.tell_parent(tx, parent, reply, now)?,
            }) else {
                continue;
            };
            if told_parent {
                // After the commit in which a child ended and its parent moved on, before the
                // parent's next command is published.
                tx.on_commit(|| baton_crash::crash_point!(baton_crash::CHILD_ENDED));
            }
            wake = match (wake, done.wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            work.extend(done.cascade);
        }
        Ok(wake)
    }

    /// Start the child saga of a parent's action, pinned to the definition of its workflow
    /// loaded now; or, when a later attempt finds it started, tell the parent how it ended.
    fn start_child(&self, tx: &Tx<'_>, start: ChildStart, now: u64) -> Result<Option<Applied>, StoreError> {
        if let Some(id) = child_of(tx, start.parent, start.index)? {
            let Some((child, _)) = load(tx, id)? else { return Ok(None) };
            let reply = child.outcome_as_child(start.service, start.index);
            let cascade = reply.map(|reply| Cascade::ToParent { parent: start.parent, reply });
            return Ok(Some(Applied { wake: None, cascade: cascade.into_iter().collect() }));
        }
        let (Some(wf), Some(hash)) = (self.workflows.get(&start.workflow), self.current.get(&start.workflow))
        else {
            let why =
                format!("no workflow is named `{}` on this orchestrator; load its file", start.workflow);
            let failure = baton_workflow::Failure { service: start.service, status: 422, reason: why };
            let reply = answer_as_reply(start.service, start.index, 422, Context::default(), Some(failure));
            return Ok(Some(Applied {
                wake: None,
                cascade: vec![Cascade::ToParent { parent: start.parent, reply }],
            }));
        };
        let (saga, effects) =
            Saga::start(wf, Uuid::new_v4(), start.space_id, start.context, start.deadline, now);
        let meta = Meta {
            reply_to: None,
            trace: start.trace,
            definition: Some(hash.clone()),
            parent: Some((start.parent, start.index)),
        };
        tx.write(
            "INSERT INTO sagas (saga_id, space_id, workflow, status, state, traceparent, created_at, updated_at,
                                definition_hash, deadline_at, parent_id, parent_index)
             VALUES (?1, ?2, ?3, 'running', '{}', ?4, ?5, ?5, ?6, ?7, ?8, ?9)",
            params![
                saga.id.to_string(),
                saga.space_id.to_string(),
                wf.name,
                meta.trace.0,
                now as i64,
                meta.definition,
                saga.deadline.map(|d| d.at_ms as i64),
                start.parent.to_string(),
                start.index as i64
            ],
        )?;
        apply(tx, &saga, effects, &meta, &meta.trace, &self.reply_key, now, None).map(Some)
    }

    /// Ask the child saga of a parent's action to undo every step it did; one never started
    /// has nothing to undo.
    fn undo_child(
        &self,
        tx: &Tx<'_>,
        parent: Uuid,
        index: usize,
        now: u64,
    ) -> Result<Option<Applied>, StoreError> {
        let loaded = match child_of(tx, parent, index)? {
            Some(id) => load(tx, id)?,
            None => None,
        };
        let Some((mut child, meta)) = loaded else {
            // Any service: the parent reads the reply as its own action's.
            let reply = undone_reply(Service::Records, index);
            return Ok(Some(Applied { wake: None, cascade: vec![Cascade::ToParent { parent, reply }] }));
        };
        let effects = match self.definitions.get(tx, meta.definition.as_deref())? {
            Ok(wf) => child.undo_as_child(&wf, now),
            Err(why) => child.definition_missing(why.to_string()),
        };
        apply(tx, &child, effects, &meta, &meta.trace, &self.reply_key, now, None).map(Some)
    }

    /// Tell a parent saga how its child ended: its action's reply.
    fn tell_parent(
        &self,
        tx: &Tx<'_>,
        parent: Uuid,
        reply: Reply,
        now: u64,
    ) -> Result<Option<Applied>, StoreError> {
        let Some((mut saga, meta)) = load(tx, parent)? else {
            tracing::warn!(%parent, "a child saga ended, but its parent is gone (purged?); nothing to tell");
            return Ok(None);
        };
        let effects = match self.definitions.get(tx, meta.definition.as_deref())? {
            Ok(wf) => saga.on_child_reply(&wf, reply, now),
            Err(why) => saga.definition_missing(why.to_string()),
        };
        apply(tx, &saga, effects, &meta, &meta.trace, &self.reply_key, now, None).map(Some)
    }
}

/// What one saga's transition sets off in another, carried out by [`Core::settle`].
enum Cascade {
    StartChild(ChildStart),
    UndoChild { parent: Uuid, index: usize },
    ToParent { parent: Uuid, reply: Reply },
}

/// A child saga to start (or to ask how it ended) for action `index` of saga `parent`.
struct ChildStart {
    parent: Uuid,
    index: usize,
    service: Service,
    workflow: String,
    space_id: Uuid,
    context: Context,
    deadline: Option<Deadline>,
    trace: TraceParent,
}

/// A transition carried out: the saga's next wake-up, and what it set off in other sagas.
struct Applied {
    wake: Option<u64>,
    cascade: Vec<Cascade>,
}

/// The child saga started for action `index` of saga `parent`, if any.
fn child_of(tx: &Tx<'_>, parent: Uuid, index: usize) -> Result<Option<Uuid>, StoreError> {
    let id: Option<String> = tx
        .query_row(
            "SELECT saga_id FROM sagas WHERE parent_id = ?1 AND parent_index = ?2",
            params![parent.to_string(), index as i64],
            |r| r.get(0),
        )
        .optional()?;
    id.map(|id| Uuid::parse_str(&id).map_err(corrupt)).transpose()
}

/// What the orchestrator purges beside the base tables: sagas that ended for good (completed,
/// rolled back, cancelled) with their history, history first. Sagas waiting for an operator
/// (`compensation_failed`, `definition_missing`) are kept whatever their age.
fn purges() -> Vec<retention::Purge> {
    // The same batch for both statements: same transaction, same order.
    let settled = SagaStatus::sql_in("status", SagaStatus::is_settled);
    let finished = format!(
        "SELECT saga_id FROM sagas WHERE {settled} AND updated_at < ?1 ORDER BY updated_at, saga_id LIMIT ?2"
    );
    vec![retention::Purge::with_dependents(
        "finished sagas and their history",
        vec![format!("DELETE FROM history WHERE saga_id IN ({finished})")],
        format!("DELETE FROM sagas WHERE saga_id IN ({finished})"),
    )]
}

/// The longest pause between two timer rounds that failed.
const TIMER_RETRY_MAX: Duration = Duration::from_secs(5);

fn timer_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(TIMER_RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

fn load(tx: &Tx<'_>, id: Uuid) -> Result<Option<(Saga, Meta)>, StoreError> {
    let loaded = fetch(tx, id)?.first(tx)?.map(|r| saga_of(&r)).transpose()?;
    Ok(loaded.map(|(saga, meta, _)| (saga, meta)))
}

/// Send the read of saga `id` ahead of the statements after it ([`baton_store::Prefetched`]).
fn fetch(tx: &Tx<'_>, id: Uuid) -> Result<baton_store::Prefetched, StoreError> {
    tx.prefetch(
        "SELECT state, reply_to, traceparent, definition_hash, parent_id, parent_index, version
         FROM sagas WHERE saga_id = ?1",
        [id.to_string()],
    )
}

/// A saga, its bookkeeping and its version, from the row [`fetch`] read.
fn saga_of(r: &baton_store::Row) -> Result<(Saga, Meta, i64), StoreError> {
    let state: String = r.get(0)?;
    let (reply_to, trace, definition): (Option<String>, String, Option<String>) =
        (r.get(1)?, r.get(2)?, r.get(3)?);
    let (parent_id, parent_index): (Option<String>, Option<i64>) = (r.get(4)?, r.get(5)?);
    let saga: Saga = serde_json::from_str(&state).map_err(corrupt)?;
    let parent = match (parent_id, parent_index) {
        (Some(p), Some(i)) => Some((Uuid::parse_str(&p).map_err(corrupt)?, i as usize)),
        _ => None,
    };
    Ok((saga, Meta { reply_to, trace: TraceParent(trace), definition, parent }, r.get(6)?))
}

/// Carry out a transition's effects and store the new state, in the caller's transaction.
/// `hop` is the trace context the effects follow: every command is sent from a span of its own
/// step ([`step_trace`]), the answer from `hop` itself. Returns the saga's next wake-up.
///
/// Every transition counts the row's `version` up. `guard`: the version the transition started
/// from, when it did not read the row in this transaction ([`Recent`]); a row at another one was
/// moved since, and the write fails (its version would be NULL) rather than undo that move.
#[allow(clippy::too_many_arguments)]
fn apply(
    tx: &Tx<'_>,
    saga: &Saga,
    effects: Vec<Effect>,
    meta: &Meta,
    hop: &TraceParent,
    reply_key: &str,
    now: u64,
    guard: Option<i64>,
) -> Result<Applied, StoreError> {
    let mut answer_status = None;
    let mut cascade = Vec::new();
    for effect in effects {
        cascade.extend(for_other_saga(saga, meta, hop, &effect));
        match effect {
            // Carried out in the other saga by `Core::settle`.
            Effect::Child { .. } | Effect::Undone => {}
            Effect::Send { index, service, action, attempt, context } => {
                let kind = match action {
                    Action::Do => service.do_type(),
                    Action::Undo => {
                        service.undo_type().expect("the state machine only undoes compensable steps")
                    }
                };
                let body = StepCommand {
                    schema: SCHEMA,
                    saga_id: saga.id,
                    space_id: saga.space_id,
                    step: service,
                    action,
                    attempt,
                    index: Some(index as u32),
                    context,
                };
                let msg = Outgoing::new(
                    COMMANDS,
                    service.name(),
                    kind,
                    saga.id,
                    COMPONENT,
                    step_trace(hop, saga, service, action, attempt),
                    &body,
                )
                .reply_to(reply_key)
                .mode("workflow")
                .attempt(attempt);
                outbox::push(tx, msg)?;
            }
            Effect::Emit { event, context } => {
                // An event step (hybrid mode): announced in this transaction, awaited by nobody.
                let body = SpaceEvent {
                    schema: SCHEMA,
                    space_id: saga.space_id,
                    context,
                    step: None,
                    status: None,
                    reason: None,
                };
                // Its own key (`hybrid.space.created`): events mode's queues never see it.
                let key = topology::announce_key(&event);
                let msg = Outgoing::new(EVENTS, &key, &event, saga.id, COMPONENT, meta.trace.child(), &body)
                    .mode("hybrid");
                outbox::push(tx, msg)?;
            }
            Effect::Answer { status, context, failure } => {
                answer_status = Some(status);
                let outcome = SagaOutcome {
                    schema: SCHEMA,
                    saga_id: saga.id,
                    space_id: saga.space_id,
                    status,
                    space: (status == 200).then(|| space(saga, &context)),
                    error: failure.map(|f| StepError {
                        error: f.reason,
                        step: Some(f.service),
                        status: f.status,
                        workflow_id: Some(saga.id),
                    }),
                };
                if let Some(to) = &meta.reply_to {
                    outbox::push(tx, answer_message(to, &outcome, hop))?;
                }
            }
            Effect::History { service, action, attempt, event, detail, sent_ms } => {
                // Timed from the saga's state: a read of the history would be one more answer to
                // wait for, a round trip on PostgreSQL.
                let took = sent_ms.map(|sent| std::time::Duration::from_millis(now.saturating_sub(sent)));
                observe(tx, saga, meta, service, action, event, took);
                tx.write("INSERT INTO history (saga_id, at, step, action, attempt, event, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)", params![
                    saga.id.to_string(),
                    now as i64,
                    service.map(Service::name),
                    action.map(Action::as_str),
                    attempt,
                    event.as_str(),
                    detail
                ])?;
            }
        }
    }
    let state = serde_json::to_string(saga).expect("saga state serialises");
    let wake = saga.wake_at();
    let (id, status, wake_at) = (saga.id.to_string(), saga.status.as_str(), wake.map(|w| w as i64));
    match guard {
        None => tx.write(
            "UPDATE sagas SET state = ?2, status = ?3, wake_at = ?4, updated_at = ?5,
                              answer_status = COALESCE(?6, answer_status), version = version + 1
             WHERE saga_id = ?1",
            params![id, state, status, wake_at, now as i64, answer_status],
        )?,
        Some(version) => tx.write(
            "UPDATE sagas SET state = ?2, status = ?3, wake_at = ?4, updated_at = ?5,
                              answer_status = COALESCE(?6, answer_status),
                              version = CASE WHEN version = ?7 THEN version + 1 END
             WHERE saga_id = ?1",
            params![id, state, status, wake_at, now as i64, answer_status, version],
        )?,
    }
    Ok(Applied { wake, cascade })
}

/// What `effect` of `saga` sets off in another saga: a child to start or to undo, or (a child's
/// answer, or its end of an undo) its parent to tell.
fn for_other_saga(saga: &Saga, meta: &Meta, hop: &TraceParent, effect: &Effect) -> Option<Cascade> {
    match effect {
        Effect::Child { index, workflow, action: Action::Do, attempt: _, context } => {
            Some(Cascade::StartChild(ChildStart {
                parent: saga.id,
                index: *index,
                service: saga.actions.get(*index).map_or(Service::Records, |a| a.service),
                workflow: workflow.clone(),
                space_id: saga.space_id,
                context: context.clone(),
                deadline: saga.deadline,
                trace: hop.child(),
            }))
        }
        Effect::Child { index, action: Action::Undo, .. } => {
            Some(Cascade::UndoChild { parent: saga.id, index: *index })
        }
        // The service is the parent's to fill in (`Saga::on_child_reply`).
        Effect::Undone => {
            let (parent, index) = meta.parent?;
            Some(Cascade::ToParent { parent, reply: undone_reply(Service::Records, index) })
        }
        Effect::Answer { status, context, failure } => {
            let (parent, index) = meta.parent?;
            let reply = answer_as_reply(Service::Records, index, *status, context.clone(), failure.clone());
            Some(Cascade::ToParent { parent, reply })
        }
        _ => None,
    }
}

/// Count a history event in the metrics once its transaction commits; a step's reply (or its
/// compensation's) also times the step (`took`, since its command was sent).
fn observe(
    tx: &Tx<'_>,
    saga: &Saga,
    meta: &Meta,
    service: Option<Service>,
    action: Option<Action>,
    event: HistoryEvent,
    took: Option<std::time::Duration>,
) {
    let (workflow, version) =
        (saga.workflow.clone(), meta.definition.as_deref().map_or("", |h| &h[..h.len().min(12)]).to_owned());
    tx.on_commit(move || {
        let service = service.map(Service::name);
        baton_metrics::saga_event(&workflow, &version, service, event.as_str());
        if let (Some(service), Some(action), Some(took)) = (service, action, took) {
            baton_metrics::step_duration(&workflow, service, action.as_str(), took);
        }
    });
}

fn space(saga: &Saga, ctx: &Context) -> Space {
    Space {
        id: saga.space_id,
        key: ctx.key.clone().unwrap_or_default(),
        name: ctx.name.clone(),
        owner: ctx.owner.clone(),
        shard: ctx.shard.clone().unwrap_or_default(),
        licence: ctx.licence.clone().unwrap_or_default(),
        route: ctx.route.clone().unwrap_or_default(),
        workflow_id: Some(saga.id),
    }
}

/// The saga's outcome for whoever started it (the gateway), on `baton.outcomes`: only the
/// orchestrator's broker user may publish there, so no service can forge an outcome. `hop`
/// is the span it is sent from.
fn answer_message(reply_to: &str, outcome: &SagaOutcome, hop: &TraceParent) -> Outgoing {
    Outgoing::new(OUTCOMES, reply_to, START_REPLY, outcome.saga_id, COMPONENT, hop.clone(), outcome)
        .mode("workflow")
}

/// The trace context of the handling in progress: the parent of what it sends.
fn hop(env: &Envelope) -> TraceParent {
    baton_telemetry::traceparent(|| env.traceparent.child())
}

/// The span of one command of a saga, a child of `hop`: a step, a retry of one (a later
/// attempt) or a compensation. It ends at once; the command, and so the service's handling and
/// its reply, are its children, and the next step's span follows that reply.
fn step_trace(hop: &TraceParent, saga: &Saga, service: Service, action: Action, attempt: u32) -> TraceParent {
    let what = match (action, attempt) {
        (Action::Do, 1) => "step",
        (Action::Do, _) => "retry",
        (Action::Undo, 1) => "compensate",
        (Action::Undo, _) => "compensate retry",
    };
    let span = tracing::info_span!(
        parent: None,
        "saga_step",
        otel.name = format!("saga {what} {service}"),
        saga_id = %saga.id,
        step = service.name(),
        action = action.as_str(),
        attempt,
    );
    baton_telemetry::follow(&span, hop);
    baton_telemetry::traceparent_of(&span).unwrap_or_else(|| hop.child())
}

/// Ask the orchestrator to cancel saga `saga_id` (`baton workflows cancel`; the gateway sends
/// the same message for `POST /workflows/{id}/cancel`). It goes to `orchestrator.commands`,
/// which every instance consumes: whichever is alive handles it.
pub async fn request_cancel(amqp_url: &str, saga_id: Uuid, by: &str) -> anyhow::Result<()> {
    let broker = Broker::connect(amqp_url, "operator").await?;
    let publisher = Publisher::new(broker.clone());
    let sent = publisher.publish_confirmed(&cancel_message(saga_id, by, "operator")).await;
    broker.close().await;
    sent.map_err(|e| {
        anyhow::anyhow!(
            "could not send the cancel to the orchestrator ({e}); is its queue {} there?",
            topology::command_queue(COMPONENT)
        )
    })
}

/// The message that cancels saga `saga_id`, sent by `app_id`, on `baton.commands` to
/// `orchestrator.commands`.
pub fn cancel_message(saga_id: Uuid, by: &str, app_id: &str) -> Outgoing {
    let body = CancelSaga { schema: SCHEMA, saga_id, by: by.to_owned() };
    let trace = baton_telemetry::traceparent(TraceParent::new_root);
    Outgoing::new(COMMANDS, topology::ORCHESTRATOR, CANCEL, saga_id, app_id, trace, &body).mode("workflow")
}

/// The message that asks the orchestrators to finish the rollback of saga `saga_id`, or go on
/// with it once its definition is back, sent by `app_id` (the CLI's `operator`, or the console's
/// gateway).
pub fn retry_message(saga_id: Uuid, app_id: &str) -> Outgoing {
    let body = RetrySaga { schema: SCHEMA, saga_id };
    Outgoing::new(COMMANDS, topology::ORCHESTRATOR, RETRY, saga_id, app_id, TraceParent::new_root(), &body)
        .mode("workflow")
}

/// Ask the orchestrators to finish the rollback of saga `saga_id` (an operator's `baton
/// workflows retry`), on `orchestrator.commands`: whichever instance is alive takes it.
pub async fn request_retry(amqp_url: &str, saga_id: Uuid) -> anyhow::Result<()> {
    let broker = Broker::connect(amqp_url, "operator").await?;
    let publisher = Publisher::new(broker.clone());
    let sent = publisher.publish_confirmed(&retry_message(saga_id, "operator")).await;
    broker.close().await;
    sent.map_err(|e| {
        anyhow::anyhow!(
            "could not send the retry to the orchestrators ({e}); is their queue {} there?",
            topology::command_queue(COMPONENT)
        )
    })
}

#[cfg(test)]
mod tests;
