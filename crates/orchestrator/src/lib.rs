//! The saga runtime: carries out the decisions of `baton-workflow`'s state machine durably.
//!
//! Owns: `orchestrator.db` (saga instances with their state, the definition each started on,
//! the history of each saga, inbox and outbox), the handlers of `orchestrator.commands` (start a saga, or cancel one) and of this instance's
//! reply queue (advance a saga), the timer that fires timeouts and retries, and the read model
//! behind `GET /workflows/{id}` and `baton workflows` ([`query`]). Every transition is one
//! transaction: new state, history rows and outgoing commands commit together, then the delivery
//! is acked and the relay publishes. After a restart the state, the timers (`wake_at`) and the
//! unsent messages are all in the database; the timers are re-armed on the new process's clock.
//! Each saga runs on the definition it started on, read from the store by content hash
//! (`definitions`): a changed workflow file starts new sagas on the new version and leaves the
//! others on theirs, and a saga whose definition cannot be found stops as `definition_missing`
//! for an operator's retry. Time is the saga clock (monotonic within a process), never the wall
//! clock read at each transition.
//!
//! Must not touch: the rules of a transition (that is `baton-workflow`), lapin, the services'
//! databases.

mod crash_points;
mod definitions;
pub mod query;
mod runtime;
mod schema;
#[doc(hidden)]
pub mod testing;

pub use query::Sagas;
pub use runtime::{Options, cancel_message, request_cancel, request_retry, retry_message, run};
pub use schema::MIGRATIONS;

/// The component name: `orchestrator.db`, `app_id`, the command queue's routing key.
pub const COMPONENT: &str = "orchestrator";
