//! CI-sized `baton bench` runs against the real broker: they run, and their figures are sane. No
//! time is asserted: the machine decides those.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_amqp::topology::QueueType;
use baton_bench::{
    Instrumentation, Latency, ModeReport, Options, Report, Throughput, nominal_messages, run, table,
};
use baton_mgmt::Mgmt;
use baton_protocol::Mode;

/// The `baton` binary next to this test executable (`target/<profile>/baton`).
fn baton_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("baton");
    assert!(
        bin.exists(),
        "{} is missing: this test runs the components as `baton run` processes; build it first with \
         `cargo build -p baton-cli` (same profile and target dir as the test)",
        bin.display()
    );
    bin
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn sane_latency(what: &str, l: &Latency, n: usize) {
    assert_eq!(l.samples, n, "{what}: samples");
    assert_eq!(l.errors, 0, "{what}: every request succeeds");
    assert!(l.p50_ms > 0.0 && l.mean_ms > 0.0, "{what}: {l:?}");
    assert!(l.p99_ms >= l.p50_ms && l.max_ms >= l.p99_ms, "{what}: {l:?}");
}

fn sane_throughput(what: &str, t: &Throughput) {
    assert!(t.completed > 0 && t.per_second > 0.0 && t.seconds > 0.0, "{what}: {t:?}");
    assert_eq!(t.errors, 0, "{what}: every request succeeds: {t:?}");
    assert!(t.p50_ms > 0.0 && t.p99_ms >= t.p50_ms, "{what}: {t:?}");
    assert!(t.cpu_ms_per_op.is_finite() && t.cpu_ms_per_op >= 0.0, "{what}: {t:?}");
}

/// Every saga succeeded, so each one's messages are all there (12 / 6 for create-space when none
/// is still under way; a little more than nominal can only come from a redelivery, and a lot
/// more from instances publishing the same outbox rows).
fn sane_messages(m: &ModeReport) {
    let nominal = nominal_messages(m.mode, m.steps);
    assert!(
        m.messages_per_saga >= nominal - 1.0 && m.messages_per_saga <= nominal + 1.0,
        "{}: {} messages per saga, nominal {nominal}",
        m.mode,
        m.messages_per_saga
    );
}

fn options(out: &Path) -> Options {
    let mgmt = Mgmt::new(&env("BATON_TEST_MGMT_URL", "http://127.0.0.1:15672"), "guest", "guest");
    Options::new(
        baton_bin(),
        env("BATON_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672"),
        mgmt,
        out.to_owned(),
    )
}

