//! The connection owner: one AMQP connection per component, handing out channels.

use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::AMQPUriTcpExt;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::AmqpError;
use crate::topology::{self, QueueSpec};

/// A component's connection to RabbitMQ. Cheap to clone; every clone shares the connection.
///
/// lapin's automatic recovery reconnects and replays channels, consumers, QoS and confirm mode
/// after a network failure. When recovery gives up (the broker was away too long), the next
/// [`Broker::channel`] makes a new connection: callers that loop on `channel()` with a backoff
/// survive any outage.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    name: String,
    conn: Mutex<Arc<Connection>>,
    /// Since when the connection has been seen down (recovering, or worse).
    down_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// Bumped each time the connection comes back (recovered by lapin, or replaced): consumers
    /// then consume again on fresh channels rather than trust lapin's recovery of them.
    generation: tokio::sync::watch::Sender<u64>,
}

/// How long lapin's own recovery may take, from the moment the connection went down, before
/// Baton gives up on it and opens a new connection. A recovery can hang when the broker
/// restarts under it (seen in about one broker restart in four); a healthy one is done within
/// lapin's 2 s backoff of the broker's return, and giving up early costs only a reconnect.
pub const RECOVERY_PATIENCE: Duration = Duration::from_secs(3);

/// How long opening a connection (TCP, TLS, AMQP handshake) may take.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

/// How long a set-up call (channel.open, basic.qos, basic.consume) may wait for its answer.
pub const SETUP_PATIENCE: Duration = Duration::from_secs(10);

/// `amqp://user:secret@host/vhost` -> `amqp://user:***@host/vhost`, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

async fn open(url: &str, name: &str) -> Result<Connection, AmqpError> {
    let uri: AMQPUri = url.parse().map_err(|e: String| AmqpError::BadUrl { url: redact(url), cause: e })?;
    // amqps: the system's roots, plus the CA named by `?cacertfile=` or BATON_AMQP_CA_FILE.
    let tls = crate::tls::config(url, &uri)?;
    // A quick TCP probe first: with recovery enabled, lapin would retry a missing broker for
    // a long while before saying so.
    let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
    match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(&addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(AmqpError::Unreachable { url: redact(url), cause: e.to_string() }),
        Err(_) => {
            return Err(AmqpError::Unreachable { url: redact(url), cause: "no answer within 3 s".into() });
        }
    }
    let refused =
        |cause: String| AmqpError::Refused { url: redact(url), cause: crate::tls::explain(url, cause) };
    let runtime = lapin::runtime::default_runtime().map_err(|e| refused(e.to_string()))?;
    if uri.scheme == AMQPScheme::AMQPS {
        // The TLS handshake on its own first, for the same reason: a certificate the client
        // does not trust would otherwise be retried by the recovery, forever, without a word.
        match tokio::time::timeout(
            Duration::from_secs(10),
            uri.connect_with_config_async(tls.as_ref(), &runtime),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(refused(format!("TLS handshake failed: {e}"))),
            Err(_) => return Err(refused("no TLS handshake within 10 s".into())),
        }
    }
    // Recovery retries quickly and often (lapin's default backoff doubles up to a minute, so a
    // broker back after a few seconds would be noticed late); past that, `live` reconnects.
    let props = ConnectionProperties::default()
        .with_connection_name(format!("baton {name}").into())
        .configure_backoff(|b| {
            b.with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(60)
                .with_jitter()
        })
        .enable_auto_recover();
    // Bounded: with recovery on, lapin retries a failing handshake by itself (up to its backoff's
    // 60 tries), and `live` holds the connection lock meanwhile, stalling every channel of the
    // component; past this the caller's own retry loop tries again from the start.
    match tokio::time::timeout(
        CONNECT_PATIENCE,
        Connection::connect_uri_with_config(uri, props, tls, runtime),
    )
    .await
    {
        Ok(conn) => conn.map_err(|e| refused(e.to_string())),
        Err(_) => Err(AmqpError::Unreachable {
            url: redact(url),
            cause: format!("no AMQP handshake within {} s", CONNECT_PATIENCE.as_secs()),
        }),
    }
}

/// Note when the connection goes down, as it happens: `live` gives up on a recovery that has
/// not finished within [`RECOVERY_PATIENCE`] of that moment, not of the first call that noticed
/// (a publish can sit in a dead connection for seconds before it says so). Ends with the broker.
async fn watch(inner: std::sync::Weak<Inner>) {
    let mut was_down = false;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(inner) = inner.upgrade() else { return };
        // Never wait for the lock: `live` may be reconnecting under it.
        let Ok(conn) = inner.conn.try_lock().map(|c| Arc::clone(&c)) else { continue };
        let up = conn.status().connected();
        let mut since = inner.down_since.lock().expect("down_since");
        if up {
            *since = None;
            if was_down {
                inner.generation.send_modify(|g| *g += 1);
            }
        } else {
            since.get_or_insert_with(std::time::Instant::now);
        }
        was_down = !up;
    }
}

