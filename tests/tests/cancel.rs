//! Cancelling a saga, against the real broker: `POST /workflows/{id}/cancel` (and the CLI's
//! path, `request_cancel`) stops a running saga, undoes its completed steps in reverse order,
//! tells its waiting client 409 and ends it `cancelled`; a step whose reply arrives after the
//! cancel is undone too; cancels are idempotent (concurrent ones, and one of a saga already
//! cancelled, all answer success with its state); a saga that ended otherwise, or the events
//! mode, answers 409 with why.

use std::time::Duration;

use baton_protocol::{Mode, Service};
use baton_tests::{System, SystemConfig, TestEnv, rows_for, saga_story, spawn_service, timeline, wait_for};
use serde_json::Value;

/// The saga of the request for space `name`, once the gateway has recorded it.
async fn saga_of(env: &TestEnv, name: &str) -> String {
    let requests = baton_gateway::read::Requests::at(&env.store());
    wait_for(&format!("the request for {name}"), Duration::from_secs(20), || async {
        let told = requests.told().await.ok()?;
        told.into_iter().find(|t| t.name == name).map(|t| t.saga_id)
    })
    .await
}

/// Wait until the saga's timeline has `event` (for `step`, when given).
async fn wait_event(sys: &System, saga: &str, step: Option<&str>, event: &str) {
    wait_for(&format!("{event} in saga {saga}"), Duration::from_secs(30), || async {
        let (_, view) = sys.api().workflow(saga).await;
        // Not there yet (404) while the start waits for the orchestrator.
        if !view["history"].is_array() {
            return None;
        }
        timeline(&view).iter().any(|(s, _, e)| e == event && step.is_none_or(|st| st == s)).then_some(())
    })
    .await
}

