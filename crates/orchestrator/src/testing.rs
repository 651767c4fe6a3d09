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

/// Write a saga `id` for the space `space_id` that ended as `status`, its client told `answer`,
/// with a client deadline of `deadline_at` (saga clock, ms), and the history lines
/// `(at, step, action, event)`: a store for the audit's tests, of the real schema.
pub async fn saga(
    location: &Location,
    id: &str,
    space_id: &str,
    status: baton_workflow::SagaStatus,
    answer: Option<u16>,
    deadline_at: i64,
    history: &[(i64, &str, &str, &str)],
) -> Result<(), StoreError> {
    let (id, space, status) = (id.to_owned(), space_id.to_owned(), status.as_str().to_owned());
    let history: Vec<(i64, String, String, String)> =
        history.iter().map(|(at, s, a, e)| (*at, s.to_string(), a.to_string(), e.to_string())).collect();
    open(location)
        .await?
        .call(move |tx| {
            tx.execute(
                "INSERT INTO sagas (saga_id, space_id, workflow, status, state, traceparent, answer_status,
                                    created_at, updated_at, deadline_at)
                 VALUES (?1, ?2, 'create-space', ?3, '{}', '', ?4, 0, 0, ?5)",
                baton_store::params![id, space, status, answer.map(i64::from), deadline_at],
            )?;
            for (at, step, action, event) in &history {
                tx.execute(
                    "INSERT INTO history (saga_id, at, step, action, attempt, event) VALUES (?1, ?2, ?3, ?4, 1, ?5)",
                    baton_store::params![id, at, step, action, event],
                )?;
            }
            Ok(())
        })
        .await
}
