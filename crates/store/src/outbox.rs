//! The outbox: messages committed with the business change that caused them, published by the
//! relay afterwards.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use baton_protocol::Outgoing;
use uuid::Uuid;

use crate::{Db, StoreError, Tx, now_ms, params};

/// After this many unroutable returns, a row is set aside in `outbox_parked` (kept, with the
/// reason) so that it stops holding up the rest.
pub const PARK_AFTER: i64 = 10;

/// Another instance whose oldest row this one has seen unpublished for this long is gone (or
/// stuck, or frozen): its rows are taken over, since a message must not wait for it. A live
/// instance publishes a row within milliseconds of its commit, so a few seconds tell a stalled
/// one apart; should it come back and publish them too, the receiver's inbox drops the second
/// copy.
pub const TAKE_OVER_AFTER: Duration = Duration::from_secs(5);

/// Other instances' oldest unpublished rows as this process saw them, and since when, on its
/// monotonic clock. The rows' `created_at` comes from another process's wall clock and cannot
/// be compared with this one's: a clock set back would hold dead rows up for as long, one set
/// forward would take over the rows of instances alive and well.
#[derive(Debug)]
pub struct Watch {
    /// Per owner: its oldest row's `seq`, and when this process first saw it there.
    oldest: HashMap<String, (i64, Instant)>,
    after: Duration,
}

impl Default for Watch {
    fn default() -> Self {
        Watch { oldest: HashMap::new(), after: TAKE_OVER_AFTER }
    }
}

impl Watch {
    /// Given each other owner's oldest row now, the owners whose oldest row has not moved for
    /// the lease: theirs are taken over.
    fn stuck(&mut self, oldest: Vec<(String, i64)>, now: Instant) -> Vec<String> {
        let mut seen = HashMap::new();
        let mut stuck = Vec::new();
        for (owner, seq) in oldest {
            let since = match self.oldest.get(&owner) {
                Some((s, t)) if *s == seq => *t,
                _ => now,
            };
            if now.duration_since(since) >= self.after {
                stuck.push(owner);
            } else {
                seen.insert(owner, (seq, since));
            }
        }
        self.oldest = seen;
        stuck
    }
}

/// The statements that delete the confirmed rows `seqs` and count them published, in one
/// batch (PostgreSQL).
fn confirmed_sql(seqs: &[i64]) -> String {
    use std::fmt::Write;
    let mut sql = String::from("DELETE FROM outbox WHERE seq IN (");
    for (i, seq) in seqs.iter().enumerate() {
        let _ = write!(sql, "{}{seq}", if i == 0 { "" } else { ", " });
    }
    let _ = write!(sql, "); UPDATE relay_stats SET published = published + {}", seqs.len());
    sql
}

impl Db {
    /// Take over other instances' rows after `after` instead of [`TAKE_OVER_AFTER`] (tests).
    pub fn take_over_after(&self, after: Duration) {
        self.watch.lock().expect("outbox watch").after = after;
    }
}

/// Add a message to the outbox, in the caller's transaction, for this instance's relay (which is
/// handed `msg` itself once the transaction commits).
pub fn push(tx: &Tx<'_>, msg: Outgoing) -> Result<(), StoreError> {
    push_serialised(tx, msg).map(drop)
}

/// [`push`], returning the row's JSON: the inbox keeps the same text as its copy of a reply
/// ([`crate::inbox::answer`]) rather than serialising the message again.
pub(crate) fn push_serialised(tx: &Tx<'_>, msg: Outgoing) -> Result<String, StoreError> {
    let now = now_ms();
    // Stamped with its commit time, which every publish of it (a republish too) carries.
    let msg = Outgoing { created_at_ms: Some(now), ..msg };
    let json = serde_json::to_string(&msg).expect("outgoing messages serialise");
    tx.push_row(
        "INSERT INTO outbox (message, owner, created_at) VALUES (?1, ?2, ?3) RETURNING seq",
        params![json, tx.owner(), now],
        msg,
    )?;
    Ok(json)
}

/// Messages this database's relay has had confirmed by the broker, ever.
pub fn published(tx: &Tx<'_>) -> Result<i64, StoreError> {
    tx.query_row("SELECT published FROM relay_stats", (), |r| r.get(0))
}

