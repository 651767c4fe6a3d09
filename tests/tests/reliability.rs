//! Timeouts, late replies, failing compensations, poison messages, floods and dropped
//! connections, on the real broker.

use std::sync::Arc;
use std::time::Duration;

use baton_amqp::Publisher;
use baton_compare::mgmt::Mgmt;
use baton_faults::FaultPlan;
use baton_protocol::Service;
use baton_tests::{
    System, SystemConfig, TestEnv, baton_bin, mgmt_base, rows_for, scalar, spawn_service, timeline, wait_for,
};
use baton_workflow::{RetryPolicy, Workflow};

/// `create-space` with every timeout and retry of `service` made short.
fn impatient(service: Service, timeout_ms: u64, attempts: u32) -> Workflow {
    let mut wf = Workflow::create_space();
    for a in wf.steps.iter_mut().flat_map(|s| s.actions.iter_mut()).filter(|a| a.service == service) {
        a.timeout_ms = timeout_ms;
        a.retry = RetryPolicy { attempts, backoff_ms: 100, cap_ms: 200 };
        a.compensation_retry = a.retry;
    }
    wf
}

fn plan(text: &str) -> FaultPlan {
    FaultPlan::parse(text, 1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_answers_after_its_timeout_is_undone_and_its_late_work_is_a_no_op() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        workflows: vec![impatient(Service::Routing, 300, 2)],
        faults: plan("delay.routing=1500ms"),
        ..SystemConfig::default()
    };
    let sys = System::start(&env, cfg).await;
    let (s, body) = sys.create("slow", "alice").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["step"], "routing");
    assert!(body["error"].as_str().unwrap().contains("did not answer within 300 ms"), "{body}");
    let id = body["workflow_id"].as_str().unwrap().to_owned();
    // Both slow commands reach routing after the rollback: each finds the tombstone.
    let view = wait_for("both late commands and their replies", Duration::from_secs(20), || {
        let (sys, id) = (&sys, id.clone());
        async move {
            let (_, v) = sys.get(&format!("/workflows/{id}")).await;
            let late = timeline(&v)
                .iter()
                .filter(|(s, a, e)| s == "routing" && a == "do" && e == "late_reply_ignored")
                .count();
            (late == 2).then_some(v)
        }
    })
    .await;
    assert_eq!(view["status"], "rolled_back");
    let space = view["space_id"].as_str().unwrap();
    assert_eq!(rows_for(env.data_dir(), Service::Routing, space), 0, "the late command changed nothing");
    assert_eq!(scalar(env.data_dir(), "routing.db", "SELECT COUNT(*) FROM tombstones"), 1);
    let report = env.audit();
    assert!(report.is_clean(), "{:?}", report.violations);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_stops_visibly_and_an_operator_finishes_it() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        workflows: vec![impatient(Service::Entitlements, 1000, 3)],
        skip: vec![Service::Entitlements],
        ..SystemConfig::default()
    };
    let sys = System::start(&env, cfg.clone()).await;
    let broken = SystemConfig { faults: plan("fail-undo.entitlements=1"), ..cfg.clone() };
    let (stop_broken, broken_task) = spawn_service(&env, Service::Entitlements, &broken);
    // `admin` is refused at routing; entitlements cannot undo its licence.
    let (s, body) = sys.create("admin", "bob").await;
    assert_eq!(s, 500, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("rollback could not finish") && error.contains("baton workflows retry"),
        "{error}"
    );
    let id = body["workflow_id"].as_str().unwrap().to_owned();
    let failed = {
        let conn = baton_store::open_read_only(&env.data_dir().join("orchestrator.db")).unwrap();
        baton_orchestrator::query::list(&conn, Some("compensation_failed"), 10).unwrap()
    };
    assert_eq!(failed.iter().map(|w| w.id.to_string()).collect::<Vec<_>>(), std::slice::from_ref(&id));
    let (_, view) = sys.get(&format!("/workflows/{id}")).await;
    let undo_failures = timeline(&view)
        .iter()
        .filter(|(s, a, e)| s == "entitlements" && a == "undo" && e == "failed")
        .count();
    assert_eq!(undo_failures, 3, "retried with backoff before giving up");
    let report = env.audit();
    assert_eq!(
        report.violations.iter().map(|v| v.kind).collect::<Vec<_>>(),
        [baton_audit::Kind::CompensationFailed]
    );

    // The cause goes away; the operator asks for the rollback to finish.
    stop_broken.cancel();
    broken_task.await.unwrap().unwrap();
    let (stop_fixed, fixed_task) = spawn_service(&env, Service::Entitlements, &cfg);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(baton_bin())
            .args(["workflows", "retry", &id, "--amqp-url", &env.amqp_url(), "--data-dir"])
            .arg(env.data_dir())
            .output(),
    )
    .await
    .expect("retry ends")
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rolled_back"));
    let report = env.audit();
    assert!(report.is_clean(), "{:?}", report.violations);
    for s in Service::ALL {
        assert_eq!(rows_for(env.data_dir(), s, view["space_id"].as_str().unwrap()), 0, "{s}");
    }
    stop_fixed.cancel();
    fixed_task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_its_handler_keeps_failing_on_is_dead_lettered_at_the_delivery_limit_and_can_be_replayed() {
    let env = TestEnv::new().await;
    let cfg =
        SystemConfig { with_orchestrator: false, skip: vec![Service::Records], ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let (stop, task) = spawn_service(
        &env,
        Service::Records,
        &SystemConfig { faults: plan("nack.records=1"), ..cfg.clone() },
    );
    let broker = env.broker().await;
    let ch = broker.channel().await.unwrap();
    baton_amqp::topology::declare_work_queue(
        &ch,
        &baton_amqp::topology::QueueSpec {
            name: "test.op.replies".into(),
            exchange: baton_amqp::topology::REPLIES,
            keys: vec!["test.op".into()],
        },
    )
    .await
    .unwrap();
    let (cmd, msg) = baton_tests::records_create("poison", "test.op");
    let space_id = cmd.space_id;
    Publisher::new(broker.clone()).publish_confirmed(&msg).await.unwrap();
    wait_for("the poison message in records.commands.dlq", Duration::from_secs(30), || async {
        (env.queue_depth("records.commands.dlq").await == Some(1)).then_some(())
    })
    .await;
    assert_eq!(env.queue_depth("records.commands").await, Some(0), "not redelivered forever");
    let listed = baton_amqp::dlq::list(&broker, &baton_amqp::topology::all_queues("main"), 5).await.unwrap();
    let records = listed.iter().find(|q| q.queue == "records.commands.dlq").unwrap();
    assert_eq!(records.count, 1);
    assert!(records.first[0].reason.contains("delivery_limit"), "{:?}", records.first);
    assert_eq!(env.queue_depth("records.commands.dlq").await, Some(1), "listing takes nothing");

    // Fix the cause, replay: the command is handled this time.
    stop.cancel();
    task.await.unwrap().unwrap();
    let (stop, task) = spawn_service(&env, Service::Records, &cfg);
    assert_eq!(baton_amqp::dlq::replay(&broker, "records.commands", 10).await.unwrap(), 1);
    wait_for("the replayed command to be answered", Duration::from_secs(15), || async {
        (env.queue_depth("test.op.replies").await == Some(1)).then_some(())
    })
    .await;
    assert_eq!(rows_for(env.data_dir(), Service::Records, &space_id.to_string()), 1);
    assert_eq!(env.queue_depth("records.commands.dlq").await, Some(0));
    stop.cancel();
    task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_capacity_is_refused_at_once_with_429() {
    let env = TestEnv::new().await;
    // No orchestrator: every accepted request waits until its deadline.
    let cfg = SystemConfig {
        with_orchestrator: false,
        max_in_flight: 4,
        deadline: Duration::from_secs(3),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg).await);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let sys = Arc::clone(&sys);
        calls.spawn(async move {
            let t = std::time::Instant::now();
            let (s, body) = sys.create(&format!("flood-{i}"), "alice").await;
            (s, body, t.elapsed())
        });
    }
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(r) = calls.join_next().await {
        let (s, body, took) = r.unwrap();
        *by_status.entry(s).or_default() += 1;
        if s == 429 {
            assert!(took < Duration::from_secs(1), "refused at once, not queued: {took:?}");
            assert!(body["error"].as_str().unwrap().contains("retry shortly"), "{body}");
        }
    }
    assert_eq!(by_status.get(&429), Some(&8), "{by_status:?}");
    assert_eq!(by_status.get(&504), Some(&4), "{by_status:?}");
    Arc::into_inner(sys).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_broker_mid_load_are_recovered_and_nothing_is_lost() {
    let env = TestEnv::new().await;
    let sys = Arc::new(
        System::start(&env, SystemConfig { delay: Duration::from_millis(2), ..SystemConfig::default() })
            .await,
    );
    let mgmt = Mgmt::new(&mgmt_base(), "guest", "guest");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60 {
        let client = Arc::clone(&sys);
        let name = if i % 10 == 9 { "admin".to_string() } else { format!("drop-{i}") };
        calls.spawn(async move { client.create(&name, &format!("owner-{}", i / 3)).await });
        if i == 20 || i == 40 {
            // The management API lists a connection a few seconds after it opened.
            let dropped = wait_for("connections to drop", Duration::from_secs(15), || {
                let (mgmt, vhost) = (&mgmt, env.vhost.clone());
                async move { mgmt.drop_connections(&vhost).await.ok().filter(|n| *n > 0) }
            })
            .await;
            assert!(dropped >= 7, "every component's connection: {dropped}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut statuses = Vec::new();
    while let Some(r) = calls.join_next().await {
        let (s, body) = r.unwrap();
        // A 503 is true too when a step that the drops made unreachable was given up and the
        // saga rolled back (the audit below proves nothing of it remains).
        let rolled_back = s == 503
            && body["step"].is_string()
            && body["error"].as_str().is_some_and(|e| e.contains("did not answer"));
        assert!(
            [200, 409].contains(&s) || rolled_back,
            "true answers only: {s} {body}\n{}",
            body["workflow_id"]
                .as_str()
                .map(|id| baton_tests::saga_story(env.data_dir(), id))
                .unwrap_or_default()
        );
        statuses.push(s);
    }
    baton_tests::every_saga_ends(&env, Duration::from_secs(30)).await;
    assert_eq!(scalar(env.data_dir(), "orchestrator.db", "SELECT COUNT(*) FROM sagas"), 60);
    let report = env.audit();
    assert!(report.is_clean(), "{:?}", report.violations);
    assert_eq!(report.complete, statuses.iter().filter(|s| **s == 200).count());
    let (s, health) = sys.get("/health").await;
    assert_eq!((s, health["status"].as_str()), (200, Some("ok")));
    Arc::into_inner(sys).unwrap().stop().await;
}
