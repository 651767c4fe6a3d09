//! Retention: what a component keeps only for a while (inbox rows, tombstones, finished sagas
//! and their history) is deleted once older than the retention, by a background task, in small
//! batches, each its own short transaction, so a purge never holds up the handlers' commits for
//! long. A purge may keep its rows for a time of its own instead ([`Purge::keep`]): the
//! gateway's idempotency keys live for their time to live, whatever the retention, since a
//! client's retry within it must get the first answer, never start a second request.
//!
//! Why deleting them is safe is the bound every consumer enforces (`baton-amqp`'s consumer
//! dead-letters a message older than the retention on arrival): a duplicate of a handled
//! message, or a command for a compensated step, was published before its inbox row or
//! tombstone was written, so by the time the row is purged it is too old to be handled.
//! `docs/reliability.md` has the argument at length.
//!
//! The outbox needs nothing here: the relay deletes a row once the broker confirmed it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{Db, StoreError, now_ms, params};

/// The retention when none is given: a week.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);

/// Rows deleted per transaction: small, so that a batch takes a few milliseconds of the
/// database thread, between the handlers' groups.
pub const BATCH: i64 = 500;

/// How a component purges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Rows older than this are deleted.
    pub retain: Duration,
    /// Rows deleted per transaction.
    pub batch: i64,
}

impl Retention {
    pub fn new(retain: Duration) -> Retention {
        Retention { retain, batch: BATCH }
    }

    /// How long the task sleeps between rounds: a tenth of the retention, between a second and
    /// ten minutes, so that nothing outlives the retention by more than a tenth.
    pub fn every(&self) -> Duration {
        (self.retain / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
    }
}

impl Default for Retention {
    fn default() -> Retention {
        Retention::new(DEFAULT_RETAIN)
    }
}

/// One kind of row to purge: statements that delete at most `?2` rows older than `?1`
/// (milliseconds since the epoch), run in order in one transaction; the last one's count says
/// whether another batch follows, so rows that hang off another (a saga's history) are deleted
/// by the statements before it, for the same batch. They must stay within one component's own
/// tables, in the portable SQL subset (a `DELETE ... WHERE key IN (SELECT ... LIMIT ?2)`).
#[derive(Debug, Clone)]
pub struct Purge {
    /// What it deletes, for the logs (`inbox rows`, `finished sagas`).
    pub what: &'static str,
    pub sql: Vec<String>,
    /// Only when the database has this table (another component's feature may add it).
    pub if_table: Option<&'static str>,
    /// How long its rows are kept, instead of the retention.
    pub keep: Option<Duration>,
}

impl Purge {
    pub fn new(what: &'static str, sql: impl Into<String>) -> Purge {
        Purge { what, sql: vec![sql.into()], if_table: None, keep: None }
    }

    /// The same purge, keeping its rows for `keep` whatever the retention.
    pub fn kept_for(self, keep: Duration) -> Purge {
        Purge { keep: Some(keep), ..self }
    }

