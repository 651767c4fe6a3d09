//! Every component, killed with a real SIGKILL at each dangerous instant it has (a crash point
//! armed through `BATON_CRASH_AT`), then restarted: every saga ends exactly once, fully done or
//! fully undone, nothing lost, nothing applied twice. In workflow mode and in hybrid mode, where
//! the follow-ups (the email, the search index) also converge, each exactly once per success.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use baton_crash as crash;
use baton_protocol::{Mode, Service};
use baton_services::ServiceConfig;
use baton_tests::{System, SystemConfig, TestEnv, free_port, held, spawn_baton, wait_for};
use baton_workflow::SagaStatus;

/// 14 requests: 6 that succeed, 4 at reserved keys (three steps undone at routing) and 4 over
/// the quota of 2 (undone at entitlements).
fn requests() -> Vec<(String, String)> {
    let mut r: Vec<(String, String)> =
        (0..6).map(|i| (format!("ok-{i}"), format!("owner-{}", i / 2))).collect();
    r.extend(
        ["admin", "api", "www", "status"]
            .iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), format!("res-{i}"))),
    );
    r.extend((0..4).map(|i| (format!("over-{i}"), format!("owner-{}", i % 3))));
    r
}

/// Sagas in one of `statuses` (0 while the orchestrator has not made its store yet).
fn sagas_in(env: &TestEnv, statuses: &[SagaStatus]) -> i64 {
    baton_tests::sagas_in(&env.store(), statuses).unwrap_or(0)
}

/// Run the load with `component` as a process armed to die at `point`, restart it, and check.
async fn crash_at(component: &str, point: &str, workflow: &str) {
    crash_in(Mode::Workflow, component, point, workflow).await;
}

