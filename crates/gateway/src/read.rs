//! The read model of `gateway.db`: what the gateway told each request's client, and what its
//! clients' idempotency keys hold. The audit, `baton compare`, the bench and the tests read the
//! gateway's tables only through here, on either backend, never writing.

use baton_store::{Db, Location, OptionalExtension, StoreError, Tx, params};
use serde::Serialize;

use crate::COMPONENT;

/// One request the gateway took, and what its client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    pub space_id: String,
    pub saga_id: String,
    /// The space's name, as the client asked for it.
    pub name: String,
    /// The HTTP status the client got; `None` while it has none (or the gateway died first).
    pub status: Option<u16>,
}

/// What the clients' idempotency keys hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keys {
    /// Keys kept.
    pub keys: i64,
    /// Requests answered as a replay of a kept key's first request.
    pub replays: i64,
}

/// Every request the gateway took, in the store of `tx`.
pub fn told(tx: &Tx<'_>) -> Result<Vec<Told>, StoreError> {
    tx.query_map("SELECT space_id, saga_id, name, told_status FROM requests", (), |r| {
        let status: Option<i64> = r.get(3)?;
        Ok(Told {
            space_id: r.get(0)?,
            saga_id: r.get(1)?,
            name: r.get(2)?,
            status: status.and_then(|s| u16::try_from(s).ok()),
        })
    })
}

/// How many requests the gateway took (one message published for each).
pub fn request_count(tx: &Tx<'_>) -> Result<i64, StoreError> {
    tx.query_row("SELECT COUNT(*) FROM requests", (), |r| r.get(0))
}

/// One request as the console shows it: what was asked, what its client was told, and what
/// eventually happened.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    pub space_id: String,
    /// The saga's id (the space's own in events mode).
    pub saga_id: String,
    pub name: String,
    pub owner: String,
    pub mode: String,
    pub requested_at_ms: i64,
    pub told_status: Option<i64>,
    pub outcome_status: Option<i64>,
    /// The outcome as the orchestrator or the last service sent it (JSON), once it came.
    pub outcome: Option<serde_json::Value>,
}

const REQUEST_COLUMNS: &str =
    "space_id, saga_id, name, owner, mode, requested_at, told_status, outcome_status, outcome";

fn request(r: &baton_store::Row) -> Result<Request, StoreError> {
    let outcome: Option<String> = r.get(8)?;
    Ok(Request {
        space_id: r.get(0)?,
        saga_id: r.get(1)?,
        name: r.get(2)?,
        owner: r.get(3)?,
        mode: r.get(4)?,
        requested_at_ms: r.get(5)?,
        told_status: r.get(6)?,
        outcome_status: r.get(7)?,
        outcome: outcome.and_then(|o| serde_json::from_str(&o).ok()),
    })
}

/// The request for the space `space_id`, if this gateway's store has it.
pub fn request_of(tx: &Tx<'_>, space_id: &str) -> Result<Option<Request>, StoreError> {
    tx.query_row(&format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE space_id = ?1"), [space_id], request)
        .optional()
}

/// Up to `limit` requests, newest first, older than `before` (`requested_at`, `space_id`) when
/// given: a walk of the `requests_by_time` index that stops at the limit.
pub fn recent(tx: &Tx<'_>, limit: usize, before: Option<(i64, String)>) -> Result<Vec<Request>, StoreError> {
    let (at, id) = before.map_or((None, None), |(at, id)| (Some(at), Some(id)));
    tx.query_map(
        &format!(
            "SELECT {REQUEST_COLUMNS} FROM requests
             WHERE CAST(?1 AS INTEGER) IS NULL OR requested_at < ?1 OR (requested_at = ?1 AND space_id < ?2)
             ORDER BY requested_at DESC, space_id DESC LIMIT ?3"
        ),
        params![at, id, limit as i64],
        request,
    )
}

/// Up to `limit` requests, newest first, whose space id, saga id, name or owner is `text`
/// (`owner` is `text` spelled as owners are stored), each on its own index.
pub fn matching(tx: &Tx<'_>, text: &str, owner: &str, limit: usize) -> Result<Vec<Request>, StoreError> {
    tx.query_map(
        &format!(
            "SELECT {REQUEST_COLUMNS} FROM requests
             WHERE space_id = ?1 OR saga_id = ?1 OR name = ?1 OR owner = ?2
             ORDER BY requested_at DESC, space_id DESC LIMIT ?3"
        ),
        params![text, owner, limit as i64],
        request,
    )
}

/// The read-only view of the gateway's store at a location.
#[derive(Debug, Clone)]
pub struct Requests {
    location: Location,
}

impl Requests {
    pub fn at(location: &Location) -> Requests {
        Requests { location: location.clone() }
    }

    /// Run `f` on the gateway's store, or answer `none` while the gateway has not made it.
    async fn read<R: Send + 'static>(
        &self,
        none: R,
        f: impl FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        match Db::reader(&self.location, COMPONENT).await? {
            Some(db) => db.call(f).await,
            None => Ok(none),
        }
    }

    /// Every request, and what its client was told; none without a store.
    pub async fn told(&self) -> Result<Vec<Told>, StoreError> {
        self.read(Vec::new(), told).await
    }

    /// How many requests the gateway took; 0 without a store.
    pub async fn count(&self) -> Result<i64, StoreError> {
        self.read(0, request_count).await
    }

    /// What the idempotency keys hold; nothing without a store.
    pub async fn keys(&self) -> Result<Keys, StoreError> {
        self.read(Keys::default(), |tx| {
            tx.query_row(
                "SELECT COUNT(*), CAST(COALESCE(SUM(replays), 0) AS INTEGER) FROM idempotency_keys",
                (),
                |r| Ok(Keys { keys: r.get(0)?, replays: r.get(1)? }),
            )
        })
        .await
    }
}
