//! How a gateway runs: its options and what a client may hold of it.

use std::net::SocketAddr;
use std::time::Duration;

use baton_protocol::Mode;

/// How a gateway runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker (its password never shown).
    pub amqp_url: baton_amqp::AmqpUrl,
    /// Where the gateway keeps its requests: a SQLite file in a data dir, or a PostgreSQL schema.
    pub store: baton_store::Location,
    pub http: SocketAddr,
    pub mode: Mode,
    /// This instance's name: outcomes come back on `gateway.<instance>.outcomes` (workflow mode)
    /// and `gateway.<instance>.events` (events mode).
    pub instance: String,
    /// The workflow every request runs (`create-space` or `create-space-parallel`).
    pub workflow: String,
    /// How long a client waits for an outcome before a 504.
    pub deadline: Duration,
    /// Requests waiting for an outcome at once; beyond, new ones get a 429 at once instead of
    /// queueing without bound.
    pub max_in_flight: usize,
    /// How long an `Idempotency-Key` is kept ([`DEFAULT_IDEMPOTENCY_TTL`]): a retry with it
    /// within that time is the first request again; past it the key counts as new.
    pub idempotency_ttl: Duration,
    /// What a slow or idle client may hold of the gateway.
    pub limits: HttpLimits,
    /// The liveness and readiness of every component of this process, which `/health/live`
    /// and `/health/ready` answer; the gateway adds its own checks.
    pub health: baton_health::Health,
    /// The orchestrator's sagas, read-only, for `GET /workflows/{id}`.
    pub sagas: baton_orchestrator::Sagas,
    /// How long inbox rows are kept; older messages are dead-lettered on arrival
    /// ([`baton_store::retention`]). Idempotency keys are kept for `idempotency_ttl` instead,
    /// whatever this is, and the requests themselves are kept: they are what a retry is
    /// answered from, and what `GET /spaces/{id}`, the audit and `baton reconcile` know a
    /// client was told.
    pub retain: Duration,
    /// Record metrics and answer `GET /metrics`; off, `/metrics` answers 404 and nothing is
    /// counted (what `baton bench --instrumentation` compares against).
    pub metrics: bool,
    /// The kind of the work queues it declares (`--queue-type`), the same for every component.
    pub queue_type: baton_amqp::topology::QueueType,
}

/// How long an `Idempotency-Key` is kept unless `--idempotency-ttl` says otherwise: a day, as
/// payment APIs do, long enough for any client's retries.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a client may take and how many connections it may hold: without them, connections
/// that never finish their request pile up until the process runs out of file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time to send a request's headers, counted from when the gateway waits for them: on a
    /// kept-alive connection that is as soon as the previous answer is sent, so it is also how
    /// long such a connection may sit idle. Past it the connection is closed.
    pub header_timeout: Duration,
    /// Time to send the whole body of a `POST /spaces`, counted once the headers are in; past
    /// it the client gets a 408 and the connection is closed.
    pub body_timeout: Duration,
    /// Connections open at once; one more gets a 503 at once and is closed.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
        }
    }
}

impl HttpLimits {
    /// One sentence for a limit that would refuse everything.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.header_timeout.is_zero() || self.body_timeout.is_zero() {
            anyhow::bail!("the HTTP header and body timeouts must be longer than zero");
        }
        if self.max_connections == 0 {
            anyhow::bail!("the HTTP connection limit must be at least 1");
        }
        Ok(())
    }
}

/// The process's open-file limit less a reserve for the databases, the broker and the
/// connections being refused: an eighth of it, at least 256.
pub fn default_max_connections() -> usize {
    let soft = rlimit::Resource::NOFILE.get().map_or(1024, |(soft, _)| soft);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX).min(1 << 20);
    soft.saturating_sub((soft / 8).max(256)).max(64)
}
