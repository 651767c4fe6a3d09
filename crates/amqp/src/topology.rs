//! The names and the declarations of the design's topology. Every component declares all of it
//! at start-up (declarations are idempotent), so a publish is routable whichever component
//! started first.
//!
//! One exchange more than the design's four: [`OUTCOMES`], where the orchestrator answers the
//! gateway. Write permission is per exchange, so keeping the outcomes off [`REPLIES`] (where
//! every service may publish) lets the broker refuse a service that would forge an outcome.

use baton_protocol::Service;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::AmqpError;

pub const COMMANDS: &str = "baton.commands";
pub const REPLIES: &str = "baton.replies";
/// The orchestrator's answers to the gateway (`orchestrator.start.reply`), routing key = the
/// gateway instance's `reply_to`. Only the orchestrator's broker user may publish here.
pub const OUTCOMES: &str = "baton.outcomes";
pub const EVENTS: &str = "baton.events";
pub const DLX: &str = "baton.dlx";

/// Deliveries of one message before the quorum queue dead-letters it (a handler that keeps
/// failing on it, or a consumer that keeps crashing).
pub const DELIVERY_LIMIT: i64 = 5;

/// Routing key of the orchestrator's command queue on [`COMMANDS`].
pub const ORCHESTRATOR: &str = "orchestrator";

/// The gateway's component name, the first part of its queues' names.
pub const GATEWAY: &str = "gateway";

/// `<service>.commands`
pub fn command_queue(service: &str) -> String {
    format!("{service}.commands")
}

/// `<service>.events`
pub fn event_queue(service: &str) -> String {
    format!("{service}.events")
}

/// The routing key of one instance of a component: `gateway.main` (its outcomes, on [`OUTCOMES`]).
pub fn reply_key(component: &str, instance: &str) -> String {
    format!("{component}.{instance}")
}

/// `orchestrator.replies`: the one queue where the replies to every orchestrator instance's
/// commands come, consumed by all instances at once, since any instance can continue any saga
/// (they share the store).
pub const ORCHESTRATOR_REPLIES: &str = "orchestrator.replies";

/// `<queue>.dlq`, both the dead-letter queue's name and its routing key on [`DLX`].
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// A work queue and where it is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub exchange: &'static str,
    pub keys: Vec<String>,
}

/// The work queues every deployment has, whatever its mode: per service a command queue and an
/// event queue (bound to the event it reacts to), and the orchestrator's command queue.
pub fn shared_queues() -> Vec<QueueSpec> {
    let mut qs: Vec<QueueSpec> = Service::ALL
        .iter()
        .map(|s| QueueSpec { name: command_queue(s.name()), exchange: COMMANDS, keys: vec![s.name().into()] })
        .collect();
    qs.push(QueueSpec {
        name: command_queue(ORCHESTRATOR),
        exchange: COMMANDS,
        keys: vec![ORCHESTRATOR.into()],
    });
    qs.extend(Service::ALL.iter().map(|s| QueueSpec {
        name: event_queue(s.name()),
        exchange: EVENTS,
        keys: vec![s.trigger_event().into()],
    }));
    qs
}

/// The queue where one gateway instance hears how spaces ended, in events mode.
pub fn gateway_event_queue(instance: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{GATEWAY}.{instance}.events"),
        exchange: EVENTS,
        keys: vec![baton_protocol::events::READY.into(), baton_protocol::events::REJECTED.into()],
    }
}

/// `gateway.main.outcomes`
pub fn outcome_queue(instance: &str) -> String {
    format!("{GATEWAY}.{instance}.outcomes")
}

/// The queue where one gateway instance hears how its sagas ended (workflow mode): bound to
/// [`OUTCOMES`] with the key the gateway puts in `reply_to`, `gateway.<instance>`.
pub fn gateway_outcome_queue(instance: &str) -> QueueSpec {
    QueueSpec { name: outcome_queue(instance), exchange: OUTCOMES, keys: vec![reply_key(GATEWAY, instance)] }
}

