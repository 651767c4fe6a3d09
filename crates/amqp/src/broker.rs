//! The connection owner: one AMQP connection per component, handing out channels, and the one
//! place that reconnects, to the same node or, in a cluster, to the next one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::AmqpError;
use crate::error::cause;
use crate::topology::{self, QueueSpec, QueueType};
use crate::url::{parse_urls, redact};

/// A component's connection to RabbitMQ. Cheap to clone; every clone shares the connection.
///
/// lapin's automatic recovery is off. It retried from a thread of its own, even for a connection
/// Baton had given up on, and with a vhost gone that made thousands of abandoned handshakes a
/// minute at the broker. A lost connection stays lost; the next [`Broker::channel`] (or
/// [`Broker::health`]) opens a new one, on a schedule shared by every caller: at once after a
/// loss, then with an exponential backoff with jitter, slow while the broker refuses access
/// ([`REFUSED_PACE`]) and quick while it cannot be reached ([`UNREACHABLE_PACE`]). A caller that
/// comes before the next attempt is due gets the last error at once, so callers may loop on
/// `channel()` at any pace: the broker sees only the schedule's attempts.
///
/// A cluster is given as a list of URLs ([`parse_urls`]). The first node that answers is used;
/// when its connection is lost, an attempt tries every node once, starting with the one after
/// it, so a component leaves a dead node at once and comes back to the cluster through any
/// node that is up. The schedule counts whole rounds of the list: the broker is "unreachable"
/// only when no node answers.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    /// The URL list as given (for messages, always through [`redact`]).
    url: String,
    /// Its nodes, in order ([`parse_urls`]).
    nodes: Vec<String>,
    name: String,
    link: Mutex<Link>,
    /// Bumped each time a new connection replaces a lost one: consumers then consume again on
    /// fresh channels, and the relay publishes its unconfirmed rows again.
    generation: tokio::sync::watch::Sender<u64>,
    /// The instance's own queues, the others it needs, and their kind, once
    /// [`Broker::declare_topology`] ran: a new connection declares the topology again before
    /// anyone uses it, since the broker may have lost it (a vhost deleted and made again is
    /// empty).
    declared: std::sync::Mutex<Option<Declared>>,
}

/// The connection and what is known of its losses; only `live` and `close` change it.
struct Link {
    conn: Arc<Connection>,
    /// The index in [`Inner::nodes`] of the node `conn` goes to: the next round starts after it.
    node: usize,
    opened_at: Instant,
    /// Set by [`Broker::close`]: nothing reconnects after it.
    closed: bool,
    /// Set by [`Broker::abandon`]: the connection still looks open but stopped answering (a
    /// confirm that never came); the next call replaces it, from the next node of the list.
    abandoned: bool,
    /// Set while the connection is lost and not yet replaced.
    outage: Option<Outage>,
    /// The schedule of the outage that the current connection ended. A connection lost soon
    /// after it opened (within [`STABLE`]) goes on with it rather than starting over at once,
    /// so that a connection the broker keeps closing is not reopened in a tight loop.
    carried: Option<Schedule>,
}

/// A connection lost and not yet replaced.
struct Outage {
    since: Instant,
    attempts: u32,
    /// No attempt before this.
    next_at: Instant,
    /// What the last attempt said; returned to callers until the next one.
    last: Option<AmqpError>,
    schedule: Option<Schedule>,
}

/// The backoff in force, and whether it is the one for refusals or for an unreachable broker.
struct Schedule {
    refused: bool,
    delays: ExponentialBackoff,
}

/// Retries while the broker refuses access (vhost missing, bad credentials, no permission):
/// 5 s, then doubling up to 20 s, each with up to as much again of jitter. Such a refusal lasts
/// until someone acts; this keeps a component to at most five attempts in its first minute and
/// about two a minute after, and brings it back within 40 s of the fix.
pub const REFUSED_PACE: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(5))
    .with_max_delay(Duration::from_secs(20))
    .with_jitter()
    .without_max_times();

/// Retries while the broker cannot be reached (down, restarting, a network cut): 250 ms, then
/// doubling up to 5 s, each with up to as much again of jitter. A restarted broker is found
/// again within seconds; attempts that the broker never sees cost it nothing.
pub const UNREACHABLE_PACE: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(250))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

/// How long a connection must have been up for its loss to start a fresh schedule (first
/// attempt at once) rather than go on with the last one.
const STABLE: Duration = Duration::from_secs(5);

/// How long opening a connection (TCP, TLS, AMQP handshake) may take.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

/// How long a set-up call (channel.open, basic.qos, basic.consume) may wait for its answer.
pub const SETUP_PATIENCE: Duration = Duration::from_secs(10);

