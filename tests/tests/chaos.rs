//! A CI-sized chaos run of the workflow mode: load for 40 s while every component is killed and
//! restarted, connections are dropped, the broker is restarted, and refusals, delays and
//! duplicates are injected. It ends with zero audit violations and nothing lost. The broker is
//! a node of the test's own, since this test restarts it.

use std::time::Duration;

use baton_compare::{Options, chaos, mgmt::Mgmt, report};
use baton_faults::FaultPlan;
use baton_protocol::Mode;
use baton_tests::baton_bin;
use baton_tests::node::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_mode_survives_a_chaos_run_with_nothing_lost() {
    baton_tests::init_logs();
    let node = tokio::task::spawn_blocking(Node::start_with_management).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let seconds = 40;
    let opts = Options {
        requests: 1_000_000,
        concurrency: 8,
        seed: 3,
        faults: FaultPlan::parse(FaultPlan::CHAOS, 3).unwrap(),
        quiesce_timeout: Duration::from_secs(120),
        duration: Some(Duration::from_secs(seconds)),
        broker_ctl: Some(node.ctl_command()),
        ..Options::new(
            baton_bin(),
            format!("amqp://guest:guest@127.0.0.1:{}", node.port),
            Mgmt::new(&format!("http://127.0.0.1:{}", node.mgmt_port.unwrap()), "guest", "guest"),
            out.path().to_owned(),
        )
    };
    let run = chaos(&opts, Mode::Workflow).await.unwrap();
    let summary = report::chaos_summary(&run, &opts.faults.to_string(), seconds);
    eprintln!("{summary}");
    for component in
        ["records", "placement", "entitlements", "routing", "notifier", "orchestrator", "gateway"]
    {
        assert_eq!(run.injected.get(&format!("crash {component}")), Some(&1), "{summary}");
    }
    assert_eq!(run.injected.get("broker restarts"), Some(&1), "{summary}");
    assert!(run.injected.get("connections dropped").is_some_and(|n| *n > 0), "{summary}");
    assert!(run.injected.get("duplicate").is_some_and(|n| *n > 0), "{summary}");
    assert!(run.stats.ok > 50, "work got done: {summary}");
    assert!(run.quiescent, "{summary}");
    assert!(run.audit.is_clean(), "{summary}\n{:#?}", run.audit.violations);
    assert!(run.nothing_lost(), "{summary}");
}
