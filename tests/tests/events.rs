//! Events mode (choreography) end to end on the real broker: what it does well, what it leaves
//! behind, and how `baton reconcile` repairs it.

use std::time::Duration;

use baton_audit::Kind;
use baton_protocol::{Mode, Service};
use baton_services::ServiceConfig;
use baton_tests::{System, SystemConfig, TestEnv, rows_for, spawn_service, wait_for};

fn events() -> SystemConfig {
    SystemConfig { mode: Mode::Events, deadline: Duration::from_secs(10), ..SystemConfig::default() }
}

async fn reconcile(env: &TestEnv) -> baton_reconcile::Summary {
    let opts = baton_reconcile::Options {
        amqp_url: env.amqp_url().into(),
        store: env.store(),
        older_than: Duration::ZERO,
        timeout: Duration::from_secs(20),
    };
    baton_reconcile::reconcile(&opts).await.expect("reconcile runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_success_creates_all_five_rows() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, events()).await;
    let (status, body) = sys.create("evt", "alice").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("workflow_id").is_none(), "no saga in events mode: {body}");
    let id = body["id"].as_str().unwrap();
    assert_eq!(body["route"], format!("evt -> {}", body["shard"].as_str().unwrap()));
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, id), 1, "{s}");
    }
    let (_, health) = sys.get("/health").await;
    assert_eq!(health["mode"], "events");
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    assert!(!env.data_dir().join("orchestrator.db").exists(), "no orchestrator in events mode");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_at_entitlements_leaves_a_record_and_a_placement_until_reconcile() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        services: ServiceConfig { plans: vec![("free".into(), 1)], ..ServiceConfig::default() },
        ..events()
    };
    let sys = System::start(&env, cfg).await;
    let (s, _) = sys.create("mine", "bob").await;
    assert_eq!(s, 200);
    let (s, body) = sys.create("mine-too", "bob").await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["step"], "entitlements");
    let report = env.audit();
    assert_eq!(report.inconsistencies.len(), 1, "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "{:?}", report.uncertain);
    let v = &report.inconsistencies[0];
    assert_eq!(v.kind, Kind::LeftAfterFailure);
    assert_eq!(v.present, vec![Service::Records, Service::Placement], "nobody undid the first two steps");

    let fixed = reconcile(&env).await;
    assert_eq!(fixed.found, 1, "{fixed}");
    assert_eq!(fixed.fixed_rows.get(&Service::Records), Some(&1), "{fixed}");
    assert_eq!(fixed.fixed_rows.get(&Service::Placement), Some(&1), "{fixed}");
    assert!(fixed.failed.is_empty(), "{fixed}");
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    assert_eq!(reconcile(&env).await.found, 0, "a second run finds nothing");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_down_gives_a_504_then_the_space_completes_when_it_returns() {
    let env = TestEnv::new().await;
    let cfg =
        SystemConfig { skip: vec![Service::Routing], deadline: Duration::from_millis(1500), ..events() };
    let sys = System::start(&env, cfg.clone()).await;
    let (s, body) = sys.create("late", "carol").await;
    assert_eq!(s, 504, "{body}");
    let id = body["space_id"].as_str().expect("the 504 names the space").to_owned();
    assert!(body["error"].as_str().unwrap().contains(&format!("GET /spaces/{id}")), "{body}");
    // Told 504 with only some rows (the flow waits at routing): inconsistent for now.
    let report = env.audit();
    assert_eq!(report.inconsistencies.iter().map(|v| v.kind).collect::<Vec<_>>(), [Kind::Partial]);
    assert!(report.uncertain.is_empty(), "{:?}", report.uncertain);

    let (stop_routing, routing) = spawn_service(&env, Service::Routing, &cfg);
    let space = wait_for("the space to complete once routing is back", Duration::from_secs(20), || {
        let sys = &sys;
        let id = id.clone();
        async move {
            let (_, v) = sys.get(&format!("/spaces/{id}")).await;
            (v["outcome_status"] == 200).then_some(v)
        }
    })
    .await;
    assert_eq!(space["told_status"], 504, "the client was told it timed out");
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &id), 1, "{s}");
    }
    // Complete now: consistent, and uncertain for the client told 504.
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert_eq!(report.uncertain.iter().map(|v| v.kind).collect::<Vec<_>>(), [Kind::TimedOutButCompleted]);
    stop_routing.cancel();
    routing.await.unwrap().unwrap();
    sys.stop().await;
}
