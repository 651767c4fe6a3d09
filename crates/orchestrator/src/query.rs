//! The read model of sagas: what `GET /workflows/{id}` and `baton workflows` show, and how many
//! sagas are in flight. Reads `orchestrator.db` through any connection (read-only ones
//! included); [`Sagas`] is how other components and processes read it, without knowing its file
//! or its tables.

use std::path::{Path, PathBuf};

use baton_workflow::{HistoryEvent, Saga, SagaStatus};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use uuid::Uuid;

use baton_store::StoreError;

/// The statuses of a saga still in flight, as SQL: started and not yet answered and ended
/// (`succeeded` still has its answer to send); `compensation_failed` waits for an operator.
pub(crate) const IN_FLIGHT: &str = "status IN ('running', 'compensating', 'succeeded')";

/// The read-only view of a data dir's `orchestrator.db`, for the gateway (`GET /workflows/{id}`),
/// the CLI and the runs' checks. Cheap to clone; each call opens the file read-only (WAL lets it
/// read while the orchestrator writes), and blocks: call it off the async workers.
#[derive(Debug, Clone)]
pub struct Sagas {
    path: PathBuf,
}

impl Sagas {
    /// The sagas of the orchestrator keeping its database in `data_dir`.
    pub fn in_data_dir(data_dir: &Path) -> Sagas {
        Sagas { path: data_dir.join(format!("{}.db", crate::COMPONENT)) }
    }

    /// The database file, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the orchestrator has made its database yet.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    fn open(&self) -> Result<Option<Connection>, StoreError> {
        if !self.exists() {
            return Ok(None);
        }
        baton_store::open_read_only(&self.path).map(Some)
    }

    /// The saga `id`; `None` when there is no such saga, or no database yet.
    pub fn describe(&self, id: Uuid) -> Result<Option<WorkflowView>, StoreError> {
        match self.open()? {
            Some(conn) => describe(&conn, id),
            None => Ok(None),
        }
    }

    /// The latest sagas, as [`list`]; none without a database.
    pub fn list(&self, status: Option<SagaStatus>, limit: usize) -> Result<Vec<WorkflowSummary>, StoreError> {
        match self.open()? {
            Some(conn) => list(&conn, status, limit),
            None => Ok(Vec::new()),
        }
    }

    /// A page of sagas, as [`page`]; an empty last page without a database.
    pub fn page(&self, filter: &Filter, limit: usize, after: Option<Cursor>) -> Result<Page, StoreError> {
        match self.open()? {
            Some(conn) => page(&conn, filter, limit, after),
            None => Ok(Page { workflows: Vec::new(), next_cursor: None }),
        }
    }

    /// Every stored definition with its sagas, as [`versions`]; none without a database.
    pub fn versions(&self) -> Result<Vec<Version>, StoreError> {
        match self.open()? {
            Some(conn) => versions(&conn),
            None => Ok(Vec::new()),
        }
    }

    /// Sagas in flight; 0 without a database.
    pub fn in_flight(&self) -> Result<i64, StoreError> {
        match self.open()? {
            Some(conn) => in_flight_count(&conn),
            None => Ok(0),
        }
    }
}

/// How many sagas are in flight.
pub fn in_flight_count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row(&format!("SELECT COUNT(*) FROM sagas WHERE {IN_FLIGHT}"), [], |r| r.get(0))?)
}

/// The ids of the sagas in flight.
pub fn in_flight_ids(conn: &Connection) -> Result<Vec<Uuid>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT saga_id FROM sagas WHERE {IN_FLIGHT}"))?;
    let ids = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    ids.iter().map(|id| Uuid::parse_str(id).map_err(corrupt)).collect()
}

/// One line of a saga's timeline.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HistoryRow {
    pub at_ms: i64,
    pub step: Option<String>,
    pub action: Option<String>,
    pub attempt: u32,
    pub event: String,
    pub detail: Option<String>,
}

/// A step as it stands now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StepView {
    pub step: String,
    pub group: usize,
    pub phase: String,
    pub attempts: u32,
    pub compensation_attempts: u32,
}

/// One saga: where it stands and how it got there.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowView {
    pub id: Uuid,
    pub space_id: Uuid,
    pub workflow: String,
    pub status: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub answer_status: Option<u16>,
    pub failure: Option<baton_workflow::Failure>,
    pub context: baton_protocol::Context,
    pub steps: Vec<StepView>,
    pub history: Vec<HistoryRow>,
}

impl WorkflowView {
    /// Why a cancel cannot stop this saga, or `None` when it can
    /// ([`baton_workflow::why_not_cancellable`]).
    pub fn why_not_cancellable(&self) -> Option<String> {
        let status = SagaStatus::parse(&self.status).ok()?;
        baton_workflow::why_not_cancellable(self.id, status, self.count(HistoryEvent::CancelRequested) > 0)
    }

    /// Lines of the timeline with `event`.
    pub fn count(&self, event: HistoryEvent) -> usize {
        self.history.iter().filter(|h| h.event == event.as_str()).count()
    }

