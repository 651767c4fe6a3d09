//! Drives a service's rules from its queues: one transaction per message (inbox, tombstone,
//! rule, outgoing messages into the outbox), the ack after the commit, the outgoing messages
//! published by the relay.
//!
//! In workflow mode a service answers the orchestrator's commands on `<service>.commands`. In
//! events mode it reacts to the previous step's event on `<service>.events` and emits its own;
//! it still answers commands, which is how `baton reconcile` undoes what a failed flow left.
//! In hybrid mode the services of the saga answer commands, and the follow-ups
//! ([`Service::FOLLOW_UPS`]) react to the orchestrator's `space.created` on
//! `<service>.followups`, emitting nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use baton_amqp::topology::{self, EVENTS, REPLIES};
use baton_amqp::{Broker, ConsumerConfig, Envelope, HandleError, Identity, Outgoing, Publisher, consume};
use baton_health::{Kind, running};
use baton_protocol::{
    Action, Answer, Context, Mode, Outcome, SCHEMA, Service, SpaceEvent, StepCommand, events, reply_type,
};
use baton_store::relay::{self, Wake};
use baton_store::retention::{self, Retention};
use baton_store::{Db, StoreError, Tx, inbox, outbox, tombstone};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Ids, RunOptions, Step, StepResult};

/// What a decorator of the pipeline knows of the message at hand.
#[derive(Debug, Clone)]
pub struct Handling {
    pub service: Service,
    pub action: Action,
    pub message_id: Uuid,
    /// The space's name: the same for a step in both modes.
    pub name: String,
}

/// Where the handling of a message can be decorated (the fault plan's injections, in
/// [`crate::faults`]); a service runs without one unless its plan injects something.
pub trait Pipeline: Send + Sync + 'static {
    /// Before a decoded message is handled: hold it, or fail it (it is requeued).
    fn before<'a>(
        &'a self,
        message: &'a Handling,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandleError>> + Send + 'a>>;
    /// In the message's transaction, with `out`, what it sends (added to the outbox after).
    fn sent(&self, tx: &Tx<'_>, message: &Handling, out: &[Outgoing]) -> Result<(), StoreError>;
}

