//! The envelope of the design, built in exactly one place ([`properties`], from an [`Outgoing`]
//! message) and checked in exactly one place ([`Envelope::from_delivery`]); a body is decoded in
//! one place too ([`Envelope::decode`]). Who sent it is judged in one place as well,
//! [`crate::Identity::expect`], from the `user_id` set here.

use std::time::{SystemTime, UNIX_EPOCH};

use baton_protocol::{Body, MAX_BODY_BYTES, SCHEMA};
pub use baton_protocol::{Outgoing, TraceParent};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use uuid::Uuid;

use crate::HandleError;

/// Header names Baton sets.
pub mod headers {
    pub const TRACEPARENT: &str = "traceparent";
    pub const MODE: &str = "x-baton-mode";
    pub const ATTEMPT: &str = "x-baton-attempt";
    /// Why a message was dead-lettered: one sentence.
    pub const DEAD_REASON: &str = "x-baton-dead-reason";
    /// The queue it was dead-lettered from.
    pub const DEAD_QUEUE: &str = "x-baton-dead-queue";
    /// The broker user that sent it (its `user_id`): the dead copy is published by the
    /// component that dead-lettered it, under that component's own user.
    pub const DEAD_USER: &str = "x-baton-dead-user-id";
}

/// The AMQP properties of the design for `msg`, sent as broker user `user`: persistent, JSON,
/// ids, sender (`app_id`, and `user_id`, which the broker checks against the connection's user),
/// time, and `trace`: the hop of the publish, whose parent is the message's own `traceparent`.
pub(crate) fn properties(msg: &Outgoing, user: &str, trace: &TraceParent) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(headers::TRACEPARENT.into(), AMQPValue::LongString(trace.0.as_str().into()));
    h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(msg.attempt)));
    if let Some(mode) = &msg.mode {
        h.insert(headers::MODE.into(), AMQPValue::LongString(mode.as_str().into()));
    }
    let mut p = BasicProperties::default()
        .with_message_id(msg.message_id.to_string().into())
        .with_correlation_id(msg.correlation_id.to_string().into())
        .with_type(msg.kind.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(
            msg.created_at_ms
                .and_then(|ms| u64::try_from(ms / 1000).ok())
                .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
        )
        .with_app_id(msg.app_id.as_str().into())
        .with_user_id(user.into())
        .with_headers(h);
    if let Some(r) = &msg.reply_to {
        p = p.with_reply_to(r.as_str().into());
    }
    p
}

/// A delivery whose envelope passed the checks; the body is not parsed yet (handlers parse it
/// into the type its `kind` names, and a failure there is a dead-letter too).
#[derive(Debug, Clone)]
pub struct Envelope {
    pub message_id: Uuid,
    pub correlation_id: Option<Uuid>,
    pub kind: String,
    pub app_id: Option<String>,
    /// The broker user that published it, checked by the broker ([`crate::Identity`]).
    pub user_id: Option<String>,
    pub reply_to: Option<String>,
    pub mode: Option<String>,
    pub attempt: u32,
    pub traceparent: TraceParent,
    pub redelivered: bool,
    pub body: Vec<u8>,
}

fn short(v: &Option<ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_owned()).filter(|s| !s.is_empty())
}

fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref().and_then(|h| h.inner().get(name))
}

