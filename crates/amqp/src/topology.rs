//! The names and the declarations of the design's topology. At start-up every component
//! declares and binds its own queues, and makes sure the rest exists ([`declare`]): the
//! exchanges and the other components' queues are checked with passive declarations, which need
//! no permission, and created only where missing. So a publish is routable whichever component
//! started first, and under one broker user per component (`broker/permissions.json`) none may
//! declare, bind or delete another's queue: there the operator's import
//! (`broker/definitions.json`) has made them.
//!
//! One exchange more than the design's four: [`OUTCOMES`], where the orchestrator answers the
//! gateway. Write permission is per exchange, so keeping the outcomes off [`REPLIES`] (where
//! every service may publish) lets the broker refuse a service that would forge an outcome.

use baton_protocol::Service;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

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

/// The kind of every work queue and dead-letter queue of a deployment (`--queue-type`): every
/// component must declare the same, or the broker refuses the second kind (PRECONDITION_FAILED).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Replicated (Raft) queues with a delivery limit: the default.
    #[default]
    Quorum,
    /// Classic durable queues: one node's, cheaper per message, with dead-lettering of rejected
    /// messages but no delivery limit, so a message whose handler keeps failing (or keeps
    /// crashing its consumer) is redelivered for ever instead of dead-lettered after
    /// [`DELIVERY_LIMIT`] deliveries; and on a cluster, not replicated.
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<QueueType, String> {
        match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!("`{other}` is no queue type; give quorum or classic")),
        }
    }
}

