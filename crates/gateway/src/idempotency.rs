//! The `idempotency_keys` table: a key, and the request it first came with.

use baton_store::{OptionalExtension, params};
use baton_store::{StoreError, Tx};
use uuid::Uuid;

/// The request a key first came with.
#[derive(Debug, Clone)]
pub(crate) struct First {
    pub space_id: Uuid,
    pub saga_id: Uuid,
    pub name: String,
    pub owner: String,
}

/// The request `key` came with, if it came at or after `since` (ms).
pub(crate) fn find(tx: &Tx<'_>, key: &str, since: i64) -> Result<Option<First>, StoreError> {
    let row: Option<(String, String, String, String)> = tx
        .query_row(
            "SELECT space_id, saga_id, name, owner FROM idempotency_keys WHERE key = ?1 AND created_at >= ?2",
            params![key, since],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let corrupt = |e: uuid::Error| StoreError::Corrupt { table: "idempotency_keys", cause: e.into() };
    row.map(|(space, saga, name, owner)| {
        Ok(First {
            space_id: Uuid::parse_str(&space).map_err(corrupt)?,
            saga_id: Uuid::parse_str(&saga).map_err(corrupt)?,
            name,
            owner,
        })
    })
    .transpose()
}

/// Remember `key` for a new request (over an expired one of the same key).
pub(crate) fn remember(
    tx: &Tx<'_>,
    key: &str,
    space_id: Uuid,
    saga_id: Uuid,
    name: &str,
    owner: &str,
    now: i64,
) -> Result<(), StoreError> {
    tx.write(
        "INSERT INTO idempotency_keys (key, space_id, saga_id, name, owner, created_at, replays)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)
         ON CONFLICT (key) DO UPDATE SET space_id = excluded.space_id, saga_id = excluded.saga_id,
             name = excluded.name, owner = excluded.owner, created_at = excluded.created_at, replays = 0",
        params![key, space_id.to_string(), saga_id.to_string(), name, owner, now],
    )?;
    Ok(())
}

/// Count a retry of `key`.
pub(crate) fn replayed(tx: &Tx<'_>, key: &str) -> Result<(), StoreError> {
    tx.execute("UPDATE idempotency_keys SET replays = replays + 1 WHERE key = ?1", [key])?;
    Ok(())
}

/// The retention's purge of keys older than their time to live, `ttl`: kept that long
/// whatever the retention, since the requests their retries are answered from are kept.
pub(crate) fn purge(ttl: std::time::Duration) -> baton_store::retention::Purge {
    baton_store::retention::Purge {
        if_table: Some("idempotency_keys"),
        ..baton_store::retention::Purge::new(
            "idempotency keys",
            "DELETE FROM idempotency_keys WHERE key IN
               (SELECT key FROM idempotency_keys WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
        )
    }
    .kept_for(ttl)
}

/// Forget the key of the request of `saga_id` (it never started).
pub(crate) fn forget(tx: &Tx<'_>, saga_id: Uuid) -> Result<(), StoreError> {
    tx.execute("DELETE FROM idempotency_keys WHERE saga_id = ?1", [saga_id.to_string()])?;
    Ok(())
}
