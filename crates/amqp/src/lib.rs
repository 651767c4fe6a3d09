//! AMQP plumbing shared by every Baton component; the only crate that speaks lapin.
//!
//! Owns: the connection ([`Broker`], one per component, and the only reconnect path: lapin's
//! recovery is off, and reconnects follow one backoff with jitter per component), the topology
//! of the design ([`topology`]), the message envelope (built from an [`Outgoing`] and checked
//! as an [`Envelope`], each in one place), publishing with publisher confirms in a window
//! ([`Publisher`], which is also how `baton-store`'s outbox relay reaches the broker: it
//! implements `baton_store::relay::Publish`), and consuming with ack-after-commit,
//! dead-lettering of bad input and store outages waited out in place ([`consume`]), and who
//! sent a message ([`Identity`]: the broker user in `user_id`, or the `app_id` on a shared user).
//!
//! Must not touch: SQLite, business rules, saga state. Handlers get an [`Envelope`] and answer
//! with a [`HandleError`] that says what to do with the delivery (a store's error converts to
//! one); this crate does the acking.
//!
//! Layout: `broker` (connection owner), `url` (URL lists and their redaction), `tls`, `topology`
//! (names and declarations), `envelope`,
//! `identity` (the sender check), `publisher`, `consumer`, `health` (the broker's readiness
//! check).

mod acks;
mod broker;
mod consumer;
pub mod dlq;
mod envelope;
mod error;
pub mod health;
mod identity;
mod publisher;
pub mod tls;
pub mod topology;
mod url;

pub use broker::Broker;
pub use consumer::{ConsumerConfig, HandleError, consume};
pub use envelope::dead_reason;
pub use envelope::{BadBody, Envelope, Outgoing, TraceParent, headers};
pub use error::{AmqpError, Cause, PublishError};
pub use identity::{Identity, Sender, broker_user};
pub use publisher::{PendingConfirm, Publisher};
pub use url::{AmqpUrl, parse_urls, redact};
