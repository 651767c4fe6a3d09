//! The read model of the tables every store has ([`inbox`](crate::inbox),
//! [`outbox`](crate::outbox), the relay's confirmations, [`tombstone`](crate::tombstone)s):
//! how much each component handled, holds back and had confirmed, for quiescence checks,
//! retention checks and the reports of a run. Other crates read these tables only through here.

use std::ops::Add;

use baton_protocol::Component;

use crate::{Db, Location, StoreError, Tx};

/// What one store's own tables hold, or the sum over several stores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Messages handled (inbox rows, until retention deletes them).
    pub handled: i64,
    /// Messages committed and not yet confirmed by the broker.
    pub outbox: i64,
    /// Messages the relay gave up on.
    pub parked: i64,
    /// Messages the broker confirmed, ever.
    pub published: i64,
    /// Compensations recorded ahead of the action they undo.
    pub tombstones: i64,
}

impl StoreCounts {
    /// The counts of the store `tx` belongs to.
    pub fn read(tx: &Tx<'_>) -> Result<StoreCounts, StoreError> {
        let count = |table: &str| tx.query_row(&format!("SELECT COUNT(*) FROM {table}"), (), |r| r.get(0));
        Ok(StoreCounts {
            handled: count("inbox")?,
            outbox: count("outbox")?,
            parked: count("outbox_parked")?,
            published: crate::outbox::published(tx)?,
            tombstones: count("tombstones")?,
        })
    }

    /// The counts of `component`'s store at `location`; `None` while it has no store there.
    pub async fn of(location: &Location, component: Component) -> Result<Option<StoreCounts>, StoreError> {
        match Db::reader(location, component.name()).await? {
            Some(db) => db.call(StoreCounts::read).await.map(Some),
            None => Ok(None),
        }
    }

    /// The sum over every component's store at `location` (those not made yet count nothing).
    pub async fn total(location: &Location) -> Result<StoreCounts, StoreError> {
        let mut sum = StoreCounts::default();
        for c in Component::ALL {
            sum = sum + StoreCounts::of(location, c).await?.unwrap_or_default();
        }
        Ok(sum)
    }

    /// Rows in `component`'s outbox at `location` written by instance `owner` (whose relay
    /// alone publishes them until its lease passes); `None` while it has no store there.
    pub async fn outbox_of(
        location: &Location,
        component: Component,
        owner: &str,
    ) -> Result<Option<i64>, StoreError> {
        let owner = owner.to_owned();
        match Db::reader(location, component.name()).await? {
            Some(db) => db
                .call(move |tx| {
                    tx.query_row("SELECT COUNT(*) FROM outbox WHERE owner = ?1", [owner], |r| r.get(0))
                })
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// Messages committed and not published: in an outbox, or parked.
    pub fn unsent(&self) -> i64 {
        self.outbox + self.parked
    }
}

impl Add for StoreCounts {
    type Output = StoreCounts;

    fn add(self, o: StoreCounts) -> StoreCounts {
        StoreCounts {
            handled: self.handled + o.handled,
            outbox: self.outbox + o.outbox,
            parked: self.parked + o.parked,
            published: self.published + o.published,
            tombstones: self.tombstones + o.tombstones,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Stores;

    #[tokio::test]
    async fn counts_a_stores_own_tables_and_sums_over_the_components_on_both_backends() {
        let stores = Stores::new();
        for at in stores.each() {
            assert_eq!(StoreCounts::total(&at).await.unwrap(), StoreCounts::default(), "{at}");
            for c in [Component::Records, Component::Gateway] {
                let db = Db::open(&at, c.name(), &[], "test").await.unwrap();
                db.transaction(|tx| crate::inbox::record(tx, uuid::Uuid::new_v4())).await.unwrap();
            }
            assert_eq!(StoreCounts::of(&at, Component::Records).await.unwrap().unwrap().handled, 1);
            assert_eq!(StoreCounts::of(&at, Component::Routing).await.unwrap(), None);
            let total = StoreCounts::total(&at).await.unwrap();
            assert_eq!((total.handled, total.unsent(), total.published), (2, 0, 0), "{at}");
        }
    }
}