fn sane(r: &Report) {
    sane_latency("floor, one at a time", &r.floor.sequential, 20);
    sane_throughput("floor, loaded", &r.floor.loaded);
    assert!(r.floor.messages_per_second > 0.0);
    assert_eq!(r.modes.len(), 2);
    assert_eq!((r.settings.steps, r.settings.instances, r.settings.prefill), (5, 1, 0));
    for m in &r.modes {
        let mode = m.mode.as_str();
        assert_eq!(m.steps, 5, "{mode}: create-space's round trips");
        assert!(m.prefill.is_none());
        sane_latency(&format!("{mode}, HTTP"), &m.http_sequential, 20);
        assert_eq!(m.http_loaded.len(), 1);
        for t in &m.http_loaded {
            sane_throughput(&format!("{mode}, HTTP loaded"), t);
        }
        assert_eq!(m.direct_sequential.is_some(), mode == "workflow", "{mode}: orchestrator runs");
        if let Some(l) = &m.direct_sequential {
            sane_latency("orchestrator", l, 20);
        }
        if let Some(t) = &m.direct_loaded {
            sane_throughput("orchestrator, loaded", t);
        }
        assert_eq!(nominal_messages(m.mode, m.steps), if mode == "workflow" { 12.0 } else { 6.0 });
        sane_messages(m);
        assert!(m.sagas > 0);
        let names: Vec<&str> = m.components.iter().map(|c| c.component.as_str()).collect();
        assert_eq!(names.len(), if mode == "workflow" { 7 } else { 6 }, "{mode}: {names:?}");
        for c in &m.components {
            assert!(c.cpu_ms > 0.0 && c.peak_rss_kb > 0, "{mode}: {c:?}");
        }
        let ratios = [m.ratios.http_latency]
            .into_iter()
            .chain(m.ratios.direct_latency)
            .chain(m.ratios.http_messages.iter().map(|r| r.of_floor))
            .chain(m.ratios.direct_messages.as_ref().map(|r| r.of_floor));
        for ratio in ratios {
            assert!(ratio.is_finite() && ratio > 0.0, "{mode}: ratios {:?}", m.ratios);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_bench_reports_sane_figures() {
    let out = tempfile::tempdir().expect("a temporary dir");
    let mut opts = options(out.path());
    opts.sequential = 20;
    opts.warmup = 5;
    opts.windows = vec![8];
    opts.in_flight = 8;
    opts.duration = Duration::from_secs(2);
    opts.floor_duration = Duration::from_secs(2);
    opts.hold = 200;
    let report = run(&opts).await.expect("the bench runs");
    let text = table(&report);
    println!("{text}");
    sane(&report);
    assert!(text.contains("floor") && text.contains("workflow") && text.contains("events"));
    let json = serde_json::to_value(&report).expect("the report serialises");
    assert!(json["modes"][0]["ratios"]["http_latency"].is_number());

    // 200 sagas held in flight at once: all of them, and the orchestrator's RSS read then.
    let h = report.hold.as_ref().expect("the hold is measured");
    assert_eq!((h.requested, h.sagas), (200, 200), "{h:?}");
    assert!(h.orchestrator_rss_kb > 0 && h.orchestrator_peak_rss_kb >= h.orchestrator_rss_kb, "{h:?}");
    assert!(text.contains("orchestrator RSS with 200 sagas in flight"), "{text}");
    assert_eq!(json["hold"]["sagas"], 200);
    assert!(json["hold"]["orchestrator_rss_kb"].as_u64().is_some_and(|kb| kb > 0));
}

/// Two processes of each service on one data dir, after 20 sagas of prefill: the prefill is in
/// the databases but in none of the figures, and every measured request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_after_a_prefill_count_only_the_measured_sagas() {
    let out = tempfile::tempdir().expect("a temporary dir");
    let mut opts = options(out.path());
    opts.modes = vec![Mode::Workflow];
    opts.instances = 2;
    opts.prefill = 20;
    opts.sequential = 10;
    opts.warmup = 2;
    opts.windows = vec![4];
    opts.in_flight = 4;
    opts.duration = Duration::from_secs(2);
    opts.floor_duration = Duration::from_secs(1);
    opts.hold = 0;
    let report = run(&opts).await.expect("the bench runs");
    println!("{}", table(&report));
    assert_eq!((report.settings.instances, report.settings.prefill), (2, 20));
    assert!(report.hold.is_none(), "--hold 0 skips the phase");
    assert_eq!(report.modes.len(), 1);
    let m = &report.modes[0];
    assert_eq!((m.mode, m.steps, m.instances), (Mode::Workflow, 5, 2));

    let p = m.prefill.as_ref().expect("the prefill is reported");
    assert_eq!((p.requested, p.spaces, p.failed), (20, 20, 0), "{p:?}");

    sane_latency("HTTP", &m.http_sequential, 10);
    let direct = m.direct_sequential.as_ref().expect("workflow mode runs the orchestrator");
    sane_latency("orchestrator", direct, 10);
    let loaded: Vec<&Throughput> = m.http_loaded.iter().chain(&m.direct_loaded).collect();
    for t in &loaded {
        sane_throughput("loaded", t);
    }
    // The sagas counted are exactly the measured ones (warm-ups included), not the prefill's.
    let measured = 2 * (opts.warmup + opts.sequential) + loaded.iter().map(|t| t.completed).sum::<usize>();
    assert_eq!(m.sagas, measured as u64, "sagas counted");
    // ... while the databases hold both: every request succeeded, so one space each.
    let at = baton_store::Location::Dir(m.data_dir.clone());
    let records = baton_services::read::Holdings::at(&at, baton_protocol::Service::Records);
    let spaces = records.all().await.expect("records.db").len();
    assert_eq!(spaces as u64, m.sagas + 20, "spaces in records.db");
    sane_messages(m);

    // Five services and the orchestrator twice, the gateway once, each its own process and log.
    let names: Vec<String> = m.components.iter().map(|c| c.name()).collect();
    assert_eq!(names.len(), 13, "{names:?}");
    for s in baton_protocol::Service::ALL.map(|s| s.name()).into_iter().chain(["orchestrator"]) {
        for i in ["i1", "i2"] {
            let name = format!("{s}-{i}");
            assert!(names.contains(&name), "{name} in {names:?}");
            assert!(m.data_dir.join(format!("{name}.log")).exists(), "{name}.log");
        }
    }
    assert!(names.contains(&"gateway".to_string()));
    for c in &m.components {
        assert!(c.cpu_ms > 0.0 && c.peak_rss_kb > 0, "{c:?}");
    }
    let json = serde_json::to_value(&report).expect("the report serialises");
    assert_eq!(json["modes"][0]["prefill"]["spaces"], 20);
}

/// What seeing the sagas costs: three instrumentations, twice each, and spans reach the
/// bench's OTLP sink only from the traced runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instrumentation_rows_export_spans_only_when_traced() {
    let out = tempfile::tempdir().expect("a temporary dir");
    let mut opts = options(out.path());
    opts.modes = vec![Mode::Workflow];
    opts.sequential = 5;
    opts.warmup = 1;
    opts.windows = vec![4];
    opts.in_flight = 4;
    opts.duration = Duration::from_secs(1);
    opts.floor_duration = Duration::from_secs(1);
    opts.hold = 0;
    opts.instrumentation = true;
    let report = run(&opts).await.expect("the bench runs");
    let text = table(&report);
    println!("{text}");
    let rows = &report.instrumentation;
    let kinds: Vec<Instrumentation> = rows.iter().map(|r| r.instrumentation).collect();
    assert_eq!(kinds, [Instrumentation::Off, Instrumentation::Metrics, Instrumentation::Traced]);
    for r in rows {
        assert_eq!(r.runs, 2, "{r:?}");
        assert!(r.p50_ms > 0.0 && r.sagas_per_second > 0.0 && r.of_off > 0.0, "{r:?}");
        assert!(r.cpu_ms_per_saga.is_finite() && r.cpu_ms_per_saga > 0.0, "{r:?}");
    }
    assert_eq!(rows[0].of_off, 1.0);
    assert_eq!((rows[0].exported_bytes, rows[1].exported_bytes), (0, 0), "nothing traced: {rows:?}");
    assert!(rows[2].exported_bytes > 1_000, "the traced runs exported their spans: {rows:?}");
    assert!(text.contains("metrics + traces exported"), "{text}");
}

/// `--modes workflow,events,hybrid`: a row for each mode, hybrid's with create-space-hybrid's
/// four round trips, its one announcement among the messages, and the search index among the
/// components.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_bench_of_three_modes_has_a_hybrid_row() {
    let out = tempfile::tempdir().expect("a temporary dir");
    let mut opts = options(out.path());
    opts.modes = vec![Mode::Workflow, Mode::Events, Mode::Hybrid];
    opts.sequential = 10;
    opts.warmup = 2;
    opts.windows = vec![4];
    opts.in_flight = 4;
    opts.duration = Duration::from_secs(2);
    opts.floor_duration = Duration::from_secs(1);
    opts.hold = 0;
    let report = run(&opts).await.expect("the bench runs");
    let text = table(&report);
    println!("{text}");
    let modes: Vec<Mode> = report.modes.iter().map(|m| m.mode).collect();
    assert_eq!(modes, [Mode::Workflow, Mode::Events, Mode::Hybrid]);
    let h = &report.modes[2];
    assert_eq!(h.steps, 4, "create-space-hybrid's round trips: records, placement, entitlements, routing");
    assert_eq!(
        nominal_messages(h.mode, h.steps),
        11.0,
        "a command and a reply per step, start, answer, announcement"
    );
    sane_latency("hybrid, HTTP", &h.http_sequential, 10);
    for t in &h.http_loaded {
        sane_throughput("hybrid, HTTP loaded", t);
    }
    assert!(h.direct_sequential.is_none(), "the orchestrator alone is measured in workflow mode only");
    sane_messages(h);
    let names: Vec<&str> = h.components.iter().map(|c| c.component.as_str()).collect();
    assert_eq!(names.len(), 8, "five services, the search index, the orchestrator, the gateway: {names:?}");
    assert!(names.contains(&"search"), "{names:?}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("hybrid   HTTP")).collect();
    assert_eq!(rows.len(), 2, "one at a time and loaded: {text}");
}

fn tiny(opts: &mut Options) {
    opts.modes = vec![Mode::Workflow];
    opts.sequential = 10;
    opts.warmup = 2;
    opts.windows = vec![4];
    opts.in_flight = 4;
    opts.duration = Duration::from_secs(2);
    opts.floor_duration = Duration::from_secs(1);
    opts.hold = 0;
}

/// `--stages`: every process serves its /metrics, and the one-at-a-time run's stages come out
/// of them, each a hop's share: a create-space saga consumes 12 deliveries (the start, five
/// commands, five replies, the outcome), each handled, committed and acked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_are_read_from_every_component() {
    let out = tempfile::tempdir().expect("a temporary dir");
    let mut opts = options(out.path());
    tiny(&mut opts);
    opts.stages = true;
    opts.classic_row = true;
    let report = run(&opts).await.expect("the bench runs");
    let text = table(&report);
    println!("{text}");
    let m = &report.modes[0];
    let s = m.stages.as_ref().expect("--stages reports the stages");
    assert_eq!((s.backend.as_str(), s.sagas, s.processes), ("sqlite", 12, 7), "{s:?}");
    let names: Vec<&str> = s.rows.iter().map(|r| r.stage.as_str()).collect();
    let all = baton_metrics::Stage::ALL.map(|s| s.as_str());
    assert_eq!(names, all, "every stage, in a hop's order");
    for r in &s.rows {
        assert!(r.mean_us > 0.0 && r.p50_us > 0.0 && r.per_saga > 0.0, "{r:?}");
    }
    let per_saga = |stage: &str| s.rows.iter().find(|r| r.stage == stage).map(|r| r.per_saga).unwrap();
    for stage in ["decode", "handle", "ack"] {
        assert!((11.5..=13.0).contains(&per_saga(stage)), "{stage}: {} per saga", per_saga(stage));
    }
    assert!(per_saga("commit") >= 12.0, "every delivery commits, the gateway's request too");
    assert_eq!(per_saga("handoff"), per_saga("commit"), "only handlers' transactions are timed, each whole");
    assert!(text.contains("stages, workflow mode on sqlite: 12 sagas"), "{text}");
    // One instance on SQLite: nothing can conflict.
    assert_eq!(m.conflicts_retried, Some(0.0));

    // The row "workflow, classic queues": workflow mode again, its queues classic.
    assert_eq!(report.modes.len(), 2);
    let c = &report.modes[1];
    assert_eq!((c.mode, c.queue_type, c.label()), (Mode::Workflow, QueueType::Classic, "classic"));
    assert_eq!(m.queue_type, QueueType::Quorum);
    sane_latency("classic, HTTP", &c.http_sequential, 10);
    sane_messages(c);
    assert!(c.stages.is_some(), "its stages too");
    assert!(text.contains("classic  HTTP") && text.contains("workflow mode with classic queues"), "{text}");
}

