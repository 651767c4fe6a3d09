//! Versioned workflows: an orchestrator restarted with a changed definition (fewer steps,
//! another structure, an older version) starts new sagas on it and finishes each saga in flight
//! on the definition it started on, compensations included; a saga whose definition is gone
//! stops as `definition_missing` (no panic, no DLQ, nothing else held up) until an operator
//! brings it back and retries.

use std::sync::Arc;
use std::time::Duration;

use baton_orchestrator::query::WorkflowView;
use baton_protocol::Service;
use baton_tests::{
    System, SystemConfig, TestEnv, every_saga_ends, held, sagas, spawn_baton, spawn_service, wait_for,
};
use baton_workflow::Workflow;
use serde_json::Value;

const IN_FLIGHT: usize = 5;

/// Sagas that sent `step`'s command, through the orchestrator's read model.
fn sent_to(env: &TestEnv, step: &str) -> usize {
    sagas(&env.store()).iter().filter(|v| has(v, step, "do", "sent")).count()
}

/// Whether the saga's timeline has `event` for `step`'s `action`.
fn has(view: &WorkflowView, step: &str, action: &str, event: &str) -> bool {
    view.history
        .iter()
        .any(|h| h.step.as_deref() == Some(step) && h.action.as_deref() == Some(action) && h.event == event)
}

/// Lines of `event` in the timelines of every saga (for any step).
fn with_event(env: &TestEnv, event: &str) -> usize {
    sagas(&env.store()).iter().map(|v| v.history.iter().filter(|h| h.event == event).count()).sum()
}

/// Sagas started on the definition with content hash `hash`.
fn on_version(env: &TestEnv, hash: &str) -> usize {
    sagas(&env.store()).iter().filter(|v| v.definition_hash.as_deref() == Some(hash)).count()
}

/// Sagas started on `hash` that ran the parallel structure: entitlements sent before
/// placement's reply, which the sequential version waits for.
fn ran_in_parallel(env: &TestEnv, hash: &str) -> usize {
    let parallel = |v: &WorkflowView| {
        let first = |step: &str, event: &str| {
            v.history.iter().position(|h| h.step.as_deref() == Some(step) && h.event == event)
        };
        matches!((first("entitlements", "sent"), first("placement", "done")), (Some(e), Some(p)) if e < p)
    };
    sagas(&env.store()).iter().filter(|v| v.definition_hash.as_deref() == Some(hash) && parallel(v)).count()
}

/// A `create-space` written to `<data-dir>/<file>`, from `base` (a bundled file's text) changed
/// by `edit`; returns the path and the definition's hash.
fn variant(env: &TestEnv, file: &str, base: &str, edit: impl Fn(&mut Value)) -> (std::path::PathBuf, String) {
    let mut wf: Value = serde_json::from_str(base).unwrap();
    wf["name"] = "create-space".into();
    edit(&mut wf);
    let path = env.data_dir().join(file);
    std::fs::write(&path, wf.to_string()).unwrap();
    let hash = Workflow::from_json(&wf.to_string()).expect("a valid variant").hash();
    (path, hash)
}

const SEQUENTIAL: &str = include_str!("../../crates/workflow/workflows/create-space.json");
const PARALLEL: &str = include_str!("../../crates/workflow/workflows/create-space-parallel.json");

/// Every action of `wf` waits `ms` for its reply: a service that is down holds its sagas there.
fn patient(ms: u64) -> impl Fn(&mut Value) {
    move |wf| {
        for step in wf["steps"].as_array_mut().unwrap() {
            for action in step["actions"].as_array_mut().unwrap() {
                if action["compensable"] != false {
                    action["timeout_ms"] = ms.into();
                }
            }
        }
    }
}

/// An orchestrator process (instance `main`) on the bundled workflows and `file`, if given.
fn orchestrator(env: &TestEnv, file: Option<&std::path::Path>, log: &str) -> tokio::process::Child {
    orchestrator_as(env, "main", file, log)
}

