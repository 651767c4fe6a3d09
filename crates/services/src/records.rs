//! records (A): the space record. Refuses a name already taken (409).

use baton_protocol::{Context, Service};
use baton_store::{OptionalExtension, Tx, params};

use crate::{Ids, Step, StepResult};

pub struct Records;

impl Step for Records {
    fn service(&self) -> Service {
        Service::Records
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["CREATE TABLE spaces (
            space_id TEXT PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            saga_id TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )"]
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        // Both reads in one round trip (PostgreSQL): the second is sent ahead of the first.
        let taken = tx.prefetch("SELECT 1 FROM spaces WHERE name = ?1", [&ctx.name])?;
        let mine: Option<String> = tx
            .query_row("SELECT key FROM spaces WHERE space_id = ?1", [ids.space_id.to_string()], |r| r.get(0))
            .optional()?;
        if let Some(key) = mine {
            return Ok(StepResult::Done(Context { key: Some(key), ..Default::default() }));
        }
        if taken.first(tx)?.is_some() {
            return Ok(StepResult::Refused {
                status: 409,
                reason: format!("the name `{}` is already taken", ctx.name),
            });
        }
        // The key is the name: names are already unique and URL-safe.
        tx.write(
            "INSERT INTO spaces (space_id, key, name, owner, saga_id, created_at) VALUES (?1, ?2, ?2, ?3, ?4, ?5)",
            params![ids.space_id.to_string(), ctx.name, ctx.owner, ids.saga_id.to_string(), baton_store::now_ms()],
        )?;
        Ok(StepResult::Done(Context { key: Some(ctx.name.clone()), ..Default::default() }))
    }

    fn undo(&self, tx: &Tx<'_>, ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        tx.write("DELETE FROM spaces WHERE space_id = ?1", [ids.space_id.to_string()])?;
        Ok(StepResult::Done(Context::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[tokio::test]
    async fn creates_once_refuses_a_taken_name_and_deletes() {
        let (_d, db) = db(&Records).await;
        db.call(|tx| {
            let first = Records.apply(tx, ids(1), &ctx("acme", "alice"))?;
            assert_eq!(first, StepResult::Done(Context { key: Some("acme".into()), ..Default::default() }));
            assert_eq!(Records.apply(tx, ids(1), &ctx("acme", "alice"))?, first, "idempotent");
            let StepResult::Refused { status, reason } = Records.apply(tx, ids(2), &ctx("acme", "bob"))?
            else {
                panic!("a taken name must be refused")
            };
            assert_eq!(status, 409);
            assert!(reason.contains("acme"));
            Records.undo(tx, ids(1), &ctx("x", "o"))?;
            Records.undo(tx, ids(1), &ctx("x", "o"))?;
            let n: i64 = tx.query_row("SELECT COUNT(*) FROM spaces", (), |r| r.get(0))?;
            assert_eq!(n, 0);
            assert!(matches!(Records.apply(tx, ids(2), &ctx("acme", "bob"))?, StepResult::Done(_)));
            Ok(())
        })
        .await
        .unwrap();
    }
}
