//! Request/reply over RabbitMQ with Baton's own plumbing: a requester that publishes (persistent,
//! mandatory, confirmed) and waits for the reply on a queue of its own, and the echo responder of
//! the raw floor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_amqp::topology::{self, OUTCOMES, QueueSpec, QueueType, REPLIES};
use baton_amqp::{Broker, ConsumerConfig, Envelope, HandleError, Outgoing, Publisher, consume};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Unacked deliveries the bench's consumers hold: more than any window it keeps in flight.
const PREFETCH: u16 = 1024;

type Pending = Arc<Mutex<HashMap<Uuid, oneshot::Sender<Envelope>>>>;

/// A consumer task of the bench, stopped by its token.
struct Task {
    cancel: CancellationToken,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Task {
    fn new(cancel: CancellationToken, handle: JoinHandle<()>) -> Task {
        Task { cancel, handle: Mutex::new(Some(handle)) }
    }

    /// Stop consuming and wait for the handlers already running.
    async fn stop(&self) {
        self.cancel.cancel();
        let handle = self.handle.lock().expect("consumer task").take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

/// A requester: its own connection, a publisher, and a reply queue `<key>.replies` bound with
/// `key` to `baton.replies` (the echo's replies) and to `baton.outcomes` (the orchestrator's
/// answers to the sagas it starts), whose replies are matched to requests by `correlation_id`.
pub(crate) struct Rpc {
    broker: Broker,
    publisher: Publisher,
    pending: Pending,
    key: String,
    consumer: Task,
}

impl Rpc {
    /// Connect as `name`, declare the exchanges and the reply queue, and start consuming it.
    pub(crate) async fn start(amqp_url: &str, name: &str, key: &str) -> anyhow::Result<Rpc> {
        let broker = Broker::connect(amqp_url, name).await?;
        let queue = QueueSpec { name: format!("{key}.replies"), exchange: REPLIES, keys: vec![key.into()] };
        let ch = broker.channel().await?;
        topology::declare_exchanges(&ch).await?;
        topology::declare_work_queue(&ch, &queue, QueueType::Quorum).await?;
        // The same queue again (idempotent), bound to the outcomes as well.
        topology::declare_work_queue(
            &ch,
            &QueueSpec { exchange: OUTCOMES, ..queue.clone() },
            QueueType::Quorum,
        )
        .await?;
        let _ = ch.close(200, "declared".into()).await;
        let publisher = Publisher::new(broker.clone());
        let pending: Pending = Arc::default();
        let cancel = CancellationToken::new();
        let p = Arc::clone(&pending);
        let handle = tokio::spawn(consume(
            broker.clone(),
            publisher.clone(),
            ConsumerConfig::new(queue.name, PREFETCH),
            move |env: Envelope| {
                let p = Arc::clone(&p);
                async move {
                    let id = env.correlation_id.ok_or_else(|| {
                        HandleError::reject("a reply without a correlation_id cannot be matched")
                    })?;
                    // A reply nobody waits for any more (its request timed out) is dropped.
                    if let Some(tx) = p.lock().expect("pending replies").remove(&id) {
                        let _ = tx.send(env);
                    }
                    Ok(())
                }
            },
            cancel.clone(),
        ));
        Ok(Rpc { broker, publisher, pending, key: key.into(), consumer: Task::new(cancel, handle) })
    }

    /// The routing key replies come back under: the `reply_to` of every request.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Publish `msg` (its `correlation_id` names the reply to wait for), wait for its confirm,
    /// then for the reply.
    pub(crate) async fn call(&self, msg: &Outgoing, timeout: Duration) -> Result<Envelope, String> {
        let id = msg.correlation_id;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending replies").insert(id, tx);
        let answer = async {
            self.publisher.publish_confirmed(msg).await.map_err(|e| e.to_string())?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(env)) => Ok(env),
                Ok(Err(_)) => Err("the reply consumer stopped".to_string()),
                Err(_) => Err(format!("no reply within {} s", timeout.as_secs())),
            }
        }
        .await;
        if answer.is_err() {
            self.pending.lock().expect("pending replies").remove(&id);
        }
        answer
    }

    /// Publish `msg` and wait for its confirm only; a reply to it, should one come, is dropped.
    pub(crate) async fn send(&self, msg: &Outgoing) -> Result<(), String> {
        self.publisher.publish_confirmed(msg).await.map_err(|e| e.to_string())
    }

    pub(crate) async fn stop(&self) {
        self.consumer.stop().await;
        self.broker.close().await;
    }
}

/// The routing key on `baton.commands` of the echo responder's request queue.
pub(crate) const ECHO_KEY: &str = "bench.echo";
/// The message type of an echo request; its reply is `bench.echo.reply`.
pub(crate) const ECHO: &str = "bench.echo";

/// The echo responder of the raw floor: consumes `bench.echo.commands` and sends each body back
/// to its `reply_to`, confirmed, before acking the request.
pub(crate) struct Echo {
    broker: Broker,
    consumer: Task,
}

impl Echo {
    pub(crate) async fn start(amqp_url: &str) -> anyhow::Result<Echo> {
        let broker = Broker::connect(amqp_url, "bench echo").await?;
        let queue = QueueSpec {
            name: topology::command_queue(ECHO_KEY),
            exchange: topology::COMMANDS,
            keys: vec![ECHO_KEY.into()],
        };
        let ch = broker.channel().await?;
        topology::declare_exchanges(&ch).await?;
        topology::declare_work_queue(&ch, &queue, QueueType::Quorum).await?;
        let _ = ch.close(200, "declared".into()).await;
        let publisher = Publisher::new(broker.clone());
        let cancel = CancellationToken::new();
        let p = publisher.clone();
        let handle = tokio::spawn(consume(
            broker.clone(),
            publisher,
            ConsumerConfig::new(queue.name, PREFETCH),
            move |env: Envelope| {
                let p = p.clone();
                async move {
                    let to = env.reply_to.clone().ok_or_else(|| {
                        HandleError::reject("an echo request without reply_to cannot be answered")
                    })?;
                    let correlation = env.correlation_id.unwrap_or(env.message_id);
                    let mut reply = Outgoing::new(
                        REPLIES,
                        &to,
                        &baton_protocol::reply_type(ECHO),
                        correlation,
                        "bench echo",
                        env.traceparent.child(),
                        &(),
                    );
                    let body = String::from_utf8(env.body)
                        .map_err(|_| HandleError::reject("an echo body is not UTF-8"))?;
                    reply.body = baton_protocol::Json::parse(body)
                        .map_err(|e| HandleError::reject(format!("an echo body is not JSON: {e}")))?;
                    p.publish_confirmed(&reply).await.map_err(HandleError::retry)
                }
            },
            cancel.clone(),
        ));
        Ok(Echo { broker, consumer: Task::new(cancel, handle) })
    }

    pub(crate) async fn stop(&self) {
        self.consumer.stop().await;
        self.broker.close().await;
    }
}