/// The arguments of a work queue of `kind` whose dead letters go to `dlq` on [`DLX`].
pub fn work_queue_args(kind: QueueType, dlq: &str) -> FieldTable {
    let mut args = vec![
        ("x-queue-type", AMQPValue::LongString(kind.as_str().into())),
        ("x-dead-letter-exchange", AMQPValue::LongString(DLX.into())),
        ("x-dead-letter-routing-key", AMQPValue::LongString(dlq.into())),
    ];
    if kind == QueueType::Quorum {
        args.push(("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)));
    }
    table(&args)
}

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

/// The routing key of an event the orchestrator announces in hybrid mode: `hybrid.<event>`.
/// Its message type stays `<event>`, but its key is its own, so that it never reaches the
/// queues of events mode (`placement.events` is bound to `space.created`, and exists whatever
/// the mode).
pub fn announce_key(event: &str) -> String {
    format!("hybrid.{event}")
}

/// `<service>.followups`: in hybrid mode, where a follow-up ([`Service::FOLLOW_UPS`]) hears
/// the orchestrator's `space.created`. Declared in hybrid mode only, since in events mode
/// `space.created` means the record alone exists.
pub fn followup_queue(service: &str) -> QueueSpec {
    QueueSpec {
        name: format!("{service}.followups"),
        exchange: EVENTS,
        keys: vec![announce_key(baton_protocol::events::CREATED)],
    }
}

/// The follow-ups' queues of a hybrid deployment.
pub fn followup_queues() -> Vec<QueueSpec> {
    Service::FOLLOW_UPS.iter().map(|s| followup_queue(s.name())).collect()
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

/// The five exchanges and their kinds.
const EXCHANGES: [(&str, ExchangeKind); 5] = [
    (COMMANDS, ExchangeKind::Direct),
    (REPLIES, ExchangeKind::Direct),
    (OUTCOMES, ExchangeKind::Direct),
    (EVENTS, ExchangeKind::Topic),
    (DLX, ExchangeKind::Direct),
];

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), AmqpError> {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .map_err(|source| AmqpError::Declare { what: format!("exchange {name}"), source })
}

/// Declare the five exchanges.
pub async fn declare_exchanges(ch: &Channel) -> Result<(), AmqpError> {
    for (name, kind) in EXCHANGES {
        declare_exchange(ch, name, kind).await?;
    }
    Ok(())
}

/// The component a queue belongs to: the first part of its name (`records.commands`,
/// `gateway.main.outcomes`, `orchestrator.replies`). Its broker user alone may declare it.
pub fn owner(queue: &str) -> &str {
    queue.split('.').next().unwrap_or(queue)
}

/// The shared work queues of `component` ([`shared_queues`]): a service's command and event
/// queues, the orchestrator's command queue.
pub fn queues_of(component: &str) -> Vec<QueueSpec> {
    shared_queues().into_iter().filter(|q| owner(&q.name) == component).collect()
}

/// A passive declaration (no permission needed): whether the exchange or queue exists. A
/// missing one closes the channel (404), so `ch` is replaced by a fresh one then.
async fn present(conn: &Connection, ch: &mut Channel, exchange: bool, name: &str) -> Result<bool, AmqpError> {
    let passive = if exchange {
        let opts = ExchangeDeclareOptions { passive: true, ..Default::default() };
        ch.exchange_declare(name.into(), ExchangeKind::Direct, opts, FieldTable::default()).await
    } else {
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        ch.queue_declare(name.into(), opts, FieldTable::default()).await.map(drop)
    };
    match passive {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => {
            *ch = conn.create_channel().await?;
            Ok(false)
        }
        Err(source) => Err(AmqpError::Declare { what: format!("checking {name}"), source }),
    }
}

/// A component's topology on `conn`: its `own` queues declared and bound (idempotent, and all
/// its permissions allow), each of `kind`; the exchanges, every other shared queue and the
/// `needed` ones checked passively, and declared only if missing (on a fresh vhost with a user
/// that may: `guest`; a component under its own user is refused, and the operator's import of
/// `broker/definitions.json` is the fix).
pub async fn declare(
    conn: &Connection,
    own: &[QueueSpec],
    needed: &[QueueSpec],
    kind: QueueType,
) -> Result<(), AmqpError> {
    let mut ch = conn.create_channel().await?;
    for (name, exchange_kind) in EXCHANGES {
        if !present(conn, &mut ch, true, name).await? {
            declare_exchange(&ch, name, exchange_kind).await?;
        }
    }
    for q in shared_queues().iter().chain(needed).filter(|q| own.iter().all(|o| o.name != q.name)) {
        let dlq = dead_letter_queue(&q.name);
        if !(present(conn, &mut ch, false, &q.name).await? && present(conn, &mut ch, false, &dlq).await?) {
            declare_work_queue(&ch, q, kind).await?;
        }
    }
    for q in own {
        declare_work_queue(&ch, q, kind).await?;
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Declare a durable work queue of `kind` (quorum unless `--queue-type classic`) with its
/// dead-letter queue of the same kind, and bind both.
///
/// On a cluster each quorum queue is replicated on three nodes (a majority of them must be up
/// for it to take and give messages). The group size is the broker's (`quorum_cluster_size` in
/// `broker/cluster.advanced.config`), not an `x-quorum-initial-group-size` argument here:
/// RabbitMQ compares that argument when a queue is declared again, so adding it would make every
/// queue declared without it refuse every component's start (PRECONDITION_FAILED), and no
/// policy can set a group size, which is fixed at declaration.
pub async fn declare_work_queue(ch: &Channel, spec: &QueueSpec, kind: QueueType) -> Result<(), AmqpError> {
    let dlq = dead_letter_queue(&spec.name);
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let err = |what: String| move |source| AmqpError::Declare { what, source };
    ch.queue_declare(
        dlq.as_str().into(),
        durable,
        table(&[("x-queue-type", AMQPValue::LongString(kind.as_str().into()))]),
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
    ch.queue_declare(spec.name.as_str().into(), durable, work_queue_args(kind, &dlq))
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
    fn a_classic_queue_keeps_its_dead_letters_and_loses_only_the_delivery_limit() {
        let keys = |kind| {
            let args = work_queue_args(kind, "records.commands.dlq");
            let mut keys: Vec<String> = args.inner().keys().map(|k| k.to_string()).collect();
            keys.sort();
            (keys, args.inner().get("x-queue-type").cloned())
        };
        let (quorum, kind) = keys(QueueType::Quorum);
        assert_eq!(kind, Some(AMQPValue::LongString("quorum".into())));
        assert!(quorum.contains(&"x-delivery-limit".to_string()), "{quorum:?}");
        let (classic, kind) = keys(QueueType::Classic);
        assert_eq!(kind, Some(AMQPValue::LongString("classic".into())));
        assert_eq!(classic, ["x-dead-letter-exchange", "x-dead-letter-routing-key", "x-queue-type"]);
        assert_eq!("classic".parse(), Ok(QueueType::Classic));
        assert_eq!(QueueType::default(), QueueType::Quorum);
        let refused = "stream".parse::<QueueType>().unwrap_err();
        assert!(refused.contains("quorum or classic"), "{refused}");
    }

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
        assert_eq!(owner("gateway.main.outcomes"), "gateway");
        assert_eq!(owner(ORCHESTRATOR_REPLIES), "orchestrator");
        let own = |c: &str| queues_of(c).into_iter().map(|q| q.name).collect::<Vec<_>>();
        assert_eq!(own("records"), ["records.commands", "records.events"]);
        assert_eq!(own("orchestrator"), ["orchestrator.commands"]);
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
