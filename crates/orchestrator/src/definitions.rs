//! The saga clock, and the versions of the workflows: every definition an orchestrator loads is
//! stored by content hash, each saga is pinned to the hash it started on, and a saga's
//! definition is read back from the store by that hash, never from the files loaded now. So an
//! orchestrator restarted (or running beside another) with a changed file starts new sagas on
//! the new version and finishes the others, compensations included, on theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use baton_store::{Db, StoreError, now_ms};
use baton_store::{OptionalExtension, Tx, params};
use baton_workflow::Workflow;

use crate::query::in_flight;

/// The clock of every saga transition: the wall clock read once at start-up, advanced by the
/// monotonic clock. A wall clock set back or forward while the process runs moves no timer;
/// the times persisted from another process are brought back within bounds by
/// [`Saga::rearm`] at start-up.
#[derive(Debug, Clone, Copy)]
pub struct SagaClock {
    wall_at_start: u64,
    start: Instant,
}

impl SagaClock {
    pub fn start() -> SagaClock {
        SagaClock { wall_at_start: now_ms().max(0) as u64, start: Instant::now() }
    }

    /// Milliseconds, comparable with the wall clock of this process's start.
    pub fn now(&self) -> u64 {
        self.wall_at_start + self.start.elapsed().as_millis() as u64
    }
}

/// The definitions a process has read, by hash: the loaded ones, and the older ones its sagas
/// in flight started on, read from the store once each. A definition never changes under its
/// hash, so a cached one is never stale.
#[derive(Default)]
pub struct Definitions(Mutex<HashMap<String, Arc<Workflow>>>);

impl Definitions {
    /// The definitions `loaded`, already known.
    pub fn with(loaded: &HashMap<String, Workflow>) -> Definitions {
        let known = loaded.values().map(|wf| (wf.hash(), Arc::new(wf.clone()))).collect();
        Definitions(Mutex::new(known))
    }

    /// The definition stored under `hash`, or why there is none (to tell the operator). Reads
    /// the store only the first time a hash is asked for.
    pub fn get(
        &self,
        conn: &Tx<'_>,
        hash: Option<&str>,
    ) -> Result<Result<Arc<Workflow>, Missing>, StoreError> {
        let Some(hash) = hash else {
            return Ok(Err(Missing::Unnamed));
        };
        if let Some(wf) = self.0.lock().expect("definitions cache").get(hash) {
            return Ok(Ok(Arc::clone(wf)));
        }
        let body: Option<String> = conn
            .query_row("SELECT body FROM definitions WHERE hash = ?1", [hash], |r| r.get(0))
            .optional()?;
        let Some(body) = body else {
            return Ok(Err(Missing::NotStored { hash: short(hash).to_owned() }));
        };
        let wf = match Workflow::from_json(&body) {
            Ok(wf) if wf.hash() == hash => Arc::new(wf),
            Ok(_) => return Ok(Err(Missing::Mismatch { hash: short(hash).to_owned() })),
            Err(source) => return Ok(Err(Missing::Unreadable { hash: short(hash).to_owned(), source })),
        };
        self.0.lock().expect("definitions cache").insert(hash.to_owned(), Arc::clone(&wf));
        Ok(Ok(wf))
    }
}

/// Why a saga's definition cannot be had: the saga stops for an operator (never retried, never
/// dead-lettered), with this as its reason.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("the saga names no definition")]
    Unnamed,
    #[error("no definition with hash {hash} is stored")]
    NotStored { hash: String },
    #[error("the definition stored under {hash} does not match its hash")]
    Mismatch { hash: String },
    #[error("the definition stored under {hash} is unreadable ({source})")]
    Unreadable {
        hash: String,
        #[source]
        source: baton_workflow::DefinitionError,
    },
}

