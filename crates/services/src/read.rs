//! The read model of the services' stores: which spaces each service holds a row for (a
//! record, a placement, a licence, a route, an email, a search entry), and the faults a plan injected into it.
//! The audit, `baton compare`, the CLI and the tests read the services' tables only through
//! here, on either backend, never writing.

use std::collections::BTreeMap;

use baton_protocol::Service;
use baton_store::{Db, Location, StoreError, Tx};

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
