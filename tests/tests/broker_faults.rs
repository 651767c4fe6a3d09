//! The broker itself failing under load: its application stopped and started again, and a
//! memory alarm that blocks publishers. Each test runs its own RabbitMQ node, so the broker the
//! other tests share is never disturbed.

use std::sync::Arc;
use std::time::Duration;

use baton_protocol::Service;
use baton_tests::node::Node;
use baton_tests::{System, SystemConfig, TestEnv, held, spawn_service, wait_for};
use tokio::task::JoinSet;

/// Rows waiting in each component's outbox, through the stores' read model (0 for a component
/// whose store is not made yet: one starting up).
fn outbox_rows(env: &TestEnv) -> Vec<(&'static str, i64)> {
    let count = |db: &str| {
        let (at, component) = (env.store(), baton_protocol::Component::parse(db).expect("a component"));
        let counts = baton_tests::block_on(async move { baton_store::StoreCounts::of(&at, component).await });
        counts.ok().flatten().map_or(0, |c| c.outbox)
    };
    baton_tests::publishers().map(|db| (db, count(db))).collect()
}

/// The most rows seen waiting in each outbox, sampled every 50 ms for `span`.
async fn sample_outboxes(env: &TestEnv, span: Duration) -> Vec<(&'static str, i64)> {
    let mut most: Vec<(&'static str, i64)> = baton_tests::publishers().map(|db| (db, 0)).collect();
    let end = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < end {
        for (m, (_, n)) in most.iter_mut().zip(outbox_rows(env)) {
            m.1 = m.1.max(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    most
}

/// `POST /spaces` while the broker is away or blocking: a clean 503 that says why, within
/// 10 s (the gateway waits 3 s for the broker before refusing) rather than a hang.
async fn refused_cleanly(sys: &System, name: &str, why: &str) {
    let t = std::time::Instant::now();
    let (s, body) = tokio::time::timeout(Duration::from_secs(10), sys.create(name, "zoe"))
        .await
        .unwrap_or_else(|_| panic!("POST /spaces hung for 10 s while the broker {why}"));
    assert_eq!(s, 503, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("not taking new work"), "{body}");
    assert!(error.contains(why), "the reason is given: {body}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

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
                    .map(|id| baton_tests::saga_story(&env.store(), id))
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
    baton_tests::every_outbox_drains(env, Duration::from_secs(30)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
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
    // New work is refused cleanly while it is away, not left hanging; meanwhile, what the
    // components committed but could not publish waits in their outboxes.
    let (_, pending) = tokio::join!(
        refused_cleanly(&sys, "while-away", "RabbitMQ"),
        sample_outboxes(&env, Duration::from_secs(4))
    );
    // Whether a saga was between a commit and its publish when the broker went away is a race
    // of the load against the stop: logged, not asserted.
    eprintln!("outbox rows seen waiting during the outage: {pending:?}");
    node.ctl(&["start_app"]);
    wait_for("/health to recover by itself", Duration::from_secs(60), || async {
        (health(&sys).await.0 == 200).then_some(())
    })
    .await;
    let statuses = nothing_wrong(&env, calls).await;
    assert!(outbox_rows(&env).iter().all(|(_, n)| *n == 0), "{:?}", outbox_rows(&env));
    assert!(statuses.iter().filter(|s| **s == 200).count() >= 20, "work resumed: {statuses:?}");
    Arc::into_inner(sys).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_blocks_publishers_for_a_while_and_the_outboxes_drain_after() {
    let node = tokio::task::spawn_blocking(Node::start).await.unwrap();
    let env = TestEnv::on_broker(&node.url("127.0.0.1"));
    // The notifier is not running yet: sagas are answered (the email does not hold the
    // client up) and their notify commands wait in its queue, to be handled during the alarm.
    let cfg = SystemConfig {
        delay: Duration::from_millis(3),
        skip: vec![Service::Notifier],
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let mut calls = load(&sys, 60, "alarm");
    tokio::time::sleep(Duration::from_millis(400)).await;
    wait_for("notify commands waiting for the notifier", Duration::from_secs(15), || async {
        env.queue_depth("notifier.commands").await.filter(|n| *n >= 3)
    })
    .await;
    node.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    // RabbitMQ blocks a connection when it next publishes: one more request makes sure the
    // gateway's does, whenever the load above happens to end.
    let late = Arc::clone(&sys);
    calls.spawn(async move { late.create("after-the-alarm", "zed").await });
    // Then the gateway's own connection is blocked: /health names each component's, and
    // another's may be blocked first, while the gateway would still take the next request.
    let (_, why) =
        wait_for("/health to report the gateway's connection blocked", Duration::from_secs(15), || async {
            let h = health(&sys).await;
            let gateway_blocked = h.1.split("; ").any(|failing| {
                failing.contains("gateway: broker connected") && failing.contains("blocking publishers")
            });
            (h.0 == 503 && gateway_blocked).then_some(h)
        })
        .await;
    assert!(why.contains("blocking publishers"), "{why}");
    // A new request during the alarm is refused cleanly, with the reason, not left hanging.
    refused_cleanly(&sys, "during-the-alarm", "blocking publishers").await;
    // The notifier starts during the alarm: it still gets the notify commands (an alarm
    // blocks publishers, not consumers), commits each email with its reply in its outbox, and
    // cannot publish those replies while the broker blocks its connection.
    let (stop_notifier, notifier) = spawn_service(&env, Service::Notifier, &cfg);
    let waiting = wait_for("replies waiting in the notifier's outbox", Duration::from_secs(15), || async {
        let rows = outbox_rows(&env);
        (rows.iter().any(|(db, n)| *db == "notifier" && *n > 0)).then_some(rows)
    })
    .await;
    let emails = held(&env.store(), Service::Notifier);
    let more = sample_outboxes(&env, Duration::from_secs(2)).await;
    eprintln!("outbox rows during the alarm: {waiting:?}, then at most {more:?}; {emails} emails committed");
    let (s, _) = health(&sys).await;
    assert_eq!(s, 503, "the alarm was still on while the rows waited");
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    wait_for("/health to recover", Duration::from_secs(30), || async {
        (health(&sys).await.0 == 200).then_some(())
    })
    .await;
    // The waiting rows go out afterwards: every outbox drains, every saga ends.
    nothing_wrong(&env, calls).await;
    assert!(outbox_rows(&env).iter().all(|(_, n)| *n == 0), "{:?}", outbox_rows(&env));
    stop_notifier.cancel();
    notifier.await.unwrap().unwrap();
    Arc::into_inner(sys).unwrap().stop().await;
}
