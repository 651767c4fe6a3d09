//! Test support: a service's row for a space, written by the service's own crate so that the
//! audit's tests can build a store with the real schema and no other crate names these tables.
//! Not part of Baton's API.

use baton_protocol::Service;
use baton_store::{Db, Location, StoreError, now_ms, params};

use crate::{ServiceConfig, step_for};

/// Write `service`'s row for the space `space_id` (made for saga `saga_id`) into its store at
/// `location`, created with its real migrations if need be.
pub async fn hold(
    location: &Location,
    service: Service,
    space_id: &str,
    saga_id: &str,
) -> Result<(), StoreError> {
    let step = step_for(service, &ServiceConfig::default());
    let db = Db::open(location, service.name(), step.migrations(), "fixture").await?;
    let (space, saga, at) = (space_id.to_owned(), saga_id.to_owned(), now_ms());
    db.call(move |tx| {
        match service {
            Service::Records => tx.execute(
                "INSERT INTO spaces (space_id, key, name, owner, saga_id, created_at) VALUES (?1, ?1, ?1, 'o', ?2, ?3)",
                params![space, saga, at],
            )?,
            Service::Placement => {
                tx.execute(
                    "INSERT INTO shards (name, capacity) VALUES ('fixture', 1000000) ON CONFLICT DO NOTHING",
                    (),
                )?;
                tx.execute(
                    "INSERT INTO placements (space_id, shard, saga_id, created_at) VALUES (?1, 'fixture', ?2, ?3)",
                    params![space, saga, at],
                )?
            }
            Service::Entitlements => tx.execute(
                "INSERT INTO licences (space_id, licence, owner, saga_id, created_at) VALUES (?1, ?1, 'o', ?2, ?3)",
                params![space, saga, at],
            )?,
            Service::Routing => tx.execute(
                "INSERT INTO routes (key, shard, space_id, saga_id, created_at) VALUES (?1, 'fixture', ?1, ?2, ?3)",
                params![space, saga, at],
            )?,
            Service::Notifier => tx.execute(
                "INSERT INTO emails (space_id, recipient, subject, body, sent_at, saga_id) VALUES (?1, 'o', 's', 'b', ?3, ?2)",
                params![space, saga, at],
            )?,
            Service::Search => tx.execute(
                "INSERT INTO indexed (space_id, name, terms, indexed_at, saga_id) VALUES (?1, ?1, ?1, ?3, ?2)",
                params![space, saga, at],
            )?,
        };
        Ok(())
    })
    .await
}
