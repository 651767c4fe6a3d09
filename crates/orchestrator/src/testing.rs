//! Test support: the few changes to `orchestrator.db` that the integration tests must make
//! themselves (an operator's mistake, a case no working orchestrator writes), made here so that
//! no other crate names the orchestrator's tables. Not part of Baton's API.

use baton_store::{Db, Location, StoreError};
use uuid::Uuid;

/// The store of the orchestrator at `location`, opened as an operator's tool would.
async fn open(location: &Location) -> Result<Db, StoreError> {
    Db::open(location, crate::COMPONENT, crate::MIGRATIONS, "operator").await
}

/// Remove the stored definition with content hash `hash`, as an operator's mistake would;
/// how many were removed. Its sagas are left pinned to it.
pub async fn forget_definition(location: &Location, hash: &str) -> Result<usize, StoreError> {
    let hash = hash.to_owned();
    open(location).await?.call(move |tx| tx.execute("DELETE FROM definitions WHERE hash = ?1", [hash])).await
}

/// Write into saga `id`'s history a forward command to `step` sent 1 ms past its client's
/// deadline: the case the audit's `step_after_deadline` rule exists for, which a working
/// orchestrator never writes. How many lines were written (0: no such saga).
pub async fn record_step_after_deadline(
    location: &Location,
    id: Uuid,
    step: &str,
) -> Result<usize, StoreError> {
    let (id, step) = (id.to_string(), step.to_owned());
    open(location)
        .await?
        .call(move |tx| {
            tx.execute(
                "INSERT INTO history (saga_id, at, step, action, attempt, event)
                 SELECT saga_id, deadline_at + 1, ?2, 'do', 2, 'sent' FROM sagas
                 WHERE saga_id = ?1 AND deadline_at IS NOT NULL",
                [id, step],
            )
        })
        .await
}
