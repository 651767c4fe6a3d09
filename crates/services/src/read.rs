//! The read model of the services' stores: which spaces each service holds a row for (a
//! record, a placement, a licence, a route, an email, a search entry), and the faults a plan injected into it.
//! The audit, `baton compare`, the CLI and the tests read the services' tables only through
//! here, on either backend, never writing.

use std::collections::{BTreeMap, BTreeSet};

use baton_protocol::{Outgoing, Service};
use baton_store::inbox::Handled;
use baton_store::{Db, Location, OptionalExtension, StoreError, Tx};
use uuid::Uuid;

use crate::faults::{Injection, injections};

/// One service's row for one space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub space_id: String,
    /// The saga (workflow mode) or the space itself (events mode) the row was made for.
    pub saga_id: String,
    /// When it was written (ms since the epoch).
    pub at_ms: i64,
}

/// The table holding `service`'s row for a space, and the column saying when it was written.
fn table(service: Service) -> (&'static str, &'static str) {
    match service {
        Service::Records => ("spaces", "created_at"),
        Service::Placement => ("placements", "created_at"),
        Service::Entitlements => ("licences", "created_at"),
        Service::Routing => ("routes", "created_at"),
        Service::Notifier => ("emails", "sent_at"),
        Service::Search => ("indexed", "indexed_at"),
    }
}

/// Every row `service` holds for a space, in the store of `tx`.
pub fn held(tx: &Tx<'_>, service: Service) -> Result<Vec<Held>, StoreError> {
    let (table, time) = table(service);
    tx.query_map(&format!("SELECT space_id, saga_id, {time} FROM {table}"), (), |r| {
        Ok(Held { space_id: r.get(0)?, saga_id: r.get(1)?, at_ms: r.get(2)? })
    })
}

/// The row `service` holds for the space `space_id`, if any.
pub fn held_for(tx: &Tx<'_>, service: Service, space_id: Uuid) -> Result<Option<Held>, StoreError> {
    let (table, time) = table(service);
    tx.query_row(
        &format!("SELECT space_id, saga_id, {time} FROM {table} WHERE space_id = ?1"),
        [space_id.to_string()],
        |r| Ok(Held { space_id: r.get(0)?, saga_id: r.get(1)?, at_ms: r.get(2)? }),
    )
    .optional()
}

/// What one service did for one space: its link in the space's chain of events.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// The row it holds for the space now.
    pub held: Option<Held>,
    /// The messages it handled that produced a message about the space, oldest first.
    pub handled: Vec<Handled>,
    /// Its messages about the space not yet published (or parked).
    pub waiting: Vec<Outgoing>,
    /// Its steps for the space that were undone (by a compensation), and when.
    pub undone: Vec<(String, i64)>,
}

/// Messages handled a space's chain shows from one service, at most.
const LINK_MESSAGES: usize = 50;
/// How far from a tombstone its compensation's message is looked for.
const UNDO_SLACK_MS: i64 = 5_000;

/// The read-only view of one service's store at a location.
#[derive(Debug, Clone)]
pub struct Holdings {
    service: Service,
    location: Location,
}

impl Holdings {
    pub fn at(location: &Location, service: Service) -> Holdings {
        Holdings { service, location: location.clone() }
    }

    /// Run `f` on the service's store; `None` while the service has not made it.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<Option<R>, StoreError> {
        match Db::reader(&self.location, self.service.name()).await? {
            Some(db) => db.call(f).await.map(Some),
            None => Ok(None),
        }
    }

    /// Whether the service has made its store there.
    pub async fn exists(&self) -> Result<bool, StoreError> {
        Ok(Db::reader(&self.location, self.service.name()).await?.is_some())
    }

    /// Every row the service holds for a space; none without a store.
    pub async fn all(&self) -> Result<Vec<Held>, StoreError> {
        let service = self.service;
        Ok(self.read(move |tx| held(tx, service)).await?.unwrap_or_default())
    }

    /// How many rows the service holds for the space `space_id` (0 or 1 when all is well).
    pub async fn for_space(&self, space_id: &str) -> Result<usize, StoreError> {
        Ok(self.all().await?.iter().filter(|h| h.space_id == space_id).count())
    }

    /// What the service did for the space `space_id`, looking for the messages it handled
    /// within `window` (ms since the epoch, on the inbox's time index); `None` without a store.
    pub async fn link(&self, space_id: Uuid, window: (i64, i64)) -> Result<Option<Link>, StoreError> {
        let service = self.service;
        self.read(move |tx| {
            let undone = baton_store::tombstone::of_saga(tx, space_id)?;
            // The undo came later (reconcile's compensation): look around its tombstone too.
            let mut handled = baton_store::inbox::handled_for(tx, space_id, window, LINK_MESSAGES)?;
            for (_, at) in &undone {
                for h in baton_store::inbox::handled_for(
                    tx,
                    space_id,
                    (at - UNDO_SLACK_MS, at + UNDO_SLACK_MS),
                    LINK_MESSAGES,
                )? {
                    if !handled.iter().any(|seen| seen.message_id == h.message_id) {
                        handled.push(h);
                    }
                }
            }
            handled.sort_by_key(|h| h.at_ms);
            Ok(Link {
                held: held_for(tx, service, space_id)?,
                handled,
                waiting: baton_store::outbox::waiting_for(tx, space_id)?,
                undone,
            })
        })
        .await
    }

    /// The owners of the spaces records holds at `location`, each once (records alone keeps
    /// the owner): what shows whether an owner is stored in one spelling.
    pub async fn owners(location: &Location) -> Result<BTreeSet<String>, StoreError> {
        let records = Holdings::at(location, Service::Records);
        let owners =
            records.read(|tx| tx.query_map("SELECT owner FROM spaces", (), |r| r.get::<String>(0))).await?;
        Ok(owners.unwrap_or_default().into_iter().collect())
    }

    /// The faults a plan injected into the service, oldest first.
    pub async fn injections(&self) -> Result<Vec<Injection>, StoreError> {
        Ok(self.read(injections).await?.unwrap_or_default())
    }

    /// The injected faults counted by kind.
    pub async fn injected_by_kind(&self) -> Result<BTreeMap<String, usize>, StoreError> {
        let mut by_kind = BTreeMap::new();
        for i in self.injections().await? {
            *by_kind.entry(i.kind).or_default() += 1;
        }
        Ok(by_kind)
    }
}
