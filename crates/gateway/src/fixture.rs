//! Test support: a request the gateway took, written by the gateway's own crate so that the
//! audit's tests can build a store with the real schema and no other crate names its tables.
//! Not part of Baton's API.

use baton_store::{Db, Location, StoreError, now_ms, params};

use crate::{COMPONENT, MIGRATIONS};

/// Record at `location` a request for the space `space_id` (saga `saga_id`) whose client was
/// told `told` (`None`: nothing yet).
pub async fn took(
    location: &Location,
    space_id: &str,
    saga_id: &str,
    told: Option<u16>,
) -> Result<(), StoreError> {
    let db = Db::open(location, COMPONENT, MIGRATIONS, "fixture").await?;
    let (space, saga, told) = (space_id.to_owned(), saga_id.to_owned(), told.map(i64::from));
    db.call(move |tx| {
        tx.execute(
            "INSERT INTO requests (space_id, saga_id, name, owner, mode, requested_at, told_status)
             VALUES (?1, ?2, ?1, 'o', 'workflow', ?3, ?4)",
            params![space, saga, now_ms(), told],
        )
        .map(drop)
    })
    .await
}
