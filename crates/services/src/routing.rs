//! routing (D): publishes the route `key -> shard`. Refuses a reserved or taken key (409).

use baton_protocol::{Context, Service};
use baton_store::{OptionalExtension, Tx, params};

use crate::{Ids, Step, StepResult, missing, need};

pub struct Routing {
    pub reserved: Vec<String>,
}

impl Step for Routing {
    fn service(&self) -> Service {
        Service::Routing
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["CREATE TABLE reserved (key TEXT PRIMARY KEY);
        CREATE TABLE routes (
            key TEXT PRIMARY KEY,
            shard TEXT NOT NULL,
            space_id TEXT NOT NULL UNIQUE,
            saga_id TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );"]
    }

    fn configure(&self, tx: &Tx<'_>) -> Result<(), baton_store::StoreError> {
        tx.execute("DELETE FROM reserved", ())?;
        for key in &self.reserved {
            tx.execute("INSERT INTO reserved (key) VALUES (?1) ON CONFLICT DO NOTHING", [key])?;
        }
        Ok(())
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let routed = |key: &str, shard: &str| {
            StepResult::Done(Context { route: Some(format!("{key} -> {shard}")), ..Default::default() })
        };
        // The key's checks are sent ahead of the first read: one round trip for the three
        // (PostgreSQL).
        let checks = match ctx.key.as_deref() {
            Some(key) => Some((
                key,
                tx.prefetch("SELECT 1 FROM reserved WHERE key = ?1", [key])?,
                tx.prefetch("SELECT 1 FROM routes WHERE key = ?1", [key])?,
            )),
            None => None,
        };
        let mine: Option<(String, String)> = tx
            .query_row("SELECT key, shard FROM routes WHERE space_id = ?1", [ids.space_id.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((key, shard)) = mine {
            return Ok(routed(&key, &shard));
        }
        let (key, shard, reserved, taken) = match (checks, need(&ctx.shard, "shard", Service::Routing)) {
            (Some((key, reserved, taken)), Ok(shard)) => (key, shard, reserved, taken),
            (None, _) => return Ok(missing("key", Service::Routing)),
            (_, Err(e)) => return Ok(e),
        };
        if reserved.first(tx)?.is_some() {
            return Ok(StepResult::Refused {
                status: 409,
                reason: format!("the route key `{key}` is reserved"),
            });
        }
        if taken.first(tx)?.is_some() {
            return Ok(StepResult::Refused {
                status: 409,
                reason: format!("the route key `{key}` is taken"),
            });
        }
        tx.write(
            "INSERT INTO routes (key, shard, space_id, saga_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key, shard, ids.space_id.to_string(), ids.saga_id.to_string(), baton_store::now_ms()],
        )?;
        Ok(routed(key, shard))
    }

    fn undo(&self, tx: &Tx<'_>, ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        tx.write("DELETE FROM routes WHERE space_id = ?1", [ids.space_id.to_string()])?;
        Ok(StepResult::Done(Context::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[tokio::test]
    async fn reserved_and_taken_keys_are_refused() {
        let r = Routing { reserved: vec!["admin".into()] };
        let (_d, db) = db(&r).await;
        db.call(move |tx| {
            r.configure(tx)?;
            let with =
                |key: &str| Context { key: Some(key.into()), shard: Some("s1".into()), ..ctx(key, "o") };
            assert!(matches!(r.apply(tx, ids(1), &with("admin"))?, StepResult::Refused { status: 409, .. }));
            let done = r.apply(tx, ids(2), &with("acme"))?;
            assert_eq!(
                done,
                StepResult::Done(Context { route: Some("acme -> s1".into()), ..Default::default() })
            );
            assert_eq!(r.apply(tx, ids(2), &with("acme"))?, done, "idempotent");
            assert!(matches!(r.apply(tx, ids(3), &with("acme"))?, StepResult::Refused { status: 409, .. }));
            assert!(matches!(
                r.apply(tx, ids(4), &ctx("nokey", "o"))?,
                StepResult::Refused { status: 422, .. }
            ));
            r.undo(tx, ids(2), &ctx("x", "o"))?;
            assert!(matches!(r.apply(tx, ids(3), &with("acme"))?, StepResult::Done(_)));
            Ok(())
        })
        .await
        .unwrap();
    }
}
