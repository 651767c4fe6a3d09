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

/// Record `message_id` as handled, with no reply.
pub fn record(tx: &Tx<'_>, message_id: Uuid) -> Result<(), StoreError> {
    answer(tx, message_id, Vec::new())
}

/// Record `message_id` as handled and send `replies` through the outbox: each serialised once,
/// its outbox row's text also its copy in the inbox (stamped with its commit time, which a
/// duplicate's answer stamps anew).
pub fn answer(tx: &Tx<'_>, message_id: Uuid, replies: Vec<Outgoing>) -> Result<(), StoreError> {
    let mut json = String::from("[");
    for (i, reply) in replies.into_iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&crate::outbox::push_serialised(tx, reply)?);
    }
    json.push(']');
    tx.write(
        "INSERT INTO inbox (message_id, received_at, replies) VALUES (?1, ?2, ?3)",
        params![message_id.to_string(), now_ms(), json],
    )
}

/// One message handled, and the replies it produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub message_id: String,
    /// When it was handled (ms since the epoch).
    pub at_ms: i64,
    pub replies: Vec<Outgoing>,
}

/// The messages handled from `from_ms` to `to_ms` (on the `inbox_by_received` index) whose
/// replies carry `correlation_id` (a saga's id, or in events mode a space's), oldest first, at
/// most `limit`. For the console's chain of one space: messages with no reply do not show.
pub fn handled_for(
    tx: &Tx<'_>,
    correlation_id: Uuid,
    (from_ms, to_ms): (i64, i64),
    limit: usize,
) -> Result<Vec<Handled>, StoreError> {
    let rows: Vec<(String, i64, String)> = tx.query_map(
        "SELECT message_id, received_at, replies FROM inbox
         WHERE received_at >= ?1 AND received_at <= ?2 AND replies LIKE ?3
         ORDER BY received_at LIMIT ?4",
        params![from_ms, to_ms, format!("%\"correlation_id\":\"{correlation_id}\"%"), limit as i64],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    rows.into_iter()
        .map(|(message_id, at_ms, replies)| {
            let replies = serde_json::from_str(&replies)
                .map_err(|e| StoreError::Corrupt { table: "inbox", cause: e.into() })?;
            Ok(Handled { message_id, at_ms, replies })
        })
        .collect()
}