/// An orchestrator process of instance `instance` on the bundled workflows and `file`, if given.
fn orchestrator_as(
    env: &TestEnv,
    instance: &str,
    file: Option<&std::path::Path>,
    log: &str,
) -> tokio::process::Child {
    let mut args = vec!["run", "orchestrator", "--instance", instance];
    if let Some(f) = file {
        args.extend(["--workflow-file", f.to_str().unwrap()]);
    }
    spawn_baton(env, &args, &[], log)
}

async fn stop(mut child: tokio::process::Child) {
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// What the system must show at the end of each test: every saga ended, the audit is clean, no
/// reply went to the orchestrator's DLQ and no orchestrator panicked.
async fn all_well(env: &TestEnv, complete: usize, logs: &[&str]) {
    every_saga_ends(env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    assert_eq!(report.complete, complete);
    assert_eq!(env.queue_depth("orchestrator.replies.dlq").await, Some(0), "no reply dead-lettered");
    for log in logs {
        let text = std::fs::read_to_string(env.data_dir().join(log)).unwrap_or_default();
        assert!(!text.contains("panicked"), "{log}: {text}");
    }
}

/// The reproduction: a routing step that waits long, requests in flight, a restart with
/// a file that has fewer steps. Before versions, the orchestrator's database thread panicked
/// (or, with only routing removed, the sagas completed without a route and the audit found
/// `missing_after_success`); now they finish on the definition they started on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_fewer_steps_finishes_the_sagas_in_flight_on_their_own_version() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        with_orchestrator: false,
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(120),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let (long, v1) = variant(&env, "v1.json", SEQUENTIAL, |wf| {
        wf["steps"][3]["actions"][0]["timeout_ms"] = 120_000.into();
    });
    let first = orchestrator(&env, Some(&long), "orchestrator-1.log");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let sys = Arc::clone(&sys);
        calls.spawn(async move { sys.create(&format!("space-{i}"), &format!("owner-{i}")).await });
    }
    wait_for("every saga to wait at routing", Duration::from_secs(30), || async {
        (sent_to(&env, "routing") == IN_FLIGHT).then_some(())
    })
    .await;
    stop(first).await;

    // Restarted with routing and notify removed: fewer steps than the sagas in flight have.
    let (short, v2) = variant(&env, "v2.json", SEQUENTIAL, |wf| {
        wf["steps"].as_array_mut().unwrap().truncate(3);
    });
    let second = orchestrator(&env, Some(&short), "orchestrator-2.log");
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    let (mut statuses, mut workflow_ids) = (Vec::new(), Vec::new());
    let all = async {
        while let Some(r) = calls.join_next().await {
            let (status, body) = r.unwrap();
            statuses.push(status);
            workflow_ids.push(body["workflow_id"].as_str().unwrap_or_default().to_owned());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all).await.expect("every client gets an answer");
    assert_eq!(statuses, vec![200; IN_FLIGHT]);
    all_well(&env, IN_FLIGHT, &["orchestrator-1.log", "orchestrator-2.log"]).await;
    // Each saga shows the version it ran on, finished by the second orchestrator or not: in the
    // API and in `baton workflows show`.
    let id = &workflow_ids[0];
    let (status, view) = sys.get(&format!("/workflows/{id}")).await;
    assert_eq!((status, view["definition_hash"].as_str()), (200, Some(v1.as_str())), "{view}");
    let out = std::process::Command::new(baton_tests::baton_bin())
        .args(["workflows", "show", id.as_str()])
        .args(env.store_args())
        .output()
        .expect("baton workflows show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("definition {}", &v1[..12])),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(held(&env.store(), Service::Notifier), IN_FLIGHT);
    assert_eq!(on_version(&env, &v1), IN_FLIGHT);

    // Both versions are stored; v1 has its sagas, done.
    let versions = baton_orchestrator::Sagas::at(&env.store()).versions().await.unwrap();
    let of = |h: &str| versions.iter().find(|v| v.hash == h).cloned().expect("version listed");
    assert_eq!((of(&v1).running, of(&v1).done), (0, IN_FLIGHT as i64), "{versions:?}");
    assert_eq!((of(&v2).running, of(&v2).done), (0, 0));
    assert!(of(&v1).first_seen_ms <= of(&v2).first_seen_ms);

    stop(second).await;
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}

/// An upgrade (sequential steps to placement and entitlements in parallel) with a saga in
/// flight at every step: each finishes on the sequential version, new ones run the parallel one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_with_a_saga_in_flight_at_every_step() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        with_orchestrator: false,
        skip: Service::ALL.to_vec(),
        deadline: Duration::from_secs(120),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let (old, v1) = variant(&env, "v1.json", SEQUENTIAL, patient(120_000));
    let (new, v2) = variant(&env, "v2.json", PARALLEL, |_| {});
    let first = orchestrator(&env, Some(&old), "orchestrator-1.log");
    let mut up: Vec<_> = [Service::Records, Service::Placement, Service::Entitlements, Service::Routing]
        .into_iter()
        .map(|s| spawn_service(&env, s, &cfg))
        .collect();
    // The furthest first: a saga at the notifier, then each service stopped in turn, backwards,
    // and one saga sent to wait at it.
    let mut calls = tokio::task::JoinSet::new();
    let steps = ["notifier", "routing", "entitlements", "placement", "records"];
    for (i, step) in steps.iter().enumerate() {
        if i > 0 {
            let (cancel, task) = up.pop().expect("a service still up");
            cancel.cancel();
            task.await.unwrap().unwrap();
        }
        let sys2 = Arc::clone(&sys);
        calls.spawn(async move { sys2.create(&format!("old-{i}"), &format!("owner-old-{i}")).await });
        wait_for(&format!("a saga to wait at {step}"), Duration::from_secs(30), || async {
            (sent_to(&env, step) == i + 1).then_some(())
        })
        .await;
    }
    assert!(up.is_empty());
    stop(first).await;

    let second = orchestrator(&env, Some(&new), "orchestrator-2.log");
    let services: Vec<_> = Service::ALL.into_iter().map(|s| spawn_service(&env, s, &cfg)).collect();
    for i in 0..3 {
        let sys2 = Arc::clone(&sys);
        calls.spawn(async move { sys2.create(&format!("new-{i}"), &format!("owner-new-{i}")).await });
    }
    let mut statuses = Vec::new();
    let all = async {
        while let Some(r) = calls.join_next().await {
            statuses.push(r.unwrap().0);
        }
    };
    tokio::time::timeout(Duration::from_secs(90), all).await.expect("every client gets an answer");
    assert_eq!(statuses, vec![200; 8]);
    all_well(&env, 8, &["orchestrator-1.log", "orchestrator-2.log"]).await;
    assert_eq!(on_version(&env, &v1), 5);
    assert_eq!(on_version(&env, &v2), 3);
    // The old ones ran sequentially to the end: entitlements was sent only after placement's
    // reply, which the parallel version would not wait for.
    let parallel_in_old = ran_in_parallel(&env, &v1);
    assert_eq!(parallel_in_old, 0, "an old saga ran on the new structure");

    stop(second).await;
    for (cancel, task) in services {
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}

/// A downgrade, and two restarts on different versions: sagas started on the new version, then
/// on the old one after a downgrade, then the new one again; each finishes on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_and_two_restarts_on_different_versions() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        with_orchestrator: false,
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(120),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let (new, v2) = variant(&env, "v2.json", PARALLEL, patient(120_000));
    let (old, v1) = variant(&env, "v1.json", SEQUENTIAL, patient(120_000));
    let mut calls = tokio::task::JoinSet::new();
    let mut logs = Vec::new();
    for (round, file) in [&new, &old, &new].into_iter().enumerate() {
        let log = format!("orchestrator-{round}.log");
        let orch = orchestrator(&env, Some(file), &log);
        logs.push(log);
        for i in 0..2 {
            let sys2 = Arc::clone(&sys);
            calls.spawn(
                async move { sys2.create(&format!("r{round}-{i}"), &format!("owner-{round}-{i}")).await },
            );
        }
        wait_for("the round's sagas to wait at routing", Duration::from_secs(30), || async {
            (sent_to(&env, "routing") == 2 * (round + 1)).then_some(())
        })
        .await;
        if round < 2 {
            stop(orch).await;
        } else {
            let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
            let mut statuses = Vec::new();
            let all = async {
                while let Some(r) = calls.join_next().await {
                    statuses.push(r.unwrap().0);
                }
            };
            tokio::time::timeout(Duration::from_secs(60), all).await.expect("every client gets an answer");
            assert_eq!(statuses, vec![200; 6]);
            let logs: Vec<&str> = logs.iter().map(String::as_str).collect();
            all_well(&env, 6, &logs).await;
            stop(orch).await;
            routing.cancel();
            routing_task.await.unwrap().unwrap();
        }
    }
    assert_eq!(on_version(&env, &v2), 4);
    assert_eq!(on_version(&env, &v1), 2);
    let versions = baton_orchestrator::Sagas::at(&env.store()).versions().await.unwrap();
    let create_space: Vec<_> = versions.iter().filter(|v| v.workflow == "create-space").collect();
    assert_eq!(create_space.len(), 2, "both files (the bundled one is replaced by them): {versions:?}");
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}

/// The middle of a rolling upgrade: two orchestrator instances at once, one on the sequential
/// version and one on the parallel one, competing for the same starts and the same replies.
/// Each saga runs to its end on the version of the instance that started it, whichever instance
/// handles its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_different_versions_at_once() {
    const REQUESTS: usize = 12;
    let env = TestEnv::new().await;
    let cfg = SystemConfig { with_orchestrator: false, ..SystemConfig::default() };
    let sys = Arc::new(System::start(&env, cfg).await);
    let (old, v1) = variant(&env, "v1.json", SEQUENTIAL, |_| {});
    let (new, v2) = variant(&env, "v2.json", PARALLEL, |_| {});
    let mut a = orchestrator_as(&env, "a", Some(&old), "orchestrator-a.log");
    let mut b = orchestrator_as(&env, "b", Some(&new), "orchestrator-b.log");
    // Both take starts and replies before the first request. If they do not, say whether an
    // orchestrator exited and what each logged: a timeout alone (CI, once) told nothing.
    let started = tokio::time::Instant::now();
    for queue in ["orchestrator.commands", "orchestrator.replies"] {
        while env.queue_consumers(queue).await != Some(2) {
            if started.elapsed() > Duration::from_secs(30) {
                let logs: Vec<String> = ["a", "b"]
                    .iter()
                    .map(|i| {
                        let log = env.data_dir().join(format!("orchestrator-{i}.log"));
                        format!("orchestrator-{i}.log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
                    })
                    .collect();
                panic!(
                    "no two consumers on {queue} after 30 s ({:?} now); exited: a {:?}, b {:?}\n{}",
                    env.queue_consumers(queue).await,
                    a.try_wait(),
                    b.try_wait(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let sys = Arc::clone(&sys);
        calls.spawn(async move { sys.create(&format!("both-{i}"), &format!("owner-{i}")).await.0 });
    }
    let statuses = tokio::time::timeout(Duration::from_secs(60), calls.join_all())
        .await
        .expect("every client gets an answer");
    assert_eq!(statuses, vec![200; REQUESTS]);
    all_well(&env, REQUESTS, &["orchestrator-a.log", "orchestrator-b.log"]).await;

    let (old_sagas, new_sagas) = (on_version(&env, &v1), on_version(&env, &v2));
    assert_eq!(old_sagas + new_sagas, REQUESTS);
    assert!(old_sagas > 0 && new_sagas > 0, "both instances started sagas: {old_sagas} old, {new_sagas} new");
    // Entitlements sent before placement's reply: the parallel structure. Every new saga ran it,
    // no old one did.
    assert_eq!(ran_in_parallel(&env, &v1), 0, "an old saga ran on the new structure");
    assert_eq!(ran_in_parallel(&env, &v2), new_sagas, "a new saga ran on the old structure");

    stop(a).await;
    stop(b).await;
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}

/// A saga whose definition was removed from the store stops as `definition_missing` (its reply
/// is handled, not dead-lettered; other sagas go on); once an orchestrator stores it again, an
/// operator's `baton workflows retry` resumes it and it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_definition_was_removed_stops_visibly_and_an_operator_resumes_it() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        with_orchestrator: false,
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(120),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let (file, v1) = variant(&env, "v1.json", SEQUENTIAL, patient(8_000));
    let first = orchestrator(&env, Some(&file), "orchestrator-1.log");
    let call = {
        let sys = Arc::clone(&sys);
        tokio::spawn(async move { sys.create("lost", "alice").await })
    };
    wait_for("the saga to wait at routing", Duration::from_secs(30), || async {
        (sent_to(&env, "routing") == 1).then_some(())
    })
    .await;
    stop(first).await;
    // The operator's mistake, made through the orchestrator's test support (either backend).
    let deleted = baton_orchestrator::testing::forget_definition(&env.store(), &v1).await.unwrap();
    assert_eq!(deleted, 1);
    let all = sagas(&env.store());
    assert_eq!(all.len(), 1);
    let saga = all[0].id.to_string();

    // On the bundled workflows only: the saga's definition is nowhere.
    let second = orchestrator(&env, None, "orchestrator-2.log");
    wait_for("the saga to stop as definition_missing", Duration::from_secs(30), || async {
        let missing = sagas(&env.store()).iter().filter(|v| v.status == "definition_missing").count();
        (missing == 1).then_some(())
    })
    .await;
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    // Its routing reply is handled (said again in its history), never dead-lettered.
    wait_for("the reply to be handled", Duration::from_secs(30), || async {
        (with_event(&env, "definition_missing") >= 2).then_some(())
    })
    .await;
    // Other sagas are not held up.
    assert_eq!(sys.create("other", "bob").await.0, 200);
    // The audit names it for the operator.
    let report = env.audit();
    let kinds: Vec<_> = report.inconsistencies.iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![baton_audit::Kind::DefinitionMissing], "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "{:#?}", report.uncertain);
    let versions = baton_orchestrator::Sagas::at(&env.store()).versions().await.unwrap();
    let lost = versions.iter().find(|v| v.hash == v1).expect("the missing version is listed by its hash");
    assert_eq!(lost.stuck, 1, "{versions:?}");
    // A retry while it is still missing says so and changes nothing.
    let mut retry = spawn_baton(&env, &["workflows", "retry", &saga], &[], "retry-1.log");
    let code = tokio::time::timeout(Duration::from_secs(70), retry.wait()).await.unwrap().unwrap();
    let log = std::fs::read_to_string(env.data_dir().join("retry-1.log")).unwrap();
    assert_eq!(code.code(), Some(1), "{log}");
    assert!(log.contains("still missing"), "{log}");
    stop(second).await;

    // An orchestrator with the file stores the definition again; the retry resumes the saga.
    let third = orchestrator(&env, Some(&file), "orchestrator-3.log");
    let mut retry = spawn_baton(&env, &["workflows", "retry", &saga], &[], "retry-2.log");
    let code = tokio::time::timeout(Duration::from_secs(70), retry.wait()).await.unwrap().unwrap();
    let log = std::fs::read_to_string(env.data_dir().join("retry-2.log")).unwrap();
    assert_eq!(code.code(), Some(0), "{log}");
    let _ = call.await;
    all_well(&env, 2, &["orchestrator-1.log", "orchestrator-2.log", "orchestrator-3.log"]).await;
    let ended = sagas(&env.store()).into_iter().find(|v| v.id.to_string() == saga).expect("the saga is kept");
    assert_eq!(ended.status, "completed");

    stop(third).await;
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
        (sent_to(&env, "routing") > 0).then_some(())
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
        let timed_out = |v: &WorkflowView| {
            v.history.iter().any(|h| h.step.as_deref() == Some("routing") && h.event == "timed_out")
        };
        sagas(&env.store()).iter().any(timed_out).then_some(())
    })
    .await;
    assert!(second.try_wait().unwrap().is_none(), "it is still running");
    second.start_kill().unwrap();
    let _ = second.wait().await;
    call.abort();
    let _ = call.await;
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}
