//! Dead-letter queues for people: what is in them and why (`baton dlq list`), and putting
//! messages back on their queue once the cause is fixed (`baton dlq replay`).

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::topology::{self, QueueSpec};
use crate::{AmqpError, Broker, PendingConfirm, headers};

/// Header counting how often a message was replayed from its dead-letter queue.
pub const REPLAYED: &str = "x-baton-replayed";

/// One dead message, as `baton dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadMessage {
    pub message_id: Option<String>,
    pub kind: Option<String>,
    /// Who sent it, as the message says.
    pub app_id: Option<String>,
    /// Baton's own sentence, or the broker's reason (`delivery_limit`, `rejected`, ...).
    pub reason: String,
    pub body_preview: String,
}

/// A dead-letter queue and a look at its first messages.
#[derive(Debug, Clone, Serialize)]
pub struct DeadQueue {
    pub queue: String,
    pub count: u32,
    pub first: Vec<DeadMessage>,
}

fn reason(props: &lapin::BasicProperties) -> String {
    if let Some(r) = crate::envelope::dead_reason(props) {
        return r;
    }
    // Dead-lettered by the broker itself: its reason is in the first x-death entry.
    let death = props.headers().as_ref().and_then(|h| h.inner().get("x-death").cloned());
    if let Some(AMQPValue::FieldArray(a)) = death
        && let Some(AMQPValue::FieldTable(t)) = a.as_slice().first()
    {
        let field = |k: &str| match t.inner().get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
            Some(AMQPValue::LongLongInt(n)) => n.to_string(),
            _ => String::new(),
        };
        return format!(
            "dead-lettered by the broker: {} (from {}, {} time(s))",
            field("reason"),
            field("queue"),
            field("count")
        );
    }
    "no reason recorded".into()
}

/// The dead-letter queues of `queues` with their counts and up to `peek` messages each (looked
/// at, not taken: they go back to their queue, in order, when the channel closes).
pub async fn list(broker: &Broker, queues: &[QueueSpec], peek: u16) -> Result<Vec<DeadQueue>, AmqpError> {
    let mut out = Vec::new();
    for q in queues {
        let dlq = topology::dead_letter_queue(&q.name);
        let ch = broker.channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let Ok(info) = ch.queue_declare(dlq.as_str().into(), passive, FieldTable::default()).await else {
            continue; // not declared in this vhost
        };
        let mut first = Vec::new();
        for _ in 0..peek.min(info.message_count().min(u32::from(u16::MAX)) as u16) {
            let Some(m) = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
                break;
            };
            let p = &m.delivery.properties;
            let body = String::from_utf8_lossy(&m.delivery.data);
            first.push(DeadMessage {
                message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
                kind: p.kind().as_ref().map(|s| s.as_str().to_owned()),
                app_id: p.app_id().as_ref().map(|s| s.as_str().to_owned()),
                reason: reason(p),
                body_preview: body.chars().take(120).collect(),
            });
        }
        let _ = ch.close(200, "looked".into()).await;
        out.push(DeadQueue { queue: dlq, count: info.message_count(), first });
    }
    Ok(out)
}

/// Move up to `max` messages from `<queue>.dlq` back to `queue`, each confirmed before its
/// dead copy is acked. The dead-letter headers go; a replay counter comes. Returns how many.
///
/// A replayed message is the replaying user's publish (its `user_id`, which the broker checks):
/// under one user per component, a reply, start or outcome replayed by an operator is not its
/// component's, and its consumer dead-letters it again ([`crate::Identity`]).
pub async fn replay(broker: &Broker, queue: &str, max: usize) -> Result<usize, AmqpError> {
    let dlq = topology::dead_letter_queue(queue);
    let user = crate::identity::broker_user(broker.url());
    let ch = broker.channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut moved = 0;
    while moved < max {
        let Some(m) = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
            break;
        };
        let props = &m.delivery.properties;
        let mut h = FieldTable::default();
        let mut replays = 0i64;
        if let Some(old) = props.headers() {
            for (k, v) in old.inner() {
                match k.as_str() {
                    headers::DEAD_REASON
                    | headers::DEAD_QUEUE
                    | headers::DEAD_USER
                    | "x-death"
                    | "x-first-death-exchange"
                    | "x-first-death-queue"
                    | "x-first-death-reason"
                    | "x-delivery-count" => {}
                    REPLAYED => replays = if let AMQPValue::LongLongInt(n) = v { *n } else { 0 },
                    _ => {
                        h.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        h.insert(REPLAYED.into(), AMQPValue::LongLongInt(replays + 1));
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &m.delivery.data,
                props.clone().with_headers(h).with_user_id(user.as_str().into()),
            )
            .await?;
        PendingConfirm::from(confirm)
            .wait()
            .await
            .map_err(|e| AmqpError::Replay { queue: queue.to_owned(), cause: e })?;
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = ch.close(200, "replayed".into()).await;
    Ok(moved)
}
