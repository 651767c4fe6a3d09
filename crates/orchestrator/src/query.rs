//! The read model of sagas: what `GET /workflows/{id}` and `baton workflows` show, and how many
//! sagas are in flight. Reads `orchestrator.db` through any connection (read-only ones
//! included); [`Sagas`] is how other components and processes read it, without knowing its file
//! or its tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use baton_store::{Db, Location, OptionalExtension, Tx, Value};
use baton_workflow::{HistoryEvent, Saga, SagaStatus};
use serde::Serialize;
use uuid::Uuid;

use baton_store::StoreError;

/// The statuses of a saga still in flight ([`SagaStatus::is_in_flight`]), as SQL on `column`.
pub(crate) fn in_flight(column: &str) -> String {
    SagaStatus::sql_in(column, SagaStatus::is_in_flight)
}

/// The read-only view of the orchestrator's store, for the gateway (`GET /workflows/{id}`), the
/// CLI and the runs' checks, on either backend. Cheap to clone; it opens a reader the first
/// time the orchestrator's store is there, and keeps it.
#[derive(Clone)]
pub struct Sagas {
    location: Location,
    reader: Arc<tokio::sync::Mutex<Option<Db>>>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas").field("location", &self.location).finish_non_exhaustive()
    }
}

impl Sagas {
    /// The sagas of the orchestrator keeping its state at `location`.
    pub fn at(location: &Location) -> Sagas {
        Sagas { location: location.clone(), reader: Arc::default() }
    }

    /// Where the orchestrator's store is, for messages.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// A reader of the orchestrator's store; `None` while the orchestrator has not made it.
    async fn reader(&self) -> Result<Option<Db>, StoreError> {
        let mut reader = self.reader.lock().await;
        if reader.is_none() {
            *reader = Db::reader(&self.location, crate::COMPONENT).await?;
        }
        Ok(reader.clone())
    }

    /// Run `f` on the store, or answer `none` when there is no store yet.
    async fn read<R: Send + 'static>(
        &self,
        none: R,
        f: impl FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        match self.reader().await? {
            Some(db) => db.call(f).await,
            None => Ok(none),
        }
    }

    /// Whether the orchestrator has made its store yet.
    pub async fn exists(&self) -> bool {
        matches!(self.reader().await, Ok(Some(_)))
    }

    /// The saga `id`; `None` when there is no such saga, or no store yet.
    pub async fn describe(&self, id: Uuid) -> Result<Option<WorkflowView>, StoreError> {
        self.read(None, move |tx| describe(tx, id)).await
    }

    /// The latest sagas, as [`list`]; none without a store.
    pub async fn list(
        &self,
        status: Option<SagaStatus>,
        limit: usize,
    ) -> Result<Vec<WorkflowSummary>, StoreError> {
        self.read(Vec::new(), move |tx| list(tx, status, limit)).await
    }

    /// A page of sagas, as [`page`]; an empty last page without a store.
    pub async fn page(
        &self,
        filter: &Filter,
        limit: usize,
        after: Option<Cursor>,
    ) -> Result<Page, StoreError> {
        let filter = filter.clone();
        self.read(Page { workflows: Vec::new(), next_cursor: None }, move |tx| {
            page(tx, &filter, limit, after)
        })
        .await
    }

    /// Every stored definition with its sagas, as [`versions`]; none without a store.
    pub async fn versions(&self) -> Result<Vec<Version>, StoreError> {
        self.read(Vec::new(), versions).await
    }

    /// Sagas in flight; 0 without a store.
    pub async fn in_flight(&self) -> Result<i64, StoreError> {
        self.read(0, in_flight_count).await
    }

    /// The ids of the sagas in flight; none without a store.
    pub async fn in_flight_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        self.read(Vec::new(), in_flight_ids).await
    }

    /// Sagas by status (only the states some saga is in); none without a store.
    pub async fn counts_by_status(&self) -> Result<BTreeMap<SagaStatus, i64>, StoreError> {
        self.read(BTreeMap::new(), counts_by_status).await
    }

    /// Every saga's space, state and the answer its client got; none without a store.
    pub async fn answers(&self) -> Result<Vec<Answered>, StoreError> {
        self.read(Vec::new(), answers).await
    }

    /// How many sagas and lines of history the store keeps (retention's concern); nothing
    /// without a store.
    pub async fn retained(&self) -> Result<Retained, StoreError> {
        self.read(Retained::default(), |tx| {
            let count =
                |table: &str| tx.query_row(&format!("SELECT COUNT(*) FROM {table}"), (), |r| r.get(0));
            Ok(Retained { sagas: count("sagas")?, history: count("history")? })
        })
        .await
    }

    /// Every saga, described as [`describe`] does, oldest first; none without a store. For
    /// checks over all sagas of a small store (the tests'), which must not read its tables.
    pub async fn all(&self) -> Result<Vec<WorkflowView>, StoreError> {
        self.read(Vec::new(), |tx| {
            let ids = tx.query_map(
                "SELECT saga_id FROM sagas WHERE parent_id IS NULL ORDER BY created_at, saga_id",
                (),
                |r| r.get::<String>(0),
            )?;
            let mut all = Vec::with_capacity(ids.len());
            for id in ids {
                all.extend(describe(tx, Uuid::parse_str(&id).map_err(corrupt)?)?);
            }
            Ok(all)
        })
        .await
    }

    /// The client's deadline of saga `id` on the saga clock (the clock of its history's
    /// `at_ms`), if it has one: what the checks of steps past a deadline compare with.
    pub async fn deadline_at(&self, id: Uuid) -> Result<Option<i64>, StoreError> {
        self.read(None, move |tx| {
            let at: Option<Option<i64>> = tx
                .query_row("SELECT deadline_at FROM sagas WHERE saga_id = ?1", [id.to_string()], |r| r.get(0))
                .optional()?;
            Ok(at.flatten())
        })
        .await
    }

    /// Per space, the compensable steps its saga sent at or after its client's deadline; none
    /// without a store.
    pub async fn steps_after_deadline(&self) -> Result<BTreeMap<String, u32>, StoreError> {
        self.read(BTreeMap::new(), steps_after_deadline).await
    }
}

