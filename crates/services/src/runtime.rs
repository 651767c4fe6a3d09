//! Drives a service's rules from its queues: one transaction per message (inbox, tombstone,
//! rule, outgoing messages into the outbox), the ack after the commit, the outgoing messages
//! published by the relay.
//!
//! In workflow mode a service answers the orchestrator's commands on `<service>.commands`. In
//! events mode it reacts to the previous step's event on `<service>.events` and emits its own;
//! it still answers commands, which is how `baton reconcile` undoes what a failed flow left.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_amqp::relay::{self, Wake};
use baton_amqp::topology::{self, EVENTS, REPLIES};
use baton_amqp::{Broker, ConsumerConfig, Envelope, HandleError, Outgoing, Publisher, consume};
use baton_faults::FaultPlan;
use baton_health::{Kind, running};
use baton_protocol::{
    Action, Context, Mode, Outcome, SCHEMA, Service, SpaceEvent, StepCommand, StepReply, events, reply_type,
};
use baton_store::{Db, StoreError, inbox, now_ms, outbox, tombstone};
use rusqlite::{Transaction, params};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Ids, ServiceConfig, Step, StepResult, step_for};

/// Where and how a service runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub amqp_url: String,
    pub data_dir: PathBuf,
    pub mode: Mode,
    /// Unacked deliveries held at once.
    pub prefetch: u16,
    /// Latency added before every message is handled (on top of the plan's).
    pub delay: Duration,
    pub faults: FaultPlan,
    /// This instance's name: several instances of a service compete for its queues and share
    /// its database; each publishes the outbox rows it wrote. Keep it stable across restarts.
    pub instance: String,
    /// Where the service reports its liveness and readiness.
    pub health: baton_health::Health,
}