/// `--scaling`: 1, 2 and 3 instances on SQLite and PostgreSQL, each row with the components'
/// CPU per saga and the conflicts retried per 1,000 sagas (read from their /metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaling_rows_report_cpu_and_conflicts_per_saga() {
    let out = tempfile::tempdir().expect("a temporary dir");
    let mut opts = options(out.path());
    tiny(&mut opts);
    opts.sequential = 4;
    opts.scaling = Some(env("BATON_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"));
    let report = run(&opts).await.expect("the bench runs");
    let text = table(&report);
    println!("{text}");
    let rows: Vec<(&str, usize)> = report.scaling.iter().map(|r| (r.backend.as_str(), r.instances)).collect();
    let want =
        [("sqlite", 1), ("sqlite", 2), ("sqlite", 3), ("postgres", 1), ("postgres", 2), ("postgres", 3)];
    assert_eq!(rows, want);
    for r in &report.scaling {
        assert!(r.cpu_ms_per_saga > 0.0 && r.cpu_ms_per_saga == r.loaded.cpu_ms_per_op, "{r:?}");
        let conflicts = r.conflicts_per_1000_sagas.expect("the components' metrics are read");
        assert!(conflicts >= 0.0 && conflicts.is_finite(), "{r:?}");
        if r.instances == 1 {
            assert_eq!(conflicts, 0.0, "one instance has nobody to conflict with: {r:?}");
        }
        assert!(r.stages.is_none(), "no --stages");
    }
    assert!(text.contains("CPU ms/saga") && text.contains("conflicts/1000"), "{text}");
}