/// How many sagas are in flight.
pub fn in_flight_count(conn: &Tx<'_>) -> Result<i64, StoreError> {
    conn.query_row(&format!("SELECT COUNT(*) FROM sagas WHERE {}", in_flight("status")), (), |r| r.get(0))
}

/// The ids of the sagas in flight.
pub fn in_flight_ids(conn: &Tx<'_>) -> Result<Vec<Uuid>, StoreError> {
    let ids =
        conn.query_map(&format!("SELECT saga_id FROM sagas WHERE {}", in_flight("status")), (), |r| {
            r.get::<String>(0)
        })?;
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
    /// The version of the definition it runs on: the content hash `baton workflows versions`
    /// lists (`None` for a saga from before versions were recorded).
    pub definition_hash: Option<String>,
    pub status: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub answer_status: Option<u16>,
    /// The trace of the request that started it (W3C trace id, 32 hex digits): the one its
    /// spans are exported under, and its log lines carry.
    pub trace_id: String,
    pub failure: Option<baton_workflow::Failure>,
    pub context: baton_protocol::Context,
    pub steps: Vec<StepView>,
    pub history: Vec<HistoryRow>,
    /// A child saga's parent, and the parent's action (its index among the parent's `steps`)
    /// it runs for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_step: Option<usize>,
    /// The child sagas its steps ran, oldest first, each described the same way.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<WorkflowView>,
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
    /// The space's name and owner (`None` for a saga from before they were stored).
    pub name: Option<String>,
    pub owner: Option<String>,
    pub workflow: String,
    pub status: String,
    pub answer_status: Option<u16>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

fn corrupt(e: impl Into<baton_store::Cause>) -> StoreError {
    StoreError::Corrupt { table: "sagas", cause: e.into() }
}

/// The saga `id`, if this database has it.
pub fn describe(conn: &Tx<'_>, id: Uuid) -> Result<Option<WorkflowView>, StoreError> {
    /// state, created_at, updated_at, answer_status, definition_hash, traceparent, parent_id,
    /// parent_index
    type Row = (String, i64, i64, Option<i64>, Option<String>, String, Option<String>, Option<i64>);
    let row: Option<Row> = conn
        .query_row(
            "SELECT state, created_at, updated_at, answer_status, definition_hash, traceparent,
                    parent_id, parent_index
             FROM sagas WHERE saga_id = ?1",
            [id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)),
        )
        .optional()?;
    let Some((state, created, updated, answer, definition_hash, trace, parent_id, parent_index)) = row else {
        return Ok(None);
    };
    let saga: Saga = serde_json::from_str(&state).map_err(corrupt)?;
    let history = conn.query_map(
        "SELECT at, step, action, attempt, event, detail FROM history WHERE saga_id = ?1 ORDER BY id",
        [id.to_string()],
        |r| {
            Ok(HistoryRow {
                at_ms: r.get(0)?,
                step: r.get(1)?,
                action: r.get(2)?,
                attempt: r.get(3)?,
                event: r.get(4)?,
                detail: r.get(5)?,
            })
        },
    )?;
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
        definition_hash,
        status: saga.status.as_str().into(),
        created_at_ms: created,
        updated_at_ms: updated,
        answer_status: answer.map(|a| a as u16),
        trace_id: baton_protocol::TraceParent(trace).trace_id().to_owned(),
        failure: saga.failure.clone(),
        context: saga.context.clone(),
        steps,
        history,
        parent_id: parent_id.map(|p| Uuid::parse_str(&p).map_err(corrupt)).transpose()?,
        parent_step: parent_index.map(|i| i as usize),
        children: children(conn, id)?,
    }))
}