/// Run one service's `step` until `cancel`, its handling decorated by `pipeline` if any;
/// returns once its consumers and relay have stopped.
pub async fn run(
    step: Arc<dyn Step>,
    pipeline: Option<Arc<dyn Pipeline>>,
    opts: RunOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let service = step.service();
    let health = &opts.health;
    let name = service.name();
    // Registered first (failing until attached), so that a readiness asked while this
    // service is still starting does not pass without it.
    // The search index takes no command; the services of the flow do in every mode.
    let cfg_commands = Service::ALL.contains(&service).then(|| {
        consumer_config(health, name, topology::command_queue(name), opts.prefetch).max_age(opts.retain)
    });
    let cfg_events = (opts.mode == Mode::Events).then(|| {
        consumer_config(health, name, topology::event_queue(name), opts.prefetch).max_age(opts.retain)
    });
    let followups = (opts.mode == Mode::Hybrid && Service::FOLLOW_UPS.contains(&service))
        .then(|| topology::followup_queue(name));
    let cfg_followups = followups
        .as_ref()
        .map(|q| consumer_config(health, name, q.name.clone(), opts.prefetch).max_age(opts.retain));
    let db = open_db(Arc::clone(&step), &opts.store, &opts.instance).await?;
    let conn_name = if opts.instance == baton_store::DEFAULT_OWNER {
        service.name().to_owned()
    } else {
        format!("{service} {}", opts.instance)
    };
    db.health().register(health, name);
    let broker = Broker::connect(opts.amqp_url.expose(), &conn_name).await?;
    let _broker_watch = baton_amqp::health::watch_broker(health, name, &broker);
    let own: Vec<_> = topology::queues_of(name).into_iter().chain(followups).collect();
    broker.declare_topology(&own, opts.queue_type).await?;
    let identity = Identity::of_url(name, broker.url());
    let publisher = Publisher::new(broker.clone());
    let wake = Wake::default();
    db.feed(wake.clone());
    // The relay and the consumers, waited for until they have stopped.
    let mut tasks = JoinSet::new();
    tasks.spawn(running(
        health.check(name, "relay running", Kind::Live),
        relay::run(db.clone(), publisher.clone(), wake.clone(), cancel.clone()),
    ));
    tasks.spawn(running(
        health.check(name, "retention running", Kind::Live),
        retention::run(db.clone(), Retention::new(opts.retain), Vec::new(), cancel.clone()),
    ));
    let service = step.service();
    let handler = Arc::new(Handler {
        commands: topology::command_queue(service.name()),
        events: topology::event_queue(service.name()),
        followups: topology::followup_queue(service.name()).name,
        command_kinds: std::iter::once(service.do_type()).chain(service.undo_type()).collect(),
        identity,
        step,
        db,
        wake,
        delay: opts.delay,
        pipeline,
    });
    if let Some(cfg_commands) = cfg_commands {
        let h = Arc::clone(&handler);
        tasks.spawn(running(
            health.check(name, &format!("consumer of {} running", cfg_commands.queue), Kind::Live),
            consume(
                broker.clone(),
                publisher.clone(),
                cfg_commands,
                move |env| Arc::clone(&h).on_command(env),
                cancel.clone(),
            ),
        ));
    }
    if let Some(cfg) = cfg_followups {
        let h = Arc::clone(&handler);
        tasks.spawn(running(
            health.check(name, &format!("consumer of {} running", cfg.queue), Kind::Live),
            consume(
                broker.clone(),
                publisher.clone(),
                cfg,
                move |env| Arc::clone(&h).on_followup(env),
                cancel.clone(),
            ),
        ));
    }
    if let Some(cfg_events) = cfg_events {
        let h = Arc::clone(&handler);
        tasks.spawn(running(
            health.check(name, &format!("consumer of {} running", cfg_events.queue), Kind::Live),
            consume(
                broker.clone(),
                publisher,
                cfg_events,
                move |env| Arc::clone(&h).on_event(env),
                cancel.clone(),
            ),
        ));
    }
    tracing::info!(%service, mode = %opts.mode, "service running");
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(%service, error = %e, "a task of the service died");
        }
    }
    broker.close().await;
    tracing::info!(%service, "service stopped");
    Ok(())
}

/// A consumer of `queue` whose attachment is a readiness check of `component`.
fn consumer_config(
    health: &baton_health::Health,
    component: &str,
    queue: String,
    prefetch: u16,
) -> ConsumerConfig {
    let attached = health.check(component, &format!("consuming {queue}"), Kind::Ready);
    ConsumerConfig::new(queue, prefetch).attached(attached)
}

/// Open, migrate and configure a service's store (`<data-dir>/<service>.db`, or the schema of
/// its name).
pub async fn open_db(
    step: Arc<dyn Step>,
    store: &baton_store::Location,
    instance: &str,
) -> anyhow::Result<Db> {
    let db = Db::open(store, step.service().name(), step.migrations(), instance).await?;
    // Retried on a conflict: instances starting together on PostgreSQL write the same rows,
    // and a start that failed on it would lose an instance.
    db.transaction_retrying(move |tx| {
        step.configure(tx)?;
        Ok(())
    })
    .await?;
    Ok(db)
}

struct Handler {
    /// The queues it consumes and the command types it takes, named once rather than per
    /// message (only a rejected message's reason uses the names).
    commands: String,
    events: String,
    followups: String,
    command_kinds: Vec<&'static str>,
    /// Who sent an event ([`Identity`]): in events mode a service takes its trigger only from
    /// the component that emits it.
    identity: Identity,
    step: Arc<dyn Step>,
    db: Db,
    wake: Wake,
    delay: Duration,
    pipeline: Option<Arc<dyn Pipeline>>,
}

