//! Publishing with publisher confirms: persistent, `mandatory`, and a returned or nacked message
//! counts as a failure. A caller may publish many messages and then await their confirms (the
//! window), instead of waiting for each in turn. Every message carries the publisher's broker
//! user as its `user_id`, which the broker checks: it names the sender ([`crate::Identity`]).

use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::error::channel_failed;
use crate::{Broker, Outgoing, PublishError, TraceParent};

/// How long a publish waits for the broker's confirm before it counts as failed (and is sent
/// again: the receiver's inbox drops the double).
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long handing a message to the connection may take (it is a write to a socket buffer;
/// a connection that died without a word, or that an alarm blocks, holds it longer).
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A confirm-mode channel of one component. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    broker: Broker,
    /// The broker user of the connection: every message's `user_id`.
    user: Arc<str>,
    /// The channel, and the generation of the connection it was opened on.
    chan: Arc<Mutex<Option<(Channel, u64)>>>,
}

/// The broker's verdict on one published message, still to come.
#[must_use = "a publish is not done until its confirm says so"]
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    /// The connection it went out on: given up if the confirm never comes.
    on: Option<(Broker, u64)>,
}

impl From<PublisherConfirm> for PendingConfirm {
    fn from(confirm: PublisherConfirm) -> Self {
        PendingConfirm { confirm, on: None }
    }
}

impl PendingConfirm {
    /// Wait for the confirm, at most [`CONFIRM_TIMEOUT`]. `Ok` only for an ack of a routed
    /// message. A confirm lost with a connection would otherwise be awaited forever, holding
    /// up everything behind it; one that does not come in time counts as a failed connection
    /// ([`Broker::abandon`]): a frozen node is left for the next one of the list.
    pub async fn wait(self) -> Result<(), PublishError> {
        let confirmation = match tokio::time::timeout(CONFIRM_TIMEOUT, self.confirm).await {
            Ok(c) => c.map_err(channel_failed)?,
            Err(_) => {
                let why = format!("no confirm within {} s", CONFIRM_TIMEOUT.as_secs());
                if let Some((broker, generation)) = &self.on {
                    broker.abandon(*generation, &why).await;
                }
                return Err(PublishError::channel(why));
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Returned(format!("{} {}", returned.reply_code, returned.reply_text)))
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
            Confirmation::NotRequested => Err(PublishError::channel("publisher confirms were not enabled")),
        }
    }
}

impl Publisher {
    pub fn new(broker: Broker) -> Self {
        let user = crate::identity::broker_user(broker.url()).into();
        Publisher { broker, user, chan: Arc::new(Mutex::new(None)) }
    }

    async fn channel(&self) -> Result<(Channel, u64), PublishError> {
        let mut slot = self.chan.lock().await;
        if let Some((ch, generation)) = slot.as_ref()
            && ch.status().connected()
            && *generation == self.broker.current_generation()
        {
            return Ok((ch.clone(), *generation));
        }
        let ch = self.broker.channel().await.map_err(PublishError::channel)?;
        // Read after the channel: `channel()` may have replaced the connection.
        let generation = self.broker.current_generation();
        let patience = crate::broker::SETUP_PATIENCE;
        tokio::time::timeout(patience, ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .map_err(|_| PublishError::channel(format!("no answer to confirm.select within {patience:?}")))?
            .map_err(channel_failed)?;
        *slot = Some((ch.clone(), generation));
        Ok((ch, generation))
    }

    /// Publish without waiting for the confirm; the returned future carries it. The publish is
    /// a span of its own, a child of the hop that made the message (its `traceparent`), and
    /// the message carries this span's context on: the receiver's span is its child.
    pub async fn publish(&self, msg: &Outgoing) -> Result<PendingConfirm, PublishError> {
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("publish {}", msg.kind),
            otel.kind = "producer",
            exchange = %msg.exchange,
            kind = %msg.kind,
            message_id = %msg.message_id,
            trace_id = msg.traceparent.trace_id(),
        );
        baton_telemetry::follow(&span, &msg.traceparent);
        let trace = baton_telemetry::traceparent_of(&span).unwrap_or_else(|| msg.traceparent.clone());
        self.send(msg, &trace).instrument(span).await
    }

