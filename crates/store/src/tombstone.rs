//! Tombstones: the steps that were compensated, so a command that arrives after its
//! compensation (a late or retried command) is a no-op.

use crate::{Prefetched, Tx, params};
use uuid::Uuid;

use crate::{StoreError, now_ms};

/// Whether `step` of `saga_id` was compensated, sent ahead of the statements after it
/// ([`Tx::prefetch`]): a row if it was.
pub fn fetch(tx: &Tx<'_>, saga_id: Uuid, step: &str) -> Result<Prefetched, StoreError> {
    tx.prefetch(
        "SELECT 1 FROM tombstones WHERE saga_id = ?1 AND step = ?2",
        params![saga_id.to_string(), step],
    )
}

pub fn put(tx: &Tx<'_>, saga_id: Uuid, step: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO tombstones (saga_id, step, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![saga_id.to_string(), step, now_ms()],
    )?;
    Ok(())
}

/// The steps compensated for `saga_id` (a space's id in events mode), and when.
pub fn of_saga(tx: &Tx<'_>, saga_id: Uuid) -> Result<Vec<(String, i64)>, StoreError> {
    tx.query_map(
        "SELECT step, created_at FROM tombstones WHERE saga_id = ?1 ORDER BY created_at",
        [saga_id.to_string()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}
