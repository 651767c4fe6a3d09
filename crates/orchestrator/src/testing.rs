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

/// A saga as [`fill`] writes it: the fields the list filters and shows, no history, an empty
/// state (enough for lists and counts, not for a saga's page).
#[derive(Debug, Clone)]
pub struct Filled {
    pub id: Uuid,
    pub space_id: Uuid,
    pub workflow: String,
    pub status: baton_workflow::SagaStatus,
    pub name: String,
    pub owner: String,
    pub version: String,
    pub created_at_ms: i64,
}

/// Write `count` sagas, the `i`th of them `row(i)`, in one transaction of multi-row inserts:
/// a store of a size no test could make through the broker (100,000 sagas in seconds).
pub async fn fill(
    location: &Location,
    count: usize,
    row: impl Fn(usize) -> Filled + Send + 'static,
) -> Result<(), StoreError> {
    /// Rows per statement: 8 parameters each, far below either engine's limit.
    const BATCH: usize = 500;
    open(location)
        .await?
        .transaction(move |tx| {
            for first in (0..count).step_by(BATCH) {
                let rows: Vec<Filled> = (first..count.min(first + BATCH)).map(&row).collect();
                let mut values = Vec::with_capacity(rows.len() * 8);
                let mut tuples = Vec::with_capacity(rows.len());
                for (i, r) in rows.into_iter().enumerate() {
                    let p = i * 8;
                    tuples.push(format!(
                        "(?{}, ?{}, ?{}, ?{}, '{{}}', '', ?{}, ?{}, ?{}, ?{}, ?{})",
                        p + 1, p + 2, p + 3, p + 4, p + 5, p + 5, p + 6, p + 7, p + 8
                    ));
                    values.extend([
                        baton_store::Value::Text(r.id.to_string()),
                        baton_store::Value::Text(r.space_id.to_string()),
                        baton_store::Value::Text(r.workflow),
                        baton_store::Value::Text(r.status.as_str().to_owned()),
                        baton_store::Value::Integer(r.created_at_ms),
                        baton_store::Value::Text(r.version),
                        baton_store::Value::Text(r.name),
                        baton_store::Value::Text(r.owner),
                    ]);
                }
                tx.execute(
                    &format!(
                        "INSERT INTO sagas (saga_id, space_id, workflow, status, state, traceparent, created_at,
                                            updated_at, definition_hash, name, owner) VALUES {}",
                        tuples.join(", ")
                    ),
                    values,
                )?;
            }
            Ok(())
        })
        .await
}

/// The query plan of [`crate::query::page`] for `filter` on the store at `location`, one line
/// a step (SQLite's `EXPLAIN QUERY PLAN` details, PostgreSQL's `EXPLAIN` lines), after the
/// engine's statistics are brought up to date: what a test checks for an index walk.
pub async fn plan_of_page(
    location: &Location,
    filter: &crate::query::Filter,
    after: Option<crate::query::Cursor>,
) -> Result<Vec<String>, StoreError> {
    let (sql, values) = crate::query::page_query(filter, 50, after);
    let postgres = matches!(location, Location::Postgres(_));
    open(location)
        .await?
        .transaction(move |tx| {
            tx.execute_batch("ANALYZE")?;
            if postgres {
                tx.query_map(&format!("EXPLAIN {sql}"), values, |r| r.get(0))
            } else {
                tx.query_map(&format!("EXPLAIN QUERY PLAN {sql}"), values, |r| r.get(3))
            }
        })
        .await
}
