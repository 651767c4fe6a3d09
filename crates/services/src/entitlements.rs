//! entitlements (C): a licence, if the owner's plan allows one more space (403 otherwise).

use std::collections::BTreeMap;

use baton_protocol::{Context, Service};
use baton_store::{OptionalExtension, Tx, params};

use crate::{Ids, Step, StepResult};

pub struct Entitlements {
    pub plans: Vec<(String, i64)>,
    pub default_plan: String,
    pub owner_plans: BTreeMap<String, String>,
}

impl Step for Entitlements {
    fn service(&self) -> Service {
        Service::Entitlements
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["CREATE TABLE plans (name TEXT PRIMARY KEY, quota INTEGER NOT NULL);
        CREATE TABLE owners (owner TEXT PRIMARY KEY, plan TEXT NOT NULL REFERENCES plans (name));
        CREATE TABLE licences (
            space_id TEXT PRIMARY KEY,
            licence TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            saga_id TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );
        CREATE INDEX licences_by_owner ON licences (owner);"]
    }

    fn configure(&self, tx: &Tx<'_>) -> Result<(), baton_store::StoreError> {
        for (name, quota) in &self.plans {
            tx.execute(
                "INSERT INTO plans (name, quota) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET quota = excluded.quota",
                params![name, quota],
            )?;
        }
        for (owner, plan) in &self.owner_plans {
            tx.execute(
                "INSERT INTO owners (owner, plan) VALUES (?1, ?2) ON CONFLICT (owner) DO UPDATE SET plan = excluded.plan",
                params![owner, plan],
            )?;
        }
        Ok(())
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let licensed = |l: String| StepResult::Done(Context { licence: Some(l), ..Default::default() });
        // The owner's plan and count are sent ahead of the first read: one round trip for the
        // three (PostgreSQL); the plan's quota takes a second.
        let plan = tx.prefetch("SELECT plan FROM owners WHERE owner = ?1", [&ctx.owner])?;
        let used = tx.prefetch("SELECT COUNT(*) FROM licences WHERE owner = ?1", [&ctx.owner])?;
        let mine: Option<String> = tx
            .query_row("SELECT licence FROM licences WHERE space_id = ?1", [ids.space_id.to_string()], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(l) = mine {
            return Ok(licensed(l));
        }
        let plan: String = match plan.first(tx)? {
            Some(r) => r.get(0)?,
            None => self.default_plan.clone(),
        };
        let used: i64 = used.first(tx)?.ok_or(baton_store::StoreError::NoRows)?.get(0)?;
        let quota: i64 = tx
            .query_row("SELECT quota FROM plans WHERE name = ?1", [&plan], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        if used >= quota {
            return Ok(StepResult::Refused {
                status: 403,
                reason: format!(
                    "owner `{}` is on the {plan} plan, which allows {quota} space{}, and has {used}",
                    ctx.owner,
                    if quota == 1 { "" } else { "s" }
                ),
            });
        }
        let licence = format!("lic-{}", &ids.space_id.simple().to_string()[16..]);
        tx.write(
            "INSERT INTO licences (space_id, licence, owner, saga_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![ids.space_id.to_string(), licence, ctx.owner, ids.saga_id.to_string(), baton_store::now_ms()],
        )?;
        Ok(licensed(licence))
    }

    fn undo(&self, tx: &Tx<'_>, ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        tx.write("DELETE FROM licences WHERE space_id = ?1", [ids.space_id.to_string()])?;
        Ok(StepResult::Done(Context::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[tokio::test]
    async fn quota_of_the_plan_is_enforced_per_owner() {
        let e = Entitlements {
            plans: vec![("free".into(), 2), ("team".into(), 5)],
            default_plan: "free".into(),
            owner_plans: [("carol".to_string(), "team".to_string())].into(),
        };
        let (_d, db) = db(&e).await;
        db.call(move |tx| {
            e.configure(tx)?;
            for n in 1..=2 {
                assert!(matches!(e.apply(tx, ids(n), &ctx("x", "alice"))?, StepResult::Done(_)));
            }
            assert!(matches!(e.apply(tx, ids(1), &ctx("x", "alice"))?, StepResult::Done(_)), "idempotent");
            let StepResult::Refused { status, reason } = e.apply(tx, ids(3), &ctx("x", "alice"))? else {
                panic!("over quota must be refused")
            };
            assert_eq!(status, 403);
            assert!(reason.contains("free plan, which allows 2 spaces"), "{reason}");
            for n in 10..15 {
                assert!(matches!(e.apply(tx, ids(n), &ctx("x", "carol"))?, StepResult::Done(_)));
            }
            e.undo(tx, ids(1), &ctx("x", "o"))?;
            assert!(matches!(e.apply(tx, ids(3), &ctx("x", "alice"))?, StepResult::Done(_)));
            Ok(())
        })
        .await
        .unwrap();
    }
}
