//! Drives a service's rules from its command queue: one transaction per command (inbox,
//! tombstone, rule, reply into the outbox), the ack after the commit, the reply published by the
//! relay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_amqp::relay::{self, Wake};
use baton_amqp::topology::{self, REPLIES};
use baton_amqp::{Broker, ConsumerConfig, Envelope, HandleError, Outgoing, Publisher, consume};
use baton_protocol::{Action, Context, Outcome, SCHEMA, Service, StepCommand, StepReply, reply_type};
use baton_store::{Db, StoreError, inbox, outbox, tombstone};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Ids, ServiceConfig, Step, StepResult, step_for};

/// Where and how a service runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub amqp_url: String,
    pub data_dir: PathBuf,
    /// Unacked deliveries held at once.
    pub prefetch: u16,
    /// Injected latency before each command is handled (fault injection; zero by default).
    pub delay: Duration,
}

/// Run one service until `cancel`; returns once its consumer and relay have stopped.
pub async fn run(
    service: Service,
    cfg: ServiceConfig,
    opts: RunOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let step: Arc<dyn Step> = Arc::from(step_for(service, &cfg));
    let db = open_db(Arc::clone(&step), &opts.data_dir).await?;
    let broker = Broker::connect(&opts.amqp_url, service.name()).await?;
    broker.declare_topology(&[]).await?;
    let publisher = Publisher::new(broker.clone());
    let wake = Wake::default();
    let tracker = TaskTracker::new();
    tracker.spawn(relay::run(db.clone(), publisher.clone(), wake.clone(), cancel.clone()));
    let handler = Arc::new(Handler { step, db, wake, delay: opts.delay });
    let cfg = ConsumerConfig { queue: topology::command_queue(service.name()), prefetch: opts.prefetch };
    tracker.spawn(consume(
        broker.clone(),
        publisher,
        cfg,
        move |env| Arc::clone(&handler).handle(env),
        cancel.clone(),
    ));
    tracing::info!(%service, "service running");
    tracker.close();
    tracker.wait().await;
    broker.close().await;
    tracing::info!(%service, "service stopped");
    Ok(())
}

/// Open, migrate and configure a service's database (`<data-dir>/<service>.db`).
pub async fn open_db(step: Arc<dyn Step>, data_dir: &std::path::Path) -> anyhow::Result<Db> {
    let db = Db::open(&data_dir.join(format!("{}.db", step.service().name())), step.migrations())?;
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
}

fn store_error(e: StoreError) -> HandleError {
    if e.is_transient() { HandleError::Retry(e.to_string()) } else { HandleError::Reject(e.to_string()) }
}

impl Handler {
    #[tracing::instrument(skip_all, fields(saga_id, step = %self.step.service(), action))]
    async fn handle(self: Arc<Self>, env: Envelope) -> Result<(), HandleError> {
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
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let step = Arc::clone(&self.step);
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                if let Some(replies) = inbox::seen(&tx, env.message_id)? {
                    // A duplicate: answer as before, change nothing.
                    for r in &replies {
                        outbox::push(&tx, r)?;
                    }
                    tx.commit()?;
                    return Ok(());
                }
                let ids = Ids { space_id: cmd.space_id, saga_id: cmd.saga_id };
                let (outcome, status, reason, data) = decide(step.as_ref(), &tx, &cmd, ids)?;
                let body = StepReply {
                    schema: SCHEMA,
                    saga_id: cmd.saga_id,
                    space_id: cmd.space_id,
                    step: service,
                    action,
                    attempt: cmd.attempt,
                    outcome,
                    status,
                    reason,
                    data,
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
                outbox::push(&tx, &reply)?;
                inbox::record(&tx, env.message_id, std::slice::from_ref(&reply))?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(store_error)?;
        self.wake.wake();
        Ok(())
    }
}

type Decision = (Outcome, Option<u16>, Option<String>, Context);

/// The step's verdict on a command, inside the transaction.
fn decide(
    step: &dyn Step,
    tx: &rusqlite::Transaction<'_>,
    cmd: &StepCommand,
    ids: Ids,
) -> Result<Decision, StoreError> {
    let name = step.service().name();
    match cmd.action {
        Action::Do => {
            if tombstone::exists(tx, cmd.saga_id, name)? {
                // Compensated before this (late or retried) command arrived: do nothing.
                tracing::info!("command after its compensation; ignored");
                return Ok((
                    Outcome::Failed,
                    None,
                    Some(format!("{name} was already compensated for this saga")),
                    Context::default(),
                ));
            }
            Ok(match step.apply(tx, ids, &cmd.context)? {
                StepResult::Done(out) => (Outcome::Done, None, None, out),
                StepResult::Refused { status, reason } => {
                    (Outcome::Refused, Some(status), Some(reason), Context::default())
                }
            })
        }
        Action::Undo => match step.undo(tx, ids) {
            Some(result) => {
                result?;
                tombstone::put(tx, cmd.saga_id, name)?;
                Ok((Outcome::Done, None, None, Context::default()))
            }
            None => Ok((
                Outcome::Refused,
                Some(422),
                Some(format!("{name} cannot be undone")),
                Context::default(),
            )),
        },
    }
}
