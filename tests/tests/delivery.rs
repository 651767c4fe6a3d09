//! Delivery guarantees on the real broker: duplicates change nothing, bad input goes to the
//! dead-letter queue with its reason and the consumer keeps serving.

use std::time::Duration;

use baton_amqp::topology::{self, COMMANDS, OUTCOMES, QueueSpec, REPLIES};
use baton_amqp::{Outgoing, Publisher, TraceParent};
use baton_protocol::{
    Action, Component, Context, Outcome, SCHEMA, START, START_REPLY, SagaOutcome, Service, StartSaga,
    StepCommand, StepReply,
};
use baton_tests::{System, SystemConfig, TestEnv, rows_for, store_counts, timeline, wait_for};
use baton_workflow::Workflow;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);

/// A queue of the test's own on `baton.replies`, to receive what components answer.
async fn test_reply_queue(env: &TestEnv, key: &str) -> String {
    let broker = env.broker().await;
    let ch = broker.channel().await.unwrap();
    topology::declare_exchanges(&ch).await.unwrap();
    let spec = QueueSpec { name: format!("{key}.replies"), exchange: REPLIES, keys: vec![key.into()] };
    topology::declare_work_queue(&ch, &spec, Default::default()).await.unwrap();
    spec.name
}

async fn depth_is(env: &TestEnv, queue: &str, n: u64) {
    wait_for(&format!("{queue} to hold {n} messages"), WAIT, || async move {
        (env.queue_depth(queue).await == Some(n)).then_some(())
    })
    .await
}

fn payload(msg: &Value) -> Value {
    serde_json::from_str(msg["payload"].as_str().expect("a text payload")).expect("a JSON payload")
}

