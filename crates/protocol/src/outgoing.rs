//! A message on its way out, as data: what an outbox row holds until the relay publishes it.
//! Building its AMQP properties from it is `baton-amqp`'s business; storing it is
//! `baton-store`'s; neither needs the other for it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A W3C `traceparent`: the trace of the client request and the id of the current hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceParent(pub String);

impl TraceParent {
    /// A new trace, for a request that starts here.
    pub fn new_root() -> Self {
        let trace = Uuid::new_v4().simple().to_string();
        let span = &Uuid::new_v4().simple().to_string()[..16];
        TraceParent(format!("00-{trace}-{span}-01"))
    }

    /// The same trace, a new hop.
    pub fn child(&self) -> Self {
        let parts: Vec<&str> = self.0.split('-').collect();
        match parts.as_slice() {
            [v, trace, _, flags] if trace.len() == 32 => {
                let span = &Uuid::new_v4().simple().to_string()[..16];
                TraceParent(format!("{v}-{trace}-{span}-{flags}"))
            }
            _ => TraceParent::new_root(),
        }
    }

    /// The trace id, for logs.
    pub fn trace_id(&self) -> &str {
        self.0.split('-').nth(1).unwrap_or("")
    }
}

/// A message on its way out: everything needed to publish it, serialisable so that it can wait in
/// an outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    /// The AMQP `type` property: `records.create`, `space.created`, ...
    pub kind: String,
    pub message_id: Uuid,
    pub correlation_id: Uuid,
    pub app_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub attempt: u32,
    pub traceparent: TraceParent,
    /// The JSON body, already serialised.
    pub body: String,
    /// When the message was committed to its outbox (ms since the epoch): its AMQP
    /// `timestamp`, which a republish keeps, so that a receiver can tell its true age against
    /// the retention. `None` for one published without an outbox (stamped when published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at_ms: Option<i64>,
}

impl Outgoing {
    /// A message with a fresh id and the body serialised from `body`.
    pub fn new(
        exchange: &str,
        routing_key: &str,
        kind: &str,
        correlation_id: Uuid,
        app_id: &str,
        traceparent: TraceParent,
        body: &impl Serialize,
    ) -> Self {
        Outgoing {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            kind: kind.into(),
            message_id: Uuid::new_v4(),
            correlation_id,
            app_id: app_id.into(),
            reply_to: None,
            mode: None,
            attempt: 1,
            traceparent,
            body: serde_json::to_string(body).expect("message bodies serialise"),
            created_at_ms: None,
        }
    }

    pub fn reply_to(mut self, reply_to: impl Into<String>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }

    pub fn mode(mut self, mode: impl Into<String>) -> Self {
        self.mode = Some(mode.into());
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_child_keeps_the_trace() {
        let root = TraceParent::new_root();
        let child = root.child();
        assert_eq!(root.trace_id(), child.trace_id());
        assert_ne!(root, child);
        assert_eq!(child.0.len(), 55);
    }
}
