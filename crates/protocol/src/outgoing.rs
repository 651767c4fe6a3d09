//! A message on its way out, as data: what an outbox row holds until the relay publishes it.
//! Building its AMQP properties from it is `baton-amqp`'s business; storing it is
//! `baton-store`'s; neither needs the other for it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use uuid::Uuid;

/// A W3C `traceparent`: the trace of the client request and the id of the current hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceParent(pub String);

impl TraceParent {
    /// The version-00 `traceparent` of a trace, a hop and its flags, written digit by digit: a
    /// hop writes several, and `format!` of the ids' hex took 2 % of a saga's instructions.
    pub fn new(trace: [u8; 16], span: [u8; 8], flags: u8) -> Self {
        let mut text = [b'-'; 55];
        text[..2].copy_from_slice(b"00");
        hex::encode_to_slice(trace, &mut text[3..35]).expect("32 digits for 16 bytes");
        hex::encode_to_slice(span, &mut text[36..52]).expect("16 digits for 8 bytes");
        hex::encode_to_slice([flags], &mut text[53..]).expect("2 digits for a byte");
        TraceParent(String::from_utf8(text.to_vec()).expect("hex digits and dashes are ASCII"))
    }

    /// A new trace, for a request that starts here.
    pub fn new_root() -> Self {
        TraceParent::new(Uuid::new_v4().into_bytes(), new_span(), 1)
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

/// A random hop id.
fn new_span() -> [u8; 8] {
    let mut span = [0; 8];
    span.copy_from_slice(&Uuid::new_v4().as_bytes()[..8]);
    span
}

/// A message body as JSON text, kept as it was written. Stored with its message (an outbox row,
/// the inbox's replies) it is embedded as JSON, not escaped into a string: escaping it there
/// cost 2.6 % of a saga's instructions.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Json(Box<RawValue>);

impl Json {
    /// `value` serialised.
    pub fn of(value: &impl Serialize) -> Self {
        Json(serde_json::value::to_raw_value(value).expect("message bodies serialise"))
    }

    /// `text`, once checked to be JSON.
    pub fn parse(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Json)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Json {}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message on its way out: everything needed to publish it, serialisable so that it can wait in
/// an outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Stored")]
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
    /// The body, already serialised; stored under `json` (before, under `body` as a string).
    #[serde(rename = "json")]
    pub body: Json,
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
            body: Json::of(body),
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

/// An [`Outgoing`] as stored: rows written before bodies were embedded as JSON hold the body
/// as a string under `body`, and are read as they were meant.
#[derive(Deserialize)]
struct Stored {
    exchange: String,
    routing_key: String,
    kind: String,
    message_id: Uuid,
    correlation_id: Uuid,
    app_id: String,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    attempt: u32,
    traceparent: TraceParent,
    #[serde(default)]
    json: Option<Json>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    created_at_ms: Option<i64>,
}

impl TryFrom<Stored> for Outgoing {
    type Error = String;

    fn try_from(s: Stored) -> Result<Self, String> {
        let body = match (s.json, s.body) {
            (Some(json), _) => json,
            (None, Some(text)) => {
                Json::parse(text).map_err(|e| format!("the stored body is not JSON: {e}"))?
            }
            (None, None) => return Err("a stored message without a body (`json`)".into()),
        };
        Ok(Outgoing {
            exchange: s.exchange,
            routing_key: s.routing_key,
            kind: s.kind,
            message_id: s.message_id,
            correlation_id: s.correlation_id,
            app_id: s.app_id,
            reply_to: s.reply_to,
            mode: s.mode,
            attempt: s.attempt,
            traceparent: s.traceparent,
            body,
            created_at_ms: s.created_at_ms,
        })
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
        assert!(root.0.starts_with("00-") && root.0.ends_with("-01") && root.0.len() == 55);
    }

    #[test]
    fn a_traceparent_is_written_from_its_ids_in_lowercase_hex() {
        let trace = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128.to_be_bytes();
        let span = 0x00f0_67aa_0ba9_02b7_u64.to_be_bytes();
        assert_eq!(
            TraceParent::new(trace, span, 1).0,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            TraceParent::new([0xff; 16], [0; 8], 0x80).0,
            format!("00-{}-{}-80", "f".repeat(32), "0".repeat(16))
        );
    }

    fn message() -> Outgoing {
        Outgoing::new(
            "baton.commands",
            "records",
            "records.create",
            Uuid::from_u128(1),
            "orchestrator",
            TraceParent::new_root(),
            &serde_json::json!({"schema": 1, "name": "a \"quoted\" name"}),
        )
    }

    #[test]
    fn a_stored_message_embeds_its_body_as_json_and_reads_back_the_same() {
        let msg = message();
        let stored = serde_json::to_string(&msg).unwrap();
        assert!(stored.contains(r#""json":{"name":"a \"quoted\" name","schema":1}"#), "{stored}");
        assert_eq!(serde_json::from_str::<Outgoing>(&stored).unwrap(), msg);
        assert_eq!(serde_json::from_str::<Vec<Outgoing>>(&format!("[{stored}]")).unwrap(), vec![msg]);
    }

    #[test]
    fn a_row_stored_with_its_body_as_a_string_reads_as_before() {
        let msg = message();
        let mut old = serde_json::to_value(&msg).unwrap();
        let body = old.as_object_mut().unwrap().remove("json").unwrap();
        old["body"] = serde_json::Value::String(body.to_string());
        let read: Outgoing = serde_json::from_str(&old.to_string()).unwrap();
        assert_eq!(read, msg);

        old["body"] = "not json".into();
        let err = serde_json::from_str::<Outgoing>(&old.to_string()).unwrap_err().to_string();
        assert!(err.contains("the stored body is not JSON"), "{err}");
        old.as_object_mut().unwrap().remove("body");
        let err = serde_json::from_str::<Outgoing>(&old.to_string()).unwrap_err().to_string();
        assert!(err.contains("without a body"), "{err}");
    }
}