    async fn send(&self, msg: &Outgoing, trace: &TraceParent) -> Result<PendingConfirm, PublishError> {
        let (ch, generation) = self.channel().await?;
        let publish = ch.basic_publish(
            msg.exchange.as_str().into(),
            msg.routing_key.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            msg.body.as_bytes(),
            crate::envelope::properties(msg, &self.user, trace),
        );
        // Bounded like the confirm: a connection the broker blocks (an alarm) or that died
        // without a word must not hold the caller forever.
        let sent = match tokio::time::timeout(SEND_TIMEOUT, publish).await {
            Ok(sent) => sent.map_err(channel_failed),
            Err(_) => {
                let why = format!("the publish was not taken within {} s", SEND_TIMEOUT.as_secs());
                self.broker.abandon(generation, &why).await;
                Err(PublishError::channel(why))
            }
        };
        match sent {
            Ok(confirm) => Ok(PendingConfirm { confirm, on: Some((self.broker.clone(), generation)) }),
            Err(e) => {
                // Next publish starts on a fresh channel.
                self.chan.lock().await.take();
                Err(e)
            }
        }
    }

    /// Publish and wait for the broker's confirm.
    pub async fn publish_confirmed(&self, msg: &Outgoing) -> Result<(), PublishError> {
        let result = self.publish(msg).await?.wait().await;
        if matches!(result, Err(PublishError::Channel(_) | PublishError::Nacked)) {
            self.forget_channel().await;
        }
        result
    }

    /// Drop the channel in use, so that the next publish opens a fresh one (after a confirm
    /// that never came, or a nack, the old channel cannot be trusted).
    pub async fn forget_channel(&self) {
        self.chan.lock().await.take();
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The broker user this publisher sends as (every message's `user_id`).
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl Publisher {
    /// Publish a copy of a delivery to the dead-letter exchange, with the reason in a header,
    /// and wait for the confirm. The copy is this component's publish: its `user_id` is this
    /// publisher's user (the broker would refuse the sender's), the sender's is kept in a header.
    pub(crate) async fn dead_letter(
        &self,
        queue: &str,
        properties: &lapin::BasicProperties,
        body: &[u8],
        reason: &str,
    ) -> Result<(), PublishError> {
        use lapin::types::AMQPValue;
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(crate::headers::DEAD_REASON.into(), AMQPValue::LongString(reason.into()));
        headers.insert(crate::headers::DEAD_QUEUE.into(), AMQPValue::LongString(queue.into()));
        if let Some(sender) = properties.user_id() {
            headers.insert(crate::headers::DEAD_USER.into(), AMQPValue::LongString(sender.as_str().into()));
        }
        let props = properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_user_id(self.user.as_ref().into());
        let dlq = crate::topology::dead_letter_queue(queue);
        let (ch, _) = self.channel().await?;
        let confirm = ch
            .basic_publish(
                crate::topology::DLX.into(),
                dlq.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                props,
            )
            .await
            .map_err(channel_failed)?;
        PendingConfirm::from(confirm).wait().await
    }
}

/// The outbox relay publishes through this: confirms in a window, and a fresh channel after a
/// failure or a new connection.
impl baton_store::relay::Publish for Publisher {
    type Confirm = futures_util::future::BoxFuture<'static, Result<(), PublishError>>;

    async fn publish(&self, msg: &Outgoing) -> Result<Self::Confirm, PublishError> {
        Ok(Box::pin(Publisher::publish(self, msg).await?.wait()))
    }

    fn connected(&self) -> bool {
        self.broker.connected()
    }

    fn replaced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.broker.generation()
    }

    async fn forget_channel(&self) {
        Publisher::forget_channel(self).await
    }

    fn before_delete(&self) {
        baton_crash::crash_point!(baton_crash::AFTER_PUBLISH_BEFORE_DELETE);
    }
}
