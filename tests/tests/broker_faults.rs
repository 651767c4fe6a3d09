//! The broker itself failing under load: its application stopped and started again, and a
//! memory alarm that blocks publishers. Each test runs its own RabbitMQ node, so the broker the
//! other tests share is never disturbed.

use std::sync::Arc;
use std::time::Duration;

use baton_tests::node::Node;
use baton_tests::{System, SystemConfig, TestEnv, scalar, wait_for};
use tokio::task::JoinSet;

/// Fire `n` requests, one every 25 ms, in the background; every 10th at a reserved key.
fn load(sys: &Arc<System>, n: usize, tag: &'static str) -> JoinSet<(u16, serde_json::Value)> {
    let mut calls = JoinSet::new();
    for i in 0..n {
        let sys = Arc::clone(sys);
        calls.spawn(async move {
            tokio::time::sleep(Duration::from_millis(25 * i as u64)).await;
            let name = if i % 10 == 9 { "admin".to_string() } else { format!("{tag}-{i}") };
            sys.create(&name, &format!("owner-{}", i / 3)).await
        });
    }
    calls
}

/// `GET /health`: its status and reason; 0 if it did not answer within 5 s (it must).
async fn health(sys: &System) -> (u16, String) {
    match tokio::time::timeout(Duration::from_secs(5), sys.get("/health")).await {
        Ok((s, v)) => (s, v["error"].as_str().unwrap_or_default().to_owned()),
        Err(_) => (0, "no answer within 5 s".into()),
    }
}

/// Every answer is true: a 200 has a complete space, a refusal has none, and a 503 was either
/// turned away before anything started or rolled back. Every saga ended; the audit is clean.
async fn nothing_wrong(env: &TestEnv, mut calls: JoinSet<(u16, serde_json::Value)>) -> Vec<u16> {
    let mut statuses = Vec::new();
    tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = calls.join_next().await {
            let (s, body) = r.unwrap();
            assert!(
                [200, 409, 503].contains(&s),
                "{s} {body}\n{}",
                body["workflow_id"]
                    .as_str()
                    .map(|id| baton_tests::saga_story(env.data_dir(), id))
                    .unwrap_or_default()
            );
            if s == 503 {
                // Either turned away before anything started, or a step that could not be
                // reached through the outage was given up and the saga rolled back (the
                // audit below checks that nothing of it remains).
                let error = body["error"].as_str().unwrap();
                let rolled_back = body["step"].is_string() && error.contains("did not answer");
                assert!(error.contains("not taking new work") || rolled_back, "{body}");
            }
            statuses.push(s);
        }
    })
    .await
    .expect("every request is answered");
    baton_tests::every_saga_ends(env, Duration::from_secs(60)).await;
    for db in ["records", "placement", "entitlements", "routing", "notifier", "orchestrator"] {
        wait_for(&format!("{db}'s outbox to drain"), Duration::from_secs(30), || async {
            (scalar(env.data_dir(), &format!("{db}.db"), "SELECT COUNT(*) FROM outbox") == 0).then_some(())
        })
        .await;
    }
    let report = env.audit();
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert_eq!(report.complete, statuses.iter().filter(|s| **s == 200).count());
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_and_started_mid_load_loses_nothing_and_answers_nothing_wrong() {
    let node = tokio::task::spawn_blocking(Node::start).await.unwrap();
    let env = TestEnv::on_broker(&node.url("127.0.0.1"));
    let sys = Arc::new(
        System::start(&env, SystemConfig { delay: Duration::from_millis(3), ..SystemConfig::default() })
            .await,
    );
    let calls = load(&sys, 80, "restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.ctl(&["stop_app"]);
    let (s, why) = wait_for("/health to say the broker is away", Duration::from_secs(15), || async {
        let h = health(&sys).await;
        (h.0 == 503).then_some(h)
    })
    .await;
    assert_eq!(s, 503);
    assert!(why.contains("RabbitMQ"), "{why}");
    // New work is refused cleanly while it is away, not left hanging.
    let t = std::time::Instant::now();
    let (s, body) = sys.create("while-away", "zoe").await;
    assert_eq!(s, 503, "{body}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    node.ctl(&["start_app"]);
    wait_for("/health to recover by itself", Duration::from_secs(60), || async {
        (health(&sys).await.0 == 200).then_some(())
    })
    .await;
    let statuses = nothing_wrong(&env, calls).await;
    assert!(statuses.iter().filter(|s| **s == 200).count() >= 20, "work resumed: {statuses:?}");
    Arc::into_inner(sys).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_for_a_while_and_the_outboxes_drain_after() {
    let node = tokio::task::spawn_blocking(Node::start).await.unwrap();
    let env = TestEnv::on_broker(&node.url("127.0.0.1"));
    let sys = Arc::new(
        System::start(&env, SystemConfig { delay: Duration::from_millis(3), ..SystemConfig::default() })
            .await,
    );
    let mut calls = load(&sys, 60, "alarm");
    tokio::time::sleep(Duration::from_millis(400)).await;
    node.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    // RabbitMQ blocks a connection when it next publishes: one more request makes sure the
    // gateway's does, whenever the load above happens to end.
    let late = Arc::clone(&sys);
    calls.spawn(async move { late.create("after-the-alarm", "zed").await });
    let (_, why) = wait_for("/health to report the alarm", Duration::from_secs(15), || async {
        let h = health(&sys).await;
        (h.0 == 503).then_some(h)
    })
    .await;
    assert!(why.contains("blocking publishers"), "{why}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    wait_for("/health to recover", Duration::from_secs(30), || async {
        (health(&sys).await.0 == 200).then_some(())
    })
    .await;
    nothing_wrong(&env, calls).await;
    Arc::into_inner(sys).unwrap().stop().await;
}