    /// The detail of the last line of the timeline with `event`.
    pub fn last_detail(&self, event: HistoryEvent) -> Option<&str> {
        self.history.iter().rev().find(|h| h.event == event.as_str()).and_then(|h| h.detail.as_deref())
    }
}

/// A line of `baton workflows list`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowSummary {
    pub id: Uuid,
    pub space_id: Uuid,
    pub workflow: String,
    pub status: String,
    pub answer_status: Option<u16>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

fn corrupt(e: impl ToString) -> StoreError {
    StoreError::Corrupt { table: "sagas", cause: e.to_string() }
}

/// The saga `id`, if this database has it.
pub fn describe(conn: &Connection, id: Uuid) -> Result<Option<WorkflowView>, StoreError> {
    let row: Option<(String, i64, i64, Option<i64>)> = conn
        .query_row(
            "SELECT state, created_at, updated_at, answer_status FROM sagas WHERE saga_id = ?1",
            [id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((state, created, updated, answer)) = row else { return Ok(None) };
    let saga: Saga = serde_json::from_str(&state).map_err(corrupt)?;
    let mut stmt = conn.prepare_cached(
        "SELECT at, step, action, attempt, event, detail FROM history WHERE saga_id = ?1 ORDER BY id",
    )?;
    let history = stmt
        .query_map([id.to_string()], |r| {
            Ok(HistoryRow {
                at_ms: r.get(0)?,
                step: r.get(1)?,
                action: r.get(2)?,
                attempt: r.get(3)?,
                event: r.get(4)?,
                detail: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let steps = saga
        .actions
        .iter()
        .map(|a| StepView {
            step: a.service.name().into(),
            group: a.step,
            phase: serde_json::to_value(a.phase)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            attempts: a.attempt,
            compensation_attempts: a.undo_attempt,
        })
        .collect();
    Ok(Some(WorkflowView {
        id: saga.id,
        space_id: saga.space_id,
        workflow: saga.workflow.clone(),
        status: saga.status.as_str().into(),
        created_at_ms: created,
        updated_at_ms: updated,
        answer_status: answer.map(|a| a as u16),
        failure: saga.failure.clone(),
        context: saga.context.clone(),
        steps,
        history,
    }))
}

/// Which sagas a page of [`page`] holds; every field left `None` matches every saga.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only sagas in this state.
    pub status: Option<SagaStatus>,
    /// Only sagas of this workflow (`create-space`, ...).
    pub workflow: Option<String>,
    /// Only the saga of this space.
    pub space_id: Option<Uuid>,
    /// Only sagas started at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
}

/// Where the next page of [`page`] starts: right after the last saga of the page before, in
/// its order (newest first, ties broken by id). Written as `<created_at_ms>.<saga id>` so that a
/// client passes it back as it got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at_ms: i64,
    pub id: Uuid,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at_ms, self.id.simple())
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Cursor, String> {
        let bad =
            || format!("`{s}` is not a cursor; pass back the `next_cursor` of the previous page as it came");
        let (at, id) = s.split_once('.').ok_or_else(bad)?;
        Ok(Cursor {
            created_at_ms: at.parse().map_err(|_| bad())?,
            id: Uuid::parse_str(id).map_err(|_| bad())?,
        })
    }
}

/// One page of sagas, newest first, and where the next one starts (`None`: this is the last).
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub workflows: Vec<WorkflowSummary>,
    pub next_cursor: Option<String>,
}

/// Up to `limit` sagas matching `filter`, newest first, starting after `after`.
pub fn page(
    conn: &Connection,
    filter: &Filter,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT saga_id, space_id, workflow, status, answer_status, created_at, updated_at FROM sagas
         WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR workflow = ?2) AND (?3 IS NULL OR space_id = ?3)
           AND (?4 IS NULL OR created_at >= ?4)
           AND (?5 IS NULL OR created_at < ?5 OR (created_at = ?5 AND saga_id < ?6))
         ORDER BY created_at DESC, saga_id DESC LIMIT ?7",
    )?;
    let rows = stmt
        .query_map(
            params![
                filter.status.map(SagaStatus::as_str),
                filter.workflow,
                filter.space_id.map(|s| s.to_string()),
                filter.since_ms,
                after.map(|c| c.created_at_ms),
                after.map(|c| c.id.to_string()),
                // One more than asked: whether there is a next page.
                limit.saturating_add(1) as i64
            ],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let mut workflows = rows
        .into_iter()
        .map(|(id, space, workflow, status, answer, created, updated)| {
            Ok(WorkflowSummary {
                id: Uuid::parse_str(&id).map_err(corrupt)?,
                space_id: Uuid::parse_str(&space).map_err(corrupt)?,
                workflow,
                status,
                answer_status: answer.map(|a| a as u16),
                created_at_ms: created,
                updated_at_ms: updated,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let next_cursor = (workflows.len() > limit).then(|| {
        workflows.truncate(limit);
        let last = workflows.last().expect("a page past its limit has a last saga");
        Cursor { created_at_ms: last.created_at_ms, id: last.id }.to_string()
    });
    Ok(Page { workflows, next_cursor })
}

/// The latest sagas, optionally of one state (the first page of [`page`]).
pub fn list(
    conn: &Connection,
    status: Option<SagaStatus>,
    limit: usize,
) -> Result<Vec<WorkflowSummary>, StoreError> {
    Ok(page(conn, &Filter { status, ..Filter::default() }, limit, None)?.workflows)
}

/// Sagas by status, for quiescence checks and summaries.
pub fn count_by_status(conn: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT status, COUNT(*) FROM sagas GROUP BY status ORDER BY status")?;
    Ok(stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?)
}

/// One stored definition of a workflow, and its sagas: a line of `baton workflows versions`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Version {
    pub workflow: String,
    /// The content hash every saga started on it is pinned to.
    pub hash: String,
    /// When an orchestrator first loaded it (ms since the Unix epoch; `None` for a definition
    /// stored before versions were recorded).
    pub first_seen_ms: Option<i64>,
    /// Sagas started on it still in flight (running, compensating, or succeeded with the email
    /// on its way).
    pub running: i64,
    /// Sagas started on it that ended (completed, rolled back) and are still retained.
    pub done: i64,
    /// Sagas started on it waiting for an operator (`compensation_failed`, `definition_missing`).
    pub stuck: i64,
}

/// Every stored definition, each workflow's newest first, with how many sagas it has in each
/// kind of state. Sagas pinned to a hash no longer stored show under that hash with no body.
pub fn versions(conn: &Connection) -> Result<Vec<Version>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT d.workflow, d.hash, d.first_seen,
                COALESCE(SUM(CASE WHEN s.{IN_FLIGHT} THEN 1 ELSE 0 END), 0),
                COALESCE(SUM(CASE WHEN s.status IN ('completed', 'rolled_back') THEN 1 ELSE 0 END), 0),
                COALESCE(SUM(CASE WHEN s.status IN ('compensation_failed', 'definition_missing') THEN 1 ELSE 0 END), 0)
         FROM definitions d LEFT JOIN sagas s ON s.definition_hash = d.hash
         WHERE d.hash IS NOT NULL
         GROUP BY d.workflow, d.hash, d.first_seen
         UNION ALL
         SELECT s.workflow, COALESCE(s.definition_hash, ''), NULL,
                SUM(CASE WHEN s.{IN_FLIGHT} THEN 1 ELSE 0 END),
                SUM(CASE WHEN s.status IN ('completed', 'rolled_back') THEN 1 ELSE 0 END),
                SUM(CASE WHEN s.status IN ('compensation_failed', 'definition_missing') THEN 1 ELSE 0 END)
         FROM sagas s WHERE NOT EXISTS (SELECT 1 FROM definitions d WHERE d.hash = s.definition_hash)
         GROUP BY s.workflow, s.definition_hash
         ORDER BY 1, 3 DESC NULLS LAST"
    ))?;
    let rows = stmt.query_map([], |r| {
        Ok(Version {
            workflow: r.get(0)?,
            hash: r.get(1)?,
            first_seen_ms: r.get(2)?,
            running: r.get(3)?,
            done: r.get(4)?,
            stuck: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `orchestrator.db` with two versions of create-space: `old` with a saga running, one
    /// completed and one stuck; `new` with none; and a saga pinned to a hash no longer stored.
    async fn store() -> (tempfile::TempDir, Sagas) {
        let dir = tempfile::tempdir().unwrap();
        let db = baton_store::Db::open(&dir.path().join("orchestrator.db"), crate::MIGRATIONS).unwrap();
        db.transaction(|tx| {
            tx.execute_batch(
                "INSERT INTO definitions (workflow, body, hash, first_seen) VALUES
                   ('create-space', 'a', 'old', 1000), ('create-space', 'b', 'new', 2000);
                 INSERT INTO sagas (saga_id, space_id, workflow, status, state, traceparent, created_at, updated_at, definition_hash) VALUES
                   ('s1', 'p1', 'create-space', 'running', '{}', '', 1, 1, 'old'),
                   ('s2', 'p2', 'create-space', 'completed', '{}', '', 1, 1, 'old'),
                   ('s3', 'p3', 'create-space', 'definition_missing', '{}', '', 1, 1, 'old'),
                   ('s4', 'p4', 'create-space', 'definition_missing', '{}', '', 1, 1, 'gone');",
            )?;
            Ok(())
        })
        .await
        .unwrap();
        let sagas = Sagas::in_data_dir(dir.path());
        (dir, sagas)
    }

    #[tokio::test]
    async fn versions_count_each_definitions_sagas_newest_first_and_list_a_hash_no_longer_stored() {
        let (_dir, sagas) = store().await;
        let got: Vec<_> = sagas
            .versions()
            .unwrap()
            .into_iter()
            .map(|v| (v.hash, v.first_seen_ms, v.running, v.done, v.stuck))
            .collect();
        assert_eq!(
            got,
            vec![
                ("new".into(), Some(2000), 0, 0, 0),
                ("old".into(), Some(1000), 1, 1, 1),
                ("gone".into(), None, 0, 0, 1),
            ]
        );
    }
}