/// Run one service until `cancel`; returns once its consumers and relay have stopped.
pub async fn run(
    service: Service,
    cfg: ServiceConfig,
    opts: RunOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let step: Arc<dyn Step> = Arc::from(step_for(service, &cfg));
    let health = &opts.health;
    let name = service.name();
    // Registered first (failing until attached), so that a readiness asked while this
    // service is still starting does not pass without it.
    let cfg_commands = consumer_config(health, name, topology::command_queue(name), opts.prefetch);
    let cfg_events = (opts.mode == Mode::Events)
        .then(|| consumer_config(health, name, topology::event_queue(name), opts.prefetch));
    let db = open_db(Arc::clone(&step), &opts.data_dir, &opts.instance).await?;
    let conn_name = if opts.instance == baton_store::DEFAULT_OWNER {
        service.name().to_owned()
    } else {
        format!("{service} {}", opts.instance)
    };
    db.health().register(health, name);
    let broker = Broker::connect(&opts.amqp_url, &conn_name).await?;
    let _broker_watch = baton_amqp::health::watch_broker(health, name, &broker);
    broker.declare_topology(&[]).await?;
    let publisher = Publisher::new(broker.clone());
    let wake = Wake::default();
    db.feed(wake.clone());
    // The relay and the consumers, waited for until they have stopped.
    let mut tasks = JoinSet::new();
    tasks.spawn(running(
        health.check(name, "relay running", Kind::Live),
        relay::run(db.clone(), publisher.clone(), wake.clone(), cancel.clone()),
    ));
    let delay = opts.delay + opts.faults.delay(service);
    let handler = Arc::new(Handler { step, db, wake, delay, faults: opts.faults });
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

/// Open, migrate and configure a service's database (`<data-dir>/<service>.db`).
pub async fn open_db(step: Arc<dyn Step>, data_dir: &std::path::Path, instance: &str) -> anyhow::Result<Db> {
    let path = data_dir.join(format!("{}.db", step.service().name()));
    let db = Db::open_async(path, step.migrations(), instance.to_owned()).await?;
    db.call(move |c| {
        let tx = c.transaction()?;
        step.configure(&tx)?;
        tx.commit()?;
        Ok(())
    })
    .await?;
    Ok(db)
}

struct Handler {
    step: Arc<dyn Step>,
    db: Db,
    wake: Wake,
    delay: Duration,
    faults: FaultPlan,
}

/// Record an injected fault, in the transaction of the message it touched.
fn record_fault(tx: &Transaction<'_>, kind: &str, step: Service, key: &str) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO faults (kind, step, key, at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![kind, step.name(), key, now_ms()])?;
    Ok(())
}

/// What a rule decided about a step.
struct Verdict {
    outcome: Outcome,
    status: Option<u16>,
    reason: Option<String>,
    data: Context,
}

impl Verdict {
    fn done(data: Context) -> Self {
        Verdict { outcome: Outcome::Done, status: None, reason: None, data }
    }
    fn refused(status: u16, reason: String) -> Self {
        Verdict {
            outcome: Outcome::Refused,
            status: Some(status),
            reason: Some(reason),
            data: Context::default(),
        }
    }
}

impl Handler {
    /// The shared part of every message: skip a duplicate (answering it as before), otherwise
    /// let `decide` work in the transaction and return the messages to send, commit them with
    /// the inbox row, then wake the relay. The plan may deliver a message twice.
    async fn in_transaction<F>(&self, message_id: Uuid, dup_key: String, decide: F) -> Result<(), HandleError>
    where
        F: FnOnce(&Transaction<'_>, &dyn Step, &FaultPlan) -> Result<Vec<Outgoing>, StoreError>
            + Send
            + 'static,
    {
        let step = Arc::clone(&self.step);
        let faults = self.faults.clone();
        self.db
            .transaction(move |tx| {
                if let Some(replies) = inbox::seen(tx, message_id)? {
                    // A duplicate: answer as before, change nothing.
                    for r in &replies {
                        outbox::push(tx, r)?;
                    }
                    return Ok(());
                }
                let out = decide(tx, step.as_ref(), &faults)?;
                for m in &out {
                    outbox::push(tx, m)?;
                }
                if faults.duplicates(&dup_key) {
                    record_fault(tx, "duplicate", step.service(), &dup_key)?;
                    for m in &out {
                        outbox::push(tx, m)?;
                    }
                }
                inbox::record(tx, message_id, &out)?;
                Ok(())
            })
            .await?;
        self.wake.wake();
        Ok(())
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    #[tracing::instrument(skip_all, fields(saga_id, step = %self.step.service(), action))]
    async fn on_command(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let service = self.step.service();
        let action = if env.kind == service.do_type() {
            Action::Do
        } else if Some(env.kind.as_str()) == service.undo_type() {
            Action::Undo
        } else {
            return Err(HandleError::Reject(format!(
                "unknown message type `{}` on {}; it takes {}{}",
                env.kind,
                topology::command_queue(service.name()),
                service.do_type(),
                service.undo_type().map(|u| format!(" and {u}")).unwrap_or_default()
            )));
        };
        let cmd: StepCommand = env.json().map_err(HandleError::Reject)?;
        if cmd.schema != SCHEMA {
            return Err(HandleError::Reject(format!(
                "schema {} is not supported; this service reads schema {SCHEMA}",
                cmd.schema
            )));
        }
        if cmd.step != service || cmd.action != action {
            return Err(HandleError::Reject(format!(
                "a `{}` message must carry step `{service}` and action `{}`",
                env.kind,
                action.as_str()
            )));
        }
        let reply_to = env.reply_to.clone().ok_or_else(|| {
            HandleError::Reject(format!("a `{}` command needs a reply_to to answer to", env.kind))
        })?;
        tracing::Span::current().record("saga_id", tracing::field::display(cmd.saga_id));
        tracing::Span::current().record("action", action.as_str());
        if self.faults.nacks(service, &env.message_id.to_string()) {
            return Err(HandleError::Retry(format!(
                "{service} failed on this message (injected by the fault plan)"
            )));
        }
        if action == Action::Do {
            self.pause().await;
        }
        let dup_key = format!("{service}/{}/{}", action.as_str(), cmd.context.name);
        self.in_transaction(env.message_id, dup_key, move |tx, step, faults| {
            let ids = Ids { space_id: cmd.space_id, saga_id: cmd.saga_id };
            let v = match action {
                Action::Do => apply(tx, step, faults, ids, &cmd.context)?,
                Action::Undo if faults.undo_fails(service, &cmd.context.name) => {
                    record_fault(tx, "failed compensation", service, &cmd.context.name)?;
                    Verdict {
                        outcome: Outcome::Failed,
                        status: None,
                        reason: Some(format!("{service} could not undo (injected by the fault plan)")),
                        data: Context::default(),
                    }
                }
                Action::Undo => undo(tx, step, ids)?,
            };
            let body = StepReply {
                schema: SCHEMA,
                saga_id: cmd.saga_id,
                space_id: cmd.space_id,
                step: service,
                action,
                attempt: cmd.attempt,
                index: cmd.index,
                outcome: v.outcome,
                status: v.status,
                reason: v.reason,
                data: v.data,
            };
            let reply = Outgoing::new(
                REPLIES,
                &reply_to,
                &reply_type(&env.kind),
                cmd.saga_id,
                service.name(),
                env.traceparent.child(),
                &body,
            )
            .attempt(cmd.attempt)
            .mode(env.mode.as_deref().unwrap_or("workflow"));
            Ok(vec![reply])
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(space_id, step = %self.step.service()))]
    async fn on_event(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
        let service = self.step.service();
        if env.kind != service.trigger_event() {
            return Err(HandleError::Reject(format!(
                "unknown message type `{}` on {}; it takes {}",
                env.kind,
                topology::event_queue(service.name()),
                service.trigger_event()
            )));
        }
        let event: SpaceEvent = env.json().map_err(HandleError::Reject)?;
        if event.schema != SCHEMA {
            return Err(HandleError::Reject(format!(
                "schema {} is not supported; this service reads schema {SCHEMA}",
                event.schema
            )));
        }
        tracing::Span::current().record("space_id", tracing::field::display(event.space_id));
        if self.faults.nacks(service, &env.message_id.to_string()) {
            return Err(HandleError::Retry(format!(
                "{service} failed on this message (injected by the fault plan)"
            )));
        }
        self.pause().await;
        let dup_key = format!("{service}/do/{}", event.context.name);
        self.in_transaction(env.message_id, dup_key, move |tx, step, faults| {
            // Events mode has no saga: the space is the unit of work, and of its tombstones.
            let ids = Ids { space_id: event.space_id, saga_id: event.space_id };
            let v = apply(tx, step, faults, ids, &event.context)?;
            let mut context = event.context.clone();
            let (kind, body) = match v.outcome {
                Outcome::Done => {
                    context.merge(&v.data);
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
                        status: Some(v.status.unwrap_or(409)),
                        reason: v.reason,
                    },
                ),
            };
            let msg = Outgoing::new(
                EVENTS,
                kind,
                kind,
                event.space_id,
                service.name(),
                env.traceparent.child(),
                &body,
            )
            .mode("events");
            Ok(vec![msg])
        })
        .await
    }
}

/// Do a step: nothing if it was compensated already, an injected refusal if the plan says so,
/// otherwise the rule.
fn apply(
    tx: &Transaction<'_>,
    step: &dyn Step,
    faults: &FaultPlan,
    ids: Ids,
    ctx: &Context,
) -> Result<Verdict, StoreError> {
    let service = step.service();
    if tombstone::exists(tx, ids.saga_id, service.name())? {
        tracing::info!("step arrived after its compensation; ignored");
        return Ok(Verdict {
            outcome: Outcome::Failed,
            status: Some(409),
            reason: Some(format!("{service} was already compensated for this request")),
            data: Context::default(),
        });
    }
    if faults.refuses(service, &ctx.name) {
        record_fault(tx, "refusal", service, &ctx.name)?;
        return Ok(Verdict::refused(503, format!("{service} refused (injected by the fault plan)")));
    }
    Ok(match step.apply(tx, ids, ctx)? {
        StepResult::Done(out) => Verdict::done(out),
        StepResult::Refused { status, reason } => Verdict::refused(status, reason),
    })
}

/// Undo a step and leave a tombstone, so that a late command or event for it is a no-op.
fn undo(tx: &Transaction<'_>, step: &dyn Step, ids: Ids) -> Result<Verdict, StoreError> {
    let name = step.service().name();
    match step.undo(tx, ids) {
        Some(result) => {
            result?;
            tombstone::put(tx, ids.saga_id, name)?;
            Ok(Verdict::done(Context::default()))
        }
        None => Ok(Verdict::refused(422, format!("{name} cannot be undone"))),
    }
}
