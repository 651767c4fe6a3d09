//! notifier: the "space ready" email, recorded in its database. It never refuses, and it cannot
//! be undone, which is why every workflow puts it last.

use baton_protocol::{Context, Service};
use baton_store::{Tx, params};

use crate::{Ids, Step, StepResult};

pub struct Notifier;

/// Where the email goes: the owner if it is an address, else a mailbox of the owner's name.
pub fn recipient(owner: &str) -> String {
    if owner.contains('@') { owner.to_owned() } else { format!("{owner}@users.baton.local") }
}

impl Step for Notifier {
    fn service(&self) -> Service {
        Service::Notifier
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["CREATE TABLE emails (
            space_id TEXT PRIMARY KEY,
            recipient TEXT NOT NULL,
            subject TEXT NOT NULL,
            body TEXT NOT NULL,
            sent_at INTEGER NOT NULL,
            saga_id TEXT NOT NULL
        )"]
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        let subject = format!("Your space {} is ready", ctx.name);
        let body = format!(
            "Hello {},\n\nyour space `{}` is ready{}{}.\n",
            ctx.owner,
            ctx.name,
            ctx.route.as_deref().map(|r| format!(" at {r}")).unwrap_or_default(),
            ctx.licence.as_deref().map(|l| format!(" (licence {l})")).unwrap_or_default(),
        );
        // One email per space, whatever the retries: the primary key makes the send idempotent.
        tx.write(
            "INSERT INTO emails (space_id, recipient, subject, body, sent_at, saga_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![
                ids.space_id.to_string(),
                recipient(&ctx.owner),
                subject,
                body,
                baton_store::now_ms(),
                ids.saga_id.to_string()
            ],
        )?;
        Ok(StepResult::Done(Context::default()))
    }

    fn undo(&self, _tx: &Tx<'_>, _ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        Ok(StepResult::Refused { status: 422, reason: "notifier cannot be undone".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[tokio::test]
    async fn one_email_per_space() {
        let (_d, db) = db(&Notifier).await;
        db.call(|tx| {
            for _ in 0..3 {
                assert_eq!(
                    Notifier.apply(tx, ids(1), &ctx("acme", "alice"))?,
                    StepResult::Done(Context::default())
                );
            }
            let (n, to): (i64, String) =
                tx.query_row("SELECT COUNT(*), MAX(recipient) FROM emails", (), |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            assert_eq!((n, to.as_str()), (1, "alice@users.baton.local"));
            assert!(matches!(
                Notifier.undo(tx, ids(1), &ctx("acme", "alice"))?,
                StepResult::Refused { status: 422, .. }
            ));
            Ok(())
        })
        .await
        .unwrap();
    }
}