/// The child sagas of saga `id`, described, oldest first.
fn children(conn: &Tx<'_>, id: Uuid) -> Result<Vec<WorkflowView>, StoreError> {
    let ids = conn.query_map(
        "SELECT saga_id FROM sagas WHERE parent_id = ?1 ORDER BY created_at, saga_id",
        [id.to_string()],
        |r| r.get::<String>(0),
    )?;
    let mut all = Vec::with_capacity(ids.len());
    for child in ids {
        all.extend(describe(conn, Uuid::parse_str(&child).map_err(corrupt)?)?);
    }
    Ok(all)
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
    /// Only the saga with this id.
    pub id: Option<Uuid>,
    /// Only sagas of a space of this name.
    pub name: Option<String>,
    /// Only sagas of a space of this owner (spelled as stored: normalised).
    pub owner: Option<String>,
    /// Only sagas that [`Search`] finds.
    pub search: Option<Search>,
    /// Only sagas started at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// Only sagas started before this time (ms since the Unix epoch).
    pub until_ms: Option<i64>,
    /// Only sagas pinned to this version of their definition (its content hash).
    pub version: Option<String>,
}

/// One text looked for in every field an operator names a saga by: its id, its space's id,
/// its space's name, or its owner (`owner` is the text spelled as owners are stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    pub text: String,
    pub owner: String,
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

/// A row of [`page`]'s query: id, space, workflow, status, answer, created, updated, name, owner.
type SummaryRow = (String, String, String, String, Option<i64>, i64, i64, Option<String>, Option<String>);

/// The query of [`page`] and its parameters: only the conditions `filter` sets, so that each
/// engine plans it on the index of its most selective one (an index on `(column, created_at,
/// saga_id)` walked newest first, stopping at the page's end), where a query of every optional
/// condition would be planned once for all and scan. The next page starts after the cursor
/// (keyset pagination: no OFFSET scans).
pub(crate) fn page_query(filter: &Filter, limit: usize, after: Option<Cursor>) -> (String, Vec<Value>) {
    let mut values = Vec::new();
    let mut bind = |v: Value| {
        values.push(v);
        format!("?{}", values.len())
    };
    let text = |s: &str| Value::Text(s.to_owned());
    // A child saga is shown in its parent, not as a request of its own.
    let mut conds = vec!["parent_id IS NULL".to_owned()];
    let mut equal = |column: &str, v: Option<Value>| {
        if let Some(v) = v {
            conds.push(format!("{column} = {}", bind(v)));
        }
    };
    equal("status", filter.status.map(|s| text(s.as_str())));
    equal("workflow", filter.workflow.as_deref().map(text));
    equal("space_id", filter.space_id.map(|s| Value::Text(s.to_string())));
    equal("saga_id", filter.id.map(|s| Value::Text(s.to_string())));
    equal("name", filter.name.as_deref().map(text));
    equal("owner", filter.owner.as_deref().map(text));
    equal("definition_hash", filter.version.as_deref().map(text));
    if let Some(search) = &filter.search {
        let t = bind(text(&search.text));
        let o = bind(text(&search.owner));
        conds.push(format!("(saga_id = {t} OR space_id = {t} OR name = {t} OR owner = {o})"));
    }
    if let Some(since) = filter.since_ms {
        conds.push(format!("created_at >= {}", bind(Value::Integer(since))));
    }
    if let Some(until) = filter.until_ms {
        conds.push(format!("created_at < {}", bind(Value::Integer(until))));
    }
    if let Some(c) = after {
        let (at, id) = (bind(Value::Integer(c.created_at_ms)), bind(Value::Text(c.id.to_string())));
        conds.push(format!("(created_at < {at} OR (created_at = {at} AND saga_id < {id}))"));
    }
    // One more than asked: whether there is a next page.
    let limit = bind(Value::Integer(limit.saturating_add(1) as i64));
    let filter = format!(" WHERE {}", conds.join(" AND "));
    let sql = format!(
        "SELECT saga_id, space_id, workflow, status, answer_status, created_at, updated_at, name, owner \
         FROM sagas{filter} \
         ORDER BY created_at DESC, saga_id DESC LIMIT {limit}"
    );
    (sql, values)
}

