//! The five services of the flow and the search index of hybrid mode: their business rules, their tables, and the runtime that
//! drives a rule from a command and answers with a reply.
//!
//! Owns: one module per service with its tables and rules ([`records`], [`placement`],
//! [`entitlements`], [`routing`], [`notifier`], [`search`]), each behind the [`Step`] trait; [`runtime`],
//! which turns a delivery into one transaction (inbox, tombstone, rule, outbox) and acks after
//! the commit; [`faults`], the fault plan's decorators around a rule and around the
//! runtime's pipeline, which [`run`] puts in place only when the plan injects something; and
//! [`read`], the read model through which everyone else reads the services' stores. The
//! rules are the same code whatever drives them (a command in workflow mode, an event in events
//! mode, the orchestrator's `space.created` for the follow-ups of hybrid mode). Must not touch: another service's database, saga state, or lapin (everything AMQP goes
//! through `baton-amqp`).

use std::sync::Arc;
use std::time::Duration;

use baton_faults::FaultPlan;
use baton_protocol::{Answer, Context, Mode, Outcome, Service};
use baton_store::Tx;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub mod config;
pub mod entitlements;
pub mod faults;
#[doc(hidden)]
pub mod fixture;
pub mod notifier;
pub mod placement;
pub mod read;
pub mod records;
pub mod routing;
pub mod runtime;
pub mod search;

pub use config::ServiceConfig;

/// Where and how a service runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The broker (its password never shown).
    pub amqp_url: baton_amqp::AmqpUrl,
    /// Where the service keeps its state: a SQLite file in a data dir, or a PostgreSQL schema.
    pub store: baton_store::Location,
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
    /// How long inbox rows and tombstones are kept; older messages are dead-lettered on
    /// arrival ([`baton_store::retention`]).
    pub retain: Duration,
    /// The kind of the work queues it declares (`--queue-type`), the same for every component.
    pub queue_type: baton_amqp::topology::QueueType,
}

/// Run one service until `cancel`: its rules, behind the fault plan's decorators when the plan
/// injects anything into this service. Returns once its consumers and relay have stopped.
pub async fn run(
    service: Service,
    cfg: ServiceConfig,
    opts: RunOptions,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let step: Arc<dyn Step> = Arc::from(step_for(service, &cfg));
    let (step, pipeline) = faults::decorate(step, &opts.faults);
    runtime::run(step, pipeline, opts, cancel).await
}

/// How a step ended, as its business rules decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// It took effect (or had already): here is its output.
    Done(Context),
    /// A business rule said no; nothing changed.
    Refused { status: u16, reason: String },
    /// It could not be done, and nothing changed: too late (the step was compensated already)
    /// or a technical failure (an undo the fault plan fails). The orchestrator retries an undo.
    Failed { status: Option<u16>, reason: String },
}

impl From<StepResult> for Answer {
    /// The answer as a reply or an event carries it.
    fn from(result: StepResult) -> Answer {
        let (outcome, status, reason, data) = match result {
            StepResult::Done(data) => (Outcome::Done, None, None, data),
            StepResult::Refused { status, reason } => {
                (Outcome::Refused, Some(status), Some(reason), Context::default())
            }
            StepResult::Failed { status, reason } => {
                (Outcome::Failed, status, Some(reason), Context::default())
            }
        };
        Answer { outcome, status, reason, data }
    }
}

/// Which space and saga a step works on.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub space_id: Uuid,
    pub saga_id: Uuid,
}

/// One service's business rules, run inside the caller's transaction.
///
/// Both methods are idempotent by space id: doing a step twice returns the first output and
/// changes nothing; undoing what is not there succeeds.
pub trait Step: Send + Sync + 'static {
    fn service(&self) -> Service;
    /// The service's own tables, applied after the common ones.
    fn migrations(&self) -> &'static [&'static str];
    /// Bring configured reference data (shards, plans, reserved keys) into the database.
    fn configure(&self, tx: &Tx<'_>) -> Result<(), baton_store::StoreError> {
        let _ = tx;
        Ok(())
    }
    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError>;
    /// Undo the step for the space `ctx` names: [`StepResult::Done`] once undone, a refusal
    /// when the service cannot undo (the notifier).
    fn undo(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError>;
}

/// The rules of `service`, configured.
pub fn step_for(service: Service, cfg: &ServiceConfig) -> Box<dyn Step> {
    match service {
        Service::Records => Box::new(records::Records),
        Service::Placement => Box::new(placement::Placement { shards: cfg.shards.clone() }),
        Service::Entitlements => Box::new(entitlements::Entitlements {
            plans: cfg.plans.clone(),
            default_plan: cfg.default_plan.clone(),
            owner_plans: cfg.owner_plans.clone(),
        }),
        Service::Routing => Box::new(routing::Routing { reserved: cfg.reserved.clone() }),
        Service::Notifier => Box::new(notifier::Notifier),
        Service::Search => Box::new(search::Search),
    }
}

/// Helper for the rules: the text of an optional context field, or a refusal naming it.
// The error is the step's answer itself (a refusal with its reason), not a failure to box.
#[allow(clippy::result_large_err)]
pub(crate) fn need<'a>(
    field: &'a Option<String>,
    name: &str,
    service: Service,
) -> Result<&'a str, StepResult> {
    field.as_deref().ok_or_else(|| missing(name, service))
}

/// The refusal of a command without `name`, which an earlier step should have given.
pub(crate) fn missing(name: &str, service: Service) -> StepResult {
    StepResult::Refused {
        status: 422,
        reason: format!("{service} needs `{name}` from an earlier step, and the command has none"),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use baton_store::Db;

    use super::*;

    /// A service's database in a temporary dir, migrated and configured.
    pub async fn db(step: &dyn Step) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let at = baton_store::Location::Dir(dir.path().to_owned());
        let db = Db::open(&at, "svc", step.migrations(), baton_store::DEFAULT_OWNER).await.unwrap();
        (dir, db)
    }

    pub fn ids(n: u128) -> Ids {
        Ids { space_id: Uuid::from_u128(n), saga_id: Uuid::from_u128(1000 + n) }
    }

    pub fn ctx(name: &str, owner: &str) -> Context {
        Context { name: name.into(), owner: owner.into(), ..Default::default() }
    }
}
