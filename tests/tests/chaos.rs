//! CI-sized chaos runs, one per mode: load for 40 s while every component is killed and
//! restarted, connections are dropped, the broker is restarted, bad messages are put on the work
//! queues, the data dir's disk is filled (as root, on a tmpfs), and refusals, delays and
//! duplicates are injected. The workflow mode ends with zero
//! audit inconsistencies and nothing lost; the events mode loses nothing either, and after reconcile
//! keeps only what no repair can change (what its 504s told the clients). The hybrid mode ends as
//! the workflow mode does, and its follow-ups (the email, the search entry) converge on every
//! success although each was killed too. The broker is a node of each test's own, since these
//! tests restart it.

use std::time::Duration;

use baton_audit::Kind;
use baton_compare::{ModeRun, Options, chaos, report};
use baton_faults::FaultPlan;
use baton_mgmt::Mgmt;
use baton_protocol::{Component, Mode};
use baton_tests::baton_bin;
use baton_tests::node::Node;

/// One chaos run of `mode` for `seconds` on a node of its own, with its figures on stderr.
async fn run(mode: Mode, seconds: u64) -> (ModeRun, String) {
    let out = tempfile::tempdir().unwrap();
    run_workflow(mode, seconds, None, out.path()).await
}

/// [`run`], with the gateway running `workflow` (workflow mode), its data dirs under `out`.
async fn run_workflow(
    mode: Mode,
    seconds: u64,
    workflow: Option<&str>,
    out: &std::path::Path,
) -> (ModeRun, String) {
    baton_tests::init_logs();
    let node = tokio::task::spawn_blocking(Node::start_with_management).await.unwrap();
    let opts = Options {
        modes: vec![mode],
        requests: 1_000_000,
        concurrency: 8,
        seed: 3,
        faults: FaultPlan::parse(FaultPlan::CHAOS, 3).unwrap(),
        quiesce_timeout: Duration::from_secs(120),
        duration: Some(Duration::from_secs(seconds)),
        broker_ctl: Some(node.ctl_command()),
        workflow: workflow.map(str::to_owned),
        ..Options::new(
            baton_bin(),
            format!("amqp://guest:guest@127.0.0.1:{}", node.port),
            Mgmt::new(&format!("http://127.0.0.1:{}", node.mgmt_port.unwrap()), "guest", "guest"),
            out.to_owned(),
        )
    };
    let run = chaos(&opts, mode).await.unwrap();
    let summary = report::chaos_summary(&run, &opts.faults.to_string(), seconds);
    eprintln!("{summary}");
    (run, summary)
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Every fault of the plan was carried out: each crash, the restart, drops, bad messages.
fn every_fault_was_injected(run: &ModeRun, mode: Mode, summary: &str) {
    let components = Component::of_mode(mode);
    for component in components {
        assert_eq!(run.injected.get(&format!("crash {component}")), Some(&1), "{summary}");
    }
    assert_eq!(run.injected.get("broker restarts"), Some(&1), "{summary}");
    // The full disk needs a tmpfs of the run's own, which only root may mount.
    if is_root() {
        assert_eq!(run.injected.get("disk full"), Some(&1), "{summary}");
    }
    assert!(run.injected.get("connections dropped").is_some_and(|n| *n > 0), "{summary}");
    assert!(run.injected.get("duplicate").is_some_and(|n| *n > 0), "{summary}");
    assert!(run.injected.get("refusal").is_some_and(|n| *n > 0), "{summary}");
    assert_eq!(run.bad_inputs_sent(), 20, "every bad message went out: {summary}");
    assert!(run.stats.ok > 50, "work got done: {summary}");
    assert!(run.quiescent, "{summary}");
    // Each bad message is in a dead-letter queue with a reason; nothing else is. (At least once:
    // a consumer killed between dead-lettering a message and acking it dead-letters it again
    // when it comes back, and a bad message whose confirm was lost with a connection is sent
    // again.)
    let (planned, other) = baton_compare::poison::tally(&run.dead_letters);
    assert!(planned >= 20 && other == 0, "{planned} planned, {other} other: {summary}");
    for m in run.dead_letters.iter().flat_map(|q| &q.first) {
        assert_ne!(m.reason, "no reason recorded", "{m:?}\n{summary}");
        assert!(
            !m.reason.starts_with("dead-lettered by the broker"),
            "one delivery, not a requeue loop: {m:?}"
        );
    }
    assert!(run.nothing_lost(), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_mode_survives_a_chaos_run_with_nothing_lost() {
    let (run, summary) = run(Mode::Workflow, 40).await;
    every_fault_was_injected(&run, Mode::Workflow, &summary);
    assert_eq!(run.injected.get("clock jumps"), Some(&2), "back an hour and forward again: {summary}");
    assert!(run.audit.is_consistent(), "{summary}\n{:#?}", run.audit.inconsistencies);
    assert!(run.audit.uncertain.is_empty(), "no 504 expected: {summary}\n{:#?}", run.audit.uncertain);
}

/// The same run with every request a parent saga and its child (`create-space-nested`): crashes
/// of the orchestrator land between parents and children too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nested_workflow_survives_a_chaos_run_with_nothing_lost() {
    let out = tempfile::tempdir().unwrap();
    let (run, summary) = run_workflow(Mode::Workflow, 40, Some("create-space-nested"), out.path()).await;
    every_fault_was_injected(&run, Mode::Workflow, &summary);
    assert!(run.audit.is_consistent(), "{summary}\n{:#?}", run.audit.inconsistencies);
    assert!(run.audit.uncertain.is_empty(), "no 504 expected: {summary}\n{:#?}", run.audit.uncertain);
    let sagas = baton_tests::sagas(&baton_store::Location::Dir(run.data_dir.clone()));
    let with_child = sagas.iter().filter(|s| s.workflow == "create-space-nested" && s.children.len() == 1);
    assert!(with_child.count() >= run.stats.ok, "each space created ran its child: {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_mode_loses_nothing_and_reconcile_repairs_all_it_can() {
    let (run, summary) = run(Mode::Events, 40).await;
    every_fault_was_injected(&run, Mode::Events, &summary);
    // Choreography leaves the refused requests' earlier rows behind: the plan must show it.
    let before = run.audit.by_kind();
    assert!(before.get(&Kind::LeftAfterFailure).is_some_and(|n| *n > 0), "{summary}");
    let rec = run.reconcile.as_ref().expect("events runs are reconciled");
    assert!(rec.fixed() > 0 && rec.failed.is_empty(), "{summary}");
    // Nothing inconsistent is left; what is, is only what a 504 told a client (uncertain): no
    // repair can change an answer given.
    let after = run.audit_after_reconcile.as_ref().expect("audited again");
    assert!(after.is_consistent(), "reconcile left {:#?}\n{summary}", after.inconsistencies);
    assert!(after.uncertain.iter().all(|v| v.told == Some(504)), "{summary}");
    assert!(after.uncertain.len() <= run.stats.timeouts, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_mode_survives_a_chaos_run_and_its_follow_ups_converge() {
    let (run, summary) = run(Mode::Hybrid, 40).await;
    every_fault_was_injected(&run, Mode::Hybrid, &summary);
    // The follow-ups were among the components killed and restarted.
    for follow_up in ["notifier", "search"] {
        assert_eq!(run.injected.get(&format!("crash {follow_up}")), Some(&1), "{summary}");
    }
    assert_eq!(run.injected.get("clock jumps"), Some(&2), "back an hour and forward again: {summary}");
    assert!(run.reconcile.is_none(), "a saga undoes itself: nothing to reconcile");
    // Consistent means every space told 200 has its email and its search entry too.
    assert!(run.audit.is_consistent(), "{summary}\n{:#?}", run.audit.inconsistencies);
    assert!(run.audit.uncertain.is_empty(), "no 504 expected: {summary}\n{:#?}", run.audit.uncertain);
    // (More: a request the killed gateway held got no answer, and its saga may have completed.)
    assert!(run.audit.complete >= run.stats.ok, "each 200 is a complete space: {summary}");
}
