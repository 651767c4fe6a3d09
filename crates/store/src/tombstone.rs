//! Tombstones: the steps that were compensated, so a command that arrives after its
//! compensation (a late or retried command) is a no-op.

use crate::{Tx, params};
use uuid::Uuid;

use crate::{StoreError, now_ms};

pub fn exists(tx: &Tx<'_>, saga_id: Uuid, step: &str) -> Result<bool, StoreError> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM tombstones WHERE saga_id = ?1 AND step = ?2)",
        params![saga_id.to_string(), step],
        |r| r.get(0),
    )
}

pub fn put(tx: &Tx<'_>, saga_id: Uuid, step: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO tombstones (saga_id, step, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![saga_id.to_string(), step, now_ms()],
    )?;
    Ok(())
}