/// How long declaring the whole topology may take (two dozen quorum queues on a busy broker).
pub const DECLARE_PATIENCE: Duration = Duration::from_secs(30);

/// How long closing a channel or a connection may take: a peer in a bad state may never answer.
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(2);

/// The AMQP heartbeat asked for, in seconds, unless the URL names one (`?heartbeat=N`). Each
/// side counts the other gone after two heartbeats without a frame: a frozen broker node is
/// left within about 10 s (lapin closes the connection and the next URL of the list is tried),
/// and a frozen component's deliveries go back to the queue for the others as soon. RabbitMQ's
/// own default is 60 s, which let a stalled process hold its unacked deliveries for minutes.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 5;

/// Open one connection: one TCP connection, one handshake, no retry of lapin's (its default
/// backoff makes no retry, and its recovery is off), so that a failure comes back here at once
/// and nothing is left retrying in lapin's thread.
async fn open(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let mut uri: AMQPUri =
        url.parse().map_err(|e: String| AmqpError::BadUrl { url: redact(url), cause: cause(e) })?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    // amqps: the system's roots, plus the CA named by `?cacertfile=` or BATON_AMQP_CA_FILE.
    let tls = crate::tls::config(url, &uri)?;
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| AmqpError::Refused { url: redact(url), cause: cause(e) })?;
    let props = ConnectionProperties::default().with_connection_name(format!("baton {name}").into());
    let who = (uri.authority.userinfo.username.clone(), uri.vhost.clone(), uri.scheme == AMQPScheme::AMQPS);
    match tokio::time::timeout(
        CONNECT_PATIENCE,
        Connection::connect_uri_with_config(uri, props, tls, runtime),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(classify(url, who, e)),
        Err(_) => Err(AmqpError::Unreachable {
            url: redact(url),
            cause: cause(format!("no AMQP handshake within {} s", CONNECT_PATIENCE.as_secs())),
        }),
    }
}

/// Open a connection to the first node of `nodes` that answers, trying each once in turn from
/// `from`: its index and the connection. When none answers, the error says why for each node
/// when the list has several (their addresses are the operator's next clue); a refusal is
/// returned only when every node refused, so a cluster that is partly down is retried at the
/// quick pace of an unreachable broker.
async fn open_any(nodes: &[String], from: usize, name: &str) -> Result<(usize, Connection), AmqpError> {
    let mut failed = Vec::with_capacity(nodes.len());
    for i in (0..nodes.len()).map(|k| (from + k) % nodes.len()) {
        match open(&nodes[i], name).await {
            Ok(conn) => return Ok((i, conn)),
            Err(e) => {
                if nodes.len() > 1 {
                    tracing::debug!(component = name, node = %redact(&nodes[i]), error = %e, "a node of the cluster did not answer");
                }
                failed.push(e);
            }
        }
    }
    if nodes.len() == 1 || failed.iter().all(AmqpError::is_refusal) {
        return Err(failed.swap_remove(0));
    }
    let causes: Vec<String> = failed
        .iter()
        .map(|e| match e {
            AmqpError::Unreachable { url, cause } => format!("{url}: {cause}"),
            other => other.to_string(),
        })
        .collect();
    Err(AmqpError::Unreachable { url: redact(&nodes.join(",")), cause: cause(causes.join("; ")) })
}

/// Name a failed open by what the operator must do: an access refusal (the broker's
/// ACCESS_REFUSED or NOT_ALLOWED: bad credentials, no such vhost, no permission on it), a
/// broker that cannot be reached, or another refusal of the handshake (TLS, protocol).
fn classify(url: &str, (user, vhost, tls): (String, String, bool), e: lapin::Error) -> AmqpError {
    use lapin::ErrorKind;
    let url_shown = redact(url);
    match e.kind() {
        ErrorKind::ProtocolError(p) if matches!(p.get_id(), 403 | 530) => AmqpError::AccessRefused {
            url: url_shown,
            user,
            vhost,
            cause: cause(p.get_message().to_string()),
        },
        ErrorKind::IOError(io) if !(tls && io.to_string().contains("certificate")) => {
            AmqpError::Unreachable { url: url_shown, cause: io.clone() }
        }
        _ => AmqpError::Refused { url: url_shown, cause: crate::tls::explain(url, e) },
    }
}

/// What a component declared: its `own` queues, the `needed` queues of other components it
/// publishes to beyond the shared ones, and the kind of queue they are.
#[derive(Debug, Clone)]
struct Declared {
    own: Vec<QueueSpec>,
    needed: Vec<QueueSpec>,
    kind: QueueType,
}

