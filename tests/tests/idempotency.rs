//! Client retries with an `Idempotency-Key` on `POST /spaces`, in both modes, against the real
//! broker: a retry with the same key and body is the first request again (its outcome, or a
//! wait on the same saga), never a second space nor a 409 for its own name; the same key with
//! another body is a 422. In events mode it is how a client told 504 learns what happened.

use std::time::Duration;

use baton_protocol::{Component, Mode, Service};
use baton_tests::{
    System, SystemConfig, TestEnv, idempotency_keys, requests, rows_for, saga_count, spawn_service,
    store_counts, wait_for,
};
use serde_json::Value;

fn config(mode: Mode) -> SystemConfig {
    let deadline = if mode == Mode::Events { Duration::from_secs(10) } else { Duration::from_secs(30) };
    SystemConfig { mode, deadline, ..SystemConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_gets_the_first_outcome_and_another_body_a_422_in_both_modes() {
    for mode in [Mode::Workflow, Mode::Events] {
        let env = TestEnv::new().await;
        let sys = System::start(&env, config(mode)).await;
        let (status, first, replayed) = sys.api().create_keyed("acme", "alice", Some("k-acme")).await;
        assert_eq!((status, replayed), (200, false), "{mode}: {first}");
        // The retry: the same space, not a 409 for the name it took.
        let (status, again, replayed) = sys.api().create_keyed("acme", "alice", Some("k-acme")).await;
        assert_eq!((status, replayed), (200, true), "{mode}: {again}");
        assert_eq!(again, first, "{mode}: the first outcome, as it was");
        // The owner in another spelling is the same request.
        let (status, _, replayed) = sys.api().create_keyed("acme", "ALICE ", Some("k-acme")).await;
        assert_eq!((status, replayed), (200, true), "{mode}");
        let id = first["id"].as_str().unwrap();
        for s in Service::ALL {
            assert_eq!(rows_for(&env.store(), s, id), 1, "{mode}: one {s} row");
        }
        // A refusal is replayed as the refusal, with its ids.
        let (status, refused, _) = sys.api().create_keyed("admin", "bob", Some("k-admin")).await;
        assert_eq!(status, 409, "{mode}: {refused}");
        let (status, again, replayed) = sys.api().create_keyed("admin", "bob", Some("k-admin")).await;
        assert_eq!((status, replayed), (409, true), "{mode}: {again}");
        assert_eq!(again["space_id"], refused["space_id"]);
        // The same key for another request.
        let (status, body, _) = sys.api().create_keyed("other", "alice", Some("k-acme")).await;
        assert_eq!(status, 422, "{mode}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("Idempotency-Key") && error.contains("acme"), "{error}");
        assert_eq!(body["space_id"], first["id"]);
        // Without a key, the same body is a new request, refused for the name.
        let (status, body, _) = sys.api().create_keyed("acme", "alice", None).await;
        assert_eq!(status, 409, "{mode}: {body}");
        // A key that is not one.
        let (status, body, _) = sys.api().create_keyed("spaced", "alice", Some("two words")).await;
        assert_eq!(status, 400, "{mode}: {body}");
        assert_eq!(idempotency_keys(&env.store()).replays, 3);
        // The request without a key (acme again, told 409) left nothing; in events mode the
        // refusal at routing leaves admin's earlier rows, as every refusal there does.
        let report = env.audit();
        assert!(report.uncertain.is_empty(), "{mode}: {:#?}", report.uncertain);
        let left: Vec<_> = report
            .inconsistencies
            .iter()
            .filter(|v| !(mode == Mode::Events && Some(v.space_id.as_str()) == refused["space_id"].as_str()))
            .collect();
        assert!(left.is_empty(), "{mode}: {left:#?}");
        sys.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_request_runs_waits_on_it_in_both_modes() {
    for mode in [Mode::Workflow, Mode::Events] {
        let env = TestEnv::new().await;
        let cfg = SystemConfig { skip: vec![Service::Routing], ..config(mode) };
        let sys = System::start(&env, cfg.clone()).await;
        let api = sys.api();
        let first = tokio::spawn(async move { api.create_keyed("slow", "carol", Some("k-slow")).await });
        wait_for("the first request to be recorded", Duration::from_secs(20), || async {
            (requests(&env.store()) == 1).then_some(())
        })
        .await;
        // The client gave up on its connection and retries while the flow waits at routing.
        let api = sys.api();
        let retry = tokio::spawn(async move { api.create_keyed("slow", "carol", Some("k-slow")).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
        let (s1, b1, _) = first.await.unwrap();
        let (s2, b2, replayed) = retry.await.unwrap();
        assert_eq!((s1, s2, replayed), (200, 200, true), "{mode}: {b1} {b2}");
        assert_eq!(b1, b2, "{mode}");
        assert_eq!(requests(&env.store()), 1, "{mode}");
        if mode == Mode::Workflow {
            assert_eq!(saga_count(&env.store()), 1, "one saga");
        }
        let report = env.audit();
        assert!(report.is_consistent(), "{mode}: {:#?}", report.inconsistencies);
        assert!(report.uncertain.is_empty(), "no 504 expected: {mode}: {:#?}", report.uncertain);
        routing.cancel();
        routing_task.await.unwrap().unwrap();
        sys.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_events_mode_a_client_told_504_learns_with_its_key_what_became_of_its_space() {
    let env = TestEnv::new().await;
    // Routing is down: the flow stops there, and the client gets a 504 at the 2 s deadline.
    let cfg = SystemConfig {
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(2),
        ..config(Mode::Events)
    };
    let sys = System::start(&env, cfg.clone()).await;
    let (status, timed_out, _) = sys.api().create_keyed("late", "dave", Some("k-late")).await;
    assert_eq!(status, 504, "{timed_out}");
    let id = timed_out["space_id"].as_str().unwrap().to_owned();
    // A retry while it is still stuck waits, and is told 504 again.
    let (status, _, replayed) = sys.api().create_keyed("late", "dave", Some("k-late")).await;
    assert_eq!((status, replayed), (504, true));
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    wait_for("the space to complete", Duration::from_secs(20), || async {
        (rows_for(&env.store(), Service::Notifier, &id) == 1).then_some(())
    })
    .await;
    let (status, learned, replayed) = sys.api().create_keyed("late", "dave", Some("k-late")).await;
    assert_eq!((status, replayed), (200, true), "{learned}");
    assert_eq!(learned["id"].as_str(), Some(id.as_str()));
    let (_, space) = sys.get(&format!("/spaces/{id}")).await;
    assert_eq!((space["told_status"].as_i64(), space["outcome_status"].as_i64()), (Some(200), Some(200)));
    // The client knows now: the 504 is no longer a violation.
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_older_than_its_time_to_live_is_a_new_request() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig { idempotency_ttl: Duration::from_secs(1), ..config(Mode::Workflow) };
    let sys = System::start(&env, cfg).await;
    let (status, _, _) = sys.api().create_keyed("once", "erin", Some("k-once")).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Forgotten: a new request, refused for the name the first one took.
    let (status, body, replayed) = sys.api().create_keyed("once", "erin", Some("k-once")).await;
    assert_eq!((status, replayed), (409, false), "{body}");
    assert_eq!(body["step"], "records");
    // And the key now stands for that second request.
    let (status, _, replayed) = sys.api().create_keyed("once", "erin", Some("k-once")).await;
    assert_eq!((status, replayed), (409, true));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_retention_purged_the_saga_still_gets_the_first_outcome() {
    let env = TestEnv::new().await;
    // A retention far shorter than the key's time to live (a day).
    let cfg = SystemConfig { retain: Duration::from_secs(1), ..config(Mode::Workflow) };
    let sys = System::start(&env, cfg).await;
    let (status, first, _) = sys.api().create_keyed("kept", "kim", Some("k-kept")).await;
    assert_eq!(status, 200, "{first}");
    // The retention has run past the request: its saga, and the gateway's inbox row of the
    // outcome (written after the key), are purged.
    wait_for(
        "the retention to purge the saga and the outcome's inbox row",
        Duration::from_secs(30),
        || async {
            let sagas = saga_count(&env.store());
            let inbox = store_counts(&env.store(), Component::Gateway).handled;
            (sagas == 0 && inbox == 0).then_some(())
        },
    )
    .await;
    let (status, again, replayed) = sys.api().create_keyed("kept", "kim", Some("k-kept")).await;
    assert_eq!((status, replayed), (200, true), "the first outcome, not a 409 for its own name: {again}");
    assert_eq!(again, first);
    assert_eq!(requests(&env.store()), 1, "no second request");
    // The key is kept for its time to live, whatever the retention.
    assert_eq!(idempotency_keys(&env.store()).keys, 1);
    assert_eq!(rows_for(&env.store(), Service::Records, first["id"].as_str().unwrap()), 1);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_create_space_run_again_with_its_key_prints_the_first_outcome() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, config(Mode::Workflow)).await;
    let gateway = format!("http://{}", sys.http);
    let run = || {
        let gateway = gateway.clone();
        async move {
            let out = tokio::process::Command::new(baton_tests::baton_bin())
                .args(["create-space", "--name", "cli", "--owner", "frank", "--idempotency-key", "k-cli"])
                .args(["--gateway", &gateway, "--log", "warn"])
                .output()
                .await
                .unwrap();
            let printed: Value = serde_json::from_slice(&out.stdout).expect("the outcome as JSON");
            (out.status.code(), printed)
        }
    };
    let (code, first) = run().await;
    assert_eq!((code, first["status"].as_i64()), (Some(0), Some(200)), "{first}");
    let (code, again) = run().await;
    assert_eq!(code, Some(0), "the same space, not a 409 for its name: {again}");
    assert_eq!(again, first);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_of_one_key_sent_at_once_make_one_request() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, config(Mode::Workflow)).await;
    let tries: Vec<_> = (0..6)
        .map(|_| {
            let api = sys.api();
            tokio::spawn(async move { api.create_keyed("burst", "hana", Some("k-burst")).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tries {
        let (status, body, _) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one space: {ids:?}");
    assert_eq!(requests(&env.store()), 1);
    // One key, whose first request the five other tries replayed.
    let keys = idempotency_keys(&env.store());
    assert_eq!((keys.keys, keys.replays), (1, 5));
    sys.stop().await;
}
