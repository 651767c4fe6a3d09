//! The outbox: messages committed with the business change that caused them, published by the
//! relay afterwards.

use baton_amqp::relay::{BoxError, OutboxStore};
use baton_amqp::{Outgoing, PublishError};
use rusqlite::{Transaction, params};

use crate::{Db, StoreError, now_ms};

/// After this many unroutable returns, a row is set aside in `outbox_parked` (kept, with the
/// reason) so that it stops holding up the rest.
pub const PARK_AFTER: i64 = 10;

/// A row another instance wrote but has not published for this long is taken over: that
/// instance is gone (or stuck), and a message must not wait for it. Should it come back and
/// publish the row too, the receiver's inbox drops the second copy.
pub const TAKE_OVER_AFTER_MS: i64 = 30_000;

/// Add a message to the outbox, in the caller's transaction.
pub fn push(tx: &Transaction<'_>, msg: &Outgoing) -> Result<(), StoreError> {
    let json = serde_json::to_string(msg).expect("outgoing messages serialise");
    let added = tx
        .prepare_cached(
            "INSERT INTO outbox (message, owner, created_at) SELECT ?1, owner, ?2 FROM temp.baton_self",
        )?
        .execute(params![json, now_ms()])?;
    if added != 1 {
        // Only a connection opened by `Db::open` knows its instance; never lose the message.
        return Err(StoreError::Corrupt {
            table: "outbox",
            cause: "this connection has no instance name".into(),
        });
    }
    crate::note_pushed(tx.last_insert_rowid(), msg);
    Ok(())
}

/// Messages this database's relay has had confirmed by the broker, ever.
pub fn published(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT published FROM relay_stats", [], |r| r.get(0))?)
}

/// Rows waiting in the outbox (for quiescence checks and `/health`).
pub fn len(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
}

impl OutboxStore for Db {
    async fn pending(&self, after: i64, limit: usize) -> Result<Vec<(i64, Outgoing)>, BoxError> {
        let rows = self
            .call(move |c| {
                let stale = now_ms() - TAKE_OVER_AFTER_MS;
                // Another instance's stale rows become this one's first, in their own statement:
                // the common case (every row is this instance's) stays a plain read.
                let foreign = "created_at < ?1 AND owner <> (SELECT owner FROM temp.baton_self)";
                let any: bool = c
                    .prepare_cached(&format!("SELECT EXISTS (SELECT 1 FROM outbox WHERE {foreign})"))?
                    .query_row([stale], |r| r.get(0))?;
                let row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?));
                // Taken-over rows come back whatever their place: they may sit below `after`.
                let mut rows: Vec<(i64, String)> = if any {
                    let taken = c
                        .prepare_cached(&format!(
                            "UPDATE outbox SET owner = (SELECT owner FROM temp.baton_self) WHERE {foreign}
                             RETURNING seq, message"
                        ))?
                        .query_map([stale], row)?
                        .collect::<Result<Vec<_>, _>>()?;
                    tracing::warn!(
                        rows = taken.len(),
                        "took over outbox rows another instance left unpublished"
                    );
                    taken
                } else {
                    Vec::new()
                };
                let mut stmt = c.prepare_cached(
                    "SELECT seq, message FROM outbox WHERE owner = (SELECT owner FROM temp.baton_self)
                     AND seq > ?1 ORDER BY seq LIMIT ?2",
                )?;
                let room = limit.saturating_sub(rows.len()).max(1) as i64;
                rows.extend(stmt.query_map(params![after, room], row)?.collect::<Result<Vec<_>, _>>()?);
                rows.sort_by_key(|(seq, _)| *seq);
                rows.dedup_by_key(|(seq, _)| *seq);
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(seq, json)| {
                serde_json::from_str(&json)
                    .map(|m| (seq, m))
                    .map_err(|e| StoreError::Corrupt { table: "outbox", cause: e.to_string() }.into())
            })
            .collect()
    }

    async fn confirmed(&self, seqs: Vec<i64>) -> Result<(), BoxError> {
        // A member of the group commit: under load it shares the handlers' transaction.
        self.transaction(move |tx| {
            {
                let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                for seq in &seqs {
                    stmt.execute([seq])?;
                }
            }
            // Counted here, where it is certain: what the broker confirmed.
            tx.prepare_cached("UPDATE relay_stats SET published = published + ?1")?
                .execute([seqs.len() as i64])?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn failed(&self, seq: i64, error: PublishError) -> Result<(), BoxError> {
        let returned = matches!(error, PublishError::Returned(_));
        let reason = error.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE outbox SET attempts = attempts + ?2, last_error = ?3 WHERE seq = ?1",
                params![seq, i64::from(returned), reason],
            )?;
            let attempts: i64 =
                tx.query_row("SELECT attempts FROM outbox WHERE seq = ?1", [seq], |r| r.get(0)).unwrap_or(0);
            if attempts >= PARK_AFTER {
                tracing::error!(seq, %reason, "outbox row keeps coming back unroutable; parked in outbox_parked");
                tx.execute(
                    "INSERT INTO outbox_parked (seq, message, reason, parked_at)
                     SELECT seq, message, ?2, ?3 FROM outbox WHERE seq = ?1",
                    params![seq, reason, now_ms()],
                )?;
                tx.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await?;
        Ok(())
    }
}
