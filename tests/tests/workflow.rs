//! Workflow mode end to end, against the real RabbitMQ: success, refusals at every step with
//! their compensations, the parallel variant.

use std::time::Duration;

use baton_protocol::Service;
use baton_services::ServiceConfig;
use baton_tests::{System, SystemConfig, TestEnv, rows_for, timeline};
use serde_json::Value;

async fn workflow(sys: &System, body: &Value) -> Value {
    let id = body["workflow_id"].as_str().expect("a workflow id in every answer");
    let (status, view) = sys.get(&format!("/workflows/{id}")).await;
    assert_eq!(status, 200, "{view}");
    view
}

/// The compensations of a saga, in the order they completed.
fn compensated(view: &Value) -> Vec<String> {
    timeline(view).into_iter().filter(|(_, _, e)| e == "compensated").map(|(s, _, _)| s).collect()
}

/// A refused saga never reached the notifier: no line of its timeline names it (nothing was
/// sent to it, no reply came from it), and it holds no email for the space.
fn never_notified(dir: &baton_store::Location, view: &Value) {
    let t = timeline(view);
    assert!(!t.iter().any(|(s, _, _)| s == "notifier"), "the notifier appears in a refused saga: {t:?}");
    let space_id = view["space_id"].as_str().unwrap();
    assert_eq!(rows_for(dir, Service::Notifier, space_id), 0, "no email for a refused space");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_writes_one_row_in_each_of_the_five_databases() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let (status, body) = sys.create("acme", "alice").await;
    assert_eq!(status, 200, "{body}");
    for field in ["id", "key", "shard", "licence", "route", "workflow_id"] {
        assert!(body[field].as_str().is_some_and(|s| !s.is_empty()), "{field} missing in {body}");
    }
    assert_eq!(body["key"], "acme");
    let id = body["id"].as_str().unwrap().to_owned();
    // The client does not wait for the email: wait for the saga to complete.
    baton_tests::wait_for("the saga to complete", Duration::from_secs(10), || {
        let sys = &sys;
        let body = body.clone();
        async move { (workflow(sys, &body).await["status"] == "completed").then_some(()) }
    })
    .await;
    for s in Service::ALL {
        assert_eq!(rows_for(&env.store(), s, &id), 1, "{s} holds one row for the space");
    }
    let (status, space) = sys.get(&format!("/spaces/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(space["told_status"], 200);
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    assert_eq!(report.complete, 1);
    let (status, health) = sys.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    sys.stop().await;
}

/// Start a system, make `setup` succeed first, then check that `(name, owner)` is refused at
/// `step` with `status`, that exactly `undone` were compensated in that order, and that nothing
/// of the space remains.
async fn refused_and_rolled_back(
    cfg: SystemConfig,
    setup: &[(&str, &str)],
    (name, owner): (&str, &str),
    step: &str,
    status: u16,
    undone: &[&str],
) {
    let env = TestEnv::new().await;
    let sys = System::start(&env, cfg).await;
    for (n, o) in setup {
        let (s, body) = sys.create(n, o).await;
        assert_eq!(s, 200, "setup {n}: {body}");
    }
    let (s, body) = sys.create(name, owner).await;
    assert_eq!(s, status, "{body}");
    assert_eq!(body["step"], step, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.len() > 10), "a sentence saying why: {body}");
    let view = workflow(&sys, &body).await;
    assert_eq!(view["status"], "rolled_back");
    assert_eq!(compensated(&view), undone, "compensations in reverse order");
    never_notified(&env.store(), &view);
    let space_id = view["space_id"].as_str().unwrap();
    for svc in Service::ALL {
        assert_eq!(rows_for(&env.store(), svc, space_id), 0, "{svc} keeps nothing of a failed space");
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_shards_refuse_at_placement_and_the_record_is_deleted() {
    let cfg = SystemConfig {
        services: ServiceConfig { shards: vec![("shard-1".into(), 1)], ..ServiceConfig::default() },
        ..SystemConfig::default()
    };
    refused_and_rolled_back(cfg, &[("first", "alice")], ("second", "bob"), "placement", 503, &["records"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_over_quota_is_refused_at_entitlements_after_two_steps_are_undone() {
    let cfg = SystemConfig {
        services: ServiceConfig { plans: vec![("free".into(), 1)], ..ServiceConfig::default() },
        ..SystemConfig::default()
    };
    refused_and_rolled_back(
        cfg,
        &[("one", "carol")],
        ("two", "carol"),
        "entitlements",
        403,
        &["placement", "records"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_route_is_refused_at_routing_and_three_steps_are_undone_in_reverse() {
    refused_and_rolled_back(
        SystemConfig::default(),
        &[],
        ("admin", "dave"),
        "routing",
        409,
        &["entitlements", "placement", "records"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_name_is_refused_at_records_with_nothing_to_undo() {
    refused_and_rolled_back(
        SystemConfig::default(),
        &[("taken", "erin")],
        ("taken", "frank"),
        "records",
        409,
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_group_runs_placement_and_entitlements_concurrently() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        workflow: "create-space-parallel".into(),
        services: ServiceConfig { plans: vec![("free".into(), 1)], ..ServiceConfig::default() },
        ..SystemConfig::default()
    };
    let sys = System::start(&env, cfg).await;
    let (s, body) = sys.create("para", "gina").await;
    assert_eq!(s, 200, "{body}");
    let t = timeline(&workflow(&sys, &body).await);
    let pos = |step: &str, event: &str| {
        t.iter().position(|(s, a, e)| s == step && a == "do" && e == event).unwrap()
    };
    // Both are sent before either is done: their runs overlap.
    assert!(pos("placement", "sent") < pos("entitlements", "done"), "{t:?}");
    assert!(pos("entitlements", "sent") < pos("placement", "done"), "{t:?}");
    assert!(pos("placement", "done").max(pos("entitlements", "done")) < pos("routing", "sent"), "{t:?}");

    // A refusal by entitlements (over quota) undoes placement, its partner in the group.
    let (s, body) = sys.create("para-two", "gina").await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["step"], "entitlements");
    let view = workflow(&sys, &body).await;
    assert_eq!(compensated(&view), ["placement", "records"]);
    never_notified(&env.store(), &view);
    let space_id = view["space_id"].as_str().unwrap();
    assert_eq!(rows_for(&env.store(), Service::Placement, space_id), 0);
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_group_refused_by_placement_undoes_entitlements_its_partner() {
    let env = TestEnv::new().await;
    // One shard with room for one space: the second request finds every shard full.
    let cfg = SystemConfig {
        workflow: "create-space-parallel".into(),
        services: ServiceConfig { shards: vec![("shard-1".into(), 1)], ..ServiceConfig::default() },
        ..SystemConfig::default()
    };
    let sys = System::start(&env, cfg).await;
    let (s, body) = sys.create("para-first", "hana").await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = sys.create("para-full", "ivan").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["step"], "placement", "{body}");
    let view = workflow(&sys, &body).await;
    assert_eq!(view["status"], "rolled_back");
    let t = timeline(&view);
    let at = |step: &str, action: &str, event: &str| {
        t.iter().position(|(s, a, e)| s == step && a == action && e == event)
    };
    let refused = at("placement", "do", "refused").unwrap_or_else(|| panic!("placement refused: {t:?}"));
    // Both members were sent together; entitlements may have finished before placement
    // refused, or still be running then. Either way it is undone: a member that completed is
    // compensated, and one in flight is compensated too (its late command finds the tombstone).
    assert!(at("entitlements", "do", "sent").is_some_and(|i| i < refused), "{t:?}");
    let licensed_first = at("entitlements", "do", "done").is_some_and(|i| i < refused);
    eprintln!("entitlements completed before placement refused: {licensed_first}");
    assert_eq!(compensated(&view), ["entitlements", "records"], "{t:?}");
    assert!(
        at("entitlements", "undo", "compensated").unwrap() < at("records", "undo", "compensated").unwrap(),
        "the group is undone before the step before it: {t:?}"
    );
    // Placement refused, so it holds nothing and is not compensated.
    assert!(at("placement", "undo", "sent").is_none(), "{t:?}");
    never_notified(&env.store(), &view);
    let space_id = view["space_id"].as_str().unwrap();
    for svc in Service::ALL {
        assert_eq!(rows_for(&env.store(), svc, space_id), 0, "{svc} keeps nothing of a failed space");
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    assert_eq!(report.complete, 1);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_gets_one_sentence_and_a_4xx() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let client = reqwest::Client::new();
    let post = |body: String| {
        let client = client.clone();
        let url = format!("http://{}/spaces", sys.http);
        async move {
            let r =
                client.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    for (body, status, words) in [
        ("{".to_string(), 400, "not valid JSON"),
        (r#"{"name":"x"}"#.into(), 422, "`owner` is missing"),
        (r#"{"name":"Has Caps","owner":"o"}"#.into(), 422, "lowercase letters"),
        (r#"{"name":"ok","owner":""}"#.into(), 422, "owner must be"),
        (format!(r#"{{"name":"ok","owner":"{}"}}"#, "o".repeat(300)), 422, "owner must be"),
        (format!(r#"{{"name":"{}","owner":"o"}}"#, "n".repeat(20_000)), 413, "over 16384 bytes"),
    ] {
        let (s, v) = post(body).await;
        assert_eq!(s, status, "{v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{v}");
    }
    let (s, v) = sys.get("/workflows/not-a-uuid").await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = sys.get(&format!("/spaces/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(s, 404);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sagas_are_listed_newest_first_a_page_at_a_time_and_filtered() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let mut ids = Vec::new();
    for name in ["one", "two", "three"] {
        let (status, body) = sys.create(name, "alice").await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["workflow_id"].as_str().unwrap().to_owned());
    }
    // `admin` is a reserved route: rolled back.
    let (status, refused) = sys.create("admin", "bob").await;
    assert_eq!(status, 409, "{refused}");
    let refused_id = refused["workflow_id"].as_str().unwrap().to_owned();

    // Newest first, two at a time, then the rest with the cursor.
    let (status, first) = sys.get("/workflows?limit=2").await;
    assert_eq!(status, 200, "{first}");
    let listed = |page: &Value| -> Vec<String> {
        page["workflows"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(listed(&first), [refused_id.clone(), ids[2].clone()]);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let (status, second) = sys.get(&format!("/workflows?limit=2&cursor={cursor}")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(listed(&second), [ids[1].clone(), ids[0].clone()]);
    assert!(second["next_cursor"].is_null(), "the last page: {second}");

    // Filters: a state, a space, a workflow, a time.
    let (_, rolled_back) = sys.get("/workflows?state=rolled_back").await;
    assert_eq!(listed(&rolled_back), [refused_id.as_str()]);
    let space = refused["space_id"].as_str().expect("a refusal names its space");
    let (_, of_space) = sys.get(&format!("/workflows?space={space}")).await;
    assert_eq!(listed(&of_space), [refused_id.as_str()]);
    let (_, of_workflow) = sys.get("/workflows?workflow=create-space-parallel").await;
    assert_eq!(listed(&of_workflow), Vec::<String>::new());
    let (_, future) = sys.get("/workflows?since=2999-01-01T00:00:00Z").await;
    assert_eq!(listed(&future), Vec::<String>::new());

    // Search: by space name, owner, saga id, any of them (`q`), and a time range.
    assert_eq!(
        (first["workflows"][0]["name"].as_str(), first["workflows"][0]["owner"].as_str()),
        (Some("admin"), Some("bob"))
    );
    let (_, named) = sys.get("/workflows?name=two").await;
    assert_eq!(listed(&named), [ids[1].as_str()]);
    let (_, owned) = sys.get("/workflows?owner=alice").await;
    assert_eq!(listed(&owned), [ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    let (_, by_id) = sys.get(&format!("/workflows?id={}", ids[0])).await;
    assert_eq!(listed(&by_id), [ids[0].as_str()]);
    for q in ["bob", "admin", space, refused_id.as_str()] {
        let (_, any) = sys.get(&format!("/workflows?q={q}")).await;
        assert_eq!(listed(&any), [refused_id.as_str()], "q={q}");
    }
    let second_at = second["workflows"][0]["created_at_ms"].as_i64().expect("a start time");
    let (_, before) = sys.get(&format!("/workflows?until={second_at}")).await;
    assert_eq!(listed(&before), [ids[0].as_str()]);

    // A typo is a 400 that names it, not an empty page.
    let (status, err) = sys.get("/workflows?state=rolledback").await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"].as_str().unwrap().contains("rolled_back"), "{err}");
}