/// Rows waiting in the outbox (for quiescence checks and `/health`).
pub fn len(tx: &Tx<'_>) -> Result<i64, StoreError> {
    tx.query_row("SELECT COUNT(*) FROM outbox", (), |r| r.get(0))
}

/// The messages for `correlation_id` still waiting in the outbox, then those parked (not
/// publishable), oldest first: where a chain of events is held up. Both tables are short.
pub fn waiting_for(tx: &Tx<'_>, correlation_id: Uuid) -> Result<Vec<Outgoing>, StoreError> {
    let like = format!("%\"correlation_id\":\"{correlation_id}\"%");
    let rows: Vec<String> = tx.query_map(
        "SELECT message FROM (SELECT seq, message FROM outbox WHERE message LIKE ?1
         UNION ALL SELECT seq, message FROM outbox_parked WHERE message LIKE ?1) AS w ORDER BY seq",
        params![like],
        |r| r.get(0),
    )?;
    rows.iter()
        .map(|m| {
            serde_json::from_str(m).map_err(|e| StoreError::Corrupt { table: "outbox", cause: e.into() })
        })
        .collect()
}

/// The relay's view of the outbox.
impl Db {
    /// Set the outbox gauges of the metrics: this instance's rows not yet confirmed, and the
    /// age of the oldest. A store that does not answer leaves them as they were.
    pub(crate) async fn outbox_gauges(self) {
        let me = std::sync::Arc::clone(&self.owner);
        let read = self.read_committed(move |c| {
            c.query_row("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE owner = ?1", [&*me], |r| {
                Ok((r.get::<i64>(0)?, r.get::<Option<i64>>(1)?))
            })
        });
        if let Ok((depth, oldest)) = read.await {
            let age = oldest.map_or(0, |at| crate::now_ms().saturating_sub(at).max(0));
            baton_metrics::outbox(&self.component, depth as u64, Duration::from_millis(age as u64));
        }
    }