/// Up to `limit` sagas matching `filter`, newest first, starting after `after`; child sagas
/// are shown in their parent.
pub fn page(conn: &Tx<'_>, filter: &Filter, limit: usize, after: Option<Cursor>) -> Result<Page, StoreError> {
    let (sql, values) = page_query(filter, limit, after);
    let rows: Vec<SummaryRow> = conn.query_map(&sql, values, |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
        ))
    })?;
    let mut workflows = rows
        .into_iter()
        .map(|(id, space, workflow, status, answer, created, updated, name, owner)| {
            Ok(WorkflowSummary {
                id: Uuid::parse_str(&id).map_err(corrupt)?,
                space_id: Uuid::parse_str(&space).map_err(corrupt)?,
                name,
                owner,
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
    conn: &Tx<'_>,
    status: Option<SagaStatus>,
    limit: usize,
) -> Result<Vec<WorkflowSummary>, StoreError> {
    Ok(page(conn, &Filter { status, ..Filter::default() }, limit, None)?.workflows)
}

/// Sagas by status, for quiescence checks and summaries; a child saga is counted in its parent,
/// which is in flight while it is.
pub fn counts_by_status(conn: &Tx<'_>) -> Result<BTreeMap<SagaStatus, i64>, StoreError> {
    let rows: Vec<(String, i64)> = conn.query_map(
        "SELECT status, COUNT(*) FROM sagas WHERE parent_id IS NULL GROUP BY status",
        (),
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    rows.into_iter().map(|(s, n)| Ok((SagaStatus::parse(&s).map_err(corrupt)?, n))).collect()
}

/// How many rows the orchestrator keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retained {
    pub sagas: i64,
    pub history: i64,
}

/// One saga's space, state, and the answer its client got (`None`: none sent yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub saga_id: String,
    pub space_id: String,
    pub status: SagaStatus,
    pub answer_status: Option<u16>,
}

/// Every saga's space, state and answer; a child saga answers its parent, not a client, and is
/// left out.
pub fn answers(conn: &Tx<'_>) -> Result<Vec<Answered>, StoreError> {
    let rows: Vec<(String, String, String, Option<i64>)> = conn.query_map(
        "SELECT saga_id, space_id, status, answer_status FROM sagas WHERE parent_id IS NULL",
        (),
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    rows.into_iter()
        .map(|(saga_id, space_id, status, answer)| {
            Ok(Answered {
                saga_id,
                space_id,
                status: SagaStatus::parse(&status).map_err(corrupt)?,
                answer_status: answer.and_then(|a| u16::try_from(a).ok()),
            })
        })
        .collect()
}

/// Per space, the forward commands to compensable steps its saga sent at or after its
/// client's deadline, both times on the clock of the process that started the saga (a later
/// process's clock may differ by a jump: see `Saga::rearm`). The email is no compensable step:
/// a late one is the saga completing. Empty for a store older than deadlines.
pub fn steps_after_deadline(conn: &Tx<'_>) -> Result<BTreeMap<String, u32>, StoreError> {
    if !conn.has_column("sagas", "deadline_at")? {
        return Ok(BTreeMap::new());
    }
    let rows: Vec<(String, i64)> = conn.query_map(
        "SELECT s.space_id, COUNT(*) FROM sagas s JOIN history h ON h.saga_id = s.saga_id
         WHERE s.deadline_at IS NOT NULL AND h.event = 'sent' AND h.action = 'do'
           AND h.step <> 'notifier' AND h.at >= s.deadline_at
         GROUP BY s.space_id",
        (),
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(rows.into_iter().map(|(space, n)| (space, n as u32)).collect())
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
    /// Sagas started on it that ended (completed, rolled back, cancelled) and are still retained.
    pub done: i64,
    /// Sagas started on it waiting for an operator (`compensation_failed`, `definition_missing`).
    pub stuck: i64,
}

/// Every stored definition, each workflow's newest first, with how many sagas it has in each
/// kind of state. Sagas pinned to a hash no longer stored show under that hash with no body.
pub fn versions(conn: &Tx<'_>) -> Result<Vec<Version>, StoreError> {
    let running = SagaStatus::sql_in("s.status", SagaStatus::is_in_flight);
    let done = SagaStatus::sql_in("s.status", SagaStatus::is_settled);
    let stuck = SagaStatus::sql_in("s.status", SagaStatus::needs_operator);
    conn.query_map(
        &format!(
            "SELECT d.workflow, d.hash, d.first_seen,
                CAST(COALESCE(SUM(CASE WHEN {running} THEN 1 ELSE 0 END), 0) AS INTEGER),
                CAST(COALESCE(SUM(CASE WHEN {done} THEN 1 ELSE 0 END), 0) AS INTEGER),
                CAST(COALESCE(SUM(CASE WHEN {stuck} THEN 1 ELSE 0 END), 0) AS INTEGER)
         FROM definitions d LEFT JOIN sagas s ON s.definition_hash = d.hash
         WHERE d.hash IS NOT NULL
         GROUP BY d.workflow, d.hash, d.first_seen
         UNION ALL
         SELECT s.workflow, COALESCE(s.definition_hash, ''), NULL,
                CAST(SUM(CASE WHEN {running} THEN 1 ELSE 0 END) AS INTEGER),
                CAST(SUM(CASE WHEN {done} THEN 1 ELSE 0 END) AS INTEGER),
                CAST(SUM(CASE WHEN {stuck} THEN 1 ELSE 0 END) AS INTEGER)
         FROM sagas s WHERE NOT EXISTS (SELECT 1 FROM definitions d WHERE d.hash = s.definition_hash)
         GROUP BY s.workflow, s.definition_hash
         ORDER BY 1, 3 DESC NULLS LAST"
        ),
        (),
        |r| {
            Ok(Version {
                workflow: r.get(0)?,
                hash: r.get(1)?,
                first_seen_ms: r.get(2)?,
                running: r.get(3)?,
                done: r.get(4)?,
                stuck: r.get(5)?,
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `orchestrator.db` with two versions of create-space: `old` with a saga running, one
    /// completed and one stuck; `new` with none; and a saga pinned to a hash no longer stored.
    async fn store(at: &Location) -> Sagas {
        let db = Db::open(at, crate::COMPONENT, crate::MIGRATIONS, baton_store::DEFAULT_OWNER).await.unwrap();
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
        Sagas::at(at)
    }

    #[tokio::test]
    async fn versions_count_each_definitions_sagas_newest_first_and_list_a_hash_no_longer_stored() {
        let dir = tempfile::tempdir().unwrap();
        let pg = baton_store::scratch::ScratchDatabase::create(
            &baton_store::scratch::test_server(),
            "baton_query",
        )
        .expect("the tests' PostgreSQL server");
        for at in [Location::Dir(dir.path().to_owned()), pg.location().clone()] {
            versions_on(&at).await;
        }
    }

    async fn versions_on(at: &Location) {
        let sagas = store(at).await;
        let got: Vec<_> = sagas
            .versions()
            .await
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

    #[test]
    fn a_page_query_holds_only_the_conditions_asked_for() {
        let (sql, values) = page_query(&Filter::default(), 50, None);
        assert!(sql.contains("WHERE parent_id IS NULL ORDER BY"), "only the parents: {sql}");
        assert_eq!(values, vec![Value::Integer(51)]);
        let filter = Filter {
            status: Some(SagaStatus::Running),
            owner: Some("alice".into()),
            until_ms: Some(9),
            ..Filter::default()
        };
        let after = Cursor { created_at_ms: 5, id: Uuid::from_u128(1) };
        let (sql, values) = page_query(&filter, 2, Some(after));
        assert!(
            sql.contains(
                "WHERE parent_id IS NULL AND status = ?1 AND owner = ?2 AND created_at < ?3 \
                 AND (created_at < ?4 OR (created_at = ?4 AND saga_id < ?5)) \
                 ORDER BY created_at DESC, saga_id DESC LIMIT ?6"
            ),
            "{sql}"
        );
        assert_eq!(values.len(), 6);
        assert_eq!(values[5], Value::Integer(3));
    }

    /// 20,000 sagas, then the plan of each kind of page: an index, never a scan of the table
    /// (SQLite's `SCAN sagas` without an index, PostgreSQL's `Seq Scan`), nor a sort of every
    /// saga for an unfiltered page.
    #[tokio::test]
    async fn every_kind_of_page_is_planned_on_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let pg = baton_store::scratch::ScratchDatabase::create(
            &baton_store::scratch::test_server(),
            "baton_query",
        )
        .expect("the tests' PostgreSQL server");
        for at in [Location::Dir(dir.path().to_owned()), pg.location().clone()] {
            plans_on(&at).await;
        }
    }

    async fn plans_on(at: &Location) {
        Db::open(at, crate::COMPONENT, crate::MIGRATIONS, baton_store::DEFAULT_OWNER).await.unwrap();
        let statuses = SagaStatus::ALL;
        crate::testing::fill(at, 20_000, move |i| crate::testing::Filled {
            id: Uuid::from_u128(i as u128 + 1),
            space_id: Uuid::from_u128(1 << 64 | i as u128),
            workflow: ["create-space", "create-space-parallel"][i % 2].into(),
            status: statuses[i % statuses.len()],
            name: format!("space-{i}"),
            owner: format!("owner-{}", i % 500),
            version: format!("v{}", i % 3),
            created_at_ms: 1_000_000 + i as i64,
        })
        .await
        .unwrap();
        let cursor = Cursor { created_at_ms: 1_010_000, id: Uuid::from_u128(10_001) };
        let search = |text: &str| Some(Search { text: text.into(), owner: text.into() });
        let filters = [
            ("everything", Filter::default(), None),
            ("the next page", Filter::default(), Some(cursor)),
            ("a state", Filter { status: Some(SagaStatus::Running), ..Filter::default() }, Some(cursor)),
            ("a workflow", Filter { workflow: Some("create-space".into()), ..Filter::default() }, None),
            ("a version", Filter { version: Some("v1".into()), ..Filter::default() }, None),
            ("an owner", Filter { owner: Some("owner-7".into()), ..Filter::default() }, None),
            ("a name", Filter { name: Some("space-7".into()), ..Filter::default() }, None),
            ("a space", Filter { space_id: Some(Uuid::from_u128(1 << 64 | 7)), ..Filter::default() }, None),
            ("an id", Filter { id: Some(Uuid::from_u128(8)), ..Filter::default() }, None),
            ("a search", Filter { search: search("owner-7"), ..Filter::default() }, None),
            (
                "a time range",
                Filter { since_ms: Some(1_005_000), until_ms: Some(1_006_000), ..Filter::default() },
                None,
            ),
        ];
        for (what, filter, after) in filters {
            let plan = crate::testing::plan_of_page(at, &filter, after).await.unwrap().join("\n");
            let scans = plan
                .lines()
                .any(|l| (l.contains("SCAN sagas") && !l.contains("INDEX")) || l.contains("Seq Scan"));
            assert!(!scans, "{what} on {at:?} scans the table:\n{plan}");
            if filter == Filter::default() {
                assert!(!plan.contains("TEMP B-TREE") && !plan.contains("Sort"), "{what} sorts:\n{plan}");
            }
        }
        // And the pages are right: the filters hold, newest first.
        let sagas = Sagas::at(at);
        let page = sagas
            .page(&Filter { owner: Some("owner-7".into()), ..Filter::default() }, 10, None)
            .await
            .unwrap();
        assert_eq!(page.workflows.len(), 10);
        assert!(page.workflows.windows(2).all(|w| w[0].created_at_ms > w[1].created_at_ms));
        assert_eq!(page.workflows[0].created_at_ms, 1_000_000 + 19_507);
        let next = sagas
            .page(
                &Filter { owner: Some("owner-7".into()), ..Filter::default() },
                10,
                page.next_cursor.as_deref().map(|c| c.parse().unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(
            next.workflows[0].created_at_ms,
            1_000_000 + 14_507,
            "the next page starts after the cursor"
        );
        let found =
            sagas.page(&Filter { search: search("space-7"), ..Filter::default() }, 10, None).await.unwrap();
        assert_eq!(found.workflows.iter().map(|w| w.created_at_ms).collect::<Vec<_>>(), vec![1_000_007]);
    }
}