/// The orchestrators' shared reply queue, bound to [`REPLIES`] with the key the orchestrator
/// puts in its commands' `reply_to`: `orchestrator`.
pub fn orchestrator_reply_queue() -> QueueSpec {
    QueueSpec { name: ORCHESTRATOR_REPLIES.into(), exchange: REPLIES, keys: vec![ORCHESTRATOR.into()] }
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Declare the five exchanges.
pub async fn declare_exchanges(ch: &Channel) -> Result<(), AmqpError> {
    for (name, kind) in [
        (COMMANDS, ExchangeKind::Direct),
        (REPLIES, ExchangeKind::Direct),
        (OUTCOMES, ExchangeKind::Direct),
        (EVENTS, ExchangeKind::Topic),
        (DLX, ExchangeKind::Direct),
    ] {
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|source| AmqpError::Declare { what: format!("exchange {name}"), source })?;
    }
    Ok(())
}

/// Declare a durable quorum work queue with its dead-letter queue, and bind both.
///
/// On a cluster each quorum queue is replicated on three nodes (a majority of them must be up
/// for it to take and give messages). The group size is the broker's (`quorum_cluster_size` in
/// `broker/cluster.advanced.config`), not an `x-quorum-initial-group-size` argument here:
/// RabbitMQ compares that argument when a queue is declared again, so adding it would make every
/// queue declared without it refuse every component's start (PRECONDITION_FAILED), and no
/// policy can set a group size, which is fixed at declaration.
pub async fn declare_work_queue(ch: &Channel, spec: &QueueSpec) -> Result<(), AmqpError> {
    let dlq = dead_letter_queue(&spec.name);
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let err = |what: String| move |source| AmqpError::Declare { what, source };
    ch.queue_declare(
        dlq.as_str().into(),
        durable,
        table(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]),
    )
    .await
    .map_err(err(format!("queue {dlq}")))?;
    ch.queue_bind(
        dlq.as_str().into(),
        DLX.into(),
        dlq.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(err(format!("binding of {dlq}")))?;
    let args = table(&[
        ("x-queue-type", AMQPValue::LongString("quorum".into())),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", AMQPValue::LongString(DLX.into())),
        ("x-dead-letter-routing-key", AMQPValue::LongString(dlq.as_str().into())),
    ]);
    ch.queue_declare(spec.name.as_str().into(), durable, args)
        .await
        .map_err(err(format!("queue {}", spec.name)))?;
    for key in &spec.keys {
        ch.queue_bind(
            spec.name.as_str().into(),
            spec.exchange.into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err(format!("binding of {} to {} with key {key}", spec.name, spec.exchange)))?;
    }
    Ok(())
}

/// Every work queue of a deployment whose gateway runs as `instance`.
pub fn all_queues(instance: &str) -> Vec<QueueSpec> {
    let mut qs = shared_queues();
    qs.push(orchestrator_reply_queue());
    qs.push(gateway_outcome_queue(instance));
    qs.push(gateway_event_queue(instance));
    qs
}

/// A reply queue for a short-lived tool (`baton reconcile`): exclusive to its connection and
/// deleted with it, bound to [`REPLIES`] with `key`.
pub async fn declare_private_reply_queue(ch: &Channel, name: &str, key: &str) -> Result<(), AmqpError> {
    let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    ch.queue_declare(name.into(), opts, FieldTable::default())
        .await
        .map_err(|source| AmqpError::Declare { what: format!("queue {name}"), source })?;
    ch.queue_bind(
        name.into(),
        REPLIES.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|source| AmqpError::Declare { what: format!("binding of {name}"), source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_well() {
        assert_eq!(command_queue("records"), "records.commands");
        assert_eq!(orchestrator_reply_queue().name, "orchestrator.replies");
        assert_eq!(orchestrator_reply_queue().keys, ["orchestrator"]);
        assert_eq!(reply_key("gateway", "main"), "gateway.main");
        assert_eq!(gateway_outcome_queue("main").name, "gateway.main.outcomes");
        assert_eq!(gateway_outcome_queue("main").exchange, OUTCOMES);
        assert_eq!(gateway_outcome_queue("main").keys, ["gateway.main"]);
        // Nothing of the gateway's is bound to baton.replies any more: outcomes are not replies.
        assert!(
            all_queues("main").iter().all(|q| !(q.exchange == REPLIES && q.name.starts_with("gateway.")))
        );
        assert_eq!(dead_letter_queue("records.commands"), "records.commands.dlq");
        let names: Vec<String> = shared_queues().into_iter().map(|q| q.name).collect();
        assert_eq!(
            names,
            [
                "records.commands",
                "placement.commands",
                "entitlements.commands",
                "routing.commands",
                "notifier.commands",
                "orchestrator.commands",
                "records.events",
                "placement.events",
                "entitlements.events",
                "routing.events",
                "notifier.events"
            ]
        );
    }
}
