//! The orchestrator, as a real process, killed with SIGKILL in the middle of sagas: every saga
//! still ends exactly once, done or undone, and the audit is clean.

use std::time::Duration;

use baton_protocol::Service;
use baton_services::ServiceConfig;
use baton_tests::{System, SystemConfig, TestEnv, held, saga_count, spawn_baton, wait_for};
use baton_workflow::SagaStatus;
use tokio::process::Child;

fn orchestrator(env: &TestEnv, log: &str) -> Child {
    spawn_baton(env, &["run", "orchestrator", "--instance", "main"], &[], log)
}

/// Sagas in one of `statuses`, or `None` while the orchestrator has not made its store yet.
fn sagas_in(env: &TestEnv, statuses: &[SagaStatus]) -> Option<i64> {
    baton_tests::sagas_in(&env.store(), statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_killed_mid_saga_resumes_and_every_saga_ends_once() {
    let env = TestEnv::new().await;
    // A little latency in every step keeps sagas in flight when the kill lands.
    let cfg = SystemConfig {
        with_orchestrator: false,
        delay: Duration::from_millis(15),
        services: ServiceConfig { plans: vec![("free".into(), 2)], ..ServiceConfig::default() },
        ..SystemConfig::default()
    };
    let sys = std::sync::Arc::new(System::start(&env, cfg).await);
    let mut child = orchestrator(&env, "orchestrator-1.log");

    // 36 requests: 24 that succeed, 6 at reserved keys (undone at routing), 6 over quota
    // (undone at entitlements).
    let mut requests: Vec<(String, String)> =
        (0..24).map(|i| (format!("space-{i}"), format!("owner-{}", i / 2))).collect();
    for (i, key) in ["admin", "api", "www", "status", "admin", "api"].iter().enumerate() {
        requests.push((key.to_string(), format!("reserved-{i}")));
    }
    for i in 0..6 {
        requests.push((format!("extra-{i}"), format!("owner-{i}")));
    }
    let mut calls = tokio::task::JoinSet::new();
    for (name, owner) in requests.clone() {
        let sys = std::sync::Arc::clone(&sys);
        calls.spawn(async move { sys.create(&name, &owner).await });
    }

    wait_for("sagas in flight to kill the orchestrator under", Duration::from_secs(20), || async {
        (sagas_in(&env, &[SagaStatus::Running, SagaStatus::Compensating])? >= 5).then_some(())
    })
    .await;
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited: {status}");
    let in_flight = sagas_in(&env, &[SagaStatus::Running, SagaStatus::Compensating]).expect("a store");
    assert!(in_flight > 0, "the kill landed while sagas were in flight");

    let mut child = orchestrator(&env, "orchestrator-2.log");
    let mut statuses = Vec::new();
    let all = async {
        while let Some(r) = calls.join_next().await {
            statuses.push(r.unwrap().0);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every client gets an answer within 60 s");
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(statuses.len(), requests.len());
    assert!(statuses.iter().all(|s| [200, 403, 409].contains(s)), "only business outcomes: {statuses:?}");
    assert_eq!(ok, 24, "{statuses:?}");

    wait_for("every saga to end", Duration::from_secs(30), || async {
        let ended = [SagaStatus::Completed, SagaStatus::RolledBack];
        let open: Vec<_> = SagaStatus::ALL.into_iter().filter(|s| !ended.contains(s)).collect();
        (sagas_in(&env, &open)? == 0).then_some(())
    })
    .await;
    assert_eq!(saga_count(&env.store()), requests.len() as i64, "one saga per request, none twice");
    assert_eq!(sagas_in(&env, &[SagaStatus::Completed]), Some(24));
    assert_eq!(held(&env.store(), Service::Notifier), 24, "one email per success");
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    assert_eq!(report.complete, 24);

    child.start_kill().unwrap();
    let _ = child.wait().await;
    std::sync::Arc::into_inner(sys).expect("no request holds the system").stop().await;
}