fn header_string(p: &BasicProperties, name: &str) -> Option<String> {
    match header(p, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_int(p: &BasicProperties, name: &str) -> Option<i64> {
    match header(p, name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

impl Envelope {
    /// Check the envelope of a delivery. The error is the one sentence that goes into the
    /// dead-letter header.
    pub fn from_delivery(
        properties: &BasicProperties,
        data: &[u8],
        redelivered: bool,
    ) -> Result<Envelope, String> {
        if data.len() > MAX_BODY_BYTES {
            return Err(format!("body of {} bytes is over the limit of {MAX_BODY_BYTES} bytes", data.len()));
        }
        let message_id = short(properties.message_id())
            .ok_or("message has no message_id; every Baton message carries a UUID message_id")?;
        let message_id =
            Uuid::parse_str(&message_id).map_err(|_| format!("message_id `{message_id}` is not a UUID"))?;
        let kind =
            short(properties.kind()).ok_or("message has no type property; expected e.g. records.create")?;
        if let Some(ct) = short(properties.content_type())
            && ct != "application/json"
        {
            return Err(format!("content_type `{ct}` is not application/json"));
        }
        let correlation_id = match short(properties.correlation_id()) {
            Some(c) => Some(Uuid::parse_str(&c).map_err(|_| format!("correlation_id `{c}` is not a UUID"))?),
            None => None,
        };
        let traceparent = header_string(properties, headers::TRACEPARENT)
            .map(TraceParent)
            .unwrap_or_else(TraceParent::new_root);
        let attempt =
            header_int(properties, headers::ATTEMPT).unwrap_or(1).clamp(1, i64::from(u32::MAX)) as u32;
        Ok(Envelope {
            message_id,
            correlation_id,
            kind,
            app_id: short(properties.app_id()),
            user_id: short(properties.user_id()),
            reply_to: short(properties.reply_to()),
            mode: header_string(properties, headers::MODE),
            attempt,
            traceparent,
            redelivered,
            body: data.to_vec(),
        })
    }

    /// Parse the body as `T`; the error is the dead-letter reason.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, BadBody> {
        serde_json::from_slice(&self.body).map_err(|source| BadBody { kind: self.kind.clone(), source })
    }

    /// The body of a message taken from `queue`, which takes the message types `kinds`: its type
    /// checked, its JSON parsed, its schema checked. Every handler starts here; a message that
    /// fails is dead-lettered with the reason.
    pub fn decode<T: Body>(&self, queue: &str, kinds: &[impl AsRef<str>]) -> Result<T, HandleError> {
        if !kinds.iter().any(|k| k.as_ref() == self.kind) {
            return Err(HandleError::reject(format!(
                "unknown message type `{}` on {queue}; it takes {}",
                self.kind,
                listed(kinds)
            )));
        }
        let body: T = self.json().map_err(HandleError::reject)?;
        if body.schema() != SCHEMA {
            return Err(HandleError::reject(format!(
                "schema {} of a `{}` message is not supported; Baton reads schema {SCHEMA}",
                body.schema(),
                self.kind
            )));
        }
        Ok(body)
    }
}

/// A body that is not the JSON its message type names: bad input, dead-lettered with this
/// reason.
#[derive(Debug, thiserror::Error)]
#[error("body of a `{kind}` message is not valid: {source}")]
pub struct BadBody {
    pub kind: String,
    #[source]
    pub source: serde_json::Error,
}

/// `a`, `a and b`, `a, b and c`.
fn listed(items: &[impl AsRef<str>]) -> String {
    joined(items, "and")
}

/// `a`, `a or b`, `a, b or c`.
pub(crate) fn listed_or(items: &[impl AsRef<str>]) -> String {
    joined(items, "or")
}

fn joined(items: &[impl AsRef<str>], word: &str) -> String {
    match items {
        [] => "nothing".into(),
        [one] => one.as_ref().to_owned(),
        [init @ .., last] => {
            let init: Vec<&str> = init.iter().map(AsRef::as_ref).collect();
            format!("{} {word} {}", init.join(", "), last.as_ref())
        }
    }
}

/// Read the dead-letter reason of a message, for `baton dlq` and tests.
pub fn dead_reason(properties: &BasicProperties) -> Option<String> {
    header_string(properties, headers::DEAD_REASON)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out() -> Outgoing {
        Outgoing::new(
            "baton.commands",
            "records",
            "records.create",
            Uuid::new_v4(),
            "orchestrator",
            TraceParent::new_root(),
            &serde_json::json!({"schema": 1}),
        )
        .reply_to("orchestrator.main")
        .mode("workflow")
        .attempt(2)
    }

    #[test]
    fn properties_round_trip_through_the_checks() {
        let o = out();
        let env = Envelope::from_delivery(
            &properties(&o, "baton-orchestrator", &o.traceparent),
            o.body.as_bytes(),
            false,
        )
        .unwrap();
        assert_eq!(env.message_id, o.message_id);
        assert_eq!(env.correlation_id, Some(o.correlation_id));
        assert_eq!(env.kind, "records.create");
        assert_eq!(env.reply_to.as_deref(), Some("orchestrator.main"));
        assert_eq!(env.mode.as_deref(), Some("workflow"));
        assert_eq!(env.attempt, 2);
        assert_eq!(env.traceparent, o.traceparent);
        assert_eq!(env.user_id.as_deref(), Some("baton-orchestrator"), "the sender's broker user");
        assert_eq!(
            *properties(&o, "baton-orchestrator", &o.traceparent).delivery_mode(),
            Some(2),
            "persistent"
        );
    }

    #[test]
    fn bad_envelopes_are_named() {
        let o = out();
        let no_id = properties(&o, "baton-orchestrator", &o.traceparent).with_message_id("".into());
        assert!(Envelope::from_delivery(&no_id, b"{}", false).unwrap_err().contains("no message_id"));
        let bad_id = properties(&o, "baton-orchestrator", &o.traceparent).with_message_id("abc".into());
        assert!(Envelope::from_delivery(&bad_id, b"{}", false).unwrap_err().contains("not a UUID"));
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(
            Envelope::from_delivery(&properties(&o, "baton-orchestrator", &o.traceparent), &big, false)
                .unwrap_err()
                .contains("over the limit")
        );
        let xml = properties(&o, "baton-orchestrator", &o.traceparent).with_content_type("text/xml".into());
        assert!(Envelope::from_delivery(&xml, b"{}", false).unwrap_err().contains("text/xml"));
    }

    #[test]
    fn decode_checks_the_type_the_json_and_the_schema() {
        use baton_protocol::RetrySaga;
        let o = out();
        let decode = |kind: &str, body: &str| {
            let p = properties(&o, "baton-orchestrator", &o.traceparent).with_type(kind.into());
            let env = Envelope::from_delivery(&p, body.as_bytes(), false).unwrap();
            env.decode::<RetrySaga>("q", &["a.retry", "b.retry", "c.retry"]).map_err(|e| e.to_string())
        };
        let id = Uuid::from_u128(7);
        let good = format!(r#"{{"schema":1,"saga_id":"{id}"}}"#);
        assert_eq!(decode("b.retry", &good).unwrap().saga_id, id);
        assert_eq!(
            decode("d.retry", &good).unwrap_err(),
            "unknown message type `d.retry` on q; it takes a.retry, b.retry and c.retry"
        );
        assert!(decode("a.retry", "{}").unwrap_err().contains("body of a `a.retry` message is not valid"));
        let future = format!(r#"{{"schema":2,"saga_id":"{id}"}}"#);
        assert_eq!(
            decode("a.retry", &future).unwrap_err(),
            "schema 2 of a `a.retry` message is not supported; Baton reads schema 1"
        );
    }
}
