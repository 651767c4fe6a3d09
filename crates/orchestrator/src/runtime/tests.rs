//! A reply moves its saga from the state the instance stored last, without reading it back,
//! and never over another instance's move ([`Recent`], [`apply`]'s guard): two instances on one
//! store, on both backends, with no broker (the handlers only write the outbox).

use baton_protocol::{Outcome, reply_type};
use baton_store::Location;
use baton_store::scratch::{ScratchDatabase, test_server};

use super::*;

/// An orchestrator instance named `name` on the store at `at`, running the bundled workflow.
async fn instance(at: &Location, name: &str) -> Arc<Core> {
    let db = Db::open(at, COMPONENT, MIGRATIONS, name).await.unwrap();
    let wf = Workflow::create_space();
    let workflows = HashMap::from([(wf.name.clone(), wf)]);
    let current = definitions::record(&db, &workflows).await.unwrap();
    Arc::new(Core::new(db, Identity::of(COMPONENT, "guest"), workflows, current))
}

fn envelope(kind: &str, from: &str) -> Envelope {
    Envelope {
        message_id: Uuid::new_v4(),
        correlation_id: None,
        kind: kind.into(),
        app_id: Some(from.into()),
        user_id: Some("guest".into()),
        reply_to: None,
        mode: Some("workflow".into()),
        attempt: 1,
        traceparent: TraceParent::new_root(),
        redelivered: false,
        body: Vec::new(),
    }
}

/// Service `step`'s first attempt done, as action `index` of saga `id`.
fn done(id: Uuid, space: Uuid, step: Service, index: u32) -> (Envelope, StepReply) {
    let data = match step {
        Service::Records => Context { key: Some("acme".into()), ..Default::default() },
        Service::Placement => Context { shard: Some("shard-1".into()), ..Default::default() },
        _ => Context::default(),
    };
    let reply = StepReply {
        schema: SCHEMA,
        saga_id: id,
        space_id: space,
        step,
        action: Action::Do,
        attempt: 1,
        index: Some(index),
        outcome: Outcome::Done,
        status: None,
        reason: None,
        data,
    };
    (envelope(&reply_type(step.do_type()), step.name()), reply)
}

/// The saga's row as stored: its state, its version, and how many commands each service was sent.
async fn stored(core: &Core, id: Uuid) -> (Saga, i64, Vec<(String, i64)>) {
    core.db
        .call(move |tx| {
            let (state, version) = tx.query_row(
                "SELECT state, version FROM sagas WHERE saga_id = ?1",
                [id.to_string()],
                |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )?;
            let sent = tx.query_map(
                "SELECT step, COUNT(*) FROM history WHERE saga_id = ?1 AND event = 'sent' GROUP BY step ORDER BY step",
                [id.to_string()],
                |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )?;
            Ok((serde_json::from_str(&state).unwrap(), version, sent))
        })
        .await
        .unwrap()
}

/// Whether `core` keeps a state of saga `id` that awaits `reply`, at `version`.
fn keeps(core: &Core, id: Uuid, reply: &StepReply, version: i64) -> bool {
    let mut recent = core.recent.0.lock().unwrap();
    recent.get(&id).is_some_and(|k| k.version == version && k.saga.awaits(&Reply::from(reply.clone())))
}

#[tokio::test]
async fn a_reply_moves_the_state_an_instance_kept_and_never_over_another_instances_move() {
    let dir = tempfile::tempdir().unwrap();
    let pg = ScratchDatabase::create(&test_server(), "baton_recent")
        .expect("the tests' PostgreSQL server (scripts/test.sh starts it)");
    for at in [Location::Dir(dir.path().to_owned()), pg.location().clone()] {
        // Each backend's run is bounded: a store that stops answering fails the test.
        tokio::time::timeout(Duration::from_secs(60), stale_state_is_never_written(&at))
            .await
            .unwrap_or_else(|_| panic!("{at:?}: the handlers did not finish within 60 s"));
    }
}

/// Instance a keeps a saga, b moves it on, and a gets a reply its stale state awaits.
async fn stale_state_is_never_written(at: &Location) {
    let (a, b) = (instance(at, "o1").await, instance(at, "o2").await);
    let (id, space) = (Uuid::new_v4(), Uuid::new_v4());
    let start = StartSaga {
        schema: SCHEMA,
        saga_id: id,
        space_id: space,
        workflow: Workflow::create_space().name,
        input: Context { name: "acme".into(), owner: "alice".into(), ..Default::default() },
        deadline: None,
    };
    Arc::clone(&a).handle_start(envelope(START, GATEWAY), start).await.unwrap();

    // Instance a started it and keeps it: records' reply moves it on from there.
    let (env, records) = done(id, space, Service::Records, 0);
    assert!(keeps(&a, id, &records, 1), "{at:?}: the start's state is kept");
    Arc::clone(&a).handle_reply(env, records).await.unwrap();
    let (saga, version, _) = stored(&a, id).await;
    assert_eq!((saga.actions[1].phase, version), (baton_workflow::Phase::Running, 2), "{at:?}");

    // Instance b takes placement's reply (replies go to any instance), from the row.
    let (env, placement) = done(id, space, Service::Placement, 1);
    assert!(keeps(&a, id, &placement, 2));
    Arc::clone(&b).handle_reply(env, placement.clone()).await.unwrap();
    let (moved, version, sent) = stored(&b, id).await;
    assert_eq!(moved.actions[2].phase, baton_workflow::Phase::Running, "{at:?}: entitlements sent");
    assert_eq!(version, 3);

    // Placement answers again (a second reply, another message): instance a's kept state
    // awaits it, but the saga moved on; the guard sends a back to the row, where the reply
    // is late. Nothing b did is undone, and entitlements is not sent twice.
    let (env, _) = done(id, space, Service::Placement, 1);
    assert!(keeps(&a, id, &placement, 2), "{at:?}: a still keeps the state placement's reply moved");
    Arc::clone(&a).handle_reply(env, placement).await.unwrap();
    let (after, version, sent_after) = stored(&a, id).await;
    assert_eq!(after.actions, moved.actions, "{at:?}: the stale state was not written");
    assert_eq!(version, 4, "{at:?}: the late reply was recorded from the row");
    assert_eq!(sent_after, sent, "{at:?}: no command went out twice");
    let like = format!("%\"{}\"%", Service::Entitlements.do_type());
    let pending: i64 =
        a.db.call(move |tx| {
            tx.query_row("SELECT COUNT(*) FROM outbox WHERE message LIKE ?1", [like], |r| r.get(0))
        })
        .await
        .unwrap();
    assert_eq!(pending, 1, "{at:?}: one entitlements command in the outbox");
}