/// Follow lapin's events of one connection: every time lapin says it is connected again after
/// an error, bump the generation, so consumers consume again on fresh channels. The polling
/// watchdog alone could miss a recovery quicker than its period.
async fn listen(conn: Arc<Connection>, inner: std::sync::Weak<Inner>) {
    use futures_util::StreamExt;
    let mut events = conn.events_listener();
    drop(conn);
    let mut failed = false;
    while let Some(event) = events.next().await {
        let Some(inner) = inner.upgrade() else { return };
        match event {
            lapin::Event::Error(_) => {
                failed = true;
                inner.down_since.lock().expect("down_since").get_or_insert_with(std::time::Instant::now);
            }
            lapin::Event::Connected if failed => {
                failed = false;
                inner.generation.send_modify(|g| *g += 1);
            }
            _ => {}
        }
    }
}

/// Keep a replaced connection from ever coming back. A `close` sent while lapin was recovering
/// it may not take, and a recovery that finishes later would bring back its consumers beside the
/// new ones: ghosts nobody reads, holding deliveries unacked (seen after broker restarts as
/// answers that never reached the gateway). For two minutes, close it whenever it is up.
async fn bury(old: Arc<Connection>) {
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < until {
        if old.status().connected() {
            tracing::info!("a replaced connection came back; closing it");
            let _ = tokio::time::timeout(Duration::from_secs(2), old.close(320, "replaced".into())).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Broker {
    /// Connect as component `name` (shown in the management UI's Connections tab).
    pub async fn connect(url: &str, name: &str) -> Result<Broker, AmqpError> {
        let conn = open(url, name).await?;
        tracing::debug!(url = %redact(url), component = name, "connected to RabbitMQ");
        let inner = Arc::new(Inner {
            url: url.into(),
            name: name.into(),
            conn: Mutex::new(Arc::new(conn)),
            down_since: std::sync::Mutex::new(None),
            generation: tokio::sync::watch::Sender::new(0),
        });
        tokio::spawn(watch(Arc::downgrade(&inner)));
        tokio::spawn(listen(Arc::clone(&*inner.conn.lock().await), Arc::downgrade(&inner)));
        Ok(Broker { inner })
    }

    /// Changes each time the connection comes back after being down: a consumer that sees it
    /// change consumes again on a fresh channel. lapin's recovery of a consumer was seen to
    /// leave no consumer at the broker after a restart while its stream stayed silent.
    pub fn generation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The connection, reopened first if it is gone for good (closed by the broker, or lost
    /// longer than lapin's recovery would wait).
    /// The lock is held only to check and replace it, never while the connection is used (a
    /// connection blocked by a broker alarm can stall a call for as long as the alarm lasts).
    async fn live(&self) -> Result<Arc<Connection>, AmqpError> {
        let mut conn = self.inner.conn.lock().await;
        let status = conn.status();
        let stuck = {
            let mut since = self.inner.down_since.lock().expect("down_since");
            if status.connected() {
                *since = None;
                false
            } else {
                since.get_or_insert_with(std::time::Instant::now).elapsed() > RECOVERY_PATIENCE
            }
        };
        if status.closed() || status.errored() || stuck {
            if stuck {
                tracing::warn!(component = %self.inner.name, patience = ?RECOVERY_PATIENCE, "connection recovery is stuck; giving up on it");
                // Close it for good, so that its channels and consumers can never come back
                // beside the new ones (deliveries to a consumer nobody reads would stay unacked).
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(320, "recovery stuck; replaced".into()),
                )
                .await;
            } else {
                tracing::warn!(component = %self.inner.name, "connection lost and not recovered; reconnecting");
            }
            let old = std::mem::replace(&mut *conn, Arc::new(open(&self.inner.url, &self.inner.name).await?));
            tokio::spawn(listen(Arc::clone(&conn), Arc::downgrade(&self.inner)));
            tokio::spawn(bury(old));
            *self.inner.down_since.lock().expect("down_since") = None;
            self.inner.generation.send_modify(|g| *g += 1);
            tracing::info!(component = %self.inner.name, "reconnected to RabbitMQ");
        }
        Ok(Arc::clone(&conn))
    }

    /// A new channel; reconnects first if the connection is gone for good.
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
    /// A connection that is gone is reopened here, so the answer is about the broker now.
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
        } else if s.reconnecting() || s.connecting() {
            Err(format!("reconnecting to RabbitMQ at {}", redact(&self.inner.url)))
        } else {
            Err(format!("not connected to RabbitMQ at {}", redact(&self.inner.url)))
        }
    }

    /// Declare the exchanges, the shared work queues and `extra` (this instance's own queues).
    pub async fn declare_topology(&self, extra: &[QueueSpec]) -> Result<(), AmqpError> {
        let ch = self.channel().await?;
        topology::declare_exchanges(&ch).await?;
        for q in topology::shared_queues().iter().chain(extra) {
            topology::declare_work_queue(&ch, q).await?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Close the connection (at shutdown).
    pub async fn close(&self) {
        // Bounded, both: `live` may hold the lock while it reconnects, and a connection in a bad
        // state may never answer the close; the process is stopping either way.
        let Ok(conn) = tokio::time::timeout(Duration::from_secs(2), self.inner.conn.lock()).await else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutting down".into())).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "closing the connection"),
            Err(_) => tracing::debug!("the broker did not answer the close within 2 s"),
            Ok(Ok(())) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
