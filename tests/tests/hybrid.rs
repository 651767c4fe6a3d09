//! Hybrid mode end to end on the real broker: a saga for the steps that may need undoing, then
//! the orchestrator's `space.created`, to which the email and the search index react on their
//! own. The client is answered before the follow-ups, and they converge.

use std::time::Duration;

use baton_protocol::{Component, Mode, Service};
use baton_services::ServiceConfig;
use baton_tests::{
    System, SystemConfig, TestEnv, every_outbox_drains, every_saga_ends, rows_for, spawn_service, wait_for,
};
use tokio_util::sync::CancellationToken;

fn hybrid() -> SystemConfig {
    SystemConfig { mode: Mode::Hybrid, workflow: "create-space-hybrid".into(), ..SystemConfig::default() }
}

/// Wait until `service` holds exactly one row for `space`.
async fn followed_up(env: &TestEnv, service: Service, space: &str) {
    let (at, space) = (env.store(), space.to_owned());
    wait_for(&format!("{service} to follow up {space}"), Duration::from_secs(20), || {
        let (at, space) = (at.clone(), space.clone());
        async move {
            let n = tokio::task::spawn_blocking(move || rows_for(&at, service, &space)).await.ok()?;
            (n == 1).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_answered_before_the_follow_ups_which_then_converge() {
    let env = TestEnv::new().await;
    // The follow-ups are not even running: the answer cannot have waited for them.
    let cfg = SystemConfig { skip: vec![Service::Notifier, Service::Search], ..hybrid() };
    let sys = System::start(&env, cfg.clone()).await;
    let (status, body) = sys.create("hyb", "alice").await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(body["workflow_id"].is_string(), "a saga ran: {body}");
    every_saga_ends(&env, Duration::from_secs(10)).await;
    let (_, view) = sys.get(&format!("/workflows/{}", body["workflow_id"].as_str().unwrap())).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert!(view.to_string().contains("emitted"), "the event step is in the timeline: {view}");
    for s in [Service::Records, Service::Placement, Service::Entitlements, Service::Routing] {
        assert_eq!(rows_for(&env.store(), s, &id), 1, "{s}");
    }
    assert_eq!(rows_for(&env.store(), Service::Notifier, &id), 0, "no email yet");
    // The follow-ups start late and catch up from their queues, each exactly once.
    let followers: Vec<_> = Service::FOLLOW_UPS.iter().map(|s| spawn_service(&env, *s, &cfg)).collect();
    for s in Service::FOLLOW_UPS {
        followed_up(&env, s, &id).await;
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert_eq!(report.complete, 1, "a complete space has its email and its search entry too");
    // The announcement has its own key: events mode's queue of `space.created` never gets it.
    assert_eq!(env.queue_depth("placement.events").await, Some(0));
    for (cancel, task) in followers {
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_step_is_compensated_and_nothing_is_announced() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        services: ServiceConfig { plans: vec![("free".into(), 1)], ..ServiceConfig::default() },
        ..hybrid()
    };
    let sys = System::start(&env, cfg).await;
    let (s, ok) = sys.create("mine", "bob").await;
    assert_eq!(s, 200, "{ok}");
    let (s, refused) = sys.create("mine-too", "bob").await;
    assert_eq!(s, 403, "{refused}");
    assert_eq!(refused["step"], "entitlements");
    let ok_id = ok["id"].as_str().unwrap();
    for f in Service::FOLLOW_UPS {
        followed_up(&env, f, ok_id).await;
    }
    every_saga_ends(&env, Duration::from_secs(10)).await;
    every_outbox_drains(&env, Duration::from_secs(10)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert_eq!((report.spaces, report.complete), (2, 1), "{report:?}");
    assert!(
        report.orphans.is_empty(),
        "the refused space left nothing, no email nor index: {:?}",
        report.orphans
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_on_postgresql_announce_each_space_once() {
    let env = TestEnv::on_postgres().await;
    let cfg = hybrid();
    let sys = System::start(&env, cfg.clone()).await;
    // A second orchestrator instance on the same database: either may continue any saga.
    let second = {
        let mut config = baton_tests::node_config(&env, &cfg);
        config.instance = "o2".into();
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        (cancel, tokio::spawn(async move { baton_node::run(Component::Orchestrator, &config, token).await }))
    };
    let mut ids = Vec::new();
    for i in 0..6 {
        let (status, body) = sys.create(&format!("pg-{i}"), &format!("owner-{i}")).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        for f in Service::FOLLOW_UPS {
            followed_up(&env, f, id).await;
        }
    }
    every_saga_ends(&env, Duration::from_secs(10)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert_eq!(report.complete, 6);
    second.0.cancel();
    second.1.await.unwrap().unwrap();
    sys.stop().await;
}
