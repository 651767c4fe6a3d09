//! Prometheus metrics, scraped over HTTP from real `baton run` processes: the gateway on its own
//! `--http` address, every other component on its `--metrics` address. A few sagas run, one of
//! them rolled back and one request replayed by its idempotency key; each count read back is the
//! count of what was done, under the instance's and the component's labels.

use std::time::Duration;

use baton_tests::{TestEnv, every_saga_ends, free_port, spawn_baton, wait_for};
use tokio::process::Child;

const INSTANCE: &str = "m1";

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn scrape(client: &reqwest::Client, addr: &str) -> String {
    let r = client.get(format!("http://{addr}/metrics")).send().await.expect("GET /metrics");
    assert!(r.status().is_success(), "GET http://{addr}/metrics: {}", r.status());
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_counts_what_it_did_under_its_instance_and_component() {
    let env = TestEnv::new().await;
    let mut procs: Vec<Child> = Vec::new();
    let mut metrics: Vec<(String, String)> = Vec::new();
    let components = ["records", "placement", "entitlements", "routing", "notifier", "orchestrator"];
    for c in components {
        let addr = format!("127.0.0.1:{}", free_port());
        procs.push(spawn_baton(
            &env,
            &["run", c, "--instance", INSTANCE, "--metrics", &addr],
            &[],
            &format!("{c}.log"),
        ));
        metrics.push((c.to_owned(), addr));
    }
    let http = format!("127.0.0.1:{}", free_port());
    procs.push(spawn_baton(
        &env,
        &["run", "gateway", "--instance", INSTANCE, "--http", &http],
        &[],
        "gateway.log",
    ));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let gateway = format!("http://{http}");
    wait_for("the gateway to be ready", Duration::from_secs(60), || async {
        let r = client.get(format!("{gateway}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // Every work queue has its consumer before the first saga starts.
    for q in ["records", "placement", "entitlements", "routing", "notifier"] {
        wait_for(&format!("a consumer on {q}"), Duration::from_secs(60), || async {
            (env.queue_consumers(&format!("{q}.commands")).await? > 0).then_some(())
        })
        .await;
    }

    let post = |name: &str, key: Option<&str>| {
        let mut req = client
            .post(format!("{gateway}/spaces"))
            .json(&serde_json::json!({"name": name, "owner": format!("owner-{name}")}));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.send()
    };
    for name in ["one", "two"] {
        assert_eq!(post(name, None).await.unwrap().status(), 200, "{name}");
    }
    assert_eq!(post("three", Some("k-3")).await.unwrap().status(), 200);
    let replay = post("three", Some("k-3")).await.unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    // A reserved route: routing refuses, the three steps before it are undone.
    assert_eq!(post("admin", None).await.unwrap().status(), 409);
    every_saga_ends(&env, Duration::from_secs(60)).await;

    let gw = scrape(&client, &http).await;
    let of_gw = |extra: &[(&'static str, &'static str)]| {
        [&[("instance", INSTANCE), ("component", "gateway"), ("mode", "workflow")][..], extra].concat()
    };
    assert_eq!(value(&gw, "baton_requests_total", &of_gw(&[("status", "200")])), 4.0, "{gw}");
    assert_eq!(value(&gw, "baton_requests_total", &of_gw(&[("status", "409")])), 1.0, "{gw}");
    assert_eq!(value(&gw, "baton_request_duration_seconds_count", &of_gw(&[])), 5.0, "{gw}");
    let took = value(&gw, "baton_request_duration_seconds_sum", &of_gw(&[]));
    assert!(took > 0.0 && took < 60.0, "five requests took {took} s in all: {gw}");
    assert_eq!(value(&gw, "baton_idempotent_replays_total", &[("instance", INSTANCE)]), 1.0, "{gw}");
    assert_eq!(value(&gw, "baton_ready", &[("instance", INSTANCE), ("component", "gateway")]), 1.0, "{gw}");

    // Counted once committed: the last saga's may follow its answer by a moment.
    let (_, orch_addr) = metrics.iter().find(|(c, _)| c == "orchestrator").unwrap();
    let of_orch = [("instance", INSTANCE), ("component", "orchestrator"), ("workflow", "create-space")];
    let orch = wait_for("the orchestrator to count every saga's end", Duration::from_secs(20), || async {
        let text = scrape(&client, orch_addr).await;
        let finished = value(&text, "baton_sagas_finished_total", &of_orch);
        (finished == 4.0).then_some(text)
    })
    .await;
    assert_eq!(value(&orch, "baton_sagas_started_total", &of_orch), 4.0, "{orch}");
    let outcome = |o: &'static str| {
        value(&orch, "baton_sagas_finished_total", &[of_orch[0], of_orch[2], ("outcome", o)])
    };
    assert_eq!((outcome("completed"), outcome("rolled_back")), (3.0, 1.0), "{orch}");
    assert!(
        orch.lines().any(|l| l.starts_with("baton_sagas_started_total{") && !l.contains("version=\"\"")),
        "sagas are counted by their definition's version: {orch}"
    );
    // admin reached routing: records, placement and entitlements were undone.
    assert_eq!(value(&orch, "baton_compensations_total", &of_orch[..2]), 3.0, "{orch}");
    assert_eq!(value(&orch, "baton_compensation_failures_total", &of_orch[..2]), 0.0, "{orch}");
    let step = |service: &'static str, action: &'static str| {
        value(
            &orch,
            "baton_step_duration_seconds_count",
            &[of_orch[0], ("service", service), ("action", action)],
        )
    };
    assert_eq!(
        (step("records", "do"), step("routing", "do"), step("notifier", "do")),
        (4.0, 4.0, 3.0),
        "{orch}"
    );
    assert_eq!(step("records", "undo"), 1.0, "{orch}");

    for (component, addr) in &metrics {
        let text = scrape(&client, addr).await;
        assert_eq!(
            value(&text, "baton_ready", &[("instance", INSTANCE), ("component", component)]),
            1.0,
            "{component}: {text}"
        );
        // Each sent replies (or commands) through its outbox, every row confirmed by now.
        let of = [("instance", INSTANCE), ("component", component.as_str())];
        let confirmed = value(&text, "baton_relay_published_total", &[of[0], of[1], ("result", "confirmed")]);
        assert!(confirmed >= 3.0, "{component} published {confirmed} rows: {text}");
        assert!(
            text.contains(&format!(
                "baton_outbox_depth{{instance=\"{INSTANCE}\",component=\"{component}\"}}"
            )),
            "{component}: {text}"
        );
        assert!(text.contains("baton_outbox_oldest_unpublished_seconds{"), "{component}: {text}");
        assert_eq!(value(&text, "baton_dead_lettered_total", &of), 0.0, "{component}: {text}");
    }
    drop(procs);
}
