//! search: the search index of hybrid mode, a follow-up that reacts to `space.created` by
//! indexing the space in a table of its own. It never refuses and has nothing to undo: it
//! indexes what the saga already committed to.

use baton_protocol::{Context, Service};
use baton_store::{Tx, params};

use crate::{Ids, Step, StepResult};

pub struct Search;

/// The words a space is found by: its name, key and owner, lower-cased, each once.
pub fn terms(ctx: &Context) -> String {
    let mut words: Vec<String> = [Some(ctx.name.as_str()), ctx.key.as_deref(), Some(ctx.owner.as_str())]
        .into_iter()
        .flatten()
        .flat_map(|s| s.split(|c: char| !c.is_alphanumeric()))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.sort();
    words.dedup();
    words.join(" ")
}

impl Step for Search {
    fn service(&self) -> Service {
        Service::Search
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["CREATE TABLE indexed (
            space_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            terms TEXT NOT NULL,
            indexed_at INTEGER NOT NULL,
            saga_id TEXT NOT NULL
        )"]
    }

    fn apply(&self, tx: &Tx<'_>, ids: Ids, ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        // One entry per space, however often the event comes: the primary key makes it idempotent.
        tx.execute(
            "INSERT INTO indexed (space_id, name, terms, indexed_at, saga_id)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            params![
                ids.space_id.to_string(),
                ctx.name.clone(),
                terms(ctx),
                baton_store::now_ms(),
                ids.saga_id.to_string()
            ],
        )?;
        Ok(StepResult::Done(Context::default()))
    }

    fn undo(&self, _tx: &Tx<'_>, _ids: Ids, _ctx: &Context) -> Result<StepResult, baton_store::StoreError> {
        Ok(StepResult::Refused {
            status: 422,
            reason: "search indexes only created spaces; nothing to undo".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ctx, db, ids};

    #[tokio::test]
    async fn a_space_is_indexed_once_however_often_it_is_announced() {
        let (_dir, db) = db(&Search).await;
        let mut c = ctx("Acme Docs", "alice@example.com");
        c.key = Some("acme-docs".into());
        for _ in 0..2 {
            let c = c.clone();
            db.transaction(move |tx| Search.apply(tx, ids(1), &c).map(|_| ())).await.unwrap();
        }
        let rows: Vec<String> =
            db.call(|tx| tx.query_map("SELECT terms FROM indexed", (), |r| r.get(0))).await.unwrap();
        assert_eq!(rows, ["acme alice com docs example"]);
    }
}
