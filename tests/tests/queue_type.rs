//! `--queue-type classic` (`BATON_QUEUE_TYPE`): every work queue and dead-letter queue is a
//! classic durable queue, dead-lettering kept and no delivery limit, and sagas run on them as on
//! quorum queues.

use std::time::Duration;

use baton_tests::{Api, TestEnv, every_saga_ends, free_port, mgmt_base, spawn_baton, wait_for};
use serde_json::Value;

/// Every queue of `vhost`, as the management API describes them.
async fn queues(vhost: &str) -> Vec<Value> {
    let url = format!("{}/api/queues/{vhost}", mgmt_base());
    let r = reqwest::Client::new().get(url).basic_auth("guest", Some("guest")).send().await.unwrap();
    assert!(r.status().is_success(), "listing the queues: {}", r.status());
    r.json::<Vec<Value>>().await.unwrap()
}

#[tokio::test]
async fn a_run_on_classic_queues_completes_its_sagas_and_declares_only_classic_queues() {
    let env = TestEnv::new().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let args = ["up", "--mode", "workflow", "--http", &addr];
    let mut up = spawn_baton(&env, &args, &[("BATON_QUEUE_TYPE", "classic")], "up.log");
    let api = Api::new(addr.parse().unwrap());
    api.wait_healthy().await;
    // The first one may meet a component still starting: tried until it goes through.
    wait_for("a first space created", Duration::from_secs(60), || async {
        (api.create("classic-0", "alice").await.0 == 200).then_some(())
    })
    .await;
    for i in 1..3 {
        let (status, body) = api.create(&format!("classic-{i}"), "bob").await;
        assert_eq!(status, 200, "{body}");
    }
    every_saga_ends(&env, Duration::from_secs(30)).await;

    let all = queues(&env.vhost).await;
    let work: Vec<&Value> = all.iter().filter(|q| q["durable"] == true).collect();
    let names: Vec<&str> = work.iter().filter_map(|q| q["name"].as_str()).collect();
    for expected in
        ["records.commands", "records.commands.dlq", "orchestrator.replies", "orchestrator.commands"]
    {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    for q in &work {
        let name = q["name"].as_str().unwrap_or_default();
        assert_eq!(q["type"], "classic", "{name}: {q}");
        let args = &q["arguments"];
        assert!(
            args.get("x-delivery-limit").is_none(),
            "{name}: classic queues have no delivery limit: {args}"
        );
        if !name.ends_with(".dlq") {
            assert_eq!(args["x-dead-letter-exchange"], "baton.dlx", "{name}: dead-lettering is kept: {args}");
            assert_eq!(args["x-dead-letter-routing-key"], format!("{name}.dlq"), "{name}: {args}");
        }
    }
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    let _ = up.kill().await;
}