    /// A purge whose `dependents` statements delete, first, the rows that hang off the batch
    /// `sql` deletes.
    pub fn with_dependents(what: &'static str, dependents: Vec<String>, sql: impl Into<String>) -> Purge {
        let mut all = dependents;
        all.push(sql.into());
        Purge { what, sql: all, if_table: None, keep: None }
    }
}

/// What every component purges: inbox rows and tombstones.
pub fn base() -> Vec<Purge> {
    vec![
        Purge::new(
            "inbox rows",
            "DELETE FROM inbox WHERE message_id IN
               (SELECT message_id FROM inbox WHERE received_at < ?1 ORDER BY received_at LIMIT ?2)",
        ),
        Purge::new(
            "tombstones",
            "DELETE FROM tombstones WHERE (saga_id, step) IN
               (SELECT saga_id, step FROM tombstones WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
        ),
    ]
}

/// Indexes that let each purge find its oldest rows without a scan; made once at start-up
/// (`IF NOT EXISTS`: the base tables' migrations predate them).
const INDEXES: &[&str] = &[
    "CREATE INDEX IF NOT EXISTS inbox_by_received ON inbox (received_at)",
    "CREATE INDEX IF NOT EXISTS tombstones_by_created ON tombstones (created_at)",
];

/// Delete, batch by batch, every row of `purges` older than the retention (or the purge's own
/// [`Purge::keep`]) as of now; returns how many rows each deleted. One transaction per batch.
pub async fn purge_once(db: &Db, retention: Retention, purges: &[Purge]) -> Result<Vec<i64>, StoreError> {
    let now = now_ms();
    let mut deleted = Vec::with_capacity(purges.len());
    for purge in purges {
        let keep = purge.keep.unwrap_or(retention.retain);
        let cutoff = now.saturating_sub(keep.as_millis().min(i64::MAX as u128) as i64);
        let mut total = 0;
        loop {
            let p = purge.clone();
            let batch = retention.batch;
            let n = db
                .transaction(move |tx| {
                    if let Some(table) = p.if_table
                        && !tx.has_table(table)?
                    {
                        return Ok(0);
                    }
                    let mut n = 0;
                    for sql in &p.sql {
                        n = tx.execute(sql, params![cutoff, batch])? as i64;
                    }
                    Ok(n)
                })
                .await?;
            total += n;
            if n < retention.batch {
                break;
            }
            // Let the handlers' transactions in between two batches.
            tokio::task::yield_now().await;
        }
        baton_metrics::purged(&db.component, purge.what, total as u64);
        deleted.push(total);
    }
    Ok(deleted)
}

/// The purge task of a component: a round every [`Retention::every`] until `cancel`, over the
/// [`base`] purges and the component's own `extra` ones. A round that fails is said and tried
/// again at the next; it never stops the component.
pub async fn run(db: Db, retention: Retention, extra: Vec<Purge>, cancel: CancellationToken) {
    let purges: Vec<Purge> = base().into_iter().chain(extra).collect();
    let index = || {
        db.call(|c| {
            for sql in INDEXES {
                c.execute(sql, ())?;
            }
            Ok(())
        })
    };
    // Instances starting together on PostgreSQL race to create an index (IF NOT EXISTS is not
    // atomic there: the loser fails on a duplicate key); a second try finds it made.
    let indexed = match index().await {
        Ok(()) => Ok(()),
        Err(_) => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            index().await
        }
    };
    if let Err(e) = indexed {
        tracing::warn!(error = %e, "could not index the tables the retention purges; purging without");
    }
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retention.every()) => {}
        }
        match purge_once(&db, retention, &purges).await {
            Ok(deleted) => {
                if failing {
                    tracing::info!("the retention purges again");
                    failing = false;
                }
                for (p, n) in purges.iter().zip(deleted) {
                    if n > 0 {
                        tracing::debug!(what = p.what, deleted = n, retain = ?retention.retain, "purged");
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "a retention round failed; trying again at the next");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTRA: &[&str] = &["CREATE TABLE things (id INTEGER PRIMARY KEY, at INTEGER NOT NULL)"];

    #[tokio::test]
    async fn rows_older_than_the_retention_go_in_batches_and_younger_ones_stay_on_both_backends() {
        let stores = crate::testing::Stores::new();
        for at in stores.each() {
            purges_in_batches(&at).await;
        }
    }

    async fn purges_in_batches(at: &crate::Location) {
        let db = Db::open(at, "x", EXTRA, crate::DEFAULT_OWNER).await.unwrap();
        let now = now_ms();
        db.transaction(move |tx| {
            for i in 0..1_200 {
                let at = if i < 1_100 { now - 60_000 } else { now };
                tx.execute(
                    "INSERT INTO inbox (message_id, received_at, replies) VALUES (?1, ?2, '[]')",
                    crate::params![format!("m{i}"), at],
                )?;
                tx.execute(
                    "INSERT INTO tombstones (saga_id, step, created_at) VALUES (?1, 'records', ?2)",
                    crate::params![format!("s{i}"), at],
                )?;
                tx.execute("INSERT INTO things (at) VALUES (?1)", [at])?;
            }
            Ok(())
        })
        .await
        .unwrap();
        let things = Purge::new(
            "things",
            "DELETE FROM things WHERE id IN (SELECT id FROM things WHERE at < ?1 LIMIT ?2)",
        );
        // Kept for longer than the retention: none of them is old enough.
        let kept = Purge::new(
            "kept things",
            "DELETE FROM things WHERE id IN (SELECT id FROM things WHERE at < ?1 LIMIT ?2)",
        )
        .kept_for(Duration::from_secs(120));
        // Its table does not exist here: skipped, not an error.
        let absent = Purge { if_table: Some("absent"), ..Purge::new("absent", "DELETE FROM absent") };
        let purges: Vec<Purge> = base().into_iter().chain([kept, absent, things]).collect();
        let retention = Retention { retain: Duration::from_secs(30), batch: 100 };
        let deleted = purge_once(&db, retention, &purges).await.unwrap();
        assert_eq!(deleted, vec![1_100, 1_100, 0, 0, 1_100]);
        let left = db
            .call(|c| {
                let n = |t: &str| c.query_row(&format!("SELECT COUNT(*) FROM {t}"), (), |r| r.get::<i64>(0));
                Ok((n("inbox")?, n("tombstones")?, n("things")?))
            })
            .await
            .unwrap();
        assert_eq!(left, (100, 100, 100), "{at}");
    }

    #[test]
    fn a_round_comes_a_tenth_of_the_retention_apart_within_bounds() {
        assert_eq!(Retention::new(Duration::from_secs(3600)).every(), Duration::from_secs(360));
        assert_eq!(Retention::new(Duration::from_secs(2)).every(), Duration::from_secs(1));
        assert_eq!(Retention::default().every(), Duration::from_secs(600));
    }
}