    /// Up to `limit` of this instance's rows with a sequence number above `after`, oldest first,
    /// and those it takes over from other instances (whatever their place).
    pub(crate) async fn pending(&self, after: i64, limit: usize) -> Result<Vec<(i64, Outgoing)>, StoreError> {
        let watch = std::sync::Arc::clone(&self.watch);
        let me = std::sync::Arc::clone(&self.owner);
        let component = std::sync::Arc::clone(&self.component);
        let rows = self
            // A read of what is committed: never rows of a group still open.
            .relaxed(true, move |c| {
                // Other instances' oldest rows, each watched until it moves or the lease is up.
                let oldest: Vec<(String, i64)> = c.query_map(
                    "SELECT owner, MIN(seq) FROM outbox WHERE owner <> ?1 GROUP BY owner",
                    [&*me],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let stuck = watch.lock().expect("outbox watch").stuck(oldest, Instant::now());
                let row = |r: &crate::Row| Ok((r.get::<i64>(0)?, r.get::<String>(1)?));
                // Taken-over rows come back whatever their place: they may sit below `after`.
                let mut rows: Vec<(i64, String)> = Vec::new();
                for owner in stuck {
                    let taken = c.query_map(
                        "UPDATE outbox SET owner = ?2 WHERE owner = ?1 RETURNING seq, message",
                        [&*owner, &*me],
                        row,
                    )?;
                    tracing::warn!(
                        rows = taken.len(),
                        instance = %owner,
                        "took over outbox rows another instance left unpublished"
                    );
                    let (component, n) = (std::sync::Arc::clone(&component), taken.len() as u64);
                    c.on_commit(move || baton_metrics::outbox_taken_over(&component, n));
                    rows.extend(taken);
                }
                let room = limit.saturating_sub(rows.len()).max(1) as i64;
                rows.extend(c.query_map(
                    "SELECT seq, message FROM outbox WHERE owner = ?3 AND seq > ?1 ORDER BY seq LIMIT ?2",
                    params![after, room, &*me],
                    row,
                )?);
                rows.sort_by_key(|(seq, _)| *seq);
                rows.dedup_by_key(|(seq, _)| *seq);
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(seq, json)| {
                serde_json::from_str(&json)
                    .map(|m| (seq, m))
                    .map_err(|e| StoreError::Corrupt { table: "outbox", cause: e.into() })
            })
            .collect()
    }

    /// The broker confirmed these rows: delete them.
    pub(crate) async fn confirmed(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        // On SQLite a member of the group commit: under load it shares the handlers' transaction.
        if seqs.is_empty() {
            return Ok(());
        }
        self.relaxed(false, move |tx| {
            // Counted here, where it is certain: what the broker confirmed.
            if tx.is_postgres() {
                // One batch for the lot, sent with the transaction's `BEGIN` and `COMMIT`:
                // the numbers are the store's own integers, written into the text (a parameter
                // list of every length would be a statement each).
                return tx.write_batch(&confirmed_sql(&seqs));
            }
            // On SQLite a statement is a call, not a round trip: prepared ones, kept.
            for seq in &seqs {
                tx.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
            }
            tx.execute("UPDATE relay_stats SET published = published + ?1", [seqs.len() as i64])?;
            Ok(())
        })
        .await
    }

    /// Publishing this row failed for `reason`: count the attempt when the broker `returned` it
    /// (unroutable), and set aside (never drop) a row that keeps coming back, so that it does
    /// not block the others.
    pub(crate) async fn failed(&self, seq: i64, returned: bool, reason: String) -> Result<(), StoreError> {
        self.relaxed(true, move |tx| {
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
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmed_rows_are_deleted_and_counted_in_one_batch() {
        assert_eq!(
            confirmed_sql(&[7, 9, 12]),
            "DELETE FROM outbox WHERE seq IN (7, 9, 12); UPDATE relay_stats SET published = published + 3"
        );
    }

    fn message() -> String {
        let msg = Outgoing::new(
            "baton.commands",
            "records",
            "records.create",
            uuid::Uuid::new_v4(),
            "records",
            baton_protocol::TraceParent::new_root(),
            &serde_json::json!({}),
        );
        serde_json::to_string(&msg).unwrap()
    }

    /// A row of instance `owner`, stamped `skew_ms` off this process's wall clock.
    async fn foreign_row(db: &Db, owner: &'static str, skew_ms: i64) {
        let m = message();
        db.call(move |c| {
            c.execute(
                "INSERT INTO outbox (message, owner, created_at) VALUES (?1, ?2, ?3)",
                params![m, owner, now_ms() + skew_ms],
            )
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn another_instances_rows_are_taken_over_after_the_lease_whatever_their_time_stamps_say() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::Location::Dir(dir.path().to_owned()), "records", &[], "a").await.unwrap();
        let lease = Duration::from_millis(300);
        db.take_over_after(lease);
        // One stamped an hour ahead (its writer's clock, or this one, jumped), one an hour behind.
        foreign_row(&db, "ahead", 3_600_000).await;
        foreign_row(&db, "behind", -3_600_000).await;
        let watched = Instant::now();
        assert!(db.pending(0, 10).await.unwrap().is_empty(), "nothing is taken over at first sight");
        let mut taken = Vec::new();
        while taken.len() < 2 {
            assert!(watched.elapsed() < Duration::from_secs(5), "both are taken over within the lease");
            taken.extend(db.pending(0, 10).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(watched.elapsed() >= lease, "not before the lease");
        let owners: i64 = db
            .call(|c| c.query_row("SELECT COUNT(*) FROM outbox WHERE owner = 'a'", (), |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(owners, 2);
    }

    #[test]
    fn an_instance_whose_oldest_row_moves_is_never_taken_over() {
        let mut w = Watch { oldest: HashMap::new(), after: Duration::from_secs(30) };
        let t0 = Instant::now();
        assert!(w.stuck(vec![("b".into(), 1)], t0).is_empty());
        assert!(w.stuck(vec![("b".into(), 2)], t0 + Duration::from_secs(29)).is_empty());
        assert!(
            w.stuck(vec![("b".into(), 2)], t0 + Duration::from_secs(58)).is_empty(),
            "watched from seq 2"
        );
        assert_eq!(w.stuck(vec![("b".into(), 2)], t0 + Duration::from_secs(59)), vec!["b".to_string()]);
        assert!(w.stuck(Vec::new(), t0).is_empty() && w.oldest.is_empty(), "gone owners are forgotten");
    }
}