/// The compensations of a saga, in the order they completed.
fn compensated(view: &Value) -> Vec<String> {
    timeline(view).into_iter().filter(|(_, _, e)| e == "compensated").map(|(s, _, _)| s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_saga_undoes_the_done_steps_in_reverse_and_tells_the_waiting_client_409() {
    let env = TestEnv::new().await;
    // Routing is not running: the saga waits there, with three steps done.
    let cfg = SystemConfig { skip: vec![Service::Routing], ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("acme", "alice").await });
    let saga = saga_of(&env, "acme").await;
    wait_event(&sys, &saga, Some("routing"), "sent").await;
    let cancel = {
        let (api, saga) = (sys.api(), saga.clone());
        tokio::spawn(async move { api.cancel(&saga).await })
    };
    wait_event(&sys, &saga, None, "cancel_requested").await;
    // Routing comes back, handles its command late, then its compensation.
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    let (status, body) = cancel.await.unwrap();
    let story = saga_story(&env.store(), &saga);
    assert_eq!(status, 200, "{body}\n{story}");
    assert_eq!(body["status"], "cancelled", "{body}");
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(status, 409, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("cancelled") && error.contains("undone"), "{error}");
    assert_eq!(answer["workflow_id"], saga.as_str());
    let (_, view) = sys.api().workflow(&saga).await;
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["answer_status"], 409);
    assert_eq!(compensated(&view), ["routing", "entitlements", "placement", "records"], "{story}");
    assert!(!timeline(&view).iter().any(|(s, _, _)| s == "notifier"), "no email: {story}");
    let space = view["space_id"].as_str().unwrap().to_owned();
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &space), 0, "{s} left a row: {story}");
    }
    let (_, listed) = sys.get("/workflows?state=cancelled").await;
    assert_eq!(listed["workflows"][0]["id"], saga.as_str(), "{listed}");
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cancels_of_one_running_saga_all_answer_success_with_its_state() {
    let env = TestEnv::new().await;
    // Routing is not running: the saga waits there, and its rollback waits for routing's undo.
    let cfg = SystemConfig { skip: vec![Service::Routing], ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("twice", "tess").await });
    let saga = saga_of(&env, "twice").await;
    wait_event(&sys, &saga, Some("routing"), "sent").await;
    // Four operators at once: each reads the saga running and sends its cancel.
    let cancels: Vec<_> = (0..4)
        .map(|_| {
            let (api, saga) = (sys.api(), saga.clone());
            tokio::spawn(async move { api.cancel(&saga).await })
        })
        .collect();
    wait_event(&sys, &saga, None, "cancel_requested").await;
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    let story = || saga_story(&env.store(), &saga);
    for cancel in cancels {
        let (status, body) = cancel.await.unwrap();
        assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "{body}\n{}", story());
        assert_eq!(body["id"], saga.as_str(), "{body}");
    }
    // One cancel did it; the others were not refused.
    let (_, view) = sys.api().workflow(&saga).await;
    let events: Vec<String> = timeline(&view).into_iter().map(|(_, _, e)| e).collect();
    assert_eq!(events.iter().filter(|e| *e == "cancel_requested").count(), 1, "{}", story());
    assert!(!events.iter().any(|e| e == "cancel_refused"), "{}", story());
    assert_eq!(compensated(&view), ["routing", "entitlements", "placement", "records"], "{}", story());
    assert_eq!(waiting.await.unwrap().0, 409);
    // Once more, after it ended cancelled: the same success, at once, and nothing sent.
    let (status, body) = sys.api().cancel(&saga).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "{body}");
    let out = tokio::process::Command::new(baton_tests::baton_bin())
        .args(["workflows", "cancel", &saga, "--amqp-url", &env.amqp_url(), "--log", "warn"])
        .args(env.store_args())
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("cancelled"), "{said}");
    let (_, view) = sys.api().workflow(&saga).await;
    let events: Vec<String> = timeline(&view).into_iter().map(|(_, _, e)| e).collect();
    assert!(!events.iter().any(|e| e == "cancel_refused"), "{}", story());
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_reply_arrives_after_the_cancel_is_undone_too() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig { skip: vec![Service::Routing], ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("late", "bob").await });
    let saga = saga_of(&env, "late").await;
    wait_event(&sys, &saga, Some("routing"), "sent").await;
    // The CLI's path: a message on orchestrator.commands, whichever instance consumes it.
    let id = uuid::Uuid::parse_str(&saga).unwrap();
    baton_orchestrator::request_cancel(&env.amqp_url(), id, "baton workflows cancel").await.unwrap();
    wait_event(&sys, &saga, None, "cancel_requested").await;
    // Only now does routing run: its route command was sent before the cancel, and its reply
    // comes after it.
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    wait_for("the saga to end cancelled", Duration::from_secs(30), || async {
        let (_, view) = sys.api().workflow(&saga).await;
        (view["status"] == "cancelled").then_some(())
    })
    .await;
    let story = saga_story(&env.store(), &saga);
    let (_, view) = sys.api().workflow(&saga).await;
    let t = timeline(&view);
    assert!(
        t.iter().any(|(s, a, e)| s == "routing" && a == "do" && e == "late_reply_ignored"),
        "routing's reply came after the cancel: {story}"
    );
    assert_eq!(compensated(&view)[0], "routing", "{story}");
    let space = view["space_id"].as_str().unwrap().to_owned();
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &space), 0, "{s} left a row: {story}");
    }
    assert_eq!(waiting.await.unwrap().0, 409);
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_finished_saga_is_a_409_that_says_why() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let (status, done) = sys.create("acme", "alice").await;
    assert_eq!(status, 200, "{done}");
    let saga = done["workflow_id"].as_str().unwrap().to_owned();
    wait_for("the saga to complete", Duration::from_secs(20), || async {
        let (_, view) = sys.api().workflow(&saga).await;
        (view["status"] == "completed").then_some(())
    })
    .await;
    let (status, body) = sys.api().cancel(&saga).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("completed"), "{body}");
    assert_eq!(body["state"], "completed");
    // Refused at routing: it rolled back by itself.
    let (status, refused) = sys.create("admin", "bob").await;
    assert_eq!(status, 409, "{refused}");
    let rolled_back = refused["workflow_id"].as_str().unwrap();
    let (status, body) = sys.api().cancel(rolled_back).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("rolled_back"), "{body}");
    // Nothing changed, and nothing was sent.
    let (_, view) = sys.api().workflow(&saga).await;
    assert_eq!(view["status"], "completed");
    let (status, body) = sys.api().cancel(&uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = sys.api().cancel("not-a-uuid").await;
    assert_eq!(status, 400);
    // The CLI says the same, with exit 1.
    let out = tokio::process::Command::new(baton_tests::baton_bin())
        .args(["workflows", "cancel", &saga, "--amqp-url", &env.amqp_url(), "--log", "warn"])
        .args(env.store_args())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be cancelled") && stderr.contains("completed"), "{stderr}");
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_events_mode_cancel_is_a_409_that_names_the_mode() {
    let env = TestEnv::new().await;
    let cfg =
        SystemConfig { mode: Mode::Events, deadline: Duration::from_secs(10), ..SystemConfig::default() };
    let sys = System::start(&env, cfg).await;
    let (status, body) = sys.create("evt", "alice").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = sys.api().cancel(body["id"].as_str().unwrap()).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["mode"], "events");
    assert!(body["error"].as_str().unwrap().contains("events mode"), "{body}");
    let out = tokio::process::Command::new(baton_tests::baton_bin())
        .args(["workflows", "cancel", &uuid::Uuid::new_v4().to_string(), "--mode", "events", "--log", "warn"])
        .arg("--data-dir")
        .arg(env.data_dir())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("events mode"), "{stderr}");
    sys.stop().await;
}

