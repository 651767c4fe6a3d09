//! A small `baton compare` run, as a user would start it: every component a real process, the
//! default fault plan (refusals, delays, duplicates, a crash, a connection drop).

use std::collections::BTreeSet;
use std::time::Duration;

use baton_audit::Kind;
use baton_compare::{Options, compare, report};
use baton_faults::FaultPlan;
use baton_mgmt::Mgmt;
use baton_protocol::{Mode, Service};
use baton_tests::{amqp_base, baton_bin, mgmt_base};

/// `(step, name)` of every refusal the plan injected into a plain request (one that competes
/// with no other for a name or a quota, so it reaches the same steps in both modes).
fn refusals(dir: &std::path::Path, seed: u64) -> BTreeSet<(String, String)> {
    let at = baton_store::Location::Dir(dir.to_owned());
    let mut all = BTreeSet::new();
    for service in [Service::Records, Service::Placement, Service::Entitlements, Service::Routing] {
        let holdings = baton_services::read::Holdings::at(&at, service);
        let injected = baton_tests::block_on(async move { holdings.injections().await }).unwrap();
        all.extend(
            injected
                .into_iter()
                .filter(|i| i.kind == "refusal" && i.key.starts_with(&format!("s{seed}-")))
                .map(|i| (i.step, i.key)),
        );
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_shows_what_each_mode_leaves_behind() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    let opts = Options {
        modes: vec![Mode::Workflow, Mode::Events],
        requests: 300,
        seed: 11,
        faults: FaultPlan::parse(FaultPlan::DEFAULT, 11).unwrap(),
        ..Options::new(
            baton_bin(),
            amqp_base(),
            Mgmt::new(&mgmt_base(), "guest", "guest"),
            out.path().to_owned(),
        )
    };
    let c = tokio::time::timeout(Duration::from_secs(110), compare(&opts))
        .await
        .expect("a small compare ends well within 2 minutes")
        .unwrap();
    let [wf, ev] = &c.runs[..] else { panic!("two runs") };
    assert_eq!((wf.mode, ev.mode), (Mode::Workflow, Mode::Events));
    for r in [wf, ev] {
        assert_eq!(r.stats.requests, 300);
        assert!(r.quiescent, "{} settled", r.mode);
        assert_eq!(r.stats.no_answer, 0, "{}: every request got an answer", r.mode);
        assert!(r.injected.get("crash routing") == Some(&1), "{}: {:?}", r.mode, r.injected);
        assert!(r.stats.timeouts == 0 || r.mode == Mode::Events, "{}: {:?}", r.mode, r.stats);
        assert!(
            r.injected.get("connections dropped").is_some_and(|n| *n > 0),
            "{}: {:?}",
            r.mode,
            r.injected
        );
        assert!(r.injected.get("refusal").is_some_and(|n| *n > 0), "{}: {:?}", r.mode, r.injected);
    }
    // The workflow column: whatever the faults, nothing left inconsistent.
    assert!(wf.audit.is_consistent(), "workflow: {:?}", wf.audit.inconsistencies);
    assert!(wf.reconcile.is_none());
    // The events column: refusals after the first step leave rows nobody undoes...
    assert!(!ev.audit.is_consistent(), "events mode leaves data behind under this plan");
    // ...at least one row for each step before the one that refused: the plan's refusals and the
    // natural ones, counted from what the clients were told.
    let refused_after = |steps: &[&str]| {
        ev.refused_at.iter().filter(|s| s.as_deref().is_some_and(|s| steps.contains(&s))).count()
    };
    let orphans = |s: Service| ev.audit.orphans.get(&s).copied().unwrap_or(0);
    let left_records = refused_after(&["placement", "entitlements", "routing"]);
    assert!(left_records > 0, "{:?}", ev.refused_at);
    assert!(orphans(Service::Records) >= left_records, "{:?} vs {left_records}", ev.audit.orphans);
    assert!(
        orphans(Service::Placement) >= refused_after(&["entitlements", "routing"]),
        "{:?}",
        ev.audit.orphans
    );
    assert!(orphans(Service::Entitlements) >= refused_after(&["routing"]), "{:?}", ev.audit.orphans);
    // While routing was down, some clients got no answer in time; their spaces completed later.
    assert!(ev.stats.timeouts > 0, "{:?}", ev.stats);
    assert!(ev.timeouts_split().0 > 0, "{:?}", ev.audit.by_kind());
    // Those are uncertain, not inconsistent: the audit keeps them apart.
    assert!(ev.audit.uncertain.len() >= ev.timeouts_split().0, "{:?}", ev.audit.by_kind());
    assert!(ev.audit.uncertain.iter().all(|v| v.told == Some(504)), "{:?}", ev.audit.uncertain);
    // ...until reconcile undoes them.
    let fixed = ev.reconcile.as_ref().unwrap();
    assert!(fixed.fixed() > 0 && fixed.failed.is_empty(), "{fixed}");
    // What reconcile cannot change is what the clients were told: a 504 stays a 504.
    let after = ev.audit_after_reconcile.as_ref().unwrap();
    assert!(after.orphans.is_empty(), "no row left behind: {:?}", after.orphans);
    assert!(after.is_consistent(), "{:?}", after.inconsistencies);
    assert!(
        after.uncertain.iter().all(|v| matches!(v.kind, Kind::TimedOutButCompleted | Kind::TimedOutNothing)),
        "{:?}",
        after.uncertain
    );
    // Half the messages: one event per step instead of a command and a reply.
    assert!(
        ev.messages_per_request() < wf.messages_per_request(),
        "{} vs {}",
        ev.messages_per_request(),
        wf.messages_per_request()
    );
    // The same seed injected the same refusals in both modes.
    // (A request that did not get through in one mode, a 504 or a 503 while a dropped
    // connection was being recovered say, may not have reached the same steps: leave it out.)
    let through = |r: &baton_compare::ModeRun, i: usize| r.statuses[i] == 200 || r.refused_at[i].is_some();
    let definite = |i: usize| through(wf, i) && through(ev, i);
    let keep = |set: BTreeSet<(String, String)>| -> BTreeSet<(String, String)> {
        set.into_iter()
            .filter(|(_, name)| name.strip_prefix("s11-").and_then(|i| i.parse().ok()).is_some_and(definite))
            .collect()
    };
    let (a, b) = (keep(refusals(&wf.data_dir, 11)), keep(refusals(&ev.data_dir, 11)));
    assert!(a.len() > 5, "{a:?}");
    assert_eq!(a, b, "same seed, same faults");

    let table = report::table(&c);
    assert!(
        table.contains("workflow") && table.contains("events") && table.contains("orphaned records"),
        "{table}"
    );
    // Both classes of the audit, a row each, with every mode's figure.
    let cells = |label: &str| -> Vec<String> {
        let line =
            table.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label}: {table}"));
        line[label.len()..].split_whitespace().map(str::to_owned).collect()
    };
    let counts = |f: fn(&baton_audit::Report) -> usize| {
        c.runs.iter().map(|r| f(&r.audit).to_string()).collect::<Vec<_>>()
    };
    assert_eq!(cells("audit: inconsistent spaces"), counts(|a| a.inconsistencies.len()), "{table}");
    assert_eq!(
        cells("audit: uncertain spaces (told 504, all or nothing)"),
        counts(|a| a.uncertain.len()),
        "{table}"
    );
    let html = report::html(&c);
    assert!(html.starts_with("<!doctype html>") && html.ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), 3 + 2, "three charts, and latency over time per mode");
    assert!(html.contains(r#"<p class="verdict">"#) && html.contains("at p50"), "opens with a verdict");
    for r in [wf, ev] {
        let crash = r.faults.iter().find(|f| f.kind == "crash routing").expect("the crash's window");
        // The plan keeps routing down 6 s.
        assert!(crash.to_ms >= crash.from_ms + 6_000, "{}: {crash:?}", r.mode);
        assert_eq!(r.sent_us.len(), r.latencies_us.len());
    }
    // To look at it: BATON_TEST_REPORT=/tmp/report.html.
    if let Some(path) = std::env::var_os("BATON_TEST_REPORT") {
        std::fs::write(path, &html).unwrap();
    }
    assert!(html.contains(">workflow<") && html.contains(">events<"));
    for fetches in ["<script", "<link", "src=", "https://", "url("] {
        assert!(!html.contains(fetches), "self-contained, no `{fetches}`");
    }
}

/// The nested workflow under the same plan: refusals injected in the child (placement,
/// entitlements) and in the parent after it (routing), a crash, dropped connections; nothing
/// is left inconsistent, and each saga that got past its record ran one child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_runs_the_nested_workflow_with_nothing_left_inconsistent() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    let opts = Options {
        modes: vec![Mode::Workflow],
        requests: 200,
        seed: 11,
        faults: FaultPlan::parse(FaultPlan::DEFAULT, 11).unwrap(),
        workflow: Some("create-space-nested".into()),
        ..Options::new(
            baton_bin(),
            amqp_base(),
            Mgmt::new(&mgmt_base(), "guest", "guest"),
            out.path().to_owned(),
        )
    };
    let c = tokio::time::timeout(Duration::from_secs(110), compare(&opts))
        .await
        .expect("a small compare ends well within 2 minutes")
        .unwrap();
    let [run] = &c.runs[..] else { panic!("one run") };
    assert!(run.quiescent && run.nothing_lost(), "{:?}", run.stats);
    assert_eq!(run.stats.no_answer, 0, "{:?}", run.stats);
    assert_eq!(run.stats.timeouts, 0, "{:?}", run.stats);
    assert!(run.injected.get("refusal").is_some_and(|n| *n > 0), "{:?}", run.injected);
    assert_eq!(run.injected.get("crash routing"), Some(&1), "{:?}", run.injected);
    assert!(run.audit.is_consistent(), "{:?}", run.audit.inconsistencies);
    let at = baton_store::Location::Dir(run.data_dir.clone());
    let sagas = baton_tests::sagas(&at);
    assert_eq!(sagas.len(), 200, "one saga per request, its child inside");
    assert!(sagas.iter().all(|s| s.workflow == "create-space-nested"));
    let past_record = |s: &&baton_orchestrator::query::WorkflowView| {
        s.history.iter().any(|h| h.step.as_deref() == Some("records") && h.event == "done")
    };
    let ran_child = sagas.iter().filter(past_record).filter(|s| s.children.len() == 1).count();
    assert_eq!(ran_child, sagas.iter().filter(past_record).count());
    let undone_whole = sagas
        .iter()
        .flat_map(|s| &s.children)
        .filter(|c| c.count(baton_workflow::HistoryEvent::UndoRequested) > 0);
    assert!(undone_whole.count() > 0, "some parents refused after their child succeeded");
}

