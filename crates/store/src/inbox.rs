//! The inbox: the id of every message handled, with the replies it produced, so that a
//! redelivery or a duplicate changes nothing and is answered with the same replies.

use crate::{OptionalExtension, Tx, params};
use baton_protocol::Outgoing;
use uuid::Uuid;

use crate::{StoreError, now_ms};

/// The replies stored for `message_id`, if it was handled before.
pub fn seen(tx: &Tx<'_>, message_id: Uuid) -> Result<Option<Vec<Outgoing>>, StoreError> {
    let stored: Option<String> = tx
        .query_row("SELECT replies FROM inbox WHERE message_id = ?1", [message_id.to_string()], |r| r.get(0))
        .optional()?;
    stored
        .map(|s| {
            serde_json::from_str(&s).map_err(|e| StoreError::Corrupt { table: "inbox", cause: e.into() })
        })
        .transpose()
}

/// Record `message_id` as handled, with the replies it produced.
pub fn record(tx: &Tx<'_>, message_id: Uuid, replies: &[Outgoing]) -> Result<(), StoreError> {
    let json = serde_json::to_string(replies).expect("outgoing messages serialise");
    tx.execute(
        "INSERT INTO inbox (message_id, received_at, replies) VALUES (?1, ?2, ?3)",
        params![message_id.to_string(), now_ms(), json],
    )?;
    Ok(())
}
