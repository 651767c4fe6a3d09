//! Child workflows on the real broker: `create-space-nested` runs placement and entitlements
//! as the child saga `reserve-capacity`. The parent waits for the child's outcome; a child that
//! refuses undoes itself and then the parent undoes its own earlier steps; a parent that fails
//! after its child succeeded undoes the child as a whole, in reverse; a cancel of the parent
//! reaches a running child; and two orchestrators on PostgreSQL share parents and children.

use std::time::Duration;

use baton_protocol::{Component, Service};
use baton_services::ServiceConfig;
use baton_tests::{
    System, SystemConfig, TestEnv, every_saga_ends, rows_for, saga_story, spawn_service, timeline, wait_for,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn nested() -> SystemConfig {
    SystemConfig { workflow: "create-space-nested".into(), ..SystemConfig::default() }
}

/// The steps of a saga's view that reached `event`, in the order they did.
fn steps_with(view: &Value, event: &str) -> Vec<String> {
    timeline(view).into_iter().filter(|(_, _, e)| e == event).map(|(s, _, _)| s).collect()
}

/// The one child saga nested in a parent's view.
fn only_child(view: &Value) -> &Value {
    let children = view["children"].as_array().unwrap_or_else(|| panic!("no child saga: {view}"));
    assert_eq!(children.len(), 1, "{view}");
    &children[0]
}

/// The saga of a finished request, read through `GET /workflows/{id}`.
async fn view_of(sys: &System, answer: &Value) -> Value {
    let id = answer["workflow_id"].as_str().unwrap_or_else(|| panic!("no workflow_id: {answer}"));
    let (status, view) = sys.api().workflow(id).await;
    assert_eq!(status, 200, "{view}");
    view
}

/// No service keeps anything of `space`, and the audit finds every space as it was told.
fn nothing_left(env: &TestEnv, space: &str, story: &str) {
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, space), 0, "{s} left a row: {story}");
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nested_workflow_creates_a_space_with_its_child_nested_in_the_timeline() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, nested()).await;
    let (status, body) = sys.create("nest", "alice").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["licence"].is_string() && body["shard"].is_string(), "the child's output: {body}");
    every_saga_ends(&env, Duration::from_secs(10)).await;
    let view = view_of(&sys, &body).await;
    assert_eq!(
        (view["workflow"].as_str(), view["status"].as_str()),
        (Some("create-space-nested"), Some("completed"))
    );
    let steps: Vec<&str> =
        view["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["records", "entitlements", "routing", "notifier"], "the child is one step: {view}");
    let child = only_child(&view);
    assert_eq!(child["workflow"], "reserve-capacity");
    assert_eq!(child["status"], "completed");
    assert_eq!(child["parent_id"], view["id"]);
    assert_eq!(child["parent_step"], 1);
    assert_eq!(steps_with(child, "done"), ["placement", "entitlements"], "{child}");
    assert!(child["definition_hash"].is_string(), "pinned to its own definition: {child}");
    // `baton workflows show` prints the child under its parent, indented.
    let out = tokio::process::Command::new(baton_tests::baton_bin())
        .args(["workflows", "show", view["id"].as_str().unwrap(), "--log", "warn"])
        .args(env.store_args())
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}{}", String::from_utf8_lossy(&out.stderr));
    let child_line =
        format!("    child saga of step 2: workflow {} (reserve-capacity)", child["id"].as_str().unwrap());
    assert!(shown.lines().any(|l| l.starts_with(&child_line)), "{shown}");
    assert!(
        shown.lines().any(|l| l.starts_with("      ") && l.contains("placement") && l.contains("done")),
        "{shown}"
    );
    // One saga per request in the lists: the child is shown in its parent.
    let (_, listed) = sys.get("/workflows").await;
    assert_eq!(listed["workflows"].as_array().map(Vec::len), Some(1), "{listed}");
    let id = body["id"].as_str().unwrap();
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, id), 1, "{s}");
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert_eq!(report.complete, 1);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_refusing_undoes_itself_then_the_parent_undoes_its_earlier_steps() {
    let env = TestEnv::new().await;
    // The free plan allows one space: the second request's licence is refused (403).
    let cfg = SystemConfig {
        services: ServiceConfig { plans: vec![("free".into(), 1)], ..ServiceConfig::default() },
        ..nested()
    };
    let sys = System::start(&env, cfg).await;
    let (status, ok) = sys.create("first", "bob").await;
    assert_eq!(status, 200, "{ok}");
    let (status, refused) = sys.create("second", "bob").await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["step"], "entitlements", "{refused}");
    let view = view_of(&sys, &refused).await;
    let story = saga_story(&env.store(), view["id"].as_str().unwrap());
    assert_eq!(view["status"], "rolled_back", "{story}");
    let child = only_child(&view);
    assert_eq!(child["status"], "rolled_back", "{child}");
    assert_eq!(steps_with(child, "refused"), ["entitlements"]);
    assert_eq!(steps_with(child, "compensated"), ["placement"], "the child undid its shard itself");
    // The parent undid its record only: the child had nothing left to undo.
    assert_eq!(steps_with(&view, "compensated"), ["records"], "{story}");
    assert!(!steps_with(&view, "sent").contains(&"routing".to_owned()), "{story}");
    nothing_left(&env, view["space_id"].as_str().unwrap(), &story);
    assert_eq!(env.audit().complete, 1);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_refusing_after_its_child_succeeded_undoes_the_child_as_a_whole_in_reverse() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, nested()).await;
    // `admin` is a reserved route key: routing refuses it, after the child reserved capacity.
    let (status, refused) = sys.create("admin", "carol").await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["step"], "routing", "{refused}");
    let view = view_of(&sys, &refused).await;
    let story = saga_story(&env.store(), view["id"].as_str().unwrap());
    assert_eq!(view["status"], "rolled_back", "{story}");
    let child = only_child(&view);
    assert_eq!(steps_with(child, "done"), ["placement", "entitlements"], "it had succeeded: {child}");
    assert_eq!(steps_with(child, "undo_requested"), ["saga"], "its parent asked: {child}");
    assert_eq!(steps_with(child, "compensated"), ["entitlements", "placement"], "in reverse: {child}");
    assert_eq!(child["status"], "rolled_back");
    // The parent undid the child as one step, then its record.
    assert_eq!(steps_with(&view, "compensated"), ["entitlements", "records"], "{story}");
    nothing_left(&env, view["space_id"].as_str().unwrap(), &story);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_of_the_parent_reaches_its_running_child() {
    let env = TestEnv::new().await;
    // Entitlements is not running: the child waits there, its shard assigned.
    let cfg = SystemConfig { skip: vec![Service::Entitlements], ..nested() };
    let sys = System::start(&env, cfg.clone()).await;
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("halt", "dave").await });
    let saga = wait_for("the child to wait for its licence", Duration::from_secs(20), || async {
        let (_, listed) = sys.get("/workflows").await;
        let id = listed["workflows"][0]["id"].as_str()?.to_owned();
        let (_, view) = sys.api().workflow(&id).await;
        let child = view["children"].get(0)?;
        timeline(child).iter().any(|(s, _, e)| s == "entitlements" && e == "sent").then_some(id)
    })
    .await;
    let cancel = {
        let (api, saga) = (sys.api(), saga.clone());
        tokio::spawn(async move { api.cancel(&saga).await })
    };
    wait_for("the cancel to reach the child", Duration::from_secs(20), || async {
        let (_, view) = sys.api().workflow(&saga).await;
        let child = view["children"].get(0)?;
        timeline(child).iter().any(|(_, _, e)| e == "cancel_requested").then_some(())
    })
    .await;
    // Entitlements comes back: it handles the licence late, then its compensation.
    let (entitlements, task) = spawn_service(&env, Service::Entitlements, &cfg);
    let (status, body) = cancel.await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")), "{body}");
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(status, 409, "{answer}");
    every_saga_ends(&env, Duration::from_secs(20)).await;
    let (_, view) = sys.api().workflow(&saga).await;
    let story = saga_story(&env.store(), &saga);
    assert_eq!(view["status"], "cancelled", "{story}");
    let child = only_child(&view);
    assert_eq!(child["status"], "cancelled", "the cancel reached the child: {child}");
    assert_eq!(steps_with(child, "compensated"), ["entitlements", "placement"], "{child}");
    assert_eq!(steps_with(&view, "compensated"), ["entitlements", "records"], "{story}");
    nothing_left(&env, view["space_id"].as_str().unwrap(), &story);
    entitlements.cancel();
    task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_on_postgresql_run_parents_and_children_between_them() {
    let env = TestEnv::on_postgres().await;
    let cfg = SystemConfig {
        services: ServiceConfig { plans: vec![("free".into(), 2)], ..ServiceConfig::default() },
        ..nested()
    };
    let sys = System::start(&env, cfg.clone()).await;
    // A second orchestrator instance on the same database: either may continue any saga,
    // a parent on one and its child on the other.
    let (second, second_task) = {
        let mut config = baton_tests::node_config(&env, &cfg);
        config.instance = "o2".into();
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        (cancel, tokio::spawn(async move { baton_node::run(Component::Orchestrator, &config, token).await }))
    };
    // Three owners with two spaces each succeed; a third space of each is refused in the
    // child; a reserved key is refused by the parent after its child succeeded.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..9 {
        let api = sys.api();
        calls.spawn(async move { api.create(&format!("pg-{i}"), &format!("owner-{}", i % 3)).await.0 });
    }
    let api = sys.api();
    calls.spawn(async move { api.create("www", "erin").await.0 });
    let mut statuses = Vec::new();
    while let Some(s) = calls.join_next().await {
        statuses.push(s.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 403, 403, 403, 409]);
    every_saga_ends(&env, Duration::from_secs(20)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert_eq!(report.complete, 6);
    let sagas = baton_tests::sagas(&env.store());
    assert_eq!(sagas.len(), 10, "one saga per request, its child inside");
    for s in &sagas {
        assert_eq!(s.children.len(), 1, "{}", saga_story(&env.store(), &s.id.to_string()));
    }
    second.cancel();
    second_task.await.unwrap().unwrap();
    sys.stop().await;
}

