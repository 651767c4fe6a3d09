//! placement (B): a slot on the shard with the most room. Refuses when no shard has room (503).

use baton_protocol::{Context, Service};
use baton_store::{OptionalExtension, Tx, params};

use crate::{Ids, Step, StepResult};

pub struct Placement {
    pub shards: Vec<(String, i64)>,
}

impl Step for Placement {
    fn service(&self) -> Service {
        Service::Placement
    }

    fn migrations(&self) -> &'static [&'static str] {
        // `used` is kept with each placement so that choosing a shard costs the same with a
        // hundred spaces or a million.
        &["CREATE TABLE shards (
            name TEXT PRIMARY KEY,
            capacity INTEGER NOT NULL,
            used INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE placements (
            space_id TEXT PRIMARY KEY,
            shard TEXT NOT NULL REFERENCES shards (name),
            saga_id TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );"]
    }

    fn configure(&self, tx: &Tx<'_>) -> Result<(), baton_store::StoreError> {
        for (name, capacity) in &self.shards {
            tx.execute(
                "INSERT INTO shards (name, capacity) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET capacity = excluded.capacity",
                params![name, capacity],
            )?;
        }
        Ok(())
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let placed = |shard: String| StepResult::Done(Context { shard: Some(shard), ..Default::default() });
        // Both reads in one round trip (PostgreSQL): the second is sent ahead of the first.
        let roomiest = tx.prefetch(
            "SELECT name FROM shards WHERE used < capacity ORDER BY capacity - used DESC, name LIMIT 1",
            (),
        )?;
        let mine: Option<String> = tx
            .query_row("SELECT shard FROM placements WHERE space_id = ?1", [ids.space_id.to_string()], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(shard) = mine {
            return Ok(placed(shard));
        }
        let roomiest: Option<String> = roomiest.first(tx)?.map(|r| r.get(0)).transpose()?;
        let Some(shard) = roomiest else {
            return Ok(StepResult::Refused {
                status: 503,
                reason: "no shard has room for another space".into(),
            });
        };
        tx.write(
            "INSERT INTO placements (space_id, shard, saga_id, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![ids.space_id.to_string(), shard, ids.saga_id.to_string(), baton_store::now_ms()],
        )?;
        tx.write("UPDATE shards SET used = used + 1 WHERE name = ?1", [&shard])?;
        Ok(placed(shard))
    }

    fn undo(&self, tx: &Tx<'_>, ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let shard: Option<String> = tx
            .query_row(
                "DELETE FROM placements WHERE space_id = ?1 RETURNING shard",
                [ids.space_id.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(shard) = shard {
            tx.write("UPDATE shards SET used = used - 1 WHERE name = ?1", [shard])?;
        }
        Ok(StepResult::Done(Context::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[tokio::test]
    async fn spreads_over_shards_refuses_when_full_and_releases() {
        let p = Placement { shards: vec![("s1".into(), 1), ("s2".into(), 2)] };
        let (_d, db) = db(&p).await;
        db.call(move |tx| {
            p.configure(tx)?;
            let shard = |r: StepResult| match r {
                StepResult::Done(c) => c.shard.unwrap(),
                other => panic!("expected a placement, got {other:?}"),
            };
            assert_eq!(shard(p.apply(tx, ids(1), &ctx("a", "o"))?), "s2");
            assert_eq!(shard(p.apply(tx, ids(1), &ctx("a", "o"))?), "s2", "idempotent");
            assert_eq!(shard(p.apply(tx, ids(2), &ctx("b", "o"))?), "s1");
            assert_eq!(shard(p.apply(tx, ids(3), &ctx("c", "o"))?), "s2");
            assert!(matches!(p.apply(tx, ids(4), &ctx("d", "o"))?, StepResult::Refused { status: 503, .. }));
            p.undo(tx, ids(2), &ctx("b", "o"))?;
            p.undo(tx, ids(2), &ctx("b", "o"))?;
            assert_eq!(shard(p.apply(tx, ids(4), &ctx("d", "o"))?), "s1");
            Ok(())
        })
        .await
        .unwrap();
    }
}
