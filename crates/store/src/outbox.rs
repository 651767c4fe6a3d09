//! The outbox: messages committed with the business change that caused them, published by the
//! relay afterwards.

use baton_amqp::relay::{BoxError, OutboxStore};
use baton_amqp::{Outgoing, PublishError};
use rusqlite::{Transaction, params};

use crate::{Db, StoreError, now_ms};

/// After this many unroutable returns, a row is set aside in `outbox_parked` (kept, with the
/// reason) so that it stops holding up the rest.
pub const PARK_AFTER: i64 = 10;

/// Add a message to the outbox, in the caller's transaction.
pub fn push(tx: &Transaction<'_>, msg: &Outgoing) -> Result<(), StoreError> {
    let json = serde_json::to_string(msg).expect("outgoing messages serialise");
    tx.execute("INSERT INTO outbox (message) VALUES (?1)", [json])?;
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
    async fn pending(&self, limit: usize) -> Result<Vec<(i64, Outgoing)>, BoxError> {
        let rows = self
            .call(move |c| {
                let mut stmt = c.prepare_cached("SELECT seq, message FROM outbox ORDER BY seq LIMIT ?1")?;
                let rows = stmt
                    .query_map([limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
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
        self.call(move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                for seq in &seqs {
                    stmt.execute([seq])?;
                }
            }
            // Counted here, where it is certain: what the broker confirmed.
            tx.prepare_cached("UPDATE relay_stats SET published = published + ?1")?
                .execute([seqs.len() as i64])?;
            tx.commit()?;
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
