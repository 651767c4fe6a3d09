//! The read model of `gateway.db`: what the gateway told each request's client, and what its
//! clients' idempotency keys hold. The audit, `baton compare`, the bench and the tests read the
//! gateway's tables only through here, on either backend, never writing.

use baton_store::{Db, Location, StoreError, Tx};

use crate::COMPONENT;

/// One request the gateway took, and what its client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    pub space_id: String,
    pub saga_id: String,
    /// The space's name, as the client asked for it.
    pub name: String,
    /// The HTTP status the client got; `None` while it has none (or the gateway died first).
    pub status: Option<u16>,
}

/// What the clients' idempotency keys hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keys {
    /// Keys kept.
    pub keys: i64,
    /// Requests answered as a replay of a kept key's first request.
    pub replays: i64,
}

/// Every request the gateway took, in the store of `tx`.
pub fn told(tx: &Tx<'_>) -> Result<Vec<Told>, StoreError> {
    tx.query_map("SELECT space_id, saga_id, name, told_status FROM requests", (), |r| {
        let status: Option<i64> = r.get(3)?;
        Ok(Told {
            space_id: r.get(0)?,
            saga_id: r.get(1)?,
            name: r.get(2)?,
            status: status.and_then(|s| u16::try_from(s).ok()),
        })
    })
}

/// How many requests the gateway took (one message published for each).
pub fn request_count(tx: &Tx<'_>) -> Result<i64, StoreError> {
    tx.query_row("SELECT COUNT(*) FROM requests", (), |r| r.get(0))
}

/// The read-only view of the gateway's store at a location.
#[derive(Debug, Clone)]
pub struct Requests {
    location: Location,
}

impl Requests {
    pub fn at(location: &Location) -> Requests {
        Requests { location: location.clone() }
    }

    /// Run `f` on the gateway's store, or answer `none` while the gateway has not made it.
    async fn read<R: Send + 'static>(
        &self,
        none: R,
        f: impl FnOnce(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        match Db::reader(&self.location, COMPONENT).await? {
            Some(db) => db.call(f).await,
            None => Ok(none),
        }
    }

    /// Every request, and what its client was told; none without a store.
    pub async fn told(&self) -> Result<Vec<Told>, StoreError> {
        self.read(Vec::new(), told).await
    }

    /// How many requests the gateway took; 0 without a store.
    pub async fn count(&self) -> Result<i64, StoreError> {
        self.read(0, request_count).await
    }

    /// What the idempotency keys hold; nothing without a store.
    pub async fn keys(&self) -> Result<Keys, StoreError> {
        self.read(Keys::default(), |tx| {
            tx.query_row(
                "SELECT COUNT(*), CAST(COALESCE(SUM(replays), 0) AS INTEGER) FROM idempotency_keys",
                (),
                |r| Ok(Keys { keys: r.get(0)?, replays: r.get(1)? }),
            )
        })
        .await
    }
}