impl Handler {
    /// The shared part of every message: let the pipeline's decorator step in, skip a
    /// duplicate (answering it as before), otherwise let `decide` work in the transaction and
    /// return the messages to send, commit them with the inbox row, then wake the relay.
    /// `tombstone_of`: the saga whose tombstone of this step a `Do` must check; it is read
    /// with the inbox's check (one round trip for both on PostgreSQL), and `decide` told
    /// whether the step was compensated.
    async fn in_transaction<F>(
        &self,
        message: Handling,
        tombstone_of: Option<Uuid>,
        decide: F,
    ) -> Result<(), HandleError>
    where
        F: FnOnce(&Tx<'_>, &dyn Step, bool) -> Result<Vec<Outgoing>, StoreError> + Send + 'static,
    {
        if let Some(p) = &self.pipeline {
            p.before(&message).await?;
        }
        if message.action == Action::Do && !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let step = Arc::clone(&self.step);
        let pipeline = self.pipeline.clone();
        self.db
            .transaction(move |tx| {
                let service = step.service().name();
                let compensated = tombstone_of.map(|id| tombstone::fetch(tx, id, service)).transpose()?;
                if let Some(replies) = inbox::seen(tx, message.message_id)? {
                    // A duplicate: answer as before, change nothing.
                    tx.on_commit(move || baton_metrics::inbox_duplicate(service));
                    for r in replies {
                        outbox::push(tx, r)?;
                    }
                    return Ok(());
                }
                let compensated = match compensated {
                    Some(row) => row.first(tx)?.is_some(),
                    None => false,
                };
                let out = decide(tx, step.as_ref(), compensated)?;
                if let Some(p) = &pipeline {
                    p.sent(tx, &message, &out)?;
                }
                inbox::answer(tx, message.message_id, out)
            })
            .await?;
        self.wake.wake();
        Ok(())
    }

    /// A command, read before its span opens so that the span starts with the saga's id (a
    /// field recorded later is one more call through every layer). A body that cannot be read
    /// is logged by the consumer, in the delivery's span, as every handler's error is.
    async fn on_command(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let cmd: StepCommand = env.decode(&self.commands, &self.command_kinds)?;
        let action = if env.kind == self.step.service().do_type() { Action::Do } else { Action::Undo };
        self.handle_command(env, cmd, action).await
    }

    #[tracing::instrument(skip_all, fields(saga_id = %cmd.saga_id, step = %self.step.service(), action = action.as_str(), otel.name = format!("handle {}", env.kind)))]
    async fn handle_command(
        &self,
        env: Envelope,
        cmd: StepCommand,
        action: Action,
    ) -> Result<(), HandleError> {
        let service = self.step.service();
        if cmd.step != service || cmd.action != action {
            return Err(HandleError::reject(format!(
                "a `{}` message must carry step `{service}` and action `{}`",
                env.kind,
                action.as_str()
            )));
        }
        let reply_to = env.reply_to.clone().ok_or_else(|| {
            HandleError::reject(format!("a `{}` command needs a reply_to to answer to", env.kind))
        })?;
        let message =
            Handling { service, action, message_id: env.message_id, name: cmd.context.name.clone() };
        // The reply is this handling's child.
        let trace = baton_telemetry::traceparent(|| env.traceparent.child());
        let tombstone_of = (action == Action::Do).then_some(cmd.saga_id);
        self.in_transaction(message, tombstone_of, move |tx, step, compensated| {
            let ids = Ids { space_id: cmd.space_id, saga_id: cmd.saga_id };
            let v = match action {
                Action::Do => apply(tx, step, ids, &cmd.context, compensated)?,
                Action::Undo => undo(tx, step, ids, &cmd.context)?,
            };
            let body = cmd.reply(v.into());
            let reply = Outgoing::new(
                REPLIES,
                &reply_to,
                &reply_type(&env.kind),
                cmd.saga_id,
                service.name(),
                trace,
                &body,
            )
            .attempt(cmd.attempt)
            .mode(env.mode.as_deref().unwrap_or("workflow"));
            Ok(vec![reply])
        })
        .await
    }

    /// An event of events mode, read before its span opens, as `on_command` reads a command.
    async fn on_event(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let event: SpaceEvent = env.decode(&self.events, &[self.step.service().trigger_event()])?;
        self.handle_event(env, event).await
    }

    #[tracing::instrument(skip_all, fields(space_id = %event.space_id, step = %self.step.service(), otel.name = format!("handle {}", env.kind)))]
    async fn handle_event(&self, env: Envelope, event: SpaceEvent) -> Result<(), HandleError> {
        let service = self.step.service();
        self.identity.expect(&env, &events::emitters(&env.kind, Mode::Events))?;
        let message = Handling {
            service,
            action: Action::Do,
            message_id: env.message_id,
            name: event.context.name.clone(),
        };
        let trace = baton_telemetry::traceparent(|| env.traceparent.child());
        // Events mode has no saga: the space is the unit of work, and of its tombstones.
        self.in_transaction(message, Some(event.space_id), move |tx, step, compensated| {
            let ids = Ids { space_id: event.space_id, saga_id: event.space_id };
            let Answer { outcome, status, reason, data } =
                apply(tx, step, ids, &event.context, compensated)?.into();
            let mut context = event.context.clone();
            let (kind, body) = match outcome {
                Outcome::Done => {
                    context.merge(&data);
                    (
                        service.done_event(),
                        SpaceEvent {
                            schema: SCHEMA,
                            space_id: event.space_id,
                            context,
                            step: None,
                            status: None,
                            reason: None,
                        },
                    )
                }
                Outcome::Refused | Outcome::Failed => (
                    events::REJECTED,
                    SpaceEvent {
                        schema: SCHEMA,
                        space_id: event.space_id,
                        context,
                        step: Some(service),
                        status: Some(status.unwrap_or(409)),
                        reason,
                    },
                ),
            };
            let msg = Outgoing::new(EVENTS, kind, kind, event.space_id, service.name(), trace, &body)
                .mode("events");
            Ok(vec![msg])
        })
        .await
    }
}

impl Handler {
    /// A follow-up of hybrid mode: the orchestrator announced a space whose saga passed its
    /// last compensable step. Do the rule once per space (the inbox and the rule's own key see
    /// to that) and tell nobody: no saga waits for it. The follow-ups' rules never refuse; one
    /// that did would be logged, as nobody could be told. Read before its span opens, as
    /// `on_command` reads a command.
    async fn on_followup(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let event: SpaceEvent = env.decode(&self.followups, &[events::CREATED])?;
        self.handle_followup(env, event).await
    }