/// A component's topology on `conn` ([`topology::declare`]), bounded.
async fn redeclare(conn: &Connection, d: &Declared) -> Result<(), AmqpError> {
    // Every component creates what is missing at start. When two declare the same new
    // quorum queue at the same instant, the broker can answer one of them NOT_FOUND ("home
    // node … is down or inaccessible") while the other's creation is under way (seen on CI).
    // That is no failure of the topology: declare again, on a fresh channel, a few times.
    let mut attempt = 0;
    loop {
        match declare_once(conn, d).await {
            Err(e) if attempt < 5 && created_concurrently(&e) => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "a queue was being created by another component; declaring again");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            done => return done,
        }
    }
}

/// The broker's answer to a declaration that raced another one of the same new quorum queue.
fn created_concurrently(e: &AmqpError) -> bool {
    matches!(e, AmqpError::Declare { source, .. } if source.to_string().contains("is down or inaccessible"))
}

async fn declare_once(conn: &Connection, d: &Declared) -> Result<(), AmqpError> {
    match tokio::time::timeout(DECLARE_PATIENCE, topology::declare(conn, &d.own, &d.needed, d.kind)).await {
        Ok(done) => done,
        Err(_) => {
            Err(AmqpError::NoAnswer { what: "the topology's declarations", secs: DECLARE_PATIENCE.as_secs() })
        }
    }
}

impl Broker {
    /// Connect as component `name` (shown in the management UI's Connections tab) to the first
    /// node of `url` (one URL, or a comma-separated list: [`parse_urls`]) that answers. One
    /// round: a component that cannot connect at start says so and stops.
    pub async fn connect(url: &str, name: &str) -> Result<Broker, AmqpError> {
        let nodes = parse_urls(url)?;
        let (node, conn) = open_any(&nodes, 0, name).await?;
        tracing::debug!(url = %redact(&nodes[node]), component = name, "connected to RabbitMQ");
        let link = Link {
            conn: Arc::new(conn),
            node,
            opened_at: Instant::now(),
            closed: false,
            abandoned: false,
            outage: None,
            carried: None,
        };
        let inner = Inner {
            url: url.into(),
            nodes,
            name: name.into(),
            link: Mutex::new(link),
            generation: tokio::sync::watch::Sender::new(0),
            declared: std::sync::Mutex::new(None),
        };
        Ok(Broker { inner: Arc::new(inner) })
    }

    /// Changes each time a new connection replaces a lost one: a consumer that sees it change
    /// consumes again on a fresh channel.
    pub fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether the connection is up now (false while it is lost or being replaced): a caller
    /// whose channel failed uses it to leave the loss to the broker's own report.
    pub fn connected(&self) -> bool {
        self.inner.link.try_lock().is_ok_and(|link| link.conn.status().connected() && !link.abandoned)
    }

