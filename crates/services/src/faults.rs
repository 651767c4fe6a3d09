//! The fault plan's injections into a service, as decorators: [`FaultyStep`] around its rule
//! (refusals, failing undos) and [`FaultyPipeline`] around the runtime's handling of a message
//! (a failure before handling, latency, outgoing messages sent twice). [`decorate`] puts them
//! in place only when the plan injects something into the service, so that a plain run's path
//! holds only production logic.
//!
//! Each injection is recorded in the `faults` table, in the transaction of the message it
//! touched, for `baton compare` to count. The table is the decorators' own: created when they
//! are in place, absent from a database that never ran under a plan.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use baton_amqp::{HandleError, Outgoing};
use baton_faults::FaultPlan;
use baton_protocol::{Action, Context, Service};
use baton_store::{StoreError, now_ms, outbox};
use baton_store::{Tx, params};

use crate::runtime::{Handling, Pipeline};
use crate::{Ids, Step, StepResult};

/// The table of injected faults: one row per fault, with the step and the space's name (or the
/// message) it touched.
const TABLE: &str = "CREATE TABLE IF NOT EXISTS faults (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        step TEXT NOT NULL,
        key TEXT NOT NULL,
        at INTEGER NOT NULL
    )";

/// `step` and a pipeline decorator, both carrying out `plan`, when the plan injects anything
/// into `step`'s service; `step` alone and no decorator otherwise.
pub fn decorate(step: Arc<dyn Step>, plan: &FaultPlan) -> (Arc<dyn Step>, Option<Arc<dyn Pipeline>>) {
    let service = step.service();
    if !plan.injects_into(service) {
        return (step, None);
    }
    let pipeline = FaultyPipeline { plan: plan.clone() };
    (Arc::new(FaultyStep { inner: step, plan: plan.clone() }), Some(Arc::new(pipeline)))
}

/// Record an injected fault, in the transaction of the message it touched.
fn record(tx: &Tx<'_>, kind: &str, step: Service, key: &str) -> Result<(), baton_store::StoreError> {
    tx.execute(
        "INSERT INTO faults (kind, step, key, at) VALUES (?1, ?2, ?3, ?4)",
        params![kind, step.name(), key, now_ms()],
    )?;
    Ok(())
}

/// One injected fault, as recorded: its kind (`refusal`, `failed compensation`...), the step
/// and the space's name (or the message) it touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub kind: String,
    pub step: String,
    pub key: String,
}

/// Every fault injected into the store of `tx`, oldest first; none when no decorator ever ran
/// there (the table is theirs).
pub fn injections(tx: &Tx<'_>) -> Result<Vec<Injection>, StoreError> {
    if !tx.has_table("faults")? {
        return Ok(Vec::new());
    }
    tx.query_map("SELECT kind, step, key FROM faults ORDER BY id", (), |r| {
        Ok(Injection { kind: r.get(0)?, step: r.get(1)?, key: r.get(2)? })
    })
}

/// A service's rule under a fault plan: a planned refusal instead of the step, a planned
/// failure instead of its undo; the rule itself otherwise.
pub struct FaultyStep {
    pub inner: Arc<dyn Step>,
    pub plan: FaultPlan,
}

impl Step for FaultyStep {
    fn service(&self) -> Service {
        self.inner.service()
    }

    fn migrations(&self) -> &'static [&'static str] {
        self.inner.migrations()
    }

    /// Creates the `faults` table (if a former run under a plan, or another instance starting
    /// now, has not), then the rule's own configuration. Outside the numbered migrations, so
    /// that a database can run with a plan and without one in turn.
    fn configure(&self, tx: &Tx<'_>) -> Result<(), baton_store::StoreError> {
        tx.create_if_missing(TABLE)?;
        self.inner.configure(tx)
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let service = self.service();
        if self.plan.refuses(service, &ctx.name) {
            record(tx, "refusal", service, &ctx.name)?;
            return Ok(StepResult::Refused {
                status: 503,
                reason: format!("{service} refused (injected by the fault plan)"),
            });
        }
        self.inner.apply(tx, ids, ctx)
    }

    fn undo(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let service = self.service();
        if self.plan.undo_fails(service, &ctx.name) {
            record(tx, "failed compensation", service, &ctx.name)?;
            return Ok(StepResult::Failed {
                status: None,
                reason: format!("{service} could not undo (injected by the fault plan)"),
            });
        }
        self.inner.undo(tx, ids, ctx)
    }
}

/// The runtime's handling of a message under a fault plan: a planned failure before the
/// message is handled (it is requeued), the planned latency before a step is done, and the
/// planned duplicates of what it sends.
pub struct FaultyPipeline {
    pub plan: FaultPlan,
}

impl Pipeline for FaultyPipeline {
    fn before<'a>(
        &'a self,
        message: &'a Handling,
    ) -> Pin<Box<dyn Future<Output = Result<(), HandleError>> + Send + 'a>> {
        Box::pin(async move {
            let service = message.service;
            if self.plan.nacks(service, &message.message_id.to_string()) {
                return Err(HandleError::retry(format!(
                    "{service} failed on this message (injected by the fault plan)"
                )));
            }
            // Compensations are not delayed.
            let delay = self.plan.delay(service);
            if message.action == Action::Do && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(())
        })
    }

    fn sent(&self, tx: &baton_store::Tx<'_>, message: &Handling, out: &[Outgoing]) -> Result<(), StoreError> {
        // Keyed by what is the same in both modes: the step, the action and the space's name.
        let key = format!("{}/{}/{}", message.service, message.action.as_str(), message.name);
        if self.plan.duplicates(&key) {
            record(tx, "duplicate", message.service, &key)?;
            for m in out {
                outbox::push(tx, m.clone())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Records;
    use crate::testing::*;

    fn kinds(tx: &Tx<'_>) -> Result<Vec<String>, baton_store::StoreError> {
        Ok(injections(tx)?.into_iter().map(|i| i.kind).collect())
    }

    #[test]
    fn a_plan_without_injections_into_the_service_leaves_it_plain() {
        let plan = FaultPlan::parse("refuse.routing=1,crash.records=40%+1s", 1).unwrap();
        let (_, pipeline) = decorate(Arc::new(Records), &plan);
        assert!(pipeline.is_none());
        let (_, pipeline) = decorate(Arc::new(Records), &FaultPlan::parse("nack.records=0.5", 1).unwrap());
        assert!(pipeline.is_some());
    }

    #[tokio::test]
    async fn planned_refusals_and_failed_undos_replace_the_rule_and_are_recorded() {
        let plan = FaultPlan::parse("refuse.records=1,fail-undo.records=1", 1).unwrap();
        let (step, _) = decorate(Arc::new(Records), &plan);
        let (_d, db) = db(step.as_ref()).await;
        db.call(move |tx| {
            assert!(!tx.has_table("faults")?, "no table before the decorator's");
            step.configure(tx)?;
            step.configure(tx)?;
            let refused = step.apply(tx, ids(1), &ctx("acme", "alice"))?;
            assert!(matches!(refused, StepResult::Refused { status: 503, ref reason } if reason.contains("injected")));
            let n: i64 = tx.query_row("SELECT COUNT(*) FROM spaces", (), |r| r.get(0))?;
            assert_eq!(n, 0, "the rule did not run");
            let failed = step.undo(tx, ids(1), &ctx("acme", "alice"))?;
            assert!(matches!(failed, StepResult::Failed { status: None, .. }));
            assert_eq!(kinds(tx)?, ["refusal", "failed compensation"]);
            Ok(())
        })
        .await
        .unwrap();
    }
}
