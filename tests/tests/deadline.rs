//! A saga honours its client's deadline: past it, no compensable step starts; what was done is
//! undone and the saga answers 503 (rolled back, a definite answer), unless it had passed its last compensable step, in which
//! case it completes. The audit's `step_after_deadline` rule is checked on a constructed case.

use std::time::Duration;

use baton_amqp::{Outgoing, Publisher, TraceParent, topology::COMMANDS};
use baton_audit::Kind;
use baton_orchestrator::Sagas;
use baton_orchestrator::query::WorkflowView;
use baton_protocol::{ClientDeadline, Context, SCHEMA, START, Service, StartSaga};
use baton_tests::{System, SystemConfig, TestEnv, rows_for, saga_story, spawn_service, wait_for};
use uuid::Uuid;

/// Start a create-space saga straight on `orchestrator.commands`, as the gateway does, with a
/// client deadline `budget` from when it is sent. Nobody waits for its answer (no `reply_to`).
async fn start_saga(env: &TestEnv, name: &str, budget: Duration) -> (Uuid, Uuid) {
    let (saga_id, space_id) = (Uuid::new_v4(), Uuid::new_v4());
    let budget_ms = budget.as_millis() as u64;
    let broker = env.broker().await;
    // A start sent before the orchestrator consumes could wait in the queue past its short
    // deadline, and roll back before it began.
    wait_for("the orchestrator to consume its commands", Duration::from_secs(20), || async {
        let ch = broker.channel().await.ok()?;
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare("orchestrator.commands".into(), passive, Default::default()).await.ok()?;
        let _ = ch.close(200, "probed".into()).await;
        (q.consumer_count() > 0).then_some(())
    })
    .await;
    let start = StartSaga {
        schema: SCHEMA,
        saga_id,
        space_id,
        workflow: "create-space".into(),
        input: Context { name: name.into(), owner: "alice".into(), ..Default::default() },
        deadline: Some(ClientDeadline { at_ms: baton_store::now_ms() as u64 + budget_ms, budget_ms }),
    };
    let msg =
        Outgoing::new(COMMANDS, "orchestrator", START, saga_id, "gateway", TraceParent::new_root(), &start);
    Publisher::new(broker.clone()).publish_confirmed(&msg).await.expect("the start is confirmed");
    broker.close().await;
    (saga_id, space_id)
}

/// `baton audit` over the test's store: its exit code, and what it printed (both streams).
async fn baton_audit(env: &TestEnv) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(baton_tests::baton_bin())
        .arg("audit")
        .args(env.store_args())
        .output()
        .await
        .expect("baton audit runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), said)
}

/// The saga as the orchestrator's read model describes it, once it exists.
async fn saga(env: &TestEnv, id: Uuid) -> Option<WorkflowView> {
    Sagas::at(&env.store()).describe(id).await.ok().flatten()
}

async fn wait_status(env: &TestEnv, id: Uuid, status: &str, timeout: Duration) {
    let reached = tokio::time::timeout(timeout, async {
        while saga(env, id).await.is_none_or(|v| v.status != status) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "saga {id} is not {status} after {timeout:?}:\n{}",
        saga_story(&env.store(), &id.to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_while_a_service_is_down_rolls_back_and_leaves_nothing() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig { skip: vec![Service::Routing], with_gateway: false, ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let (saga, space) = start_saga(&env, "acme", Duration::from_millis(2_000)).await;
    // Routing does not answer; the deadline passes before its 3 s timeout.
    wait_status(&env, saga, "compensating", Duration::from_secs(20)).await;
    let story = saga_story(&env.store(), &saga.to_string());
    assert!(story.contains("deadline_passed"), "{story}");
    // Routing comes back: it gets its command, then its compensation, and undoes it.
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    wait_status(&env, saga, "rolled_back", Duration::from_secs(30)).await;
    let story = saga_story(&env.store(), &saga.to_string());
    let view = self::saga(&env, saga).await.expect("the saga");
    assert_eq!(view.answer_status, Some(503), "{story}");
    let reason = view.failure.expect("a failure").reason;
    assert!(reason.contains("deadline") && reason.contains("routing"), "{reason}");
    // Nothing left anywhere, once routing has handled both the command and its undo.
    wait_for("routing to undo its route", Duration::from_secs(10), || async {
        (rows_for(&env.store(), Service::Routing, &space.to_string()) == 0).then_some(())
    })
    .await;
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &space.to_string()), 0, "{s} left a row: {story}");
    }
    let report = env.audit();
    // Told 504 with nothing left is the contract: consistent, and uncertain for the client.
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    let mine: Vec<Kind> = report
        .inconsistencies
        .iter()
        .chain(&report.uncertain)
        .filter(|v| v.space_id == space.to_string())
        .map(|v| v.kind)
        .collect();
    // Told 503 (rolled back, a definite answer) with nothing left: nothing to report.
    assert!(mine.is_empty(), "{:#?} {:#?}", report.inconsistencies, report.uncertain);
    let (code, said) = baton_audit(&env).await;
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains(" 0 inconsistencies, 0 uncertain "), "{said}");
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    sys.stop().await;

    // The audit rule itself: a forward step written after the deadline is reported.
    let written = baton_orchestrator::testing::record_step_after_deadline(&env.store(), saga, "placement")
        .await
        .unwrap();
    assert_eq!(written, 1);
    let report = env.audit();
    let mine: Vec<Kind> =
        report.inconsistencies.iter().filter(|v| v.space_id == space.to_string()).map(|v| v.kind).collect();
    assert_eq!(mine, vec![Kind::StepAfterDeadline], "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "a broken deadline is not only uncertain: {:#?}", report.uncertain);
    let (code, said) = baton_audit(&env).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("inconsistent: step_after_deadline") && said.contains(" 1 inconsistency, 0 uncertain "),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_after_the_last_compensable_step_lets_the_saga_complete() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig { skip: vec![Service::Notifier], with_gateway: false, ..SystemConfig::default() };
    let sys = System::start(&env, cfg.clone()).await;
    let (saga, space) = start_saga(&env, "acme", Duration::from_millis(2_500)).await;
    wait_status(&env, saga, "succeeded", Duration::from_secs(20)).await;
    // The email is still unsent when the deadline passes: notify timed out after it.
    wait_for("notify to time out after the deadline", Duration::from_secs(20), || async {
        let deadline = Sagas::at(&env.store()).deadline_at(saga).await.ok()??;
        let n = self::saga(&env, saga)
            .await?
            .history
            .iter()
            .filter(|h| {
                h.step.as_deref() == Some("notifier") && h.event == "timed_out" && h.at_ms >= deadline
            })
            .count();
        (n > 0).then_some(())
    })
    .await;
    assert_eq!(
        self::saga(&env, saga).await.map(|v| v.status).as_deref(),
        Some("succeeded"),
        "not rolled back"
    );
    let (notifier, notifier_task) = spawn_service(&env, Service::Notifier, &cfg);
    wait_status(&env, saga, "completed", Duration::from_secs(40)).await;
    assert_eq!(self::saga(&env, saga).await.and_then(|v| v.answer_status), Some(200));
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &space.to_string()), 1, "{s} holds the space's row");
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    notifier.cancel();
    notifier_task.await.unwrap().unwrap();
    sys.stop().await;
}
