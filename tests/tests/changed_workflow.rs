//! An orchestrator restarted with a changed definition under sagas in flight refuses to start,
//! naming them; restarted with the definition they started on, it finishes them.

use std::sync::Arc;
use std::time::Duration;

use baton_protocol::Service;
use baton_tests::{
    System, SystemConfig, TestEnv, every_saga_ends, scalar, spawn_baton, spawn_service, wait_for,
};

const IN_FLIGHT: usize = 5;

/// A count from the orchestrator's database; 0 while the database or its tables are not made yet.
fn count(env: &TestEnv, sql: &str) -> i64 {
    baton_tests::sqlite(env.data_dir(), "orchestrator")
        .ok()
        .and_then(|c| c.query_row(sql, [], |r| r.get(0)).ok())
        .unwrap_or(0)
}

/// `create-space` with its routing step removed, as an operator might edit it.
fn without_routing(env: &TestEnv) -> std::path::PathBuf {
    let text = include_str!("../../crates/workflow/workflows/create-space.json");
    let mut wf: serde_json::Value = serde_json::from_str(text).unwrap();
    wf["steps"].as_array_mut().unwrap().retain(|s| s["name"] != "publish-route");
    assert_eq!(wf["steps"].as_array().unwrap().len(), 4);
    let path = env.data_dir().join("create-space-without-routing.json");
    std::fs::write(&path, wf.to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_definition_under_sagas_in_flight_is_refused_and_the_original_finishes_them() {
    let env = TestEnv::new().await;
    // Routing is down: the sagas wait at its step.
    let cfg = SystemConfig {
        with_orchestrator: false,
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(120),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let args = ["run", "orchestrator", "--instance", "main"];
    let mut first = spawn_baton(&env, &args, &[], "orchestrator-1.log");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let sys = Arc::clone(&sys);
        calls.spawn(async move { sys.create(&format!("space-{i}"), &format!("owner-{i}")).await });
    }
    wait_for("every saga to wait at routing", Duration::from_secs(30), || async {
        let at_routing = count(
            &env,
            "SELECT COUNT(DISTINCT saga_id) FROM history WHERE step = 'routing' AND event = 'sent'",
        );
        (at_routing == IN_FLIGHT as i64).then_some(())
    })
    .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    // Restarted with routing removed from create-space: it refuses, and says what to do.
    let file = without_routing(&env);
    let changed = [&args[..], &["--workflow-file", file.to_str().unwrap()]].concat();
    let mut refused = spawn_baton(&env, &changed, &[], "orchestrator-2.log");
    let status = tokio::time::timeout(Duration::from_secs(30), refused.wait())
        .await
        .expect("the orchestrator exits on its own")
        .unwrap();
    let log = std::fs::read_to_string(env.data_dir().join("orchestrator-2.log")).unwrap();
    assert_eq!(status.code(), Some(2), "exit 2 for a refusal to start: {log}");
    assert!(log.contains("workflow `create-space` changed under 5 saga(s) in flight"), "{log}");
    let one: String = baton_tests::sqlite(env.data_dir(), "orchestrator")
        .unwrap()
        .query_row("SELECT saga_id FROM sagas ORDER BY created_at LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert!(log.contains(&one), "the error names the sagas: {log}");
    assert!(log.contains("baton workflows list --state running"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        count(&env, "SELECT COUNT(*) FROM sagas WHERE status = 'running'"),
        IN_FLIGHT as i64,
        "the refused start changed no saga"
    );

    // With the original definition, it starts and finishes them once routing is back.
    let mut second = spawn_baton(&env, &args, &[], "orchestrator-3.log");
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    let mut statuses = Vec::new();
    let all = async {
        while let Some(r) = calls.join_next().await {
            statuses.push(r.unwrap().0);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all).await.expect("every client gets an answer");
    assert_eq!(statuses, vec![200; IN_FLIGHT]);
    every_saga_ends(&env, Duration::from_secs(30)).await;
    assert_eq!(scalar(&env.store(), "notifier", "SELECT COUNT(*) FROM emails"), IN_FLIGHT as i64);
    let report = env.audit();
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert_eq!(report.complete, IN_FLIGHT);
    let log = std::fs::read_to_string(env.data_dir().join("orchestrator-3.log")).unwrap();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "a normal start logs no error or warning: {log}"
    );

    second.start_kill().unwrap();
    let _ = second.wait().await;
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_definition_starts_normally_over_sagas_in_flight() {
    let env = TestEnv::new().await;
    let cfg =
        SystemConfig { with_orchestrator: false, skip: vec![Service::Routing], ..SystemConfig::default() };
    let sys = Arc::new(System::start(&env, cfg).await);
    let args = ["run", "orchestrator", "--instance", "main"];
    let mut first = spawn_baton(&env, &args, &[], "orchestrator-1.log");
    let call = {
        let sys = Arc::clone(&sys);
        tokio::spawn(async move { sys.try_create("acme", "alice").await })
    };
    wait_for("the saga to wait at routing", Duration::from_secs(30), || async {
        (count(&env, "SELECT COUNT(*) FROM history WHERE step = 'routing' AND event = 'sent'") > 0)
            .then_some(())
    })
    .await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    // The bundled definition, given again as a file: the same content, so no refusal.
    let file = env.data_dir().join("create-space.json");
    std::fs::write(&file, include_str!("../../crates/workflow/workflows/create-space.json")).unwrap();
    let same = [&args[..], &["--workflow-file", file.to_str().unwrap()]].concat();
    let mut second = spawn_baton(&env, &same, &[], "orchestrator-2.log");
    wait_for("the restarted orchestrator to time routing out", Duration::from_secs(30), || async {
        (count(&env, "SELECT COUNT(*) FROM history WHERE step = 'routing' AND event = 'timed_out'") > 0)
            .then_some(())
    })
    .await;
    assert!(second.try_wait().unwrap().is_none(), "it is still running");
    second.start_kill().unwrap();
    let _ = second.wait().await;
    call.abort();
    let _ = call.await;
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}