/// An orchestrator of `env` running `workflows`, in this process; stop it with the token.
fn orchestrator(
    env: &TestEnv,
    cfg: &SystemConfig,
    workflows: Vec<baton_workflow::Workflow>,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let config = baton_tests::node_config(env, &SystemConfig { workflows, ..cfg.clone() });
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    (cancel, tokio::spawn(async move { baton_node::run(Component::Orchestrator, &config, token).await }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_keeps_the_definition_it_started_on_when_its_workflow_changes() {
    let env = TestEnv::new().await;
    // Entitlements is not running yet: the first child waits for its licence.
    let cfg = SystemConfig { skip: vec![Service::Entitlements], with_orchestrator: false, ..nested() };
    let sys = System::start(&env, cfg.clone()).await;
    let old = baton_workflow::Workflow::reserve_capacity();
    let (first, first_task) = orchestrator(&env, &cfg, baton_workflow::Workflow::bundled());
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("early", "fay").await });
    wait_for("the first child to wait for its licence", Duration::from_secs(20), || async {
        let sagas = baton_tests::sagas(&env.store());
        let child = sagas.first()?.children.first()?.clone();
        child
            .history
            .iter()
            .any(|h| h.step.as_deref() == Some("entitlements") && h.event == "sent")
            .then_some(())
    })
    .await;
    // The orchestrator comes back with another version of the child: a longer licence timeout.
    first.cancel();
    first_task.await.unwrap().unwrap();
    let mut new = old.clone();
    new.steps[1].actions[0].timeout_ms += 1_000;
    assert_ne!(new.hash(), old.hash());
    let mut workflows = baton_workflow::Workflow::bundled();
    workflows.retain(|w| w.name != new.name);
    workflows.push(new.clone());
    let (second, second_task) = orchestrator(&env, &cfg, workflows);
    let (entitlements, task) = spawn_service(&env, Service::Entitlements, &cfg);
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = sys.create("late", "fay").await;
    assert_eq!(status, 200, "{body}");
    every_saga_ends(&env, Duration::from_secs(20)).await;
    let children: Vec<_> = baton_tests::sagas(&env.store())
        .into_iter()
        .flat_map(|s| s.children)
        .map(|c| c.definition_hash)
        .collect();
    assert_eq!(children, [Some(old.hash()), Some(new.hash())], "each child on the version it started on");
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert_eq!(report.complete, 2);
    entitlements.cancel();
    task.await.unwrap().unwrap();
    second.cancel();
    second_task.await.unwrap().unwrap();
    sys.stop().await;
}