/// The one reply `queue` holds, once it holds it.
async fn one_reply(env: &TestEnv, queue: &str) -> StepReply {
    depth_is(env, queue, 1).await;
    serde_json::from_value(payload(&env.take_messages(queue, 1).await[0])).expect("a step's reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_command_is_answered_again_and_changes_nothing() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig { with_orchestrator: false, ..SystemConfig::default() }).await;
    let replies = test_reply_queue(&env, "test.dup").await;
    let publisher = Publisher::new(env.broker().await);
    let (cmd, msg) = baton_tests::records_create("dup", "test.dup");
    let (saga_id, space_id) = (cmd.saga_id, cmd.space_id);
    publisher.publish_confirmed(&msg).await.unwrap();
    publisher.publish_confirmed(&msg).await.unwrap();
    depth_is(&env, &replies, 2).await;
    let got = env.take_messages(&replies, 2).await;
    assert_eq!(payload(&got[0]), payload(&got[1]), "the duplicate gets the stored reply");
    assert_eq!(got[0]["properties"]["message_id"], got[1]["properties"]["message_id"]);
    let reply: StepReply = serde_json::from_value(payload(&got[0])).unwrap();
    assert_eq!(reply.outcome, Outcome::Done);
    assert_eq!(rows_for(&env.store(), Service::Records, &space_id.to_string()), 1);
    assert_eq!(store_counts(&env.store(), Component::Records).handled, 1);

    // A retry (a new message id for the same step) is idempotent too.
    let retry = Outgoing { message_id: Uuid::new_v4(), ..msg.clone() };
    publisher.publish_confirmed(&retry).await.unwrap();
    let again = one_reply(&env, &replies).await;
    assert_eq!((again.outcome, again.data), (Outcome::Done, reply.data));
    assert_eq!(rows_for(&env.store(), Service::Records, &space_id.to_string()), 1);

    // After the compensation, a late command is a no-op (the tombstone). The late command is
    // sent once the undo is answered: sent together, the service may handle them at once, and
    // then the command is rightly answered as the retry it would be if it came first.
    let undo = StepCommand { action: Action::Undo, ..cmd.clone() };
    let undo =
        Outgoing::new(COMMANDS, "records", "records.delete", saga_id, "test", TraceParent::new_root(), &undo)
            .reply_to("test.dup");
    publisher.publish_confirmed(&undo).await.unwrap();
    let undone = one_reply(&env, &replies).await;
    assert_eq!((undone.action, undone.outcome), (Action::Undo, Outcome::Done), "{undone:?}");
    let late = Outgoing { message_id: Uuid::new_v4(), ..msg };
    publisher.publish_confirmed(&late).await.unwrap();
    let late_reply = one_reply(&env, &replies).await;
    assert_eq!(late_reply.action, Action::Do);
    assert_eq!(late_reply.outcome, Outcome::Failed, "{late_reply:?}");
    assert!(late_reply.reason.unwrap().contains("already compensated"));
    assert_eq!(rows_for(&env.store(), Service::Records, &space_id.to_string()), 0);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_reply_advances_the_saga_once() {
    let env = TestEnv::new().await;
    // The orchestrator alone: the test plays the records service.
    // Long timeouts: no retry may blur the count of commands.
    let mut patient = Workflow::create_space();
    for step in &mut patient.steps {
        for a in &mut step.actions {
            a.timeout_ms = 120_000;
        }
    }
    let cfg = SystemConfig { with_services: false, workflows: vec![patient], ..SystemConfig::default() };
    let sys = System::start(&env, cfg).await;
    test_reply_queue(&env, "test.client").await;
    let publisher = Publisher::new(env.broker().await);
    let (saga_id, space_id) = (Uuid::new_v4(), Uuid::new_v4());
    let start = StartSaga {
        schema: SCHEMA,
        saga_id,
        space_id,
        workflow: "create-space".into(),
        input: Context { name: "twice".into(), owner: "alice".into(), ..Default::default() },
        deadline: None,
    };
    let msg = Outgoing::new(
        COMMANDS,
        topology::ORCHESTRATOR,
        START,
        saga_id,
        "gateway",
        TraceParent::new_root(),
        &start,
    )
    .reply_to("test.client");
    publisher.publish_confirmed(&msg).await.unwrap();
    depth_is(&env, "records.commands", 1).await;
    let cmd: StepCommand =
        serde_json::from_value(payload(&env.take_messages("records.commands", 1).await[0])).unwrap();
    let body = StepReply {
        schema: SCHEMA,
        saga_id,
        space_id,
        step: Service::Records,
        action: Action::Do,
        attempt: cmd.attempt,
        index: cmd.index,
        outcome: Outcome::Done,
        status: None,
        reason: None,
        data: Context { key: Some("twice".into()), ..Default::default() },
    };
    let reply = Outgoing::new(
        REPLIES,
        "orchestrator",
        "records.create.reply",
        saga_id,
        "records",
        TraceParent::new_root(),
        &body,
    );
    publisher.publish_confirmed(&reply).await.unwrap();
    publisher.publish_confirmed(&reply).await.unwrap();
    // The same reply sent again by a service with a new id (a redelivered command).
    let resent = Outgoing { message_id: Uuid::new_v4(), ..reply };
    publisher.publish_confirmed(&resent).await.unwrap();
    depth_is(&env, "placement.commands", 1).await;
    depth_is(&env, "orchestrator.replies", 0).await;
    let view = wait_for("the three replies to be handled", WAIT, || async {
        let (_, v) = sys.get(&format!("/workflows/{saga_id}")).await;
        let t = timeline(&v);
        (t.iter().filter(|(_, _, e)| e == "late_reply_ignored").count() == 1).then_some(v)
    })
    .await;
    let t = timeline(&view);
    assert_eq!(t.iter().filter(|(s, a, e)| s == "records" && a == "do" && e == "done").count(), 1, "{t:?}");
    assert_eq!(t.iter().filter(|(s, a, e)| s == "placement" && a == "do" && e == "sent").count(), 1, "{t:?}");
    assert_eq!(env.queue_depth("placement.commands").await, Some(1), "one placement command, not two");
    sys.stop().await;
}

/// Publish raw bytes with raw properties, as a broken or hostile client would.
async fn publish_raw(env: &TestEnv, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    let broker = env.broker().await;
    let ch = broker.channel().await.unwrap();
    ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, props).await.unwrap();
    let _ = ch.close(200, "done".into()).await;
}

/// Send a queue the five kinds of bad input, and check that each is dead-lettered after one
/// delivery with a reason that names what was wrong.
async fn every_bad_input(env: &TestEnv, exchange: &str, key: &str, queue: &str, kind: &str) {
    let unknown = format!("{}.explode", kind.split('.').next().unwrap());
    let wrong_shape = serde_json::json!({"schema": 1, "hello": "world"}).to_string();
    publish_raw(env, exchange, key, b"{not json", props(kind)).await;
    publish_raw(env, exchange, key, wrong_shape.as_bytes(), props(kind)).await;
    publish_raw(env, exchange, key, b"{}", props(&unknown)).await;
    publish_raw(env, exchange, key, &vec![b' '; 70 * 1024], props(kind)).await;
    publish_raw(env, exchange, key, b"{}", props(kind).with_message_id("".into())).await;
    let dlq = topology::dead_letter_queue(queue);
    depth_is(env, &dlq, 5).await;
    let dead = env.take_messages(&dlq, 5).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| m["properties"]["headers"]["x-baton-dead-reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    for words in [
        "is not valid",
        "missing field",
        &format!("unknown message type `{unknown}`"),
        "over the limit",
        "no message_id",
    ] {
        assert!(reasons.iter().any(|r| r.contains(words)), "{queue}: no reason says `{words}`: {reasons:?}");
    }
    for m in &dead {
        assert_eq!(m["redelivered"], false, "{queue}: dead-lettered at the first delivery");
        assert_eq!(m["properties"]["headers"]["x-baton-dead-queue"], queue);
    }
}

fn props(kind: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(Uuid::new_v4().to_string().into())
        .with_type(kind.into())
        .with_content_type("application/json".into())
        .with_reply_to("test.client".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_on_every_work_queue_are_dead_lettered_with_the_reason() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    // (exchange, routing key, queue, type) of every work queue.
    let mut queues: Vec<(&str, String, String, &str)> = Service::ALL
        .iter()
        .map(|s| (COMMANDS, s.name().to_string(), topology::command_queue(s.name()), s.do_type()))
        .collect();
    queues.push((COMMANDS, "orchestrator".into(), "orchestrator.commands".into(), START));
    queues.push((REPLIES, "orchestrator".into(), "orchestrator.replies".into(), "records.create.reply"));
    queues.push((
        OUTCOMES,
        "gateway.main".into(),
        "gateway.main.outcomes".into(),
        baton_protocol::START_REPLY,
    ));
    for (exchange, key, queue, kind) in &queues {
        every_bad_input(&env, exchange, key, queue, kind).await;
    }
    // Every consumer still serves.
    let (status, body) = sys.create("still-up", "alice").await;
    assert_eq!(status, 200, "{body}");
    for (_, _, queue, _) in &queues {
        assert_eq!(env.queue_depth(queue).await, Some(0), "{queue} is drained, nothing loops");
    }
    sys.stop().await;
}

/// A reply and an outcome written in another schema are dead-lettered with the reason, like a
/// command is: every handler decodes the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_outcomes_of_another_schema_are_dead_lettered_with_the_reason() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let id = Uuid::new_v4();
    let reply = StepReply {
        schema: SCHEMA + 1,
        saga_id: id,
        space_id: id,
        step: Service::Records,
        action: Action::Do,
        attempt: 1,
        index: Some(0),
        outcome: Outcome::Done,
        status: None,
        reason: None,
        data: Context::default(),
    };
    let outcome =
        SagaOutcome { schema: SCHEMA + 1, saga_id: id, space_id: id, status: 200, space: None, error: None };
    for (exchange, key, queue, kind, body) in [
        (REPLIES, "orchestrator", "orchestrator.replies", "records.create.reply", serde_json::to_vec(&reply)),
        (OUTCOMES, "gateway.main", "gateway.main.outcomes", START_REPLY, serde_json::to_vec(&outcome)),
    ] {
        publish_raw(&env, exchange, key, &body.unwrap(), props(kind)).await;
        let dlq = topology::dead_letter_queue(queue);
        depth_is(&env, &dlq, 1).await;
        let dead = env.take_messages(&dlq, 1).await;
        assert_eq!(
            dead[0]["properties"]["headers"]["x-baton-dead-reason"],
            format!(
                "schema {} of a `{kind}` message is not supported; Baton reads schema {SCHEMA}",
                SCHEMA + 1
            ),
            "{queue}"
        );
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_too() {
    let env = TestEnv::new().await;
    let sys =
        System::start(&env, SystemConfig { mode: baton_protocol::Mode::Events, ..SystemConfig::default() })
            .await;
    let mut queues: Vec<(String, String, &str)> = Service::ALL
        .iter()
        .map(|s| (s.trigger_event().to_string(), topology::event_queue(s.name()), s.trigger_event()))
        .collect();
    queues.push((
        baton_protocol::events::READY.into(),
        "gateway.main.events".into(),
        baton_protocol::events::READY,
    ));
    for (key, queue, kind) in &queues {
        every_bad_input(&env, topology::EVENTS, key, queue, kind).await;
    }
    let (status, body) = sys.create("still-choreographed", "alice").await;
    assert_eq!(status, 200, "{body}");
    sys.stop().await;
}

/// Acks that cover several deliveries at once (`multiple`): with slow handlers among fast ones,
/// every delivery is handled once and acked after its handler returned, and none is left
/// unacked (closing the connection would put it back in the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_handled_out_of_order_are_each_acked_once_handled() {
    use std::sync::{Arc, Mutex};
    let env = TestEnv::new().await;
    let queue = test_reply_queue(&env, "test.acks").await;
    let publisher = Publisher::new(env.broker().await);
    let messages: Vec<Outgoing> = (0..30)
        .map(|i| {
            let body = serde_json::json!({ "i": i });
            Outgoing::new(
                REPLIES,
                "test.acks",
                "test.ack",
                Uuid::new_v4(),
                "test",
                TraceParent::new_root(),
                &body,
            )
        })
        .collect();
    // Every seventh handler takes a while: the ones after it finish first.
    let slow: Vec<Uuid> = messages.iter().step_by(7).map(|m| m.message_id).collect();
    for m in &messages {
        publisher.publish_confirmed(m).await.unwrap();
    }
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (consumer, cancel) = (env.broker().await, tokio_util::sync::CancellationToken::new());
    let task = tokio::spawn(baton_amqp::consume(
        consumer.clone(),
        Publisher::new(consumer.clone()),
        baton_amqp::ConsumerConfig::new(queue.clone(), 64),
        {
            let handled = Arc::clone(&handled);
            move |env: baton_amqp::Envelope| {
                let (handled, slow) = (Arc::clone(&handled), slow.contains(&env.message_id));
                async move {
                    if slow {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    handled.lock().unwrap().push(env.message_id);
                    Ok(())
                }
            }
        },
        cancel.clone(),
    ));
    wait_for("every message handled", WAIT, || async { (handled.lock().unwrap().len() >= 30).then_some(()) })
        .await;
    cancel.cancel();
    tokio::time::timeout(WAIT, task).await.expect("the consumer stops").unwrap();
    // Whatever this connection held unacked goes back to the queue as it closes.
    consumer.close().await;
    assert_eq!(env.queue_depth(&queue).await, Some(0), "every delivery was acked");
    let mut ids = handled.lock().unwrap().clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 30, "each handled once");
}