/// Run the orchestrator alone as instance `instance` (stop it by cancelling the token).
fn spawn_orchestrator(
    env: &TestEnv,
    cfg: &SystemConfig,
    instance: &str,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut config = baton_tests::node_config(env, cfg);
    config.instance = instance.into();
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        baton_node::run(baton_protocol::Component::Orchestrator, &config, token).await
    });
    (cancel, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_while_no_orchestrator_runs_is_handled_by_the_next_instance_that_starts() {
    let env = TestEnv::new().await;
    let cfg =
        SystemConfig { skip: vec![Service::Routing], with_orchestrator: false, ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let (first, first_task) = spawn_orchestrator(&env, &cfg, "main");
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("gone", "gina").await });
    let saga = saga_of(&env, "gone").await;
    wait_event(&sys, &saga, Some("routing"), "sent").await;
    first.cancel();
    first_task.await.unwrap().unwrap();
    // Nobody consumes orchestrator.commands now: the cancel waits there.
    let id = uuid::Uuid::parse_str(&saga).unwrap();
    baton_orchestrator::request_cancel(&env.amqp_url(), id, "baton workflows cancel").await.unwrap();
    // Another instance, under another name, takes it up. Routing comes back for the undo only
    // then: up before, it could answer the routing command first, and the saga would succeed
    // before the cancel is read (replies and cancels come through different queues).
    let (second, second_task) = spawn_orchestrator(&env, &cfg, "second");
    wait_event(&sys, &saga, None, "cancel_requested").await;
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    // A routing command the stopped instance committed and had not published yet goes out
    // after the outbox lease (30 s), to find the tombstone: the saga does not wait for it.
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (_, view) = sys.api().workflow(&saga).await;
            if view["status"] == "cancelled" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let story = saga_story(&env.store(), &saga);
    if ended.is_err() {
        let orchestrator = baton_protocol::Component::Orchestrator;
        let all = baton_store::StoreCounts::of(&env.store(), orchestrator).await;
        let stopped = baton_store::StoreCounts::outbox_of(&env.store(), orchestrator, "main").await;
        panic!(
            "the saga did not end cancelled within 60 s; the orchestrator's outbox holds {:?} rows, {:?} of them the stopped instance's:\n{story}",
            all.map(|c| c.map(|c| c.outbox)),
            stopped
        );
    }
    let (_, view) = sys.api().workflow(&saga).await;
    let space = view["space_id"].as_str().unwrap().to_owned();
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &space), 0, "{s} left a row: {story}");
    }
    assert_eq!(waiting.await.unwrap().0, 409, "{story}");
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    for (token, task) in [(routing, routing_task), (second, second_task)] {
        token.cancel();
        task.await.unwrap().unwrap();
    }
    sys.stop().await;
}