    /// The connection of generation `generation` stopped answering (a publisher confirm
    /// that never came) although it looks open: a node that froze keeps its sockets open,
    /// and heartbeats only notice it after two intervals. Give it up now, so that the next
    /// call connects to the next node of the list and every consumer on it starts again
    /// there. Not while the broker blocks publishers (an alarm holds confirms back on a node
    /// that is well), and not if the connection was replaced since.
    pub async fn abandon(&self, generation: u64, why: &str) {
        let mut link = self.inner.link.lock().await;
        if link.closed || link.abandoned || *self.inner.generation.borrow() != generation {
            return;
        }
        let status = link.conn.status();
        if !status.connected() || status.blocked() {
            return;
        }
        link.abandoned = true;
        tracing::warn!(
            component = %self.inner.name,
            node = %redact(&self.inner.nodes[link.node]),
            %why,
            "RabbitMQ stopped answering on this connection; leaving it for the next node"
        );
        // Closed in the background: a frozen peer never answers the close.
        let conn = Arc::clone(&link.conn);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLOSE_PATIENCE, conn.close(320, "stopped answering".into())).await;
        });
        drop(link);
        // Replaced now rather than at the next use: the consumers on the abandoned connection
        // wait for deliveries that will not come, and move only once a new generation exists.
        let broker = self.clone();
        tokio::spawn(async move {
            let _ = broker.live().await;
        });
    }

    /// The generation of the connection in use: see [`Broker::abandon`].
    pub fn current_generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    /// The connection, reopened first if it is lost and an attempt is due; otherwise the last
    /// attempt's error, at once. The lock is held only to check and replace the connection,
    /// never while it is used (a connection blocked by a broker alarm can stall a call for as
    /// long as the alarm lasts).
    async fn live(&self) -> Result<Arc<Connection>, AmqpError> {
        let mut link = self.inner.link.lock().await;
        if link.closed {
            return Err(AmqpError::Closed);
        }
        let status = link.conn.status();
        if status.connected() && !link.abandoned {
            return Ok(Arc::clone(&link.conn));
        }
        let now = Instant::now();
        if link.outage.is_none() {
            // Just lost. Straight away again, unless it had only just opened: then the last
            // schedule goes on.
            let young = link.opened_at.elapsed() < STABLE;
            let schedule = link.carried.take().filter(|_| young);
            let (next_at, schedule) = match schedule {
                Some(mut s) => (now + s.delays.next().unwrap_or(Duration::ZERO), Some(s)),
                None => (now, None),
            };
            tracing::warn!(component = %self.inner.name, "the connection to RabbitMQ was lost; reconnecting");
            link.outage = Some(Outage { since: now, attempts: 0, next_at, last: None, schedule });
        }
        // From the node after the one just lost: in a cluster, the lost node is the one most
        // likely still down.
        let from = (link.node + 1) % self.inner.nodes.len();
        let outage = link.outage.as_mut().expect("set just above");
        if now < outage.next_at {
            let last = outage.last.clone();
            return Err(last.unwrap_or_else(|| AmqpError::Reconnecting { url: redact(&self.inner.url) }));
        }
        outage.attempts += 1;
        let declared = self.inner.declared.lock().expect("declared").clone();
        let opened = match open_any(&self.inner.nodes, from, &self.inner.name).await {
            Ok((node, conn)) => match declared {
                Some(d) => match redeclare(&conn, &d).await {
                    Ok(()) => Ok((node, conn)),
                    Err(e) => {
                        let _ = tokio::time::timeout(
                            CLOSE_PATIENCE,
                            conn.close(200, "declaration failed".into()),
                        )
                        .await;
                        Err(e)
                    }
                },
                None => Ok((node, conn)),
            },
            Err(e) => Err(e),
        };
        match opened {
            Ok((node, conn)) => {
                let outage = link.outage.take().expect("an outage is under way");
                let old = std::mem::replace(&mut link.conn, Arc::new(conn));
                link.node = node;
                link.abandoned = false;
                link.opened_at = Instant::now();
                link.carried = outage.schedule;
                // Lost already, but let go of its socket now rather than with the last clone.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_PATIENCE, old.close(320, "replaced".into())).await;
                });
                self.inner.generation.send_modify(|g| *g += 1);
                tracing::info!(
                    component = %self.inner.name,
                    node = %redact(&self.inner.nodes[node]),
                    down_for = ?outage.since.elapsed(),
                    attempts = outage.attempts,
                    "reconnected to RabbitMQ"
                );
                Ok(Arc::clone(&link.conn))
            }
            Err(e) => {
                let refused = e.is_refusal();
                let pace_changed = outage.schedule.as_ref().is_none_or(|s| s.refused != refused);
                if pace_changed {
                    let pace = if refused { REFUSED_PACE } else { UNREACHABLE_PACE };
                    outage.schedule = Some(Schedule { refused, delays: pace.build() });
                }
                let schedule = outage.schedule.as_mut().expect("set just above");
                let retry_in = schedule.delays.next().unwrap_or(Duration::from_secs(1));
                outage.next_at = Instant::now() + retry_in;
                // Said once per kind of failure, then quietly: the same sentence every few
                // seconds from every component would drown the log.
                let name = &self.inner.name;
                match (pace_changed, refused) {
                    (true, true) => tracing::error!(
                        component = %name, error = %e, ?retry_in,
                        "RabbitMQ refuses this component; retrying slowly until it is let in (said once)"
                    ),
                    (true, false) => tracing::warn!(
                        component = %name, error = %e, ?retry_in,
                        "RabbitMQ cannot be reached; retrying with a backoff (said once)"
                    ),
                    (false, _) => tracing::debug!(
                        component = %name, error = %e, ?retry_in, attempts = outage.attempts,
                        "reconnecting to RabbitMQ failed again"
                    ),
                }
                outage.last = Some(e.clone());
                Err(e)
            }
        }
    }

    /// A new channel; reconnects first if the connection is lost and an attempt is due.
    ///
    /// Bounded: a channel.open the broker never answers (seen once on a loaded CI machine, a
    /// consumer that never started) is an error the caller's retry loop handles, not a hang.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let conn = self.live().await?;
        match tokio::time::timeout(SETUP_PATIENCE, conn.create_channel()).await {
            Ok(ch) => Ok(ch?),
            Err(_) => Err(AmqpError::NoAnswer { what: "channel.open", secs: SETUP_PATIENCE.as_secs() }),
        }
    }

    /// Whether the connection is up and not blocked by a broker alarm: what `/health` reports.
    /// A lost connection is reopened here when an attempt is due, so the answer is about the
    /// broker now, or as of the last attempt.
    pub async fn health(&self) -> Result<(), String> {
        let conn = match tokio::time::timeout(Duration::from_secs(5), self.live()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("RabbitMQ at {} does not answer", redact(&self.inner.url))),
        };
        let s = conn.status();
        if s.blocked() {
            Err("RabbitMQ is blocking publishers (a resource alarm is on)".into())
        } else if s.connected() {
            Ok(())
        } else {
            Err(format!("connecting to RabbitMQ at {}", redact(&self.inner.url)))
        }
    }

    /// Declare and bind `extra` (this instance's own queues) and make sure the rest of the
    /// topology exists ([`topology::declare`]), its queues of `kind`, now and on every new
    /// connection after this one.
    pub async fn declare_topology(&self, extra: &[QueueSpec], kind: QueueType) -> Result<(), AmqpError> {
        self.declare_topology_needing(extra, &[], kind).await
    }

    /// [`Broker::declare_topology`], and `needed`, queues of other components this one
    /// publishes to, checked as the shared ones are: declared only if missing, so that a
    /// component under its own broker user, who may not declare them, starts once the
    /// operator's import made them.
    pub async fn declare_topology_needing(
        &self,
        extra: &[QueueSpec],
        needed: &[QueueSpec],
        kind: QueueType,
    ) -> Result<(), AmqpError> {
        let conn = self.live().await?;
        let d = Declared { own: extra.to_vec(), needed: needed.to_vec(), kind };
        redeclare(&conn, &d).await?;
        *self.inner.declared.lock().expect("declared") = Some(d);
        Ok(())
    }

    /// Close the connection for good (at shutdown): no call reconnects after this.
    pub async fn close(&self) {
        // Bounded, both: `live` may hold the lock while it opens a connection, and a connection
        // in a bad state may never answer the close; the process is stopping either way.
        let Ok(mut link) = tokio::time::timeout(CLOSE_PATIENCE, self.inner.link.lock()).await else {
            return;
        };
        link.closed = true;
        if !link.conn.status().connected() {
            return;
        }
        match tokio::time::timeout(CLOSE_PATIENCE, link.conn.close(200, "shutting down".into())).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "closing the connection"),
            Err(_) => tracing::debug!("the broker did not answer the close within 2 s"),
            Ok(Ok(())) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that does not answer is skipped: the connection goes to the next one, and the
    /// round starts where it is told to.
    #[tokio::test]
    async fn a_round_skips_the_nodes_that_do_not_answer() {
        let closed = |port: u16| format!("amqp://u:p@127.0.0.1:{port}/v");
        let (a, b) = (free_closed_port(), free_closed_port());
        let err = open_any(&[closed(a), closed(b)], 1, "test").await.expect_err("nothing listens");
        match err {
            AmqpError::Unreachable { url, cause } => {
                assert_eq!(url, format!("amqp://u:***@127.0.0.1:{a}/v,amqp://u:***@127.0.0.1:{b}/v"));
                // Both were tried, the second first.
                let cause = cause.to_string();
                let (first, second) = cause.split_once("; ").expect("one cause per node");
                assert!(first.contains(&b.to_string()) && second.contains(&a.to_string()), "{cause}");
            }
            other => panic!("expected Unreachable, got {other}"),
        }
    }

    fn free_closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Whatever the jitter, a refused component makes at most five attempts in its first
    /// minute (one at once, then the schedule), and never waits more than 40 s between two.
    #[test]
    fn a_refused_component_tries_a_few_times_a_minute() {
        for _ in 0..200 {
            let delays: Vec<Duration> = REFUSED_PACE.build().take(20).collect();
            let mut at = Duration::ZERO;
            let mut in_first_minute = 1;
            for d in &delays {
                assert!(*d <= Duration::from_secs(40), "{delays:?}");
                at += *d;
                if at < Duration::from_secs(60) {
                    in_first_minute += 1;
                }
            }
            assert!(in_first_minute <= 5, "{in_first_minute} attempts: {delays:?}");
        }
    }

    #[test]
    fn an_unreachable_broker_is_tried_again_within_ten_seconds() {
        let delays: Vec<Duration> = UNREACHABLE_PACE.build().take(30).collect();
        assert!(delays[0] < Duration::from_millis(500), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)), "{delays:?}");
    }
}