/// The first 12 characters of a hash, as messages and `baton workflows versions` show it.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Store the loaded definitions (each once, by hash, with when it was first seen) and return
/// the hash of each, to pin the sagas it starts to. Databases from before the hashes get theirs
/// filled in. Says how many sagas in flight run another version than the loaded one: they
/// finish on theirs.
pub async fn record(
    db: &Db,
    workflows: &HashMap<String, Workflow>,
) -> Result<HashMap<String, String>, StoreError> {
    let loaded = workflows.clone();
    // Retried on a conflict: instances starting together record the same definitions.
    let (hashes, older) = db
        .transaction_retrying(move |tx| {
            // Rows of earlier builds: hash what they hold.
            let unhashed: Vec<(i64, String)> = tx
                .query_map("SELECT id, body FROM definitions WHERE hash IS NULL", (), |r| Ok((r.get(0)?, r.get(1)?)))?;
            for (id, body) in unhashed {
                if let Ok(wf) = Workflow::from_json(&body) {
                    tx.execute("UPDATE definitions SET hash = ?2 WHERE id = ?1", params![id, wf.hash()])?;
                }
            }
            tx.execute(
                "UPDATE sagas SET definition_hash = (SELECT d.hash FROM definitions d WHERE d.id = sagas.definition)
                 WHERE definition_hash IS NULL AND definition IS NOT NULL", (),
            )?;
            let now = now_ms();
            let mut hashes = HashMap::new();
            for (name, wf) in &loaded {
                let hash = wf.hash();
                tx.execute(
                    "INSERT INTO definitions (workflow, body, hash, first_seen) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                    params![name, wf.body(), hash, now],
                )?;
                hashes.insert(name.clone(), hash);
            }
            let mut older = Vec::new();
            let rows: Vec<(String, Option<String>, i64)> = tx.query_map(
                &format!(
                    "SELECT workflow, definition_hash, COUNT(*) FROM sagas WHERE {} GROUP BY workflow, definition_hash",
                    in_flight("status")
                ),
                (),
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            for (name, hash, n) in rows {
                if hashes.get(&name) != hash.as_ref() {
                    older.push((name, hash, n));
                }
            }
            Ok((hashes, older))
        })
        .await?;
    for (workflow, hash, sagas) in older {
        tracing::info!(
            %workflow, version = hash.as_deref().map_or("none", short), sagas,
            "sagas in flight run another version of this workflow than the loaded one; they finish on theirs"
        );
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of the build before versions: definitions by id only, a saga in flight on
    /// one. Opened by this build, the saga gets its definition's hash and finds it by hash.
    #[tokio::test]
    async fn a_saga_from_before_the_hashes_is_pinned_to_the_hash_of_the_definition_it_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = baton_store::Location::Dir(dir.path().to_owned());
        let before: &'static [&'static str] = &crate::MIGRATIONS[..1];
        let wf = Workflow::create_space();
        {
            let db = Db::open(&path, crate::COMPONENT, before, baton_store::DEFAULT_OWNER).await.unwrap();
            let body = wf.body();
            db.transaction(move |tx| {
                tx.execute("INSERT INTO definitions (workflow, body) VALUES ('create-space', ?1)", [&body])?;
                tx.execute(
                    "INSERT INTO sagas (saga_id, space_id, workflow, status, state, traceparent, created_at, updated_at, definition)
                     VALUES ('s1', 'p1', 'create-space', 'running', '{}', '', 1, 1, 1)", (),
                )?;
                Ok(())
            })
            .await
            .unwrap();
        }
        let db =
            Db::open(&path, crate::COMPONENT, crate::MIGRATIONS, baton_store::DEFAULT_OWNER).await.unwrap();
        let loaded = HashMap::from([("create-space".to_owned(), wf.clone())]);
        let hashes = record(&db, &loaded).await.unwrap();
        assert_eq!(hashes["create-space"], wf.hash());
        let (pinned, rows) = db
            .call(|c| {
                let pinned: Option<String> =
                    c.query_row("SELECT definition_hash FROM sagas WHERE saga_id = 's1'", (), |r| r.get(0))?;
                let rows: i64 = c.query_row("SELECT COUNT(*) FROM definitions", (), |r| r.get(0))?;
                Ok((pinned, rows))
            })
            .await
            .unwrap();
        assert_eq!(pinned.as_deref(), Some(wf.hash().as_str()));
        assert_eq!(rows, 1, "the same definition is not stored twice");
        // Read back by hash from the store (not from the loaded ones), and a hash unknown.
        let cache = Definitions::default();
        let hash = wf.hash();
        let (found, unknown) = db
            .call(move |c| Ok((cache.get(c, Some(&hash))?, cache.get(c, Some("0123456789abcdef"))?)))
            .await
            .unwrap();
        assert_eq!(*found.unwrap(), wf);
        assert_eq!(unknown.unwrap_err().to_string(), "no definition with hash 0123456789ab is stored");
    }
}