/// [`crash_at`] in `mode`.
async fn crash_in(mode: Mode, component: &str, point: &str, workflow: &str) {
    let env = TestEnv::new().await;
    let service = Service::parse(component);
    let cfg = SystemConfig {
        mode,
        services: ServiceConfig { plans: vec![("free".into(), 2)], ..ServiceConfig::default() },
        workflow: workflow.into(),
        skip: service.into_iter().collect(),
        with_orchestrator: component != "orchestrator",
        with_gateway: component != "gateway",
        delay: Duration::from_millis(5),
        ..SystemConfig::default()
    };
    let mut sys = System::start(&env, cfg).await;
    let port = free_port().to_string();
    let http = format!("127.0.0.1:{port}");
    // Each component takes its own flags only.
    let mut args: Vec<&str> = match component {
        "gateway" => vec!["run", component, "--workflow", workflow, "--http", &http],
        "orchestrator" => vec!["run", component],
        _ => vec!["run", component, "--plans", "free:2"],
    };
    args.extend(["--mode", mode.as_str()]);
    // Replies leave in batches, so a component may publish only a couple of them: die at the
    // first batch, but only after a few commits.
    let nth = if point == crash::AFTER_PUBLISH_BEFORE_DELETE { 1 } else { 3 };
    let armed = format!("{point}:{nth}");
    let mut child = spawn_baton(&env, &args, &[("BATON_CRASH_AT", &armed)], &format!("{component}-1.log"));
    if component == "gateway" {
        sys.use_gateway(format!("127.0.0.1:{port}").parse().unwrap()).await;
    }
    let sys = Arc::new(sys);
    let mut calls = tokio::task::JoinSet::new();
    for (name, owner) in requests() {
        let sys = Arc::clone(&sys);
        calls.spawn(async move { sys.try_create(&name, &owner).await });
        // A little spacing, so that the crash lands while work is in flight, not before it.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{component} ({mode}) never reached {point}; a `baton` built without the crash-points feature \
                 has none (build it with `cargo build --workspace`, or `-p baton-cli --features crash-points`)"
            )
        })
        .unwrap();
    assert_eq!(status.signal(), Some(9), "{component} died by SIGKILL at {point}");

    let _child = spawn_baton(&env, &args, &[], &format!("{component}-2.log"));
    let mut statuses = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = calls.join_next().await {
            statuses.push(r.unwrap());
        }
    })
    .await
    .expect("every request ends within 60 s");
    if component != "gateway" {
        // A dead gateway cannot answer the clients it held; every other crash is invisible to them.
        assert!(statuses.iter().all(|s| [200, 403, 409].contains(s)), "{component}@{point}: {statuses:?}");
    }
    // A dead gateway never handed on the requests it had not published yet: those have no saga.
    let expected = if component == "gateway" { None } else { Some(requests().len() as i64) };
    wait_for("every saga to end", Duration::from_secs(30), || async {
        let sagas = sagas_in(&env, &SagaStatus::ALL);
        let ended = [SagaStatus::Completed, SagaStatus::RolledBack];
        let open: Vec<_> = SagaStatus::ALL.into_iter().filter(|s| !ended.contains(s)).collect();
        let open = sagas_in(&env, &open);
        (expected.is_none_or(|n| n == sagas) && open == 0).then_some(())
    })
    .await;
    let completed = sagas_in(&env, &[SagaStatus::Completed]);
    if component != "gateway" {
        assert_eq!(completed, 6, "{component}@{point}");
    }
    // In hybrid mode the follow-ups come after the answer: wait for them, then none may be more.
    let followers: &[Service] =
        if mode == Mode::Hybrid { &Service::FOLLOW_UPS } else { &[Service::Notifier] };
    for &f in followers {
        let at = env.store();
        wait_for(&format!("{f} to follow up every success"), Duration::from_secs(30), || {
            let at = at.clone();
            async move {
                let n = tokio::task::spawn_blocking(move || held(&at, f) as i64).await.ok()?;
                (n >= completed).then_some(())
            }
        })
        .await;
        assert_eq!(held(&env.store(), f) as i64, completed, "{component}@{point}: one {f} row per success");
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{mode} {component}@{point}: {:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {component}@{point}: {:#?}", report.uncertain);
    assert_eq!(report.complete as i64, completed);
    Arc::into_inner(sys).expect("requests are done").stop().await;
}

async fn every_point(component: &str) {
    for point in [crash::AFTER_COMMIT_BEFORE_ACK, crash::AFTER_PUBLISH_BEFORE_DELETE] {
        crash_at(component, point, "create-space").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survives_its_crash_points() {
    every_point("records").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_survives_its_crash_points() {
    every_point("placement").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlements_survives_its_crash_points() {
    every_point("entitlements").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_survives_its_crash_points() {
    every_point("routing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifier_survives_its_crash_points() {
    every_point("notifier").await;
}

/// The gateway has no outbox (it publishes a request while its client waits, and a crash there
/// fails that client's call), so its one dangerous instant is between commit and ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_survives_its_crash_point() {
    crash_at("gateway", crash::AFTER_COMMIT_BEFORE_ACK, "create-space").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_survives_its_crash_points() {
    every_point("orchestrator").await;
    crash_at("orchestrator", crash::BETWEEN_COMPENSATIONS, "create-space").await;
    crash_at("orchestrator", crash::MID_PARALLEL_GROUP, "create-space-parallel").await;
}

/// A child saga ends and its parent moves on in one commit; the orchestrator dies right after
/// it, before the parent's next command (or compensation) is published. The load has parents
/// going on after their child, children refusing (over the quota), and parents refusing after
/// their child succeeded (reserved keys), which then undo the child as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_survives_a_crash_between_a_child_and_its_parent() {
    crash_at("orchestrator", crash::CHILD_ENDED, "create-space-nested").await;
    crash_at("orchestrator", crash::AFTER_COMMIT_BEFORE_ACK, "create-space-nested").await;
}

/// Hybrid mode: the saga's services and the gateway as in workflow mode, each at its points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_saga_services_survive_their_crash_points() {
    for component in ["records", "placement", "entitlements", "routing"] {
        for point in [crash::AFTER_COMMIT_BEFORE_ACK, crash::AFTER_PUBLISH_BEFORE_DELETE] {
            crash_in(Mode::Hybrid, component, point, "create-space-hybrid").await;
        }
    }
    crash_in(Mode::Hybrid, "gateway", crash::AFTER_COMMIT_BEFORE_ACK, "create-space-hybrid").await;
}

/// The follow-ups publish nothing, so their one dangerous instant is between commit and ack:
/// the redelivered `space.created` finds its inbox row, and nobody gets a second email or entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_follow_ups_survive_their_crash_point() {
    for component in ["notifier", "search"] {
        crash_in(Mode::Hybrid, component, crash::AFTER_COMMIT_BEFORE_ACK, "create-space-hybrid").await;
    }
}

/// The orchestrator of hybrid mode, killed also right after a saga's commit that holds its
/// announcement, before the relay published it: the restarted relay publishes it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_orchestrator_survives_its_crash_points() {
    for point in [
        crash::AFTER_COMMIT_BEFORE_ACK,
        crash::AFTER_PUBLISH_BEFORE_DELETE,
        crash::AFTER_ANNOUNCE_COMMIT,
        crash::BETWEEN_COMPENSATIONS,
    ] {
        crash_in(Mode::Hybrid, "orchestrator", point, "create-space-hybrid").await;
    }
}
