//! Timeouts, late replies, failing compensations, poison messages, floods and dropped
//! connections, on the real broker.

use std::sync::Arc;
use std::time::Duration;

use baton_amqp::Publisher;
use baton_faults::FaultPlan;
use baton_mgmt::Mgmt;
use baton_protocol::{Component, Service};
use baton_tests::{
    System, SystemConfig, TestEnv, baton_bin, mgmt_base, requests, rows_for, saga_count, spawn_baton,
    spawn_service, store_counts, timeline, wait_for,
};
use baton_workflow::{RetryPolicy, Workflow};
use serde_json::Value;

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

/// Run the real `baton` binary as an operator would, with `args` followed by the test's data
/// dir (`data`) or its broker URL (otherwise); it must succeed within 60 s. Its stdout.
async fn baton(args: &[&str], env: &TestEnv, data: bool) -> String {
    let mut cmd = tokio::process::Command::new(baton_bin());
    cmd.args(["--log", "warn"]).args(args).kill_on_drop(true);
    if data {
        cmd.arg(env.data_dir());
        // The store's other flag, when the tests run on PostgreSQL.
        cmd.args(env.store_args().into_iter().skip(2));
    } else {
        cmd.arg(env.amqp_url());
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("baton {args:?} did not end within 60 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "baton {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A queue of the test's own bound to the orchestrator's reply key: it gets a copy of every
/// reply the services send the orchestrator.
async fn tap_replies(env: &TestEnv, name: &str) {
    let broker = env.broker().await;
    let ch = broker.channel().await.unwrap();
    baton_amqp::topology::declare_exchanges(&ch).await.unwrap();
    baton_amqp::topology::declare_work_queue(
        &ch,
        &baton_amqp::topology::QueueSpec {
            name: name.into(),
            exchange: baton_amqp::topology::REPLIES,
            keys: vec![baton_amqp::topology::ORCHESTRATOR.into()],
        },
        Default::default(),
    )
    .await
    .unwrap();
}

/// `VmRSS` of a process, in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_answers_after_its_timeout_is_undone_and_its_late_work_is_a_no_op() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        workflows: vec![impatient(Service::Routing, 300, 2)],
        faults: plan("delay.routing=1500ms"),
        ..SystemConfig::default()
    };
    // A tap on the orchestrator's replies: a copy of every reply a service sends it, to read
    // what routing answered to its late commands.
    tap_replies(&env, "test.tap.replies").await;
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
    // The orchestrator heard a refusal, not a success it then had to ignore.
    for h in view["history"].as_array().unwrap() {
        if h["step"] == "routing" && h["action"] == "do" && h["event"] == "late_reply_ignored" {
            assert_eq!(h["detail"], "failed reply while the step is compensated", "{h}");
        }
    }
    // What routing itself answered to each late command: the tombstone's refusal. Had it
    // applied the command (and the route been removed again afterwards), it would have
    // answered `done` with the route.
    // (The orchestrator has consumed both, so the tap, bound to the same key, holds both.)
    let replies: Vec<Value> = env
        .take_messages("test.tap.replies", 100)
        .await
        .iter()
        .filter_map(|m| serde_json::from_str::<Value>(m["payload"].as_str()?).ok())
        .filter(|r| r["step"] == "routing" && r["action"] == "do")
        .collect();
    assert_eq!(replies.len(), 2, "one reply per late command: {replies:?}");
    let mut attempts: Vec<u64> = replies.iter().map(|r| r["attempt"].as_u64().unwrap()).collect();
    attempts.sort_unstable();
    assert_eq!(attempts, [1, 2], "{replies:?}");
    for r in &replies {
        assert_eq!(r["outcome"], "failed", "the late command was not applied: {r}");
        assert!(
            r["reason"].as_str().is_some_and(|why| why.contains("already compensated for this request")),
            "the late command hit the tombstone: {r}"
        );
        assert!(r["data"]["route"].is_null(), "no route was made: {r}");
    }
    let space = view["space_id"].as_str().unwrap();
    assert_eq!(rows_for(&env.store(), Service::Routing, space), 0, "the late command changed nothing");
    assert_eq!(store_counts(&env.store(), Component::Routing).tombstones, 1);
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_stops_visibly_and_an_operator_finishes_it() {
    let env = TestEnv::new().await;
    // Compensation retries with a backoff long enough to be told from the round trips: the
    // second retry waits 300 ms, the third 600 ms.
    let mut wf = impatient(Service::Entitlements, 1000, 3);
    for a in wf.steps.iter_mut().flat_map(|s| s.actions.iter_mut()) {
        if a.service == Service::Entitlements {
            a.compensation_retry = RetryPolicy { attempts: 3, backoff_ms: 300, cap_ms: 2_000 };
        }
    }
    let cfg =
        SystemConfig { workflows: vec![wf], skip: vec![Service::Entitlements], ..SystemConfig::default() };
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
    let failed = baton_orchestrator::Sagas::at(&env.store())
        .list(Some(baton_workflow::SagaStatus::CompensationFailed), 10)
        .await
        .unwrap();
    assert_eq!(failed.iter().map(|w| w.id.to_string()).collect::<Vec<_>>(), std::slice::from_ref(&id));
    // The operator finds it with the real binary.
    let out = baton(&["workflows", "list", "--state", "compensation_failed", "--data-dir"], &env, true).await;
    let listed: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert!(listed[0].contains(&id) && listed[0].contains("compensation_failed"), "{out}");
    let out = baton(&["workflows", "list", "--state", "rolled_back", "--data-dir"], &env, true).await;
    assert!(!out.contains(&id), "{out}");
    let (_, view) = sys.get(&format!("/workflows/{id}")).await;
    let undo_failures = timeline(&view)
        .iter()
        .filter(|(s, a, e)| s == "entitlements" && a == "undo" && e == "failed")
        .count();
    assert_eq!(undo_failures, 3, "retried with backoff before giving up");
    // The retries are spaced out, each wait at least as long as the one before: from each
    // failure to the next attempt's send, the backoff the history announced (300 ms, then
    // 600 ms) passed at least.
    let undo: Vec<(i64, String, String)> = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["step"] == "entitlements" && h["action"] == "undo")
        .map(|h| {
            let detail = h["detail"].as_str().unwrap_or_default().to_owned();
            (h["at_ms"].as_i64().unwrap(), h["event"].as_str().unwrap().to_owned(), detail)
        })
        .collect();
    let announced: Vec<&str> =
        undo.iter().filter(|(_, e, _)| e == "retry_scheduled").map(|(_, _, d)| d.as_str()).collect();
    assert_eq!(announced, ["in 300 ms", "in 600 ms"], "{undo:?}");
    let sends: Vec<i64> = undo.iter().filter(|(_, e, _)| e == "sent").map(|(at, _, _)| *at).collect();
    let fails: Vec<i64> = undo.iter().filter(|(_, e, _)| e == "failed").map(|(at, _, _)| *at).collect();
    assert_eq!((sends.len(), fails.len()), (3, 3), "{undo:?}");
    let waits: Vec<i64> = (0..2).map(|k| sends[k + 1] - fails[k]).collect();
    assert!(waits[0] >= 300 && waits[1] >= 600, "each retry waited its backoff: {waits:?} in {undo:?}");
    assert!(waits[1] >= waits[0], "the waits grow: {waits:?} in {undo:?}");
    let gaps: Vec<i64> = sends.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("compensation attempts: waits after each failure {waits:?} ms, between sends {gaps:?} ms");
    let report = env.audit();
    assert_eq!(
        report.inconsistencies.iter().map(|v| v.kind).collect::<Vec<_>>(),
        [baton_audit::Kind::CompensationFailed]
    );
    assert!(report.uncertain.is_empty(), "{:?}", report.uncertain);

    // The cause goes away; the operator asks for the rollback to finish.
    stop_broken.cancel();
    broken_task.await.unwrap().unwrap();
    let (stop_fixed, fixed_task) = spawn_service(&env, Service::Entitlements, &cfg);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(baton_bin())
            .args(["workflows", "retry", &id, "--amqp-url", &env.amqp_url()])
            .args(env.store_args())
            .output(),
    )
    .await
    .expect("retry ends")
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rolled_back"));
    let out = baton(&["workflows", "list", "--state", "compensation_failed", "--data-dir"], &env, true).await;
    assert!(!out.contains(&id), "no longer stuck: {out}");
    let out = baton(&["workflows", "list", "--state", "rolled_back", "--data-dir"], &env, true).await;
    assert!(out.contains(&id), "{out}");
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, view["space_id"].as_str().unwrap()), 0, "{s}");
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
        Default::default(),
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
    // The operator's view, through the real binary: the queue, its count, the message and why.
    let out = baton(&["dlq", "list", "--amqp-url"], &env, false).await;
    let at = out.find("records.commands.dlq: 1 message").unwrap_or_else(|| panic!("{out}"));
    let entry = out[at..].lines().nth(1).unwrap_or_default();
    assert!(entry.contains("records.create") && entry.contains("delivery_limit"), "{out}");
    assert!(entry.contains(&msg.message_id.to_string()), "{out}");
    assert_eq!(out.matches(".dlq:").count(), 1, "no other dead letters: {out}");
    assert_eq!(env.queue_depth("records.commands.dlq").await, Some(1), "listing takes nothing");

    // Fix the cause, replay: the command is handled this time.
    stop.cancel();
    task.await.unwrap().unwrap();
    let (stop, task) = spawn_service(&env, Service::Records, &cfg);
    let out = baton(&["dlq", "replay", "records.commands", "--amqp-url"], &env, false).await;
    assert!(out.contains("replayed 1 message from records.commands.dlq onto records.commands"), "{out}");
    wait_for("the replayed command to be answered", Duration::from_secs(15), || async {
        (env.queue_depth("test.op.replies").await == Some(1)).then_some(())
    })
    .await;
    assert_eq!(rows_for(&env.store(), Service::Records, &space_id.to_string()), 1);
    assert_eq!(env.queue_depth("records.commands.dlq").await, Some(0));
    let out = baton(&["dlq", "list", "--amqp-url"], &env, false).await;
    assert!(!out.contains("records.commands.dlq"), "nothing left dead: {out}");
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
async fn a_flood_of_thousands_is_turned_away_and_the_gateways_memory_stays_bounded() {
    const MAX_IN_FLIGHT: usize = 8;
    const REQUESTS: usize = 3_000;
    const CONCURRENCY: usize = 256;
    let env = TestEnv::new().await;
    // The gateway alone, as the real `baton run gateway` process, so that its memory can be
    // read; no orchestrator: every request it takes waits its 2 s deadline, holding a slot.
    let port = baton_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let max = MAX_IN_FLIGHT.to_string();
    let gateway = spawn_baton(
        &env,
        &["run", "gateway", "--http", &addr, "--max-in-flight", &max, "--deadline", "2s"],
        &[],
        "gateway.log",
    );
    let pid = gateway.id().expect("the gateway runs");
    let mut sys = System::start(
        &env,
        SystemConfig {
            with_services: false,
            with_orchestrator: false,
            with_gateway: false,
            ..Default::default()
        },
    )
    .await;
    sys.use_gateway(addr.parse().unwrap()).await;
    // A few requests first, so that what the gateway sets up once (connections, channels,
    // its database) is in the baseline.
    let sys = Arc::new(sys);
    let mut warm = tokio::task::JoinSet::new();
    for i in 0..MAX_IN_FLIGHT {
        let sys = Arc::clone(&sys);
        warm.spawn(async move { sys.create(&format!("warm-{i}"), "alice").await });
    }
    while let Some(r) = warm.join_next().await {
        let (s, body) = r.unwrap();
        assert_eq!(s, 504, "{body}");
    }
    let before = rss_kib(pid);

    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let url = format!("http://{addr}/spaces");
    let mut calls = tokio::task::JoinSet::new();
    let t0 = std::time::Instant::now();
    for i in 0..REQUESTS {
        let (client, gate, url) = (client.clone(), Arc::clone(&gate), url.clone());
        calls.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let r = client
                .post(url)
                .json(&serde_json::json!({"name": format!("flood-{i}"), "owner": format!("o-{}", i % 50)}))
                .send()
                .await
                .expect("the gateway answers every request of the flood");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.expect("a JSON body"))
        });
    }
    let mut peak = before;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(r) = calls.join_next().await {
            let (s, body) = r.unwrap();
            *by_status.entry(s).or_default() += 1;
            match s {
                429 => assert!(body["error"].as_str().unwrap().contains("retry shortly"), "{body}"),
                503 => assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}"),
                // Taken, and held until its deadline since nobody answers it.
                504 => assert!(body["space_id"].is_string(), "{body}"),
                _ => panic!("only 429, 503 or 504 in the flood: {s} {body}"),
            }
            if by_status.values().sum::<usize>() % 100 == 0 {
                peak = peak.max(rss_kib(pid));
            }
        }
    })
    .await
    .expect("every request of the flood is answered within 240 s rather than hanging");
    let took = t0.elapsed();
    let after = rss_kib(pid);
    let peak = peak.max(after);
    eprintln!(
        "flood of {REQUESTS} at concurrency {CONCURRENCY} in {took:?}: {by_status:?}; \
         VmRSS {before} KiB before, {peak} KiB at most during, {after} KiB after"
    );
    // The bound is generous: what matters is that the flood is not held in memory.
    let bound = before + 64 * 1024;
    assert!(after < bound, "VmRSS grew from {before} KiB to {after} KiB after the flood");
    assert!(peak < bound, "VmRSS reached {peak} KiB during the flood (from {before} KiB)");
    // The excess was turned away; only what fits in the slots was taken. Each slot holds a
    // request for its whole 2 s deadline, so the flood could take at most MAX_IN_FLIGHT per
    // deadline that passed (plus the first round).
    let taken = by_status.get(&504).copied().unwrap_or(0);
    let refused = by_status.get(&429).copied().unwrap_or(0) + by_status.get(&503).copied().unwrap_or(0);
    assert_eq!(taken + refused, REQUESTS, "{by_status:?}");
    assert!(taken >= MAX_IN_FLIGHT, "the slots were used: {by_status:?}");
    let rounds = took.as_secs_f64() / 2.0 + 1.0;
    assert!(
        taken as f64 <= MAX_IN_FLIGHT as f64 * rounds.ceil(),
        "no more than {MAX_IN_FLIGHT} waited at once: {by_status:?} in {took:?}"
    );
    assert!(by_status.get(&429).copied().unwrap_or(0) > REQUESTS / 2, "{by_status:?}");
    // The gateway recorded only the requests it took, and is still healthy.
    // (A 503 after the admission, a publish the broker refused, would have a row too.)
    let recorded = requests(&env.store()) as usize;
    let late_503 = by_status.get(&503).copied().unwrap_or(0);
    assert!(
        (taken + MAX_IN_FLIGHT..=taken + MAX_IN_FLIGHT + late_503).contains(&recorded),
        "rows for the warm-up and the taken ones only: {recorded}, {by_status:?}"
    );
    let (s, health) = sys.get("/health").await;
    assert_eq!((s, health["status"].as_str()), (200, Some("ok")));
    Arc::into_inner(sys).unwrap().stop().await;
    drop(gateway);
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
                .map(|id| baton_tests::saga_story(&env.store(), id))
                .unwrap_or_default()
        );
        statuses.push(s);
    }
    baton_tests::every_saga_ends(&env, Duration::from_secs(30)).await;
    assert_eq!(saga_count(&env.store()), 60);
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    assert_eq!(report.complete, statuses.iter().filter(|s| **s == 200).count());
    let (s, health) = sys.get("/health").await;
    assert_eq!((s, health["status"].as_str()), (200, Some("ok")));
    Arc::into_inner(sys).unwrap().stop().await;
}