    #[tracing::instrument(skip_all, fields(space_id = %event.space_id, step = %self.step.service()))]
    async fn handle_followup(&self, env: Envelope, event: SpaceEvent) -> Result<(), HandleError> {
        let service = self.step.service();
        self.identity.expect(&env, &events::emitters(&env.kind, Mode::Hybrid))?;
        let message = Handling {
            service,
            action: Action::Do,
            message_id: env.message_id,
            name: event.context.name.clone(),
        };
        // The orchestrator's event is correlated with its saga.
        let saga_id = env.correlation_id.unwrap_or(event.space_id);
        self.in_transaction(message, Some(saga_id), move |tx, step, compensated| {
            let ids = Ids { space_id: event.space_id, saga_id };
            if let StepResult::Refused { reason, .. } | StepResult::Failed { reason, .. } =
                apply(tx, step, ids, &event.context, compensated)?
            {
                tracing::warn!(%service, space_id = %event.space_id, %reason, "a follow-up did not take effect");
            }
            Ok(Vec::new())
        })
        .await
    }
}

/// Do a step: nothing if it was `compensated` already (its tombstone, read with the inbox's
/// check), otherwise the rule.
fn apply(
    tx: &Tx<'_>,
    step: &dyn Step,
    ids: Ids,
    ctx: &Context,
    compensated: bool,
) -> Result<StepResult, StoreError> {
    let service = step.service();
    if compensated {
        tracing::info!("step arrived after its compensation; ignored");
        tx.on_commit(move || baton_metrics::tombstone_hit(service.name()));
        return Ok(StepResult::Failed {
            status: Some(409),
            reason: format!("{service} was already compensated for this request"),
        });
    }
    step.apply(tx, ids, ctx)
}

/// Undo a step and, once undone, leave a tombstone, so that a late command or event for it is a
/// no-op.
fn undo(tx: &Tx<'_>, step: &dyn Step, ids: Ids, ctx: &Context) -> Result<StepResult, StoreError> {
    let result = step.undo(tx, ids, ctx)?;
    if let StepResult::Done(_) = result {
        tombstone::put(tx, ids.saga_id, step.service().name())?;
    }
    Ok(result)
}
