//! The HTTP gateway: the only door for clients.
//!
//! Owns: the console (`/`, module `console`: a web UI over the same API), the HTTP API (`POST /spaces`, with an optional `Idempotency-Key`, `GET /spaces/{id}`,
//! `GET /workflows` (a page of sagas, newest first, with a cursor), `GET /workflows/{id}`,
//! `POST /workflows/{id}/cancel` and `POST /workflows/{id}/retry` (sent to the orchestrator as
//! messages), and the
//! health of every component of its process: `GET /health/live`, `GET /health/ready` = `GET
//! /health`), input validation (owners normalised to one spelling per person), what a client
//! may hold of it (header and body timeouts, a connection limit), `gateway.db` (every request,
//! what its client was told, and what eventually happened: the audit compares the two; the
//! clients' idempotency keys, each with the request it first came with), and
//! this instance's reply queue, where outcomes arrive. Must not touch: saga state (it hands
//! requests and cancels to the orchestrator and reads its
//! sagas for `GET /workflows` through the [`baton_orchestrator::Sagas`] it is given) or any service's database
//! (the console reads them through `baton_services::read`).
//!
//! Layout: `server` (start-up, the accept loop with its limits, shutdown), `options`, `api`
//! (the routes), `gateway` (the request logic: start, wait, replay, record outcomes; and
//! `Refusal`, why a request got no outcome), `idempotency` (the
//! `idempotency_keys` table), `input` (validation), `early` (errors hyper answers before a
//! route), `listing` (`GET /workflows`), `console` (the web UI, its assets and its read-only routes).

mod api;
mod console;
mod early;
#[doc(hidden)]
pub mod fixture;
mod gateway;
mod idempotency;
mod input;
mod listing;
mod options;
pub mod read;
mod server;

pub use input::{CreateSpace, Invalid, normalise_owner, validate};
pub use options::{DEFAULT_IDEMPOTENCY_TTL, HttpLimits, Options, default_max_connections};
pub use server::{run, serve};

/// The component name: `gateway.db`, `app_id`, the outcome queue `gateway.<instance>.outcomes`.
pub const COMPONENT: &str = "gateway";

/// The gateway's tables, after the common ones.
pub const MIGRATIONS: &[&str] = &[
    "CREATE TABLE requests (
        space_id TEXT PRIMARY KEY,
        saga_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        owner TEXT NOT NULL,
        mode TEXT NOT NULL,
        requested_at INTEGER NOT NULL,
        told_status INTEGER,
        told_at INTEGER,
        outcome_status INTEGER,
        outcome TEXT,
        outcome_at INTEGER
    );",
    // A client's `Idempotency-Key` on POST /spaces, and the request it first came with: a retry
    // with the same key and body is that request again. Kept `--idempotency-ttl`.
    "CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        space_id TEXT NOT NULL,
        saga_id TEXT NOT NULL,
        name TEXT NOT NULL,
        owner TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        replays INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);",
    // The console's list of requests, newest first, and its search by name or owner.
    "CREATE INDEX requests_by_time ON requests (requested_at, space_id);
    CREATE INDEX requests_by_name ON requests (name);
    CREATE INDEX requests_by_owner ON requests (owner);",
];
