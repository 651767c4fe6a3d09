//! Bad messages for the plan's `poison` fault: what a broken or hostile client would publish
//! straight onto a work queue. Each must reach the queue's dead-letter queue with the reason,
//! after one delivery, and change nothing. Their `app_id` names the sender, [`SENDER`], so that
//! the run can tell them from a real message that was dead-lettered.

use baton_amqp::topology::{self, COMMANDS, EVENTS, REPLIES};
use baton_amqp::{Broker, PendingConfirm, dlq::DeadQueue};
use baton_protocol::{Mode, Service};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

/// The `app_id` of the bad messages a run sends on purpose.
pub const SENDER: &str = "baton-chaos";

/// The five kinds of bad input, sent in turn.
const KINDS: [&str; 5] =
    ["malformed JSON", "the wrong shape", "an unknown type", "an oversized body", "no message id"];

/// A work queue that has a consumer in `mode`: where to publish to reach it, and the type a good
/// message on it has.
struct Target {
    exchange: &'static str,
    key: String,
    kind: &'static str,
}

fn targets(mode: Mode) -> Vec<Target> {
    match mode {
        Mode::Workflow | Mode::Hybrid => {
            let mut t: Vec<Target> = Service::ALL
                .iter()
                .map(|s| Target { exchange: COMMANDS, key: s.name().into(), kind: s.do_type() })
                .collect();
            t.push(Target {
                exchange: COMMANDS,
                key: topology::ORCHESTRATOR.into(),
                kind: baton_protocol::START,
            });
            t.push(Target {
                exchange: REPLIES,
                key: topology::ORCHESTRATOR.to_owned(),
                kind: "records.create.reply",
            });
            // Hybrid mode's announcement key: one bad message reaches both follow-ups' queues.
            if mode == Mode::Hybrid {
                let created = baton_protocol::events::CREATED;
                t.push(Target { exchange: EVENTS, key: topology::announce_key(created), kind: created });
            }
            t
        }
        Mode::Events => Service::ALL
            .iter()
            .map(|s| Target { exchange: EVENTS, key: s.trigger_event().into(), kind: s.trigger_event() })
            .collect(),
    }
}

/// Publish the `n`-th bad message of a run and wait for the broker's confirm. Returns what was
/// sent, for the tally. The kinds go round in turn, and so do the queues, shifted by one at each
/// round of kinds: with as many queues as kinds, each queue still gets every kind.
pub async fn send(broker: &Broker, mode: Mode, n: usize) -> anyhow::Result<&'static str> {
    let targets = targets(mode);
    let (queue, kind) = pick(n, targets.len());
    let (target, what) = (&targets[queue], KINDS[kind]);
    let good = BasicProperties::default()
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_type(target.kind.into())
        .with_content_type("application/json".into())
        .with_app_id(SENDER.into())
        .with_delivery_mode(2);
    let wrong_shape = serde_json::json!({"schema": 1, "hello": "world"}).to_string().into_bytes();
    let (props, body) = match what {
        "malformed JSON" => (good, b"{not json".to_vec()),
        "the wrong shape" => (good, wrong_shape),
        "an unknown type" => (good.with_type(format!("{}.explode", target.key).into()), b"{}".to_vec()),
        "an oversized body" => (good, vec![b' '; baton_protocol::MAX_BODY_BYTES + 1024]),
        _ => (good.with_message_id("".into()), b"{}".to_vec()),
    };
    let ch = broker.channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirm = ch
        .basic_publish(
            target.exchange.into(),
            target.key.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            &body,
            props,
        )
        .await?;
    let sent = PendingConfirm::from(confirm).wait().await;
    let _ = ch.close(200, "sent".into()).await;
    sent?;
    Ok(what)
}

/// The queue and the kind of the `n`-th bad message, of `queues` queues.
fn pick(n: usize, queues: usize) -> (usize, usize) {
    ((n + n / KINDS.len()) % queues, n % KINDS.len())
}

/// Of the dead letters found, how many are the run's own bad messages and how many are not.
/// A dead-letter queue holding more than was looked at counts the rest as not planned.
pub fn tally(dead: &[DeadQueue]) -> (u32, u32) {
    let planned: u32 = dead
        .iter()
        .map(|q| q.first.iter().filter(|m| m.app_id.as_deref() == Some(SENDER)).count() as u32)
        .sum();
    let all: u32 = dead.iter().map(|q| q.count).sum();
    (planned, all - planned)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// Twenty bad messages reach every queue with several kinds each, in each mode's shape.
    #[test]
    fn hybrid_mode_poisons_the_follow_ups_too() {
        use baton_protocol::Mode;
        let keys = |m: Mode| super::targets(m).into_iter().map(|t| t.key).collect::<Vec<_>>();
        assert_eq!((keys(Mode::Workflow).len(), keys(Mode::Events).len()), (7, 5));
        let hybrid = keys(Mode::Hybrid);
        assert_eq!(hybrid.len(), 8);
        assert!(hybrid.contains(&"hybrid.space.created".to_owned()), "{hybrid:?}");
    }

    #[test]
    fn every_queue_gets_several_kinds() {
        for queues in [5, 7, 8] {
            let mut seen: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
            for n in 0..20 {
                let (q, k) = super::pick(n, queues);
                seen.entry(q).or_default().insert(k);
            }
            assert_eq!(seen.len(), queues, "{seen:?}");
            assert!(seen.values().all(|kinds| kinds.len() >= 2), "{queues} queues: {seen:?}");
        }
    }
}
