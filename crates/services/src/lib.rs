//! The five services of the flow: their business rules, their tables, and the runtime that
//! drives a rule from a command and answers with a reply.
//!
//! Owns: one module per service with its tables and rules ([`records`], [`placement`],
//! [`entitlements`], [`routing`], [`notifier`]), each behind the [`Step`] trait; and [`runtime`],
//! which turns a delivery into one transaction (inbox, tombstone, rule, outbox) and acks after
//! the commit. The rules are the same code whatever drives them (a command in workflow mode, an
//! event in events mode). Must not touch: another service's database, saga state, or lapin
//! (everything AMQP goes through `baton-amqp`).

use baton_protocol::{Context, Service};
use rusqlite::Transaction;
use uuid::Uuid;

pub mod config;
pub mod entitlements;
pub mod notifier;
pub mod placement;
pub mod records;
pub mod routing;
pub mod runtime;

pub use config::ServiceConfig;
pub use runtime::run;

/// How a step ended, as its business rules decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    /// It took effect (or had already): here is its output.
    Done(Context),
    /// A business rule said no; nothing changed.
    Refused { status: u16, reason: String },
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
    fn configure(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let _ = tx;
        Ok(())
    }
    fn apply(&self, tx: &Transaction<'_>, ids: Ids, ctx: &Context) -> rusqlite::Result<StepResult>;
    /// Undo the step; `None` when the service cannot undo (the notifier).
    fn undo(&self, tx: &Transaction<'_>, ids: Ids) -> Option<rusqlite::Result<()>>;
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
    field.as_deref().ok_or_else(|| StepResult::Refused {
        status: 422,
        reason: format!("{service} needs `{name}` from an earlier step, and the command has none"),
    })
}

#[cfg(test)]
pub(crate) mod testing {
    use baton_store::Db;

    use super::*;

    /// A service's database in a temporary dir, migrated and configured.
    pub async fn db(step: &dyn Step) -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("svc.db"), step.migrations()).unwrap();
        (dir, db)
    }

    pub fn ids(n: u128) -> Ids {
        Ids { space_id: Uuid::from_u128(n), saga_id: Uuid::from_u128(1000 + n) }
    }

    pub fn ctx(name: &str, owner: &str) -> Context {
        Context { name: name.into(), owner: owner.into(), ..Default::default() }
    }
}