/// `--modes workflow,events,hybrid`: three columns in the table, three series in each chart,
/// each in a colour of its own. Hybrid mode, its notifier killed mid-run, ends as consistent as
/// the workflow mode, with the follow-ups of every success, for fewer messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_runs_the_three_modes_side_by_side() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    let opts = Options {
        modes: vec![Mode::Workflow, Mode::Events, Mode::Hybrid],
        requests: 150,
        seed: 13,
        faults: FaultPlan::parse("refuse=0.03,duplicate=0.02,crash.notifier=50%+1s", 13).unwrap(),
        ..Options::new(
            baton_bin(),
            amqp_base(),
            Mgmt::new(&mgmt_base(), "guest", "guest"),
            out.path().to_owned(),
        )
    };
    let c = tokio::time::timeout(Duration::from_secs(240), compare(&opts))
        .await
        .expect("a small compare of three modes ends within 4 minutes")
        .unwrap();
    let [wf, ev, hy] = &c.runs[..] else { panic!("three runs") };
    assert_eq!((wf.mode, ev.mode, hy.mode), (Mode::Workflow, Mode::Events, Mode::Hybrid));
    for r in [wf, ev, hy] {
        assert_eq!(r.stats.requests, 150, "{}", r.mode);
        assert!(r.quiescent, "{} settled", r.mode);
        assert_eq!(r.stats.no_answer, 0, "{}: every request got an answer", r.mode);
        assert_eq!(r.injected.get("crash notifier"), Some(&1), "{}: {:?}", r.mode, r.injected);
    }
    // Hybrid: a saga, so nothing left behind and nothing to reconcile; and every success has
    // its email and search entry although the notifier was down a while.
    assert!(hy.audit.is_consistent(), "hybrid: {:?}", hy.audit.inconsistencies);
    assert!(hy.audit.uncertain.is_empty(), "hybrid: {:?}", hy.audit.uncertain);
    assert!(hy.reconcile.is_none());
    assert_eq!(hy.audit.complete, hy.stats.ok, "hybrid: {:?}", hy.stats);
    // One message per step and an announcement: between the choreography and the full saga.
    let per = |r: &baton_compare::ModeRun| r.messages_per_request();
    assert!(per(ev) < per(hy) && per(hy) < per(wf), "{} < {} < {}", per(ev), per(hy), per(wf));

    let table = report::table(&c);
    eprintln!("{table}");
    let header = table.lines().nth(1).expect("a header under the summary line");
    assert_eq!(header.split_whitespace().collect::<Vec<_>>(), ["workflow", "events", "hybrid"], "{table}");
    let line = table.lines().find(|l| l.starts_with("audit: inconsistent spaces")).expect("the row");
    let cells: Vec<String> =
        line["audit: inconsistent spaces".len()..].split_whitespace().map(str::to_owned).collect();
    let counts: Vec<String> = c.runs.iter().map(|r| r.audit.inconsistencies.len().to_string()).collect();
    assert_eq!(cells, counts, "{table}");

    let html = report::html(&c);
    assert_eq!(html.matches("<svg").count(), 3 + 3, "three charts, and latency over time per mode");
    assert!(html.contains("<h1>Baton: workflow vs events vs hybrid</h1>"), "named after the modes");
    // Three series in each of the three bar charts, each mode in its own colour.
    for (mode, colour) in [("workflow", "#2b6cb0"), ("events", "#dd6b20"), ("hybrid", "#2f855a")] {
        assert_eq!(html.matches(&format!(r#"fill="{colour}"/><text"#)).count(), 3, "{mode}'s legend");
        assert!(html.contains(&format!(r#"fill="{colour}"><title>{mode} "#)), "{mode}'s bars in {colour}");
        assert_eq!(html.matches(&format!(">{mode}</text>")).count(), 3, "{mode} in each legend");
    }
}
